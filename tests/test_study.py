"""The study's analysis (settings, paired tests, report) and, end to end, a miniature study."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from scipy import stats

from dmlnb import measure, ssr, study
from dmlnb.data import load_dataset
from dmlnb.model import EmbeddingNet
from dmlnb.sweep import expand_grid


def _table(diff: float, seeds=(0, 1, 2, 3, 4)) -> pd.DataFrame:
    rng = np.random.default_rng(0)
    rows = []
    for s in seeds:
        base = 0.5 + 0.01 * rng.standard_normal()
        rows.append({"dataset": "glyphs", "loss": "margin", "seed": s, "setting": "baseline", "map@r": base})
        rows.append({"dataset": "glyphs", "loss": "margin", "seed": s, "setting": "ssr",
                     "map@r": base + diff + 0.001 * rng.standard_normal()})
    return pd.DataFrame(rows)


def test_paired_comparison_pairs_by_seed():
    table = _table(0.05)
    out = study.paired_comparison(table, ["map@r"])
    row = out.iloc[0]
    a = table[table.setting == "baseline"].sort_values("seed")["map@r"].to_numpy()
    b = table[table.setting == "ssr"].sort_values("seed")["map@r"].to_numpy()
    assert row["n"] == 5 and row["diff"] == pytest.approx((b - a).mean())
    assert row["t_p"] == pytest.approx(stats.ttest_rel(b, a).pvalue)
    assert row["wilcoxon_p"] == pytest.approx(0.0625)  # 5 seeds, all positive: the smallest possible
    # shuffling the seeds of one arm destroys the pairing and changes the test
    shuffled = table.copy()
    mask = shuffled.setting == "ssr"
    shuffled.loc[mask, "seed"] = shuffled.loc[mask, "seed"].to_numpy()[::-1]
    assert study.paired_comparison(shuffled, ["map@r"]).iloc[0]["t_p"] != pytest.approx(row["t_p"])


def test_no_difference_is_reported_as_such():
    out = study.paired_comparison(_table(0.0), ["map@r"]).iloc[0]
    assert abs(out["diff"]) < 0.002 and out["t_p"] > 0.05


def test_setting_names_and_grid():
    assert study.setting_name(pd.Series({"ssr": False})) == "baseline"
    assert study.setting_name(pd.Series({"ssr": True})) == "ssr"
    assert study.setting_name(pd.Series({"ssr": True, "ssr_levels": 2})) == "ssr, ssr_levels=2"
    assert study.setting_name(pd.Series({"ssr": True, "ssr_families": '["crop"]'})) == "ssr, ssr_families=crop"
    points = expand_grid(study.study_grid())
    headline = [p for p in points if p["dataset"] == "glyphs" and len(p) == 5]
    assert len(headline) == 2 * 2 * len(study.SEEDS)
    n_fashion = 2 * len(study.FASHION_SEEDS)
    assert sum(p["dataset"] == "fashion_mnist" for p in points) == n_fashion
    assert len(points) == len(headline) + len(study.ABLATIONS) * len(study.ABLATION_SEEDS) + n_fashion


def test_view_similarities_fall_with_strength_for_an_untrained_model():
    test = load_dataset("glyphs", "test", max_per_class=4)
    images = torch.stack([test[i][0] for i in range(64)])
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = EmbeddingNet("smallcnn", in_channels=1)
    sims = ssr.view_similarities(model, images)
    assert sims["metric"].shape == (64, 4) and sims["ssr"].shape == (64, 4)
    assert np.all(np.abs(sims["metric"]) <= 1 + 1e-5)
    mean = sims["metric"].mean(axis=0)
    assert mean[0] > mean[-1]  # stronger views are farther on average, even for random features
    again = ssr.view_similarities(model, images)
    np.testing.assert_array_equal(again["metric"], sims["metric"])  # same views for every model


def test_intraclass_measures_on_glyphs():
    test = load_dataset("glyphs", "test", max_per_class=10)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = EmbeddingNet("smallcnn", in_channels=1).eval()
    from dmlnb.experiment import embed

    emb = embed(model, test)
    out = measure.intraclass_measures(model, test, emb["embeddings"], emb["labels"], view_images=50)
    assert set(out) == set(measure.intraclass_keys(test))
    for key in study.INTRACLASS:
        if key != "lift_theme":  # an icon attribute
            assert key in out and np.isfinite(out[key]), key
    assert 0 <= out["view_pair_order_metric"] <= 1 and -1 <= out["lift_family"] <= 1


@pytest.mark.slow
def test_miniature_study_end_to_end(tmp_path):
    # ssr_families: a list value (one value, not an axis; here the default), one point throughout
    grid = [{"quiet": True, "epochs": 1, "steps_per_epoch": 2, "dataset_options": {"max_per_class": 12},
             "dataset": "glyphs", "loss": "margin", "ssr": [False, True], "seed": [0, 1],
             "ssr_families": [["crop", "perspective", "color"]]}]
    result = study.run_study(tmp_path, jobs=2, grid=grid, progress=False)
    runs = pd.read_csv(tmp_path / "runs.csv")
    assert set(runs.setting) == {"baseline", "ssr", "untrained"}
    assert (runs.status == "ok").all() and runs["map@r"].between(0, 1).all()
    params = [json.loads(f.read_text()) for f in (tmp_path / "runs").glob("*/params.json")]
    assert len(params) == 4 and all(p["ssr_families"] == ["crop", "perspective", "color"] for p in params)
    assert (runs.groupby("setting").size() == 2).all()
    paired = pd.read_csv(tmp_path / "paired.csv")
    assert set(paired.metric) >= {"map@r", "view_tau_metric", "lift_family"} and (paired.n == 2).all()
    md = (tmp_path / "results.md").read_text()
    assert "| glyphs | margin | untrained | 2 |" in md and "SSR setting minus baseline" in md
    assert (tmp_path / "figures" / "study_glyphs.html").exists()
    budget = json.loads((tmp_path / "budget.json").read_text())
    assert budget["sweep_points"] == 4 and budget["total_s"] > 0
    # analysis again without training: same table, nothing re-run
    again = study.run_study(tmp_path, grid=grid, analyze_only=True, progress=False)
    assert again["settings"].equals(result["settings"])
    assert set(runs.loc[runs.setting != "untrained", "code"]) == {budget["code"]}
    # without the run directories (gigabytes, not committed) the committed runs.csv stands for
    # the finished points: nothing is trained again and the numbers stay
    import shutil

    shutil.rmtree(tmp_path / "runs")
    kept = study.run_study(tmp_path, jobs=2, grid=grid, progress=False)
    assert not (tmp_path / "runs").exists()
    pd.testing.assert_frame_equal(kept["settings"], result["settings"], check_exact=False, rtol=1e-12)
    assert len(pd.read_csv(tmp_path / "runs.csv")) == len(runs)


def test_view_trajectories_share_one_map_per_model_and_one_ladder():
    from dmlnb.viz import trajectory_panels

    test = load_dataset("glyphs", "test", max_per_class=4)
    models = {"a": EmbeddingNet(backbone="smallcnn", in_channels=1).eval(),
              "b": EmbeddingNet(backbone="smallcnn", in_channels=1, embed_dim=16).eval()}
    background = {"a": np.random.default_rng(0).normal(size=(30, 128)),
                  "b": np.random.default_rng(1).normal(size=(30, 16))}
    originals = torch.stack([test[i][0] for i in range(3)])
    strengths = [0.0, 0.3, 0.6]
    maps, ladder = measure.view_trajectories(models, originals, background, strengths,
                                             families=("crop",), projection="pca", seed=0)
    assert ladder.shape == (3, 3, 1, 32, 32) and torch.equal(ladder[:, 0], originals)
    for name in models:
        bg, paths = maps[name]
        assert bg.shape == (30, 2) and paths.shape == (3, 3, 2)
    again, _ = measure.view_trajectories(models, originals, background, strengths,
                                         families=("crop",), projection="pca", seed=0)
    assert all(np.array_equal(maps[k][1], again[k][1]) for k in maps)
    fig = trajectory_panels(maps, strengths, labels=["x", "y", "z"], images=ladder, upto=0.3)
    shown = [t.name for t in fig.data if t.showlegend]
    assert shown.count("x") == 1 and shown.count("test set") == 1  # one legend entry each


def test_intraclass_measures_learn_the_icon_style_attributes():
    """A data set whose metadata has the icons' columns gets lift over chance for theme and
    family (as glyphs get it for the typeface's family, weight, italic and category)."""
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(4), 6)
    family = np.tile(["a", "a", "b", "b", "c", "c"], 4)  # two recolours of each family per class
    theme = np.array([f"{f}{i % 2}" for i, f in enumerate(family)])

    class Icons(torch.utils.data.Dataset):
        metadata = pd.DataFrame({"theme": theme, "family": family})

        def __len__(self):
            return len(labels)

        def __getitem__(self, i):
            return torch.rand(3, 16, 16, generator=torch.Generator().manual_seed(int(i))), labels[i]

    # embeddings where recolours of one family are each other's nearest neighbours
    centre = rng.normal(size=(4, 8))[labels] * 5
    style = {f: rng.normal(size=8) for f in "abc"}
    emb = centre + np.stack([style[f] for f in family]) + rng.normal(size=(24, 8)) * 0.01
    model = EmbeddingNet(backbone="smallcnn", in_channels=3, embed_dim=8).eval()
    out = measure.intraclass_measures(model, Icons(), emb, labels, view_images=8)
    assert out["lift_family"] == pytest.approx(1.0 - out["chance_family"])
    assert out["lift_theme"] == pytest.approx(0.0) and out["chance_theme"] == 0.0


def test_setting_names_follow_the_config_defaults():
    assert study.setting_name(pd.Series({"ssr": "True", "ssr_weight": 0.8})) == "ssr"  # the default
    assert study.setting_name(pd.Series({"ssr": True, "ssr_weight": 2.0})) == "ssr, ssr_weight=2"
    assert study.setting_name(pd.Series({"ssr": True, "rank_beta": 0.85, "ssr_uniformity": float("nan")})) \
        == "ssr, rank_beta=0.85"
    assert study.setting_name(pd.Series({"ssr": 1.0, "ssr_uniformity": 1.0})) == "ssr, ssr_uniformity=1"
    assert study.setting_name(pd.Series({"ssr": False, "ssr_weight": 2.0})) == "baseline"


def _search_table(values: dict[str, float]) -> pd.DataFrame:
    rows = []
    for loss in ("margin", "multisimilarity"):
        for name, fields in study.SEARCH_CANDIDATES:
            rows.append({"dataset": "icons", "loss": loss, "ssr": True, "status": "ok",
                         "test/map@r": values[name] + (0.01 if loss == "margin" else 0), **fields})
    return pd.DataFrame(rows)


def test_search_chooses_the_best_validation_setting_and_the_paper_wins_ties():
    names = [n for n, _ in study.SEARCH_CANDIDATES]
    table = _search_table({n: 0.30 + 0.01 * (i == 2) for i, n in enumerate(names)})
    out = study.search_results(table)
    assert len(out) == 2 * len(names)
    chosen = out[out.chosen]
    assert list(chosen["candidate"]) == [names[2], names[2]]
    tie = study.search_results(_search_table({n: 0.3 for n in names}))
    assert set(tie[tie.chosen]["candidate"]) == {"paper"}
    # a search with a failed or unfinished point chooses nothing for its data set and loss yet
    table.loc[(table.loss == "margin") & (table.rank_beta == 0.85), "status"] = "failed"
    again = study.search_results(table)
    assert not again[again.loss == "margin"].chosen.any()
    assert again[again.chosen]["loss"].tolist() == ["multisimilarity"]
    assert study.chosen_settings(again) == {("icons", "multisimilarity"): {"rank_beta": 0.85}}


def test_recorded_search_rows_stand_for_missing_points_and_a_finished_run_replaces_them(tmp_path):
    names = [n for n, _ in study.SEARCH_CANDIDATES]
    table = _search_table({n: 0.30 + 0.01 * (i == 1) for i, n in enumerate(names)})
    table["point"] = [f"p{i}-{i:08x}" for i in range(len(table))]
    full = study.search_results(table)
    full["code"] = "abc1234"
    full.to_csv(tmp_path / "search.csv", index=False)
    recorded = study.recorded_points(tmp_path / "search.csv")
    assert len(recorded) == len(table)
    # only half the points have run directories here: the record completes the search
    half = study.search_results(table.iloc[::2], recorded=recorded)
    assert len(half) == len(full) and half.chosen.sum() == 2
    assert list(half[half.chosen]["candidate"]) == [names[1], names[1]]
    # a finished run of a recorded point replaces its record
    rerun = table.copy()
    rerun.loc[0, "test/map@r"] = 0.9
    mixed = study.search_results(rerun.iloc[:1], recorded=recorded)
    assert len(mixed) == len(full) and mixed.loc[mixed.point == "p0-00000000", "val_map@r"].item() == 0.9
    # a table that does not name its points and the code that measured them stands for nothing
    full.drop(columns="code").to_csv(tmp_path / "old.csv", index=False)
    assert study.recorded_points(tmp_path / "old.csv").empty
    assert study.recorded_points(tmp_path / "absent.csv").empty
    (tmp_path / "bad.csv").write_bytes(b"\x00\xff\"unterminated")
    with pytest.raises(ValueError, match="bad.csv"):
        study.recorded_points(tmp_path / "bad.csv")


def test_search_points_never_touch_the_test_classes():
    points = expand_grid(study.search_grid())
    assert len(points) == len(study.PRETRAINED_DATASETS) * 2 * len(study.SEARCH_CANDIDATES)
    assert {p["test_split"] for p in points} == {"val"}
    assert all(p["backbone"] == "efficientnet_lite0" and p["pretrained"] for p in points)


def test_pretrained_grid_pairs_baseline_and_chosen_and_keeps_the_paper_form():
    chosen = {("glyphs", "margin"): {}, ("icons", "margin"): {"ssr_weight": 2.0}}
    points = expand_grid(study.pretrained_grid(chosen, seeds=(0, 1, 2)))
    names = [(p["dataset"], study.setting_name(pd.Series(p))) for p in points]
    assert names.count(("glyphs", "baseline")) == 3 and names.count(("glyphs", "ssr")) == 3
    assert names.count(("icons", "ssr, ssr_weight=2")) == 3 and names.count(("icons", "ssr")) == 3
    assert len(points) == 3 * 5
    # the paper's form of a group whose search chose another setting comes after the main pairs
    assert names.index(("icons", "ssr")) > names.index(("icons", "ssr, ssr_weight=2"))
    assert all(p.get("test_split", "test") == "test" for p in points)


def test_paired_comparison_compares_every_setting_with_the_baseline():
    table = _table(0.05)
    extra = table[table.setting == "ssr"].copy()
    extra["setting"] = "ssr, ssr_weight=2"
    extra["map@r"] -= 0.1
    out = study.paired_comparison(pd.concat([table, extra]), ["map@r"])
    assert list(out["setting"]) == ["ssr", "ssr, ssr_weight=2"]
    assert out.iloc[1]["diff"] == pytest.approx(out.iloc[0]["diff"] - 0.1)


def test_paired_comparison_pairs_only_runs_of_one_cpu_model():
    table = _table(0.05)
    table["cpu"] = "Intel Xeon"
    out = study.paired_comparison(table, ["map@r"])
    assert out.iloc[0]["n"] == 5
    # the SSR runs of seeds 3 and 4 trained on another CPU model: not exact pairs
    table.loc[(table.setting == "ssr") & (table.seed >= 3), "cpu"] = "AMD EPYC"
    out = study.paired_comparison(table, ["map@r"])
    assert out.iloc[0]["n"] == 3
    d = table.pivot(index="seed", columns="setting", values="map@r").loc[[0, 1, 2]]
    assert out.iloc[0]["diff"] == pytest.approx((d["ssr"] - d["baseline"]).mean())


def test_cpu_model_names_this_machine():
    from dmlnb.train import _versions, cpu_model

    name = cpu_model()
    assert isinstance(name, str) and name and name != "?"
    assert _versions()["cpu"] == name


def test_cpu_model_tells_vector_widths_of_one_family_apart():
    from dmlnb.train import cpu_model_from

    def info(flags):
        return ("processor\t: 0\nvendor_id\t: AuthenticAMD\nmodel name\t: AMD EPYC\n"
                f"flags\t\t: fpu sse2 {flags}\n\nprocessor\t: 1\nmodel name\t: AMD EPYC\n")

    assert cpu_model_from(info("avx fma avx2 avx512f avx512bw")) == "AMD EPYC (AVX-512)"
    assert cpu_model_from(info("avx fma avx2 sha_ni vaes")) == "AMD EPYC (AVX2)"
    assert cpu_model_from(info("sse4_2")) == "AMD EPYC"
    assert cpu_model_from("processor\t: 0\nflags\t: avx2\n") is None


def test_paired_comparison_leaves_out_infinite_values():
    table = _table(0.05)
    table["rho"] = 0.3
    table.loc[table.seed == 2, "rho"] = np.inf  # a rank-deficient embedding
    out = study.paired_comparison(table, ["map@r", "rho"])
    assert list(out["metric"]) == ["map@r"]
