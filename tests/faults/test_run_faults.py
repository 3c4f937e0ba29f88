"""Reliability faults of training runs and their directories, each pinned by a test.

- ``test_resume_of_a_finished_run_with_changed_settings_is_refused``: ``resume=True`` on a
  finished run with another ``lr`` or ``loss`` is refused with a ValueError naming the field,
  as for an unfinished run, and nothing in the run changes; with the run's own settings the old
  result comes back without training.
- ``test_a_second_writer_is_refused_naming_the_holder``: while one ``fit`` is in the middle of a
  run, a second ``fit(resume=True)`` and ``dmlnb train --resume`` on the same run directory are
  refused with ``RunLockedError`` naming the holder's pid, write nothing, and the first run
  then finishes normally.
- ``test_a_killed_writer_leaves_no_stale_lock``: while another process holds the run, ``fit``
  is refused naming that process's pid; once it is killed with SIGKILL the lock can be taken
  again and the run resumes to the end.
- ``test_a_late_refusal_leaves_nothing_that_blocks_the_fix``: settings that can only be checked
  against the data (an unknown dataset option, an unknown loss parameter, more classes per
  batch than the data has, cub200 without ``data_root``) are refused before the run directory
  exists, so the corrected command succeeds with the same ``run_dir``.
- ``test_infinite_numbers_are_refused_up_front``: ``lr``, ``ssr_weight``, ``rank_scale`` and
  ``head_lr_mult`` set to infinity are refused by the config, naming the field.
- ``test_a_damaged_checkpoint_gives_one_clear_message``: a truncated or empty checkpoint makes
  ``dmlnb eval``, ``dmlnb train --resume`` (exit status 2, the file named on stderr, no
  traceback) and ``fit(resume=True)`` (``CorruptCheckpointError`` naming the file) fail with
  one message.
- ``test_a_crash_before_the_summary_leaves_one_test_record``: a run that crashed between its
  test record and ``summary.json`` and is then resumed ends with exactly one ``test`` record.
- ``test_stray_temporaries_are_removed_on_resume``: the temporary file an interrupted
  checkpoint write left behind is removed when the run resumes.
- ``test_no_batch_message_names_config_fields``: a batch the data cannot fill is refused with
  a message naming the config fields ``batch_size`` and ``samples_per_class``, not the
  sampler's ``classes_per_batch`` (expected to fail: not fixed yet).
- ``test_a_bad_config_file_is_named``: a missing, non-JSON or non-object ``--config`` file is
  refused with exit status 2 and a message naming the file.
- ``test_a_malformed_cuda_device_is_refused``: ``device="cuda:abc"`` is refused by the config
  and by ``dmlnb train``; ``cuda:0`` stays valid.
"""

from __future__ import annotations

import json
import math
import os
import re
import select
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from tiny import TINY_RUN  # tests/tiny.py

import dmlnb
from dmlnb import cli, runs
from dmlnb import train as T
from dmlnb.config import TrainConfig

TINY = TINY_RUN


pytestmark = pytest.mark.usefixtures("one_thread")


def config(run_dir, **changes) -> dict:
    return {**TINY, "run_dir": str(run_dir), **changes}


def records(run_dir, kind):
    return [r for r in runs.read_jsonl(Path(run_dir) / runs.METRICS_FILE) if r["kind"] == kind]


def snapshot(run_dir) -> dict[str, bytes]:
    """Every file of a run (but the lock file) and its bytes."""
    run_dir = Path(run_dir)
    return {str(p.relative_to(run_dir)): p.read_bytes() for p in sorted(run_dir.rglob("*"))
            if p.is_file() and p.name != ".lock"}


def copy_run(src, dest) -> Path:
    shutil.copytree(src, dest)
    return Path(dest)


def _train_once(tmp_path_factory, name, **kwargs) -> Path:
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run_dir = tmp_path_factory.mktemp(name) / "run"
        T.fit(config(run_dir), **kwargs)
    finally:
        torch.set_num_threads(n)
    return run_dir


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    """A finished tiny run (copy it before changing anything)."""
    return _train_once(tmp_path_factory, "finished")


@pytest.fixture(scope="module")
def unfinished_run(tmp_path_factory) -> Path:
    """A tiny run interrupted after its first step, with its last checkpoint (copy it first)."""
    return _train_once(tmp_path_factory, "unfinished", stop_after_steps=1)


# --- a finished run and changed settings ---------------------------------------------------------
def test_resume_of_a_finished_run_with_changed_settings_is_refused(finished_run, tmp_path):
    rd = copy_run(finished_run, tmp_path / "run")
    before = snapshot(rd)
    summary = json.loads((rd / runs.SUMMARY_FILE).read_text())
    for change, name, other in ((dict(lr=0.0123), "lr", "loss"),
                                (dict(loss="multisimilarity"), "loss", "lr")):
        with pytest.raises(ValueError, match=rf"\b{name}: run has") as info:
            T.fit(config(rd, resume=True, **change))
        assert f"{other}: run has" not in str(info.value)
        assert snapshot(rd) == before
    result = T.fit(config(rd, resume=True))
    assert result.completed and result.metrics == summary["test"]
    assert result.best_epoch == summary["best_epoch"]
    assert snapshot(rd) == before  # returned the old result, trained and wrote nothing


# --- two writers on one run ----------------------------------------------------------------------
def test_a_second_writer_is_refused_naming_the_holder(unfinished_run, tmp_path, monkeypatch,
                                                      capsys):
    rd = copy_run(unfinished_run, tmp_path / "run")
    # the first writer resumes the run in a thread and pauses at its first log line, mid-run
    paused, go_on, outcome = threading.Event(), threading.Event(), {}
    append = runs.append_jsonl

    def pausing_append(path, record):
        if threading.current_thread() is first and not go_on.is_set():
            paused.set()
            go_on.wait(120)
        append(path, record)

    def first_writer():
        try:
            outcome["result"] = T.fit(config(rd, resume=True))
        except BaseException as err:  # reported below
            outcome["error"] = err

    monkeypatch.setattr(runs, "append_jsonl", pausing_append)
    first = threading.Thread(target=first_writer, daemon=True)
    first.start()
    try:
        assert paused.wait(120), f"the first writer did not start: {outcome}"
        before = snapshot(rd)
        holder = rf"pid {os.getpid()}\b"
        with pytest.raises(RuntimeError, match=holder) as info:
            T.fit(config(rd, resume=True))
        assert isinstance(info.value, runs.RunLockedError)
        capsys.readouterr()
        rc = cli.main(["train", "--config", str(rd / runs.CONFIG_FILE), "--run_dir", str(rd),
                       "--resume"])
        err = capsys.readouterr().err
        assert rc == 2 and re.search(holder, err) and "Traceback" not in err, err
        assert snapshot(rd) == before  # the refused writers wrote nothing
    finally:
        go_on.set()
        first.join(120)
    assert "error" not in outcome, outcome
    assert outcome["result"].completed and len(records(rd, "test")) == 1


_HOLDER = ("import sys, time\nfrom dmlnb import runs\nlock = runs.lock_run_dir(sys.argv[1])\n"
           "print('locked', flush=True)\ntime.sleep(120)\n")


def test_a_killed_writer_leaves_no_stale_lock(unfinished_run, tmp_path):
    rd = copy_run(unfinished_run, tmp_path / "run")
    tree = str(Path(dmlnb.__file__).resolve().parent.parent)  # the dmlnb under test
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        p for p in (tree, os.environ.get("PYTHONPATH")) if p)}
    proc = subprocess.Popen([sys.executable, "-c", _HOLDER, str(rd)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        ready, _, _ = select.select([proc.stdout], [], [], 120)
        line = proc.stdout.readline() if ready else ""
        if line.strip() != "locked":
            proc.kill()
            pytest.fail(f"the lock holder did not take the lock: {proc.communicate()[1]}")
        with pytest.raises(runs.RunLockedError, match=rf"pid {proc.pid}\b"):
            T.fit(config(rd, resume=True))
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert (rd / runs.LOCK_FILE).exists()  # the file stays; the lock died with its process
    with runs.lock_run_dir(rd):
        pass
    result = T.fit(config(rd, resume=True))
    assert result.completed and runs.load_run(rd).finished


# --- late refusals -------------------------------------------------------------------------------
def _fake_cub(root: Path) -> Path:
    """A tiny CUB_200_2011 layout: training classes 1-10, test classes 101-104, 4 images each."""
    d = root / "CUB_200_2011"
    classes = {c: f"{c:03d}.Bird_{c}" for c in (*range(1, 11), *range(101, 105))}
    rng = np.random.default_rng(0)
    images, labels, i = [], [], 0
    for cid, name in classes.items():
        for j in range(4):
            i += 1
            rel = f"{name}/Bird_{cid}_{j:04d}.png"
            (d / "images" / name).mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 256, (24, 28, 3), dtype=np.uint8)).save(d / "images" / rel)
            images.append(f"{i} {rel}")
            labels.append(f"{i} {cid}")
    (d / "images.txt").write_text("\n".join(images) + "\n")
    (d / "image_class_labels.txt").write_text("\n".join(labels) + "\n")
    (d / "classes.txt").write_text("\n".join(f"{c} {n}" for c, n in classes.items()) + "\n")
    return root


LATE = {
    "unknown dataset option": (dict(dataset_options={"max_per_class": 12, "max_per_klass": 3}),
                               dict(dataset_options={"max_per_class": 12}), "max_per_klass"),
    "unknown loss parameter": (dict(loss_params={"margn": 0.1}), dict(loss_params={}), "margn"),
    "more classes per batch than the data has": (dict(batch_size=4 * 40), dict(batch_size=16),
                                                 "class"),
    "cub200 without data_root": (dict(dataset="cub200", dataset_options={}),
                                 dict(dataset="cub200", dataset_options={}, data_root="CUB"),
                                 "root"),
}


@pytest.mark.parametrize("case", sorted(LATE))
def test_a_late_refusal_leaves_nothing_that_blocks_the_fix(tmp_path, case):
    bad, fixed, match = LATE[case]
    if fixed.get("data_root") == "CUB":
        fixed = {**fixed, "data_root": str(_fake_cub(tmp_path / "cub"))}
    rd = tmp_path / "run"
    with pytest.raises(ValueError, match=match):
        T.fit(config(rd, **bad))
    assert not rd.exists(), sorted(p.name for p in rd.iterdir())
    result = T.fit(config(rd, **fixed))
    assert result.completed and runs.load_run(rd).finished


# --- infinities ----------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["lr", "ssr_weight", "rank_scale", "head_lr_mult"])
def test_infinite_numbers_are_refused_up_front(tmp_path, name):
    with pytest.raises(ValueError, match=rf"\b{name}=inf\b"):
        TrainConfig.from_dict({**TINY, name: math.inf})
    rd = tmp_path / "run"
    with pytest.raises(ValueError, match=rf"\b{name}=inf\b"):
        T.fit(config(rd, **{name: math.inf}))
    assert not rd.exists()


# --- damaged checkpoints -------------------------------------------------------------------------
def _damage(path: Path, how: str) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2] if how == "truncated" else b"")


@pytest.mark.parametrize("how", ["truncated", "empty"])
def test_a_damaged_checkpoint_gives_one_clear_message(finished_run, unfinished_run, tmp_path,
                                                      capsys, how):
    # dmlnb eval RUN: the best checkpoint of a finished run
    fd = copy_run(finished_run, tmp_path / "finished")
    best = runs.checkpoint_path(fd, "best")
    _damage(best, how)
    capsys.readouterr()
    rc = cli.main(["eval", str(fd)])
    err = capsys.readouterr().err
    assert rc == 2 and str(best) in err and "Traceback" not in err, err

    # dmlnb train --resume: the last checkpoint of an interrupted run
    rd = copy_run(unfinished_run, tmp_path / "unfinished")
    last = runs.checkpoint_path(rd, "last")
    _damage(last, how)
    rc = cli.main(["train", "--config", str(rd / runs.CONFIG_FILE), "--run_dir", str(rd),
                   "--resume"])
    err = capsys.readouterr().err
    assert rc == 2 and str(last) in err and "Traceback" not in err, err

    # the API
    with pytest.raises(runs.CorruptCheckpointError, match=re.escape(str(last))):
        T.fit(config(rd, resume=True))


# --- a crash before the summary ------------------------------------------------------------------
def test_a_crash_before_the_summary_leaves_one_test_record(finished_run, tmp_path):
    rd = copy_run(finished_run, tmp_path / "run")
    summary = json.loads((rd / runs.SUMMARY_FILE).read_text())
    (rd / runs.SUMMARY_FILE).unlink()  # as if killed after logging the test, before the summary
    assert len(records(rd, "test")) == 1
    result = T.fit(config(rd, resume=True))
    assert result.completed and (rd / runs.SUMMARY_FILE).is_file()
    tests = records(rd, "test")
    assert len(tests) == 1
    assert result.metrics == pytest.approx(summary["test"])
    assert {k: tests[0][k] for k in summary["test"]} == pytest.approx(summary["test"])


# --- stray temporaries ---------------------------------------------------------------------------
def test_stray_temporaries_are_removed_on_resume(unfinished_run, tmp_path):
    rd = copy_run(unfinished_run, tmp_path / "run")
    stray = rd / runs.CHECKPOINT_DIR / ".last.pt.abc123.tmp"
    stray.write_bytes(b"half of a checkpoint")  # as a kill in the middle of a write leaves it
    result = T.fit(config(rd, resume=True))
    assert result.completed
    assert not stray.exists()
    assert not list(rd.rglob("*.tmp"))


# --- messages ------------------------------------------------------------------------------------
def test_no_batch_message_names_config_fields(tmp_path):
    with pytest.raises(ValueError) as info:
        T.fit(config(tmp_path / "run", batch_size=4 * 40))
    msg = str(info.value)
    assert "batch_size" in msg and "samples_per_class" in msg, msg
    assert "classes_per_batch" not in msg, msg


@pytest.mark.parametrize("content", [None, "{not json", "[1, 2]"],
                         ids=["missing", "invalid JSON", "not an object"])
def test_a_bad_config_file_is_named(tmp_path, capsys, content):
    path = tmp_path / "settings.json"
    if content is not None:
        path.write_text(content)
    capsys.readouterr()
    rc = cli.main(["train", "--config", str(path), "--print-config"])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert f"--config {path}" in err and "Traceback" not in err, err


def test_a_malformed_cuda_device_is_refused(capsys):
    with pytest.raises(ValueError, match=r"device='cuda:abc'"):
        TrainConfig.from_dict({**TINY, "device": "cuda:abc"})
    capsys.readouterr()
    assert cli.main(["train", "--device", "cuda:abc", "--print-config"]) == 2
    assert "cuda:abc" in capsys.readouterr().err
    assert TrainConfig.from_dict({**TINY, "device": "cuda:0"}).device == "cuda:0"
