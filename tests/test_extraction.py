"""Multi-scale extraction equals the per-image definition; batching, workers and resuming
change nothing."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from apretrieval.descriptors import features_paths
from apretrieval.extraction.images import ImageFiles, list_images
from apretrieval.extraction.loop import extract_descriptors
from apretrieval.extraction.multiscale import combine_scales, multiscale_descriptors
from apretrieval.extraction.resumable import extract_to_file
from apretrieval.pooling import GeM


class TinyNet(nn.Module):
    """Stand-in with the RetrievalNet interface: [0, 1] images -> (B, D) unit rows, .gem_p."""

    def __init__(self, dim: int = 6, whiten: bool = True) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.backbone = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2), nn.ReLU())
        self.pool = GeM(p=2.5)
        self.whiten = nn.Linear(8, dim) if whiten else None
        self.calls = 0
        self.float()  # whatever torch's default dtype is in this process

    @property
    def gem_p(self) -> float:
        return float(self.pool.p.detach()[0])

    @property
    def out_dim(self) -> int:
        return self.whiten.out_features if self.whiten is not None else 8

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += x.shape[0]
        v = F.normalize(self.pool(self.backbone(x)), dim=-1)
        return F.normalize(self.whiten(v), dim=-1) if self.whiten is not None else v


def make_images(rng, sizes):
    return [torch.from_numpy(rng.random((3, h, w), dtype=np.float32)) for h, w in sizes]


def test_images_follow_the_model_precision():
    rng = np.random.default_rng(9)
    model = TinyNet().double()
    imgs = make_images(rng, [(32, 32), (40, 24)])
    got = extract_descriptors(model, imgs, num_workers=0, progress=False)
    want = extract_descriptors(model.float(), imgs, num_workers=0, progress=False)
    np.testing.assert_allclose(got, want, atol=1e-5)


@torch.no_grad()
def per_image(model, img, scales, p):
    """The definition, one image at a time."""
    descs = []
    for s in scales:
        x = img[None]
        if s != 1.0:
            # Sizes round half up: 33 * 0.5 = 16.5 -> 17 (Python's round() gives 16).
            size = tuple(max(1, math.floor(n * s + 0.5)) for n in x.shape[-2:])
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)
        descs.append(F.normalize(model(x), dim=-1)[0].double())
    d = torch.stack(descs)
    m = (d.sign() * d.abs() ** p).mean(0)
    return F.normalize(m.sign() * m.abs() ** (1 / p), dim=0).float()


SIZES = [(40, 56), (56, 40), (40, 56), (33, 47), (40, 56), (64, 64), (56, 40)]


def test_combine_scales_closed_forms():
    pos = torch.rand(3, 4, 5, dtype=torch.float64)
    want = F.normalize(pos.pow(3).mean(0).pow(1 / 3), dim=-1)
    torch.testing.assert_close(combine_scales(pos, 3.0), want)
    torch.testing.assert_close(combine_scales(pos, 1.0), F.normalize(pos.mean(0), dim=-1))
    torch.testing.assert_close(combine_scales(pos[:1], 3.0), F.normalize(pos[0], dim=-1))
    # Odd symmetry: negating every descriptor negates the result (no NaN for negatives).
    x = torch.randn(3, 4, 5, dtype=torch.float64)
    torch.testing.assert_close(combine_scales(-x, 2.7), -combine_scales(x, 2.7))
    assert torch.isfinite(combine_scales(x, 2.7)).all()
    with pytest.raises(ValueError, match="power"):
        combine_scales(x, 0.0)


@pytest.mark.parametrize("scales", [(1.0,), (1.0, 2**-0.5, 0.5)])
def test_extraction_equals_per_image_definition(scales):
    rng = np.random.default_rng(0)
    model = TinyNet()
    imgs = make_images(rng, SIZES)
    got = extract_descriptors(
        model, imgs, scales=scales, batch_size=3, num_workers=0, progress=False
    )
    assert got.shape == (len(SIZES), 6) and got.dtype == np.float32
    for i, img in enumerate(imgs):
        want = per_image(model, img, scales, model.gem_p).numpy()
        np.testing.assert_allclose(got[i], want, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, rtol=1e-5)


def test_default_power_is_the_models_gem_p():
    rng = np.random.default_rng(1)
    model = TinyNet()
    with torch.no_grad():
        model.pool.p.fill_(4.0)
    x = make_images(rng, [(40, 40)])[0][None]
    ms = multiscale_descriptors(model, x)
    torch.testing.assert_close(
        ms[0], per_image(model, x[0], (1.0, 2**-0.5, 0.5), 4.0), atol=1e-5, rtol=0
    )


def test_batching_workers_and_order_do_not_change_results():
    rng = np.random.default_rng(2)
    model = TinyNet()
    imgs = make_images(rng, SIZES)
    a = extract_descriptors(model, imgs, batch_size=1, num_workers=0, progress=False)
    b = extract_descriptors(model, imgs, batch_size=4, num_workers=2, progress=False)
    np.testing.assert_allclose(a, b, atol=1e-6)
    assert model.training  # the caller's mode is restored


def test_same_size_images_share_a_forward(tmp_path):
    rng = np.random.default_rng(3)
    paths = []
    for i, (h, w) in enumerate([(40, 56), (56, 40), (40, 56), (56, 40)]):
        p = tmp_path / f"{i}.png"
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(p)
        paths.append(p)
    calls = []

    class Spy(TinyNet):
        def forward(self, x):
            calls.append(x.shape[0])
            return super().forward(x)

    extract_descriptors(
        Spy(), ImageFiles(paths), scales=(1.0,), batch_size=4, num_workers=0, progress=False
    )
    assert calls == [2, 2]  # sorted by size: two batches of two equal-size images


def test_paths_boxes_and_max_side(tmp_path):
    rng = np.random.default_rng(4)
    arr = rng.integers(0, 255, (60, 80, 3), dtype=np.uint8)
    Image.fromarray(arr).save(tmp_path / "a.png")
    ds = ImageFiles([tmp_path / "a.png"] * 3, boxes=[None, [10, 5, 50, 45], None], max_side=None)
    np.testing.assert_allclose(ds[0].numpy(), arr.transpose(2, 0, 1) / 255.0, atol=1e-6)
    np.testing.assert_allclose(
        ds[1].numpy(), arr[5:45, 10:50].transpose(2, 0, 1) / 255.0, atol=1e-6
    )
    small = ImageFiles([tmp_path / "a.png"], max_side=40)
    assert tuple(small[0].shape) == (3, 30, 40) and small.output_size(0) == (30, 40)
    # Path items in a plain list are loaded the same way.
    model = TinyNet()
    a = extract_descriptors(model, [tmp_path / "a.png"], num_workers=0, progress=False)
    b = extract_descriptors(model, ImageFiles([tmp_path / "a.png"]), num_workers=0, progress=False)
    np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="cannot read"):
        ImageFiles([tmp_path / "missing.png"])[0]


def test_bad_inputs():
    model = TinyNet()
    with pytest.raises(ValueError, match="scales"):
        extract_descriptors(model, [], scales=(1.0, -0.5))
    with pytest.raises(ValueError, match="batch_size"):
        extract_descriptors(model, [], batch_size=0)
    with pytest.raises(ValueError, match=r"\(3, H, W\)"):
        extract_descriptors(model, [torch.zeros(1, 8, 8)], num_workers=0, progress=False)


class Flaky(torch.utils.data.Dataset):
    """Tensors, raising at item ``fail_at`` (an interruption) until disarmed."""

    def __init__(self, imgs, fail_at=None):
        self.imgs = imgs
        self.fail_at = fail_at

    def __len__(self):
        return len(self.imgs)

    def __getitem__(self, i):
        if i == self.fail_at:
            raise KeyboardInterrupt
        return self.imgs[i]


def test_extract_to_file_resumes_after_interruption(tmp_path):
    rng = np.random.default_rng(5)
    imgs = make_images(rng, [(32, 32)] * 9 + [(40, 24)] * 2)
    ids = [f"img{i}" for i in range(len(imgs))]
    model = TinyNet()
    want = extract_descriptors(model, imgs, num_workers=0, progress=False)
    out = tmp_path / "feats" / "db"
    data = Flaky(imgs, fail_at=7)
    with pytest.raises(KeyboardInterrupt):
        extract_to_file(
            model,
            data,
            ids,
            out,
            shard_size=3,
            batch_size=2,
            num_workers=0,
            meta={"checkpoint": "ckpt.pt"},
            progress=False,
        )
    npy, manifest = features_paths(out)
    assert not npy.exists() and not manifest.exists()
    assert sorted(p.name for p in (tmp_path / "feats" / "db.parts").glob("*.npy")) == [
        "000000.npy",
        "000001.npy",
    ]
    data.fail_at = None
    model.calls = 0
    path = extract_to_file(
        model,
        data,
        ids,
        out,
        shard_size=3,
        batch_size=2,
        num_workers=0,
        meta={"checkpoint": "ckpt.pt"},
        progress=False,
    )
    assert model.calls == 3 * (len(imgs) - 6)  # only the 5 missing images, at 3 scales
    np.testing.assert_allclose(np.load(path), want, atol=1e-6)
    m = json.loads(manifest.read_text())
    assert m["ids"] == ids and m["checkpoint"] == "ckpt.pt" and m["dim"] == 6
    assert m["scales"] == pytest.approx([1.0, 2**-0.5, 0.5])
    assert not (tmp_path / "feats" / "db.parts").exists()
    # Complete output with the same settings: nothing is recomputed.
    model.calls = 0
    extract_to_file(
        model,
        data,
        ids,
        out,
        shard_size=3,
        num_workers=0,
        meta={"checkpoint": "ckpt.pt"},
        progress=False,
    )
    assert model.calls == 0


def test_extract_to_file_refuses_foreign_partial_output(tmp_path):
    rng = np.random.default_rng(6)
    imgs = make_images(rng, [(32, 32)] * 4)
    model = TinyNet()
    with pytest.raises(KeyboardInterrupt):
        extract_to_file(
            model,
            Flaky(imgs, fail_at=3),
            list("abcd"),
            tmp_path / "x",
            shard_size=2,
            num_workers=0,
            progress=False,
        )
    with pytest.raises(ValueError, match="partial extraction"):
        extract_to_file(
            model,
            imgs,
            list("abcd"),
            tmp_path / "x",
            scales=(1.0,),
            shard_size=2,
            num_workers=0,
            progress=False,
        )


def test_output_is_readable_by_the_search_module(tmp_path):
    from apretrieval.descriptors import load_features

    rng = np.random.default_rng(7)
    imgs = make_images(rng, [(32, 32)] * 3)
    path = extract_to_file(
        TinyNet(), imgs, ["a", "b", "c"], tmp_path / "f", num_workers=0, progress=False
    )
    fs = load_features(path)
    assert fs.ids == ["a", "b", "c"] and fs.descriptors.shape == (3, 6)


def test_list_images(tmp_path):
    (tmp_path / "sub").mkdir()
    for name in ["b.jpg", "a.PNG", "sub/c.jpeg", "notes.txt"]:
        (tmp_path / name).write_bytes(b"")
    rel = [p.relative_to(tmp_path).as_posix() for p in list_images(tmp_path)]
    assert rel == ["a.PNG", "b.jpg", "sub/c.jpeg"]
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no images"):
        list_images(tmp_path / "empty")
    with pytest.raises(ValueError, match="not found"):
        list_images(tmp_path / "missing")


# --------------------------------------------------------------------------------------------
# CLI (the checkpoint loader is replaced by the stand-in model)


def fake_benchmark(root, rng, n_db=5):
    import pickle

    (root / "jpg").mkdir(parents=True)
    names = [f"db_{i}" for i in range(n_db)]
    for n in [*names, "q_0", "q_1"]:
        h, w = (40, 56) if rng.random() < 0.5 else (56, 40)
        arr = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
        Image.fromarray(arr).save(root / "jpg" / f"{n}.jpg")
    gnd = [
        {"bbx": [2, 3, 30, 35], "easy": [0, 1], "hard": [2], "junk": [3]},
        {"bbx": [0, 0, 40, 40], "easy": [4], "hard": [0], "junk": []},
    ]
    data = {"imlist": names, "qimlist": ["q_0", "q_1"], "gnd": gnd}
    (root / "gnd_roxford5k.pkl").write_bytes(pickle.dumps(data, protocol=3))


@pytest.fixture
def stand_in(monkeypatch):
    import apretrieval.pipeline as pipeline

    model = TinyNet()
    monkeypatch.setattr(pipeline, "load_checkpoint_model", lambda path, device: model)
    return model


def test_cli_extract_benchmark_and_folder(tmp_path, stand_in):
    from apretrieval.cli import main
    from apretrieval.data.revisited import RevisitedDataset

    rng = np.random.default_rng(8)
    fake_benchmark(tmp_path / "rox", rng)
    rc = main(
        [
            "extract",
            "--checkpoint",
            "m.pt",
            "--dataset",
            "roxford5k",
            "--root",
            str(tmp_path / "rox"),
            "--out",
            str(tmp_path / "f" / "rox"),
            "--workers",
            "0",
            "--no-progress",
        ]
    )
    assert rc == 0
    ds = RevisitedDataset("roxford5k", tmp_path / "rox")
    q = np.load(tmp_path / "f" / "rox.queries.npy")
    want = extract_descriptors(
        stand_in, ImageFiles(ds.query_paths(), ds.query_boxes()), num_workers=0, progress=False
    )
    np.testing.assert_allclose(q, want, atol=1e-6)
    m = json.loads((tmp_path / "f" / "rox.db.json").read_text())
    assert m["ids"] == [f"jpg/db_{i}.jpg" for i in range(5)] and m["checkpoint"] == "m.pt"
    rc = main(
        [
            "extract",
            "--checkpoint",
            "m.pt",
            "--images",
            str(tmp_path / "rox" / "jpg"),
            "--out",
            str(tmp_path / "f" / "folder"),
            "--workers",
            "0",
            "--no-progress",
        ]
    )
    assert rc == 0 and np.load(tmp_path / "f" / "folder.npy").shape == (7, 6)


def test_cli_extract_bad_arguments_are_one_line_errors(tmp_path, stand_in, capsys):
    from apretrieval.cli import main

    rc = main(
        ["extract", "--checkpoint", "m.pt", "--dataset", "rparis6k", "--out", str(tmp_path / "x")]
    )
    assert rc == 2 and "--root" in capsys.readouterr().err
    rc = main(
        [
            "extract",
            "--checkpoint",
            "m.pt",
            "--images",
            str(tmp_path),
            "--out",
            str(tmp_path / "x"),
            "--scales",
            "1",
            "0",
        ]
    )
    assert rc == 2 and "--scales" in capsys.readouterr().err
