"""The tiny training config several test modules share (seconds per run on one thread)."""

# 12 typefaces per character: 300 train / 72 val / 372 test images; batches of 4 classes x 4
TINY_RUN = dict(
    dataset="glyphs",
    dataset_options={"max_per_class": 12},
    batch_size=16,
    samples_per_class=4,
    ssr_images=4,
    epochs=2,
    steps_per_epoch=2,
    eval_batch_size=256,
    quiet=True,
    num_workers=0,
    device="cpu",
)
