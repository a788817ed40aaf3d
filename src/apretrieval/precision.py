"""Mixed precision and speed switches: autocast inside the network, float32 outside it.

``amp="bf16"`` or ``"fp16"`` runs the network's forward passes (stages 1 and 3 of multistaged
backpropagation, and extraction) under ``torch.autocast``; the descriptors leave the network
as float32, so the AP loss, its histograms and the descriptor gradient of stage 2 stay
float32 whatever the mode. Only the trunk's activations and weight gradients see half
precision.

float16 has a narrow range: small weight gradients underflow to 0. :class:`LossScale` is the
dynamic loss scaling of mixed-precision training written for the three stages: stage 2's
descriptor gradient is multiplied by the scale before stage 3 (which is all the network's
backward pass sees), the parameter gradients are divided by it before the update, and a step
whose gradients overflowed is skipped and the scale halved. bfloat16 has float32's range and
needs no scale.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

__all__ = ["AMP_MODES", "LossScale", "PrecisionNet", "amp_dtype", "fast_net"]

AMP_MODES = ("off", "bf16", "fp16")
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def amp_dtype(amp: str) -> torch.dtype | None:
    """The autocast dtype of an ``amp`` mode (None: off)."""
    if amp not in AMP_MODES:
        raise ValueError(f"amp must be one of {AMP_MODES}, got {amp!r}")
    return _DTYPES.get(amp)


class PrecisionNet(nn.Module):
    """``net`` run under autocast (``dtype``) and/or on channels-last inputs; float32,
    L2-normalised descriptors out.

    A view, not a copy: it holds ``net`` itself, so the gradients land in ``net``'s
    parameters and checkpoints keep ``net``'s own keys.
    """

    def __init__(self, net: nn.Module, dtype: torch.dtype | None, channels_last: bool) -> None:
        super().__init__()
        self.net, self.dtype, self.channels_last = net, dtype, channels_last
        self.training = net.training  # a view reports its network's mode

    def __getattr__(self, name: str) -> Any:
        # The wrapped network's own attributes (gem_p, out_dim, config) read through.
        try:
            return super().__getattr__(name)
        except AttributeError:
            net = self.__dict__.get("_modules", {}).get("net")
            if net is None:
                raise
            return getattr(net, name)

    def forward(self, x: Tensor) -> Tensor:
        if self.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        if self.dtype is None:
            out: Tensor = self.net(x)
            return out
        with torch.autocast(x.device.type, dtype=self.dtype):
            y = self.net(x)
        # Every network here ends with an L2 normalisation; redone in float32, so that the
        # scores stay within [-1, 1] (half precision leaves norms 1 +- 4e-3).
        return F.normalize(y.float(), dim=-1)


def fast_net(
    net: nn.Module, amp: str = "off", channels_last: bool = False, compile: bool = False
) -> nn.Module:
    """``net`` as the forward passes should run it: itself when every switch is off."""
    dtype = amp_dtype(amp)
    if channels_last:
        net.to(memory_format=torch.channels_last)  # in place: the weights' layout
    out: nn.Module = (
        net if dtype is None and not channels_last else PrecisionNet(net, dtype, channels_last)
    )
    if compile:
        compiled = torch.compile(out)  # the wrapper is compiled; the saved weights are net's
        assert isinstance(compiled, nn.Module)  # a module in, an OptimizedModule out
        out = compiled
    return out


class LossScale:
    """Dynamic loss scale for float16 training (see the module docstring).

    ``scale`` multiplies the descriptor gradient of stage 2; :meth:`unscale` divides the
    parameter gradients by it and says whether they are finite; :meth:`update` halves the
    scale after an overflow and doubles it after ``growth_interval`` finite steps.
    """

    def __init__(self, scale: float = 2.0**16, growth_interval: int = 2000) -> None:
        self.scale = float(scale)
        self.growth_interval = int(growth_interval)
        self.good_steps = 0
        self.skipped = 0

    def unscale(self, params: Iterable[nn.Parameter]) -> bool:
        """Divide every ``.grad`` by the scale; True when all of them are finite."""
        finite = True
        with torch.no_grad():
            for p in params:
                if p.grad is not None:
                    p.grad.div_(self.scale)
                    finite = finite and bool(torch.isfinite(p.grad).all())
        return finite

    def update(self, finite: bool) -> None:
        if not finite:
            self.scale = max(self.scale / 2.0, 1.0)
            self.good_steps = 0
            self.skipped += 1
            return
        self.good_steps += 1
        if self.good_steps >= self.growth_interval and math.isfinite(self.scale * 2.0):
            self.scale *= 2.0
            self.good_steps = 0

    def state_dict(self) -> dict[str, Any]:
        return {"scale": self.scale, "good_steps": self.good_steps, "skipped": self.skipped}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.scale = float(state["scale"])
        self.good_steps = int(state.get("good_steps", 0))
        self.skipped = int(state.get("skipped", 0))
