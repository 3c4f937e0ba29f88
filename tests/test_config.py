"""TrainConfig: defaults from dmlnb.defaults, validation in one message, presets."""

from __future__ import annotations

import dataclasses
import json

import pytest

from dmlnb import defaults as D
from dmlnb.config import PRESETS, TrainConfig, field_names, preset

# the public field names (notebook parameters, CLI flags and sweep grids use them)
ISSUE_FIELDS = ("dataset", "data_root", "loss", "ssr", "ssr_prob", "ssr_weight", "ssr_levels",
                "ssr_images", "epochs", "steps_per_epoch", "batch_size", "samples_per_class",
                "backbone", "pretrained", "embed_dim", "image_size", "lr", "seed", "device",
                "run_dir", "resume")


def test_issue_field_names_exist():
    assert set(ISSUE_FIELDS) <= set(field_names())


def test_method_defaults_come_from_defaults_module():
    c = TrainConfig()
    pairs = {"ssr_prob": D.SSR_PROB, "ssr_weight": D.SSR_WEIGHT, "ssr_levels": D.SSR_LEVELS,
             "ssr_images": D.SSR_IMAGES, "ssr_families": D.SSR_FAMILIES,
             "ssr_sigma": D.SSR_SIGMA, "ssr_nested": D.SSR_NESTED, "ssr_pairs": D.RANK_PAIRS,
             "rank_scale": D.RANK_SCALE, "rank_alpha": D.RANK_ALPHA, "rank_beta": D.RANK_BETA,
             "rank_pos_weight": D.RANK_POS_WEIGHT, "embed_dim": D.EMBED_DIM,
             "ssr_dim": D.SSR_DIM, "ssr_hidden": D.SSR_HIDDEN, "pooling": D.POOLING,
             "head_lr_mult": D.HEAD_LR_MULT, "weight_decay": D.WEIGHT_DECAY,
             "samples_per_class": D.SAMPLES_PER_CLASS, "eval_ks": D.RECALL_KS}
    for name, value in pairs.items():
        assert getattr(c, name) == value, name
    # CPU-on-glyphs defaults: the embedded data set, a small CNN, no download
    assert (c.dataset, c.backbone, c.pretrained, c.image_size) == ("glyphs", "smallcnn", False, 32)
    assert c.batch_size % c.samples_per_class == 0 and c.ssr is True


def test_from_dict_reports_every_problem_in_one_message():
    bad = {"lossx": 1, "ssr_prob": 1.5, "pooling": "mean", "batch_size": 30,
           "samples_per_class": 4, "seed": -1, "amp": "fp8", "ssr_families": ["crop", "warp"]}
    with pytest.raises(ValueError) as info:
        TrainConfig.from_dict(bad)
    msg = str(info.value)
    for needle in ("'lossx'", "valid config fields are", "ssr_prob=1.5", "[0.0, 1.0]",
                   "pooling='mean'", "'avg', 'max'", "batch_size=30 must be a multiple",
                   "seed must be a non-negative", "amp='fp8'", "'bf16'", "ssr_families='warp'",
                   "'perspective'"):
        assert needle in msg, needle
    assert msg.count("\n  - ") == 7  # one line per problem


@pytest.mark.parametrize("changes, needle", [
    ({"loss": ""}, "loss must be a name"),
    ({"device": "cuda:abc"}, "'cuda:N'"),
    ({"lr": float("inf")}, "lr=inf is not a finite number"),
    ({"ssr_weight": float("inf")}, "ssr_weight=inf"),
    ({"rank_scale": float("inf")}, "rank_scale=inf"),
    ({"head_lr_mult": float("inf")}, "head_lr_mult=inf"),
    ({"lr": float("nan")}, "lr=nan"),
    ({"schedule": "linear"}, "'cosine'"),
    ({"ssr_images": 200}, "ssr_images=200 must be <= batch_size"),
    ({"val_split": None}, "eval_checkpoint='best' needs a val_split"),
    ({"epochs": 0}, "epochs=0"),
    ({"steps_per_epoch": 2.5}, "steps_per_epoch must be an integer"),
    ({"ssr": "yes"}, "ssr must be true or false"),
    ({"device": "tpu"}, "'cuda:N'"),
    ({"lr_milestones": [0.5, 1.5]}, "lr_milestones=1.5"),
    ({"loss_params": [1]}, "loss_params must be a dict"),
])
def test_invalid_values_name_the_field_and_choices(changes, needle):
    with pytest.raises(ValueError, match="invalid TrainConfig") as info:
        TrainConfig.from_dict(changes)
    assert needle in str(info.value)


def test_constructor_validates_too():
    with pytest.raises(ValueError, match="ssr_levels"):
        TrainConfig(ssr_levels=1)


def test_optional_fields_accept_none():
    c = TrainConfig.from_dict({"steps_per_epoch": None, "max_steps": None, "freeze_bn": None,
                               "val_split": None, "eval_checkpoint": "last"})
    assert c.steps_per_epoch is None and c.val_split is None


def test_json_round_trip_and_lists_become_tuples(tmp_path):
    c = TrainConfig.from_dict({"ssr_families": ["crop", "color"], "eval_ks": [1, 10],
                               "loss_params": {"margin": 0.1}, "seed": 7})
    assert c.ssr_families == ("crop", "color") and c.eval_ks == (1, 10)
    path = tmp_path / "c.json"
    c.to_json(path)
    assert json.loads(path.read_text())["ssr_families"] == ["crop", "color"]
    assert TrainConfig.from_json(path) == c
    assert TrainConfig.from_dict(c.to_dict()) == c
    assert TrainConfig.from_dict(c) is c


def test_replace_validates():
    c = TrainConfig()
    assert c.replace(seed=3).seed == 3 and c.seed == 0
    with pytest.raises(ValueError, match="unknown config fields: 'sead'"):
        c.replace(sead=3)


def test_from_dict_type_error_for_non_mapping():
    with pytest.raises(TypeError, match="TrainConfig or a dict"):
        TrainConfig.from_dict([("seed", 1)])


def test_presets_follow_the_paper():
    names = {f"paper-{d}-{k}" for d in ("cub200", "cars196", "sop") for k in (128, 512)}
    assert names <= set(PRESETS)
    for name in names:
        p = PRESETS[name]
        assert p["backbone"] == "resnet50" and p["pretrained"] is True
        assert p["image_size"] == D.CROP and p["lr"] == D.LR
        assert p["head_lr_mult"] == D.HEAD_LR_MULT and p["weight_decay"] == D.WEIGHT_DECAY
        assert p["batch_size"] == D.CLASSES_PER_BATCH * D.SAMPLES_PER_CLASS
        assert p["embed_dim"] == int(name.rsplit("-", 1)[1])
        assert p["dataset"] == name.split("-")[1]
        assert tuple(p["eval_ks"]) == (D.SOP_RECALL_KS if "sop" in name else D.RECALL_KS)
        assert set(p) <= set(field_names())


def test_cpu_presets_are_the_pretrained_regime_on_embedded_data():
    from dmlnb.experiment import check_config

    for dataset in ("glyphs", "icons"):
        p = PRESETS[f"cpu-{dataset}-lite0"]
        assert p["dataset"] == dataset and p["backbone"] == "efficientnet_lite0"
        assert p["pretrained"] is True and p["channels_last"] is True
        assert p["lr"] == D.LR and p["head_lr_mult"] == D.HEAD_LR_MULT  # the paper's rates
        check_config(preset(f"cpu-{dataset}-lite0"))


def test_preset_builds_a_valid_config_with_overrides():
    c = preset("paper-cub200-512", data_root="/data", epochs=2)
    assert c.embed_dim == 512 and c.epochs == 2 and c.data_root == "/data"
    with pytest.raises(ValueError, match="paper-sop-512"):
        preset("paper-cub-512")


def test_every_field_has_a_default():
    for f in dataclasses.fields(TrainConfig):
        assert (f.default is not dataclasses.MISSING
                or f.default_factory is not dataclasses.MISSING), f.name


@pytest.mark.parametrize("changes, needle", [
    ({"loss": "arcface"}, "'multisimilarity'"),
    ({"backbone": "vit"}, "'resnet50'"),
    ({"dataset": "mnist"}, "'glyphs'"),
    ({"loss": "margin", "loss_params": {"marign": 0.1}}, "'marign'"),
])
def test_registry_names_are_checked_by_the_experiment_layer(changes, needle):
    """Names that live in the registries of the layers above config (datasets, losses,
    backbones, a loss's parameters) are refused by check_config, naming the valid ones."""
    from dmlnb.experiment import check_config

    config = TrainConfig.from_dict(changes)  # the config layer alone accepts any name
    with pytest.raises(ValueError, match="invalid TrainConfig") as info:
        check_config(config)
    assert needle in str(info.value)


def test_config_is_a_leaf_layer():
    """Importing dmlnb.config and building a TrainConfig imports neither torch nor another
    dmlnb layer (only dmlnb.defaults and dmlnb._validate)."""
    import subprocess
    import sys

    code = ("import sys; import dmlnb.config as c; c.TrainConfig(); "
            "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('dmlnb')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=60).stdout
    assert eval(out) == ["dmlnb", "dmlnb._validate", "dmlnb.config", "dmlnb.defaults"]
