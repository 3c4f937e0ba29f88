"""The notebooks: stored clean, parameters cell = config fields / declared knobs, and each one
executed headless by papermill with tiny parameters, asserting on what it writes."""

from __future__ import annotations

import ast
import json
import math
import os
from pathlib import Path

import nbformat
import numpy as np
import pytest

from dmlnb import notebook as nbk
from dmlnb.config import TrainConfig, field_names

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = ROOT / "notebooks"
FILES = {
    "views": "01_views.ipynb",
    "train": "02_train.ipynb",
    "ablations": "03_ablations.ipynb",
    "intraclass": "04_intraclass_umap.ipynb",
}
KERNEL = "python3"
# every execution here is bounded: tiny parameters run in seconds to a minute, so a stuck kernel or
# client fails its test in minutes instead of hanging the suite (dmlnb.execute.run_notebook)
CELL_TIMEOUT = 600
NOTEBOOK_TIMEOUT = 1200
TINY_DATA = {"max_per_class": 8}  # 8 typefaces per character: the test split has 31 x 8 items
TINY_TRAIN = {"epochs": 1, "steps_per_epoch": 2, "batch_size": 32, "ssr_images": 4,
              "dataset_options": TINY_DATA, "quiet": True}


def _read(name: str) -> nbformat.NotebookNode:
    return nbformat.read(NOTEBOOKS / FILES[name], as_version=4)


def _parameters_cell(book: nbformat.NotebookNode) -> dict[str, object]:
    code = [c for c in book.cells if c.cell_type == "code"]
    assert "parameters" in code[0].metadata.get("tags", []), "first code cell must be tagged parameters"
    values = {}
    for node in ast.parse(code[0].source).body:
        assert isinstance(node, ast.Assign), f"parameters cell holds only assignments: {ast.dump(node)}"
        values[node.targets[0].id] = ast.literal_eval(node.value)
    return values


# --- static checks (fast) ------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(FILES))
def test_stored_without_outputs_and_validated_in_second_cell(name):
    book = _read(name)
    assert book.metadata["kernelspec"]["name"] == KERNEL
    for cell in book.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, f"{name} has stored outputs"
    second = [c for c in book.cells if c.cell_type == "code"][1].source
    call = "nb.train_parameters(globals())" if name == "train" else f'nb.parameters("{name}", globals())'
    assert call in second
    assert any(c.cell_type == "markdown" and "$" in c.source for c in book.cells), "narrative with equations"


@pytest.mark.parametrize("name", ["views", "ablations", "intraclass"])
def test_parameters_cell_matches_declared_knobs(name):
    values = _parameters_cell(_read(name))
    knobs = nbk.KNOBS[name]
    assert set(values) == set(knobs)
    for key, value in values.items():
        default = knobs[key].default
        if key not in ("runs_root", "sweep_dir", "run_dir"):  # paths are relative to notebooks/
            assert value == default, f"{name}: {key}={value!r} but KNOBS default is {default!r}"
        if knobs[key].check is not None:
            knobs[key].check(key, value)


def test_train_parameters_are_config_fields_at_their_defaults():
    values = _parameters_cell(_read("train"))
    fields = set(field_names())
    knobs = set(nbk.KNOBS["train"])
    assert set(values) <= fields | knobs
    assert {"dataset", "loss", "ssr", "ssr_prob", "ssr_weight", "ssr_levels", "ssr_images", "epochs",
            "steps_per_epoch", "batch_size", "backbone", "lr", "seed", "run_dir"} <= set(values)
    defaults = TrainConfig().to_dict()
    for key, value in values.items():
        if key in fields and key != "runs_root":  # runs go to the repository's runs/, not notebooks/runs
            want = defaults[key]
            got = list(value) if isinstance(value, tuple) else value
            assert got == want, f"02_train: {key}={value!r} but TrainConfig's default is {want!r}"


def test_parameters_rejects_unknown_and_invalid():
    base = {"In": [], "Out": {}, "get_ipython": print, "_": None, "np": np}
    assert nbk.parameters("views", base)["levels"] == nbk.KNOBS["views"]["levels"].default
    with pytest.raises(ValueError, match=r"n_imagez.*valid parameters of the views notebook are: .*n_images"):
        nbk.parameters("views", dict(base, n_imagez=3))
    with pytest.raises(ValueError, match="projection='tsne' is not valid; choose one of 'umap', 'pca'"):
        nbk.parameters("intraclass", dict(base, projection="tsne"))
    with pytest.raises(ValueError, match="families='swirl'"):
        nbk.parameters("views", dict(base, families=("crop", "swirl")))
    with pytest.raises(ValueError, match="levels=0"):
        nbk.parameters("views", dict(base, levels=0))
    with pytest.raises(ValueError, match="notebook="):
        nbk.parameters("nope", base)


def test_train_parameters_split_config_and_knobs():
    cfg, knobs = nbk.train_parameters({"ssr": False, "epochs": 2, "gallery_k": 3})
    assert isinstance(cfg, TrainConfig) and cfg.ssr is False and cfg.epochs == 2
    assert knobs["gallery_k"] == 3 and knobs["figures_dir"] is None
    with pytest.raises(ValueError, match=r"unknown parameters of the train notebook: 'ssr_wieght'"):
        nbk.train_parameters({"ssr_wieght": 0.5})
    with pytest.raises(ValueError, match="loss"):
        nbk.train_parameters({"loss": "hinge"})


def test_pick_images_and_retrieval_examples():
    labels = np.repeat(np.arange(5), 4)
    picked = nbk.pick_images(labels, 3, seed=1)
    assert len({int(labels[i]) for i in picked}) == 3
    assert picked == nbk.pick_images(labels, 3, seed=1)
    rng = np.random.default_rng(0)
    emb = rng.normal(size=(20, 8)) + 3 * np.eye(5)[labels] @ rng.normal(size=(5, 8))
    queries, nbrs, correct = nbk.retrieval_examples(emb, labels, 4, 3, seed=0)
    norm = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    for q, row, ok in zip(queries, nbrs, correct, strict=True):
        sims = norm @ norm[q]
        sims[q] = -np.inf  # the query itself never counts
        want = np.argsort(-sims, kind="stable")[:3]
        assert list(row) == list(want)
        assert list(ok) == list(labels[want] == labels[q])


def test_family_gallery_shapes_and_identity_column():
    import torch

    images = torch.rand(2, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    views, rows, strengths = nbk.family_gallery(images, ("crop", "color"), levels=3, sigma=0.2)
    assert views.shape == (2 * 3, 4, 1, 16, 16) and len(rows) == 6
    assert strengths[0] == 0.0 and strengths == sorted(strengths)
    assert torch.equal(views[0, 0], images[0]) and torch.equal(views[3, 0], images[1])
    assert rows[2] == "#1 crop + color"


def test_default_ablation_grid_expands():
    from dmlnb.sweep import expand_grid

    points = expand_grid(nbk.default_ablation_grid(seeds=3, steps=5))
    assert len(points) == 4 * 3
    assert sum(not p["ssr"] for p in points) == 3
    assert all(p["steps_per_epoch"] == 5 for p in points)
    TrainConfig.from_dict(points[-1])  # every point is a valid config


# --- papermill executions ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def kernel_env():
    """Kernels import dmlnb from this checkout (installed or not) and use one thread each."""
    from jupyter_client.kernelspec import find_kernel_specs

    if KERNEL not in find_kernel_specs():
        pytest.fail(f"Jupyter kernel {KERNEL!r} missing: run `.venv/bin/python -m ipykernel install "
                    f"--sys-prefix --name {KERNEL}` (make does it)")
    saved = {k: os.environ.get(k) for k in ("PYTHONPATH", "OMP_NUM_THREADS")}
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), saved["PYTHONPATH"]]))
    os.environ["OMP_NUM_THREADS"] = "1"
    yield
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def _execute(name, out, **params):
    """papermill through dmlnb.execute.run_notebook: per-cell and overall timeouts, and each kernel
    on IPC sockets of its own (kernels started at the same moment, here or by another test run on
    the machine, cannot race for TCP ports)."""
    from dmlnb.execute import run_notebook

    return run_notebook(NOTEBOOKS / FILES[name], out, params, kernel_name=KERNEL, cwd=NOTEBOOKS,
                        cell_timeout=CELL_TIMEOUT, notebook_timeout=NOTEBOOK_TIMEOUT)


def _figure(folder: Path, name: str) -> dict:
    html = folder / f"{name}.html"
    assert html.is_file() and html.stat().st_size > 100_000, f"{name}.html missing or not self-contained"
    return json.loads((folder / f"{name}.plotly.json").read_text())


@pytest.fixture(scope="module")
def train_run(kernel_env, tmp_path_factory):
    """02_train executed once with tiny parameters; its run and figures serve several tests."""
    tmp = tmp_path_factory.mktemp("train_nb")
    run_dir, figs = tmp / "run", tmp / "figs"
    _execute("train", tmp / "out.ipynb", run_dir=str(run_dir), figures_dir=str(figs),
             gallery_queries=3, gallery_k=4, **TINY_TRAIN)
    return run_dir, figs, tmp / "out.ipynb"


@pytest.mark.slow
def test_train_notebook_writes_run_and_figures(train_run):
    run_dir, figs, executed = train_run
    summary = json.loads((run_dir / "summary.json").read_text())
    test = summary["test"]
    for key in ("recall@1", "map@r", "r_precision", "nmi"):
        assert 0.0 <= test[key] <= 1.0, (key, test[key])
    assert test["recall@1"] >= test["map@r"]  # MAP@R never exceeds precision at 1
    steps = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in steps if r.get("kind") == "step"]
    assert len(losses) == TINY_TRAIN["steps_per_epoch"] and all(math.isfinite(v) for v in losses)
    with np.load(run_dir / "embeddings.npz") as z:
        assert z["embeddings"].shape == (31 * TINY_DATA["max_per_class"], 128)
    for name in ("train_curves", "test_metrics", "retrieval_gallery"):
        _figure(figs, name)
    curves = _figure(figs, "train_curves")
    assert {t["name"] for t in curves["data"]} >= {"loss", "loss_metric"}
    assert json.loads((figs / "index.json").read_text())[:1] == ["train_curves"]
    # the table in the notebook shows the run's own numbers
    table = _figure(figs, "test_metrics")["data"][0]["cells"]["values"]
    assert f"{test['map@r']:.3f}" in table[1]
    book = nbformat.read(executed, as_version=4)
    assert not any(o.get("output_type") == "error" for c in book.cells for o in c.get("outputs", []))


@pytest.mark.slow
def test_figures_driver_runs_views_notebook(kernel_env, tmp_path):
    """`dmlnb figures` on the views notebook: executed notebook kept, figure as HTML (+ PNG)."""
    from dmlnb import figures
    from dmlnb.viz import chromium_path

    try:
        import playwright  # noqa: F401

        png = Path(chromium_path()).exists()
    except ImportError:
        png = False
    report = figures.make_figures(tmp_path, ["views"], quick=True, png=png, progress=False)
    assert report["figures"] == ["views_gallery"]
    gallery = _figure(tmp_path, "views_gallery")
    assert gallery["data"][0]["type"] == "image"
    if png:
        from PIL import Image

        assert Image.open(tmp_path / "views_gallery.png").size[0] > 400
    assert json.loads((tmp_path / "figures.json").read_text())["figures"] == ["views_gallery"]
    book = nbformat.read(tmp_path / "notebooks" / FILES["views"], as_version=4)
    widget_outputs = [o for c in book.cells for o in c.get("outputs", [])
                      if "application/vnd.jupyter.widget-view+json" in o.get("data", {})]
    assert widget_outputs, "the explorer widget was not displayed"
    text = "".join(o.get("text", "") for c in book.cells for o in c.get("outputs", []))
    assert "model: the shipped SSR run" in text  # no run given, quick training off: the shipped run


def test_figures_cli_parser():
    import argparse

    from dmlnb import figures

    parser = argparse.ArgumentParser(prog="dmlnb")
    figures.add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["figures", "--out", "o", "--only", "views", "train", "--no-png"])
    assert (args.out, args.only, args.no_png, args.quick) == ("o", ["views", "train"], True, False)
    assert callable(args.func)
    with pytest.raises(ValueError, match="notebooks='nope'"):
        figures.make_figures("x", ["nope"])


@pytest.mark.slow
def test_intraclass_notebook_with_given_runs(kernel_env, train_run, tmp_path):
    from dmlnb.train import fit

    ssr_dir = train_run[0]
    base_dir = tmp_path / "baseline"
    fit(dict(TINY_TRAIN, ssr=False, run_dir=str(base_dir)))
    figs = tmp_path / "figs"
    _execute("intraclass", tmp_path / "out.ipynb", baseline_run=str(base_dir), ssr_run=str(ssr_dir),
             projection="pca", max_points=120, n_trajectories=2, levels=3, focus_class="a",
             figures_dir=str(figs))
    classes = _figure(figs, "umap_classes")
    uris = [row[0] for t in classes["data"] for row in (t.get("customdata") or [])]
    assert uris and all(u.startswith("data:image/png;base64,") for u in uris)  # hover images
    assert "dmlnb-hover-image" in (figs / "umap_classes.html").read_text()
    focus = _figure(figs, "umap_focus_class")
    assert len(focus["data"]) >= 2  # one trace per category, per panel
    attr = _figure(figs, "attribute_retrieval")["data"][0]["cells"]["values"]
    assert attr[0] == ["family", "weight", "italic", "category"]
    traj = _figure(figs, "trajectories")
    assert sum(t.get("mode") == "lines+markers" for t in traj["data"]) == 2 * 2
    # the last cell's slider keeps its figure in the widget state (set from the kernel, no capture)
    book = nbformat.read(tmp_path / "out.ipynb", as_version=4)
    state = book.metadata["widgets"]["application/vnd.jupyter.widget-state+json"]["state"]
    shown = [o for m in state.values() if m["model_name"] == "OutputModel"
             for o in m["state"].get("outputs", [])]
    assert any("application/vnd.plotly.v1+json" in o.get("data", {}) for o in shown)


@pytest.mark.slow
def test_ablations_notebook_runs_a_grid(kernel_env, tmp_path):
    figs = tmp_path / "figs"
    grid = {**TINY_TRAIN, "ssr": [False, True], "seed": 0, "gallery_queries": 2, "gallery_k": 2}
    _execute("ablations", tmp_path / "out.ipynb", grid=grid, sweep_dir=str(tmp_path / "sweep"),
             jobs=2, figures_dir=str(figs))
    table = (tmp_path / "sweep" / "results.csv").read_text()
    assert table.count("\n") == 1 + 2 and ",ok," in table
    for point in (tmp_path / "sweep").iterdir():
        if point.is_dir():
            assert (point / "notebook.ipynb").is_file() and (point / "run" / "summary.json").is_file()
    shown = _figure(figs, "ablation_table")["data"][0]["cells"]["values"]
    assert shown[0] == ["ssr=False", "ssr=True"]
    _figure(figs, "ablation_map_at_r")


# --- bad parameters stop the second cell with the clear message ----------------------------------
@pytest.mark.slow
def test_unknown_parameter_fails_with_message(kernel_env, tmp_path):
    import papermill as pm

    with pytest.raises(pm.PapermillExecutionError) as err:
        _execute("views", tmp_path / "bad.ipynb", n_imagez=2)
    assert 'nb.parameters("views", globals())' in err.value.source  # the validation cell
    assert err.value.exec_count == 3  # parameters, papermill's injected cell, validation: no work
    assert "unknown parameters of the views notebook: 'n_imagez'" in err.value.evalue
    assert "n_images" in err.value.evalue  # the valid ones are listed


@pytest.mark.slow
def test_invalid_config_value_fails_with_message(kernel_env, tmp_path):
    import papermill as pm

    with pytest.raises(pm.PapermillExecutionError) as err:
        _execute("train", tmp_path / "bad.ipynb", loss="hinge", ssr_prob=1.5)
    assert "nb.train_parameters(globals())" in err.value.source and err.value.exec_count == 3
    assert "loss='hinge' is not valid; choose one of" in err.value.evalue
    assert "'margin'" in err.value.evalue and "ssr_prob" in err.value.evalue
