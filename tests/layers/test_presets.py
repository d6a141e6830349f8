"""The layer's defaults (standard attention since 0.2.0) and its presets: the
Keras 2 YOLOv4-MHSA block (`yolov4_mhsa()`, `mhsa_block`: 0.1.0's defaults)
and BoTNet (`botnet()`)."""

import inspect

import keras
import numpy as np
import pytest

from mhsa_core import MultiHeadSelfAttention2D, mhsa_block, reference

from cases import CASES, YOLOV4_MHSA
from harness import assert_float64_close, make_case, to_numpy

# The defaults of mhsa_core 0.1.0, written out here (not read from the
# schema): what `yolov4_mhsa()` and `mhsa_block` must still compute.
OLD_DEFAULTS = {
    "num_heads": 1,
    "key_dim": None,
    "activation": "relu",
    "position_encoding": "conv",
    "scale": 1.0,
    "use_bias": True,
    "kernel_initializer": "he_normal",
}


# ------------------------------------------------------------ the defaults
def test_defaults_are_standard_attention():
    layer = MultiHeadSelfAttention2D(num_heads=8)
    config = layer.get_config()
    assert (
        layer.activation is keras.activations.linear
        and config["activation"] == "linear"
    )
    assert config["position_encoding"] == "none"
    assert config["scale"] is None and config["key_dim"] is None
    assert config["use_bias"] is True
    assert isinstance(layer.kernel_initializer, keras.initializers.GlorotUniform)
    assert config["kernel_initializer"]["class_name"] == "GlorotUniform"
    layer.build((None, None, None, 64))
    assert layer.scale_value == pytest.approx(1 / np.sqrt(8))
    assert [w.name for w in layer.trainable_weights] == [
        "query_kernel",
        "query_bias",
        "key_kernel",
        "key_bias",
        "value_kernel",
        "value_bias",
    ]


@pytest.mark.parametrize(
    "argument",
    [
        "num_heads",
        "key_dim",
        "activation",
        "position_encoding",
        "scale",
        "scale_position_logits",
    ],
)
def test_reference_defaults_are_the_layers(argument):
    """`reference.mhsa_forward` and the layer default to the same computation."""
    layer = inspect.signature(MultiHeadSelfAttention2D.__init__).parameters[argument]
    oracle = inspect.signature(reference.mhsa_forward).parameters[argument]
    assert layer.default == oracle.default


def test_default_layer_equals_the_reference_defaults():
    """MultiHeadSelfAttention2D(num_heads=8) is reference.mhsa_forward with
    nothing but num_heads=8, float64."""
    config, shape = CASES["multihead"]
    assert config == {"num_heads": 8}
    layer, x, weights = make_case(config, shape, dtype="float64")
    assert "position_kernel" not in weights
    expected = reference.mhsa_forward(x, weights, num_heads=8)
    assert_float64_close(to_numpy(layer(x)), expected)
    # Not the YOLOv4-MHSA block's computation by accident: ReLU and no scaling
    # change the output.
    legacy = reference.mhsa_forward(
        x, weights, num_heads=8, activation="relu", scale=1.0
    )
    assert np.abs(legacy - expected).max() > 1e-2 * np.abs(expected).max()


# ---------------------------------------------------------- YOLOv4-MHSA
def test_yolov4_mhsa_preset_is_the_old_default_layer():
    preset = MultiHeadSelfAttention2D.yolov4_mhsa(name="mhsa")
    old = MultiHeadSelfAttention2D(**OLD_DEFAULTS, name="mhsa")
    assert preset.get_config() == old.get_config()
    assert (
        preset.get_config()
        == MultiHeadSelfAttention2D(
            **reference.PRESETS["yolov4_mhsa"], name="mhsa"
        ).get_config()
    )
    assert isinstance(preset.kernel_initializer, keras.initializers.HeNormal)
    preset.build((None, None, None, 16))
    assert [w.name for w in preset.trainable_weights][:2] == [
        "position_kernel",
        "position_bias",
    ]
    assert preset.scale_value == 1.0


def test_yolov4_mhsa_overrides():
    layer = MultiHeadSelfAttention2D.yolov4_mhsa(
        num_heads=2, scale=None, data_format="channels_first"
    )
    config = layer.get_config()
    assert config["num_heads"] == 2 and config["scale"] is None
    assert config["data_format"] == "channels_first"
    assert config["activation"] == "relu" and config["position_encoding"] == "conv"
    # The config is an ordinary one: it revives as the same layer.
    assert MultiHeadSelfAttention2D.from_config(config).get_config() == config


def test_mhsa_block_uses_the_preset():
    """mhsa_block builds `yolov4_mhsa(**overrides)`: the same config, and the
    same output bits with the same weights."""
    inputs = keras.Input((None, None, 16))
    model = keras.Model(inputs, mhsa_block(inputs, 16, name="block"))
    block = model.layers[-1]
    assert (
        block.get_config()
        == MultiHeadSelfAttention2D.yolov4_mhsa(name="block").get_config()
    )
    other = keras.Input((None, None, 16))
    overridden = keras.Model(other, mhsa_block(other, num_heads=2, name="two")).layers[
        -1
    ]
    assert (
        overridden.get_config()
        == MultiHeadSelfAttention2D.yolov4_mhsa(num_heads=2, name="two").get_config()
    )
    preset, x, _ = make_case(YOLOV4_MHSA, (2, 5, 3, 16))
    block.set_weight_dict(preset.get_weight_dict())
    np.testing.assert_array_equal(to_numpy(model(x)), to_numpy(preset(x)))


# ---------------------------------------------------------------- BoTNet
def test_botnet_configuration():
    layer = MultiHeadSelfAttention2D.botnet(num_heads=4, position_size=(14, 14))
    assert layer.num_heads == 4 and layer.position_size == (14, 14)
    assert layer.activation is keras.activations.linear
    assert layer.use_bias is False and layer.scale is None
    assert layer.position_encoding == "relative" and layer.scale_position_logits is True
    assert isinstance(layer.kernel_initializer, keras.initializers.LecunNormal)
    layer.build((None, None, None, 64))
    assert layer.scale_value == pytest.approx(1 / 4)
    assert [w.name for w in layer.trainable_weights] == [
        "query_kernel",
        "key_kernel",
        "value_kernel",
        "relative_height",
        "relative_width",
    ]
    # Overrides and other arguments pass through; the config is an ordinary one.
    timm_like = MultiHeadSelfAttention2D.botnet(
        num_heads=2,
        position_size=(7, 7),
        scale_position_logits=False,
        key_dim=8,
        data_format="channels_first",
        name="mhsa",
    )
    config = timm_like.get_config()
    assert config["scale_position_logits"] is False and config["key_dim"] == 8
    assert MultiHeadSelfAttention2D.from_config(config).get_config() == config
