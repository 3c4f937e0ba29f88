"""The ``dmlnb`` command: ``dmlnb train | eval | runs`` plus the subcommands of optional modules.

``dmlnb train`` has one flag per :class:`~dmlnb.config.TrainConfig` field, generated from the
dataclass (``dmlnb train --help`` lists them with their defaults). Settings are layered:
field defaults < ``--preset NAME`` < ``--config FILE.json`` < explicit flags. Flags are spelled
as the fields (``--ssr_prob 0.5``; ``--ssr-prob`` works too); booleans take ``--ssr`` /
``--no-ssr``; lists take several values (``--ssr_families crop color``); dicts take JSON
(``--loss_params '{"margin": 0.1}'``); optional values take ``none``.

The other subcommands are defined by the modules that implement them, each with an
``add_parser(subparsers)``: :mod:`dmlnb.data.cli` (data), :mod:`dmlnb.sweep` (sweep),
:mod:`dmlnb.demo` (demo), :mod:`dmlnb.study` (study), :mod:`dmlnb.figures` (figures),
:mod:`dmlnb.recipe` (recipe).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import typing
from collections.abc import Sequence
from typing import Any

from dmlnb import defaults as D
from dmlnb.config import FIELD_GROUPS, FIELD_HELP, PRESETS, TrainConfig, field_names
from dmlnb.runs import RunLockedError


# --- flag parsing from the dataclass --------------------------------------------------------------
def _optional_int(text: str) -> int | None:
    return None if text.lower() in ("none", "null", "") else int(text)


def _optional_str(text: str) -> str | None:
    return None if text.lower() in ("none", "null") else text


def _json_dict(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise argparse.ArgumentTypeError(f"not valid JSON ({err}): {text!r}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {text!r}")
    return value


def _optional_bool(text: str) -> bool | None:
    t = text.lower()
    if t in ("none", "auto", "null"):
        return None
    if t in ("true", "1", "yes"):
        return True
    if t in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected true, false or auto, got {text!r}")


def _number_list_item(text: str) -> int | float:
    return int(text) if text.lstrip("-").isdigit() else float(text)


def _bool(text: str) -> bool:
    value = _optional_bool(text)
    if value is None:
        raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")
    return value


def _add_field(parser: argparse._ArgumentGroup, f: dataclasses.Field, tp: Any, default: Any,
               choices: tuple | None) -> None:
    """One flag per field, shown once with its help; ``--a-b`` is accepted for ``--a_b`` and
    booleans take ``--x``, ``--x true|false`` or ``--no-x``."""
    hint = _type_name(tp)
    shown = json.dumps(list(default)) if isinstance(default, tuple) else json.dumps(default)
    help_text = f"{FIELD_HELP[f.name]} (default: {shown})"
    if choices:
        help_text = f"{FIELD_HELP[f.name]}: {', '.join(map(str, choices))} (default: {shown})"
    kw: dict[str, Any] = {"dest": f.name, "default": argparse.SUPPRESS}
    if hint == "bool":
        kw.update(type=_bool, nargs="?", const=True, metavar="true|false")
    elif hint == "bool | None":
        kw.update(type=_optional_bool, metavar="true|false|auto")
    elif hint == "int":
        kw.update(type=int)
    elif hint == "int | None":
        kw.update(type=_optional_int, metavar="INT|none")
    elif hint == "float":
        kw.update(type=float)
    elif hint == "str | None":
        kw.update(type=_optional_str)
    elif hint == "dict":
        kw.update(type=_json_dict, metavar="JSON")
    elif hint == "tuple":
        item = str if f.name == "ssr_families" else _number_list_item
        kw.update(type=item, nargs="+")
    else:
        kw.update(type=str)
    parser.add_argument(f"--{f.name}", help=help_text, **kw)
    if "_" in f.name:  # the dashed spelling, accepted but not listed twice
        parser.add_argument(f"--{f.name.replace('_', '-')}", help=argparse.SUPPRESS, **kw)
    if hint == "bool":
        for spelling in {f"--no-{f.name}", f"--no-{f.name.replace('_', '-')}"}:
            parser.add_argument(spelling, dest=f.name, action="store_const", const=False,
                                default=argparse.SUPPRESS, help=argparse.SUPPRESS)


def _type_name(tp: Any) -> str:
    """``bool``, ``int | None``, ... of a resolved type hint (``X | None`` spelled that way)."""
    args = typing.get_args(tp)
    if args and type(None) in args:
        inner = [a for a in args if a is not type(None)]
        return f"{inner[0].__name__} | None"
    return getattr(tp, "__name__", str(tp))


def _choices() -> dict[str, tuple]:
    """The finite sets shown in ``--help``: the vocabularies of :mod:`dmlnb.defaults` and the
    names of the registries (the config and :func:`dmlnb.experiment.check_config` validate
    against the same sets)."""
    from dmlnb.data import dataset_names
    from dmlnb.losses import LOSSES
    from dmlnb.model import BACKBONES

    return {
        "dataset": tuple(dataset_names()), "loss": tuple(LOSSES), "backbone": tuple(BACKBONES),
        "pooling": D.POOLINGS, "ssr_families": D.VIEW_FAMILIES, "ssr_pairs": D.RANK_PAIR_CHOICES,
        "schedule": D.SCHEDULES, "amp": D.AMP_CHOICES, "device": (*D.DEVICE_CHOICES, "cuda:N"),
        "select_metric": D.SELECT_METRICS, "eval_checkpoint": D.CHECKPOINT_CHOICES,
        "train_split": D.SPLITS, "val_split": (*D.SPLITS, "none"), "test_split": D.SPLITS,
    }


def _add_train_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "train", help="train a model (L = L_metric + gamma L_rank) and evaluate it",
        description="Train with dmlnb.train.fit. Layers: defaults < --preset < --config < flags.",
        usage="dmlnb train [--preset NAME] [--config FILE.json] [--print-config] [--FIELD VALUE ...]",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--preset", choices=sorted(PRESETS), default=None, metavar="NAME",
                   help=f"{', '.join(sorted(PRESETS))}. paper-*: the paper's settings for a benchmark "
                        "(ResNet-50, 224 px); cpu-*-lite0: the pretrained regime on the "
                        "embedded data (EfficientNet-Lite0, 64 px, CPU)")
    p.add_argument("--config", dest="config_file", default=None, metavar="FILE.json",
                   help="a JSON file of config fields (e.g. a run's config.json)")
    p.add_argument("--print-config", action="store_true",
                   help="print the resulting config as JSON and exit without training")
    defaults = TrainConfig()
    types = typing.get_type_hints(TrainConfig)
    choices = _choices()
    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    for title, names in FIELD_GROUPS.items():
        group = p.add_argument_group(title)
        for name in names:
            _add_field(group, fields[name], types[name], getattr(defaults, name),
                       choices.get(name))
    p.set_defaults(func=_cmd_train)


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The :class:`TrainConfig` of parsed ``dmlnb train`` arguments (layers as documented),
    checked against the registries too (:func:`dmlnb.experiment.check_config`)."""
    d: dict[str, Any] = {}
    if args.preset:
        d.update(PRESETS[args.preset])
    if args.config_file:
        d.update(_read_config_file(args.config_file))
    for name in field_names():
        if hasattr(args, name):
            d[name] = getattr(args, name)
    from dmlnb.experiment import check_config

    return check_config(d)


def _read_config_file(path: str) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as fh:
            value = json.load(fh)
    except FileNotFoundError:
        raise FileNotFoundError(f"--config {path}: no such file") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"--config {path}: not a JSON file ({err})") from None
    if not isinstance(value, dict):
        raise ValueError(f"--config {path}: expected a JSON object of config fields, got "
                         f"{type(value).__name__}")
    return value


def _cmd_train(args: argparse.Namespace) -> int:
    config = config_from_args(args)
    if args.print_config:
        print(config.to_json())
        return 0
    from dmlnb.train import fit

    result = fit(config)
    if result.metrics:
        print(json.dumps({"run_dir": str(result.run_dir), "best_epoch": result.best_epoch,
                          "test": result.metrics}, indent=2))
    return 0


def _add_eval_parser(subparsers) -> None:
    p = subparsers.add_parser("eval", help="re-evaluate a run's checkpoint",
                              description="Evaluate a run's best (or last) checkpoint on its "
                                          "test split (or another split); writes nothing.")
    p.add_argument("run_dir")
    p.add_argument("--split", default=None, help="default: the run's test split")
    p.add_argument("--checkpoint", choices=("best", "last"), default="best")
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch_size", "--batch-size", type=int, default=500)
    p.set_defaults(func=_cmd_eval)


def _cmd_eval(args: argparse.Namespace) -> int:
    from dmlnb.distributed import resolve_device
    from dmlnb.experiment import evaluate_run

    metrics = evaluate_run(args.run_dir, split=args.split, which=args.checkpoint,
                           device=str(resolve_device(args.device)), batch_size=args.batch_size,
                           quiet=False)
    print(json.dumps(metrics, indent=2))
    return 0


def _add_runs_parser(subparsers) -> None:
    p = subparsers.add_parser("runs", help="list finished runs as a table")
    p.add_argument("root", nargs="?", default="runs")
    p.add_argument("--csv", default=None, help="also write the table to this CSV file")
    p.set_defaults(func=_cmd_runs)


def _cmd_runs(args: argparse.Namespace) -> int:
    from dmlnb.runs import runs_table

    table = runs_table(args.root)
    if args.csv:
        table.to_csv(args.csv, index=False)
    if table.empty:
        print(f"no finished runs under {args.root}")
        return 0
    cols = [c for c in ("run_dir", "dataset", "loss", "ssr", "seed", "best_epoch",
                        "test/recall@1", "test/map@r") if c in table.columns]
    print(table[cols].to_string(index=False))
    return 0


#: Every subcommand, its one-line help, and the function that defines its parser (module path
#: and name, imported only when that subcommand is used: ``dmlnb --help`` imports no torch).
COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("train a model (L = L_metric + gamma L_rank) and evaluate it", "dmlnb.cli:_add_train_parser"),
    "eval": ("re-evaluate a run's checkpoint", "dmlnb.cli:_add_eval_parser"),
    "runs": ("list finished runs as a table", "dmlnb.cli:_add_runs_parser"),
    "data": ("download, inspect and build data sets", "dmlnb.data.cli:add_parser"),
    "sweep": ("run a notebook over a parameter grid with papermill", "dmlnb.sweep:add_parser"),
    "demo": ("train a baseline and an SSR model briefly and write figures", "dmlnb.demo:add_parser"),
    "study": ("run the baseline-vs-SSR study (a papermill sweep) and report it", "dmlnb.study:add_parser"),
    "figures": ("execute the notebooks and write their figures", "dmlnb.figures:add_parser"),
    "recipe": ("the paper's protocol on the real benchmarks (GPU)", "dmlnb.recipe:add_parser"),
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The ``dmlnb`` argument parser. ``command`` given: that subcommand's full parser (its
    module imported) and one-line entries for the others; ``None``: every subcommand in full."""
    import importlib

    parser = argparse.ArgumentParser(
        prog="dmlnb",
        description="Deep Metric Learning with Self-Supervised Ranking (Fu et al., AAAI 2021)",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (help_text, where) in COMMANDS.items():
        if command is None or command == name:
            module, func = where.split(":")
            getattr(importlib.import_module(module), func)(subparsers)
        else:
            subparsers.add_parser(name, help=help_text)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``dmlnb`` console script; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in argv if not a.startswith("-")), "")
    parser = build_parser(command if command in COMMANDS else "")
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError, FileExistsError, FloatingPointError,
            RunLockedError) as err:
        print(f"dmlnb {args.command}: error: {err}", file=sys.stderr)
        return 2

