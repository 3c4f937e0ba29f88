"""A real browser: JupyterLab on 127.0.0.1, Chromium driven by Playwright, the views notebook run
top to bottom, the strength slider moved with the keyboard; the displayed view and the read-out
must change. A screenshot is saved in the test's temp dir.

Skipped, with the reason, when Playwright or Chromium (``/usr/bin/chromium`` or
``$DMLNB_CHROMIUM``) is missing; never runs ``playwright install``.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import nbformat
import pytest

from dmlnb.viz import CHROMIUM_ARGS, chromium_path

ROOT = Path(__file__).resolve().parent.parent
pytestmark = [pytest.mark.browser, pytest.mark.slow]
START_TIMEOUT_S = 90
RUN_TIMEOUT_MS = 240_000  # the notebook run (kernel start, gallery, explorer) on 2 busy cores


KERNEL_IDLE_JS = """() => {
  const w = window.jupyterapp.shell.currentWidget;
  const k = w && w.sessionContext && w.sessionContext.session && w.sessionContext.session.kernel;
  return !!k && k.status === 'idle' && k.connectionStatus === 'connected';
}"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _set_parameters(book, **values):
    cell = next(c for c in book.cells if c.cell_type == "code")
    lines = cell.source.splitlines()
    for i, line in enumerate(lines):
        name = line.split("=")[0].strip()
        if name in values:
            lines[i] = f"{name} = {values[name]!r}"
    cell.source = "\n".join(lines)


@pytest.fixture
def lab(tmp_path):
    """A JupyterLab server with fresh config/settings dirs (announcements off), serving a copy
    of the views notebook whose parameters point at a tiny trained run."""
    pytest.importorskip("playwright.sync_api", reason="playwright (pip) is not installed")
    if not Path(chromium_path()).exists():
        pytest.skip(f"no Chromium at {chromium_path()} (apt-get install chromium)")
    if shutil.which("jupyter-lab", path=str(Path(sys.executable).parent)) is None:
        pytest.skip("jupyterlab is not installed next to this Python")

    from dmlnb.train import fit

    run_dir = tmp_path / "run"
    fit(dict(epochs=1, steps_per_epoch=1, batch_size=32, ssr_images=4, quiet=True,
             dataset_options={"max_per_class": 8}, run_dir=str(run_dir)))
    served = tmp_path / "lab"
    served.mkdir()
    book = nbformat.read(ROOT / "notebooks" / "01_views.ipynb", as_version=4)
    _set_parameters(book, run_dir=str(run_dir), n_images=1, levels=3)
    nbformat.write(book, served / "01_views.ipynb")

    config, settings = tmp_path / "jupyter_config", tmp_path / "lab_settings"
    (config / "labconfig").mkdir(parents=True)
    (config / "labconfig" / "page_config.json").write_text(json.dumps(
        {"disabledExtensions": {"@jupyterlab/apputils-extension:announcements": True}}))
    settings.mkdir()
    env = dict(os.environ, JUPYTER_CONFIG_DIR=str(config), JUPYTERLAB_SETTINGS_DIR=str(settings),
               JUPYTERLAB_WORKSPACES_DIR=str(tmp_path / "workspaces"),
               JUPYTER_RUNTIME_DIR=str(tmp_path / "runtime"),
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
               OMP_NUM_THREADS="1")
    port, token = _free_port(), "dmlnb-test-token"
    log = open(tmp_path / "lab.log", "w")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(
        [sys.executable, "-m", "jupyterlab", "--no-browser", "--ip=127.0.0.1", f"--port={port}",
         f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={served}",
         "--LabApp.expose_app_in_browser=True", "--ServerApp.open_browser=False", "--allow-root"],
        env=env, stdout=log, stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + START_TIMEOUT_S
        while True:
            try:
                urllib.request.urlopen(f"{url}/api/status?token={token}", timeout=2)
                break
            except OSError:
                if proc.poll() is not None or time.time() > deadline:
                    raise RuntimeError("JupyterLab did not start:\n" + (tmp_path / "lab.log").read_text()) from None
                time.sleep(0.5)
        yield {"url": url, "token": token, "tmp": tmp_path}
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


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
