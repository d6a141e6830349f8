"""Weights of the Keras 2 YOLOv4-MHSA / CSPDarknet53-MHSA `mhsa_block`."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from numpy.typing import ArrayLike

from mhsa_core.convert._checks import (
    as_float_array,
    build_for_channels,
    require_settings,
)
from mhsa_core.reference import schema

# The block's four 1x1 Conv2D layers in creation order, and the canonical
# weight names of each (kernel, bias).
CONVS = ("position", "query", "key", "value")
_NAMES = {
    "position": schema.ENCODINGS["conv"].token_weights,
    **{p: (f"{p}_kernel", f"{p}_bias") for p in schema.PROJECTIONS},
}
# The settings that make the layer compute that block (data_format and
# dropout are free; key_dim must be None: C // heads).
_SETTINGS = {
    k: v for k, v in schema.PRESETS["yolov4_mhsa"].items() if k != "kernel_initializer"
}


def load_yolov4_mhsa_weights(layer, weights: Sequence[ArrayLike]) -> None:
    """Loads the eight arrays of a Keras 2 `mhsa_block` into `layer`.

    Args:
        layer: a `MultiHeadSelfAttention2D` with the block's settings (as
            `MultiHeadSelfAttention2D.yolov4_mhsa()` makes it); built from the
            kernels' shape if needed.
        weights: the kernels and biases of the block's four 1x1 Conv2D layers
            in the order the block creates them: position, query, key, value;
            kernel then bias each. Kernels may be (1, 1, C, C) (as
            `Conv2D.get_weights()` returns them) or (C, C).

    Beware: `model.get_weights()` of a Keras 2 functional model lists the convs
    in topological order, which is not creation order (tf_keras 2.21 gives
    position, key, query, value). Pick them by layer name instead (README).

    Nothing is built or assigned unless every array is valid.
    """
    weights = list(weights)
    if len(weights) != 2 * len(CONVS):
        raise ValueError(
            "load_yolov4_mhsa_weights expects 8 arrays (kernel and bias of the "
            "position, query, key and value convs). "
            f"Received: {len(weights)} arrays"
        )
    require_settings(
        layer,
        "load_yolov4_mhsa_weights",
        "the Keras 2 YOLOv4-MHSA block's settings",
        **_SETTINGS,
    )
    arrays = [np.asarray(w) for w in weights]
    kernel = arrays[0]
    if layer.built:
        channels = layer.channels
    elif kernel.ndim in (2, 4) and kernel.shape[-1] > 0:
        channels = kernel.shape[-1]
    else:
        raise ValueError(
            "Weight 0 (position kernel) must have shape (1, 1, C, C) or "
            f"(C, C). Received: shape={kernel.shape}"
        )
    # Everything is checked before anything is built or assigned.
    converted = {}
    for i, conv in enumerate(CONVS):
        for j, part in enumerate(("kernel", "bias")):
            array = arrays[2 * i + j]
            expected = (channels, channels) if part == "kernel" else (channels,)
            if part == "kernel" and array.ndim == 4 and array.shape[:2] == (1, 1):
                array = array[0, 0]  # (1, 1, C_in, C_out) -> (C_in, C_out)
            if array.shape != expected:
                raise ValueError(
                    f"Weight {2 * i + j} ({conv} {part}) must have shape "
                    f"{expected}"
                    + (f" or {(1, 1) + expected}" if part == "kernel" else "")
                    + f". Received: shape={arrays[2 * i + j].shape}"
                )
            converted[_NAMES[conv][j]] = as_float_array(
                array, f"weight {2 * i + j} ({conv} {part})"
            )
    if not layer.built:
        build_for_channels(layer, channels)
    layer.set_weight_dict(converted)
