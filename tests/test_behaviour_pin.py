"""The test metrics of a fixed tiny config, for each loss with SSR on and off, are pinned.

``tests/data/behaviour_pin.json`` was written by the code before the package's modules were
reorganised, and the reorganised code reproduced it exactly; a refactoring that changes the
numbers fails here. A deliberate change of the method's numbers regenerates the file and says why
in the commit: the SSR entries were regenerated once, when the SSR branch got random streams of
its own (so that a baseline and an SSR run with one seed are exact pairs); the baseline entries
did not change.

Bit for bit holds on one CPU model: another model's kernels round differently and the short
training drifts (from the Intel Xeon that wrote ``metrics``, the AMD EPYC (AVX-512) pins of
``by_cpu`` differ by at most 1.5e-4 in MAP@R, 6e-4 in NMI and 3 of the 372 test queries'
Recall@K, 0.008; the AMD EPYC (AVX2) pins by 2.9e-4, 0 and 0.008). So a CPU model with pins of
its own (``by_cpu``, keyed by :func:`dmlnb.train.cpu_model`: the model name and the widest
vector extension, since one name may cover CPUs whose libraries pick other kernels) is held to
them exactly; any other to ``metrics`` within :data:`OTHER_CPU_ABS`, loose enough for rounding,
tight against a change of method.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dmlnb.train import cpu_model, fit

PIN = json.loads((Path(__file__).parent / "data" / "behaviour_pin.json").read_text())
OTHER_CPU_ABS = 0.02  # about 7 queries' Recall@K


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("key", sorted(PIN["metrics"]))
def test_metrics_unchanged(tmp_path, key):
    loss, mode = key.split("/")
    ssr = mode == "ssr"
    result = fit({**PIN["config"], "loss": loss, "ssr": ssr, "ssr_prob": 1.0 if ssr else 0.8,
                  "runs_root": str(tmp_path)})
    own = PIN.get("by_cpu", {}).get(cpu_model())
    want = (own or PIN["metrics"])[key]
    tolerance = dict(rel=1e-9, abs=1e-12) if own else dict(abs=OTHER_CPU_ABS)
    assert set(result.metrics) == set(want)
    for name, value in want.items():
        assert result.metrics[name] == pytest.approx(value, **tolerance), name


def test_pins_of_the_two_cpu_models_agree_to_rounding():
    for cpu, pins in PIN["by_cpu"].items():
        for key, metrics in pins.items():
            for name, value in metrics.items():
                assert value == pytest.approx(PIN["metrics"][key][name], abs=OTHER_CPU_ABS), (cpu, key, name)
