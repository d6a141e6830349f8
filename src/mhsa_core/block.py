"""`mhsa_block`: functional drop-in for the Keras 2 seed function of the same name."""

from mhsa_core.layer import MultiHeadSelfAttention2D


def mhsa_block(inputs, input_channel=None, **layer_kwargs):
    """Applies a `MultiHeadSelfAttention2D` to `inputs` and returns its output.

    Replaces the seed's `mhsa_block(input_layer, input_channel)`; unlike it,
    the spatial size may be unknown (`keras.Input((None, None, C))`).

    Args:
        inputs: A rank-4 tensor (symbolic or eager).
        input_channel: Optional; if given, must equal the channels of `inputs`
            (the seed passed it by hand; a mismatch there was a silent bug).
        **layer_kwargs: Arguments of `MultiHeadSelfAttention2D`.

    Returns:
        The layer's output, same shape as `inputs`.
    """
    layer = MultiHeadSelfAttention2D(**layer_kwargs)
    if input_channel is not None:
        shape = tuple(inputs.shape)
        if len(shape) != 4:
            raise ValueError(
                "mhsa_block expects a rank-4 input. "
                f"Received: inputs.shape={shape}"
            )
        axis = -1 if layer.data_format == "channels_last" else 1
        if shape[axis] != input_channel:
            raise ValueError(
                "`input_channel` must equal the channels of `inputs` "
                f"(axis {axis}, data_format={layer.data_format!r}). "
                f"Received: input_channel={input_channel!r}, inputs.shape={shape}"
            )
    return layer(inputs)
