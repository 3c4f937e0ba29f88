"""Executed notebooks read without Jupyter: plotly figures stored with a PNG fallback, progress bars
stored on their final line, and the static HTML page of an executed notebook showing the PNGs.

One tiny notebook runs once in a real kernel (dmlnb.execute.run_notebook, as `make figures` and
the sweeps run theirs); the tests read what it stored."""

from __future__ import annotations

import base64
import os
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parent.parent
KERNEL = "python3"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

CELLS = {
    "setup": "import plotly.graph_objects as go\n"
             "from dmlnb import notebook as nb, viz\n"
             "nb.setup()\n"
             "fig = go.Figure(go.Scatter(x=[0, 1, 2], y=[1, 3, 2]))\n"
             "fig.update_layout(title='tiny', width=320, height=240)\n"
             "print('ready')",
    "fig_show": "fig.show()",
    "viz_show": "viz.show(fig)",
    "value": "fig",
    "bar": "from dmlnb.progress import progress_bar\n"
           "for _ in progress_bar(range(7), desc='loop'):\n"
           "    pass",
    "bar_manual": "bar = progress_bar(total=3, desc='manual', dynamic_ncols=True)\n"
                  "for _ in range(3):\n"
                  "    bar.update(1)\n"
                  "    bar.set_postfix(loss=0.5)\n"
                  "bar.close()",
    "bar_hidden": "for _ in progress_bar(range(4), desc='hidden', leave=False):\n"
                  "    pass",
}


@pytest.fixture(scope="module")
def executed(tmp_path_factory):
    """The tiny notebook, executed headless: ``(path, {cell name: outputs})``."""
    from jupyter_client.kernelspec import find_kernel_specs

    from dmlnb.execute import run_notebook

    if KERNEL not in find_kernel_specs():
        pytest.fail(f"Jupyter kernel {KERNEL!r} missing: run `.venv/bin/python -m ipykernel install "
                    f"--sys-prefix --name {KERNEL}` (make does it)")
    tmp = tmp_path_factory.mktemp("static")
    book = nbformat.v4.new_notebook()
    book.cells = [nbformat.v4.new_code_cell(src, metadata={"name": name}) for name, src in CELLS.items()]
    book.metadata["kernelspec"] = {"name": KERNEL, "display_name": "Python 3", "language": "python"}
    source, out = tmp / "tiny.ipynb", tmp / "tiny_out.ipynb"
    nbformat.write(book, source)
    saved = {k: os.environ.get(k) for k in ("PYTHONPATH", "OMP_NUM_THREADS", "DMLNB_STATIC_FIGURES")}
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), saved["PYTHONPATH"]]))
    os.environ["OMP_NUM_THREADS"] = "1"
    os.environ.pop("DMLNB_STATIC_FIGURES", None)  # run_notebook's own default: static figures on
    try:
        run_notebook(source, out, kernel_name=KERNEL, cwd=tmp, cell_timeout=120, notebook_timeout=300)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    done = nbformat.read(out, as_version=4)
    return out, {c.metadata["name"]: c.outputs for c in done.cells}


def _bundles(outputs):
    return [o["data"] for o in outputs if o.get("output_type") in ("display_data", "execute_result")]


def _no_png_route(cells) -> bool:
    """Whether the kernel found no PNG route (it warns once, in the first figure's cell)."""
    text = "".join(o.get("text", "") for outputs in cells.values() for o in outputs
                   if o.get("output_type") == "stream")
    return "without their PNG fallback" in text


@pytest.mark.slow
@pytest.mark.parametrize("cell", ["fig_show", "viz_show", "value"])
def test_figure_stores_interactive_and_png(executed, cell):
    _, cells = executed
    if _no_png_route(cells):
        pytest.skip("no PNG route on this machine (kaleido, or Playwright with a Chromium)")
    (bundle,) = _bundles(cells[cell])
    assert "application/vnd.plotly.v1+json" in bundle  # JupyterLab draws this one
    png = base64.b64decode(bundle["image/png"])  # static renderers this one
    assert png.startswith(PNG_MAGIC) and len(png) > 1000
    assert bundle["text/plain"] == "plotly figure: tiny"
    assert "text/html" not in bundle  # else nbconvert, nbviewer, GitHub would pick it over the PNG


@pytest.mark.slow
def test_progress_bar_stores_final_line(executed):
    _, cells = executed
    for cell, desc, total in (("bar", "loop", 7), ("bar_manual", "manual", 3)):
        (bundle,) = _bundles(cells[cell])  # the widget's output, replaced when the bar closed
        assert list(bundle) == ["text/plain"]  # what every renderer shows, widgets or not
        line = bundle["text/plain"]
        assert line.startswith(f"{desc}: 100%") and f"{total}/{total}" in line, line
    assert "loss=0.5" in _bundles(cells["bar_manual"])[0]["text/plain"]
    # leave=False: tqdm hides the bar; the stored output is empty rather than a stale 0 % line
    assert [b.get("text/plain") for b in _bundles(cells["bar_hidden"])] == [""]


@pytest.mark.slow
def test_static_html_shows_the_png(executed, tmp_path):
    from dmlnb.figures import export_html

    path, cells = executed
    if _no_png_route(cells):
        pytest.skip("no PNG route on this machine (kaleido, or Playwright with a Chromium)")
    page = export_html(path, tmp_path / "page.html")
    html = page.read_text(encoding="utf-8")
    png = _bundles(cells["fig_show"])[0]["image/png"].replace("\n", "")
    assert html.count("<img") >= 3 and f'src="data:image/png;base64,{png}' in html
    assert "loop: 100%" in html  # the progress bar's final line


def test_figure_bundle_without_png_route(monkeypatch):
    """No PNG route at run time: the interactive figure alone, one warning, no error."""
    import plotly.graph_objects as go

    from dmlnb import viz

    def broken(*_, **__):
        raise RuntimeError("could not write a PNG")

    monkeypatch.setattr(viz, "write_pngs", broken)
    monkeypatch.setattr(viz, "_PNG_ROUTE", {"kaleido_server": True})  # start no browser here
    fig = go.Figure(go.Bar(x=["a"], y=[1]))
    with pytest.warns(RuntimeWarning, match="without their PNG fallback"):
        bundle = viz.figure_bundle(fig, png=True)
    assert set(bundle) == {"application/vnd.plotly.v1+json", "text/plain"}
    assert viz.figure_bundle(fig, png=True) == bundle  # tried once per process, then not again
    assert set(viz.figure_bundle(fig, png=False)) == {"application/vnd.plotly.v1+json", "text/plain"}


def test_figure_png_gives_up_on_a_route_that_does_not_answer(monkeypatch):
    """A PNG route that hangs (kaleido waiting on a browser that died) costs PNG_TIMEOUT_S once:
    the figure is shown without its PNG, with a warning naming the timeout."""
    import threading
    import time

    import plotly.graph_objects as go

    from dmlnb import viz

    never = threading.Event()
    monkeypatch.setattr(viz, "write_pngs", lambda *_, **__: never.wait())
    monkeypatch.setattr(viz, "_PNG_ROUTE", {"kaleido_server": True})
    monkeypatch.setattr(viz, "PNG_TIMEOUT_S", 0.5)
    fig = go.Figure(go.Bar(x=["a"], y=[1]))
    t0 = time.perf_counter()
    with pytest.warns(RuntimeWarning, match=r"no PNG after 0.5 s"):
        assert viz.figure_png(fig) is None
    assert time.perf_counter() - t0 < 30
    assert viz.figure_png(fig) is None  # given up for the process: no second wait
    never.set()


def test_kaleido_server_is_started_only_with_a_browser(monkeypatch):
    """Without a Chrome for kaleido, its sync server is not started (its thread would die and
    leave every later figure waiting); the per-figure routes are tried instead."""
    import plotly.graph_objects as go

    from dmlnb import viz

    kaleido = pytest.importorskip("kaleido")
    started = []
    monkeypatch.setattr(kaleido, "start_sync_server", lambda **_: started.append(1))
    monkeypatch.setattr(viz, "_kaleido_finds_chrome", lambda: False)
    monkeypatch.setattr(viz, "_PNG_ROUTE", {})
    monkeypatch.setattr(viz, "write_pngs", lambda items, scale: items[0][1].write_bytes(b"png"))
    assert viz.figure_png(go.Figure()) == b"png"
    assert not started
    monkeypatch.setattr(viz, "_kaleido_finds_chrome", lambda: True)
    monkeypatch.setattr(viz, "_PNG_ROUTE", {})
    assert viz.figure_png(go.Figure()) == b"png"
    assert started == [1]


def test_static_figures_switch(monkeypatch):
    from dmlnb import viz

    for value, on in (("1", True), ("yes", True), ("0", False), ("", False)):
        monkeypatch.setenv(viz.STATIC_FIGURES_ENV, value)
        assert viz.static_figures() is on
