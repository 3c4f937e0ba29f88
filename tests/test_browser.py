"""A real browser: JupyterLab on 127.0.0.1, Chromium driven by Playwright, the views notebook run
top to bottom, the strength slider moved with the keyboard; the displayed view and the read-out
must change. A screenshot is saved in the test's temp dir.

Skipped, with the reason, when Playwright or Chromium (``/usr/bin/chromium`` or
``$DMLNB_CHROMIUM``) is missing; never runs ``playwright install``.
"""

from __future__ import annotations

import os
import shutil

import nbformat
import pytest
from lab_server import KERNEL_IDLE_JS, ROOT, _set_parameters, jupyterlab, skip_unless_browser

from dmlnb.viz import CHROMIUM_ARGS, chromium_path

pytestmark = [pytest.mark.browser, pytest.mark.slow]
RUN_TIMEOUT_MS = 240_000  # the notebook run (kernel start, gallery, explorer) on 2 busy cores


@pytest.fixture
def lab(tmp_path):
    """A JupyterLab server (:func:`lab_server.jupyterlab`) serving a copy of the views
    notebook whose parameters point at a tiny trained run."""
    skip_unless_browser()

    from dmlnb.train import fit

    run_dir = tmp_path / "run"
    fit(dict(epochs=1, steps_per_epoch=1, batch_size=32, ssr_images=4, quiet=True,
             dataset_options={"max_per_class": 8}, run_dir=str(run_dir)))
    served = tmp_path / "lab"
    served.mkdir()
    book = nbformat.read(ROOT / "notebooks" / "01_views.ipynb", as_version=4)
    _set_parameters(book, run_dir=str(run_dir), n_images=1, levels=3)
    nbformat.write(book, served / "01_views.ipynb")
    with jupyterlab(tmp_path, served) as server:
        yield server


def test_views_notebook_slider_moves_image_and_readout(lab):
    from playwright.sync_api import sync_playwright

    shot = lab["tmp"] / "views_explorer.png"
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium_path(), args=list(CHROMIUM_ARGS))
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(f"{lab['url']}/lab/tree/01_views.ipynb?token={lab['token']}")
            page.wait_for_selector(".jp-NotebookPanel", timeout=60_000)
            page.wait_for_function("window.jupyterapp && window.jupyterapp.commands", timeout=60_000)
            # wait for the kernel, then Run > Run All Cells (the command the menu item calls)
            page.wait_for_function(KERNEL_IDLE_JS, timeout=120_000)
            page.wait_for_timeout(1000)
            page.evaluate("window.jupyterapp.commands.execute('notebook:run-all-cells')")
            readout = page.locator(".dmlnb-readout")
            try:
                readout.wait_for(timeout=RUN_TIMEOUT_MS)
            except Exception:
                page.screenshot(path=str(shot), full_page=True)
                raise
            page.wait_for_function(
                "document.querySelector('.dmlnb-readout') && "
                "document.querySelector('.dmlnb-readout').innerText.includes('metric head')",
                timeout=RUN_TIMEOUT_MS,
            )
            image = page.locator(".dmlnb-view-image").first
            image.scroll_into_view_if_needed()
            before_text = readout.inner_text()
            before_src = image.get_attribute("src")
            assert "strength t\t0.00" in before_text.replace(" ", "\t") or "0.00" in before_text

            handle = page.locator(".widget-slider .noUi-handle").first
            handle.click()
            for _ in range(40):  # 40 steps of 0.01
                page.keyboard.press("ArrowRight")
            page.wait_for_function(
                "document.querySelector('.dmlnb-readout').innerText.includes('0.40')",
                timeout=30_000,
            )
            page.wait_for_timeout(500)
            after_text = readout.inner_text()
            after_src = image.get_attribute("src")
            page.screenshot(path=str(shot), full_page=True)
        finally:
            browser.close()
    assert after_text != before_text
    assert after_src and after_src != before_src
    assert "cos(view, original), metric head" in after_text
    assert shot.is_file() and shot.stat().st_size > 10_000
    if os.environ.get("DMLNB_KEEP_SCREENSHOT"):
        shutil.copy(shot, os.environ["DMLNB_KEEP_SCREENSHOT"])
