"""Training data that used to be read or sampled wrongly without a word.

* Every image mode Pillow opens decodes to the pixels of its 8-bit RGB twin, in each place
  that reads images (training list, training/evaluation transforms, extraction, Revisited).
* Training refuses data with fewer than 2 usable classes, every batch holds distinct classes
  (also across an epoch boundary), and a batch without any positive is reported.
"""

from __future__ import annotations

import logging
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from apretrieval.augment_config import AugmentConfig
from apretrieval.data.decode import decode_rgb, oriented_size, to_rgb
from apretrieval.data.lists import ImageList
from apretrieval.data.sampler import ClassBalancedBatchSampler, has_positive
from apretrieval.data.transforms import TrainTransform, resize_max_side
from apretrieval.extraction.images import ImageFiles

H, W = 36, 52


def twin_rgb(seed: int = 0) -> np.ndarray:
    """(H, W, 3) uint8 photo-like image: smooth ramps plus noise, every level in use."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:H, 0:W]
    base = np.stack([x * 255 / (W - 1), y * 255 / (H - 1), (x + y) * 255 / (W + H - 2)], -1)
    return np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8)


def twin_grey(seed: int = 0) -> np.ndarray:
    """(H, W) uint8 with 0 and 255 present (the range ends must map exactly)."""
    g = twin_rgb(seed)[..., 0].copy()
    g[0, 0], g[0, 1] = 0, 255
    return g


def grey3(g: np.ndarray) -> np.ndarray:
    return np.repeat(g[..., None], 3, axis=2)


def saved(img: Image.Image, path: Path, **kw) -> Path:
    img.save(path, **kw)
    return path


def decoded(path: Path) -> np.ndarray:
    with Image.open(path) as img:
        return np.asarray(decode_rgb(img))


def assert_pixels(got: np.ndarray, want: np.ndarray, tol: int = 1) -> None:
    assert got.shape == want.shape and got.dtype == np.uint8
    err = np.abs(got.astype(int) - want.astype(int)).max()
    assert err <= tol, f"max pixel error {err} > {tol}"


# --- modes ----------------------------------------------------------------------------------


def grey_files(tmp: Path) -> dict[str, tuple[Path, np.ndarray]]:
    """name -> (file, its 8-bit RGB twin) for the high-bit-depth greyscale modes."""
    g = twin_grey()
    g16 = g.astype(np.uint16) * 257  # 8-bit value v stored as v * 257 (0 -> 0, 255 -> 65535)
    out = {
        "I;16 png": saved(Image.fromarray(g16), tmp / "g16.png"),
        "I;16 tiff": saved(Image.fromarray(g16), tmp / "g16.tif"),
        "I tiff": saved(Image.fromarray(g16.astype(np.int32), "I"), tmp / "gI.tif"),
        "F [0,1] tiff": saved(Image.fromarray((g / 255).astype(np.float32), "F"), tmp / "f1.tif"),
        "F [0,255] tiff": saved(Image.fromarray(g.astype(np.float32), "F"), tmp / "f255.tif"),
    }
    return {k: (p, grey3(g)) for k, p in out.items()}


def test_high_bit_depth_greyscale_decodes_as_its_8bit_twin(tmp_path):
    files = grey_files(tmp_path)
    modes = set()
    for name, (path, want) in files.items():
        with Image.open(path) as img:
            modes.add(img.mode)
        assert_pixels(decoded(path), want, tol=0 if "F" not in name else 1)
    assert {"I;16", "I", "F"} <= {m if not m.startswith("I;16") else "I;16" for m in modes}


def transparent_twin() -> tuple[np.ndarray, np.ndarray]:
    """(twin RGB, alpha): the right half is transparent and must show white."""
    rgb = twin_rgb(1)
    alpha = np.full((H, W), 255, np.uint8)
    alpha[:, W // 2 :] = 0
    want = rgb.copy()
    want[:, W // 2 :] = 255
    return want, alpha


def test_alpha_is_composited_over_white(tmp_path):
    want, alpha = transparent_twin()
    hidden = want.copy()
    hidden[:, W // 2 :] = 0  # what hides under transparent pixels: black
    rgba = Image.fromarray(np.dstack([hidden, alpha]), "RGBA")
    assert_pixels(decoded(saved(rgba, tmp_path / "rgba.png")), want, tol=0)
    g = want[..., 0]
    la = Image.fromarray(np.dstack([hidden[..., 0], alpha]), "LA")
    assert_pixels(decoded(saved(la, tmp_path / "la.png")), grey3(g), tol=0)
    # half-transparent: a * colour + (1 - a) * white
    half = Image.fromarray(np.dstack([hidden, np.full((H, W), 128, np.uint8)]), "RGBA")
    blend = (hidden.astype(float) * 128 + 255 * 127) / 255
    assert_pixels(np.asarray(to_rgb(half)), np.rint(blend).astype(np.uint8), tol=1)


def test_palette_with_transparent_index_shows_white(tmp_path):
    want, alpha = transparent_twin()
    pal = Image.fromarray(want).quantize(colors=200, dither=Image.Dither.NONE)
    colours = np.asarray(pal.convert("RGB"))
    idx = np.asarray(pal).astype(np.uint8) + 1
    idx[alpha == 0] = 0  # entry 0 (black) is used only under the transparent half
    img = Image.fromarray(idx, "P")
    img.putpalette([0, 0, 0, *pal.getpalette()[: 3 * 200]])
    path = saved(img, tmp_path / "p.png", transparency=0)
    with Image.open(path) as reread:
        assert reread.mode == "P" and "transparency" in reread.info
    expect = colours.copy()
    expect[alpha == 0] = 255
    assert_pixels(decoded(path), expect, tol=0)
    gif = saved(img, tmp_path / "p.gif", transparency=0)
    assert_pixels(decoded(gif), expect, tol=0)


def cmyk_of(rgb: np.ndarray) -> np.ndarray:
    """Full under-colour removal: K = 255 - max(R, G, B), the inks scaled by what K leaves."""
    x = rgb.astype(np.float64)
    k = 255 - x.max(axis=2, keepdims=True)
    room = np.maximum(255 - k, 1e-9)
    cmy = (255 - k - x) * 255 / room
    return np.rint(np.concatenate([cmy, k], axis=2)).clip(0, 255).astype(np.uint8)


def test_cmyk_decodes_as_its_rgb_twin(tmp_path):
    want = twin_rgb(2)
    cmyk = Image.fromarray(cmyk_of(want), "CMYK")
    assert_pixels(decoded(saved(cmyk, tmp_path / "c.tif")), want, tol=2)
    # A CMYK JPEG (lossy, Adobe-inverted on disk) still reads as the photo, not its negative.
    jpg = decoded(saved(cmyk, tmp_path / "c.jpg", quality=98))
    assert np.abs(jpg.astype(float) - want).mean() < 6


# EXIF orientation o: displayed = SHOW[o](stored), per the EXIF specification.
SHOW = {
    2: np.fliplr,
    3: lambda a: np.rot90(a, 2),
    4: np.flipud,
    5: lambda a: a.transpose(1, 0, 2),
    6: lambda a: np.rot90(a, -1),  # rotate 90 degrees clockwise to display
    7: lambda a: a.transpose(1, 0, 2)[::-1, ::-1],
    8: lambda a: np.rot90(a, 1),
}


def stored_for(displayed: np.ndarray, o: int) -> np.ndarray:
    for turns in range(4):
        for flip in (lambda a: a, np.fliplr):
            s = np.ascontiguousarray(flip(np.rot90(displayed, turns)))
            if SHOW[o](s).shape == displayed.shape and np.array_equal(SHOW[o](s), displayed):
                return s
    raise AssertionError(o)


def with_orientation(arr: np.ndarray, o: int, path: Path, fmt: str = "PNG") -> Path:
    img = Image.fromarray(arr)
    exif = Image.Exif()
    exif[0x0112] = o
    kw = {"quality": 97} if fmt == "JPEG" else {}
    return saved(img, path, format=fmt, exif=exif.tobytes(), **kw)


@pytest.mark.parametrize("o", range(2, 9))
def test_exif_orientation_is_applied(tmp_path, o):
    want = twin_rgb(3)
    path = with_orientation(stored_for(want, o), o, tmp_path / f"o{o}.png")
    with Image.open(path) as img:
        assert oriented_size(img) == (W, H)
    assert_pixels(decoded(path), want, tol=0)
    # a crop box is in displayed coordinates
    box, size = (10, 4, 40, 30), (15, 13)
    with Image.open(path) as img:
        got = np.asarray(decode_rgb(img, box, size))
    ref = np.asarray(Image.fromarray(want).resize(size, Image.BILINEAR, box=box))
    assert_pixels(got, ref, tol=1)


# --- the places that read images -------------------------------------------------------------


def all_twins(tmp: Path) -> list[tuple[str, Path, np.ndarray]]:
    """(name, file, 8-bit RGB twin) for every troublesome mode, plus a plain 8-bit PNG."""
    out = [(k, p, w) for k, (p, w) in grey_files(tmp).items()]
    want, alpha = transparent_twin()
    hidden = want.copy()
    hidden[:, W // 2 :] = 0
    la = Image.fromarray(np.dstack([hidden[..., 0], alpha]), "LA")
    out.append(("LA", saved(la, tmp / "la.png"), grey3(want[..., 0])))
    rgb = twin_rgb(2)
    out.append(("CMYK", saved(Image.fromarray(cmyk_of(rgb), "CMYK"), tmp / "c.tif"), rgb))
    out.append(("EXIF 6", with_orientation(stored_for(rgb, 6), 6, tmp / "o6.png"), rgb))
    out.append(("RGB", saved(Image.fromarray(rgb), tmp / "rgb.png"), rgb))
    return out


def as_tensor(arr: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float() / 255


def test_training_list_transforms_and_extraction_decode_every_mode_alike(tmp_path):
    twins = all_twins(tmp_path)
    images = ImageList(
        [str(p) for _, p, _ in twins], list(range(len(twins))), [n for n, _, _ in twins]
    )
    files = ImageFiles([p for _, p, _ in twins], max_side=None)
    shrink = ImageFiles([p for _, p, _ in twins], max_side=26)
    cfg = AugmentConfig(
        max_side=26, crop_scale=(0.5, 0.9), tilt=0.0, brightness=0.0, contrast=0.0, saturation=0.0
    )
    tf = TrainTransform(cfg)
    for i, (name, _, want) in enumerate(twins):
        ref_img = Image.fromarray(want)
        assert_pixels(np.asarray(images.load(i)), want, tol=1)  # ImageList.load
        x = files[i]
        assert x.shape == (3, H, W), name
        assert (x - as_tensor(want)).abs().max() <= 1.5 / 255, name  # extraction, full size
        assert shrink.output_size(i) == tuple(shrink[i].shape[1:]), name
        twin_path = tmp_path / f"twin{i}.png"
        ref_img.save(twin_path)
        small_ref = ImageFiles([twin_path], max_side=26)[0]
        assert (shrink[i] - small_ref).abs().max() <= 1.5 / 255, name  # extraction, resized
        got = images.load(i, lambda img: tf(img, 5))  # training augmentation, same seed
        with Image.open(twin_path) as t:
            ref = tf(t, 5)
        assert got.shape == ref.shape and (got - ref).abs().max() <= 1.5 / 255, name
        got = images.load(i, lambda img: resize_max_side(img, 20))
        assert (got - resize_max_side(ref_img, 20)).abs().max() <= 1.5 / 255, name


def test_revisited_dataset_decodes_every_mode(tmp_path):
    from apretrieval.data.revisited import RevisitedDataset

    twins = all_twins(tmp_path)
    jpg = tmp_path / "bench" / "jpg"
    jpg.mkdir(parents=True)
    for i, (_, path, _) in enumerate(twins):  # any format under the layout's .jpg names
        (jpg / f"im{i}.jpg").write_bytes(path.read_bytes())
    names = [f"im{i}" for i in range(len(twins))]
    gnd = {
        "imlist": names,
        "qimlist": [names[0]],
        "gnd": [{"bbx": [5.0, 3.0, 30.0, 25.0], "easy": [1], "hard": [], "junk": []}],
    }
    with open(tmp_path / "bench" / "gnd_bench.pkl", "wb") as f:
        pickle.dump(gnd, f)
    ds = RevisitedDataset("bench", tmp_path / "bench")
    for i, (name, _, want) in enumerate(twins):
        assert_pixels(np.asarray(ds.load_db(i)), want, tol=1), name
    assert_pixels(np.asarray(ds.load_query(0)), twins[0][2][3:25, 5:30], tol=1)


def test_sixteen_bit_descriptor_matches_its_8bit_twin(tmp_path):
    from apretrieval.extraction.loop import extract_descriptors
    from apretrieval.models import build_model

    g = twin_grey()
    p16 = saved(Image.fromarray(g.astype(np.uint16) * 257), tmp_path / "g16.png")
    p8 = saved(Image.fromarray(grey3(g)), tmp_path / "g8.png")
    torch.manual_seed(0)
    model = build_model("resnet18", out_dim=16).eval()
    d = extract_descriptors(model, ImageFiles([p16, p8], max_side=32), scales=(1.0,))
    d = torch.as_tensor(np.asarray(d))
    assert torch.nn.functional.cosine_similarity(d[0], d[1], dim=0) > 0.9999


@pytest.mark.parametrize(("size", "drafted_width"), [((100, 75), 160), ((150, 113), 320)])
def test_jpeg_draft_is_used_and_stays_close_to_the_full_decode(tmp_path, size, drafted_width):
    """A large JPEG, a crop box and a small output: the decoder's 1/8 or 1/4 draft path runs,
    and its pixels stay within 2/255 of decoding at full size and resizing."""
    rng = np.random.default_rng(4)
    y, x = np.mgrid[0:960, 0:1280]
    smooth = np.stack([128 + 100 * np.sin(x / 97 + c) * np.cos(y / 83 - c) for c in range(3)], -1)
    arr = np.clip(smooth + rng.normal(0, 2, smooth.shape), 0, 255).astype(np.uint8)
    path = saved(Image.fromarray(arr), tmp_path / "big.jpg", quality=95)
    box = (200, 100, 1000, 700)
    with Image.open(path) as full:
        ref = full.convert("RGB").resize(size, Image.BILINEAR, box=box, reducing_gap=None)
    with Image.open(path) as img:
        drafted = decode_rgb(img, box, size)
        assert img.size == (drafted_width, drafted_width * 3 // 4)  # the decoder shrank it
    err = np.abs(np.asarray(drafted, float) - np.asarray(ref, float))
    assert drafted.size == size and err.max() <= 2 and err.mean() < 1
    # extraction takes the same path: a query box and a small max_side (600 x 150 / 800 = 112.5
    # rows, rounded half up as every scaled size)
    files = ImageFiles([path], boxes=[box], max_side=size[0])
    got = files[0]
    assert tuple(got.shape) == (3, size[1], size[0])
    assert (got - as_tensor(np.asarray(ref))).abs().max() <= 2.5 / 255


# --- classes and batches ----------------------------------------------------------------------


def test_fewer_than_two_usable_classes_is_refused():
    with pytest.raises(ValueError, match="at least 2 classes"):
        ClassBalancedBatchSampler([0, 0, 0, 0, 1], batch_size=4, images_per_class=2)
    ClassBalancedBatchSampler([0, 0, 1, 1], batch_size=4, images_per_class=2)  # 2 is enough


def single_class_folder(root: Path) -> Path:
    for i in range(4):
        (root / "only").mkdir(parents=True, exist_ok=True)
        Image.fromarray(twin_rgb(i)).save(root / "only" / f"{i}.png")
    (root / "lonely").mkdir()
    Image.fromarray(twin_rgb(9)).save(root / "lonely" / "0.png")  # one image: no positive
    return root


def test_training_a_single_class_folder_is_refused(tmp_path):
    from apretrieval.train_config import TrainConfig
    from apretrieval.training import train

    cfg = TrainConfig(
        data=str(single_class_folder(tmp_path / "data")),
        backbone="resnet18",
        pretrained=None,
        batch_size=4,
        images_per_class=2,
        steps=1,
        output_dir=str(tmp_path / "run"),
        num_workers=0,
        progress=False,
    )
    with pytest.raises(ValueError, match="at least 2 classes"):
        train(cfg)
    assert not (tmp_path / "run" / "model.pt").exists()


@pytest.mark.parametrize(("n_classes", "per_batch"), [(2, 1), (3, 2), (5, 2), (7, 3), (10, 4)])
def test_batches_hold_distinct_classes_across_epoch_boundaries(n_classes, per_batch):
    labels = np.repeat(np.arange(n_classes), 3)
    for seed in range(12):
        s = ClassBalancedBatchSampler(
            labels, batch_size=2 * per_batch, images_per_class=2, seed=seed
        )
        for step in range(3 * n_classes):
            groups = labels[s.batch(step)].reshape(per_batch, 2)
            assert (groups == groups[:, :1]).all()
            assert len(set(groups[:, 0].tolist())) == per_batch, (seed, step, groups)


def test_each_epoch_visits_distinct_classes_and_all_are_drawn_over_epochs():
    labels = np.repeat(np.arange(7), 2)
    s = ClassBalancedBatchSampler(labels, batch_size=6, images_per_class=2, seed=0)
    per_epoch = 7 // 3
    seen = set()
    for epoch in range(6):
        classes = np.concatenate([s.batch_classes(epoch * per_epoch + j) for j in range(per_epoch)])
        assert len(set(classes.tolist())) == len(classes) == 6  # one class sits out
        seen |= set(classes.tolist())
    assert seen == set(range(7))


def test_more_classes_per_batch_than_classes_spreads_images_over_all():
    labels = np.array([0, 0, 1, 1, 1, 2, 2, 2, 2])
    s = ClassBalancedBatchSampler(labels, batch_size=10, images_per_class=2, seed=1)
    for step in range(6):
        got = labels[s.batch(step)]
        counts = np.bincount(got, minlength=3)
        assert sorted(counts.tolist()) == [2, 4, 4]  # 5 groups of 2 over 3 classes
        # grouped: each class's images are consecutive
        assert (np.diff(got) != 0).sum() == 2


def test_has_positive():
    assert has_positive([3, 1, 3]) and not has_positive([0, 1, 2]) and not has_positive([])


def test_a_batch_without_positive_is_reported(tmp_path, caplog):
    from apretrieval.train_config import TrainConfig
    from apretrieval.training import train

    root = tmp_path / "data"
    for c in range(3):
        (root / f"c{c}").mkdir(parents=True)
        for i in range(2):
            Image.fromarray(twin_rgb(3 * c + i)).save(root / f"c{c}" / f"{i}.png")
    cfg = TrainConfig(
        data=str(root),
        backbone="resnet18",
        pretrained=None,
        out_dim=8,
        batch_size=3,
        images_per_class=1,
        chunk_size=3,
        max_side=24,
        steps=1,
        loss="contrastive",
        whiten_init="identity",
        output_dir=str(tmp_path / "r"),
        num_workers=0,
        progress=False,
        checkpoint_every=1,
    )
    with caplog.at_level(logging.WARNING):
        train(cfg)
    assert "step 1: no image of the batch has a positive" in caplog.text
