"""The runs shipped with the notebooks (``notebooks/trained``), the slim export that makes them
(:func:`dmlnb.runs.export_run`), and the notebook helpers that open on them."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import torch

from dmlnb import notebook as nbk
from dmlnb import runs
from dmlnb.config import TrainConfig
from dmlnb.experiment import embed, load_model, run_dataset
from tests.tiny import TINY_RUN

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = ROOT / "notebooks" / "trained"
#: the shipped pair together stays small (the repository carries it)
MAX_SHIPPED_BYTES = 8 * 2**20


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """One finished tiny SSR run (seconds on one thread)."""
    from dmlnb.train import fit

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        path = tmp_path_factory.mktemp("export") / "run"
        fit(dict(TINY_RUN, ssr=True, run_dir=str(path)))
    finally:
        torch.set_num_threads(n)
    return path


def _embed_run(run_dir):
    run = runs.load_run(run_dir)
    return embed(load_model(run), run_dataset(run), batch_size=run.train_config().eval_batch_size)


# --- export_run ----------------------------------------------------------------------------------
def test_export_round_trips_bit_for_bit_without_optimiser_state(tiny_run, tmp_path, one_thread):
    slim = runs.export_run(tiny_run, tmp_path / "slim")
    for name in (runs.CONFIG_FILE, runs.SUMMARY_FILE, runs.METRICS_FILE):
        assert (slim / name).read_bytes() == (tiny_run / name).read_bytes()
    assert not (slim / runs.EMBEDDINGS_FILE).exists()
    used = runs.load_run(tiny_run).summary["test_checkpoint"]
    assert sorted(p.name for p in (slim / runs.CHECKPOINT_DIR).iterdir()) == [used]
    # weights only, loadable with weights_only=True
    state = torch.load(slim / runs.CHECKPOINT_DIR / used, map_location="cpu", weights_only=True)
    assert set(state) == {"model", "in_channels", "epoch", "step"}
    full = runs.load_checkpoint(tiny_run / runs.CHECKPOINT_DIR / runs.LAST_CHECKPOINT)
    assert "optimizer" in full and "optimizer" not in state and "metric_loss" not in state
    assert (slim / runs.CHECKPOINT_DIR / used).stat().st_size < (
        tiny_run / runs.CHECKPOINT_DIR / runs.LAST_CHECKPOINT).stat().st_size
    # load_run / load_model read the copy as the run: the same model, the same embeddings
    copy = runs.load_run(slim)
    assert copy.finished and copy.config == runs.load_run(tiny_run).config
    original, exported = load_model(tiny_run), load_model(slim)
    for (k, a), (k2, b) in zip(original.state_dict().items(), exported.state_dict().items(), strict=True):
        assert k == k2 and torch.equal(a, b), k
    got = _embed_run(slim)
    with np.load(tiny_run / runs.EMBEDDINGS_FILE) as z:
        for key in ("embeddings", "labels", "indices"):
            assert got[key].dtype == z[key].dtype and np.array_equal(got[key], z[key]), key


def test_export_refuses_unfinished_and_occupied_and_replaces(tiny_run, tmp_path):
    from dmlnb.train import fit

    unfinished = tmp_path / "unfinished"
    fit(dict(TINY_RUN, run_dir=str(unfinished)), stop_after_steps=1)
    with pytest.raises(ValueError, match="not a finished run"):
        runs.export_run(unfinished, tmp_path / "x")
    dst = runs.export_run(tiny_run, tmp_path / "slim", embeddings=True)
    assert (dst / runs.EMBEDDINGS_FILE).read_bytes() == (tiny_run / runs.EMBEDDINGS_FILE).read_bytes()
    with pytest.raises(runs.RunExistsError, match="replace=True"):
        runs.export_run(tiny_run, dst)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(runs.RunExistsError):  # a folder that holds no run is never written into
        runs.export_run(tiny_run, tmp_path / "other", replace=True)
    runs.export_run(tiny_run, dst, replace=True)  # without embeddings: the old copy's file goes
    assert runs.is_run(dst) and not (dst / runs.EMBEDDINGS_FILE).exists()


def test_run_embeddings_recomputes_a_slim_run_and_caches(tiny_run, tmp_path, one_thread):
    slim = runs.export_run(tiny_run, tmp_path / "slim")
    cache = tmp_path / "cache"
    first = nbk.run_embeddings(runs.load_run(slim), cache_dir=cache)
    with np.load(tiny_run / runs.EMBEDDINGS_FILE) as z:
        assert all(np.array_equal(first[k], z[k]) for k in z.files)
    assert len(list(cache.glob("slim-*.npz"))) == 1
    again = nbk.run_embeddings(slim, cache_dir=cache)
    assert all(np.array_equal(first[k], again[k]) for k in first)
    # a run with its embeddings.npz is read as it is, nothing cached
    assert np.array_equal(nbk.run_embeddings(tiny_run, cache_dir=None)["embeddings"], first["embeddings"])


# --- the shipped pair ----------------------------------------------------------------------------
@pytest.mark.parametrize("kind, ssr", [("baseline", False), ("ssr", True)])
def test_shipped_runs_exist_load_and_say_their_settings(kind, ssr, one_thread):
    path = nbk.shipped_run(kind)
    assert path == SHIPPED / f"glyphs-{kind}"
    run = runs.load_run(path)
    assert run.finished and run.config["seed"] == 0 and run.config["ssr"] is ssr
    assert run.summary["config"]["ssr"] is ssr and run.summary["seed"] == 0
    assert run.config["backbone"] == "smallcnn" and run.config["dataset"] == "glyphs"
    # the package defaults, apart from ssr, the run folder, the flags of the build (device pinned
    # to the CPU, quiet, resume) and settings of the evaluation pass only, which change no weight
    # (a default of those may change after the runs were built without making them stale)
    defaults = TrainConfig().to_dict()
    changed = {k for k, v in run.train_config().to_dict().items() if v != defaults[k]}
    assert changed <= {"ssr", "run_dir", "device", "quiet", "resume", "eval_batch_size"}, changed
    assert not (path / runs.EMBEDDINGS_FILE).exists()
    files = sorted(p.name for p in (path / runs.CHECKPOINT_DIR).iterdir())
    assert files == [run.summary["test_checkpoint"]]
    state = torch.load(path / runs.CHECKPOINT_DIR / files[0], map_location="cpu", weights_only=True)
    assert set(state) == {"model", "in_channels", "epoch", "step"}
    model = load_model(path)
    out = model(torch.rand(2, 1, 32, 32), ssr=True)
    assert out[0].shape == (2, 128) and out[1].shape == (2, 128)
    assert len(run.metrics("step")) == run.config["epochs"] * run.config["steps_per_epoch"]


def test_shipped_pair_differs_only_in_ssr_and_is_small():
    base, ssr = (runs.load_run(nbk.shipped_run(k)).config for k in ("baseline", "ssr"))
    assert {k for k in base if base[k] != ssr[k]} == {"ssr", "run_dir"}
    size = sum(p.stat().st_size for p in SHIPPED.rglob("*") if p.is_file())
    assert size < MAX_SHIPPED_BYTES, f"notebooks/trained holds {size / 2**20:.1f} MB"


def test_shipped_runs_are_tracked_not_ignored():
    import subprocess

    ignored = subprocess.run(["git", "check-ignore", "-q", str(SHIPPED / "glyphs-ssr" / "config.json")],
                             cwd=ROOT, capture_output=True)
    if ignored.returncode == 128:
        pytest.skip("not a git checkout")
    assert ignored.returncode == 1, "notebooks/trained is ignored by git"


# --- the notebooks' helpers open on the shipped runs ----------------------------------------------
def test_explorer_model_defaults_to_the_shipped_ssr_run(one_thread):
    model, note = nbk.explorer_model(None, 0)
    assert model is not None and "no model" not in note and "shipped SSR run" in note
    want = load_model(nbk.shipped_run("ssr")).state_dict()
    assert all(torch.equal(a, want[k]) for k, a in model.state_dict().items())
    assert not model.training
    none, note = nbk.explorer_model(None, 0, model="none")
    assert none is None and note.startswith("no model")
    with pytest.raises(ValueError, match="model='resnet'"):
        nbk.explorer_model(None, 0, model="resnet")
    assert nbk.explorer_data_options(None, 0, "shipped") == {}
    assert nbk.explorer_data_options(None, 0, "pretrained") == {"image_size": 64}
    assert nbk.explorer_data_options(None, 5, "pretrained") == {}  # quick training wins


def test_views_and_intraclass_knobs_default_to_the_shipped_runs():
    assert nbk.KNOBS["views"]["model"].default == "shipped"
    assert nbk.KNOBS["intraclass"]["train_steps"].default == 0
    with pytest.raises(ValueError, match="model="):
        nbk.parameters("views", {"model": "big"})
    pair = nbk.intraclass_runs(None, None, 0)
    assert pair == {"baseline": nbk.shipped_run("baseline"), "SSR": nbk.shipped_run("ssr")}
    assert nbk.intraclass_runs("mine", None, 0)["baseline"] == Path("mine")


@pytest.mark.slow
def test_pretrained_run_is_built_once_then_reused(tmp_path, one_thread):
    """The plumbing of ``model="pretrained"`` on a tiny budget and data (the real one trains for
    minutes and is built only when asked): trained on first use, reused at once after."""
    tiny = dict(dataset_options={"max_per_class": 4}, batch_size=8, ssr_images=2,
                ssr_diag_images=0, eval_batch_size=64)
    path = nbk.pretrained_run(steps=1, runs_root=tmp_path, **tiny)
    assert path == tmp_path / "pretrained" / "glyphs-lite0-ssr-steps1-seed0"
    cfg = runs.load_run(path).config
    assert cfg["backbone"] == "efficientnet_lite0" and cfg["pretrained"] and cfg["image_size"] == 64
    start = time.perf_counter()
    assert nbk.pretrained_run(steps=1, runs_root=tmp_path, **tiny) == path
    assert time.perf_counter() - start < 5.0
    load_model(path)
