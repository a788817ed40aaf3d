"""Export of the descriptor network for deployment: TorchScript and ONNX (optional extra).

What is exported is the extraction's descriptor, multi-scale included: for an image batch
(B, 3, H, W) of RGB floats in [0, 1], every scale ``s`` gives the network's descriptor of the
image resized to ``(round(H s), round(W s))`` (bilinear, antialiased), and the scales are
combined by the signed generalized mean of power ``p`` (the model's GeM power), then L2 —
exactly :func:`apretrieval.extraction.multiscale.multiscale_descriptors`. H and W are free in
both formats (dynamic axes), and so is B.

* TorchScript: the network is traced (its graph does not depend on the image size) and the
  multi-scale wrapper, whose resize sizes do, is scripted around it.
* ONNX (``pip install 'apretrieval[export]'``: onnx, onnxscript; onnxruntime to run it):
  torch's exporter with dynamic batch/height/width, opset 18 (antialiased Resize).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from apretrieval.atomic import atomic_path
from apretrieval.extraction.settings import DEFAULT_SCALES, check_scales

__all__ = ["FORMATS", "MultiScaleDescriptor", "export_onnx", "export_torchscript"]

FORMATS: tuple[str, ...] = ("torchscript", "onnx")
_ONNX_HINT = "pip install 'apretrieval[export]'  (onnx, onnxscript; onnxruntime to run it)"


class MultiScaleDescriptor(nn.Module):
    """(B, 3, H, W) in [0, 1] -> (B, D) multi-scale descriptors, as one exportable module."""

    def __init__(
        self, net: nn.Module, scales: Sequence[float] = DEFAULT_SCALES, p: float = 3.0
    ) -> None:
        super().__init__()
        scales = list(check_scales(scales))
        if not p > 0:
            raise ValueError(f"power p must be > 0, got {p}")
        self.net = net
        self.scales: list[float] = scales
        self.p = float(p)

    def forward(self, x: Tensor) -> Tensor:
        h, w = x.shape[-2], x.shape[-1]
        descs = []
        for s in self.scales:
            y = x
            if s != 1.0:
                # extraction.settings.scaled_size, written out (TorchScript scripts this
                # method); floor keeps the size symbolic in torch.export, where int() fixes
                # it to the example's
                size = [max(1, math.floor(h * s + 0.5)), max(1, math.floor(w * s + 0.5))]
                y = F.interpolate(
                    x, size=size, mode="bilinear", align_corners=False, antialias=True
                )
            descs.append(F.normalize(self.net(y), dim=-1))
        if len(descs) == 1:
            return descs[0]
        # Signed power mean over the scales, in float64 as the extraction computes it.
        d = torch.stack(descs).double()
        m = (d.sign() * d.abs().pow(self.p)).mean(dim=0)
        v = m.sign() * m.abs().pow(1.0 / self.p)
        return F.normalize(v, dim=-1).to(x.dtype)


def _wrap(model: nn.Module, scales: Sequence[float], p: float | None) -> MultiScaleDescriptor:
    if p is None:
        p = float(getattr(model, "gem_p", 3.0))
    return MultiScaleDescriptor(model, scales, p)


def _example(model: nn.Module, size: int) -> Tensor:
    device = next((t.device for t in model.parameters()), torch.device("cpu"))
    g = torch.Generator().manual_seed(0)
    return torch.rand(1, 3, size, size, generator=g).to(device)


def export_torchscript(
    model: nn.Module,
    path: str | os.PathLike[str],
    *,
    scales: Sequence[float] = DEFAULT_SCALES,
    p: float | None = None,
    example_size: int = 224,
) -> Path:
    """Write the multi-scale descriptor network as TorchScript (``torch.jit.load`` it).

    The model is put in eval mode. ``p`` defaults to the model's GeM power.
    """
    model = model.eval()
    with torch.no_grad():
        traced = torch.jit.trace(model, _example(model, example_size), check_trace=False)
        scripted = torch.jit.script(_wrap(traced, scales, p))
    path = Path(path)
    with atomic_path(path) as tmp:
        torch.jit.save(scripted, str(tmp))
    return path


def export_onnx(
    model: nn.Module,
    path: str | os.PathLike[str],
    *,
    scales: Sequence[float] = DEFAULT_SCALES,
    p: float | None = None,
    example_size: int = 224,
    opset: int = 18,
) -> Path:
    """Write the multi-scale descriptor network as ONNX: input ``images`` (B, 3, H, W) float32
    in [0, 1], output ``descriptors`` (B, D); B, H, W dynamic."""
    try:
        import onnx  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError as err:
        raise ValueError(f"ONNX export needs onnx and onnxscript: {_ONNX_HINT}") from err
    wrapper = _wrap(model.eval(), scales, p).eval()
    example = _example(model, example_size)
    dims = {
        0: torch.export.Dim("batch"),
        2: torch.export.Dim("height", min=32),
        3: torch.export.Dim("width", min=32),
    }
    path = Path(path)
    with torch.no_grad(), atomic_path(path) as tmp:
        program = torch.onnx.export(
            wrapper,
            (example,),
            input_names=["images"],
            output_names=["descriptors"],
            dynamic_shapes={"x": dims},
            opset_version=opset,
            dynamo=True,
        )
        assert program is not None  # dynamo=True always returns the program
        program.save(str(tmp))
    return path
