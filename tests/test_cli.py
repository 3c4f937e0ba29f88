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


@pytest.fixture
def no_optional(monkeypatch):
    monkeypatch.setattr(cli, "OPTIONAL_SUBCOMMANDS", ())


def parse(argv):
    return cli.config_from_args(cli.build_parser().parse_args(argv))


def test_train_help_lists_every_field_with_its_default(no_optional, capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["train", "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    for name in field_names():
        assert f"--{name}" in out, name
    assert f"(default: {D.SSR_PROB})" in out and f"(default: {D.SSR_LEVELS})" in out
    assert "paper-cub200-128" in out and "multisimilarity" in out


def test_layering_defaults_preset_file_flags(no_optional, tmp_path):
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


def test_print_config_and_errors(no_optional, capsys):
    assert cli.main(["train", "--print-config", "--seed", "3"]) == 0
    assert json.loads(capsys.readouterr().out)["seed"] == 3
    assert cli.main(["train", "--print-config", "--ssr_prob", "2", "--pooling", "mean"]) == 2
    err = capsys.readouterr().err
    assert "ssr_prob=2.0" in err and "'avg', 'max'" in err
    with pytest.raises(SystemExit):
        cli.main(["train", "--epochs", "many"])
    assert cli.main([]) == 2  # no command: help


def test_train_then_eval_then_runs(no_optional, tmp_path, capsys):
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


def test_optional_subcommands(monkeypatch, tmp_path):
    (tmp_path / "fake_sub_ok.py").write_text(
        "def add_parser(sub):\n    p = sub.add_parser('hello')\n"
        "    p.set_defaults(func=lambda args: 7)\n")
    (tmp_path / "fake_sub_broken.py").write_text("import not_a_real_package_xyz\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(cli, "OPTIONAL_SUBCOMMANDS", ("fake_sub_ok", "dmlnb.not_written_yet"))
    assert cli.main(["hello"]) == 7  # registered; the missing module is skipped
    monkeypatch.setattr(cli, "OPTIONAL_SUBCOMMANDS", ("fake_sub_broken",))
    with pytest.raises(ModuleNotFoundError, match="not_a_real_package_xyz"):
        cli.build_parser()  # a module that exists but fails to import is not hidden
    for name in ("fake_sub_ok", "fake_sub_broken"):
        sys.modules.pop(name, None)


def test_module_entry_point_is_the_cli():
    import dmlnb.__main__ as entry

    assert entry.main is cli.main


def test_help_texts_and_choices_name_real_fields():
    assert set(cli._HELP) <= set(field_names())
    assert set(cli._CHOICES) <= set(field_names())
