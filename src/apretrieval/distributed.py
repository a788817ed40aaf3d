"""Multistaged backpropagation across processes with ``torch.distributed`` (launched by torchrun).

One step over a global batch of B images on W ranks (rank r holds a contiguous shard):

1. stage 1 on the rank's shard (no autograd), then all-gather descriptors and labels (shards
   may differ in size, e.g. images that failed to load), so every rank holds the whole batch in
   the single-process order (rank 0's images first);
2. stage 2: the loss and dL/dD (B, D) over the whole batch, computed by every rank, sliced;
3. stage 3 on the rank's shard with its rows of dL/dD, then parameter gradients all-reduced
   with SUM: dL/dD is already the gradient of the one global loss (its 1 / #queries factor
   covers the whole batch), so the single-process gradient sum_i (dL/dd_i)^T dd_i/dTheta is the
   sum of the per-rank partial sums. A mean would divide the update by W.

Why stage 2 computes all B rows on every rank instead of only its own: a rank's rows of dL/dD
get contributions from its own queries (|R| x B scores) *and* from every other query ranking its
items, and a query's gradient depends on that query's whole histogram. Computing only the own
queries would therefore need a reduce-scatter of a (B, D) partial gradient (B D floats per rank
per step) to save (W - 1) / W of a cost that is negligible: at the paper's setting (B = 4096,
D = 2048) stage 2 is ~0.2 TFLOP (three B x B x D products), against ~200 TFLOP per rank for
stages 1 and 3 (512 ResNet-101 images at 800 px on 8 ranks). Redundant compute is simpler, needs
no extra communication and gives every rank a bit-identical loss.

Why not DistributedDataParallel: its hooks all-reduce during every backward call, but stage 3
calls backward once per chunk and ranks may hold different numbers of chunks (unequal shards);
one explicit all-reduce after stage 3 is both simpler and exactly one gradient exchange.

Every rank draws the same global batch (seeded sampler) and must take the same steps; a rank
that fails in stage 1 or 3 reports it through the next collective so the others raise at once,
and a rank that hangs or dies makes the others fail after ``timeout_s`` (gloo/NCCL timeouts)
with a :class:`DistributedError` instead of waiting forever.

With a memory bank (``losses.memory_bank``), every rank pushes the same gathered batch, so
all ranks hold the same bank. One process (world size 1) is the plain ``multistage_step``.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from apretrieval.losses.memory_bank import MemoryBank
from apretrieval.multistage import (
    Inputs,
    StepResult,
    backward_descriptor_grads,
    check_replayable,
    compute_descriptors,
    descriptor_loss_grads,
    multistage_step,
)

__all__ = [
    "BACKENDS",
    "DistContext",
    "DistributedError",
    "all_reduce_gradients",
    "barrier",
    "broadcast_model",
    "distributed_multistage_backward",
    "gather_rows",
    "init_distributed",
    "shard_bounds",
    "shutdown_distributed",
    "sync_stop",
]

BACKENDS = ("auto", "gloo", "nccl")
# Gradient all-reduce in buckets of this many bytes: bounds the extra flat copy.
_BUCKET_BYTES = 64 * 2**20


class DistributedError(RuntimeError):
    """A collective failed: another rank crashed, raised, hung past the timeout or left."""


@dataclass(frozen=True)
class DistContext:
    """Where this process stands: rank r of ``world_size``; ``device`` runs the model.

    ``group``: the process group used (None: the default group). ``owns_group``: this context
    created the default group, so ``shutdown_distributed`` destroys it.
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    timeout_s: float = 600.0
    group: Any = None
    owns_group: bool = False

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that writes checkpoints, logs and progress."""
        return self.rank == 0

    @property
    def comm_device(self) -> torch.device:
        """NCCL exchanges device tensors; gloo exchanges CPU tensors."""
        return self.device if self.backend == "nccl" else torch.device("cpu")


def _env_int(name: str, default: int | None = None) -> int:
    value = os.environ.get(name)
    if value is None:
        if default is None:
            raise ValueError(f"environment variable {name} is not set (launch with torchrun)")
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name} must be an integer, got {value!r}") from None


def _rank_device(device: str | torch.device, local_rank: int, world_size: int) -> torch.device:
    """``auto``/``cuda`` -> this rank's GPU ``cuda:LOCAL_RANK`` when there are several ranks."""
    name = str(device)
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and world_size > 1:
        if local_rank >= torch.cuda.device_count():
            raise ValueError(
                f"LOCAL_RANK={local_rank} but only {torch.cuda.device_count()} GPU(s) visible"
            )
        name = f"cuda:{local_rank}"
    return torch.device(name)


def init_distributed(
    backend: str = "auto", timeout_s: float = 600.0, device: str | torch.device = "auto"
) -> DistContext:
    """Join the process group described by torchrun's variables, or run alone without them.

    WORLD_SIZE unset or 1: a single-process context (no group). Otherwise RANK, LOCAL_RANK,
    MASTER_ADDR and MASTER_PORT must be set (torchrun does, also across nodes). ``backend``:
    ``auto`` picks NCCL for a CUDA device and gloo otherwise. ``timeout_s`` bounds every
    collective, so a hung or dead rank stops the others with an error. An existing default
    group (initialised by the caller) is reused as is.
    """
    if backend not in BACKENDS:
        raise ValueError(f"dist_backend must be one of {list(BACKENDS)}, got {backend!r}")
    if not timeout_s > 0:
        raise ValueError(f"dist_timeout must be > 0 seconds, got {timeout_s!r}")
    if dist.is_available() and dist.is_initialized():
        world, rank = dist.get_world_size(), dist.get_rank()
        local = _env_int("LOCAL_RANK", rank)
        dev = _rank_device(device, local, world)
        return DistContext(rank, world, local, dist.get_backend(), dev, timeout_s)
    world = _env_int("WORLD_SIZE", 1)
    if world < 1:
        raise ValueError(f"WORLD_SIZE must be >= 1, got {world}")
    if world == 1:
        return DistContext(device=_rank_device(device, 0, 1), timeout_s=timeout_s)
    if not dist.is_available():
        raise ValueError("this torch build has no torch.distributed support")
    rank, local = _env_int("RANK"), _env_int("LOCAL_RANK")
    for name in ("MASTER_ADDR", "MASTER_PORT"):
        if name not in os.environ:
            raise ValueError(f"environment variable {name} is not set (launch with torchrun)")
    dev = _rank_device(device, local, world)
    if backend == "auto":
        backend = "nccl" if dev.type == "cuda" and dist.is_nccl_available() else "gloo"
    if backend == "nccl" and dev.type != "cuda":
        raise ValueError(f"the nccl backend needs a CUDA device, got device {str(dev)!r}")
    if dev.type == "cuda":
        torch.cuda.set_device(dev)  # NCCL and the objects of all_gather_object use it
    dist.init_process_group(
        backend, rank=rank, world_size=world, timeout=datetime.timedelta(seconds=timeout_s)
    )
    return DistContext(rank, world, local, backend, dev, timeout_s, owns_group=True)


def shutdown_distributed(ctx: DistContext | None = None) -> None:
    """Destroy the default process group if ``ctx`` created it; ``ctx=None``: whoever did
    (the end of a program). No-op without a group."""
    if (ctx is None or ctx.owns_group) and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier(ctx: DistContext) -> None:
    """Wait for every rank (e.g. until rank 0 has written the final model)."""
    if ctx.world_size > 1:
        _collective(ctx, "barrier", lambda: dist.barrier(group=ctx.group))


def shard_bounds(n: int, rank: int, world_size: int) -> tuple[int, int]:
    """[start, stop) of rank's contiguous shard of n items; sizes differ by at most one."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
    base, extra = divmod(n, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (rank < extra)


# --------------------------------------------------------------------------------------------
# Collectives with errors that say what happened.


def _collective(ctx: DistContext, what: str, fn: Callable[[], Any]) -> Any:
    try:
        return fn()
    except DistributedError:
        raise
    except Exception as err:  # gloo/NCCL raise RuntimeError (or DistBackendError) subclasses
        first = str(err).strip().splitlines()[0][:300] if str(err).strip() else type(err).__name__
        raise DistributedError(
            f"rank {ctx.rank}/{ctx.world_size}: {what} failed ({first}). Another rank crashed, "
            f"raised, or did not reach this point within the {ctx.timeout_s:g} s timeout; "
            "see the other ranks' logs"
        ) from err


def _all_gather(ctx: DistContext, x: Tensor, what: str) -> list[Tensor]:
    out = [torch.empty_like(x) for _ in range(ctx.world_size)]
    _collective(ctx, what, lambda: dist.all_gather(out, x, group=ctx.group))
    return out


def _raise_if_any_failed(
    ctx: DistContext, failed: Sequence[int], error: BaseException | None, stage: str
) -> None:
    """Every rank learns which ranks failed; the failed ones re-raise, the others explain."""
    if not any(failed):
        return
    messages: list[Any] = [None] * ctx.world_size
    mine = f"{type(error).__name__}: {error}" if error is not None else None
    _collective(
        ctx,
        f"{stage} error exchange",
        lambda: dist.all_gather_object(messages, mine, group=ctx.group),
    )
    if error is not None:
        raise error
    bad = [r for r, f in enumerate(failed) if f]
    detail = "; ".join(f"rank {r}: {messages[r]}" for r in bad)
    raise DistributedError(f"rank(s) {bad} failed in {stage}: {detail}")


def gather_rows(
    ctx: DistContext,
    rows: Tensor,
    labels: Tensor,
    *,
    error: BaseException | None = None,
    stage: str = "stage 1",
) -> tuple[Tensor, Tensor, list[int]]:
    """All-gather (n_r, D) rows and (n_r,) int64 labels of every rank, in rank order.

    Shards may differ in size (even be empty, with D unknown: pass a (0, 0) tensor).
    ``error``: this rank failed producing its rows; all ranks then raise (see above).
    Returns (N, D) rows on ``rows.device``, (N,) labels, and the per-rank sizes.
    """
    if ctx.world_size == 1:
        if error is not None:
            raise error
        return rows, labels, [rows.shape[0]]
    dev = ctx.comm_device
    meta = torch.tensor(
        [rows.shape[0], rows.shape[1] if rows.dim() == 2 else 0, int(error is not None)],
        dtype=torch.int64,
        device=dev,
    )
    metas = torch.stack(_all_gather(ctx, meta, f"{stage}: size exchange")).cpu()
    _raise_if_any_failed(ctx, metas[:, 2].tolist(), error, stage)
    sizes, dim = metas[:, 0].tolist(), int(metas[:, 1].max())
    widths = {int(d) for n, d in metas[:, :2].tolist() if n > 0}
    if len(widths) > 1:
        raise DistributedError(f"ranks produced descriptors of different dimensions {widths}")
    most = max(sizes)
    buf = torch.zeros(most, dim, dtype=rows.dtype, device=dev)
    lab = torch.full((most,), -1, dtype=torch.int64, device=dev)
    if rows.shape[0]:
        buf[: rows.shape[0]] = rows.detach().to(dev)
        lab[: rows.shape[0]] = labels.to(dev)
    parts = _all_gather(ctx, buf, f"{stage}: descriptor all-gather")
    lparts = _all_gather(ctx, lab, f"{stage}: label all-gather")
    out = torch.cat([p[:n] for p, n in zip(parts, sizes, strict=True)]).to(rows.device)
    out_labels = torch.cat([p[:n] for p, n in zip(lparts, sizes, strict=True)])
    return out, out_labels.to(labels.device), sizes


def _trainable(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def all_reduce_gradients(
    ctx: DistContext, model: nn.Module, *, error: BaseException | None = None
) -> None:
    """Sum every trainable parameter's ``.grad`` over the ranks (None counts as zeros).

    ``error``: this rank failed in stage 3; a one-integer all-reduce first tells every rank,
    which then raises instead of waiting in the gradient exchange.
    """
    if ctx.world_size == 1:
        if error is not None:
            raise error
        return
    dev = ctx.comm_device
    params = _trainable(model)
    # Status: [failed, has .grad for each parameter]. A parameter without a gradient on every
    # rank keeps .grad None (as in one process: the optimizer skips it); else None -> zeros.
    status = torch.tensor(
        [int(error is not None)] + [int(p.grad is not None) for p in params],
        dtype=torch.int64,
        device=dev,
    )
    statuses = torch.stack(_all_gather(ctx, status, "stage 3: status exchange")).cpu()
    _raise_if_any_failed(ctx, statuses[:, 0].tolist(), error, "stage 3")
    used = statuses[:, 1:].amax(0).tolist()
    params = [p for p, u in zip(params, used, strict=True) if u]
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    # Buckets of same-dtype parameters, flattened: one collective per ~64 MB, not per tensor.
    bucket: list[nn.Parameter] = []
    size = 0
    for i, p in enumerate(params):
        bucket.append(p)
        size += p.numel() * p.element_size()
        last = i + 1 == len(params)
        if last or size >= _BUCKET_BYTES or params[i + 1].dtype != p.dtype:
            grads = [q.grad for q in bucket if q.grad is not None]  # all: zeros at least
            flat = torch.cat([g.reshape(-1) for g in grads]).to(dev)
            _collective(
                ctx,
                "stage 3: gradient all-reduce",
                partial(dist.all_reduce, flat, dist.ReduceOp.SUM, group=ctx.group),
            )
            offset = 0
            for g in grads:
                n = g.numel()
                g.copy_(flat[offset : offset + n].view_as(g))
                offset += n
            bucket, size = [], 0


def broadcast_model(ctx: DistContext, model: nn.Module) -> None:
    """Copy rank 0's parameters and buffers to every rank (one start state for all)."""
    if ctx.world_size == 1:
        return
    dev = ctx.comm_device
    with torch.no_grad():
        for t in [*model.parameters(), *model.buffers()]:
            x = t.detach().to(dev)
            _collective(ctx, "model broadcast", partial(dist.broadcast, x, src=0, group=ctx.group))
            if x is not t:
                t.copy_(x)


def sync_stop(ctx: DistContext, signum: int | None) -> int | None:
    """The signal any rank received (the highest), so that all ranks stop at the same step."""
    if ctx.world_size == 1:
        return signum
    x = torch.tensor([signum or 0], dtype=torch.int64, device=ctx.comm_device)
    _collective(
        ctx, "stop-signal exchange", lambda: dist.all_reduce(x, dist.ReduceOp.MAX, group=ctx.group)
    )
    return int(x) or None


# --------------------------------------------------------------------------------------------
# The step.


def distributed_multistage_backward(
    model: nn.Module,
    inputs: Inputs,
    labels: Tensor,
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    chunk_size: int,
    *,
    ctx: DistContext | None = None,
    memory: MemoryBank | None = None,
    num_workers: int = 0,
    grad_scale: float = 1.0,
) -> StepResult:
    """Fill ``.grad`` with the gradient of the loss of the *global* batch; return its loss.
    ``grad_scale`` multiplies the gradients (not the loss), as in ``multistage_step``.

    ``inputs`` (n_r images or loaders) and ``labels`` (n_r,) are this rank's contiguous shard
    of the global batch (``shard_bounds``), rank 0 holding the first images. After the call
    every rank holds the same summed gradient, equal to ``multistage_backward`` on the whole
    batch in one process. ``memory``: rank each query against the batch and the bank, then
    push this batch into the bank. ``ctx=None`` or one rank: ``multistage_step``.
    """
    ctx = ctx or DistContext()
    step_options: dict[str, Any] = {
        "memory": memory, "num_workers": num_workers, "grad_scale": grad_scale
    }  # fmt: skip
    if ctx.world_size == 1:
        return multistage_step(model, inputs, labels, loss_fn, chunk_size, **step_options)
    check_replayable(model)
    n = len(inputs)
    if labels.dim() != 1 or labels.shape[0] != n:
        raise ValueError(f"labels must be ({n},), got shape {tuple(labels.shape)}")
    try:
        like = next(model.parameters())
    except StopIteration:
        raise ValueError("the model has no parameters") from None
    error: BaseException | None = None
    local, kept = like.new_zeros(0, 0), torch.zeros(0, dtype=torch.int64)
    try:  # a shard may be empty or unreadable while the other ranks have images
        local, kept = compute_descriptors(
            model, inputs, chunk_size, num_workers=num_workers, allow_empty=True
        )
    except Exception as err:  # told to every rank in the gather below, then raised
        error = err
    local_labels = labels[kept.to(labels.device)] if len(kept) != n else labels
    batch, batch_labels, sizes = gather_rows(ctx, local, local_labels.to(torch.int64), error=error)
    total = sum(sizes)
    if total == 0:
        raise ValueError(
            f"none of the inputs of the batch could be loaded on any of the {ctx.world_size} "
            f"ranks ({n} on this rank)"
        )
    loss, grads = descriptor_loss_grads(loss_fn, batch, batch_labels, memory=memory)
    offset = sum(sizes[: ctx.rank])
    mine = grads[offset : offset + local.shape[0]] * grad_scale
    error = None
    if local.shape[0]:
        try:
            backward_descriptor_grads(
                model,
                inputs,
                mine,
                chunk_size,
                indices=kept,
                reference=local,
                num_workers=num_workers,
            )
        except Exception as err:
            error = err
    all_reduce_gradients(ctx, model, error=error)
    if memory is not None:
        memory.push(batch, batch_labels)
    return StepResult(loss, total, batch.detach(), batch_labels)
