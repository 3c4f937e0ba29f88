"""A sweep re-run never loses partial work: an interrupted point is resumed from its checkpoint,
a failed point's directory is moved aside with its error and the point is run again afresh."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import nbformat
import psutil
import pytest

from dmlnb import sweep
from dmlnb.sweep import point_names, run_sweep

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def kernel_env(monkeypatch):
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")


# A stand-in for 02_train that keeps its run-directory contract: a run_dir that holds something is
# refused unless resume=True; resume continues from checkpoints/last.pt; summary.json at the end.
# `fail_flag` (a file) makes the point fail after writing partial work; `hold` (a file) makes it
# wait after its checkpoint, so that it can be interrupted there.
TRAIN_LIKE = """\
import json, pathlib, time
d = pathlib.Path(run_dir)
ck = d / "checkpoints" / "last.pt"
if d.exists() and any(d.iterdir()) and not resume:
    raise RuntimeError(f"run_dir {d} is not empty; pass resume=True")
start = json.loads(ck.read_text())["step"] if resume and ck.exists() else 0
if not (d / "config.json").exists():
    d.mkdir(parents=True, exist_ok=True)
    (d / "config.json").write_text(json.dumps({"a": a}))
ck.parent.mkdir(exist_ok=True)
ck.write_text(json.dumps({"step": max(start, 5)}))
if fail_flag and pathlib.Path(fail_flag).exists():
    raise RuntimeError("forced failure after a checkpoint")
while hold and pathlib.Path(hold).exists():
    time.sleep(0.2)
(d / "summary.json").write_text(json.dumps({"resumed_from": start, "steps": 10}))
"""


def _train_like(path: Path) -> Path:
    nb = nbformat.v4.new_notebook()
    params = nbformat.v4.new_code_cell("a = 1\nrun_dir = None\nresume = False\nfail_flag = None\nhold = None")
    params.metadata["tags"] = ["parameters"]
    nb.cells = [params, nbformat.v4.new_code_cell(TRAIN_LIKE)]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, path)
    return path


def _interrupted_point(out: Path, params: dict, step: int) -> Path:
    """A point as a killed sweep leaves it: params, a partial notebook, a run with a checkpoint,
    no summary, no status."""
    pdir = out / point_names([params])[0]
    (pdir / "run" / "checkpoints").mkdir(parents=True)
    (pdir / "params.json").write_text(json.dumps(params))
    (pdir / "notebook.ipynb").write_text('{"partial": true}')
    (pdir / "run" / "config.json").write_text(json.dumps(params))
    (pdir / "run" / "checkpoints" / "last.pt").write_text(json.dumps({"step": step}))
    return pdir


def test_interrupted_point_resumes_from_its_checkpoint(tmp_path):
    nb = _train_like(tmp_path / "train_like.ipynb")
    out = tmp_path / "sweep"
    params = {"a": 1}
    pdir = _interrupted_point(out, params, step=7)
    config_mtime = (pdir / "run" / "config.json").stat().st_mtime_ns

    table = run_sweep(nb, {"a": [1]}, out, progress=False)

    assert table["status"].tolist() == ["ok"]
    summary = json.loads((pdir / "run" / "summary.json").read_text())
    assert summary["resumed_from"] == 7  # continued from the checkpoint, not from step 0
    status = json.loads((pdir / "status.json").read_text())
    assert status["resumed"] is True
    assert (pdir / "run" / "config.json").stat().st_mtime_ns == config_mtime  # the same run
    assert json.loads((pdir / "notebook.interrupted-1.ipynb").read_text()) == {"partial": True}
    assert (pdir / "notebook.ipynb").is_file() and status["earlier_attempts"] == ["notebook.interrupted-1.ipynb"]


def test_failed_point_is_moved_aside_with_its_error_and_run_afresh(tmp_path):
    nb = _train_like(tmp_path / "train_like.ipynb")
    out = tmp_path / "sweep"
    flag = tmp_path / "fail"
    flag.write_text("")
    grid = {"a": [1], "fail_flag": str(flag)}
    name = point_names([{"a": 1, "fail_flag": str(flag)}])[0]

    first = run_sweep(nb, grid, out, progress=False)
    assert first["status"].tolist() == ["failed"] and "forced failure" in first["error"].item()
    flag.unlink()
    second = run_sweep(nb, grid, out, progress=False)

    assert second["status"].tolist() == ["ok"] and second["point"].tolist() == [name]
    aside = out / f"{name}.failed-1"
    kept = json.loads((aside / "status.json").read_text())
    assert kept["status"] == "failed" and "forced failure after a checkpoint" in kept["error"]
    assert json.loads((aside / "run" / "checkpoints" / "last.pt").read_text()) == {"step": 5}
    assert (aside / "notebook.ipynb").is_file()
    fresh = json.loads((out / name / "run" / "summary.json").read_text())
    assert fresh["resumed_from"] == 0  # run afresh, in a new directory
    assert json.loads((out / name / "status.json").read_text())["earlier_attempts"] == [aside.name]
    assert (out / "results.csv").read_text().count("\n") == 2  # header + the point; no aside row


def test_point_states_and_what_a_rerun_does_with_them(tmp_path):
    """Without a kernel: the decision for every state a point directory can be in."""
    out = tmp_path
    # done: skipped
    done = out / "done"
    done.mkdir()
    (done / "status.json").write_text('{"status": "ok"}')
    assert sweep._point_state(done) == "done"
    assert sweep._prepare_point(out, "done", {}, "run_dir", "resume") is None
    # never started (only params): run in place
    (out / "new").mkdir()
    (out / "new" / "params.json").write_text("{}")
    assert sweep._prepare_point(out, "new", {}, "run_dir", "resume") == (False, [])
    # its worker process died: interrupted, resumed, the record kept
    died = _interrupted_point(out, {"a": 3}, step=2)
    (died / "status.json").write_text('{"status": "failed", "error": "BrokenProcessPool", "interrupted": true}')
    assert sweep._point_state(died) == "interrupted"
    resume, kept = sweep._prepare_point(out, died.name, {"a": 3}, "run_dir", "resume")
    assert resume and sorted(kept) == ["notebook.interrupted-1.ipynb", "status.interrupted-1.json"]
    assert (died / "run" / "checkpoints" / "last.pt").is_file()
    # interrupted, but the notebook cannot resume: all of it moved aside, never deleted
    other = _interrupted_point(out, {"a": 4}, step=2)
    resume, kept = sweep._prepare_point(out, other.name, {"a": 4}, "run_dir", None)
    assert not resume and kept == [f"{other.name}.interrupted-1"]
    assert (out / kept[0] / "run" / "checkpoints" / "last.pt").is_file()
    assert sorted(p.name for p in other.iterdir()) == ["params.json"]
    # failed twice: two asides, numbered
    for n in (1, 2):
        bad = out / "bad-0123abcd"
        bad.mkdir(exist_ok=True)
        (bad / "params.json").write_text("{}")
        (bad / "status.json").write_text(json.dumps({"status": "failed", "error": f"try {n}"}))
        assert sweep._prepare_point(out, bad.name, {}, "run_dir", "resume") == (False, [f"{bad.name}.failed-{n}"])
    assert json.loads((out / "bad-0123abcd.failed-2" / "status.json").read_text())["error"] == "try 2"
    assert [r for r in sweep.collect(out)["point"] if "failed-" in r or "interrupted-" in r] == []


def test_sweep_stopped_by_sigterm_keeps_the_checkpoint_and_resumes(tmp_path):
    """The real thing: SIGTERM a running sweep (jobs=1) while its point holds after a checkpoint;
    no kernel survives, and the next run resumes the point from that checkpoint."""
    nb = _train_like(tmp_path / "train_like.ipynb")
    out, hold = tmp_path / "sweep", tmp_path / "hold"
    hold.write_text("")
    grid = {"a": [1], "hold": str(hold)}
    pdir = out / point_names([{"a": 1, "hold": str(hold)}])[0]
    code = (f"from dmlnb.sweep import run_sweep\n"
            f"run_sweep({str(nb)!r}, {grid!r}, {str(out)!r}, jobs=1)")
    proc = subprocess.Popen([sys.executable, "-c", code], env={**os.environ})
    ck = pdir / "run" / "checkpoints" / "last.pt"
    deadline = time.time() + 120
    while time.time() < deadline and not ck.exists():
        time.sleep(0.5)
    assert ck.exists(), "the point did not reach its checkpoint"
    descendants = psutil.Process(proc.pid).children(recursive=True)
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=60)
    _, alive = psutil.wait_procs(descendants, timeout=20)
    assert not alive, f"still running after the sweep was stopped: {[p.pid for p in alive]}"
    assert not (pdir / "status.json").exists() and ck.exists()  # interrupted, work kept

    hold.unlink()
    table = run_sweep(nb, grid, out, progress=False)
    assert table["status"].tolist() == ["ok"]
    assert json.loads((pdir / "run" / "summary.json").read_text())["resumed_from"] == 5
    assert json.loads((pdir / "status.json").read_text())["resumed"] is True


@pytest.mark.slow
def test_interrupted_02_train_point_resumes_its_run(tmp_path):
    """With the real training notebook: a point whose run stopped after 1 of 3 steps (as if the
    sweep had been killed) is resumed by the next sweep run, not started again."""
    from dmlnb.train import fit

    notebook = ROOT / "notebooks" / "02_train.ipynb"
    params = {"epochs": 1, "steps_per_epoch": 3, "batch_size": 32, "ssr_images": 4,
              "dataset_options": {"max_per_class": 8}, "quiet": True, "gallery_queries": 2,
              "gallery_k": 2}
    out = tmp_path / "sweep"
    pdir = out / point_names([params])[0]
    train_fields = {k: v for k, v in params.items() if not k.startswith("gallery")}
    partial = fit(dict(train_fields, run_dir=str(pdir / "run")), stop_after_steps=1)
    assert not partial.completed and (pdir / "run" / "checkpoints" / "last.pt").is_file()
    (pdir / "params.json").write_text(json.dumps(params))
    config_mtime = (pdir / "run" / "config.json").stat().st_mtime_ns

    table = run_sweep(notebook, [params], out, progress=False, cell_timeout=600, notebook_timeout=1200)

    assert table["status"].tolist() == ["ok"], table["error"].tolist()
    assert (pdir / "run" / "config.json").stat().st_mtime_ns == config_mtime  # the same run, continued
    assert json.loads((pdir / "status.json").read_text())["resumed"] is True
    steps = [json.loads(line) for line in (pdir / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len([r for r in steps if r.get("kind") == "step"]) == 3  # step 1 kept, 2 and 3 added
    assert json.loads((pdir / "run" / "summary.json").read_text())["test"]["map@r"] >= 0
