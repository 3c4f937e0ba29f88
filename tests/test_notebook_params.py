"""The training notebook's parameter contract (dmlnb.notebook.train_parameters): papermill's
text booleans, registry names checked, did-you-mean suggestions."""

from __future__ import annotations

import pytest

from dmlnb.notebook import train_parameters


@pytest.mark.parametrize("text, want", [("false", False), ("False", False), ("true", True),
                                        ("no", False), ("1", True)])
def test_text_booleans_from_papermill(text, want):
    cfg, _ = train_parameters({"ssr": text})
    assert cfg.ssr is want


def test_optional_boolean_and_non_boolean_fields_keep_their_text():
    cfg, _ = train_parameters({"freeze_bn": "false", "run_dir": "true"})
    assert cfg.freeze_bn is False and cfg.run_dir == "true"


def test_registry_names_are_checked_with_a_suggestion():
    with pytest.raises(ValueError, match="did you mean 'multisimilarity'"):
        train_parameters({"loss": "multisimilarty"})
    with pytest.raises(ValueError, match="did you mean 'ssr_prob'"):
        train_parameters({"ssr_prb": 0.5})


def test_changed_settings_lists_only_what_differs_from_the_defaults():
    from dmlnb.config import TrainConfig
    from dmlnb.notebook import changed_settings

    table = changed_settings(TrainConfig(loss="multisimilarity", seed=3))
    assert list(table.index) == ["loss", "seed"]
    assert table.loc["seed", "value"] == "3" and table.loc["seed", "default"] == "0"
    assert changed_settings(TrainConfig()).empty


def test_training_history_rate_runs_over_the_whole_run_not_the_epoch():
    from dmlnb.notebook import training_history

    flags = [1, 0, 1, 1, 0, 1, 1, 1]
    steps = [{"step": i + 1, "epoch": i // 4, "ssr": f,
              "ssr_rate": sum(flags[(i // 4) * 4:i + 1]) / (i % 4 + 1)} for i, f in enumerate(flags)]
    df = training_history(steps)
    expected = [sum(flags[:i + 1]) / (i + 1) for i in range(len(flags))]
    assert df["ssr_rate_run"].tolist() == pytest.approx(expected)
    # the per-epoch rate restarts at the epoch boundary (step 5: 0/1), the run's rate does not
    assert df.loc[4, "ssr_rate"] == 0.0 and df.loc[4, "ssr_rate_run"] == pytest.approx(3 / 5)
    assert "ssr_rate_run" not in training_history([{"step": 1}]).columns
