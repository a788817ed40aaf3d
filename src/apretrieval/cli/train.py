"""``apretrieval train``: train a retrieval model from a YAML recipe plus command-line overrides.

Every TrainConfig field is a flag (``num_bins`` -> ``--num-bins 20``) whose help text, unit,
default and allowed values come from the field's documentation in :mod:`apretrieval.train_config`,
grouped as the config is (data, model, loss, optimisation, run). Values are read as YAML scalars
or as a person types them: ``--crop-scale 0.5,1.0``, ``--pretrained none``, ``--square true``.

Without ``--config`` the recipe is chosen by device: the TrainConfig defaults (the paper's GPU
setting) when a GPU will be used, else the bundled ``cpu-small`` recipe; the choice is printed.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import textwrap
import typing
from typing import Any

import yaml

from apretrieval.configs import bundled_recipes, recipe_path
from apretrieval.recipe_values import read_yaml_mapping
from apretrieval.train_config import GROUPS, TrainConfig

_DEBUG_HELP = "on an error, print the full traceback (also: APRETRIEVAL_DEBUG=1)"

CPU_RECIPE = "cpu-small"
_GROUP_TITLES = {
    "data": "data and augmentation",
    "model": "model",
    "loss": "loss",
    "optimisation": "optimisation (batches, Adam, schedule)",
    "validation": "validation during training (Medium/Hard mAP, best model kept)",
    "run": "run",
}


def _yaml_value(text: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text  # not a YAML scalar: TrainConfig validates it as typed text


def _metavar(f: dataclasses.Field[Any], hint: Any) -> str:
    choices = f.metadata.get("choices")
    if choices:
        return "{" + ",".join("none" if c is None else str(c) for c in choices) + "}"
    args = typing.get_args(hint)
    optional = "|none" if type(None) in args else ""
    if f.name in ("data", "image_root", "weights", "output_dir"):
        return "PATH"
    if f.name == "val_root":
        return "DIR" + optional
    if f.name == "val_dataset":
        return "NAME|PKL" + optional
    base = next((a for a in args if a is not type(None)), hint) if optional else hint
    if typing.get_origin(base) is tuple:
        return "MIN,MAX"
    names = {bool: "BOOL", int: "N", float: "X", str: "NAME"}
    return names.get(base, "VALUE") + optional


def _shown(value: Any) -> str:
    if value is None:
        return "none"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, tuple | list):
        return ",".join(f"{v:g}" for v in value)
    return repr(value) if value == "" else str(value)


def option_help(f: dataclasses.Field[Any], default: Any = dataclasses.MISSING) -> str:
    """One field's help: meaning [unit]; default (``default``: a recipe's value, else
    TrainConfig's)."""
    unit = f.metadata.get("unit")
    text = f.metadata["doc"] + (f" [{unit}]" if unit else "")
    shown = f.default if default is dataclasses.MISSING else default
    return f"{text} (default: {_shown(shown)})".replace("%", "%%")


def option_names(f: dataclasses.Field[Any]) -> list[str]:
    """``--num-bins`` for ``num_bins``, then the field's other accepted spellings."""
    return ["--" + f.name.replace("_", "-"), *f.metadata.get("aliases", ())]


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "train",
        help="train a model (multistaged backpropagation, AP loss by default)",
        add_help=False,  # --help is answered by run(): it shows the --config recipe's values
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_options(p, recipe=None)
    p.set_defaults(func=run)


def _add_options(p: argparse.ArgumentParser, recipe: str | None) -> None:
    """Every option of ``train``; the defaults shown are ``recipe``'s where it sets them."""
    recipes = ", ".join(bundled_recipes())
    values: dict[str, Any] = {}
    if recipe is None:
        shown = (
            "Defaults below are TrainConfig's (the paper's GPU setting); "
            "--config NAME --help shows that recipe's."
        )
    else:
        values = read_yaml_mapping(recipe_path(recipe))
        shown = f"Defaults below are those of the recipe {recipe} ({recipe_path(recipe)})."
    p.description = textwrap.fill(
        "Train per a YAML recipe; every recipe key can be overridden as --key VALUE. "
        f"Bundled recipes (--config NAME): {recipes}. Without --config: the paper's GPU "
        f"setting when a GPU is used, else {CPU_RECIPE}. {shown}",
        width=96,
    )
    p.add_argument("-h", "--help", action="store_true", help="show this help message and exit")
    p.add_argument(
        "--config",
        "-c",
        metavar="RECIPE",
        help=f"YAML recipe: a file, or a bundled name ({recipes})",
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue from <output-dir>/checkpoint.pt when it exists",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the earlier run in <output-dir> (refused without --resume or this flag)",
    )
    p.add_argument(
        "--print-config",
        action="store_true",
        help="print the resolved config as YAML and exit (--data not needed)",
    )
    p.add_argument(
        "--no-progress",
        dest="progress",
        action="store_false",
        default=argparse.SUPPRESS,
        help="no progress bar (same as --progress false)",
    )
    groups = {g: p.add_argument_group(_GROUP_TITLES[g]) for g in GROUPS}
    hints = typing.get_type_hints(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        if f.name == "extra":
            continue
        groups[f.metadata["group"]].add_argument(
            *option_names(f),
            dest=f.name,
            type=_yaml_value,
            default=argparse.SUPPRESS,
            metavar=_metavar(f, hints[f.name]),
            help=option_help(f, values.get(f.name, dataclasses.MISSING)),
        )


def recipe_help(recipe: str | None) -> str:
    """``train --help`` text, with ``recipe``'s values as the defaults when one is given."""
    p = argparse.ArgumentParser(
        prog="apretrieval train",
        add_help=False,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_options(p, recipe)
    p.add_argument("--debug", action="store_true", help=_DEBUG_HELP)
    return p.format_help()


def _default_recipe(device: str) -> str | None:
    """The bundled recipe for a run without --config: None (TrainConfig's GPU defaults)."""
    if device == "cpu":
        return CPU_RECIPE
    if device.startswith("cuda"):
        return None
    import torch

    return None if torch.cuda.is_available() else CPU_RECIPE


def resolve_config(args: argparse.Namespace, *, require_data: bool = True) -> TrainConfig:
    """The TrainConfig the command line describes (recipe, then --key overrides)."""
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    overrides = {k: v for k, v in vars(args).items() if k in names}
    config = args.config
    if config is None:
        device = str(overrides.get("device", "auto"))
        config = _default_recipe(device)
        where = f"the bundled recipe {config!r}" if config else "the paper's GPU setting"
        why = "no GPU" if config else "a GPU is available"
        print(
            f"apretrieval train: no --config given: using {where} ({why}; "
            f"choose with --config NAME or a YAML file)",
            file=sys.stderr,
        )
    if config is None:
        return TrainConfig.from_dict(overrides, require_data=require_data)
    return TrainConfig.from_yaml(config, overrides, require_data=require_data)


def run(args: argparse.Namespace) -> int:
    if args.help:
        print(recipe_help(args.config), end="")
        return 0
    cfg = resolve_config(args, require_data=not args.print_config)
    if args.print_config:
        yaml.safe_dump(cfg.to_dict(), sys.stdout, sort_keys=False)
        return 0
    from apretrieval.distributed import shutdown_distributed
    from apretrieval.training import train  # heavy imports only when training

    # Under `torchrun --nproc-per-node N` every process runs this command: train() joins the
    # process group from torchrun's environment and rank 0 writes the files.
    final = train(cfg, resume=args.resume, overwrite=args.overwrite)
    shutdown_distributed()
    if os.environ.get("RANK", "0") == "0":
        print(f"model written to {final}")
    return 0
