"""Released retrieval models of dirtorch and cirtorch as apretrieval checkpoints.

Two public model zoos ship GeM networks on ResNet trunks:

* dirtorch (Naver's deep-image-retrieval, the code of the AP-loss paper): a torch-saved dict
  with ``model_options`` (``arch`` ``resnet{18,50,101,152}_rmac``, ``pooling`` ``gem``/
  ``gemp``, ``gemp``, ``out_dim``, ``norm_features``, ``without_fc``...), ``state_dict``
  (torchvision ResNet names ``conv1``/``bn1``/``layer1-4``, ``adpool.p``, ``fc``; keys may
  carry the ``module.`` prefix of DataParallel), an optional ``preprocess`` (``mean``/``std``)
  and an optional ``pca``: {learning set name: scikit-learn ``PCA``}. Its network is
  ``normalise -> ResNet -> GeM(p) -> [L2 if norm_features] -> FC -> L2``; its evaluation
  whitens as ``L2((x - mean_) components_^T / explained_variance_^whitenp)`` with
  ``whitenp = 0.25`` by default.
* cirtorch (cnnimageretrieval-pytorch): a dict with ``meta`` (``architecture``, ``pooling``,
  ``whitening``, ``mean``, ``std``, ``outputdim``, optional ``Lw`` = {learning set: {``ss``|
  ``ms``: {``m`` (D, 1), ``P`` (D, D)}}}) and ``state_dict`` (``features.0-7`` = the ResNet
  children up to ``layer4``, ``pool.p``, optional ``whiten``). Its network is
  ``normalise -> features -> GeM(p) -> L2 -> [whiten FC -> L2]``; its post-processing whitening
  is ``L2(P (x - m))`` (``ss`` for single-scale, ``ms`` for multi-scale descriptors).

Both map onto :class:`~apretrieval.models.RetrievalNet` exactly (trunk weights renamed, GeM p,
FC, input mean/std, L2 before the FC or not). The post-processing whitenings become
:class:`~apretrieval.postprocess.Whitening` files for ``apretrieval evaluate --whiten``, with the
source's power folded into the projection.

Checkpoints are untrusted pickles: they are read with ``torch.load(weights_only=True)``, which
builds only tensors and plain containers, plus an allow-list of what these files need: numpy
arrays/scalars/dtypes, and scikit-learn's ``PCA`` mapped to an inert attribute holder (no
scikit-learn code runs, none needs to be installed). Anything else is refused.
"""

from __future__ import annotations

import importlib
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from apretrieval.backbone_names import BACKBONES
from apretrieval.model_config import ModelConfig
from apretrieval.models import RetrievalNet, save_checkpoint
from apretrieval.postprocess import Whitening, save_whitening

__all__ = [
    "SOURCES",
    "ConvertedModel",
    "convert",
    "convert_cirtorch",
    "convert_dirtorch",
    "load_untrusted_checkpoint",
    "save_converted",
]

SOURCES: tuple[str, ...] = ("dirtorch", "cirtorch")
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)
# torchvision's ResNet children in order: the index of each in our trunk (nn.Sequential).
_RESNET_CHILDREN = ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4")


@dataclass
class ConvertedModel:
    """A converted network, its post-processing whitenings by name, and what it came from."""

    model: RetrievalNet
    whitenings: dict[str, Whitening] = field(default_factory=dict)
    source: dict[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------------------------
# Restricted loading


class _PickledObject:
    """Inert stand-in for a pickled class instance: keeps its attribute dict, runs nothing."""

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, tuple) and len(state) == 2:  # (dict, slots) form
            state = {**(state[0] or {}), **(state[1] or {})}
        if not isinstance(state, dict):
            raise ValueError(f"unexpected pickled state of type {type(state).__name__}")
        self.__dict__.update(state)


def _allowed_globals() -> list[Any]:
    """(object, pickled name) pairs for torch.serialization.safe_globals."""
    core = importlib.import_module(
        f"numpy.{'_core' if hasattr(np, '_core') else 'core'}.multiarray"
    )
    allowed: list[Any] = [(np.ndarray, "numpy.ndarray"), (np.dtype, "numpy.dtype")]
    for module in ("numpy.core.multiarray", "numpy._core.multiarray"):
        allowed += [
            (core._reconstruct, f"{module}._reconstruct"),
            (core.scalar, f"{module}.scalar"),
        ]
    # dtype instances are rebuilt through their class, which the loader must also accept.
    for t in (np.float16, np.float32, np.float64, np.int32, np.int64, np.uint8, np.bool_):
        allowed.append((type(np.dtype(t)), f"numpy.dtypes.{type(np.dtype(t)).__name__}"))
    # scikit-learn's PCA (the dirtorch whitening), under its module names across versions.
    for module in ("sklearn.decomposition.pca", "sklearn.decomposition._pca"):
        allowed.append((_PickledObject, f"{module}.PCA"))
    return allowed


def load_untrusted_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """A released checkpoint, loaded without executing code (see the module docstring)."""
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"checkpoint not found: {p}")
    try:
        with torch.serialization.safe_globals(_allowed_globals()):
            obj = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as err:  # UnpicklingError, RuntimeError: refused or not a torch file
        first = next(iter(str(err).splitlines()), "") or type(err).__name__
        what = "the file is empty" if p.stat().st_size == 0 else first[:300]
        raise ValueError(f"cannot load {p} safely: {what}") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{p} does not hold a dict (got {type(obj).__name__})")
    return obj


# --------------------------------------------------------------------------------------------
# Shared helpers


def _strip_module(state: Any) -> dict[str, Tensor]:
    """The weights without DataParallel's ``module.`` prefix; ValueError unless they are a
    dict of named tensors (a released file is read as untrusted input)."""
    if not isinstance(state, Mapping):
        raise ValueError(f"'state_dict' must be a dict of tensors, got {type(state).__name__}")
    odd = [k for k, v in state.items() if not isinstance(k, str) or not isinstance(v, Tensor)]
    if odd:
        raise ValueError(f"'state_dict' holds entries that are not named tensors: {odd[:3]}")
    return {k.removeprefix("module."): v for k, v in state.items()}


def _dict(value: Any, what: str) -> dict[Any, Any]:
    """``value`` (a part of a released file: options, preprocessing, whitenings) as a dict;
    ValueError naming ``what`` otherwise."""
    if not isinstance(value, Mapping):
        raise ValueError(f"{what} must be a dict, got {type(value).__name__}: {value!r:.80}")
    return dict(value)


def _resnet_to_trunk(key: str, prefix: str = "") -> str | None:
    """torchvision ResNet name (``layer3.1.conv2.weight``) -> our trunk name (``backbone.6...``)."""
    head, _, rest = key.removeprefix(prefix).partition(".")
    if head not in _RESNET_CHILDREN:
        return None
    return f"backbone.{_RESNET_CHILDREN.index(head)}.{rest}"


def _load_into(model: RetrievalNet, state: dict[str, Tensor], what: str) -> None:
    """Strict load; BatchNorm step counters that old checkpoints lack come from the model."""
    own = model.state_dict()
    for k, v in own.items():
        if k.endswith("num_batches_tracked") and k not in state:
            state[k] = v
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        raise ValueError(
            f"{what}: weights do not match the architecture: missing "
            f"{missing[:5]}, unexpected {unexpected[:5]}"
        )
    bad = [k for k in own if tuple(own[k].shape) != tuple(state[k].shape)]
    if bad:
        raise ValueError(f"{what}: wrong shapes for {bad[:5]}")
    model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()})


def _gem_p(state: dict[str, Tensor], key: str, default: float) -> float:
    p = state.get(key)
    return float(p.reshape(-1)[0]) if p is not None else float(default)


def _triple(values: Any, what: str) -> tuple[float, float, float]:
    out = tuple(float(v) for v in np.asarray(values, dtype=np.float64).reshape(-1))
    if len(out) != 3:
        raise ValueError(f"{what} must have 3 values (RGB), got {values!r}")
    return out[0], out[1], out[2]


def _build(
    name: str,
    width_out: int | None,
    p: float,
    mean: Any,
    std: Any,
    whiten: bool,
    normalize_pooled: bool,
) -> RetrievalNet:
    from apretrieval.models import _torchvision_backbone

    config = ModelConfig(
        name=name,
        out_dim=width_out,
        gem_p=p,
        frozen_bn=True,
        whiten=whiten,
        mean=_triple(mean, "mean"),
        std=_triple(std, "std"),
        normalize_pooled=normalize_pooled,
    )
    _, trunk = _torchvision_backbone(name)
    return RetrievalNet(trunk, BACKBONES[name], config)


# --------------------------------------------------------------------------------------------
# dirtorch


def _pca_whitening(pca: Any, power: float, name: str) -> Whitening:
    """dirtorch's whitening: (x - mean_) components_^T / explained_variance_^power, then L2."""
    attrs = pca.__dict__ if isinstance(pca, _PickledObject) else pca
    if not isinstance(attrs, Mapping):
        raise ValueError(f"pca[{name!r}]: unsupported whitening object {type(pca).__name__}")
    if "components_" in attrs:  # scikit-learn PCA
        mean = np.asarray(attrs.get("mean_", 0.0), dtype=np.float64)
        comps = np.asarray(attrs["components_"], dtype=np.float64)
        if attrs.get("whiten", True):
            var = np.asarray(attrs["explained_variance_"], dtype=np.float64)
            if not (var > 0).all():  # NaN too: the whitening would divide by it
                raise ValueError(
                    f"pca[{name!r}]: explained_variance_ holds {int((~(var > 0)).sum())} values "
                    "that are not > 0, which whitening divides by: the file is damaged"
                )
            comps = comps / np.power(var, power)[:, None]
        else:
            power = 0.0
    elif "W" in attrs:  # dirtorch's plain form: (x - means) @ W
        mean = np.asarray(attrs.get("means", 0.0), dtype=np.float64)
        comps = np.asarray(attrs["W"], dtype=np.float64).T
    else:
        raise ValueError(f"pca[{name!r}]: no components_ / W in {sorted(attrs)[:10]}")
    mean = np.broadcast_to(mean.reshape(-1), (comps.shape[1],))
    try:
        return Whitening(mean.astype(np.float32), comps.astype(np.float32), float(power))
    except ValueError as err:
        raise ValueError(f"pca[{name!r}]: {err}") from None


def convert_dirtorch(ckpt: Mapping[str, Any], whiten_power: float = 0.25) -> ConvertedModel:
    """A dirtorch checkpoint dict -> :class:`ConvertedModel`.

    ``whiten_power``: the eigenvalue power of the PCA whitenings (dirtorch's ``--whitenp``,
    0.25 by default in its evaluation, which the published numbers use).
    """
    if "model_options" not in ckpt or "state_dict" not in ckpt:
        raise ValueError("not a dirtorch checkpoint: needs 'model_options' and 'state_dict'")
    opts = _dict(ckpt["model_options"], "'model_options'")
    arch = str(opts.get("arch", ""))
    m = re.fullmatch(r"(resnet\d+)_rmac", arch)
    if m is None or m.group(1) not in BACKBONES:
        raise ValueError(
            f"unsupported dirtorch arch {arch!r} (supported: resnet18/50/101/152_rmac)"
        )
    pooling = str(opts.get("pooling", "gem"))
    if not (pooling.startswith("gem") or pooling == "avg"):
        raise ValueError(f"unsupported dirtorch pooling {pooling!r} (GeM or avg only)")
    if float(opts.get("center_bias", 0) or 0) > 0:
        raise ValueError("dirtorch center_bias > 0 is not supported")
    state = _strip_module(ckpt["state_dict"])
    ours: dict[str, Tensor] = {}
    for k, v in state.items():
        if k == "adpool.p":
            ours["pool.p"] = v.reshape(1)
        elif k.startswith("fc."):
            ours["whiten." + k[3:]] = v
        elif (t := _resnet_to_trunk(k)) is not None:
            ours[t] = v
        else:
            raise ValueError(f"unexpected dirtorch weight {k!r}")
    with_fc = not opts.get("without_fc", False)
    p = 1.0 if pooling == "avg" else _gem_p(state, "adpool.p", opts.get("gemp", 3))
    ours.setdefault("pool.p", torch.tensor([p]))
    out_dim = int(state["fc.weight"].shape[0]) if with_fc and "fc.weight" in state else None
    if not with_fc:
        ours = {k: v for k, v in ours.items() if not k.startswith("whiten.")}
    pre = _dict(ckpt.get("preprocess") or {}, "'preprocess'")
    model = _build(
        m.group(1),
        out_dim,
        p,
        pre.get("mean", _IMAGENET_MEAN),
        pre.get("std", _IMAGENET_STD),
        with_fc,
        bool(opts.get("norm_features", False)),
    )
    _load_into(model, ours, "dirtorch checkpoint")
    whitenings = {
        str(k): _pca_whitening(v, whiten_power, str(k))
        for k, v in _dict(ckpt.get("pca") or {}, "'pca'").items()
    }
    source = {
        "from": "dirtorch",
        "arch": arch,
        "pooling": pooling,
        "norm_features": bool(opts.get("norm_features", False)),
        "whiten_power": float(whiten_power),
    }
    return ConvertedModel(model.train(), whitenings, source)


# --------------------------------------------------------------------------------------------
# cirtorch


def convert_cirtorch(ckpt: Mapping[str, Any]) -> ConvertedModel:
    """A cirtorch checkpoint dict -> :class:`ConvertedModel`."""
    if "meta" not in ckpt or "state_dict" not in ckpt:
        raise ValueError("not a cirtorch checkpoint: needs 'meta' and 'state_dict'")
    meta = _dict(ckpt["meta"], "'meta'")
    arch = str(meta.get("architecture", ""))
    if arch not in BACKBONES or not arch.startswith("resnet"):
        raise ValueError(f"unsupported cirtorch architecture {arch!r} (ResNets only)")
    pooling = str(meta.get("pooling", "gem"))
    if pooling not in ("gem", "spoc"):
        raise ValueError(f"unsupported cirtorch pooling {pooling!r} (gem or spoc only)")
    for flag in ("local_whitening", "regional"):
        if meta.get(flag, False):
            raise ValueError(f"cirtorch {flag}=True is not supported")
    state = _strip_module(ckpt["state_dict"])
    ours: dict[str, Tensor] = {}
    for k, v in state.items():
        if k == "pool.p":
            ours[k] = v.reshape(1)
        elif k.startswith("whiten."):
            ours[k] = v
        elif k.startswith("features."):
            idx, _, rest = k[len("features.") :].partition(".")
            ours[f"backbone.{int(idx)}.{rest}"] = v
        else:
            raise ValueError(f"unexpected cirtorch weight {k!r}")
    p = 1.0 if pooling == "spoc" else _gem_p(state, "pool.p", 3.0)
    ours.setdefault("pool.p", torch.tensor([p]))
    whiten = bool(meta.get("whitening", False))
    out_dim = int(state["whiten.weight"].shape[0]) if whiten else None
    model = _build(
        arch,
        out_dim,
        p,
        meta.get("mean", _IMAGENET_MEAN),
        meta.get("std", _IMAGENET_STD),
        whiten,
        True,
    )
    _load_into(model, ours, "cirtorch checkpoint")
    whitenings = {}
    for name, modes in _dict(meta.get("Lw") or {}, "meta 'Lw'").items():
        for mode, lw in _dict(modes, f"Lw[{name!r}]").items():
            lw = _dict(lw, f"Lw[{name!r}][{mode!r}]")
            if not {"m", "P"} <= set(lw):
                raise ValueError(f"Lw[{name!r}][{mode!r}] needs 'm' and 'P', has {sorted(lw)}")
            # Learned (supervised) whitening: the power is inside P already; 0.5 = full.
            mean = np.asarray(lw["m"], dtype=np.float32).reshape(-1)
            try:
                whitenings[f"{name}-{mode}"] = Whitening(mean, np.asarray(lw["P"], np.float32), 0.5)
            except ValueError as err:
                raise ValueError(f"Lw[{name!r}][{mode!r}]: {err}") from None
    source = {"from": "cirtorch", "arch": arch, "pooling": pooling, "whitening": whiten}
    return ConvertedModel(model.train(), whitenings, source)


# --------------------------------------------------------------------------------------------
# Entry points


def convert(
    source: str, path: str | os.PathLike[str], whiten_power: float = 0.25
) -> ConvertedModel:
    """Load a released checkpoint (restricted loader) and convert it."""
    if source not in SOURCES:
        raise ValueError(f"unknown source {source!r}; choose from {SOURCES}")
    ckpt = load_untrusted_checkpoint(path)
    if source == "dirtorch":
        return convert_dirtorch(ckpt, whiten_power)
    return convert_cirtorch(ckpt)


def _safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


def save_converted(out: str | os.PathLike[str], converted: ConvertedModel) -> dict[str, Path]:
    """Write the checkpoint to ``out`` and each whitening to ``<out stem>.whiten-<name>.npz``.

    Returns {"model": path, <whitening name>: path, ...}.
    """
    out = Path(out)
    paths = {"model": save_checkpoint(out, converted.model, source=dict(converted.source))}
    for name, w in converted.whitenings.items():
        wpath = out.with_name(f"{out.stem}.whiten-{_safe_name(name)}.npz")
        paths[name] = save_whitening(wpath, w)
    return paths
