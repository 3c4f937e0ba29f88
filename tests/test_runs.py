"""Run directories: unique creation, no silent overwrite, atomic writes, reading back."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from dmlnb import runs
from dmlnb.config import TrainConfig


def cfg(tmp_path, **changes) -> TrainConfig:
    return TrainConfig.from_dict({"runs_root": str(tmp_path / "runs"), **changes})


def test_default_run_dirs_are_unique_and_named_after_the_run(tmp_path):
    c = cfg(tmp_path, loss="triplet", seed=4)
    paths = {runs.create_run_dir(c) for _ in range(5)}  # same second, still distinct
    assert len(paths) == 5
    for p in paths:
        assert p.is_dir() and p.parent == tmp_path / "runs"
        assert "-glyphs-triplet-ssr-s4-" in p.name
    assert "-base-" in runs.default_run_name(cfg(tmp_path, ssr=False))


def test_existing_non_empty_run_dir_is_refused_and_named(tmp_path):
    rd = tmp_path / "mine"
    rd.mkdir()
    (rd / "x.txt").write_text("keep")
    with pytest.raises(runs.RunExistsError, match="mine.*already exists.*resume=True"):
        runs.create_run_dir(cfg(tmp_path, run_dir=str(rd)))
    # resume into a folder that holds no run is refused too
    with pytest.raises(runs.RunExistsError, match="holds no run"):
        runs.create_run_dir(cfg(tmp_path, run_dir=str(rd), resume=True))
    assert (rd / "x.txt").read_text() == "keep"
    # a file in the way
    f = tmp_path / "file"
    f.write_text("")
    with pytest.raises(runs.RunExistsError, match="not a directory"):
        runs.create_run_dir(cfg(tmp_path, run_dir=str(f)))


def test_empty_or_absent_run_dir_is_used(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert runs.create_run_dir(cfg(tmp_path, run_dir=str(empty))) == empty
    absent = tmp_path / "a" / "b"
    assert runs.create_run_dir(cfg(tmp_path, run_dir=str(absent))).is_dir()
    # resume on an existing run is allowed
    runs.write_json(empty / runs.CONFIG_FILE, {})
    assert runs.create_run_dir(cfg(tmp_path, run_dir=str(empty), resume=True)) == empty


def test_atomic_write_keeps_the_old_file_when_writing_fails(tmp_path):
    path = tmp_path / "summary.json"
    runs.write_json(path, {"a": 1})

    def broken(fh):
        fh.write(b'{"a": ')
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        runs._atomic(path, broken)
    assert json.loads(path.read_text()) == {"a": 1}
    assert sorted(os.listdir(tmp_path)) == ["summary.json"]  # no temp file left behind


def test_json_of_numpy_and_torch_values(tmp_path):
    path = runs.write_json(tmp_path / "x.json", {"f": np.float32(0.5), "i": np.int64(3),
                                                 "t": torch.tensor(2.0), "a": np.arange(3),
                                                 "p": tmp_path, "tup": (1, 2)})
    assert json.loads(path.read_text()) == {"f": 0.5, "i": 3, "t": 2.0, "a": [0, 1, 2],
                                            "p": str(tmp_path), "tup": [1, 2]}


def test_checkpoints_round_trip_with_weights_only(tmp_path):
    state = {"model": {"w": torch.randn(3, generator=torch.Generator().manual_seed(0))},
             "generator": torch.Generator().manual_seed(1).get_state(), "epoch": 2,
             "best_value": float("-inf"), "best_epoch": None, "sums": {"loss": 1.5}}
    path = runs.save_checkpoint(tmp_path / "ck" / "last.pt", state)
    back = runs.load_checkpoint(path)
    assert torch.equal(back["model"]["w"], state["model"]["w"])
    assert torch.equal(back["generator"], state["generator"])
    assert back["epoch"] == 2 and back["best_epoch"] is None and back["sums"] == {"loss": 1.5}


class Evil:
    pass


def test_load_checkpoint_refuses_arbitrary_objects(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"x": Evil()}, path)
    with pytest.raises(Exception, match="[Ww]eights only"):
        runs.load_checkpoint(path)


def test_jsonl_ignores_a_torn_last_line_and_truncates_on_resume(tmp_path):
    path = tmp_path / runs.METRICS_FILE
    for s in (1, 2, 3):
        runs.append_jsonl(path, {"kind": "step", "step": s})
    with open(path, "a") as fh:
        fh.write('{"kind": "st')  # a crash while writing
    assert [r["step"] for r in runs.read_jsonl(path)] == [1, 2, 3]
    runs.truncate_metrics(tmp_path, 2)
    assert [r["step"] for r in runs.read_jsonl(path)] == [1, 2]
    path.write_text('{"a": 1}\nnot json\n{"b": 2}\n')
    with pytest.raises(json.JSONDecodeError):
        runs.read_jsonl(path)


def _fake_run(root, name, seed, r1, finished=True):
    rd = root / name
    rd.mkdir(parents=True)
    c = TrainConfig(seed=seed, run_dir=str(rd))
    runs.write_json(rd / runs.CONFIG_FILE, c.to_dict())
    runs.append_jsonl(rd / runs.METRICS_FILE, {"kind": "step", "step": 1, "loss": 1.0})
    runs.append_jsonl(rd / runs.METRICS_FILE, {"kind": "val", "step": 1, "map@r": 0.5})
    if finished:
        runs.write_json(rd / runs.SUMMARY_FILE, {"best_epoch": 0, "wall_time_s": 1.0,
                                                 "val": {"map@r": 0.5},
                                                 "test": {"recall@1": r1}})
        runs.save_npz(rd / runs.EMBEDDINGS_FILE, embeddings=np.eye(2, dtype=np.float32),
                      labels=np.array([0, 1]), indices=np.arange(2))
    return rd


def test_load_run_list_runs_and_table(tmp_path):
    root = tmp_path / "runs"
    a = _fake_run(root, "a", 0, 0.7)
    b = _fake_run(root / "grid", "b", 1, 0.9)
    _fake_run(root, "c", 2, 0.0, finished=False)
    run = runs.load_run(a)
    assert run.finished and run.test_metrics == {"recall@1": 0.7}
    assert run.train_config().seed == 0
    assert list(run.metrics("val")["map@r"]) == [0.5]
    assert len(run.metrics()) == 2
    assert run.embeddings()["embeddings"].shape == (2, 2)
    assert not runs.load_run(root / "c").finished
    with pytest.raises(FileNotFoundError, match="not finished"):
        runs.load_run(root / "c").embeddings()
    assert runs.list_runs(root) == sorted([a, b, root / "c"])
    assert runs.list_runs(root, finished_only=True) == sorted([a, b])
    table = runs.runs_table(root)
    assert sorted(table["seed"]) == [0, 1]
    assert dict(zip(table["seed"], table["test/recall@1"], strict=True)) == {0: 0.7, 1: 0.9}
    assert "val/map@r" in table.columns and "ssr_families" in table.columns
    with pytest.raises(FileNotFoundError, match="not a run directory"):
        runs.load_run(tmp_path)


def test_checkpoint_path_names():
    assert runs.checkpoint_path("r", "best").name == "best.pt"
    with pytest.raises(ValueError, match="'last', 'best'"):
        runs.checkpoint_path("r", "first")
