"""Two CPU processes under torchrun (gloo): the run completes, rank 0 alone writes it, and the
metric loss sees the global batch with the gradient of the global loss."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from dmlnb import runs
from dmlnb import train as T
from dmlnb.distributed import gather_with_grad

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()), reason="torch.distributed with gloo"
)

ROOT = Path(__file__).resolve().parents[1]

# ssr_weight = 0 keeps the SSR branch running (views, the zero term when the coin says no) while
# making the metric path comparable with one process; frozen BatchNorm makes each image's
# embedding independent of how the batch is split over the processes.
CONFIG = dict(
    dataset="glyphs", dataset_options={"max_per_class": 12}, loss="multisimilarity",
    batch_size=16, samples_per_class=4, ssr=True, ssr_prob=0.5, ssr_weight=0.0, ssr_images=4,
    epochs=1, steps_per_epoch=3, freeze_bn=True, quiet=True, device="cpu", eval_batch_size=256,
)

WORKER = textwrap.dedent("""
    import json, sys
    import torch
    import torch.distributed as dist
    from dmlnb import train as T
    from dmlnb.distributed import gather_with_grad

    torch.set_num_threads(1)
    config, out = json.loads(sys.argv[1]), sys.argv[2]
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    # (a) the gather: rank order, gradient only into the local block, scaled by the world size
    x = (torch.arange(3, dtype=torch.float64) + 10 * rank).reshape(3, 1).requires_grad_()
    gathered = gather_with_grad(x)
    weights = torch.arange(1, 1 + 3 * world, dtype=torch.float64).reshape(-1, 1)
    (gathered * weights).sum().backward()
    result = {"gathered": gathered.detach().flatten().tolist(), "grad": x.grad.flatten().tolist()}
    # (b) fit inside the process group torchrun made
    fit = T.fit(config)
    result.update(run_dir=str(fit.run_dir), metrics=fit.metrics, completed=fit.completed)
    with open(f"{out}/rank{rank}.json", "w") as fh:
        json.dump(result, fh)
    dist.destroy_process_group()
""")


def steps(run_dir):
    return [r for r in runs.read_jsonl(Path(run_dir) / runs.METRICS_FILE) if r["kind"] == "step"]


def test_two_process_run_matches_one_process_on_the_global_batch(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    config = {**CONFIG, "runs_root": str(tmp_path / "ddp_runs")}
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(script), json.dumps(config), str(tmp_path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r0 = json.loads((tmp_path / "rank0.json").read_text())
    r1 = json.loads((tmp_path / "rank1.json").read_text())

    # (a) gather semantics
    assert r0["gathered"] == r1["gathered"] == [0.0, 1.0, 2.0, 10.0, 11.0, 12.0]
    assert r0["grad"] == [2.0, 4.0, 6.0] and r1["grad"] == [8.0, 10.0, 12.0]  # 2 x weights

    # (b) one run directory, written by rank 0 only, complete
    made = [p for p in (tmp_path / "ddp_runs").iterdir()]
    assert len(made) == 1 and r0["run_dir"] == r1["run_dir"] == str(made[0])
    assert r0["completed"] and r1["completed"] and r0["metrics"] and r1["metrics"] == {}
    summary = json.loads((made[0] / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["test"] == r0["metrics"]
    ddp_steps = steps(made[0])
    assert [r["global_batch"] for r in ddp_steps] == [CONFIG["batch_size"]] * 3

    # (c) the same global batches in one process give the same metric losses, step after step:
    # the loss sees the global batch, and the updates in between agree (AdamW is blind to a
    # global gradient scale, which (a) checks instead)
    torch.set_num_threads(1)
    single = T.fit({**CONFIG, "runs_root": str(tmp_path / "one")})
    one_steps = steps(single.run_dir)
    assert [r["global_batch"] for r in one_steps] == [CONFIG["batch_size"]] * 3
    for a, b in zip(ddp_steps, one_steps, strict=True):
        assert a["loss_metric"] == pytest.approx(b["loss_metric"], rel=1e-4, abs=1e-6)
    assert ddp_steps[0]["loss_metric"] != ddp_steps[2]["loss_metric"]  # it did train


def test_gather_outside_a_process_group_is_the_identity():
    x = torch.ones(2, 3, requires_grad=True)
    assert gather_with_grad(x) is x
