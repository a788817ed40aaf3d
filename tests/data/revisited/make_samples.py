"""Regenerate the ground-truth samples of this folder from the real files (run by hand).

Usage: python tests/data/revisited/make_samples.py DIR, where DIR holds the real
gnd_roxford5k.pkl, gnd_rparis6k.pkl and gnd_oxford5k.pkl (sha256 checked below). Each sample
keeps a few real queries, with their real names, boxes and easy/hard/junk (or ok/junk) lists,
and the database images those lists name, in their original order; indices are renumbered
into the shorter image list (an order-preserving map, so every list stays sorted).
"""

from __future__ import annotations

import hashlib
import pickle
import sys
from pathlib import Path

SOURCES = {
    "roxford5k": "ba7967754bd2d7d2210a5799f9c45ad5835e269a80ef9d3eba44caa35816c471",
    "rparis6k": "d2e729a5293dda7dda8a15c8383424a42e4964a2c4cfea2f32fa85d11d2df499",
    "oxford5k": "c84e5eb68524fd46aab5c0e80b90f970d7bf677507aeb8cddd6b12990d4bc19e",
}
# Kept queries: the first three (fixture checks), both ROxford queries without an easy
# positive (11, 66), RParis queries without junk (25, 26), and small landmarks.
QUERIES = {
    "roxford5k": [0, 1, 2, 5, 10, 11, 15, 25, 35, 45, 64, 66],
    "rparis6k": [0, 1, 25, 26, 40, 62, 63],
    "oxford5k": [0, 1, 2, 5, 10],
}
LISTS = {
    "roxford5k": ("easy", "hard", "junk"),
    "rparis6k": ("easy", "hard", "junk"),
    "oxford5k": ("ok", "junk"),
}


def sample(data: dict, keep: list[int], lists: tuple[str, ...]) -> dict:
    used = sorted(
        {i for q in keep for key in lists for i in data["gnd"][q][key]}
        | {data["qidx"][q] for q in keep if "qidx" in data}
    )
    new = {old: n for n, old in enumerate(used)}
    gnd = [
        {"bbx": data["gnd"][q]["bbx"], **{k: [new[i] for i in data["gnd"][q][k]] for k in lists}}
        for q in keep
    ]
    out = {
        "gnd": gnd,
        "imlist": [data["imlist"][i] for i in used],
        "qimlist": [data["qimlist"][q] for q in keep],
    }
    if "qidx" in data:
        out["qidx"] = [new[data["qidx"][q]] for q in keep]
    return out


def main(src: Path) -> None:
    here = Path(__file__).parent
    for name, digest in SOURCES.items():
        raw = (src / f"gnd_{name}.pkl").read_bytes()
        assert hashlib.sha256(raw).hexdigest() == digest, name
        data = pickle.loads(raw)  # checked bytes: plain containers only (see the README)
        out = sample(data, QUERIES[name], LISTS[name])
        (here / f"{name}_sample.pkl").write_bytes(pickle.dumps(out, protocol=3))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
