"""Run a notebook over a grid of parameters with papermill, and collect the results into one table.

A *grid* maps parameter names to values. A list of values is one axis; a scalar is held fixed; the
points are the Cartesian product of the axes. A list of such mappings is the union of their products,
which is how an ablation says "baseline for every seed, and SSR for every seed and gamma"::

    # grid.yaml
    - {ssr: false, seed: [0, 1, 2]}
    - {ssr: true, ssr_weight: [0.4, 0.8], seed: [0, 1, 2]}

Each point gets its own directory ``OUT/<point>/`` holding

- ``params.json``       the point's parameters,
- ``notebook.ipynb``    the executed notebook (kept on failure too: it shows where it stopped),
- ``run/``              the notebook's run directory (passed as the parameter ``run_dir``),
- ``status.json``       ``{"status": "ok" | "failed", "error": ..., "seconds": ...}``.

Points run in parallel (``jobs`` worker processes, each driving one Jupyter kernel through
:func:`dmlnb.execute.run_notebook`, with its per-cell and overall timeouts). A failed point is
recorded with its error and the others go on.

Re-running the same sweep never throws work away:

- a point whose ``status.json`` says ``ok`` is skipped;
- a point that was **interrupted** (the sweep was stopped or killed while it ran, so it has no
  status; or its worker process died) is **resumed** in place when the notebook has a ``resume``
  parameter (``02_train`` has) and its run directory holds a run: the notebook runs again with
  ``resume=True`` and continues from the run's last checkpoint (a run that already finished is
  reused). The executed notebook of the interrupted attempt is kept as
  ``notebook.interrupted-<n>.ipynb``. An interrupted point that cannot be resumed is moved aside;
- a **failed** point's directory is moved aside to ``OUT/<point>.failed-<n>/`` (its notebook,
  run, checkpoints and ``status.json`` with the error, as they were) and the point is run again
  in a fresh directory. Nothing is deleted.

:func:`collect` reads every point back into a :class:`pandas.DataFrame` — one row per point: its
parameters, status, error and the scalars of its run's ``summary.json`` — and writes it to
``OUT/results.csv`` (directories set aside are not rows).

Command line: ``dmlnb sweep NOTEBOOK --grid grid.yaml --out DIR --jobs N``.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import math
import os
import re
import time
import traceback
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import pandas as pd

from dmlnb._validate import check_positive_int
from dmlnb.execute import (
    DEFAULT_KERNEL,
    NotebookTimeoutError,
    add_timeout_flags,
    kill_processes,
    run_notebook,
)
from dmlnb.runs import write_json

__all__ = [
    "add_parser",
    "collect",
    "expand_grid",
    "load_grid",
    "point_name",
    "run_sweep",
    "setting_labels",
    "summarize",
    "varied_parameters",
]

PARAMS_FILE = "params.json"
STATUS_FILE = "status.json"
NOTEBOOK_FILE = "notebook.ipynb"
RUN_SUBDIR = "run"
RESULTS_FILE = "results.csv"
_META_COLUMNS = ("point", "status", "error", "seconds")


# --- grids ---------------------------------------------------------------------------------------
def load_grid(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Read a grid from a YAML (or JSON) file and expand it with :func:`expand_grid`."""
    import yaml

    text = Path(path).read_text()
    try:
        grid = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ValueError(f"grid file {str(path)!r} is not valid YAML: {err}") from err
    return expand_grid(grid)


def expand_grid(grid: Mapping[str, Any] | Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Expand a grid into its list of points (dicts of parameter values), without duplicates.

    Parameters
    ----------
    grid : mapping or list of mappings
        ``{name: value | [values]}``: lists are axes of a Cartesian product, scalars are fixed.
        A list of such mappings gives the union of their products, in order. An empty list as an
        axis is an error (it would silently give no points).

    Returns
    -------
    list of dict
        One dict per point, keys in the order they were written; a point that appears twice is
        kept once.
    """
    blocks = [grid] if isinstance(grid, Mapping) else grid
    if not isinstance(blocks, Sequence) or isinstance(blocks, (str, bytes)):
        raise TypeError(
            f"grid must be a mapping of parameter names to values, or a list of such mappings; "
            f"got {type(grid).__name__}"
        )
    points: list[dict[str, Any]] = []
    seen: set[str] = set()
    for i, block in enumerate(blocks):
        if not isinstance(block, Mapping):
            raise TypeError(f"grid entry {i} must be a mapping of names to values, got {block!r}")
        names, axes = [], []
        for name, value in block.items():
            if not isinstance(name, str) or not name.isidentifier():
                raise ValueError(f"grid parameter name {name!r} is not a valid Python identifier")
            values = list(value) if isinstance(value, (list, tuple)) else [value]
            if not values:
                raise ValueError(f"grid parameter {name!r} has an empty list of values")
            names.append(name)
            axes.append(values)
        for combo in itertools.product(*axes):
            point = dict(zip(names, combo, strict=True))
            key = _canonical(point)
            if key not in seen:
                seen.add(key)
                points.append(point)
    if not points:
        raise ValueError("grid is empty: it defines no point")
    return points


def _canonical(params: Mapping[str, Any]) -> str:
    return json.dumps(params, sort_keys=True, default=str)


def point_digest(params: Mapping[str, Any]) -> str:
    """A point's identity: the first 8 hex digits of the SHA-1 of its canonical JSON (the same
    parameters always give the same digest, whatever grid they came from)."""
    return hashlib.sha1(_canonical(params).encode()).hexdigest()[:8]


def digest_of_name(name: str) -> str:
    """The digest a point's directory name ends with (:func:`point_name`)."""
    return str(name).rsplit("-", 1)[-1]


def point_name(params: Mapping[str, Any], max_len: int = 80, digest: str | None = None) -> str:
    """A readable, unique directory name for a point: ``ssr=True,seed=0-1a2b3c4d``.

    The readable part (parameter ``name=value`` pairs, file-name-safe, cut at ``max_len``) is
    followed by ``digest``, by default the first 8 hex digits of the SHA-1 of the point's
    canonical JSON, so two points never share a directory and the same point always gets the
    same one (:func:`point_names` names a grid's points by what varies).
    """
    readable = ",".join(f"{k}={v}" for k, v in params.items())
    readable = re.sub(r"[^A-Za-z0-9=,._+-]+", "_", readable)[:max_len].strip("_") or "point"
    digest = digest or point_digest(params)
    return f"{readable}-{digest}"


def point_names(points: Sequence[Mapping[str, Any]], existing: Iterable[str] = ()) -> list[str]:
    """Directory names of a grid's points, named by what varies across them.

    The readable part lists only the parameters that take more than one value in the grid
    (the rest are in each point's ``params.json``), e.g. ``ssr=True,seed=1-1a2b3c4d``; the
    digest of the point's full parameters keeps names unique and stable. A point whose digest
    already names a folder in ``existing`` (an earlier sweep of a smaller grid) keeps that
    folder's name, so re-runs find their finished points whatever the grid grew to.
    """
    varying = [k for k in dict.fromkeys(k for p in points for k in p)
               if len({_canonical({"v": p.get(k)}) for p in points}) > 1]
    by_digest = {digest_of_name(n): n for n in existing if "-" in n}
    names = []
    for params in points:
        digest = point_digest(params)
        shown = {k: params[k] for k in varying if k in params}
        names.append(by_digest.get(digest) or point_name(shown, digest=digest))
    return names


# --- running -------------------------------------------------------------------------------------
def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _is_done(point_dir: Path) -> bool:
    status = _read_json(point_dir / STATUS_FILE)
    return isinstance(status, dict) and status.get("status") == "ok"


#: directories a re-run set aside: ``<point>.failed-<n>`` / ``<point>.interrupted-<n>``
_ASIDE = re.compile(r"-[0-9a-f]{8}\.(failed|interrupted)-\d+$")


def _point_state(pdir: Path) -> str:
    """``"new"`` (absent, or never started), ``"done"``, ``"failed"`` or ``"interrupted"``."""
    if not pdir.is_dir():
        return "new"
    status = _read_json(pdir / STATUS_FILE)
    if isinstance(status, dict) and status.get("status") == "ok":
        return "done"
    if isinstance(status, dict) and status.get("status") == "failed":
        return "interrupted" if status.get("interrupted") else "failed"
    if any(p.name != PARAMS_FILE for p in pdir.iterdir()):
        return "interrupted"  # started, never finished: the sweep was stopped or killed
    return "new"


def _free_name(path: Path, tag: str) -> Path:
    """``path`` with ``.<tag>-<n>`` appended (before the suffix of a file), n the first unused."""
    n = 1
    while True:
        name = (f"{path.stem}.{tag}-{n}{path.suffix}" if path.suffix and path.is_file()
                else f"{path.name}.{tag}-{n}")
        candidate = path.with_name(name)
        if not candidate.exists():
            return candidate
        n += 1


def _set_aside(path: Path, tag: str) -> Path:
    target = _free_name(path, tag)
    os.rename(path, target)  # same directory: atomic, nothing copied, nothing lost
    return target


def _notebook_parameters(notebook: Path) -> set[str]:
    """The names in the notebook's ``parameters`` cell (empty if it cannot be read)."""
    try:
        import papermill as pm

        return set(pm.inspect_notebook(str(notebook)))
    except Exception:
        return set()


def _prepare_point(out: Path, name: str, params: dict[str, Any], run_dir_param: str | None,
                   resume_param: str | None) -> tuple[bool, list[str]] | None:
    """Make ``OUT/<name>`` ready to run; ``None`` if the point is done.

    Returns ``(resume, kept)``: whether to run it with ``resume_param=True`` (an interrupted
    point whose run can continue) and the names of what earlier attempts left, set aside."""
    from dmlnb import runs

    pdir = out / name
    state = _point_state(pdir)
    if state == "done":
        return None
    kept: list[str] = []
    resume = False
    if state == "failed":
        kept.append(_set_aside(pdir, "failed").name)  # the error and the partial run stay there
    elif state == "interrupted":
        run = pdir / RUN_SUBDIR
        run_used = run.is_dir() and any(run.iterdir())
        if resume_param and run_dir_param and (not run_used or runs.is_run(run)):
            resume = run_used
            for leftover in (pdir / NOTEBOOK_FILE, pdir / STATUS_FILE):
                if leftover.exists():
                    kept.append(_set_aside(leftover, "interrupted").name)
        else:  # nothing this notebook can continue: keep it all, start afresh
            kept.append(_set_aside(pdir, "interrupted").name)
    pdir.mkdir(parents=True, exist_ok=True)
    write_json(pdir / PARAMS_FILE, params)
    return resume, kept


def _run_point(
    notebook: str,
    point_dir: str,
    params: dict[str, Any],
    kernel_name: str,
    run_dir_param: str | None,
    threads: int | None,
    cell_timeout: float | None,
    notebook_timeout: float | None,
    resume_param: str | None = None,
    kept: list[str] | None = None,
) -> dict[str, Any]:
    """Execute one point (in a worker process); never raises an Exception, returns its status
    record (an interruption, KeyboardInterrupt, propagates and leaves the point without status)."""
    import papermill as pm

    if threads is not None:  # the kernel inherits this process's environment
        for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS"):
            os.environ[var] = str(threads)
    pdir = Path(point_dir)
    inject = dict(params)
    if run_dir_param:
        inject[run_dir_param] = str((pdir / RUN_SUBDIR).resolve())
    if resume_param:
        inject[resume_param] = True
    start = time.perf_counter()
    status: dict[str, Any] = {"status": "ok", "error": None}
    try:
        run_notebook(
            notebook,
            pdir / NOTEBOOK_FILE,
            inject,
            kernel_name=kernel_name,
            cwd=Path(notebook).resolve().parent,
            cell_timeout=cell_timeout,
            notebook_timeout=notebook_timeout,
        )
    except pm.PapermillExecutionError as err:
        status = {"status": "failed", "error": f"{err.ename}: {err.evalue}".strip()}
    except NotebookTimeoutError as err:
        status = {"status": "failed", "error": f"NotebookTimeoutError: {err}", "timeout": err.scope}
    except Exception as err:  # a kernel that dies, a bad notebook: recorded, the sweep goes on
        status = {
            "status": "failed",
            "error": f"{type(err).__name__}: {err}",
            "traceback": traceback.format_exc(limit=5),
        }
    status["seconds"] = round(time.perf_counter() - start, 3)
    if resume_param:
        status["resumed"] = True
    if kept:
        status["earlier_attempts"] = list(kept)
    write_json(pdir / STATUS_FILE, status)
    return status


def run_sweep(
    notebook: str | os.PathLike,
    grid: Mapping[str, Any] | Sequence[Mapping[str, Any]] | str | os.PathLike,
    out: str | os.PathLike,
    jobs: int = 1,
    *,
    kernel_name: str = DEFAULT_KERNEL,
    run_dir_param: str | None = "run_dir",
    resume_param: str | None = "resume",
    threads_per_job: int | None = None,
    cell_timeout: float | None = None,
    notebook_timeout: float | None = None,
    timeout: float | None = None,
    progress: bool = True,
) -> pd.DataFrame:
    """Execute ``notebook`` once per grid point with papermill and return :func:`collect` ``(out)``.

    Parameters
    ----------
    notebook : path
        The notebook to execute (its first code cell tagged ``parameters``).
    grid : mapping, list of mappings, or path to a YAML/JSON file
        See :func:`expand_grid`.
    out : path
        The sweep directory; one sub-directory per point (see the module docstring).
    jobs : int, default 1
        Points executed at the same time, each in its own worker process and kernel.
    kernel_name : str, default "python3"
        The Jupyter kernel papermill starts.
    run_dir_param : str or None, default "run_dir"
        The notebook parameter that receives the point's run directory ``OUT/<point>/run``;
        ``None`` injects nothing.
    resume_param : str or None, default "resume"
        The notebook parameter set to ``True`` to continue an interrupted point's run (used only
        if the notebook's parameters cell has it); ``None``: interrupted points are moved aside
        and run afresh instead.
    threads_per_job : int, optional
        ``OMP_NUM_THREADS`` for each kernel; default ``max(1, os.cpu_count() // jobs)`` so that
        parallel points do not oversubscribe the cores.
    cell_timeout, notebook_timeout : float, optional
        Seconds one cell, and one point's whole execution, may take before its kernel is stopped
        and the point recorded as failed (:func:`dmlnb.execute.run_notebook`); default: the
        notebook's (:data:`dmlnb.execute.DEFAULT_TIMEOUTS`).
    timeout : float, optional
        The former name of ``cell_timeout``, still accepted.
    progress : bool, default True
        Print one line per finished point.

    Returns
    -------
    pandas.DataFrame
        :func:`collect` of ``out`` after the sweep; also written to ``OUT/results.csv``.
    """
    notebook = Path(notebook)
    if not notebook.is_file():
        raise ValueError(f"notebook={str(notebook)!r} does not exist")
    jobs = check_positive_int("jobs", jobs)
    if cell_timeout is None:
        cell_timeout = timeout
    points = load_grid(grid) if isinstance(grid, (str, os.PathLike)) else expand_grid(grid)
    if run_dir_param and any(run_dir_param in p for p in points):
        raise ValueError(
            f"grid sets {run_dir_param!r}, which the sweep sets itself (one run directory per point)"
        )
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if threads_per_job is None:
        threads_per_job = max(1, (os.cpu_count() or 1) // jobs)
    if resume_param and resume_param not in _notebook_parameters(notebook):
        resume_param = None  # this notebook cannot continue a run: interrupted points start afresh

    todo: list[tuple[str, dict[str, Any], bool, list[str]]] = []
    names = point_names(points, existing=[p.name for p in out.iterdir() if p.is_dir()])
    for params, name in zip(points, names, strict=True):
        prepared = _prepare_point(out, name, params, run_dir_param, resume_param)
        if prepared is not None:
            todo.append((name, params, *prepared))
    if progress:
        n_resumed = sum(1 for t in todo if t[2])
        n_aside = sum(len(t[3]) for t in todo)
        print(f"sweep: {len(points)} points, {len(points) - len(todo)} already done, "
              f"{len(todo)} to run with {jobs} job(s)"
              + (f" ({n_resumed} resumed from their checkpoints)" if n_resumed else "")
              + (f"; {n_aside} earlier attempt(s) kept aside" if n_aside else ""), flush=True)

    args = [
        (str(notebook), str(out / name), params, kernel_name, run_dir_param, threads_per_job,
         cell_timeout, notebook_timeout, resume_param if resume else None, kept)
        for name, params, resume, kept in todo
    ]

    def report(i: int, name: str, status: dict[str, Any]) -> None:
        if progress:
            msg = status["status"] + (f" ({status['error']})" if status.get("error") else "")
            how = " (resumed)" if status.get("resumed") else ""
            print(f"sweep: [{i}/{len(todo)}] {name}{how}: {msg} in {status['seconds']:.1f} s",
                  flush=True)

    previous = _raise_on_sigterm()  # SIGTERM stops the kernels too; the points stay resumable
    try:
        if jobs == 1 or len(todo) <= 1:
            for i, a in enumerate(args, 1):
                report(i, Path(a[1]).name, _run_point(*a))
        else:
            _run_parallel(args, jobs, out, report)
    finally:
        _restore_sigterm(previous)
    return collect(out)


def _run_parallel(args: list[tuple], jobs: int, out: Path, report) -> None:
    # spawn: workers start clean (no forked torch/zmq state); each only drives papermill
    pool = ProcessPoolExecutor(max_workers=jobs, mp_context=get_context("spawn"))
    try:
        futures = {pool.submit(_run_point, *a): Path(a[1]).name for a in args}
        for i, fut in enumerate(as_completed(futures), 1):
            name = futures[fut]
            try:
                status = fut.result()
            except Exception as err:  # the worker process itself died (it, or one beside it)
                status = {"status": "failed", "error": f"{type(err).__name__}: {err}",
                          "seconds": math.nan, "interrupted": True}  # resumed by the next run
                write_json(out / name / STATUS_FILE, status)
            report(i, name, status)
    except BaseException:
        # interrupted (Ctrl-C, SIGTERM): stop the workers *and their kernels*, so that nothing
        # keeps writing into the sweep; unfinished points are resumed by the next call
        _kill_workers(pool)
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _raise_on_sigterm():
    """Turn SIGTERM into KeyboardInterrupt while a parallel sweep runs (main thread only)."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return None

    def handler(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    return signal.signal(signal.SIGTERM, handler)


def _restore_sigterm(previous) -> None:
    import signal

    if previous is not None:
        signal.signal(signal.SIGTERM, previous)


def _kill_workers(pool: ProcessPoolExecutor) -> None:
    """Kill the pool's worker processes and everything they started (papermill's kernels)."""
    import psutil

    procs = []
    for worker in list(getattr(pool, "_processes", {}).values()):
        try:
            parent = psutil.Process(worker.pid)
            procs += parent.children(recursive=True) + [parent]
        except psutil.NoSuchProcess:
            continue
    kill_processes(procs)


# --- collecting ----------------------------------------------------------------------------------
def _flatten(obj: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dicts -> ``{"a/b": scalar}`` (the column convention of :func:`dmlnb.runs.runs_table`:
    ``test/map@r``); lists of scalars are kept only if short (as JSON)."""
    flat: dict[str, Any] = {}
    for key, value in obj.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(_flatten(value, name + "/"))
        elif isinstance(value, (list, tuple)):
            if len(value) <= 8 and all(isinstance(v, (int, float, str, bool)) for v in value):
                flat[name] = json.dumps(value)
        else:
            flat[name] = value
    return flat


def _find_summary(point_dir: Path) -> Path | None:
    direct = point_dir / RUN_SUBDIR / "summary.json"
    if direct.is_file():
        return direct
    found = sorted(point_dir.rglob("summary.json"))
    return found[0] if found else None


SUMMARY_SKIP = ("config", "run_dir", "versions")  # summary.json parts that are not results


def collect(out: str | os.PathLike, write: bool = True) -> pd.DataFrame:
    """Gather every point of the sweep in ``out`` into one table.

    Columns: ``point``, ``status`` (``ok``, ``failed`` or ``pending``), ``error``, ``seconds``,
    then the point's parameters, then the scalars of its run's ``summary.json`` (nested keys
    joined with ``/`` as in :func:`dmlnb.runs.runs_table`; a metric that collides with a parameter
    name gets the prefix ``summary/``;
    the keys in :data:`SUMMARY_SKIP` are left out: the point's parameters already say them).
    Rows are sorted by point name; the directories of earlier attempts that a re-run set aside
    (``<point>.failed-<n>``, ``<point>.interrupted-<n>``) are not rows. With ``write=True`` the
    table is also written to ``OUT/results.csv``.
    """
    out = Path(out)
    if not out.is_dir():
        raise ValueError(f"out={str(out)!r} is not a sweep directory")
    rows: list[dict[str, Any]] = []
    param_cols: list[str] = []
    metric_cols: list[str] = []
    for pdir in sorted(p for p in out.iterdir()
                       if (p / PARAMS_FILE).is_file() and not _ASIDE.search(p.name)):
        params = _read_json(pdir / PARAMS_FILE) or {}
        status = _read_json(pdir / STATUS_FILE) or {"status": "pending"}
        row: dict[str, Any] = {
            "point": pdir.name,
            "status": status.get("status", "pending"),
            "error": status.get("error"),
            "seconds": status.get("seconds"),
        }
        for k, v in params.items():
            if k not in param_cols:
                param_cols.append(k)
            row[k] = v
        summary_path = _find_summary(pdir)
        summary = _read_json(summary_path) if summary_path else None
        if isinstance(summary, Mapping):
            kept = {k: v for k, v in summary.items() if k not in SUMMARY_SKIP}
            for k, v in _flatten(kept).items():
                col = k if k not in params and k not in _META_COLUMNS else f"summary/{k}"
                if col not in metric_cols:
                    metric_cols.append(col)
                row[col] = v
        rows.append(row)
    columns = list(_META_COLUMNS) + param_cols + [c for c in metric_cols if c not in param_cols]
    table = pd.DataFrame(rows, columns=columns)
    table.attrs["parameters"] = list(param_cols)
    if write:
        table.to_csv(out / RESULTS_FILE, index=False)
    return table


def varied_parameters(table: pd.DataFrame, exclude: Iterable[str] = ("seed",)) -> list[str]:
    """The parameters (``table.attrs["parameters"]`` from :func:`collect`) that take more than one
    value across the points, minus ``exclude``: the columns that define a *setting*."""
    params = table.attrs.get("parameters") or []
    exclude = set(exclude)
    return [c for c in params if c not in exclude and table[c].astype(str).nunique(dropna=False) > 1]


def setting_labels(table: pd.DataFrame, by: Sequence[str]) -> pd.Series:
    """One readable label per row, ``"ssr=True, ssr_weight=0.4"``, from the columns ``by``
    (a parameter missing from a point, NaN, is left out of its label)."""
    def label(row: pd.Series) -> str:
        parts = [f"{c}={row[c]}" for c in by if not (isinstance(row[c], float) and math.isnan(row[c]))]
        return ", ".join(parts) or "all"

    return table.apply(label, axis=1) if len(table) else pd.Series([], dtype=str)


def summarize(
    table: pd.DataFrame,
    by: Iterable[str],
    metrics: Iterable[str],
) -> pd.DataFrame:
    """Mean, standard deviation (ddof=1) and count of ``metrics`` over the ok rows of each group.

    ``by`` names the parameters that define a setting (everything but the seed, typically).
    Returns one row per setting with columns ``<metric>_mean``, ``<metric>_std``, and ``n``.
    """
    by, metrics = list(by), list(metrics)
    missing = [c for c in by + metrics if c not in table.columns]
    if missing:
        raise ValueError(
            f"columns {missing} are not in the table; available: {', '.join(map(str, table.columns))}"
        )
    ok = table[table["status"] == "ok"] if "status" in table.columns else table
    keys = [ok[c].astype(str) for c in by] if by else [pd.Series("all", index=ok.index)]
    grouped = ok.groupby(keys, sort=False, dropna=False)[metrics]
    stats = grouped.agg(["mean", "std"])
    stats.columns = [f"{m}_{s}" for m, s in stats.columns]
    stats["n"] = grouped.size()
    return stats.reset_index(names=by or ["setting"])


# --- command line --------------------------------------------------------------------------------
def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``dmlnb sweep NOTEBOOK --grid grid.yaml --out DIR --jobs N``; sets ``func``."""
    p = subparsers.add_parser(
        "sweep",
        help="run a notebook over a parameter grid with papermill",
        description=(
            "Execute NOTEBOOK once per point of the grid (papermill), JOBS at a time; one directory "
            "per point under OUT with the executed notebook and its run; points already done are "
            "skipped, interrupted ones resumed from their checkpoints, failed ones moved aside to "
            "OUT/<point>.failed-<n> and run again; failures are recorded with their error. "
            "Writes OUT/results.csv."
        ),
    )
    p.add_argument("notebook", help="the notebook to execute (first code cell tagged 'parameters')")
    p.add_argument("--grid", required=True,
                   help="YAML file: {name: value or [values]} or a list of such mappings")
    p.add_argument("--out", required=True, help="sweep directory")
    p.add_argument("--jobs", type=int, default=1, help="points run at the same time (default 1)")
    p.add_argument("--kernel", default=DEFAULT_KERNEL, help=f"Jupyter kernel (default {DEFAULT_KERNEL})")
    p.add_argument("--run-dir-param", default="run_dir",
                   help="notebook parameter receiving each point's run directory ('' for none)")
    add_timeout_flags(p, legacy_timeout_flag=True)
    p.set_defaults(func=_main)
    return p


def _main(args: argparse.Namespace) -> int:
    table = run_sweep(
        args.notebook,
        args.grid,
        args.out,
        jobs=args.jobs,
        kernel_name=args.kernel,
        run_dir_param=args.run_dir_param or None,
        cell_timeout=args.cell_timeout,
        notebook_timeout=args.notebook_timeout,
    )
    n_failed = int((table["status"] != "ok").sum())
    print(f"sweep: {len(table) - n_failed} ok, {n_failed} failed; table: "
          f"{Path(args.out) / RESULTS_FILE}")
    return 1 if n_failed else 0
