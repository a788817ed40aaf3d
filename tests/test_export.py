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


@pytest.mark.parametrize("fmt", ["torchscript", "onnx"])
def test_exported_network_agrees_with_extract_on_a_large_photo(model, tmp_path, fmt):
    """A 1500 x 1000 photo: extract shrinks it to max_side before the scales; the exported
    network does the same inside (as Pillow resamples), so the descriptors agree."""
    import warnings

    import numpy as np
    from PIL import Image

    from apretrieval.extraction.images import ImageFiles
    from apretrieval.extraction.loop import extract_descriptors

    if fmt == "onnx":
        pytest.importorskip("onnxscript")
        ort = pytest.importorskip("onnxruntime")
    rng = np.random.default_rng(0)
    # smooth content with detail, as a photo (pure noise would be all aliasing)
    base = rng.integers(0, 255, (30, 45, 3), dtype=np.uint8)
    photo = Image.fromarray(base).resize((1500, 1000), Image.Resampling.BICUBIC)
    noise = rng.normal(0, 12, (1000, 1500, 3))
    photo = Image.fromarray(np.clip(np.asarray(photo) + noise, 0, 255).astype(np.uint8))
    photo.save(tmp_path / "photo.jpg", quality=92)
    files = ImageFiles([tmp_path / "photo.jpg"], None, max_side=1024)
    want = extract_descriptors(model, files, num_workers=0, progress=False, max_side=1024)
    # what a deployment feeds the exported network: the decoded image at its own size
    x = ImageFiles([tmp_path / "photo.jpg"], None, max_side=None)[0][None]
    assert x.shape[-2:] == (1000, 1500)
    with warnings.catch_warnings(record=True) as shown:
        warnings.simplefilter("always")
        if fmt == "torchscript":
            path = export_torchscript(model, tmp_path / "m.ts", max_side=1024)
        else:
            path = export_onnx(model, tmp_path / "m.onnx", max_side=1024)
    # the warnings the export module explains are hidden, and no other one is raised
    assert not shown, [str(w.message) for w in shown]
    if fmt == "torchscript":
        with torch.no_grad():
            got = torch.jit.load(str(path))(x).numpy()
    else:
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        got = session.run(None, {"images": x.numpy()})[0]
    cosine = float((got * want).sum() / np.linalg.norm(got) / np.linalg.norm(want))
    assert cosine >= 0.9999, cosine
    if fmt == "torchscript":  # the check can fail: without the resize inside, it does
        unfit = export_torchscript(model, tmp_path / "unfit.ts", max_side=None)
        with torch.no_grad():
            other = torch.jit.load(str(unfit))(x).numpy()
        assert float((other * want).sum()) / np.linalg.norm(other) / np.linalg.norm(want) < 0.9999
