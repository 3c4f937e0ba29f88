"""The GPU check script runs (on the CPU, tiny) and reports what it promises."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"


@pytest.mark.slow
def test_gpu_check_cpu_smoke(tmp_path):
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path / "check.json"
    assert module.main(["--cpu-smoke", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["baseline"]["images_per_step"] == 16 and result["ssr"]["images_per_step"] == 32
    assert result["ideal_ratio"] == pytest.approx(2.0)
    for part in ("baseline", "ssr"):
        assert result[part]["images_per_s"] > 0 and result[part]["eval_images_per_s"] > 0
