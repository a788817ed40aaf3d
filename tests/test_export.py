"""TorchScript / ONNX export of the multi-scale descriptor network: equal to eager, any size."""

from __future__ import annotations

import pytest
import torch

from apretrieval.cli import main
from apretrieval.export import MultiScaleDescriptor, export_onnx, export_torchscript
from apretrieval.extraction.multiscale import multiscale_descriptors
from apretrieval.models import build_model, save_checkpoint
from test_multistage import tiny_model

SIZES = [(2, 64, 64), (1, 75, 61)]  # the second is not the export example's size


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_model("resnet18", out_dim=32).eval()


@pytest.fixture(scope="module")
def small():
    """The unit tests' strided conv trunk (frozen BatchNorm with statistics) under the same GeM,
    whitening and normalisation: what export must carry over, at a fraction of the tracing
    time of a ResNet."""
    return tiny_model().float().eval()


def _images(b, h, w):
    g = torch.Generator().manual_seed(h * w)
    return torch.rand(b, 3, h, w, generator=g)


def test_wrapper_equals_extraction(small):
    wrapper = MultiScaleDescriptor(small, (1.0, 2**-0.5, 0.5), small.gem_p)
    for b, h, w in SIZES:
        x = _images(b, h, w)
        with torch.no_grad():
            torch.testing.assert_close(wrapper(x), multiscale_descriptors(small, x))


def test_torchscript_equals_eager_at_any_size(small, tmp_path):
    path = export_torchscript(small, tmp_path / "m.ts.pt", example_size=64)
    loaded = torch.jit.load(str(path))
    for b, h, w in SIZES:
        x = _images(b, h, w)
        with torch.no_grad():
            err = (loaded(x) - multiscale_descriptors(small, x)).abs().max().item()
        assert err < 1e-5, (h, w, err)


def test_onnx_equals_eager_at_any_size(small, tmp_path):
    pytest.importorskip("onnxscript")
    ort = pytest.importorskip("onnxruntime")
    path = export_onnx(small, tmp_path / "m.onnx", example_size=64)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for b, h, w in SIZES:
        x = _images(b, h, w)
        out = session.run(None, {"images": x.numpy()})[0]
        err = abs(out - multiscale_descriptors(small, x).numpy()).max()
        assert err < 1e-5, (h, w, err)


def test_cli_export(model, tmp_path, capsys):
    ckpt = save_checkpoint(tmp_path / "m.pt", model)
    out = tmp_path / "m.ts"
    assert main(["export", "--checkpoint", str(ckpt), "--out", str(out), "--scales", "1"]) == 0
    x = _images(1, 50, 70)
    with torch.no_grad():
        err = (torch.jit.load(str(out))(x) - model(x)).abs().max().item()
    assert err < 1e-5
