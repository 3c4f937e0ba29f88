"""No papermill execution waits forever: per-cell and overall timeouts stop the kernel (and its
children) with an error naming the notebook, the cell and the timeout; the widget slider no longer
makes nbclient talk back to the kernel mid-cell; kernels started at once do not race for ports."""

from __future__ import annotations

import argparse
import os
import re
import signal
import threading
import time
from pathlib import Path

import nbformat
import psutil
import pytest

from dmlnb import execute
from dmlnb.execute import NotebookTimeoutError, run_notebook

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def kernel_env(monkeypatch):
    """Kernels import dmlnb from this checkout and use one thread."""
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")


def _notebook(path: Path, *cells: str) -> Path:
    nb = nbformat.v4.new_notebook()
    params = nbformat.v4.new_code_cell("pid_file = None")
    params.metadata["tags"] = ["parameters"]
    record_pid = ("import os, pathlib\n"
                  "if pid_file:\n"
                  "    pathlib.Path(pid_file).write_text(str(os.getpid()))")
    nb.cells = [params, nbformat.v4.new_code_cell(record_pid)] + [nbformat.v4.new_code_cell(c) for c in cells]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, path)
    return path


def _gone(pid_file: Path) -> bool:
    """The kernel whose pid the notebook recorded is no longer running (or never started)."""
    if not pid_file.exists():
        return True
    pid = int(pid_file.read_text())
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_every_papermill_call_goes_through_run_notebook():
    """One place runs notebooks: the package calls papermill's execute_notebook only there."""
    callers = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "dmlnb").rglob("*.py")
                     if re.search(r"\bexecute_notebook\(", p.read_text(encoding="utf-8")))
    assert callers == ["dmlnb/execute.py"]


def test_sleeping_cell_stops_at_the_cell_timeout(tmp_path):
    nb = _notebook(tmp_path / "sleepy.ipynb", "import time\ntime.sleep(60)")
    pid_file, out = tmp_path / "kernel.pid", tmp_path / "out.ipynb"
    start = time.monotonic()
    with pytest.raises(NotebookTimeoutError) as err:
        run_notebook(nb, out, {"pid_file": str(pid_file)}, cell_timeout=2, notebook_timeout=120)
    elapsed = time.monotonic() - start
    e = err.value
    assert e.scope == "cell" and e.timeout == 2 and e.cell_index == 3  # params, injected, pid, sleep
    assert e.seconds < 10, f"stopped {e.seconds:.1f} s after the cell started"
    assert elapsed < 55  # kernel start + 2 s; without a timeout the cell alone takes 60 s
    msg = str(e)
    assert "sleepy.ipynb" in msg and "cell 3" in msg and "time.sleep(60)" in msg
    assert "per-cell timeout of 2 s" in msg and "--cell-timeout" in msg
    assert _gone(pid_file), "the kernel was left running"
    assert out.is_file()  # the executed notebook so far is kept


def test_overall_timeout_stops_a_notebook_of_quick_cells(tmp_path):
    nb = _notebook(tmp_path / "long.ipynb", *["import time\ntime.sleep(1)"] * 90)
    pid_file = tmp_path / "kernel.pid"
    start = time.monotonic()
    with pytest.raises(NotebookTimeoutError) as err:
        run_notebook(nb, tmp_path / "out.ipynb", {"pid_file": str(pid_file)}, cell_timeout=30,
                     notebook_timeout=25)
    assert time.monotonic() - start < 25 + 35  # the guard, then the kill and papermill's unwinding
    e = err.value
    assert e.scope == "notebook" and e.timeout == 25
    assert "long.ipynb" in str(e) and "overall timeout of 25 s" in str(e)
    assert "--notebook-timeout" in str(e)
    assert _gone(pid_file)


def test_overall_guard_catches_a_client_stuck_waiting_for_a_reply(tmp_path, monkeypatch):
    """Whatever papermill waits on (here: a reply that never comes, the hang of the intraclass
    notebook), the guard kills the kernel; nbclient's own per-cell timeout never fires."""
    import asyncio

    import nbclient.client

    async def never_replies(self, msg_id, cell, timeout, task_poll_output_msg, task_poll_kernel_alive):
        await asyncio.Event().wait()

    nb = _notebook(tmp_path / "stuck.ipynb", "x = 1")
    pid_file = tmp_path / "kernel.pid"
    # the pid cell must run first: let the first two code cells through, then never reply
    real = nbclient.client.NotebookClient._async_poll_for_reply
    calls = {"n": 0}

    async def poll(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] <= 3:  # parameters, injected parameters, pid
            return await real(self, *args, **kwargs)
        return await never_replies(self, *args, **kwargs)

    monkeypatch.setattr(nbclient.client.NotebookClient, "_async_poll_for_reply", poll)
    start = time.monotonic()
    with pytest.raises(NotebookTimeoutError) as err:
        run_notebook(nb, tmp_path / "out.ipynb", {"pid_file": str(pid_file)}, cell_timeout=1,
                     notebook_timeout=20)
    assert time.monotonic() - start < 20 + 35
    assert err.value.scope == "notebook" and err.value.cell_index == 3
    assert "'x = 1'" in str(err.value)
    assert _gone(pid_file)


def test_ctrl_c_takes_the_kernel_along(tmp_path):
    nb = _notebook(tmp_path / "sleepy.ipynb", "import time\ntime.sleep(60)")
    pid_file = tmp_path / "kernel.pid"

    def interrupt_once_sleeping():
        deadline = time.monotonic() + 45
        while not pid_file.exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        time.sleep(1)
        os.kill(os.getpid(), signal.SIGINT)  # what Ctrl-C does

    threading.Thread(target=interrupt_once_sleeping, daemon=True).start()
    with pytest.raises(KeyboardInterrupt):
        run_notebook(nb, tmp_path / "out.ipynb", {"pid_file": str(pid_file)}, cell_timeout=120,
                     notebook_timeout=120)
    assert _gone(pid_file)


def test_two_kernels_started_at_once_both_run(tmp_path):
    """No TCP port race: each kernel gets IPC sockets of its own; the caller's cwd is untouched."""
    nb = _notebook(tmp_path / "who.ipynb",
                   "from ipykernel.kernelapp import IPKernelApp\nprint(IPKernelApp.instance().transport)\n"
                   "import os\nprint(os.getcwd())")
    cwd = os.getcwd()
    results, errors = {}, []
    barrier = threading.Barrier(2)

    def run(i):
        try:
            barrier.wait()
            results[i] = run_notebook(nb, tmp_path / f"out{i}.ipynb", cwd=tmp_path,
                                      cell_timeout=60, notebook_timeout=180)
        except Exception as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(240)
    assert not errors, errors
    for book in results.values():
        text = "".join(o.get("text", "") for o in book.cells[-1].outputs)
        assert text.split() == ["ipc", str(tmp_path)]
    assert os.getcwd() == cwd


def test_kernel_that_fails_to_start_is_started_again(tmp_path, monkeypatch):
    """A kernel that dies at start (a port taken under it, a slow machine) costs a retry, not the
    run: no cell had run, so starting another kernel is safe."""
    from jupyter_client.manager import AsyncKernelManager

    real = AsyncKernelManager.start_kernel
    starts = []

    async def flaky_start(self, **kwargs):
        starts.append(self.transport)
        if len(starts) == 1:
            raise RuntimeError("Kernel died before replying to kernel_info")
        return await real(self, **kwargs)

    monkeypatch.setattr(AsyncKernelManager, "start_kernel", flaky_start)
    nb = _notebook(tmp_path / "x.ipynb", "print('ran')")
    book = run_notebook(nb, tmp_path / "out.ipynb", cell_timeout=60, notebook_timeout=180)
    assert starts == ["ipc", "tcp"]  # the retry falls back to TCP
    assert "ran" in "".join(o.get("text", "") for o in book.cells[-1].outputs)


def test_socket_folders_of_killed_executions_are_removed(tmp_path, monkeypatch):
    """A sweep worker killed with its kernel leaves its IPC socket folder behind; the next
    execution removes the folders whose process is gone, and only those."""
    import subprocess
    import sys
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True).stdout.strip()
    orphan = tmp_path / f"dmlnb-kernel-{dead}-abc"
    live = tmp_path / f"dmlnb-kernel-{os.getpid()}-def"
    for d in (orphan, live):
        d.mkdir()
        (d / "kernel-1").write_text("")
    execution = execute._Execution(use_ipc=True)
    try:
        assert not orphan.exists() and live.exists()
        assert Path(execution.ipc_dir).parent == tmp_path
    finally:
        execution.cleanup()
    assert not Path(execution.ipc_dir).exists()


def test_figure_slider_sets_the_output_without_capturing(monkeypatch):
    """The slider's figure goes into the Output widget as state, not through a display capture
    (outside a kernel a capture shows nothing, so the old slider had empty outputs here)."""
    import plotly.graph_objects as go
    import plotly.io as pio

    from dmlnb import widgets

    monkeypatch.setattr(pio.renderers, "default", "plotly_mimetype")
    box = widgets.figure_slider(lambda v: go.Figure(go.Scatter(x=[0, v], y=[0, v])), [0.5, 1.0])
    (shown,) = box.output.outputs
    assert shown["output_type"] == "display_data"
    fig = shown["data"]["application/vnd.plotly.v1+json"]
    assert fig["data"][0]["x"] == [0, 1.0]
    box.slider.value = 0.5
    assert box.output.outputs[0]["data"]["application/vnd.plotly.v1+json"]["data"][0]["x"] == [0, 0.5]


def test_slider_notebook_sends_nothing_back_to_the_kernel(tmp_path, monkeypatch):
    """The hang's trigger is gone: nbclient's stand-in for the Output widget used to answer the
    slider's captured display with a comm_msg on the shell channel while the cell's reply was
    pending there. Now it has nothing to answer, and the figure is in the widget state."""
    from nbclient import output_widget

    sent = []
    real = output_widget.OutputWidget._publish_msg
    monkeypatch.setattr(output_widget.OutputWidget, "_publish_msg",
                        lambda self, *a, **k: (sent.append(a[:1]), real(self, *a, **k))[1])
    nb = _notebook(tmp_path / "slider.ipynb",
                   "import plotly.graph_objects as go\nfrom dmlnb import notebook as nb, widgets\n"
                   "nb.setup()\n"
                   "widgets.figure_slider(lambda v: go.Figure(go.Scatter(x=[0, v], y=[0, v])), [0.5, 1.0])")
    book = run_notebook(nb, tmp_path / "out.ipynb", cell_timeout=120, notebook_timeout=240)
    assert sent == []
    state = book.metadata["widgets"]["application/vnd.jupyter.widget-state+json"]["state"]
    outputs = [o for m in state.values() if m["model_name"] == "OutputModel" for o in m["state"]["outputs"]]
    assert any("application/vnd.plotly.v1+json" in o["data"] for o in outputs)


def test_timeouts_default_per_notebook_and_are_validated(tmp_path):
    assert execute.default_timeouts("notebooks/02_train.ipynb") == execute.DEFAULT_TIMEOUTS["02_train.ipynb"]
    assert execute.default_timeouts("elsewhere.ipynb") == execute.FALLBACK_TIMEOUTS
    for cell, total in execute.DEFAULT_TIMEOUTS.values():
        assert 0 < cell <= total
    nb = _notebook(tmp_path / "x.ipynb", "x = 1")
    with pytest.raises(ValueError, match="cell_timeout=0"):
        run_notebook(nb, None, cell_timeout=0)
    with pytest.raises(ValueError, match="notebook_timeout=-1"):
        run_notebook(nb, None, notebook_timeout=-1)
    with pytest.raises(ValueError, match="notebook="):
        run_notebook(tmp_path / "missing.ipynb", None)


@pytest.mark.parametrize("module", ["sweep", "figures", "study"])
def test_cli_timeout_flags(module):
    import importlib

    mod = importlib.import_module(f"dmlnb.{module}")
    parser = argparse.ArgumentParser(prog="dmlnb")
    mod.add_parser(parser.add_subparsers(dest="command"))
    needed = {"sweep": ["nb.ipynb", "--grid", "g", "--out", "o"]}.get(module, [])
    args = parser.parse_args([module, *needed, "--cell-timeout", "30", "--notebook-timeout", "90"])
    assert (args.cell_timeout, args.notebook_timeout) == (30.0, 90.0)
    assert parser.parse_args([module, *needed]).cell_timeout is None
    with pytest.raises(SystemExit):
        parser.parse_args([module, *needed, "--cell-timeout", "0"])
