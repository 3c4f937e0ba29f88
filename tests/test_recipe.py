"""The GPU recipe runs end to end on tiny fixture copies of CUB-200, Cars196 and SOP (on the CPU)."""

from __future__ import annotations

import argparse

import pandas as pd
import pytest

from dmlnb import recipe
from dmlnb.data import load_dataset
from dmlnb.data.fixtures import FIXTURES, make_fixture


@pytest.mark.parametrize("name", FIXTURES)
def test_fixtures_have_the_real_layouts_and_class_rule(name, tmp_path):
    root = make_fixture(name, tmp_path, classes_per_split=5, per_class=3)
    trainval, test = (load_dataset(name, s, root=str(root), image_size=16) for s in ("trainval", "test"))
    assert (len(trainval.classes), len(test.classes)) == (5, 5)
    assert (len(trainval), len(test)) == (15, 15)
    x, _ = test[0]
    assert x.shape == (3, 16, 16)


def test_recipe_configs_follow_the_paper_presets():
    runs = recipe.recipe_runs({"cub200": "/data"}, "/out", dims=(512,))
    assert [(r[0]["ssr"]) for r in runs] == [False, True]
    cfg = runs[1][1]
    assert (cfg["backbone"], cfg["embed_dim"], cfg["image_size"], cfg["batch_size"]) == ("resnet50", 512, 224, 120)
    assert cfg["pretrained"] is True and cfg["data_root"] == "/data"
    with pytest.raises(ValueError, match="dataset='cub'"):
        recipe.recipe_runs({"cub": "/data"}, "/out")


@pytest.mark.slow
def test_recipe_runs_end_to_end_on_fixtures_and_reuses_finished_runs(tmp_path, capsys):
    parser = argparse.ArgumentParser()
    recipe.add_parser(parser.add_subparsers())
    args = parser.parse_args(["recipe", "--fixture", "--out", str(tmp_path), "--dims", "128"])
    assert args.func(args) == 0
    table = pd.read_csv(tmp_path / "comparison.csv")
    assert len(table) == 6 and set(table.dataset) == set(FIXTURES)
    assert table["r_precision"].between(0, 1).all()
    md = (tmp_path / "comparison.md").read_text()
    assert "FIXTURE RUN" in md and "| cub200 | 128 | SSR | 1 | r_precision |" in md and "0.351" in md
    summaries = sorted(tmp_path.glob("runs/*/summary.json"))
    assert len(summaries) == 6
    stamps = [p.stat().st_mtime_ns for p in summaries]
    assert args.func(args) == 0  # a second call reuses every finished run
    assert [p.stat().st_mtime_ns for p in summaries] == stamps
