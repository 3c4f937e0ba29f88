"""``dmlnb figures --out DIR`` (``make figures``): re-execute the notebooks and export their figures.

Each notebook runs headless under papermill on the embedded glyph data, with ``figures_dir`` set to
``DIR``; every figure it saves (:func:`dmlnb.notebook.save_figure`) lands there as a
self-contained interactive HTML file (plotly.js embedded, hover images included) and as plotly
JSON, which this driver then turns into PNG in one headless-browser session
(:func:`dmlnb.viz.write_pngs`). The executed notebooks are kept in ``DIR/notebooks``, each also as
one static HTML page next to it (``DIR/notebooks/<notebook>.html``, :func:`export_html`: readable
without Jupyter, its figures shown as the PNGs the headless kernel stored with them, see
:func:`dmlnb.viz.figure_bundle`), and the runs they trained in ``DIR/runs``; ``DIR/figures.json``
lists what was written.

With the training notebook, two runs are trained with the same settings: ``runs/train-ssr``
(its figures are the README's) and ``runs/train-baseline`` (SSR off; figures in ``DIR/baseline``);
the views notebook then reads out the SSR run and the intra-class notebook compares the pair.

Figures (README names): ``views_gallery``; ``train_curves``, ``val_curves``, ``test_metrics``,
``retrieval_gallery``; ``umap_classes``, ``umap_focus_class``, ``attribute_retrieval``,
``trajectories``; ``ablation_table`` and ``ablation_<metric>`` (with the ablations notebook).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from dmlnb._validate import check_choice
from dmlnb.execute import add_timeout_flags, run_notebook

__all__ = ["NOTEBOOKS", "add_parser", "export_html", "export_pngs", "make_figures", "notebooks_dir"]

#: name -> notebook file, in the order they run (the training notebook first: 01 reads its run).
NOTEBOOKS: dict[str, str] = {
    "train": "02_train.ipynb",
    "views": "01_views.ipynb",
    "intraclass": "04_intraclass_umap.ipynb",
    "ablations": "03_ablations.ipynb",
}
DEFAULT_KERNEL = "python3"


def notebooks_dir() -> Path:
    """The repository's ``notebooks/`` folder (next to the ``dmlnb`` package), or
    ``$DMLNB_NOTEBOOKS`` when set."""
    env = os.environ.get("DMLNB_NOTEBOOKS")
    return Path(env) if env else Path(__file__).resolve().parent.parent / "notebooks"


def _parameters(name: str, out: Path, quick: bool) -> dict[str, Any]:
    """Each notebook's parameters for the figures; ``quick`` shrinks them for a smoke run."""
    runs = out / "runs"
    small = {"max_per_class": 20} if quick else {}
    if name == "train":
        p: dict[str, Any] = {"run_dir": str(runs / "train-ssr"), "quiet": True}
        if quick:
            p.update(epochs=1, steps_per_epoch=3, batch_size=32, ssr_images=4,
                     dataset_options=small, gallery_queries=3, gallery_k=4)
        return p
    if name == "views":
        trained = runs / "train-ssr"  # the training notebook's run, when it ran first
        p = {"run_dir": str(trained)} if (trained / "summary.json").is_file() else {}
        if quick:
            p.update(n_images=1)
        return p
    if name == "intraclass":
        p = {"runs_root": str(runs)}
        base, ssr = runs / "train-baseline", runs / "train-ssr"  # the training notebook's pair
        if (base / "summary.json").is_file() and (ssr / "summary.json").is_file():
            p.update(baseline_run=str(base), ssr_run=str(ssr))
        if quick:
            p.update(train_steps=3, projection="pca", max_points=200, n_trajectories=2, levels=3)
        return p
    p = {"sweep_dir": str(runs / "sweeps" / "ablations"),
         "train_notebook": str(notebooks_dir() / NOTEBOOKS["train"])}
    if quick:
        p.update(seeds=1, steps=2, jobs=2)
    return p


def export_pngs(folder: str | os.PathLike, names: Sequence[str] | None = None,
                scale: float = 2.0) -> list[Path]:
    """Write ``<name>.png`` next to every ``<name>.plotly.json`` in ``folder`` (or only ``names``),
    in one browser session. Returns the PNG paths."""
    import plotly.io as pio

    from dmlnb.viz import write_pngs

    folder = Path(folder)
    if names is None:
        names = sorted(p.name[: -len(".plotly.json")] for p in folder.glob("*.plotly.json"))
    items = [(pio.read_json(folder / f"{n}.plotly.json"), folder / f"{n}.png") for n in names]
    return write_pngs(items, scale=scale) if items else []


def export_html(notebook: str | os.PathLike, target: str | os.PathLike | None = None) -> Path:
    """Write the executed ``notebook`` as one self-contained static HTML page (nbconvert's HTML
    exporter; default ``target``: next to it, ``.html``). Figures show as the ``image/png`` stored
    with them (static renderers do not draw plotly's JupyterLab mimetype), progress bars as their
    final lines. Returns the path."""
    import nbformat
    from nbconvert import HTMLExporter

    notebook = Path(notebook)
    target = notebook.with_suffix(".html") if target is None else Path(target)
    body, _ = HTMLExporter().from_notebook_node(nbformat.read(notebook, as_version=4))
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(body, encoding="utf-8")
    return target


def make_figures(
    out: str | os.PathLike = "figures",
    notebooks: Sequence[str] = ("train", "views", "intraclass", "ablations"),
    *,
    quick: bool = False,
    png: bool = True,
    html: bool = True,
    kernel_name: str = DEFAULT_KERNEL,
    overrides: Mapping[str, Mapping[str, Any]] | None = None,
    cell_timeout: float | None = None,
    notebook_timeout: float | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Execute ``notebooks`` (names of :data:`NOTEBOOKS`) with papermill and export the figures.

    Parameters
    ----------
    out : path
        Where the figures go (``.html``, ``.plotly.json``, ``.png``), with ``notebooks/`` (the
        executed notebooks) and ``runs/`` (the runs they trained).
    notebooks : sequence of str
        Which notebooks, in order; default all four.
    quick : bool
        Tiny settings (seconds of training, PCA maps): a smoke test of the pipeline, not figures
        to publish.
    png : bool
        Also write PNGs (needs kaleido or Playwright with a Chromium, see :func:`dmlnb.viz.write_pngs`).
    html : bool
        Also write each executed notebook as static HTML next to it (:func:`export_html`).
    overrides : {notebook: {parameter: value}}, optional
        Extra papermill parameters per notebook.
    cell_timeout, notebook_timeout : float, optional
        Seconds one cell, and one notebook, may run before its kernel is stopped and
        :class:`dmlnb.execute.NotebookTimeoutError` raised; default: each notebook's own
        (:data:`dmlnb.execute.DEFAULT_TIMEOUTS`).

    Returns
    -------
    dict
        ``{"figures": [names], "seconds": {notebook: s}, "notebooks": {notebook: path},
        "html": {notebook: path}}``, also
        written to ``OUT/figures.json``. A notebook that fails raises (papermill's error, naming
        the cell; or the timeout's); the executed notebook is kept for inspection.
    """
    for name in notebooks:
        check_choice("notebooks", name, list(NOTEBOOKS))
    out = Path(out).resolve()
    (out / "notebooks").mkdir(parents=True, exist_ok=True)
    src = notebooks_dir()
    seconds: dict[str, float] = {}
    executed: dict[str, str] = {}
    pages: dict[str, str] = {}
    jobs: list[tuple[str, str, dict[str, Any], Path]] = []
    for name in notebooks:
        if name == "train":  # the baseline of the pair (same settings, ssr off; its figures aside)
            base = _parameters(name, out, quick)
            base.update((overrides or {}).get(name, {}))
            base.update(ssr=False, run_dir=str(out / "runs" / "train-baseline"),
                        figures_dir=str(out / "baseline"))
            jobs.append(("train-baseline", NOTEBOOKS[name], base,
                         out / "notebooks" / "02_train_baseline.ipynb"))
        jobs.append((name, NOTEBOOKS[name], {}, out / "notebooks" / NOTEBOOKS[name]))
    for name, file, preset, target in jobs:
        if preset:
            params = preset
        else:
            params = _parameters(name, out, quick)  # after the runs before it exist
            params.update((overrides or {}).get(name, {}))
            params["figures_dir"] = str(out)
        if "run_dir" in params and name.startswith("train") and Path(params["run_dir"]).exists():
            params["resume"] = True  # a finished run is reused (fit refuses to overwrite a run)
        if progress:
            print(f"figures: executing {file} ({name}) ...", flush=True)
        start = time.perf_counter()
        run_notebook(src / file, target, params, kernel_name=kernel_name, cwd=src,
                     cell_timeout=cell_timeout, notebook_timeout=notebook_timeout)
        seconds[name] = round(time.perf_counter() - start, 1)
        executed[name] = str(target)
        if html:
            pages[name] = str(export_html(target))
        if progress:
            print(f"figures: {file} ({name}) done in {seconds[name]:.0f} s", flush=True)
    index = out / "index.json"
    names = json.loads(index.read_text()) if index.exists() else []
    if png and names:
        start = time.perf_counter()
        export_pngs(out, names)
        seconds["png"] = round(time.perf_counter() - start, 1)
    report = {"figures": names, "seconds": seconds, "notebooks": executed, "html": pages}
    (out / "figures.json").write_text(json.dumps(report, indent=2))
    if progress:
        print(f"figures: {len(names)} figures in {out} ({sum(seconds.values()):.0f} s)", flush=True)
    return report


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``dmlnb figures --out DIR``; sets ``func``."""
    p = subparsers.add_parser(
        "figures",
        help="re-execute the notebooks on glyphs and write the README figures (PNG + HTML)",
        description=__doc__.split("\n\n")[1],
    )
    p.add_argument("--out", default="figures", help="output folder (default: figures)")
    p.add_argument("--only", nargs="+", choices=list(NOTEBOOKS), default=None,
                   help="run only these notebooks (default: all, in the order "
                        + ", ".join(NOTEBOOKS) + ")")
    p.add_argument("--skip-ablations", action="store_true",
                   help="leave out the ablation grid (the slowest part)")
    p.add_argument("--quick", action="store_true", help="tiny settings: a smoke test of the pipeline")
    p.add_argument("--no-png", action="store_true", help="HTML (and plotly JSON) only")
    p.add_argument("--no-html", action="store_true",
                   help="no static HTML page of each executed notebook (notebooks/<name>.html)")
    p.add_argument("--kernel", default=DEFAULT_KERNEL, help=f"Jupyter kernel (default {DEFAULT_KERNEL})")
    add_timeout_flags(p)
    p.set_defaults(func=_main)
    return p


def _main(args: argparse.Namespace) -> int:
    names = list(args.only or NOTEBOOKS)
    if args.skip_ablations and "ablations" in names:
        names.remove("ablations")
    make_figures(args.out, names, quick=args.quick, png=not args.no_png, html=not args.no_html,
                 kernel_name=args.kernel, cell_timeout=args.cell_timeout,
                 notebook_timeout=args.notebook_timeout)
    return 0

