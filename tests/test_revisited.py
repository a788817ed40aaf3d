"""Restricted ground-truth loading and the Revisited Oxford/Paris dataset layout."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from apretrieval.data.decode import crop_box
from apretrieval.data.revisited import RevisitedDataset, load_gnd, read_r1m_list

SAMPLES = Path(__file__).parent / "data" / "revisited"


def real(name: str) -> Path:
    """A sample of the real ground truth of ``name`` (see data/revisited/README.md)."""
    return SAMPLES / f"{name}_sample.pkl"


# --------------------------------------------------------------------------------------------
# load_gnd on real entries


def test_real_roxford_and_rparis_load():
    ox = load_gnd(real("roxford5k"))
    assert len(ox["qimlist"]) == len(ox["gnd"]) == 12 and len(ox["imlist"]) == 292
    assert ox["qimlist"][:3] == ["all_souls_000013", "all_souls_000026", "oxford_002985"]
    assert ox["gnd"][0]["bbx"] == [136.5, 34.1, 648.5, 955.7]
    assert [i for i, g in enumerate(ox["gnd"]) if not g["easy"]] == [5, 11]  # real 11 and 66
    assert all(g["easy"] == sorted(g["easy"]) for g in ox["gnd"])
    pa = load_gnd(real("rparis6k"))
    assert len(pa["imlist"]) == 636 and pa["qimlist"][0] == "paris_defense_000605"
    assert pa["gnd"][0]["bbx"] == [130, 17, 843, 732]
    assert [i for i, g in enumerate(pa["gnd"]) if not g["junk"]] == [2, 3]


def test_old_protocol_file_loads():
    old = load_gnd(real("oxford5k"))
    assert len(old["qidx"]) == 5 and set(old["gnd"][0]) == {"bbx", "ok", "junk"}
    # The old protocol lists the queries inside the database.
    assert [old["imlist"][i] for i in old["qidx"]] == old["qimlist"]


# --------------------------------------------------------------------------------------------
# Untrusted pickles


class _Exploit:
    def __init__(self, target: Path) -> None:
        self.target = target

    def __reduce__(self):
        return (os.system, (f"touch {self.target}",))


class _EvalExploit:
    def __reduce__(self):
        return (eval, ("__import__('os').getcwd()",))


@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
def test_malicious_pickle_is_refused_and_not_executed(tmp_path, protocol):
    marker = tmp_path / "pwned"
    bad = tmp_path / "gnd_roxford5k.pkl"
    payload = {"imlist": [], "qimlist": [], "gnd": [_Exploit(marker)]}
    bad.write_bytes(pickle.dumps(payload, protocol=protocol))
    # A plain pickle.load would run `touch marker`; the restricted loader must not.
    with pytest.raises(ValueError, match=r"system"):
        load_gnd(bad)
    assert not marker.exists()


def test_other_globals_are_refused(tmp_path):
    path = tmp_path / "g.pkl"
    path.write_bytes(pickle.dumps({"gnd": _EvalExploit()}))
    with pytest.raises(ValueError, match=r"builtins\.eval"):
        load_gnd(path)
    path.write_bytes(pickle.dumps({"gnd": [], "imlist": [], "qimlist": [], "x": Path("/")}))
    with pytest.raises(ValueError, match="pathlib"):
        load_gnd(path)


@pytest.mark.parametrize("protocol", [3, 4, 5])
def test_numpy_arrays_and_scalars_are_accepted(tmp_path, protocol):
    path = tmp_path / "g.pkl"
    gnd = [
        {
            "bbx": np.array([1.0, 2.0, 30.5, 40.0]),
            "easy": np.array([0, 2]),
            "hard": np.arange(3, 5, dtype=np.int32),
            "junk": [np.int64(1)],
        }
    ]
    path.write_bytes(pickle.dumps({"imlist": ["a"] * 5, "qimlist": ["q"], "gnd": gnd}, protocol))
    out = load_gnd(path)
    np.testing.assert_array_equal(out["gnd"][0]["easy"], [0, 2])
    assert out["gnd"][0]["junk"][0] == 1


def test_object_arrays_and_garbage_are_refused(tmp_path):
    path = tmp_path / "g.pkl"
    obj = np.array([{"a": 1}, None], dtype=object)
    path.write_bytes(pickle.dumps({"imlist": [], "qimlist": [], "gnd": [], "o": obj}))
    with pytest.raises(ValueError, match="object arrays"):
        load_gnd(path)
    path.write_bytes(b"\x80\x03}q\x00(X\x01")  # truncated
    with pytest.raises(ValueError, match="not a readable"):
        load_gnd(path)
    path.write_bytes(pickle.dumps([1, 2, 3]))
    with pytest.raises(ValueError, match="imlist"):
        load_gnd(path)


# --------------------------------------------------------------------------------------------
# Dataset layout


def test_crop_box_rounds_and_clips():
    assert crop_box([136.5, 34.1, 648.5, 955.7], (1000, 900)) == (136, 34, 648, 900)
    assert crop_box([-3, 0.6, 10.4, 20], (50, 50)) == (0, 1, 10, 20)
    with pytest.raises(ValueError, match="empty"):
        crop_box([5, 5, 5.2, 9], (50, 50))


def _fake_revisited(root: Path, name: str = "roxford5k") -> None:
    (root / "jpg").mkdir(parents=True)
    rng = np.random.default_rng(0)
    names = [f"img_{i}" for i in range(4)]
    for n in [*names, "query_a"]:
        arr = rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)
        Image.fromarray(arr).save(root / "jpg" / f"{n}.jpg")
    gnd = [{"bbx": [10, 5.6, 40.4, 30], "easy": [0], "hard": [2], "junk": [3]}]
    data = {"imlist": names, "qimlist": ["query_a"], "gnd": gnd}
    (root / f"gnd_{name}.pkl").write_bytes(pickle.dumps(data, protocol=3))


def test_revisited_dataset_layout_and_query_crop(tmp_path):
    _fake_revisited(tmp_path)
    ds = RevisitedDataset("roxford5k", tmp_path)
    assert ds.num_queries == 1 and ds.num_db == 4
    assert ds.db_path(2) == tmp_path / "jpg" / "img_2.jpg"
    assert ds.query_path(0) == tmp_path / "jpg" / "query_a.jpg"
    assert ds.gnd[0]["easy"] == [0] and ds.gnd[0]["bbx"] == [10.0, 5.6, 40.4, 30.0]
    assert ds.load_query(0).size == (30, 24)  # (40 - 10) x (30 - 6) after rounding
    assert ds.load_db(1).size == (64, 48)
    assert ds.relative(ds.db_path(0)) == "jpg/img_0.jpg"
    assert ds.missing_images() == []


def test_revisited_dataset_with_r1m_distractors(tmp_path):
    _fake_revisited(tmp_path / "rox")
    r1m = tmp_path / "r1m"
    (r1m / "jpg" / "00").mkdir(parents=True)
    (r1m / "revisitop1m.txt").write_text("00/abc.jpg\n00/def\n\n")
    assert read_r1m_list(r1m) == ["00/abc.jpg", "00/def.jpg"]
    ds = RevisitedDataset("roxford5k", tmp_path / "rox", r1m_root=r1m)
    assert ds.num_db == 6 and ds.db_path(5) == r1m / "jpg" / "00" / "def.jpg"
    assert ds.db_path(3) == tmp_path / "rox" / "jpg" / "img_3.jpg"  # gnd indices unchanged
    assert ds.relative(ds.db_path(4)) == str((r1m / "jpg" / "00" / "abc.jpg").resolve())
    assert len(ds.missing_images()) == 2


def test_revisited_dataset_errors(tmp_path):
    with pytest.raises(ValueError, match="dataset must be"):
        RevisitedDataset("oxford5k", tmp_path)
    with pytest.raises(ValueError, match="download"):
        RevisitedDataset("rparis6k", tmp_path)
    _fake_revisited(tmp_path)
    with pytest.raises(ValueError, match=r"revisitop1m\.txt"):
        RevisitedDataset("roxford5k", tmp_path, r1m_root=tmp_path / "nope")


def test_real_roxford_as_dataset(tmp_path):
    (tmp_path / "gnd_roxford5k.pkl").write_bytes(real("roxford5k").read_bytes())
    ds = RevisitedDataset("roxford5k", tmp_path)
    assert ds.num_db == 292 and ds.num_queries == 12
    assert sum(1 for g in ds.gnd if not g["easy"]) == 2
    assert ds.query_path(0) == tmp_path / "jpg" / "all_souls_000013.jpg"
    assert ds.query_bbx(0) == (136.5, 34.1, 648.5, 955.7)
    assert len(ds.missing_images()) == 292 + 12  # no image shipped
