"""The ``dmlnb`` command: flags generated from TrainConfig, layering, train and eval."""

from __future__ import annotations

import json
import sys

import pytest
import torch

from dmlnb import cli
from dmlnb import defaults as D
from dmlnb.config import PRESETS, TrainConfig, field_names

TINY = ["--dataset_options", '{"max_per_class": 12}', "--batch_size", "16", "--ssr_images", "4",
        "--epochs", "1", "--steps_per_epoch", "2", "--quiet", "--device", "cpu"]


def parse(argv):
    return cli.config_from_args(cli.build_parser().parse_args(argv))


def test_train_help_lists_every_field_with_its_default(capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["train", "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    for name in field_names():
        assert f"--{name}" in out, name
    assert f"(default: {D.SSR_PROB})" in out and f"(default: {D.SSR_LEVELS})" in out
    assert "paper-cub200-128" in out and "multisimilarity" in out


def test_layering_defaults_preset_file_flags(tmp_path):
    f = tmp_path / "c.json"
    f.write_text(json.dumps({"epochs": 5, "lr": 0.01, "seed": 9}))
    c = parse(["train", "--preset", "paper-cub200-128", "--config", str(f), "--lr", "0.5",
               "--no-ssr", "--ssr-families", "crop", "color", "--loss_params",
               '{"margin": 0.1}', "--steps_per_epoch", "none", "--freeze_bn", "auto",
               "--eval_ks", "1", "10"])
    assert c.backbone == PRESETS["paper-cub200-128"]["backbone"]  # preset
    assert (c.epochs, c.seed) == (5, 9)  # file over preset
    assert c.lr == 0.5 and c.ssr is False  # flags over file
    assert c.ssr_families == ("crop", "color") and c.loss_params == {"margin": 0.1}
    assert c.steps_per_epoch is None and c.freeze_bn is None and c.eval_ks == (1, 10)
    assert parse(["train"]) == TrainConfig()


def test_print_config_and_errors(capsys):
    assert cli.main(["train", "--print-config", "--seed", "3"]) == 0
    assert json.loads(capsys.readouterr().out)["seed"] == 3
    assert cli.main(["train", "--print-config", "--ssr_prob", "2", "--pooling", "mean"]) == 2
    err = capsys.readouterr().err
    assert "ssr_prob=2.0" in err and "'avg', 'max'" in err
    with pytest.raises(SystemExit):
        cli.main(["train", "--epochs", "many"])
    assert cli.main([]) == 2  # no command: help


def test_train_then_eval_then_runs(tmp_path, capsys):
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        rd = tmp_path / "run"
        assert cli.main(["train", *TINY, "--run_dir", str(rd)]) == 0
        printed = json.loads(capsys.readouterr().out)
        summary = json.loads((rd / "summary.json").read_text())
        assert printed["test"] == summary["test"]
        assert cli.main(["train", *TINY, "--run_dir", str(rd)]) == 2  # never overwritten
        assert "already exists" in capsys.readouterr().err
        assert cli.main(["eval", str(rd)]) == 0
        again = json.loads(capsys.readouterr().out)
        for k, v in summary["test"].items():
            assert again[k] == pytest.approx(v, abs=1e-6), k
        assert cli.main(["runs", str(tmp_path), "--csv", str(tmp_path / "t.csv")]) == 0
        assert str(rd) in capsys.readouterr().out and (tmp_path / "t.csv").exists()
    finally:
        torch.set_num_threads(n)


def test_every_subcommand_is_registered():
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    assert {"train", "eval", "runs", "data", "sweep", "demo", "study", "figures",
            "recipe"} <= set(sub.choices)


def test_module_entry_point_is_the_cli():
    import dmlnb.__main__ as entry

    assert entry.main is cli.main


def test_help_texts_and_choices_name_real_fields():
    from dmlnb.config import FIELD_GROUPS, FIELD_HELP

    assert set(FIELD_HELP) == set(field_names())
    grouped = [n for names in FIELD_GROUPS.values() for n in names]
    assert sorted(grouped) == sorted(field_names())  # every field in exactly one group
    assert set(cli._choices()) <= set(field_names())


def test_top_level_help_imports_no_torch():
    """``dmlnb --help`` lists every subcommand without importing any of their modules."""
    import subprocess

    code = ("import sys\nfrom dmlnb import cli\ntry:\n    cli.main(['--help'])\n"
            "except SystemExit:\n    pass\nprint('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=60).stdout
    assert out.strip().endswith("False")
    for name in cli.COMMANDS:
        assert f"    {name} " in out


def test_train_help_lists_each_flag_once_with_help_in_groups(capsys):
    with pytest.raises(SystemExit):
        cli.main(["train", "--help"])
    out = capsys.readouterr().out
    for name in field_names():
        assert out.count(f"--{name} ") + out.count(f"--{name}\n") == 1, name
        assert f"--{name.replace('_', '-')} " not in out or "_" not in name
    for title in ("data:", "SSR (the paper's method):", "optimisation:", "evaluation:"):
        assert title in out


@pytest.mark.parametrize("argv, want", [
    (["--ssr", "false"], False), (["--ssr", "true"], True), (["--ssr"], True),
    (["--no-ssr"], False), (["--ssr", "False"], False),
])
def test_booleans_accept_true_and_false(argv, want):
    assert parse(["train", *argv]).ssr is want


def test_misspelt_names_get_a_suggestion(capsys):
    assert cli.main(["train", "--loss", "margn", "--print-config"]) == 2
    err = capsys.readouterr().err
    assert "did you mean 'margin'?" in err
