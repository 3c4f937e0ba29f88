"""The test metrics of a fixed tiny config, for each loss with SSR on and off, are pinned.

``tests/data/behaviour_pin.json`` was written by the code before the package's modules were
reorganised, and the reorganised code reproduced it exactly; a refactoring that changes the
numbers fails here. A deliberate change of the method's numbers regenerates the file and says why
in the commit: the SSR entries were regenerated once, when the SSR branch got random streams of
its own (so that a baseline and an SSR run with one seed are exact pairs); the baseline entries
did not change.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dmlnb.train import fit

PIN = json.loads((Path(__file__).parent / "data" / "behaviour_pin.json").read_text())


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("key", sorted(PIN["metrics"]))
def test_metrics_unchanged(tmp_path, key):
    loss, mode = key.split("/")
    ssr = mode == "ssr"
    result = fit({**PIN["config"], "loss": loss, "ssr": ssr, "ssr_prob": 1.0 if ssr else 0.8,
                  "runs_root": str(tmp_path)})
    want = PIN["metrics"][key]
    assert set(result.metrics) == set(want)
    for name, value in want.items():
        assert result.metrics[name] == pytest.approx(value, rel=1e-9, abs=1e-12), name
