"""Checks shared by the weight converters."""

import keras

from mhsa_core.layers._arrays import as_float_array as as_float_array


def require_settings(layer, what, description, **expected):
    """ValueError listing every setting of `layer` that differs from `expected`
    (activations compared by their serialized names)."""

    def comparable(name, value):
        if name == "activation":
            return keras.activations.serialize(keras.activations.get(value))
        return value

    differing = {
        name: comparable(name, getattr(layer, name))
        for name, value in expected.items()
        if comparable(name, getattr(layer, name)) != comparable(name, value)
    }
    if differing:
        wanted = ", ".join(f"{k}={v!r}" for k, v in expected.items())
        raise ValueError(
            f"{what} needs a layer with {description} ({wanted}). Received: "
            + ", ".join(f"{k}={v!r}" for k, v in differing.items())
        )


def build_for_channels(layer, channels):
    """Builds `layer` for inputs of `channels` channels and unknown H, W."""
    shape = [None, None, None, None]
    shape[-1 if layer.data_format == "channels_last" else 1] = channels
    layer.build(tuple(shape))
