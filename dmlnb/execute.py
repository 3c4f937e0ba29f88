"""Run one notebook with papermill, never waiting forever: the one place the package does it.

:func:`run_notebook` is what :mod:`dmlnb.sweep`, :mod:`dmlnb.figures` and :mod:`dmlnb.study` (through
the sweep) call. Around ``papermill.execute_notebook`` it adds

- a **per-cell timeout** (papermill's ``execution_timeout``) and an **overall timeout** for the whole
  notebook, kernel start included (a guard that kills the kernel if papermill itself is stuck),
  both with defaults sized per notebook (:data:`DEFAULT_TIMEOUTS`). Either one stops the kernel
  *and its child processes* and raises :class:`NotebookTimeoutError`, which names the notebook, the
  cell and the timeout; the executed notebook written so far is kept.
- **no lost replies**: while a cell runs, the client's shell and IOPub sockets are re-polled every
  second. nbclient answers ipywidgets ``Output`` captures by sending ``comm_msg`` to the kernel on
  the shell socket while it waits on that same socket for the cell's ``execute_reply``; that send
  can swallow the socket's edge-triggered wake-up, and the reply then sits unread in the socket
  while papermill waits forever (the "idle kernel, papermill stuck at the last cell" hang). A
  re-poll delivers such a reply at once.
- **quiet**: the kernel process's own log (IPKernelApp warnings, "KeyboardInterrupt caught in
  kernel" when it shuts down) goes to ``<output>.kernel.log`` (kept only if not empty; nowhere
  when there is no output file), not to this process's stderr, which inside a notebook would show
  up in the calling cell's output. The cells' own output stays in the notebook.
- **no port races**: each kernel talks over IPC sockets in its own temporary directory instead of
  TCP ports picked by "bind to port 0, close, hope nobody else takes it", so kernels started at the
  same moment (parallel sweep points, concurrent test runs) cannot collide. A kernel that still
  fails to start is started once more (nothing ran yet, so that is safe).
- **no change of the caller's working directory**: the kernel starts in ``cwd`` without
  papermill's process-wide ``os.chdir``, so several notebooks can run at once in one process.
"""

from __future__ import annotations

import asyncio
import math
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from dmlnb._validate import check_range

__all__ = [
    "DEFAULT_KERNEL",
    "DEFAULT_TIMEOUTS",
    "NotebookTimeoutError",
    "add_timeout_flags",
    "default_timeouts",
    "kill_processes",
    "run_notebook",
]

DEFAULT_KERNEL = "python3"  # the kernel `make` installs into the venv (ipykernel --sys-prefix)

#: notebook file name -> (per-cell timeout, whole-notebook timeout) in seconds. Sized from the
#: run times at the package defaults on 2 CPU cores (02_train: ~3 min per run; 04 with its two
#: brief runs and UMAP: ~5 min; 03: its 8-point default grid, 2 at a time: ~10 min) with a wide
#: margin for slower machines and bigger settings; raise them for long runs (paper presets).
DEFAULT_TIMEOUTS: dict[str, tuple[float, float]] = {
    "01_views.ipynb": (20 * 60, 40 * 60),
    "02_train.ipynb": (3 * 3600, 4 * 3600),
    "03_ablations.ipynb": (8 * 3600, 10 * 3600),
    "04_intraclass_umap.ipynb": (3600, 2 * 3600),
}
#: any other notebook
FALLBACK_TIMEOUTS: tuple[float, float] = (3 * 3600, 6 * 3600)

NUDGE_INTERVAL_S = 1.0  # re-poll of the client's sockets while a cell runs
_KILL_WAIT_S = 30.0  # after killing a stuck kernel: how long papermill gets to unwind and save
_MAX_IPC_PREFIX = 90  # unix socket paths are limited to ~107 bytes; longer temp dirs use TCP


class NotebookTimeoutError(TimeoutError):
    """A notebook ran past its per-cell or its overall timeout; its kernel was stopped.

    Attributes: ``notebook`` (path), ``scope`` (``"cell"`` or ``"notebook"``), ``timeout``
    (seconds), ``cell_index`` (index in the executed notebook, papermill's injected-parameters cell
    and markdown cells counted; ``None`` if no cell had started), ``cell_source``, ``seconds``
    (how long the cell, or the notebook, had run), ``output`` (the executed notebook so far).
    """

    def __init__(self, notebook: str, scope: str, timeout: float, cell_index: int | None,
                 cell_source: str | None, seconds: float, output: str | None) -> None:
        self.notebook, self.scope, self.timeout = notebook, scope, timeout
        self.cell_index, self.cell_source, self.seconds, self.output = (
            cell_index, cell_source, seconds, output)
        name = Path(notebook).name
        first = " / ".join(ln.strip() for ln in (cell_source or "").splitlines() if ln.strip())
        first = first if len(first) <= 70 else first[:67] + "..."
        if cell_index is None:
            where = "still starting its kernel"
        else:
            where = f"in cell {cell_index} ({first!r})"
        if scope == "cell":
            what = (f"cell {cell_index} of the executed notebook ({first!r}) was still running "
                    f"after the per-cell timeout of {timeout:g} s (cell_timeout, --cell-timeout)")
        else:
            what = (f"the notebook did not finish within its overall timeout of {timeout:g} s "
                    f"(notebook_timeout, --notebook-timeout); it was {where}")
        kept = f"; the notebook as executed so far: {output}" if output else ""
        super().__init__(f"{name}: {what}; its kernel was stopped{kept}")

    def __reduce__(self):  # picklable, for the sweep's worker processes
        return (type(self), (self.notebook, self.scope, self.timeout, self.cell_index,
                             self.cell_source, self.seconds, self.output))


def default_timeouts(notebook: str | os.PathLike) -> tuple[float, float]:
    """``(cell_timeout, notebook_timeout)`` in seconds for ``notebook`` (by file name)."""
    return DEFAULT_TIMEOUTS.get(Path(notebook).name, FALLBACK_TIMEOUTS)


def _resolve_timeouts(notebook, cell_timeout, notebook_timeout) -> tuple[float, float]:
    cell_default, total_default = default_timeouts(notebook)
    cell = cell_default if cell_timeout is None else cell_timeout
    total = total_default if notebook_timeout is None else notebook_timeout
    check_range("cell_timeout", cell, 0, low_inclusive=False)
    check_range("notebook_timeout", total, 0, low_inclusive=False)
    return float(cell), float(total)


_IPC_PREFIX = "dmlnb-kernel-"  # + <pid of the process that runs the notebook>-<random>


def _remove_orphaned_ipc_dirs() -> None:
    """Remove the socket folders of executions whose process is gone (a sweep worker killed with
    its kernel never gets to clean up); a live process's folders are left alone."""
    import psutil

    for d in Path(tempfile.gettempdir()).glob(f"{_IPC_PREFIX}*-*"):
        pid = d.name[len(_IPC_PREFIX):].split("-", 1)[0]
        if pid.isdigit() and not psutil.pid_exists(int(pid)):
            shutil.rmtree(d, ignore_errors=True)


class _Execution:
    """State of one papermill execution, shared by its thread, nbclient's hooks and the guard."""

    def __init__(self, use_ipc: bool, kernel_log: Path | None = None) -> None:
        self.kernel_log = kernel_log  # the kernel process's own stderr goes here
        self.kernel_log_handle: Any = None
        self.km: Any = None
        self.kc: Any = None
        self.cell_index: int | None = None
        self.cell_source: str | None = None
        self.cell_started = 0.0
        self.cell_running = False
        self.cells_started = 0
        self.stopped = False  # the guard gave up on this execution
        self.nudger: asyncio.Task | None = None
        self.ipc_dir = None
        if use_ipc:
            _remove_orphaned_ipc_dirs()
            d = tempfile.mkdtemp(prefix=f"{_IPC_PREFIX}{os.getpid()}-")
            if len(d) <= _MAX_IPC_PREFIX:
                self.ipc_dir = d
            else:
                os.rmdir(d)

    # -- nbclient hooks (called in the execution thread, inside its event loop) --
    def on_cell_start(self, cell, cell_index, **_: Any) -> None:
        if self.stopped:
            raise RuntimeError("execution stopped by its overall timeout")

    def on_cell_execute(self, cell, cell_index, **_: Any) -> None:
        self.cell_index, self.cell_source = cell_index, cell.source
        self.cell_started = time.monotonic()
        self.cell_running = True
        self.cells_started += 1
        if self.nudger is None or self.nudger.done():
            self.nudger = asyncio.ensure_future(self._nudge())

    def on_cell_executed(self, cell, cell_index, **_: Any) -> None:
        self.cell_running = False

    async def _nudge(self) -> None:
        """Re-poll the client's sockets while a cell runs (see the module docstring).

        Reading ``ZMQ_EVENTS`` makes pyzmq look at the socket again and deliver whatever arrived,
        which is all a missed edge-triggered wake-up needs."""
        import zmq

        while True:
            await asyncio.sleep(NUDGE_INTERVAL_S)
            kc = self.kc
            if kc is None:
                return
            for name in ("_shell_channel", "_iopub_channel"):  # never create channels here
                sock = getattr(getattr(kc, name, None), "socket", None)
                if sock is not None and not sock.closed:
                    try:
                        sock.get(zmq.EVENTS)
                    except zmq.ZMQError:
                        pass

    # -- the kernel --
    def kernel_pid(self) -> int | None:
        return getattr(getattr(self.km, "provisioner", None), "pid", None)

    def kill_kernel(self) -> None:
        """SIGKILL the kernel and every process it started (DataLoader workers, nested sweeps)."""
        import psutil

        pid = self.kernel_pid()
        if not pid:
            return
        try:
            kernel = psutil.Process(pid)
            procs = [kernel, *kernel.children(recursive=True)]
        except psutil.NoSuchProcess:
            return
        kill_processes(procs)

    def manager_class(self) -> type:
        """A kernel manager class bound to this execution: IPC transport in a private directory,
        the client recorded (for the re-poll), and a kernel stopped mid-cell killed with its
        children rather than asked to shut down."""
        from jupyter_client.manager import AsyncKernelManager

        execution = self

        class _KernelManager(AsyncKernelManager):
            def __init__(self, **kwargs: Any) -> None:
                super().__init__(**kwargs)
                if execution.ipc_dir:
                    self.transport = "ipc"
                    self.ip = os.path.join(execution.ipc_dir, "kernel")
                execution.km = self
                # headless: figures keep a PNG fallback (dmlnb.viz.static_figures); caller's value wins
                getattr(self.kernel_spec, "env", {}).setdefault("DMLNB_STATIC_FIGURES", os.environ.get("DMLNB_STATIC_FIGURES", "1"))

            def client(self, **kwargs: Any):
                kc = super().client(**kwargs)
                execution.kc = kc
                return kc

            async def start_kernel(self, **kw: Any) -> None:
                # the kernel application's own log ("running over TCP without encryption",
                # "KeyboardInterrupt caught in kernel" at shutdown) is not the notebook's output:
                # it goes to a file, not to the stderr this process shares with its caller
                # (inside a notebook, that stderr lands in the calling cell's output)
                if "stderr" not in kw:
                    kw["stderr"] = execution.open_kernel_log()
                await super().start_kernel(**kw)

            async def shutdown_kernel(self, now: bool = False, restart: bool = False) -> None:
                if execution.cell_running:  # stopped mid-cell (a timeout): nothing left to save
                    execution.kill_kernel()
                    now = True
                await super().shutdown_kernel(now=now, restart=restart)

        return _KernelManager

    def finish(self) -> None:
        """In the execution thread, after papermill returned: end the re-poll, close the loop."""
        from jupyter_core.utils import ensure_event_loop

        self.kc = None
        loop = ensure_event_loop()
        if self.nudger is not None and not self.nudger.done():
            self.nudger.cancel()
            try:
                loop.run_until_complete(asyncio.wait([self.nudger]))
            except RuntimeError:
                pass
        if not loop.is_running():
            loop.close()

    def open_kernel_log(self) -> Any:
        if self.kernel_log_handle is None:
            if self.kernel_log is None:
                self.kernel_log_handle = open(os.devnull, "wb")  # noqa: SIM115 - closed in cleanup
            else:
                self.kernel_log.parent.mkdir(parents=True, exist_ok=True)
                self.kernel_log_handle = open(self.kernel_log, "ab")  # noqa: SIM115
        return self.kernel_log_handle

    def cleanup(self) -> None:
        if self.kernel_log_handle is not None:
            self.kernel_log_handle.close()
            self.kernel_log_handle = None
            log = self.kernel_log
            if log is not None and log.is_file() and log.stat().st_size == 0:
                log.unlink()
        if self.ipc_dir:
            shutil.rmtree(self.ipc_dir, ignore_errors=True)


def run_notebook(
    notebook: str | os.PathLike,
    output: str | os.PathLike | None,
    parameters: Mapping[str, Any] | None = None,
    *,
    kernel_name: str = DEFAULT_KERNEL,
    cwd: str | os.PathLike | None = None,
    cell_timeout: float | None = None,
    notebook_timeout: float | None = None,
    start_timeout: float = 60,
    start_retries: int = 1,
    progress_bar: bool = False,
    log_output: bool = False,
    ipc: bool = True,
) -> Any:
    """Execute ``notebook`` with papermill into ``output``; return the executed notebook node.

    Parameters
    ----------
    notebook, output : path
        The notebook and where the executed copy goes (written after every cell, kept on error;
        ``None``: not written).
    parameters : mapping, optional
        Papermill parameters (injected after the cell tagged ``parameters``).
    kernel_name : str
        The Jupyter kernel.
    cwd : path, optional
        The kernel's working directory (default: the notebook's folder, so that relative paths in
        the notebook mean the same as when it is opened in Jupyter).
    cell_timeout, notebook_timeout : float, optional
        Seconds one cell, and the whole execution (kernel start included), may take; ``None``: the
        notebook's defaults (:func:`default_timeouts`). Past either, the kernel and its children
        are killed and :class:`NotebookTimeoutError` is raised.
    start_timeout : float
        Seconds to wait for the kernel to start.
    start_retries : int
        How many more times a kernel that fails to start is started again (on TCP).
    ipc : bool
        Talk to the kernel over IPC sockets (no TCP ports, hence no port races); on by default.

    Raises
    ------
    papermill.PapermillExecutionError
        A cell raised: papermill's error (cell index, source, exception), unchanged.
    NotebookTimeoutError
        A timeout struck.
    """
    notebook = Path(notebook).resolve()
    if not notebook.is_file():
        raise ValueError(f"notebook={str(notebook)!r} does not exist")
    out = None if output is None else str(Path(output).resolve())
    cell_s, total_s = _resolve_timeouts(notebook, cell_timeout, notebook_timeout)
    kernel_cwd = str(Path(cwd).resolve() if cwd is not None else notebook.parent)
    deadline = time.monotonic() + total_s
    attempt = 0
    while True:
        # a kernel that failed to start on IPC sockets is tried again on TCP
        execution = _Execution(use_ipc=ipc and attempt == 0,
                               kernel_log=None if out is None else Path(out).with_suffix(".kernel.log"))
        try:
            return _run_once(execution, notebook, out, dict(parameters or {}), kernel_name,
                             kernel_cwd, cell_s, total_s, deadline, start_timeout, progress_bar,
                             log_output)
        except NotebookTimeoutError:
            raise
        except Exception as err:
            # a kernel that never got to run a cell (did not start, died at start): start another
            import papermill as pm

            if (execution.cells_started or attempt >= start_retries or execution.stopped
                    or time.monotonic() > deadline or isinstance(err, pm.PapermillExecutionError)):
                raise
            attempt += 1
        finally:
            execution.cleanup()


def _run_once(execution: _Execution, notebook: Path, out: str | None, parameters: dict,
              kernel_name: str, kernel_cwd: str, cell_s: float, total_s: float, deadline: float,
              start_timeout: float, progress_bar: bool, log_output: bool) -> Any:
    import papermill as pm
    from nbclient.exceptions import CellTimeoutError

    result: dict[str, Any] = {}
    started = time.monotonic()

    def target() -> None:
        try:
            result["nb"] = pm.execute_notebook(
                str(notebook), out, parameters=parameters, kernel_name=kernel_name,
                progress_bar=progress_bar, log_output=log_output,
                start_timeout=int(math.ceil(start_timeout)),
                execution_timeout=int(math.ceil(cell_s)),  # nbclient wants whole seconds
                # the kernel's cwd, without papermill's process-wide os.chdir (cwd=...)
                resources={"metadata": {"path": kernel_cwd}},
                kernel_manager_class=execution.manager_class(),
                on_cell_start=execution.on_cell_start,
                on_cell_execute=execution.on_cell_execute,
                on_cell_executed=execution.on_cell_executed,
            )
        except BaseException as err:  # handed to the calling thread
            result["error"] = err
        finally:
            try:
                execution.finish()
            except Exception:  # pragma: no cover - closing the loop must not hide the result
                pass

    thread = threading.Thread(target=target, name=f"papermill {notebook.name}", daemon=True)
    thread.start()
    try:
        while thread.is_alive() and time.monotonic() < deadline:  # slices: Ctrl-C is seen at once
            thread.join(min(1.0, max(0.0, deadline - time.monotonic())))
    except BaseException:  # Ctrl-C, or SIGTERM turned into an exception: take the kernel along
        execution.stopped = True
        execution.kill_kernel()
        thread.join(_KILL_WAIT_S)
        raise
    if thread.is_alive():  # the overall guard: papermill is stuck or the notebook is too slow
        execution.stopped = True
        execution.kill_kernel()
        thread.join(_KILL_WAIT_S)
        running = execution.cells_started > 0
        raise NotebookTimeoutError(
            str(notebook), "notebook", total_s, execution.cell_index if running else None,
            execution.cell_source if running else None, time.monotonic() - started, out,
        ) from result.get("error")
    err = result.get("error")
    if isinstance(err, CellTimeoutError) and "Cell execution timed out" in str(err):
        raise NotebookTimeoutError(
            str(notebook), "cell", cell_s, execution.cell_index, execution.cell_source,
            time.monotonic() - execution.cell_started, out,
        ) from err
    if err is not None:
        raise err
    return result["nb"]


def _positive_seconds(text: str) -> float:
    import argparse

    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"expected a positive number of seconds, got {text!r}")
    return value


def add_timeout_flags(parser: Any, legacy_timeout_flag: bool = False) -> None:
    """Add ``--cell-timeout SECONDS`` and ``--notebook-timeout SECONDS`` (dests ``cell_timeout``,
    ``notebook_timeout``; default ``None``: each notebook's own) to an argparse parser.
    ``legacy_timeout_flag`` also accepts ``--timeout`` for ``--cell-timeout``."""
    shown = ", ".join(f"{name} {c / 60:g}/{t / 60:g} min" for name, (c, t) in DEFAULT_TIMEOUTS.items())
    flags = ["--cell-timeout", "--timeout"] if legacy_timeout_flag else ["--cell-timeout"]
    parser.add_argument(
        *flags, dest="cell_timeout", type=_positive_seconds, default=None, metavar="SECONDS",
        help="stop a notebook whose cell runs longer than this (default: per notebook, "
             f"cell/notebook: {shown}; others {FALLBACK_TIMEOUTS[0] / 60:g}/"
             f"{FALLBACK_TIMEOUTS[1] / 60:g} min)")
    parser.add_argument(
        "--notebook-timeout", dest="notebook_timeout", type=_positive_seconds, default=None,
        metavar="SECONDS", help="stop a notebook that runs longer than this in all, kernel start "
                                "included (default: per notebook, see --cell-timeout)")


def kill_processes(procs: list) -> None:
    """Kill ``procs`` (``psutil.Process`` objects; ones already gone are skipped) and wait up to
    10 s for them to end."""
    import psutil

    for proc in procs:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(procs, timeout=10)
