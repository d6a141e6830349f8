"""Weight import: the Keras 2 YOLOv4-MHSA block, BoTNet (official code and
timm), and timm's attention modules.

`from_official` and `from_timm` rearrange other projects' parameters into the
arrays the layer loads; `layer_from_timm` turns a timm attention module
(BoTNet's, ViT's, EVA's, Swin's) into a built layer (`convert/timm.py`).
The loaders themselves are the layer's (`mhsa_core.layers.weight_import`,
also its `load_*_weights` methods) and are exported here too: this package
imports the layer's, never the reverse.
"""

from mhsa_core.convert.botnet import from_official as from_official
from mhsa_core.convert.botnet import from_timm as from_timm
from mhsa_core.convert.timm import layer_from_timm as layer_from_timm
from mhsa_core.layers.weight_import import (
    load_botnet_weights as load_botnet_weights,
)
from mhsa_core.layers.weight_import import (
    load_yolov4_mhsa_weights as load_yolov4_mhsa_weights,
)

__all__ = [
    "load_yolov4_mhsa_weights",
    "load_botnet_weights",
    "from_official",
    "from_timm",
    "layer_from_timm",
]
