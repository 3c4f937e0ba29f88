"""The README's demo command, in its quick form: it trains, evaluates and writes every figure."""

from __future__ import annotations

import json

import pytest

from dmlnb.demo import run_demo


@pytest.mark.slow
def test_quick_demo_writes_figures_and_numbers(tmp_path):
    report = run_demo(tmp_path, quick=True)
    saved = json.loads((tmp_path / "demo.json").read_text())
    assert saved["figures"] == report["figures"] == ["demo_metrics", "demo_curves", "demo_retrieval", "demo_umap"]
    for name in saved["figures"]:
        assert (tmp_path / f"{name}.html").stat().st_size > 10_000
    assert (tmp_path / "glyph_gallery.png").stat().st_size > 1000
    for model in ("baseline", "ssr"):
        row = saved["test"][model]
        assert 0 < row["map@r"] <= row["r_precision"] <= 1 and 0 < row["recall@1"] <= 1
        assert -1 <= row["view_tau_metric"] <= 1
    assert (tmp_path / "runs" / "ssr" / "summary.json").exists()
