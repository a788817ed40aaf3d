"""The backbone names a model can be built on, as plain data (no torch is imported).

Torchvision trunks with the width of their last feature map, and ``timm/<model>`` for any model
of the timm library (optional extra). The training settings check a name against these before
anything heavy is loaded; :mod:`apretrieval.models` and :mod:`apretrieval.backbones` build the
trunk.
"""

from __future__ import annotations

__all__ = ["BACKBONES", "TIMM_PREFIX", "is_timm_name"]

# Feature width of each torchvision backbone's last convolutional map.
BACKBONES: dict[str, int] = {
    "resnet18": 512,
    "resnet34": 512,
    "resnet50": 2048,
    "resnet101": 2048,
    "resnet152": 2048,
    "mobilenet_v2": 1280,
}
TIMM_PREFIX = "timm/"


def is_timm_name(name: str) -> bool:
    """True for backbone names of the form ``timm/<model>``."""
    return isinstance(name, str) and name.startswith(TIMM_PREFIX)
