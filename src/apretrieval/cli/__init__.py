"""`apretrieval` command line: one module per subcommand, each exposing ``register(subparsers)``."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

# Subcommand modules under apretrieval.cli, in the order `--help` lists them.
COMMANDS: tuple[str, ...] = (
    "demo",
    "download",
    "evaluate",
    "extract",
    "index",
    "report",
    "search",
    "train",
)


def build_parser() -> argparse.ArgumentParser:
    from apretrieval import __version__

    parser = argparse.ArgumentParser(
        prog="apretrieval",
        description="Train and evaluate image retrieval with a listwise Average-Precision loss.",
    )
    parser.add_argument("--version", action="version", version=f"apretrieval {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"apretrieval.cli.{name}").register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the process exit code (2 for bad input, 130 when interrupted)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except ValueError as err:  # bad user input: one clear line, no traceback
        print(f"apretrieval {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"apretrieval {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
