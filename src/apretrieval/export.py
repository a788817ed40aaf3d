"""Export of the descriptor network for deployment: TorchScript and ONNX (optional extra).

What is exported is the extraction's descriptor, image loading and multi-scale included: for
an image batch (B, 3, H, W) of RGB floats in [0, 1] at its own size, the image is first shrunk
so its longer side is at most ``max_side`` (as ``apretrieval extract`` loads files: bilinear,
antialiased, never enlarged), then every scale ``s`` gives the network's descriptor of the
image resized to ``(round(H s), round(W s))`` (bilinear, antialiased), and the scales are
combined by the signed generalized mean of power ``p`` (the model's GeM power), then L2 —
exactly :func:`apretrieval.extraction.multiscale.multiscale_descriptors`. H and W are free in
both formats (dynamic axes), and so is B.
The only difference left with ``extract`` of a file is the decoding: ``extract`` lets the
JPEG decoder shrink a large image by a power of two first.

* TorchScript: the network is traced (its graph does not depend on the image size) and the
  multi-scale wrapper, whose resize sizes do, is scripted around it.
* ONNX (``pip install 'apretrieval[export]'``: onnx, onnxscript; onnxruntime to run it):
  torch's exporter with dynamic batch/height/width, opset 18 (antialiased Resize).

Warnings: torch marks ``torch.jit.trace`` / ``script`` as deprecated (FutureWarning) and the
tracer warns that the model's input check becomes a constant; both are expected here (the
TorchScript format is what is asked for; the check holds for every input of the traced graph,
which the wrapper always feeds (B, 3, H, W)) and are not shown. Any other warning is.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from apretrieval.atomic import atomic_open, atomic_path
from apretrieval.extraction.settings import DEFAULT_MAX_SIDE, DEFAULT_SCALES, check_scales

__all__ = ["FORMATS", "MultiScaleDescriptor", "export_onnx", "export_torchscript"]

FORMATS: tuple[str, ...] = ("torchscript", "onnx")
_ONNX_HINT = "pip install 'apretrieval[export]'  (onnx, onnxscript; onnxruntime to run it)"


class MultiScaleDescriptor(nn.Module):
    """(B, 3, H, W) in [0, 1] -> (B, D) multi-scale descriptors, as one exportable module.

    ``max_side``: images are first shrunk to this longer side, as ``extract`` loads them
    (None: used at the size given).
    """

    def __init__(
        self,
        net: nn.Module,
        scales: Sequence[float] = DEFAULT_SCALES,
        p: float = 3.0,
        max_side: int | None = None,
    ) -> None:
        super().__init__()
        scales = list(check_scales(scales))
        if not p > 0:
            raise ValueError(f"power p must be > 0, got {p}")
        if max_side is not None and max_side < 1:
            raise ValueError(f"max_side must be >= 1 or None, got {max_side}")
        self.net = net
        self.scales = scales
        self.p = float(p)
        self.max_side = 0 if max_side is None else int(max_side)  # 0: no resize

    def fit(self, x: Tensor) -> Tensor:
        """The image shrunk so its longer side is at most ``max_side`` (never enlarged), as
        ``apretrieval extract`` loads a file: Pillow's bilinear, antialiased resampling of an
        8-bit image, which runs a horizontal then a vertical pass and rounds each to 8 bits;
        sizes rounded half up. A descriptor can be sensitive to those last bits: done as
        Pillow does it, it matches to a cosine of 1 - 1e-7 on a 1500 px photo, where one float
        pass was 0.9934. An image left at its size is returned as it is."""
        h, w = x.shape[-2], x.shape[-1]
        if not torch.jit.is_scripting():  # type: ignore[attr-defined]
            # torch.export: symbolic sizes, no branch on them
            longest = torch.sym_max(h, w)
            scale = torch.sym_min(1.0, self.max_side / longest)
            shrunk = torch.sym_min(1, torch.sym_max(0, longest - self.max_side))
        else:
            longest = max(h, w)
            scale = min(1.0, self.max_side / longest)
            shrunk = min(1, max(0, longest - self.max_side))  # 1 when resized, else 0
        new_h, new_w = math.floor(h * scale + 0.5), math.floor(w * scale + 0.5)
        # At scale 1 both passes are the identity, and the 8-bit rounding is switched off.
        # (math.floor of a SymFloat is a SymInt, which mypy sees as object: hence the ignores)
        first = [h, new_w]
        y = F.interpolate(x, first, mode="bilinear", align_corners=False, antialias=True)  # type: ignore[arg-type]
        y = y + shrunk * (torch.round(y * 255.0) / 255.0 - y)
        both = [new_h, new_w]
        y = F.interpolate(y, both, mode="bilinear", align_corners=False, antialias=True)  # type: ignore[arg-type]
        return y + shrunk * (torch.round(y * 255.0) / 255.0 - y)

    def forward(self, x: Tensor) -> Tensor:
        if self.max_side > 0:
            x = self.fit(x)
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


def _wrap(
    model: nn.Module, scales: Sequence[float], p: float | None, max_side: int | None
) -> MultiScaleDescriptor:
    if p is None:
        p = float(getattr(model, "gem_p", 3.0))
    return MultiScaleDescriptor(model, scales, p, max_side)


@contextmanager
def _expected_warnings() -> Iterator[None]:
    """Hide the warnings the module docstring explains; every other warning goes through."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", r"`torch\.jit\.\w+` is deprecated", FutureWarning)
        warnings.filterwarnings(
            "ignore",
            "Converting a tensor to a Python boolean",
            torch.jit.TracerWarning,  # type: ignore[attr-defined]
        )
        yield


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
    max_side: int | None = DEFAULT_MAX_SIDE,
    example_size: int = 224,
) -> Path:
    """Write the multi-scale descriptor network as TorchScript (``torch.jit.load`` it).

    The model is put in eval mode. ``p`` defaults to the model's GeM power; ``max_side``: the
    longer image side the network shrinks its input to (None: no resize).
    """
    model = model.eval()
    with torch.no_grad(), _expected_warnings():
        traced = torch.jit.trace(model, _example(model, example_size), check_trace=False)
        scripted = torch.jit.script(_wrap(traced, scales, p, max_side))
    path = Path(path)
    # Through a Python file: torch's own file writer aborts the process on a full disk.
    with atomic_open(path, "wb") as f, _expected_warnings():
        torch.jit.save(scripted, f)
    return path


def export_onnx(
    model: nn.Module,
    path: str | os.PathLike[str],
    *,
    scales: Sequence[float] = DEFAULT_SCALES,
    p: float | None = None,
    max_side: int | None = DEFAULT_MAX_SIDE,
    example_size: int = 224,
    opset: int = 18,
) -> Path:
    """Write the multi-scale descriptor network as ONNX: input ``images`` (B, 3, H, W) float32
    in [0, 1], output ``descriptors`` (B, D); B, H, W dynamic; ``max_side`` as for
    :func:`export_torchscript`."""
    try:
        import onnx  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError as err:
        raise ValueError(f"ONNX export needs onnx and onnxscript: {_ONNX_HINT}") from err
    wrapper = _wrap(model.eval(), scales, p, max_side).eval()
    example = _example(model, example_size)
    dims = {
        0: torch.export.Dim("batch"),
        2: torch.export.Dim("height", min=32),
        3: torch.export.Dim("width", min=32),
    }
    path = Path(path)
    with torch.no_grad(), atomic_path(path) as tmp, _expected_warnings():
        program = torch.onnx.export(
            wrapper,
            (example,),
            input_names=["images"],
            output_names=["descriptors"],
            dynamic_shapes={"x": dims},
            opset_version=opset,
            dynamo=True,
            verbose=False,  # no step-by-step progress lines
        )
        assert program is not None  # dynamo=True always returns the program
        program.save(str(tmp))
    return path
