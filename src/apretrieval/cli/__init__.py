"""`apretrieval` command line: one module per subcommand, each exposing ``register(subparsers)``.

Only the module of the command being run is imported (``apretrieval --help`` imports none of
them, hence no torch): the one-line summaries of the command list live in :data:`COMMANDS`.

Errors: :func:`main` is the one place that turns an exception into an exit status and one line
on stderr (``apretrieval CMD: error: what, where; what to do``); see :mod:`apretrieval.cli.errors`.
``--debug`` (anywhere on the line) or ``APRETRIEVAL_DEBUG=1`` also prints the traceback.
"""

from __future__ import annotations

import argparse
import difflib
import importlib
import io
import os
import sys
import traceback
from collections.abc import Iterable, Sequence
from typing import NoReturn

from apretrieval.cli.errors import describe

# Subcommand -> its one-line summary, in the order `--help` lists them.
COMMANDS: dict[str, str] = {
    "convert": "convert a released dirtorch / cirtorch model into an apretrieval checkpoint",
    "demo": "offline CPU demo: AP-loss fine-tuning vs pretrained vs contrastive",
    "download": "download a benchmark (ROxford5k, RParis6k, R1M) or training set (SfM-120k, GLDv2)",
    "evaluate": "evaluate a checkpoint on ROxford5k / RParis6k (Easy, Medium, Hard)",
    "export": "export a checkpoint's descriptor network to TorchScript or ONNX",
    "extract": "extract descriptors of a benchmark or an image folder",
    "index": "build a search index from extracted descriptors (faiss)",
    "report": "write an HTML report of a results file (what the model retrieves)",
    "search": "search an index with query images",
    "train": "train a model (multistaged backpropagation, AP loss by default)",
    "whiten": "learn a whitening from matching pairs (SfM-120k) for evaluate --whiten",
}
_DEBUG_HELP = "on an error, print the full traceback (also: APRETRIEVAL_DEBUG=1)"
_THREADS_HELP = (
    "torch CPU threads (default: OMP_NUM_THREADS if set, else the cores this process may use "
    "minus loader workers and minus the cores other programs keep busy, at least 1)"
)


def build_parser(commands: Iterable[str] | None = None) -> argparse.ArgumentParser:
    """The parser; subcommands in ``commands`` (default: all) get their full options.

    The others are listed by name and summary only, so their modules are not imported.
    """
    from apretrieval import __version__

    full = set(COMMANDS if commands is None else commands)
    parser = argparse.ArgumentParser(
        prog="apretrieval",
        description="Train and evaluate image retrieval with a listwise Average-Precision loss.",
    )
    parser.add_argument("--version", action="version", version=f"apretrieval {__version__}")
    parser.add_argument("--debug", action="store_true", help=_DEBUG_HELP)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, summary in COMMANDS.items():
        if name in full:
            importlib.import_module(f"apretrieval.cli.{name}").register(sub)
        else:
            sub.add_parser(name, help=summary, add_help=False)
    for p in _subparsers(parser):
        if "--debug" not in p._option_string_actions:
            p.add_argument(
                "--debug", action="store_true", default=argparse.SUPPRESS, help=_DEBUG_HELP
            )
        if "--threads" not in p._option_string_actions:
            p.add_argument("--threads", type=int, metavar="N", default=None, help=_THREADS_HELP)
    return parser


# The commands whose work runs on CPU threads (networks, products, faiss) say their thread plan;
# the others (report, convert, download, index info) take --threads silently.
_COMPUTING = ("evaluate", "export", "extract", "index build", "search", "whiten")


def _apply_threads(args: argparse.Namespace) -> None:
    """One thread budget for commands without their own (see :mod:`apretrieval.threads`)."""
    if args.command in ("train", "demo") or not hasattr(args, "threads"):
        return  # these two size threads from their run configuration
    from apretrieval.threads import apply_threads, plan_threads

    words = " ".join(w for w in (args.command, getattr(args, "index_command", None)) if w)
    workers = getattr(args, "workers", 0) or 0
    plan = plan_threads(args.threads, workers=workers)
    apply_threads(plan)
    if words in _COMPUTING:
        print(f"apretrieval {words}: {plan.describe()}", file=sys.stderr)


def _subparsers(parser: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
    """Every subcommand parser below ``parser``, nested ones included."""
    found = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for p in dict.fromkeys(action.choices.values()):  # aliases map to the same parser
                found += [p, *_subparsers(p)]
    return found


def _command_in(argv: Sequence[str]) -> str | None:
    """The subcommand named on the line: the first word that is not an option."""
    return next((a for a in argv if not a.startswith("-")), None)


def _command_parser(
    parser: argparse.ArgumentParser, argv: Sequence[str]
) -> argparse.ArgumentParser:
    """The deepest (sub)parser the words of ``argv`` select, for its usage line."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for i, word in enumerate(argv):
                if word in action.choices:
                    return _command_parser(action.choices[word], argv[i + 1 :])
    return parser


def _reject_unknown(
    parser: argparse.ArgumentParser, argv: Sequence[str], extra: list[str]
) -> NoReturn:
    """Usage error from the command's own parser, with a "did you mean" for option typos."""
    target = _command_parser(parser, argv)
    msg = f"unrecognized arguments: {' '.join(extra)}"
    options = [o for o in target._option_string_actions if o.startswith("--")]
    for word in extra:
        close = difflib.get_close_matches(word.split("=")[0], options, n=1, cutoff=0.6)
        if word.startswith("-") and close:
            msg += f" (did you mean {close[0]}?)"
            break
    target.error(msg)


def _printable_paths() -> None:
    """Print a file name that is not valid UTF-8 with its odd bytes as ``\\xNN`` rather than
    fail on it: stdout's strict error handler (a UTF-8 locale) cannot encode such a name."""
    stream = sys.stdout
    if isinstance(stream, io.TextIOWrapper) and stream.errors == "strict":
        stream.reconfigure(errors="backslashreplace")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the process exit status.

    0 success, 1 runtime failure (a file, the machine, a corrupt input), 2 bad usage or bad
    values (argparse, ``ValueError``), 130 interrupted.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    _printable_paths()
    command = _command_in(argv)
    if command is not None and command not in COMMANDS:
        close = difflib.get_close_matches(command, COMMANDS, n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        print(
            f"apretrieval: error: unknown command {command!r}{hint}; "
            f"choose from {', '.join(COMMANDS)}",
            file=sys.stderr,
        )
        return 2
    debug = "--debug" in argv or os.environ.get("APRETRIEVAL_DEBUG", "") not in ("", "0")
    parser = build_parser([command] if command else [])
    try:
        args, extra = parser.parse_known_args(argv)
        if extra:
            _reject_unknown(parser, argv, extra)
    except SystemExit as stop:  # argparse: --help, --version (0) or a usage error (2)
        return stop.code if isinstance(stop.code, int) else 2
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        _apply_threads(args)
        return int(args.func(args) or 0)
    except KeyboardInterrupt as err:
        detail = str(err)
        print(
            f"apretrieval {args.command}: interrupted" + (f": {detail}" if detail else ""),
            file=sys.stderr,
        )
        return 130
    except Exception as err:  # the one error layer: one line, an exit status
        if debug:
            traceback.print_exc()
        message, status = describe(err, debug=debug)
        print(f"apretrieval {args.command}: error: {message}", file=sys.stderr)
        return status


if __name__ == "__main__":
    sys.exit(main())
