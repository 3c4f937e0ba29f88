"""dmlnb.sweep: grid expansion, parallel papermill points, failures recorded, re-runs skip done points."""

from __future__ import annotations

import argparse
import json
import math

import nbformat
import pandas as pd
import pytest

from dmlnb import sweep
from dmlnb.sweep import collect, expand_grid, point_name, point_names, run_sweep, summarize


# --- grid expansion ------------------------------------------------------------------------------
def test_expand_grid_product_and_fixed():
    points = expand_grid({"a": [1, 2], "b": ["x", "y", "z"], "c": 0.5})
    assert len(points) == 6
    assert points[0] == {"a": 1, "b": "x", "c": 0.5}
    assert {(p["a"], p["b"]) for p in points} == {(a, b) for a in (1, 2) for b in "xyz"}
    assert all(p["c"] == 0.5 for p in points)


def test_expand_grid_union_dedups():
    grid = [{"ssr": False, "seed": [0, 1]}, {"ssr": True, "gamma": [0.4, 0.8], "seed": [0, 1]},
            {"ssr": False, "seed": 1}]
    points = expand_grid(grid)
    assert len(points) == 2 + 4
    assert sum(1 for p in points if not p["ssr"]) == 2


@pytest.mark.parametrize(
    "grid, exc, text",
    [
        ({"a": []}, ValueError, "empty list"),
        ([], ValueError, "no point"),
        ("a: 1", TypeError, "mapping"),
        ([{"a": 1}, 3], TypeError, "grid entry 1"),
        ({"not valid": 1}, ValueError, "identifier"),
    ],
)
def test_expand_grid_rejects(grid, exc, text):
    with pytest.raises(exc, match=text):
        expand_grid(grid)


def test_load_grid_yaml(tmp_path):
    path = tmp_path / "grid.yaml"
    path.write_text("- {ssr: false, seed: [0, 1]}\n- {ssr: true, seed: [0, 1], ssr_weight: 0.4}\n")
    points = sweep.load_grid(path)
    assert points == [
        {"ssr": False, "seed": 0}, {"ssr": False, "seed": 1},
        {"ssr": True, "seed": 0, "ssr_weight": 0.4}, {"ssr": True, "seed": 1, "ssr_weight": 0.4},
    ]
    path.write_text("a: [1, 2\n")
    with pytest.raises(ValueError, match="not valid YAML"):
        sweep.load_grid(path)


def test_point_name_unique_stable_and_safe():
    a = point_name({"loss": "margin", "seed": 0})
    assert a == point_name({"loss": "margin", "seed": 0})
    assert a != point_name({"loss": "margin", "seed": 1})
    # values that differ only in characters the readable part drops still get distinct names
    assert point_name({"x": "a/b"}) != point_name({"x": "a b"})
    assert "/" not in point_name({"x": "a/b", "y": [1, 2]})
    assert len(point_name({f"p{i}": "v" * 50 for i in range(10)})) <= 80 + 9


def test_point_names_show_what_varies_and_survive_a_grown_grid():
    common = {"epochs": 1, "steps_per_epoch": 30, "dataset_options": {"max_per_class": 100}}
    points = [{**common, "ssr": s, "seed": k} for s in (False, True) for k in (0, 1)]
    names = point_names(points)
    assert len(set(names)) == 4
    assert all(n.startswith(("ssr=False,seed=", "ssr=True,seed=")) for n in names)
    assert not any("epochs" in n or "max_per_class" in n for n in names)
    grown = points + [{**common, "ssr": True, "seed": 0, "ssr_weight": 0.4}]
    assert point_names(grown, existing=names)[:4] == names  # finished points are found again


def test_summarize_mean_std_over_ok_rows():
    table = pd.DataFrame({
        "status": ["ok", "ok", "ok", "failed", "ok"],
        "ssr": [False, False, True, True, True],
        "seed": [0, 1, 0, 1, 2],
        "r1": [0.5, 0.7, 0.6, math.nan, 0.8],
    })
    s = summarize(table, by=["ssr"], metrics=["r1"]).set_index("ssr")
    assert s.loc["False", "r1_mean"] == pytest.approx(0.6)
    assert s.loc["False", "r1_std"] == pytest.approx(pd.Series([0.5, 0.7]).std())
    assert s.loc["True", "n"] == 2  # the failed row is left out
    assert s.loc["True", "r1_mean"] == pytest.approx(0.7)
    with pytest.raises(ValueError, match="nope"):
        summarize(table, by=["nope"], metrics=["r1"])


# --- running a real (tiny) notebook --------------------------------------------------------------
def _dummy_notebook(path):
    nb = nbformat.v4.new_notebook()
    params = nbformat.v4.new_code_cell("a = 1\nb = 'x'\nrun_dir = None")
    params.metadata["tags"] = ["parameters"]
    body = nbformat.v4.new_code_cell(
        "import json, pathlib\n"
        "if a == 2 and b == 'y':\n"
        "    raise RuntimeError('forced failure at a=2, b=y')\n"
        "d = pathlib.Path(run_dir)\n"
        "d.mkdir(parents=True)\n"
        "(d / 'summary.json').write_text(json.dumps({'score': a * 10 + len(b),\n"
        "                                            'test': {'recall@1': a / 10}}))\n"
    )
    nb.cells = [params, body]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, path)
    return path


@pytest.mark.slow
def test_sweep_2x2_one_failure_then_rerun_skips_done(tmp_path):
    nb = _dummy_notebook(tmp_path / "dummy.ipynb")
    out = tmp_path / "sweep"
    grid = {"a": [1, 2], "b": ["x", "y"]}
    table = run_sweep(nb, grid, out, jobs=2, progress=False)

    assert len(table) == 4
    ok = table[table["status"] == "ok"]
    bad = table[table["status"] == "failed"]
    assert len(ok) == 3 and len(bad) == 1
    assert (bad["a"].item(), bad["b"].item()) == (2, "y")
    assert "RuntimeError" in bad["error"].item() and "forced failure" in bad["error"].item()
    for _, row in ok.iterrows():  # metrics come from each point's own summary.json
        assert row["score"] == row["a"] * 10 + len(row["b"])
        assert row["test/recall@1"] == pytest.approx(row["a"] / 10)
    assert math.isnan(bad["score"].item())

    # every point keeps its executed notebook next to its run; the CSV matches the table
    for name in table["point"]:
        assert (out / name / "notebook.ipynb").is_file()
        assert json.loads((out / name / "params.json").read_text())
    csv = pd.read_csv(out / "results.csv")
    assert list(csv["point"]) == list(table["point"])
    failed_nb = nbformat.read(out / bad["point"].item() / "notebook.ipynb", as_version=4)
    assert any(o.get("ename") == "RuntimeError" for c in failed_nb.cells for o in c.get("outputs", []))

    # re-running skips the three completed points and tries the failed one again, in a fresh
    # directory: the failed attempt is moved aside with its error, not deleted
    done_mtimes = {n: (out / n / "status.json").stat().st_mtime_ns for n in ok["point"]}
    table2 = run_sweep(nb, grid, out, jobs=1, progress=False)
    assert {n: (out / n / "status.json").stat().st_mtime_ns for n in ok["point"]} == done_mtimes
    assert len(table2) == 4 and (table2["status"] == "ok").sum() == 3  # the aside is no row
    assert table2.loc[table2["status"] == "failed", "seconds"].item() > 0
    failed_name = bad["point"].item()
    aside = out / f"{failed_name}.failed-1"
    assert "forced failure" in json.loads((aside / "status.json").read_text())["error"]
    assert (aside / "notebook.ipynb").is_file()
    again = json.loads((out / failed_name / "status.json").read_text())
    assert again["earlier_attempts"] == [aside.name] and "forced failure" in again["error"]


def test_run_sweep_validates(tmp_path):
    nb = _dummy_notebook(tmp_path / "dummy.ipynb")
    with pytest.raises(ValueError, match="notebook="):
        run_sweep(tmp_path / "missing.ipynb", {"a": 1}, tmp_path / "o")
    with pytest.raises(ValueError, match="jobs"):
        run_sweep(nb, {"a": 1}, tmp_path / "o", jobs=0)
    with pytest.raises(ValueError, match="run_dir"):
        run_sweep(nb, {"run_dir": "x"}, tmp_path / "o")


def test_collect_pending_and_missing(tmp_path):
    with pytest.raises(ValueError, match="out="):
        collect(tmp_path / "nothing")
    (tmp_path / "p1").mkdir()
    (tmp_path / "p1" / "params.json").write_text('{"a": 1}')
    table = collect(tmp_path)
    assert table["status"].tolist() == ["pending"]
    assert (tmp_path / "results.csv").is_file()


def test_cli_parser_registers_sweep():
    parser = argparse.ArgumentParser(prog="dmlnb")
    sweep.add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["sweep", "nb.ipynb", "--grid", "g.yaml", "--out", "o", "--jobs", "3"])
    assert (args.notebook, args.grid, args.out, args.jobs) == ("nb.ipynb", "g.yaml", "o", 3)
    assert callable(args.func)
    assert (args.cell_timeout, args.notebook_timeout) == (None, None)  # the notebook's defaults
    args = parser.parse_args(["sweep", "nb.ipynb", "--grid", "g", "--out", "o",
                              "--cell-timeout", "90", "--notebook-timeout", "600"])
    assert (args.cell_timeout, args.notebook_timeout) == (90.0, 600.0)
    assert parser.parse_args(["sweep", "n", "--grid", "g", "--out", "o", "--timeout", "5"]).cell_timeout == 5.0


@pytest.mark.slow
def test_interrupted_parallel_sweep_leaves_no_worker_or_kernel_running(tmp_path):
    """SIGTERM to a sweep stops its workers and their kernels: nothing keeps writing afterwards."""
    import os
    import signal
    import subprocess
    import sys
    import time

    import psutil

    nb = nbformat.v4.new_notebook()
    params = nbformat.v4.new_code_cell("a = 1\nrun_dir = None")
    params.metadata["tags"] = ["parameters"]
    nb.cells = [params, nbformat.v4.new_code_cell("import time\ntime.sleep(120)")]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, tmp_path / "slow.ipynb")
    code = (f"from dmlnb.sweep import run_sweep\n"
            f"run_sweep({str(tmp_path / 'slow.ipynb')!r}, {{'a': [1, 2]}}, {str(tmp_path / 'out')!r}, jobs=2)")
    proc = subprocess.Popen([sys.executable, "-c", code], env={**os.environ})
    parent = psutil.Process(proc.pid)
    deadline = time.time() + 120
    kernels = []
    while time.time() < deadline and len(kernels) < 2:  # wait until both kernels run
        kernels = [p for p in parent.children(recursive=True) if "ipykernel" in " ".join(p.cmdline())]
        time.sleep(1)
    assert len(kernels) == 2, "the kernels did not start"
    descendants = parent.children(recursive=True)
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=60)
    gone, alive = psutil.wait_procs(descendants, timeout=20)
    assert not alive, f"still running after the sweep was stopped: {[p.pid for p in alive]}"
