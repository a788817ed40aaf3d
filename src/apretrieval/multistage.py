"""Multistaged backpropagation (Algorithm 1 of the supplementary of Revaud et al., 2019).

The loss of a batch of B images depends on all B descriptors at once, but a network forward
pass with autograd keeps activations for every image. Three stages make peak memory
independent of B:

1. ``compute_descriptors``: all B descriptors without autograd, ``chunk_size`` images at a time;
2. ``descriptor_loss_grads``: the loss and dL/dD (B, D) on the full descriptor matrix;
3. ``backward_descriptor_grads``: each chunk again with autograd, back-propagating its rows
   of dL/dD; parameter gradients accumulate in ``.grad`` (sum over chunks = Eq. 11).

Stages 1 and 3 must compute identical descriptors: the network must not depend on which images
share a chunk (BatchNorm frozen, i.e. in eval mode; no active Dropout) and inputs must be
replayed exactly (per-sample seeded augmentation, see ``data.transforms``). A distributed
version (``distributed``) all-gathers the descriptors after stage 1 and all-reduces the
gradients after stage 3. With a memory bank (``losses.memory_bank``), stage 2 ranks each query
against the batch and the bank, and the batch joins the bank once the step is done.

Inputs are a tensor (B, 3, H, W), or a sequence whose items are (3, H, W) tensors or loaders
(callables returning one, or None for an unreadable image). Images of different sizes are
never padded (padding would change the GeM average): inside a chunk, images of equal size are
stacked and forwarded together and each other size is forwarded separately.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from apretrieval.losses.memory_bank import MemoryBank, ap_loss_with_memory

__all__ = [
    "Inputs",
    "NonFiniteDescriptors",
    "StepResult",
    "backward_descriptor_grads",
    "check_replayable",
    "compute_descriptors",
    "descriptor_loss_grads",
    "multistage_backward",
    "multistage_step",
]


class NonFiniteDescriptors(ValueError):
    """Stage 1 gave NaN/inf descriptors: finite weights so large that the network overflows
    (a learning rate far too high), which the training loop reports as a divergence."""


Loader = Callable[[], Tensor | None]
Inputs = Tensor | Sequence[Tensor | Loader]
# Stage 3 must reproduce stage 1; a larger gap means inputs or the network were not replayed.
_REPLAY_TOLERANCE = 1e-3


def check_replayable(model: nn.Module) -> None:
    """ValueError if a module makes a forward pass depend on its chunk or on randomness."""
    for name, m in model.named_modules():
        if not m.training:
            continue
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            raise ValueError(
                f"BatchNorm {name!r} is in training mode: its batch statistics depend on the "
                "chunk, so stage 1 and stage 3 would disagree; freeze it (frozen_bn=True)"
            )
        if isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0:
            raise ValueError(f"Dropout {name!r} is active: put it in eval mode (p={m.p})")


def _param(model: nn.Module) -> Tensor:
    try:
        return next(model.parameters())
    except StopIteration:
        raise ValueError("the model has no parameters") from None


def _num_inputs(inputs: Inputs) -> int:
    if isinstance(inputs, Tensor):
        if inputs.dim() != 4:
            raise ValueError(f"input tensor must be (B, C, H, W), got {tuple(inputs.shape)}")
        return inputs.shape[0]
    return len(inputs)


def _resolve(item: Tensor | Loader) -> Tensor | None:
    x = item() if callable(item) and not isinstance(item, Tensor) else item
    if x is not None and (not isinstance(x, Tensor) or x.dim() != 3):
        got = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"each input must be a (C, H, W) tensor, got {got}")
    return x


def _iter_chunks(
    inputs: Inputs, indices: Sequence[int], chunk_size: int, num_workers: int
) -> Iterator[tuple[list[int], Tensor | list[Tensor | None]]]:
    """(indices, images) per chunk; with workers, the next chunk loads while this one runs."""
    chunks = [list(indices[s : s + chunk_size]) for s in range(0, len(indices), chunk_size)]
    if isinstance(inputs, Tensor):
        for c in chunks:
            yield c, inputs[c[0] : c[-1] + 1] if c == list(range(c[0], c[-1] + 1)) else inputs[c]
        return
    if num_workers <= 0:
        for c in chunks:
            yield c, [_resolve(inputs[i]) for i in c]
        return
    with ThreadPoolExecutor(num_workers) as pool:
        pending = [pool.submit(_resolve, inputs[i]) for i in chunks[0]] if chunks else []
        for k, c in enumerate(chunks):
            current = pending
            nxt = chunks[k + 1] if k + 1 < len(chunks) else []
            pending = [pool.submit(_resolve, inputs[i]) for i in nxt]
            yield c, [f.result() for f in current]


def _forward(model: nn.Module, images: Tensor | list[Tensor], like: Tensor) -> Tensor:
    """Descriptors (n, D) of a chunk: a tensor, or a list of (3, H, W) images of any sizes."""
    if isinstance(images, Tensor):
        out: Tensor = model(images.to(device=like.device, dtype=like.dtype))
        return out
    groups: dict[tuple[int, ...], list[int]] = {}
    for j, im in enumerate(images):
        groups.setdefault(tuple(im.shape), []).append(j)
    outs: list[Tensor] = []
    order: list[int] = []
    for js in groups.values():
        x = torch.stack([images[j] for j in js]).to(device=like.device, dtype=like.dtype)
        outs.append(model(x))
        order += js
    out = torch.cat(outs) if len(outs) > 1 else outs[0]
    if order != sorted(order):  # back to input order
        out = out[torch.as_tensor(order, device=out.device).argsort()]
    return out


def compute_descriptors(
    model: nn.Module,
    inputs: Inputs,
    chunk_size: int,
    *,
    num_workers: int = 0,
    allow_empty: bool = False,
) -> tuple[Tensor, Tensor]:
    """Stage 1: descriptors (B', D) without autograd, and ``kept`` (B',) int64.

    ``kept`` lists the inputs that loaded (a loader returning None is skipped), in order.
    ``num_workers`` threads run loaders ahead of the network. No input at all, or none
    readable: ValueError, or with ``allow_empty`` a (0, 0) result (one rank's shard may be
    empty while the others have images).
    """
    _check_chunk(chunk_size)
    like = _param(model)
    n = _num_inputs(inputs)
    descs: list[Tensor] = []
    kept: list[int] = []
    with torch.no_grad():
        for idx, images in _iter_chunks(inputs, range(n), chunk_size, num_workers):
            batch: Tensor | list[Tensor]
            if isinstance(images, Tensor):
                batch = images
            else:
                ok = [j for j, im in enumerate(images) if im is not None]
                idx, batch = [idx[j] for j in ok], [im for im in images if im is not None]
                if not idx:
                    continue
            descs.append(_forward(model, batch, like))
            kept += idx
    if not descs:
        if allow_empty:
            return like.new_zeros(0, 0), torch.zeros(0, dtype=torch.int64)
        raise ValueError(f"none of the {n} inputs could be loaded")
    return torch.cat(descs), torch.as_tensor(kept, dtype=torch.int64)


def descriptor_loss_grads(
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    descriptors: Tensor,
    labels: Tensor,
    *,
    memory: MemoryBank | None = None,
) -> tuple[float, Tensor]:
    """Stage 2: the loss value and dL/dD (B, D) of ``loss_fn(descriptors, labels)``.

    ``memory``: each query also ranks the bank's descriptors (an AP loss is required once the
    bank holds any); the bank is only read here.
    """
    bad = int((~torch.isfinite(descriptors)).any(dim=-1).sum())
    if bad:
        raise NonFiniteDescriptors(
            f"{bad} of the batch's {len(descriptors)} descriptors are NaN/inf (the network "
            "overflows: its weights grew too large)"
        )
    bank = memory.tensors() if memory is not None else None
    if bank is not None:
        return ap_loss_with_memory(loss_fn, descriptors, labels, *bank)
    d = descriptors.detach().requires_grad_(True)
    with torch.enable_grad():
        loss = loss_fn(d, labels.to(d.device))
        (grad,) = torch.autograd.grad(loss, d)
    return float(loss.detach()), grad


def backward_descriptor_grads(
    model: nn.Module,
    inputs: Inputs,
    grads: Tensor,
    chunk_size: int,
    *,
    indices: Sequence[int] | Tensor | None = None,
    reference: Tensor | None = None,
    num_workers: int = 0,
) -> None:
    """Stage 3: accumulate sum_i (dL/dd_i)^T dd_i/dTheta into the parameters' ``.grad``.

    ``grads`` (B', D) are the rows for ``indices`` (default: all inputs, in order).
    ``reference`` (B', D): the stage-1 descriptors; a mismatch means the inputs or the network
    were not replayed exactly and raises RuntimeError.
    """
    _check_chunk(chunk_size)
    like = _param(model)
    idx = list(range(_num_inputs(inputs))) if indices is None else [int(i) for i in indices]
    if grads.shape[0] != len(idx):
        raise ValueError(f"{grads.shape[0]} gradient rows for {len(idx)} inputs")
    row = 0
    for chunk, images in _iter_chunks(inputs, idx, chunk_size, num_workers):
        batch = images if isinstance(images, Tensor) else [im for im in images if im is not None]
        if len(batch) != len(images):
            raise RuntimeError("an input that loaded in stage 1 failed to load in stage 3")
        with torch.enable_grad():
            out = _forward(model, batch, like)
            g = grads[row : row + len(chunk)].to(device=out.device, dtype=out.dtype)
            if reference is not None:
                ref = reference[row : row + len(chunk)].to(device=out.device, dtype=out.dtype)
                gap = float((out.detach() - ref).abs().max())
                if gap > _REPLAY_TOLERANCE:
                    raise RuntimeError(
                        f"stage 3 descriptors differ from stage 1 by {gap:.3g}: inputs or "
                        "augmentation are not replayed deterministically"
                    )
            out.backward(g)
        row += len(chunk)


@dataclass
class StepResult:
    """One multistaged step: the batch loss, the number of images used, and the stage-1
    descriptors (N, D) and labels (N,) of those images (in a distributed step, of the whole
    global batch)."""

    loss: float
    images: int
    descriptors: Tensor
    labels: Tensor


def multistage_step(
    model: nn.Module,
    inputs: Inputs,
    labels: Tensor,
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    chunk_size: int,
    *,
    memory: MemoryBank | None = None,
    num_workers: int = 0,
    grad_scale: float = 1.0,
) -> StepResult:
    """Fill ``.grad`` as ``loss_fn(model(inputs), labels).backward()`` would.

    Peak memory: one chunk of activations with autograd plus the (B, D) descriptors, whatever
    B. Inputs whose loader returns None are left out of the batch (with their labels).
    ``memory``: rank each query against the batch and the bank, then push this batch into it.
    ``grad_scale``: the parameter gradients come out multiplied by it (float16 loss scaling:
    see :mod:`apretrieval.precision`); the returned loss is not.
    """
    check_replayable(model)
    n = _num_inputs(inputs)
    if labels.dim() != 1 or labels.shape[0] != n:
        raise ValueError(f"labels must be ({n},), got shape {tuple(labels.shape)}")
    descriptors, kept = compute_descriptors(model, inputs, chunk_size, num_workers=num_workers)
    kept_labels = labels if len(kept) == n else labels[kept.to(labels.device)]
    loss, grads = descriptor_loss_grads(loss_fn, descriptors, kept_labels, memory=memory)
    backward_descriptor_grads(
        model,
        inputs,
        grads if grad_scale == 1.0 else grads * grad_scale,
        chunk_size,
        indices=kept,
        reference=descriptors,
        num_workers=num_workers,
    )
    if memory is not None:
        memory.push(descriptors, kept_labels)
    return StepResult(loss, len(kept), descriptors, kept_labels)


def multistage_backward(
    model: nn.Module,
    inputs: Inputs,
    labels: Tensor,
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    chunk_size: int,
    *,
    num_workers: int = 0,
) -> float:
    """Fill ``.grad`` as ``loss_fn(model(inputs), labels).backward()`` would; return the loss.

    Peak memory: one chunk of activations with autograd plus the (B, D) descriptors, whatever
    B. Inputs whose loader returns None are left out of the batch (with their labels).
    """
    step = multistage_step(model, inputs, labels, loss_fn, chunk_size, num_workers=num_workers)
    return step.loss


def _check_chunk(chunk_size: int) -> None:
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive integer, got {chunk_size!r}")
