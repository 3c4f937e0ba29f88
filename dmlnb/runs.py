"""Run directories: create, write atomically, load, list.

A run directory describes itself::

    RUN_DIR/
      config.json        the full TrainConfig (every setting, defaults included)
      metrics.jsonl      one JSON object per line: kind = "step" | "epoch" | "val" | "test_curve" | "test"
      checkpoints/
        last.pt          model, loss, optimiser, scheduler, sampler position, RNG states
        best.pt          model (and loss) weights of the best validation epoch
      embeddings.npz     final test evaluation: embeddings, labels, indices
      summary.json       config, best epoch, val and test metrics, seed, wall time, versions

Everything a notebook or a sweep needs is read back through :func:`load_run` (never by parsing
printed logs). Every JSON file and checkpoint is written to a temporary file in the same folder
and then renamed over the target (:func:`os.replace`), so a crash leaves the old file or the new
one, never half of one. Checkpoints hold only tensors and plain Python values and load with
``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import json
import os
import secrets
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pandas as pd

    from dmlnb.config import TrainConfig

CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
EMBEDDINGS_FILE = "embeddings.npz"
CHECKPOINT_DIR = "checkpoints"
LAST_CHECKPOINT = "last.pt"
BEST_CHECKPOINT = "best.pt"


class RunExistsError(FileExistsError):
    """A run directory already holds a run, and ``resume`` was not asked for."""


# --- atomic writes -------------------------------------------------------------------------------
def _atomic(path: Path, write: Callable[[IO[bytes]], Any]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return path


def write_json(path: str | Path, obj: Any) -> Path:
    """Write ``obj`` as indented JSON to ``path`` atomically (temp file + rename); numpy and
    torch scalars and arrays become numbers and lists, anything else JSON cannot hold its
    ``str``."""
    data = (json.dumps(_jsonable(obj), indent=2, default=str) + "\n").encode("utf-8")
    return _atomic(Path(path), lambda fh: fh.write(data))


def write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` to ``path`` atomically."""
    return write_bytes(path, text.encode("utf-8"))


def write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (temp file + rename; parent folders made)."""
    return _atomic(Path(path), lambda fh: fh.write(data))


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> Path:
    """``torch.save(state)`` to ``path`` atomically. ``state`` must hold only tensors and plain
    Python containers/values so that :func:`load_checkpoint` can use ``weights_only=True``."""
    import torch

    return _atomic(Path(path), lambda fh: torch.save(state, fh))


class CorruptCheckpointError(ValueError):
    """A checkpoint file cannot be read (truncated, empty, or not a checkpoint)."""


def load_checkpoint(path: str | Path, map_location: Any = "cpu") -> dict[str, Any]:
    """Load a checkpoint with ``torch.load(weights_only=True)``.

    A file that cannot be read (zero bytes, truncated by a crash outside :func:`save_checkpoint`,
    or anything else than a checkpoint) raises :class:`CorruptCheckpointError` naming it.
    """
    import pickle
    import zipfile

    import torch

    path = Path(path)
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise
    except (RuntimeError, EOFError, OSError, pickle.UnpicklingError, zipfile.BadZipFile,
            ValueError, KeyError) as err:
        size = path.stat().st_size if path.exists() else 0
        raise CorruptCheckpointError(
            f"the checkpoint {str(path)!r} ({size} bytes) cannot be read: "
            f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}. Move it "
            f"aside and resume from the other checkpoint of the run (last.pt or best.pt), or "
            f"start a new run"
        ) from None
    if not isinstance(state, dict):
        raise CorruptCheckpointError(f"the checkpoint {str(path)!r} holds a "
                                     f"{type(state).__name__}, not a dmlnb checkpoint")
    return state


def save_npz(path: str | Path, **arrays: Any) -> Path:
    """``numpy.savez`` to ``path`` atomically."""
    import numpy as np

    return _atomic(Path(path), lambda fh: np.savez(fh, **arrays))


def append_jsonl(path: str | Path, record: dict[str, Any]) -> None:
    """Append one JSON line (flushed) to ``path``."""
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(_jsonable(record)) + "\n")
        fh.flush()


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """All records of a JSON-lines file; a torn last line (crash while writing) is ignored."""
    path = Path(path)
    if not path.exists():
        return []
    out = []
    lines = path.read_text(encoding="utf-8").splitlines()
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            if i == len(lines) - 1:
                break
            raise
    return out


def truncate_metrics(run_dir: str | Path, step: int) -> None:
    """Drop records logged after global step ``step``, and any ``test`` record (used on resume,
    so that the resumed run's log equals an uninterrupted one: a run that is resumed has no
    summary, so a test record there was left by a crash before the summary was written)."""
    path = Path(run_dir) / METRICS_FILE
    keep = [r for r in read_jsonl(path) if r.get("step", 0) <= step and r.get("kind") != "test"]
    write_text(path, "".join(json.dumps(r) + "\n" for r in keep))


def _jsonable(obj: Any) -> Any:
    """numpy / torch scalars and paths -> plain JSON values; NaN kept as JSON's NaN."""
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "item") and callable(obj.item) and getattr(obj, "ndim", 1) == 0:
        return obj.item()
    if hasattr(obj, "tolist") and callable(obj.tolist):
        return obj.tolist()
    return obj


# --- creating ------------------------------------------------------------------------------------
def default_run_name(config: TrainConfig) -> str:
    """``YYYYmmdd-HHMMSS-<dataset>-<loss>-<ssr|base>-s<seed>-<6 hex>``: sortable and unique."""
    tag = "ssr" if config.ssr else "base"
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return f"{stamp}-{config.dataset}-{config.loss}-{tag}-s{config.seed}-{secrets.token_hex(3)}"


def is_run(path: str | Path) -> bool:
    """Whether ``path`` holds a run (a config.json)."""
    return (Path(path) / CONFIG_FILE).is_file()


LOCK_FILE = ".lock"


def refuse_existing(path: str | Path) -> None:
    """Raise :class:`RunExistsError` for a run directory that ``resume`` was not asked for."""
    raise RunExistsError(
        f"run_dir {str(path)!r} already exists and is not empty; pass resume=True to "
        f"continue that run, or choose another run_dir (or run_dir=None for a new one)"
    )


def _contents(path: Path) -> list[Path]:
    return [p for p in path.iterdir() if p.name != LOCK_FILE]


def check_new_run_dir(path: str | Path, resume: bool) -> None:
    """Refuse ``path`` as a run directory unless it is absent, empty (a left-over lock file
    counts as empty) or, with ``resume``, a run: a file, or a folder holding anything that is
    not a run, is never written into."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise RunExistsError(f"run_dir {str(path)!r} exists and is not a directory")
    if path.is_dir() and _contents(path):
        if not resume:
            refuse_existing(path)
        if is_run(path):
            return
        raise RunExistsError(
            f"run_dir {str(path)!r} is not empty and holds no run ({CONFIG_FILE} missing); "
            f"refusing to write into it"
        )


def create_run_dir(config: TrainConfig) -> Path:
    """Make the run directory of ``config`` (a :class:`~dmlnb.config.TrainConfig`).

    ``config.run_dir`` ``None``: a new unique folder under ``config.runs_root``. A given
    ``run_dir`` that already holds anything is refused (:class:`RunExistsError` naming it) unless
    ``config.resume`` is true and it holds a run; with ``resume`` an absent or empty folder
    starts a fresh run there.
    """
    if config.run_dir is None:
        root = Path(config.runs_root)
        root.mkdir(parents=True, exist_ok=True)
        for _ in range(100):
            path = root / default_run_name(config)
            try:
                path.mkdir()
                return path
            except FileExistsError:
                continue
        raise RunExistsError(f"could not make a unique run directory under {root}")  # pragma: no cover
    path = Path(config.run_dir)
    check_new_run_dir(path, config.resume)
    path.mkdir(parents=True, exist_ok=True)
    return path


class RunLockedError(RuntimeError):
    """Another process holds the run directory's lock."""


class RunLock:
    """An exclusive lock on a run directory, held until :meth:`release` (or the process ends).

    It is an OS lock (``fcntl.flock`` on ``RUN_DIR/.lock``): the kernel drops it when the process
    dies, so a SIGKILL never leaves it stale. The file records the holder (host, pid, start time)
    so that a refused process can name it.
    """

    def __init__(self, path: Path, fh: IO[str]) -> None:
        self.path, self._fh = path, fh

    def release(self) -> None:
        if self._fh is not None:
            import fcntl

            fcntl.flock(self._fh, fcntl.LOCK_UN)
            self._fh.close()
            self._fh = None

    def __enter__(self) -> RunLock:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()


def lock_run_dir(run_dir: str | Path) -> RunLock:
    """Take the exclusive lock of ``run_dir`` (see :class:`RunLock`) or raise
    :class:`RunLockedError` naming the process that holds it."""
    import fcntl
    import socket

    path = Path(run_dir) / LOCK_FILE
    fh = open(path, "a+", encoding="utf-8")
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        fh.seek(0)
        holder = fh.read().strip() or "another process"
        fh.close()
        raise RunLockedError(
            f"the run in {str(run_dir)!r} is in use by {holder}; wait for it to finish (or stop "
            f"it), then resume"
        ) from None
    fh.seek(0)
    fh.truncate()
    fh.write(f"pid {os.getpid()} on {socket.gethostname()} since "
             f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n")
    fh.flush()
    return RunLock(path, fh)


def remove_stale_temporaries(run_dir: str | Path) -> list[Path]:
    """Delete the temporary files that an interrupted atomic write left in a run directory
    (``.NAME.*.tmp``, see :func:`write_json`); call it only while holding the run's lock.
    Returns what was removed."""
    run_dir = Path(run_dir)
    found = [p for d in (run_dir, run_dir / CHECKPOINT_DIR) if d.is_dir()
             for p in d.glob(".*.tmp") if p.is_file()]
    for p in found:
        p.unlink()
    return found


def checkpoint_path(run_dir: str | Path, which: str = "last") -> Path:
    """Path of the ``"last"`` or ``"best"`` checkpoint of a run."""
    from dmlnb._validate import check_choice

    check_choice("which", which, ("last", "best"))
    name = LAST_CHECKPOINT if which == "last" else BEST_CHECKPOINT
    return Path(run_dir) / CHECKPOINT_DIR / name


# --- reading -------------------------------------------------------------------------------------
@dataclass
class Run:
    """A run directory read back: config, metric records, summary (``None`` while unfinished)."""

    path: Path
    config: dict[str, Any]
    records: list[dict[str, Any]] = field(default_factory=list)
    summary: dict[str, Any] | None = None

    @property
    def finished(self) -> bool:
        return self.summary is not None

    @property
    def test_metrics(self) -> dict[str, float]:
        return dict((self.summary or {}).get("test", {}))

    def metrics(self, kind: str | None = None) -> pd.DataFrame:
        """The records as a :class:`pandas.DataFrame`, optionally only those of ``kind``
        ("step", "epoch", "val", "test_curve", "test")."""
        import pandas as pd

        recs = self.records if kind is None else [r for r in self.records if r.get("kind") == kind]
        return pd.DataFrame.from_records(recs)

    def embeddings(self) -> dict[str, Any]:
        """The final test evaluation: ``embeddings`` [n, d], ``labels`` [n], ``indices`` [n]
        (positions in the test split)."""
        import numpy as np

        path = self.path / EMBEDDINGS_FILE
        if not path.exists():
            raise FileNotFoundError(f"{path} does not exist: the run has not finished")
        with np.load(path) as z:
            return {k: z[k] for k in z.files}

    def train_config(self) -> TrainConfig:
        """The run's :class:`~dmlnb.config.TrainConfig`."""
        from dmlnb.config import TrainConfig

        return TrainConfig.from_dict(self.config)


def load_run(run_dir: str | Path) -> Run:
    """Read the run in ``run_dir`` (config.json, metrics.jsonl, summary.json if finished)."""
    path = Path(run_dir)
    if not is_run(path):
        raise FileNotFoundError(f"{str(path)!r} is not a run directory ({CONFIG_FILE} missing)")
    config = json.loads((path / CONFIG_FILE).read_text(encoding="utf-8"))
    summary_file = path / SUMMARY_FILE
    summary = json.loads(summary_file.read_text(encoding="utf-8")) if summary_file.exists() else None
    return Run(path=path, config=config, records=read_jsonl(path / METRICS_FILE), summary=summary)


def list_runs(root: str | Path = "runs", *, finished_only: bool = False) -> list[Path]:
    """Run directories anywhere under ``root`` (sorted by path)."""
    root = Path(root)
    if not root.exists():
        return []
    found = sorted(p.parent for p in root.rglob(CONFIG_FILE))
    if finished_only:
        found = [p for p in found if (p / SUMMARY_FILE).exists()]
    return found


def runs_table(runs: str | Path | Iterable[str | Path] = "runs") -> pd.DataFrame:
    """One row per finished run: the config fields, ``best_epoch``, ``wall_time_s``, and the
    metrics as ``val/<name>`` and ``test/<name>`` columns (a :class:`pandas.DataFrame`)."""
    import pandas as pd

    paths = list_runs(runs, finished_only=True) if isinstance(runs, (str, Path)) else list(runs)
    rows = []
    for p in paths:
        run = load_run(p)
        if run.summary is None:
            continue
        row: dict[str, Any] = {"run_dir": str(run.path)}
        for k, v in run.config.items():
            row[k] = tuple(v) if isinstance(v, list) else v
        row["best_epoch"] = run.summary.get("best_epoch")
        row["wall_time_s"] = run.summary.get("wall_time_s")
        for part in ("val", "test"):
            for k, v in (run.summary.get(part) or {}).items():
                row[f"{part}/{k}"] = v
        rows.append(row)
    return pd.DataFrame.from_records(rows)


# --- exporting -----------------------------------------------------------------------------------
#: what :func:`export_run` keeps of a checkpoint: the weights a model is rebuilt from, and where
#: in the run they were taken (no loss, optimiser, scheduler, sampler or RNG state)
SLIM_CHECKPOINT_KEYS = ("model", "in_channels", "epoch", "step")


def export_run(src: str | Path, dst: str | Path, *, embeddings: bool = False,
               replace: bool = False) -> Path:
    """Copy the finished run in ``src`` to ``dst`` in a slim form that is small enough to ship.

    ``dst`` gets the run's ``config.json``, ``summary.json`` and ``metrics.jsonl`` unchanged and
    one checkpoint: the one the run's final test used (``summary["test_checkpoint"]``, ``best.pt``
    unless the run chose ``last.pt``), under the same name, holding only the model weights and
    ``in_channels``, ``epoch``, ``step`` (:data:`SLIM_CHECKPOINT_KEYS`). :func:`load_run` reads
    the copy as it reads the run, and ``dmlnb.experiment.load_model`` rebuilds the same model
    from it (``torch.load(weights_only=True)``). ``embeddings=True`` also copies
    ``embeddings.npz`` (the final test's embeddings; on the full glyph test split about 14 MB).

    ``dst`` must be absent or empty; with ``replace=True`` it may also hold a run, whose files
    are then overwritten (each atomically) and whose run files that the new copy does not have
    (the other checkpoint, ``embeddings.npz``) are removed. A ``src`` without ``summary.json``
    (not finished) is refused. Returns ``dst``.
    """
    src, dst = Path(src), Path(dst)
    run = load_run(src)
    if run.summary is None:
        raise ValueError(f"{str(src)!r} is not a finished run ({SUMMARY_FILE} missing); "
                         f"finish it first (resume it), then export it")
    if dst.resolve() == src.resolve():
        raise ValueError(f"export_run: src and dst are the same folder ({str(src)!r})")
    if dst.exists() and (not dst.is_dir() or _contents(dst)):
        if not (replace and dst.is_dir() and is_run(dst)):
            raise RunExistsError(
                f"export destination {str(dst)!r} already exists and is not empty; pass "
                f"replace=True to overwrite the run there, or choose another folder")
    name = str(run.summary.get("test_checkpoint") or BEST_CHECKPOINT)
    ckpt = src / CHECKPOINT_DIR / name
    if not ckpt.exists():
        raise FileNotFoundError(f"{str(src)!r}: the checkpoint of its final test ({name}) is missing")
    state = load_checkpoint(ckpt)
    missing = [k for k in ("model", "in_channels") if k not in state]
    if missing:
        raise CorruptCheckpointError(f"{str(ckpt)!r} lacks {missing}: not a dmlnb run checkpoint")
    slim = {k: state[k] for k in SLIM_CHECKPOINT_KEYS if k in state}
    files = [CONFIG_FILE, SUMMARY_FILE, METRICS_FILE] + ([EMBEDDINGS_FILE] if embeddings else [])
    for f in files:
        if not (src / f).exists():
            raise FileNotFoundError(f"{str(src)!r} has no {f} to export")
    dst.mkdir(parents=True, exist_ok=True)
    # the checkpoint first and config.json (what makes a folder a run) last: an export that is
    # interrupted never leaves a run without its weights
    save_checkpoint(dst / CHECKPOINT_DIR / name, slim)
    for f in reversed(files):
        write_bytes(dst / f, (src / f).read_bytes())
    stale = [dst / CHECKPOINT_DIR / n for n in (LAST_CHECKPOINT, BEST_CHECKPOINT) if n != name]
    stale += [] if embeddings else [dst / EMBEDDINGS_FILE]
    for p in stale:
        if p.is_file():
            p.unlink()
    return dst
