"""A real browser for the training, ablations and intra-class notebooks (``test_browser.py`` does
the views notebook): JupyterLab on 127.0.0.1 (:mod:`lab_server`, in tests/), Chromium driven by
Playwright, a copy of the notebook with tiny parameters run top to bottom with Run > Run All Cells.

Each test then asserts, in the page:

- every code cell ran (the last one has an execution count) and none shows an error: no error
  output, no stderr output whose text is a warning or an error, no rendered text with
  ``Traceback`` or ``Error`` (stderr text that is neither is printed, not failed);
- every cell that makes a plotly figure shows it rendered (``.js-plotly-plot`` with its SVG);
- where the notebook has an interactive widget (04: the strength slider of the trajectories),
  moving it redraws the picture.

A full-page screenshot per notebook is saved in the test's temp dir, with ``cells.json`` (what
each cell showed), both also copied to ``$DMLNB_KEEP_SCREENSHOT_DIR`` when it is set. Skipped,
with the reason, when Playwright, Chromium or JupyterLab is missing.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from pathlib import Path

import pytest
from lab_server import KERNEL_IDLE_JS, jupyterlab, skip_unless_browser, write_notebook

pytestmark = [pytest.mark.browser, pytest.mark.slow]

RUN_TIMEOUT_S = 600  # kernel start + the tiny run on 2 busy cores; the runs take 1-2 min idle
PLOT_TIMEOUT_MS = 60_000  # plotly renders asynchronously after the cell has finished
TINY_DATA = {"max_per_class": 8}  # 8 typefaces per character: 31 x 8 test images
TINY_TRAIN = dict(epochs=1, steps_per_epoch=2, batch_size=32, ssr_images=4,
                  dataset_options=TINY_DATA)
STDERR = '.jp-OutputArea-output[data-mime-type="application/vnd.jupyter.stderr"]'
BAD_STDERR = re.compile(r"warn|error|exception|traceback|deprecat", re.IGNORECASE)
BAD_TEXT = re.compile(r"Traceback|Error")

# per code cell: its source, outputs (model) and what the page shows (DOM)
CELLS_JS = """() => {
  const panel = window.jupyterapp.shell.currentWidget;
  const out = [];
  panel.content.widgets.forEach((cell, i) => {
    const m = cell.model;
    if (m.type !== 'code') return;
    const outputs = [];
    for (let j = 0; j < m.outputs.length; j++) {
      const o = m.outputs.get(j).toJSON();
      const text = o.text === undefined ? null : (Array.isArray(o.text) ? o.text.join('') : o.text);
      outputs.push({type: o.output_type, name: o.name || null, text: text,
                    ename: o.ename || null, evalue: o.evalue || null,
                    mimes: Object.keys(o.data || {})});
    }
    const node = cell.node;
    out.push({
      index: i, count: m.executionCount, state: m.executionState || null,
      source: m.sharedModel.getSource(), outputs: outputs,
      stderr: [...node.querySelectorAll('STDERR_SELECTOR')].map(e => e.textContent),
      texts: [...node.querySelectorAll('.jp-RenderedText')].map(e => e.textContent),
      output_text: [...node.querySelectorAll('.jp-OutputArea')].map(e => e.textContent).join('\\n'),
      plots: [...node.querySelectorAll('.js-plotly-plot')].map(e => ({
        traces: (e.data || []).length, svg: !!e.querySelector('.main-svg'),
        drawn: (e.data || []).length + ['shapes', 'annotations', 'images'].reduce(
          (n, k) => n + ((e.layout && e.layout[k]) || []).length, 0)})),
      widgets: node.querySelectorAll('.jupyter-widgets').length,
    });
  });
  return out;
}""".replace("STDERR_SELECTOR", STDERR)

BUSY_JS = """() => {
  const panel = window.jupyterapp.shell.currentWidget;
  const k = panel.sessionContext.session && panel.sessionContext.session.kernel;
  const cells = panel.content.widgets.filter(c => c.model.type === 'code');
  const last = cells[cells.length - 1].model;
  return {idle: !!k && k.status === 'idle',
          running: cells.filter(c => c.model.executionState === 'running').length,
          last: last.executionCount,
          errors: cells.filter(c => { const o = c.model.outputs;
            for (let j = 0; j < o.length; j++) if (o.get(j).type === 'error') return true;
            return false; }).length};
}"""


def _open_and_run_all(page, lab, name):
    """Open ``name``, wait for its kernel, Run All Cells, wait until the run is over: the kernel
    idle, no cell queued, and the last cell executed (or a cell failed, which stops Run All)."""
    page.goto(f"{lab['url']}/lab/tree/{name}?token={lab['token']}")
    page.wait_for_selector(".jp-NotebookPanel", timeout=60_000)
    page.wait_for_function("window.jupyterapp && window.jupyterapp.commands", timeout=60_000)
    page.wait_for_function(KERNEL_IDLE_JS, timeout=120_000)
    page.wait_for_timeout(1000)
    start = time.perf_counter()
    page.evaluate("window.jupyterapp.commands.execute('notebook:run-all-cells')")
    page.wait_for_timeout(2000)
    settled = 0
    while True:
        s = page.evaluate(BUSY_JS)
        done = s["idle"] and not s["running"] and (s["last"] is not None or s["errors"])
        settled = settled + 1 if done else 0
        if settled >= 2:  # idle on two polls in a row: not between two cells
            return time.perf_counter() - start
        if time.perf_counter() - start > RUN_TIMEOUT_S:
            raise TimeoutError(f"{name}: Run All did not finish in {RUN_TIMEOUT_S} s ({s})")
        page.wait_for_timeout(2000)


def _cells(page):
    return page.evaluate(CELLS_JS)


def _first_line(cell):
    return next((line for line in cell["source"].splitlines() if line.strip()), "")


def _problems(cells, name):
    """What the page shows that is an error or a warning, one line each (cell index, first line,
    the text verbatim); prints stderr text that is neither."""
    problems = []
    for c in cells:
        where = f"{name} cell {c['index']} ({_first_line(c)!r})"
        if c["count"] is None:
            problems.append(f"{where}: not executed")
        for o in c["outputs"]:
            if o["type"] == "error":
                problems.append(f"{where}: error output {o['ename']}: {o['evalue']}")
        for text in c["stderr"]:
            if BAD_STDERR.search(text):
                problems.append(f"{where}: stderr: {text.strip()}")
            else:
                print(f"{where}: stderr (not a warning): {text.strip()}")
        for text in c["texts"]:
            if BAD_TEXT.search(text) and text not in c["stderr"]:
                problems.append(f"{where}: text: {text.strip()}")
    return problems


def _cell_with(cells, snippet):
    found = [c for c in cells if snippet in c["source"]]
    assert len(found) == 1, f"expected one code cell with {snippet!r}, found {len(found)}"
    return found[0]


def _wait_for_plots(page, cells, expected):
    """Wait until each cell of ``expected`` (snippet -> number of figures) shows that many rendered
    plotly figures (an SVG with traces, or shapes/annotations/images: the architecture diagram
    has no trace); returns the cells as then shown."""
    deadline = time.perf_counter() + PLOT_TIMEOUT_MS / 1000
    while True:
        cells = _cells(page)
        missing = {s: n for s, n in expected.items()
                   if sum(p["svg"] and p["drawn"] > 0 for p in _cell_with(cells, s)["plots"]) < n}
        if not missing or time.perf_counter() > deadline:
            break
        page.wait_for_timeout(1000)
    for snippet, n in expected.items():
        plots = _cell_with(cells, snippet)["plots"]
        ok = [p for p in plots if p["svg"] and p["drawn"] > 0]
        assert len(ok) >= n, f"cell with {snippet!r}: {len(ok)} rendered figures of {n} ({plots})"
    return cells


def _browse(lab, name, expected_plots, interact=None):
    """Run ``name`` in Chromium; assert it ran clean and shows ``expected_plots``; then
    ``interact(page)`` (the widget check, it asserts itself); screenshot and ``cells.json`` in the
    temp dir. Returns ``(cells, seconds the run took)``."""
    from playwright.sync_api import sync_playwright

    from dmlnb.viz import CHROMIUM_ARGS, chromium_path

    shot = lab["tmp"] / (Path(name).stem + ".png")
    js_errors = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium_path(), args=list(CHROMIUM_ARGS))
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.on("pageerror", lambda err: js_errors.append(str(err)))
            try:
                seconds = _open_and_run_all(page, lab, name)
                cells = _cells(page)
                (lab["tmp"] / "cells.json").write_text(json.dumps(cells, indent=1))
                problems = _problems(cells, name)
                assert not problems, "the notebook shows errors or warnings:\n" + "\n".join(problems)
                cells = _wait_for_plots(page, cells, expected_plots)
                if interact is not None:
                    interact(page)
                    cells = _cells(page)  # what the widget's callback showed, if anything
                    problems = _problems(cells, name)
                    assert not problems, "after moving the widget:\n" + "\n".join(problems)
            finally:
                page.screenshot(path=str(shot), full_page=True)
        finally:
            browser.close()
    (lab["tmp"] / "cells.json").write_text(json.dumps(cells, indent=1))
    print(f"{name}: Run All took {seconds:.0f} s; JS errors in the page: {js_errors or 'none'}")
    assert shot.is_file() and shot.stat().st_size > 10_000
    keep = os.environ.get("DMLNB_KEEP_SCREENSHOT_DIR")
    if keep:
        Path(keep).mkdir(parents=True, exist_ok=True)
        shutil.copy(shot, Path(keep) / shot.name)
        shutil.copy(lab["tmp"] / "cells.json", Path(keep) / (Path(name).stem + ".cells.json"))
    return cells, seconds


def test_train_notebook_in_browser(tmp_path):
    """02_train: one epoch of 2 steps on 8 typefaces per character. It has no interactive widget
    (its only widget is the training progress bar), so its figures are asserted instead: the
    architecture, the loss curves, the validation curves, SSR's diagnostics, the test metric
    table and the retrieval gallery, each rendered."""
    skip_unless_browser()
    served = tmp_path / "lab"
    run_dir = tmp_path / "run"
    write_notebook("02_train.ipynb", served, **TINY_TRAIN, run_dir=str(run_dir),
                   runs_root=str(tmp_path / "runs"), gallery_queries=3, gallery_k=4)
    with jupyterlab(tmp_path, served) as lab:
        cells, _ = _browse(lab, "02_train.ipynb", {
            "architecture_figure()": 1,
            "loss_fig = viz.curves": 1,
            'val = run.metrics("val")': 1,  # the tiny run has a validation split (val_split="val")
            "diag_steps = viz.curves": 2,  # per step and per evaluation (ssr=True)
            "table_fig = viz.metric_table": 1,
            "gallery = viz.retrieval_gallery": 1,
        })
    assert (run_dir / "summary.json").is_file()
    assert "run directory:" in _cell_with(cells, "result = fit(config)")["output_text"]


def test_ablations_notebook_in_browser(tmp_path):
    """03_ablations: a grid of 2 tiny points (ssr off / on, one seed) executed by the sweep with
    papermill, 2 at a time (the notebook's default jobs). It has no interactive widget, so its
    figures are asserted instead: the table of mean ± std and one bar chart per metric."""
    skip_unless_browser()
    served = tmp_path / "lab"
    write_notebook("02_train.ipynb", served)  # what the sweep executes, parameters injected
    grid = {**TINY_TRAIN, "quiet": True, "ssr": [False, True], "seed": 0,
            "gallery_queries": 2, "gallery_k": 2}
    write_notebook("03_ablations.ipynb", served, grid=grid, sweep_dir=str(tmp_path / "sweep"))
    with jupyterlab(tmp_path, served) as lab:
        cells, _ = _browse(lab, "03_ablations.ipynb", {
            "table_fig = viz.metric_table": 1,
            "charts = []": 3,  # map@r, recall@1, r_precision
        })
    grid_cell = _cell_with(cells, "sweep.expand_grid")["output_text"]
    assert "2 points" in grid_cell
    ran = _cell_with(cells, "sweep.run_sweep")["output_text"]
    assert ran.count(": ok in ") == 2 and "failed" not in ran, ran
    assert (tmp_path / "sweep" / "results.csv").read_text().count(",ok,") == 2


def test_intraclass_notebook_slider_moves_trajectories(tmp_path):
    """04_intraclass_umap on two tiny runs made here (baseline and SSR, :func:`dmlnb.train.fit`,
    the notebook's ``baseline_run``/``ssr_run``), PCA maps of 120 points, 2 trajectories of 3
    levels. The four figures must render, and moving the strength slider of the trajectory
    figure (a ``SelectionSlider`` that redraws a plotly figure in an ``Output`` widget) one
    step down must redraw it with other data."""
    skip_unless_browser()
    from dmlnb.train import fit

    runs = {}
    for kind, ssr in (("baseline", False), ("ssr", True)):
        runs[kind] = tmp_path / kind
        fit(dict(TINY_TRAIN, ssr=ssr, quiet=True, run_dir=str(runs[kind])))
    served = tmp_path / "lab"
    write_notebook("04_intraclass_umap.ipynb", served, baseline_run=str(runs["baseline"]),
                   ssr_run=str(runs["ssr"]), runs_root=str(tmp_path / "runs"), projection="pca",
                   max_points=120, n_trajectories=2, levels=3, focus_class="a")
    slider_cell = "widgets.figure_slider("
    moved = {}

    def move_slider(page):
        cell_js = ("[...window.jupyterapp.shell.currentWidget.content.widgets]"
                   f".find(c => c.model.sharedModel.getSource().includes({json.dumps(slider_cell)}))")
        state_js = f"""() => {{
          const node = {cell_js}.node;
          const plot = node.querySelector('.js-plotly-plot');
          const readout = node.querySelector('.widget-readout');
          return {{readout: readout ? readout.textContent.trim() : null,
                   data: plot && plot.data ? JSON.stringify(plot.data.map(t => [t.x, t.y])) : null}};
        }}"""
        page.evaluate(f"() => {cell_js}.node.scrollIntoView()")
        before = page.evaluate(state_js)
        assert before["data"] and before["readout"], f"no slider or figure in the last cell: {before}"
        handle = page.locator(".jp-Notebook .widget-slider .noUi-handle").last
        handle.scroll_into_view_if_needed()
        handle.click()
        page.keyboard.press("ArrowLeft")  # one step down: the paths drawn up to a lower strength
        page.wait_for_function(
            f"() => {{ const s = ({state_js})(); return s.data && s.readout !== "
            f"{json.dumps(before['readout'])} && s.data !== {json.dumps(before['data'])}; }}",
            timeout=60_000)
        page.wait_for_timeout(500)
        moved.update(before=before, after=page.evaluate(state_js))

    with jupyterlab(tmp_path, served) as lab:
        _browse(lab, "04_intraclass_umap.ipynb", {
            "classes_fig = viz.side_by_side": 1,
            "focus_fig = viz.side_by_side": 1,
            "attr_fig = viz.metric_table": 1,
            slider_cell: 1,
        }, interact=move_slider)
    assert moved["after"]["data"] != moved["before"]["data"]
    assert float(moved["after"]["readout"]) < float(moved["before"]["readout"])
