"""``apretrieval train``: train a retrieval model from a YAML recipe plus command-line overrides.

Every TrainConfig field is a flag: ``num_bins`` -> ``--num-bins 20``; values are read as YAML
scalars/lists (``--crop-scale [0.3,1]``, ``--out-dim null``).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from typing import Any

import yaml

from apretrieval.train_config import TrainConfig


def _yaml_value(text: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise argparse.ArgumentTypeError(f"not a YAML value: {text!r} ({err})") from None


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "train",
        help="train a model (multistaged backpropagation, AP loss by default)",
        description="Train per a YAML recipe; any recipe key can be overridden as --key VALUE.",
    )
    p.add_argument("--config", "-c", help="YAML recipe (e.g. configs/cpu-small.yaml)")
    p.add_argument("--resume", action="store_true",
                   help="continue from <output-dir>/checkpoint.pt when it exists")
    p.add_argument("--print-config", action="store_true",
                   help="print the resolved config as YAML and exit")
    group = p.add_argument_group("recipe overrides (see TrainConfig)")
    for f in dataclasses.fields(TrainConfig):
        if f.name == "extra":
            continue
        group.add_argument(
            "--" + f.name.replace("_", "-"), dest=f.name, type=_yaml_value,
            default=argparse.SUPPRESS, metavar="VALUE",
        )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    overrides = {k: v for k, v in vars(args).items() if k in names}
    if args.config:
        cfg = TrainConfig.from_yaml(args.config, overrides)
    else:
        cfg = TrainConfig.from_dict(overrides)
    if args.print_config:
        yaml.safe_dump(cfg.to_dict(), sys.stdout, sort_keys=False)
        return 0
    from apretrieval.distributed import shutdown_distributed
    from apretrieval.training import train  # heavy imports only when training

    # Under `torchrun --nproc-per-node N` every process runs this command: train() joins the
    # process group from torchrun's environment and rank 0 writes the files.
    final = train(cfg, resume=args.resume)
    shutdown_distributed()
    if os.environ.get("RANK", "0") == "0":
        print(f"model written to {final}")
    return 0
