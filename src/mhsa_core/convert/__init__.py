"""Weight import: the Keras 2 YOLOv4-MHSA block, BoTNet (official code and timm)."""

from mhsa_core.convert.botnet import from_official as from_official
from mhsa_core.convert.botnet import from_timm as from_timm
from mhsa_core.convert.botnet import load_botnet_weights as load_botnet_weights
from mhsa_core.convert.yolov4_mhsa import (
    load_yolov4_mhsa_weights as load_yolov4_mhsa_weights,
)

__all__ = [
    "load_yolov4_mhsa_weights",
    "load_botnet_weights",
    "from_official",
    "from_timm",
]
