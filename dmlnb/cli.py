"""The ``dmlnb`` command: ``dmlnb train | eval | runs`` plus the subcommands of optional modules.

``dmlnb train`` has one flag per :class:`~dmlnb.config.TrainConfig` field, generated from the
dataclass (``dmlnb train --help`` lists them with their defaults). Settings are layered:
field defaults < ``--preset NAME`` < ``--config FILE.json`` < explicit flags. Flags are spelled
as the fields (``--ssr_prob 0.5``; ``--ssr-prob`` works too); booleans take ``--ssr`` /
``--no-ssr``; lists take several values (``--ssr_families crop color``); dicts take JSON
(``--loss_params '{"margin": 0.1}'``); optional values take ``none``.

Other subcommands come from modules that register them with ``add_parser(subparsers)`` when they
import: :mod:`dmlnb.data.cli` (data), :mod:`dmlnb.sweep` (sweep), :mod:`dmlnb.demo` (demo),
:mod:`dmlnb.study` (study), :mod:`dmlnb.figures` (figures), :mod:`dmlnb.recipe` (recipe). A module that does not exist is
skipped; any other import error is raised.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import sys
from collections.abc import Sequence
from typing import Any

from dmlnb import config as C
from dmlnb.config import PRESETS, TrainConfig, field_names

OPTIONAL_SUBCOMMANDS = ("dmlnb.data.cli", "dmlnb.sweep", "dmlnb.demo", "dmlnb.study",
                        "dmlnb.figures", "dmlnb.recipe")


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


def _add_field(parser: argparse.ArgumentParser, f: dataclasses.Field, default: Any) -> None:
    flags = [f"--{f.name}"]
    if "_" in f.name:
        flags.append(f"--{f.name.replace('_', '-')}")
    hint = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
    shown = json.dumps(list(default)) if isinstance(default, tuple) else json.dumps(default)
    help_text = f"(default: {shown})"
    kw: dict[str, Any] = {"dest": f.name, "default": argparse.SUPPRESS}
    if hint == "bool":
        parser.add_argument(*flags, action=argparse.BooleanOptionalAction, help=help_text, **kw)
        return
    if hint == "bool | None":
        kw.update(type=_optional_bool, metavar="{true,false,auto}")
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
    if f.name in _CHOICES:
        help_text = f"one of {', '.join(map(str, _CHOICES[f.name]))} {help_text}"
    if f.name in _HELP:
        help_text = f"{_HELP[f.name]}; {help_text}"
    parser.add_argument(*flags, help=help_text, **kw)


# what a field means, in the paper's words (the TrainConfig docstring has the full story)
_HELP = {
    "dataset": "a name of dmlnb.data.dataset_names()",
    "data_root": "folder of a real benchmark",
    "dataset_options": "loader options, e.g. {\"max_per_class\": 50}",
    "loss_params": "keyword parameters of the DML loss",
    "ssr": "add the self-supervised ranking loss",
    "ssr_prob": "p, probability that the SSR branch runs in an iteration",
    "ssr_weight": "gamma in L = L_metric + gamma L_rank",
    "ssr_levels": "N, views of increasing strength per image",
    "ssr_images": "M, images of the (global) batch that get views",
    "ssr_sigma": "strength schedule t_n = tanh(sigma n)",
    "ssr_nested": "view n+1 continues view n's random direction",
    "rank_scale": "s of the ranking loss", "rank_alpha": "list-wise margin alpha",
    "rank_beta": "point-wise floor beta", "rank_pos_weight": "lambda_r, weight of the floor",
    "steps_per_epoch": "cap on iterations per epoch (none: a full epoch)",
    "max_steps": "cap on iterations of the whole run",
    "batch_size": "images per global batch (classes x samples_per_class)",
    "pretrained": "ImageNet weights (needs internet once)",
    "freeze_bn": "BatchNorm statistics frozen (auto: ResNets yes, smallcnn no)",
    "freeze_stages": "freeze the first k backbone stages",
    "augment": "random crop (+ flip, not for characters) on the training split",
    "lr": "backbone learning rate (AdamW)", "head_lr_mult": "heads at lr x this",
    "lr_milestones": "step schedule: fractions of the run where lr *= lr_decay",
    "select_metric": "validation metric that picks the best checkpoint",
    "eval_test_each_epoch": "also log test metrics per epoch (curves only)",
    "eval_checkpoint": "weights of the final test evaluation",
    "amp": "autocast on CUDA", "run_dir": "none: a new folder under runs_root",
    "resume": "continue the run in run_dir from its last checkpoint",
    "checkpoint_every": "extra checkpoints every N steps (0: at epoch ends)",
    "quiet": "no progress bars",
}

# finite sets shown in --help (the config validates them, with the same lists, after parsing)
_CHOICES = {
    "loss": C.LOSS_NAMES, "backbone": C.BACKBONE_NAMES, "pooling": C.POOLINGS,
    "ssr_families": C.VIEW_FAMILIES, "ssr_pairs": C.RANK_PAIR_CHOICES, "schedule": C.SCHEDULES,
    "amp": C.AMP_CHOICES, "device": (*C.DEVICE_CHOICES, "cuda:N"),
    "select_metric": C.SELECT_METRICS, "eval_checkpoint": C.CHECKPOINT_CHOICES,
    "train_split": C.SPLIT_CHOICES, "val_split": (*C.SPLIT_CHOICES, "none"),
    "test_split": C.SPLIT_CHOICES,
}


def _add_train_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "train", help="train a model (L = L_metric + gamma L_rank) and evaluate it",
        description="Train with dmlnb.train.fit. Layers: defaults < --preset < --config < flags.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--preset", choices=sorted(PRESETS), default=None,
                   help="the paper's settings for a benchmark (ResNet-50, 224 px)")
    p.add_argument("--config", dest="config_file", default=None, metavar="FILE.json",
                   help="a JSON file of config fields (e.g. a run's config.json)")
    p.add_argument("--print-config", action="store_true",
                   help="print the resulting config as JSON and exit without training")
    defaults = TrainConfig()
    group = p.add_argument_group("config fields (dmlnb.config.TrainConfig)")
    for f in dataclasses.fields(TrainConfig):
        _add_field(group, f, getattr(defaults, f.name))
    p.set_defaults(func=_cmd_train)


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The :class:`TrainConfig` of parsed ``dmlnb train`` arguments (layers as documented)."""
    d: dict[str, Any] = {}
    if args.preset:
        d.update(PRESETS[args.preset])
    if args.config_file:
        with open(args.config_file, encoding="utf-8") as fh:
            d.update(json.load(fh))
    for name in field_names():
        if hasattr(args, name):
            d[name] = getattr(args, name)
    return TrainConfig.from_dict(d)


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
    from dmlnb.train import evaluate_run, resolve_device

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


def build_parser() -> argparse.ArgumentParser:
    """The ``dmlnb`` argument parser, with the optional modules' subcommands when present."""
    parser = argparse.ArgumentParser(
        prog="dmlnb",
        description="Deep Metric Learning with Self-Supervised Ranking (Fu et al., AAAI 2021)",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_train_parser(subparsers)
    _add_eval_parser(subparsers)
    _add_runs_parser(subparsers)
    for name in OPTIONAL_SUBCOMMANDS:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as err:
            if err.name != name:  # the module exists but something it needs is missing
                raise
            continue
        add = getattr(module, "add_parser", None)
        if add is not None:
            add(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``dmlnb`` console script; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError, FileExistsError, FloatingPointError) as err:
        print(f"dmlnb {args.command}: error: {err}", file=sys.stderr)
        return 2

