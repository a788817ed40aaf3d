"""How the command line reports a failure: one line (what, where, what to do) and an exit status.

Exit status 2: the command was given something it cannot use (a ``ValueError`` from argument or
config validation, an unreadable recipe). Exit status 1: the run failed (a file could not be
read or written, a corrupt input, the machine lacks what was asked for). An exception may carry
its own ``exit_code`` attribute (e.g. ``models.CheckpointError``: a ValueError whose status is 1).

Third-party exception types are recognised by name so that this module imports neither torch,
Pillow nor yaml: the error layer must not be what makes a failing command slow.
"""

from __future__ import annotations

import errno

__all__ = ["describe"]

USAGE, FAILURE = 2, 1
_DEBUG_HINT = "run with --debug for the traceback"
# What a person can do about an OSError, by errno.
_OS_ADVICE: dict[int, str] = {
    errno.EACCES: "check the permissions or choose another location",
    errno.EPERM: "check the permissions or choose another location",
    errno.EROFS: "the file system is read-only: choose another location",
    errno.ENOSPC: "free some disk space or choose another location",
    errno.EDQUOT: "the disk quota is exhausted: free some space or choose another location",
    errno.ENOTDIR: "a part of the path is a file, not a folder: choose another path",
    errno.EISDIR: "it is a folder, a file was expected: choose a file path",
    errno.EEXIST: "it exists already: remove it or choose another path",
    errno.ENOENT: "check the path",
    errno.EMFILE: "too many open files: lower --workers or raise `ulimit -n`",
}


def describe(err: BaseException, *, debug: bool = False) -> tuple[str, int]:
    """(one-line message, exit status) for ``err``, an exception a command raised."""
    name = type(err).__name__
    hint = "" if debug else f" ({_DEBUG_HINT})"
    status = getattr(err, "exit_code", None)
    if _from_worker(err):
        # DataLoader re-raises a worker's exception with the worker's traceback as its text.
        return f"in a data-loading worker: {_last_line(str(err))}", status or FAILURE
    if name == "DecompressionBombError":  # Pillow's guard against huge images
        return (
            f"{_one_line(err)}; the image is too large to decode safely: remove it from the input",
            status or FAILURE,
        )
    if _is_yaml_error(err):
        return f"not valid YAML: {_one_line(err)}", status or USAGE
    if isinstance(err, OSError):
        return _describe_os_error(err), status or FAILURE
    if isinstance(err, ValueError):
        return _one_line(err), status or USAGE
    if name == "OutOfMemoryError" or "out of memory" in str(err):
        return (
            "the device ran out of memory: lower --chunk-size or --batch-size (train) or "
            "--batch-size / --max-side (extract, evaluate)",
            status or FAILURE,
        )
    if isinstance(err, AssertionError | RuntimeError) and _mentions_cuda(err):
        return (
            "CUDA is not available on this machine (no GPU or driver, or a CPU-only torch): "
            "use --device cpu or --device auto",
            status or FAILURE,
        )
    if isinstance(err, OverflowError):
        return f"a value is out of range: {_one_line(err)}", status or USAGE
    return f"{name}: {_one_line(err)}{hint}", status or FAILURE


def _describe_os_error(err: OSError) -> str:
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        return _describe_full_disk(err)
    where = err.filename if err.filename is not None else None
    what = err.strerror or _one_line(err) or type(err).__name__
    if where is not None and err.filename2 is not None:
        where = f"{where} -> {err.filename2}"
    advice = _OS_ADVICE.get(err.errno or -1)
    text = f"{where}: {what}" if where is not None else what
    return f"{text}; {advice}" if advice else text


def _describe_full_disk(err: OSError) -> str:
    """``no space left on DEVICE writing FILE``: where the space ran out, and in what file."""
    from apretrieval.atomic import mount_point  # a foundation module: no torch, no Pillow

    what = "no space left" if err.errno == errno.ENOSPC else "the disk quota is exhausted"
    if err.filename is None:
        return f"{what} on the device; {_OS_ADVICE[errno.ENOSPC]}"
    return (
        f"{what} on {mount_point(err.filename)} writing {err.filename}; {_OS_ADVICE[errno.ENOSPC]}"
    )


def _one_line(err: BaseException) -> str:
    """The exception's text on one line (long texts cut: the traceback has them in full)."""
    text = " ".join(str(err).split())
    if len(text) > 400:
        text = text[:400] + "..."
    return text or type(err).__name__


def _last_line(text: str) -> str:
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return " ".join(lines[-1].split()) if lines else text


def _from_worker(err: BaseException) -> bool:
    return "Original Traceback (most recent call last)" in str(err)


def _is_yaml_error(err: BaseException) -> bool:
    return any(
        c.__module__.split(".")[0] == "yaml" and c.__name__ == "YAMLError"
        for c in type(err).__mro__
    )


def _mentions_cuda(err: BaseException) -> bool:
    text = str(err)
    return "CUDA" in text or "NVIDIA driver" in text
