"""A JupyterLab server for the browser tests (``test_browser.py``, ``test_browser_notebooks.py``).

:func:`skip_unless_browser` skips a test, with the reason, when Playwright, Chromium
(``/usr/bin/chromium`` or ``$DMLNB_CHROMIUM``) or JupyterLab is missing; nothing here runs
``playwright install``. :func:`jupyterlab` starts a server on 127.0.0.1 (a free port, a fixed
token, fresh config/settings/workspace/runtime dirs in the test's temp dir, the announcements
extension off, kernels importing ``dmlnb`` from this checkout on one thread) serving a folder, and
stops it afterwards. :func:`write_notebook` writes a copy of a notebook with its parameters cell
set to other values.
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
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import nbformat
import pytest

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = ROOT / "notebooks"
START_TIMEOUT_S = 90
TOKEN = "dmlnb-test-token"

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
    """Set ``name = value`` in the first code cell (the parameters cell); a name the cell does not
    have is appended to it (as papermill's injected cell would add it), so the notebook's own
    validation sees every value."""
    cell = next(c for c in book.cells if c.cell_type == "code")
    lines = cell.source.splitlines()
    done = set()
    for i, line in enumerate(lines):
        name = line.split("=")[0].strip()
        if name in values:
            lines[i] = f"{name} = {values[name]!r}"
            done.add(name)
    lines += [f"{name} = {value!r}" for name, value in values.items() if name not in done]
    cell.source = "\n".join(lines)


def write_notebook(name: str, served: Path, **values: Any) -> Path:
    """Copy ``notebooks/<name>`` into ``served`` with its parameters set to ``values``."""
    book = nbformat.read(NOTEBOOKS / name, as_version=4)
    if values:
        _set_parameters(book, **values)
    served.mkdir(parents=True, exist_ok=True)
    nbformat.write(book, served / name)
    return served / name


def skip_unless_browser() -> None:
    """Skip the calling test when Playwright, Chromium or JupyterLab is missing."""
    from dmlnb.viz import chromium_path

    pytest.importorskip("playwright.sync_api", reason="playwright (pip) is not installed")
    if not Path(chromium_path()).exists():
        pytest.skip(f"no Chromium at {chromium_path()} (apt-get install chromium)")
    if shutil.which("jupyter-lab", path=str(Path(sys.executable).parent)) is None:
        pytest.skip("jupyterlab is not installed next to this Python")


@contextmanager
def jupyterlab(tmp_path: Path, served: Path) -> Iterator[dict[str, Any]]:
    """A JupyterLab server with fresh config/settings dirs (announcements off) serving ``served``;
    yields ``{"url", "token", "tmp"}`` and stops the server on exit (its log: ``tmp/lab.log``)."""
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
    port, token = _free_port(), TOKEN
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
