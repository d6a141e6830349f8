"""`mhsa_block`: functional drop-in for the Keras 2 YOLOv4-MHSA `mhsa_block`."""

from __future__ import annotations

from typing import Any

from mhsa_core._typing import Tensor
from mhsa_core.layers.mhsa2d import MultiHeadSelfAttention2D


def mhsa_block(
    inputs: Tensor, input_channel: int | None = None, **layer_kwargs: Any
) -> Tensor:
    """The Keras 2 YOLOv4-MHSA block applied to `inputs`; returns its output.

    Replaces `mhsa_block(input_layer, input_channel)` of the Keras 2
    YOLOv4-MHSA / CSPDarknet53-MHSA code with unchanged semantics: the layer is
    `MultiHeadSelfAttention2D.yolov4_mhsa(**layer_kwargs)` (one head, ReLU
    projections, the "conv" encoding, unscaled logits). Unlike the original,
    the spatial size may be unknown (`keras.Input((None, None, C))`).

    Args:
        inputs: A rank-4 tensor (symbolic or eager).
        input_channel: Optional; if given, must equal the channels of `inputs`
            (the original passed it by hand; a mismatch there was a silent bug).
        **layer_kwargs: Overrides of the preset (`MultiHeadSelfAttention2D`
            arguments, e.g. `data_format` or `name`).

    Returns:
        The layer's output, same shape as `inputs`.
    """
    layer = MultiHeadSelfAttention2D.yolov4_mhsa(**layer_kwargs)
    if input_channel is not None:
        shape = tuple(inputs.shape)
        if len(shape) != 4:
            raise ValueError(
                f"mhsa_block expects a rank-4 input. Received: inputs.shape={shape}"
            )
        axis = -1 if layer.data_format == "channels_last" else 1
        if shape[axis] != input_channel:
            raise ValueError(
                "`input_channel` must equal the channels of `inputs` "
                f"(axis {axis}, data_format={layer.data_format!r}). "
                f"Received: input_channel={input_channel!r}, inputs.shape={shape}"
            )
    return layer(inputs)
