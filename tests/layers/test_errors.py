"""Bad inputs to the layer give a ValueError that names the argument and the
received value.

Every check matches the argument name AND the received value in the message
(Keras wording: "Received: num_heads=0"), so a backend traceback (a shape error
deep in an einsum, a TypeError from NumPy) never passes for a good message.
After a failed `set_weight_dict`, no weight may have changed (nothing
half-written). The converters' errors are in tests/convert/test_errors.py.
"""

import keras
import numpy as np
import pytest

from mhsa_core import MultiHeadSelfAttention2D, mhsa_block, reference
from mhsa_core.reference import schema

from cases import YOLOV4_MHSA
from harness import (
    assert_unchanged,
    built_layer,
    match_all,
    snapshot,
    to_numpy,
)

# ------------------------------------------------------------- constructor
_INVALID_ARGUMENTS = {
    "num_heads": [0, -1, 2.5, True, "2", None],
    "key_dim": [0, -3, 1.5, True, "4"],
    "position_encoding": ["rotary", None, "CONV", "Relative"],
    "position_size": [
        0,
        5,
        (5,),
        [5],
        (5, 0),
        (5, -1),
        (5.0, 5),
        (True, 5),
        "5x5",
        (5, 5, 5),
        (2, None),
    ],
    "scale_position_logits": ["yes", 1, None, 0.0],
    "position_initializer": ["not_an_initializer", 3],
    "data_format": ["channels_middle", "NHWC"],
    "activation": ["not_an_activation", 3],
    "dropout": [-0.1, 1.0, 1.5, "x", float("nan"), True, None],
    "scale": [0, -1, float("nan"), float("inf"), -float("inf"), True, "1.0", 0.0],
    "seed": ["abc", 1.5, True],
    "qk_norm": ["rms_norm", "LayerNorm", True, "none", 1],
    "output_norm": ["rms", "Layer", False, "none"],
    "output_dense": [None, 1, "yes", 0.0],
    "use_key_bias": [0, "False", 1.0],
    "norm_epsilon": [0, 0.0, -1e-6, float("nan"), float("inf"), True, "1e-6", None],
    "rope_temperature": [0, -1.0, float("nan"), float("inf"), True, "10000"],
    "rope_layout": ["rotate_half", None, "Half", True],
    "rope_grid_indexing": ["yx", "IJ", 0],
    "rope_grid_offset": [None, float("nan"), float("inf"), "1", True],
    "rope_in_pixels": ["yes", 1, None],
    "rope_max_resolution": [0, -224, float("inf"), None, "224"],
    "window_size": [0, -7, 7.0, True, "7", (7,), (7, 0), (7, 7, 7)],
    "shift_size": [-1, None, 1.5, (1,), (1, -1), 2],
}
INVALID_ARGUMENTS = [
    pytest.param(argument, value, id=f"{argument}={value!r}")
    for argument, values in _INVALID_ARGUMENTS.items()
    for value in values
]


@pytest.mark.parametrize("argument,value", INVALID_ARGUMENTS)
def test_invalid_constructor_argument(argument, value):
    with pytest.raises(
        ValueError, match=match_all(f"`{argument}`", f"Received: {argument}={value!r}")
    ):
        MultiHeadSelfAttention2D(**{argument: value})


VALID_ARGUMENTS = [
    pytest.param(kwargs, id=", ".join(f"{k}={v!r}" for k, v in kwargs.items()))
    for kwargs in [
        {"num_heads": np.int64(2), "key_dim": np.int32(3)},
        *({"scale": scale} for scale in (np.float32(0.5), 1, None, 1e-30, 1e30)),
        *(
            {"dropout": dropout, "seed": 1}
            for dropout in (0, 0.0, 0.999, np.float64(0.5))
        ),
        *({"activation": activation} for activation in (None, "linear", "gelu")),
        *({"qk_norm": norm} for norm in (None, "layer", "rms")),
        {"output_norm": "layer", "output_dense": np.True_},
        *({"use_key_bias": value} for value in (None, False, True, np.False_)),
        *({"norm_epsilon": eps} for eps in (1e-30, 1, np.float32(1e-5))),
    ]
] + [pytest.param({"activation": keras.activations.tanh}, id="activation=tanh")]


@pytest.mark.parametrize("kwargs", VALID_ARGUMENTS)
def test_valid_boundary_arguments_are_accepted(kwargs):
    MultiHeadSelfAttention2D(**kwargs)


# -------------------------------------------------------- rotary encodings
# kwargs -> the argument the message names and its received value: a rope_*
# setting that nothing would read is an error, not a silent no-op.
UNREAD_ROPE_SETTINGS = {
    "temperature-without-rope": (
        {"position_encoding": "relative", "rope_temperature": 100.0},
        ("`rope_temperature`", "position_encoding='relative'", "=100.0"),
    ),
    "layout-without-rope": (
        {"rope_layout": "half"},
        ("`rope_layout`", "position_encoding='none'", "rope_layout='half'"),
    ),
    "offset-with-rope_mixed": (
        {"position_encoding": "rope_mixed", "rope_grid_offset": 1.0},
        ("`rope_grid_offset`", "'rope_mixed'", "rope_grid_offset=1.0"),
    ),
    "in_pixels-with-rope_mixed": (
        {"position_encoding": "rope_mixed", "rope_in_pixels": True},
        ("`rope_in_pixels`", "'rope_mixed'", "rope_in_pixels=True"),
    ),
    "temperature-in_pixels": (
        {"position_encoding": "rope", "rope_in_pixels": True, "rope_temperature": 10},
        ("`rope_temperature`", "rope_in_pixels=True", "rope_temperature=10"),
    ),
    "offset-in_pixels": (
        {"position_encoding": "rope", "rope_in_pixels": True, "rope_grid_offset": 1},
        ("`rope_grid_offset`", "rope_in_pixels=True", "rope_grid_offset=1"),
    ),
    "max_resolution-not-in_pixels": (
        {"position_encoding": "rope", "rope_max_resolution": 448},
        ("`rope_max_resolution`", "rope_in_pixels=False", "rope_max_resolution=448"),
    ),
}


@pytest.mark.parametrize(
    "kwargs,parts", UNREAD_ROPE_SETTINGS.values(), ids=UNREAD_ROPE_SETTINGS.keys()
)
def test_unread_rope_setting(kwargs, parts):
    with pytest.raises(ValueError, match=match_all(*parts)):
        MultiHeadSelfAttention2D(**kwargs)


VALID_ROPE = [
    {"position_encoding": "rope", "rope_grid_offset": 1, "rope_temperature": 100},
    {"position_encoding": "rope", "rope_in_pixels": True, "rope_max_resolution": 64},
    {"position_encoding": "rope_mixed", "rope_temperature": 10, "rope_layout": "half"},
    {"position_encoding": "rope_mixed", "rope_grid_indexing": "ij"},
    # Defaults given explicitly are fine with any encoding.
    {"position_encoding": "none", "rope_layout": "interleaved", "rope_grid_offset": 0},
]


@pytest.mark.parametrize("kwargs", VALID_ROPE, ids=lambda k: repr(k))
def test_valid_rope_settings_are_accepted(kwargs):
    MultiHeadSelfAttention2D(**kwargs)


def test_tiny_scale_and_key_dim_1_give_a_finite_output():
    layer = MultiHeadSelfAttention2D(dropout=0.0, scale=1e-30, key_dim=1)
    assert np.all(np.isfinite(to_numpy(layer(np.ones((1, 2, 2, 4), "float32")))))


def test_numpy_integer_seed_is_accepted():
    layer = MultiHeadSelfAttention2D(dropout=0.1, seed=np.int64(2))
    assert type(layer.get_config()["seed"]) is int


# ------------------------------------------------------- channels vs heads
# How a layer meets an input shape (B, ...) for the first time.
FIRST_CALLS = {
    "build": lambda layer, shape: layer.build(shape),
    "eager call": lambda layer, shape: layer(np.zeros(shape, "float32")),
    "symbolic call": lambda layer, shape: layer(keras.Input(shape[1:])),
}


@pytest.mark.parametrize("how", list(FIRST_CALLS))
@pytest.mark.parametrize("data_format", ["channels_last", "channels_first"])
def test_channels_not_divisible_by_heads(data_format, how):
    shape = (2, 10, 5, 5) if data_format == "channels_first" else (2, 5, 5, 10)
    layer = MultiHeadSelfAttention2D(num_heads=4, data_format=data_format)
    with pytest.raises(
        ValueError, match=match_all("divisible", "channels=10", "num_heads=4")
    ):
        FIRST_CALLS[how](layer, shape)


@pytest.mark.parametrize("encoding", ["rope", "rope_mixed"])
@pytest.mark.parametrize("how", list(FIRST_CALLS))
def test_rope_key_dim_not_divisible_by_4(encoding, how):
    """An explicit key_dim fails at once; the default C // num_heads when the
    channels are known, naming key_dim, channels and num_heads."""
    with pytest.raises(
        ValueError, match=match_all("`key_dim`", "divisible by 4", "key_dim=6")
    ):
        MultiHeadSelfAttention2D(position_encoding=encoding, key_dim=6)
    layer = MultiHeadSelfAttention2D(position_encoding=encoding, num_heads=2)
    with pytest.raises(
        ValueError,
        match=match_all(
            "`key_dim`", "divisible by 4", "key_dim=None", "channels=12", "num_heads=2"
        ),
    ):
        FIRST_CALLS[how](layer, (2, 5, 5, 12))


# ------------------------------------------------------------- input rank
_BAD_RANKS = [(2, 5, 8), (2, 5, 5, 8, 1)]
# how -> (call, the message's parts for input shape s). The layer's own check
# answers build / compute_output_shape; through __call__ the InputSpec(ndim=4)
# answers first, still a ValueError with the expected and received rank.
RANK_CHECKS = {
    "build": (
        lambda s: MultiHeadSelfAttention2D().build(s),
        lambda s: ("rank-4", f"Received: inputs.shape={s}"),
    ),
    "compute_output_shape": (
        lambda s: MultiHeadSelfAttention2D().compute_output_shape(s),
        lambda s: ("rank-4", f"Received: inputs.shape={s}"),
    ),
    "eager": (
        lambda s: MultiHeadSelfAttention2D()(np.zeros(s, "float32")),
        lambda s: ("ndim=4", f"ndim={len(s)}", str(s)),
    ),
    "symbolic": (
        lambda s: MultiHeadSelfAttention2D()(keras.Input(s[1:])),
        lambda s: ("ndim=4", f"ndim={len(s)}", str((None,) + s[1:])),
    ),
}


@pytest.mark.parametrize("shape", _BAD_RANKS, ids=str)
@pytest.mark.parametrize("how", list(RANK_CHECKS))
def test_wrong_rank_on_first_build(how, shape):
    call, parts = RANK_CHECKS[how]
    with pytest.raises(ValueError, match=match_all(*parts(shape))):
        call(shape)


BUILT_LAYER_INPUTS = [
    *(
        pytest.param(
            lambda s=s: np.zeros(s, "float32"),
            ("ndim=4", f"ndim={len(s)}", str(s)),
            id=f"eager{s}",
        )
        for s in _BAD_RANKS
    ),
    *(
        pytest.param(
            lambda s=s: keras.Input(s[1:]),
            ("ndim=4", f"ndim={len(s)}"),
            id=f"symbolic{s}",
        )
        for s in _BAD_RANKS
    ),
    pytest.param(
        lambda: np.zeros((2, 5, 5, 6), "float32"),
        ("axis -1", "value 8", "(2, 5, 5, 6)"),
        id="channels 6 instead of 8",
    ),
]


@pytest.mark.parametrize("make_input,parts", BUILT_LAYER_INPUTS)
def test_wrong_rank_or_channels_on_built_layer(make_input, parts):
    layer = MultiHeadSelfAttention2D()
    layer(np.zeros((2, 5, 5, 8), "float32"))
    assert layer.built
    with pytest.raises(ValueError, match=match_all(*parts)):
        layer(make_input())


@pytest.mark.parametrize(
    "data_format,shape",
    [
        ("channels_last", (None, None, None)),
        ("channels_last", (5, 5, None)),
        ("channels_first", (None, None, None)),
        ("channels_first", (None, 5, 5)),
    ],
    ids=lambda v: str(v),
)
def test_unknown_channel_dimension(data_format, shape):
    pattern = match_all(
        "channel dimension",
        f"data_format={data_format!r}",
        f"Received: inputs.shape={(None,) + shape}",
    )
    with pytest.raises(ValueError, match=pattern):
        MultiHeadSelfAttention2D(data_format=data_format)(keras.Input(shape))


# ---------------------------------------------------------- attention_mask
# For an input with H=4, W=5, B=2: flat (B, H*W), W+1, a trailing 1, the wrong
# batch, no batch, H and W swapped.
_BAD_MASKS = [(2, 20), (2, 4, 6), (2, 4, 5, 1), (3, 4, 5), (4, 5), (2, 5, 4)]


@pytest.mark.parametrize("mask_shape", _BAD_MASKS, ids=lambda s: f"mask{s}")
@pytest.mark.parametrize("when", ["unbuilt", "built"])
@pytest.mark.parametrize("data_format", ["channels_last", "channels_first"])
def test_wrong_mask_shape_eager(data_format, when, mask_shape):
    shape = (2, 8, 4, 5) if data_format == "channels_first" else (2, 4, 5, 8)
    layer = MultiHeadSelfAttention2D(num_heads=2, data_format=data_format)
    x = np.zeros(shape, "float32")
    if when == "built":
        layer(x, attention_mask=np.ones((2, 4, 5), bool))
    pattern = match_all(
        "`attention_mask`",
        "(B, H, W)=(2, 4, 5)",
        f"Received: attention_mask.shape={mask_shape}",
    )
    with pytest.raises(ValueError, match=pattern):
        layer(x, attention_mask=np.ones(mask_shape, bool))


@pytest.mark.parametrize(
    "mask_shape", [(20,), (4, 6), (4, 5, 1), (5, 4)], ids=lambda s: f"mask{(None,) + s}"
)
@pytest.mark.parametrize("data_format", ["channels_last", "channels_first"])
def test_wrong_mask_shape_symbolic(data_format, mask_shape):
    shape = (8, 4, 5) if data_format == "channels_first" else (4, 5, 8)
    pattern = match_all(
        "`attention_mask`",
        "(B, H, W)=(None, 4, 5)",
        f"Received: attention_mask.shape={(None,) + mask_shape}",
    )
    with pytest.raises(ValueError, match=pattern):
        MultiHeadSelfAttention2D(data_format=data_format)(
            keras.Input(shape), attention_mask=keras.Input(mask_shape, dtype="bool")
        )


def test_mask_with_unknown_spatial_size_is_accepted_symbolically():
    x = keras.Input((None, None, 8))
    mask = keras.Input((None, None), dtype="bool")
    y = MultiHeadSelfAttention2D()(x, attention_mask=mask)
    assert tuple(y.shape) == (None, None, None, 8)


# ------------------------------------------------------------------ config
def test_from_config_unknown_key():
    layer = MultiHeadSelfAttention2D(num_heads=2)
    config = {**layer.get_config(), "bogus": 1}
    pattern = match_all(
        "Unknown key", "'bogus'", "MultiHeadSelfAttention2D", "'bogus': 1"
    )
    with pytest.raises(ValueError, match=pattern):
        MultiHeadSelfAttention2D.from_config(config)
    # An invalid value in a config is caught by the constructor's checks.
    with pytest.raises(
        ValueError, match=match_all("`num_heads`", "Received: num_heads=0")
    ):
        MultiHeadSelfAttention2D.from_config({**layer.get_config(), "num_heads": 0})


def test_deserialize_unknown_key():
    layer = MultiHeadSelfAttention2D(num_heads=2)
    serialized = keras.saving.serialize_keras_object(layer)
    serialized = {**serialized, "config": {**serialized["config"], "bogus": 1}}
    with pytest.raises(
        ValueError, match=match_all("Unknown key", "'bogus'", "'bogus': 1")
    ):
        keras.saving.deserialize_keras_object(serialized)


# --------------------------------------------------------- set_weight_dict
def _dict_for(layer, channels=8, seed=3):
    return reference.random_weights(
        channels, **schema.weight_arguments(layer.get_config()), seed=seed
    )


def _without_key_bias(weights):
    del weights["key_bias"]
    return weights


@pytest.mark.parametrize(
    "change,shown",
    [
        pytest.param(_without_key_bias, "'key_bias'", id="missing key_bias"),
        pytest.param(
            lambda w: {**w, "bogus_kernel": np.zeros((8, 8))},
            "'bogus_kernel'",
            id="extra bogus_kernel",
        ),
    ],
)
def test_set_weight_dict_wrong_keys(change, shown):
    layer = built_layer(num_heads=2)
    before = snapshot(layer)
    with pytest.raises(
        ValueError, match=match_all("`weights`", shown, "Received: keys=")
    ):
        layer.set_weight_dict(change(_dict_for(layer)))
    assert_unchanged(layer, before)


@pytest.mark.parametrize(
    "config,missing",
    [
        ({"num_heads": 2, "qk_norm": "layer"}, "key_norm_bias"),
        ({"num_heads": 2, "output_dense": True}, "output_kernel"),
        ({"num_heads": 2, "use_key_bias": False, "output_norm": "layer"}, None),
    ],
    ids=["qk_norm without key_norm_bias", "output_dense without kernel", "eva"],
)
def test_set_weight_dict_with_options(config, missing):
    """The options' weights are part of the dict: a missing one is named, and
    a dict with a key_bias does not fit use_key_bias=False."""
    layer = built_layer(**config)
    weights = _dict_for(layer)
    layer.set_weight_dict(weights)  # the complete dict loads
    before = snapshot(layer)
    if missing is None:
        missing, weights = "key_bias", {**weights, "key_bias": np.zeros(8)}
    else:
        weights = {k: v for k, v in weights.items() if k != missing}
    with pytest.raises(
        ValueError, match=match_all("`weights`", repr(missing), "Received: keys=")
    ):
        layer.set_weight_dict(weights)
    assert_unchanged(layer, before)


# position_kernel comes first in the YOLOv4-MHSA block's weights: nothing may
# be assigned before the check of a later weight (value_bias, last) fails.
@pytest.mark.parametrize("name", ["position_kernel", "query_kernel", "value_bias"])
def test_set_weight_dict_wrong_shape(name):
    layer = built_layer(**YOLOV4_MHSA)
    before = snapshot(layer)
    weights = _dict_for(layer)
    good = weights[name].shape
    bad = good[:-1] + (good[-1] + 1,)
    weights[name] = np.zeros(bad)
    with pytest.raises(
        ValueError, match=match_all(repr(name), str(good), f"Received: shape={bad}")
    ):
        layer.set_weight_dict(weights)
    assert_unchanged(layer, before)


def test_set_weight_dict_on_unbuilt_layer():
    with pytest.raises(ValueError, match=match_all("set_weight_dict", "built")):
        MultiHeadSelfAttention2D().set_weight_dict({})


def test_set_weight_dict_uncastable_value_changes_nothing():
    layer = built_layer(**YOLOV4_MHSA)
    before = snapshot(layer)
    weights = _dict_for(layer)
    weights["value_bias"] = np.array(["x"] * 8)  # right shape, not a number
    with pytest.raises(ValueError) as info:
        layer.set_weight_dict(weights)
    assert_unchanged(layer, before)
    assert "value_bias" in str(info.value), str(info.value)


def test_set_weight_dict_wrong_table_shape():
    layer = built_layer(8, position_encoding="relative", position_size=(3, 4))
    weights = layer.get_weight_dict()
    before = snapshot(layer)
    weights["relative_width"] = np.zeros((6, 8))
    with pytest.raises(
        ValueError, match=match_all("relative_width", "(7, 8)", "shape=(6, 8)")
    ):
        layer.set_weight_dict(weights)
    assert_unchanged(layer, before)


# -------------------------------------------------------------- mhsa_block
MHSA_BLOCK_ERRORS = {
    "input_channel=16 on C=8": (
        lambda: mhsa_block(keras.Input((5, 5, 8)), input_channel=16),
        ("`input_channel`", "Received: input_channel=16", "(None, 5, 5, 8)"),
    ),
    "channels_first input_channel=5 on C=8": (
        lambda: mhsa_block(
            keras.Input((8, 5, 5)), input_channel=5, data_format="channels_first"
        ),
        (
            "`input_channel`",
            "Received: input_channel=5",
            "(None, 8, 5, 5)",
            "channels_first",
        ),
    ),
    "rank 3": (
        lambda: mhsa_block(keras.Input((25, 8)), input_channel=8),
        ("rank-4", "Received: inputs.shape=(None, 25, 8)"),
    ),
    "num_heads=0": (
        lambda: mhsa_block(keras.Input((5, 5, 8)), num_heads=0),
        ("`num_heads`", "Received: num_heads=0"),
    ),
    "num_heads=3 on C=8": (
        lambda: mhsa_block(keras.Input((5, 5, 8)), num_heads=3),
        ("channels=8", "num_heads=3"),
    ),
}


@pytest.mark.parametrize("case", list(MHSA_BLOCK_ERRORS))
def test_mhsa_block_errors(case):
    call, parts = MHSA_BLOCK_ERRORS[case]
    with pytest.raises(ValueError, match=match_all(*parts)):
        call()


# ------------------------------------------------------- position encodings
@pytest.mark.parametrize("how", ["build", "symbolic call"])
@pytest.mark.parametrize("encoding", ["relative", "absolute", "relative_bias"])
def test_learned_encoding_needs_a_size(encoding, how):
    """Unknown spatial size at build and no position_size: the error says so."""
    pattern = match_all(
        "`position_size`", "Received: position_size=None", "(None, None, None, 8)"
    )
    with pytest.raises(ValueError, match=pattern):
        FIRST_CALLS[how](
            MultiHeadSelfAttention2D(position_encoding=encoding), (None, None, None, 8)
        )


@pytest.mark.parametrize("encoding", ["relative", "absolute", "relative_bias"])
def test_learned_encoding_takes_either_known_size(encoding):
    MultiHeadSelfAttention2D(position_encoding=encoding).build((None, 3, 4, 8))
    MultiHeadSelfAttention2D(position_encoding=encoding, position_size=(3, 4)).build(
        (None, None, None, 8)
    )


@pytest.mark.parametrize("encoding", ["relative", "relative_bias"])
def test_learned_encoding_in_windows_takes_the_window(encoding):
    """With windows the tables belong to the window: no size needed at build."""
    layer = MultiHeadSelfAttention2D(position_encoding=encoding, window_size=(3, 4))
    layer.build((None, None, None, 8))
    assert layer.position_size == (3, 4)


@pytest.mark.parametrize("how,num_heads", [("build", 2), ("eager call", 1)])
def test_sinusoidal_needs_channels_divisible_by_4(how, num_heads):
    layer = MultiHeadSelfAttention2D(
        position_encoding="sinusoidal", num_heads=num_heads
    )
    with pytest.raises(
        ValueError, match=match_all("sinusoidal", "divisible by 4", "channels=6")
    ):
        FIRST_CALLS[how](layer, (1, 3, 3, 6))
