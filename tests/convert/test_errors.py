"""Bad arrays or a wrong layer given to the weight converters: a ValueError
naming the array (or the setting) and what was received, and nothing built or
assigned (a built layer's weights unchanged, an unbuilt layer still unbuilt)."""

import numpy as np
import pytest

from mhsa_core import MultiHeadSelfAttention2D, convert

from cases import YOLOV4_MHSA, yolov4_mhsa
from harness import (
    assert_unchanged,
    built_layer,
    match_all,
    snapshot,
    yolov4_mhsa_arrays,
)

# The layer's error message names the block it needs.
SETTINGS = "needs a layer with the Keras 2 YOLOv4-MHSA block's settings"


# ------------------------------------------------ load_yolov4_mhsa_weights
@pytest.mark.parametrize("count", [0, 7, 9], ids=lambda c: f"{c} arrays")
def test_yolov4_mhsa_wrong_count(count):
    layer = built_layer(16, **YOLOV4_MHSA)
    before = snapshot(layer)
    with pytest.raises(
        ValueError,
        match=match_all(
            "load_yolov4_mhsa_weights expects 8 arrays", f"Received: {count} arrays"
        ),
    ):
        layer.load_yolov4_mhsa_weights((yolov4_mhsa_arrays() * 2)[:count])
    assert_unchanged(layer, before)


# (index, what, bad shape, expected (C, C) or (C,) in the message)
YOLOV4_MHSA_BAD_SHAPES = [
    (0, "position kernel", (1, 1, 16, 15), (16, 16)),
    (2, "query kernel", (1, 1, 16, 15), (16, 16)),
    (2, "query kernel", (16, 15), (16, 16)),
    (2, "query kernel", (2, 1, 16, 16), (16, 16)),
    (2, "query kernel", (16, 16, 1), (16, 16)),
    (5, "key bias", (15,), (16,)),
    (6, "value kernel", (1, 1, 15, 16), (16, 16)),
    (7, "value bias", (1, 16), (16,)),
]


@pytest.mark.parametrize(
    "index,what,bad_shape,expected",
    [pytest.param(*case, id=f"{case[1]} {case[2]}") for case in YOLOV4_MHSA_BAD_SHAPES],
)
def test_yolov4_mhsa_wrong_shape(index, what, bad_shape, expected):
    layer = built_layer(16, **YOLOV4_MHSA)
    before = snapshot(layer)
    arrays = yolov4_mhsa_arrays()
    arrays[index] = np.zeros(bad_shape, "float32")
    with pytest.raises(
        ValueError,
        match=match_all(
            f"Weight {index} ({what})", str(expected), f"Received: shape={bad_shape}"
        ),
    ):
        layer.load_yolov4_mhsa_weights(arrays)
    assert_unchanged(layer, before)


# A layer that differs from the block in one setting, and how the message shows it.
NOT_THE_BLOCK = {
    "position_encoding=none": (
        yolov4_mhsa(position_encoding="none"),
        "position_encoding='none'",
    ),
    "use_bias=False": (yolov4_mhsa(use_bias=False), "use_bias=False"),
    "num_heads=2": (yolov4_mhsa(num_heads=2), "num_heads=2"),
    "scale=None": (yolov4_mhsa(scale=None), "scale=None"),
    "activation=None": (yolov4_mhsa(activation=None), "activation='linear'"),
    "key_dim=16": (yolov4_mhsa(key_dim=16), "key_dim=16"),
    # timm's options add weights the block has not.
    "qk_norm=layer": (yolov4_mhsa(qk_norm="layer"), "qk_norm='layer'"),
    "output_dense": (yolov4_mhsa(output_dense=True), "output_dense=True"),
    "use_key_bias=False": (yolov4_mhsa(use_key_bias=False), "use_key_bias=False"),
    # The layer's defaults since 0.2.0 are not the block.
    "defaults": ({}, "activation='linear', position_encoding='none', scale=None"),
}


@pytest.mark.parametrize("name", list(NOT_THE_BLOCK))
def test_yolov4_mhsa_needs_the_blocks_settings_unbuilt(name):
    config, shown = NOT_THE_BLOCK[name]
    layer = MultiHeadSelfAttention2D(**config)
    with pytest.raises(
        ValueError,
        match=match_all("load_yolov4_mhsa_weights", SETTINGS, f"Received: {shown}"),
    ):
        layer.load_yolov4_mhsa_weights(yolov4_mhsa_arrays(16))
    assert not layer.built


@pytest.mark.parametrize("name", ["position_encoding=none", "use_bias=False"])
def test_yolov4_mhsa_needs_the_blocks_settings_built(name):
    config, shown = NOT_THE_BLOCK[name]
    layer = built_layer(16, **config)
    before = snapshot(layer)
    with pytest.raises(
        ValueError, match=match_all("load_yolov4_mhsa_weights", SETTINGS, shown)
    ):
        layer.load_yolov4_mhsa_weights(yolov4_mhsa_arrays())
    assert_unchanged(layer, before)


@pytest.mark.parametrize(
    "config,channels,parts",
    [
        pytest.param(
            yolov4_mhsa(num_heads=2, key_dim=4),
            16,
            (SETTINGS, "num_heads=2", "key_dim=4"),
            id="key_dim=4, 2 heads",
        ),
        pytest.param(
            YOLOV4_MHSA,
            8,
            ("(position kernel)", "(8, 8)", "Received: shape=(1, 1, 16, 16)"),
            id="C=8 layer",
        ),
    ],
)
def test_yolov4_mhsa_layer_mismatch(config, channels, parts):
    """Built layers whose weights differ from the block's (C=16, width 16)."""
    layer = built_layer(channels, **config)
    before = snapshot(layer)
    with pytest.raises(ValueError, match=match_all(*parts)):
        layer.load_yolov4_mhsa_weights(yolov4_mhsa_arrays(16))
    assert_unchanged(layer, before)


def test_failed_yolov4_mhsa_load_leaves_unbuilt_layer_unbuilt():
    layer = MultiHeadSelfAttention2D.yolov4_mhsa()
    arrays = yolov4_mhsa_arrays(16)
    arrays[0] = np.zeros((1, 1, 16, 8), "float32")  # position kernel, wrong C_out
    with pytest.raises(
        ValueError, match=match_all("(position kernel)", "(1, 1, 16, 8)")
    ):
        layer.load_yolov4_mhsa_weights(arrays)
    assert not layer.built
    layer.load_yolov4_mhsa_weights(yolov4_mhsa_arrays(16))  # the corrected arrays
    assert layer.built


def test_yolov4_mhsa_uncastable_value_changes_nothing():
    layer = built_layer(16, **YOLOV4_MHSA)
    before = snapshot(layer)
    arrays = yolov4_mhsa_arrays()
    arrays[7] = np.array(["x"] * 16)  # value bias: right shape, not a number
    with pytest.raises(ValueError, match=match_all("value bias", "dtype=<U1")):
        layer.load_yolov4_mhsa_weights(arrays)
    assert_unchanged(layer, before)


# ----------------------------------------------------- load_botnet_weights
def _botnet_arrays(channels=8, heads=2, key_dim=4, size=(3, 5), seed=0):
    rng = np.random.default_rng(seed)
    return {
        "q_kernel": rng.standard_normal((channels, heads * key_dim)),
        "k_kernel": rng.standard_normal((channels, heads * key_dim)),
        "v_kernel": rng.standard_normal((channels, channels)),
        "rel_height": rng.standard_normal((2 * size[0] - 1, key_dim)),
        "rel_width": rng.standard_normal((2 * size[1] - 1, key_dim)),
    }


BOTNET_BAD_SHAPES = {  # array -> (bad shape, expected shape in the message)
    "q_kernel": ((8, 6), "(8, 8)"),
    "k_kernel": ((8, 9), "(8, 8)"),
    "v_kernel": ((8, 4), "(8, 8)"),
    "rel_height": ((7, 4), "(5, 4)"),  # 7 rows where position_size 3 needs 5
    "rel_width": ((9, 3), "(9, 4)"),
}


@pytest.mark.parametrize("name", list(BOTNET_BAD_SHAPES))
@pytest.mark.parametrize("built", [False, True], ids=["unbuilt", "built"])
def test_botnet_wrong_shapes(built, name):
    shape, expected = BOTNET_BAD_SHAPES[name]
    layer = MultiHeadSelfAttention2D.botnet(num_heads=2, position_size=(3, 5))
    if built:
        layer.build((None, None, None, 8))
        before = snapshot(layer)
    arrays = _botnet_arrays()
    arrays[name] = np.zeros(shape)
    with pytest.raises(
        ValueError,
        match=match_all(f"`{name}`", expected, f"Received: {name}.shape={shape}"),
    ):
        layer.load_botnet_weights(**arrays)
    if built:
        assert_unchanged(layer, before)
    else:
        assert not layer.built


def test_botnet_size_from_tables():
    """Without position_size the tables give it; an even row count cannot be
    2 * n - 1 and is refused."""
    layer = MultiHeadSelfAttention2D.botnet(num_heads=2)
    arrays = _botnet_arrays(size=(3, 5))
    layer.load_botnet_weights(**arrays)
    assert layer.position_size == (3, 5) and layer.channels == 8
    np.testing.assert_array_equal(
        layer.get_weight_dict()["relative_width"], arrays["rel_width"].astype("float32")
    )
    layer = MultiHeadSelfAttention2D.botnet(num_heads=2)
    arrays["rel_height"] = np.zeros((4, 4))
    with pytest.raises(
        ValueError, match=match_all("`rel_height`", "odd", "shape=(4, 4)")
    ):
        layer.load_botnet_weights(**arrays)
    assert not layer.built


RELATIVE = {"position_encoding": "relative", "position_size": (3, 5)}
NOT_BOTNET = {
    "defaults": ({}, "position_encoding='none'"),
    "yolov4_mhsa": (YOLOV4_MHSA, "position_encoding='conv'"),
    "use_bias": (RELATIVE, "use_bias=True"),
    "relu": (
        {**RELATIVE, "use_bias": False, "activation": "relu"},
        "activation='relu'",
    ),
    "output_norm": (
        {**RELATIVE, "use_bias": False, "output_norm": "layer"},
        "output_norm='layer'",
    ),
}


@pytest.mark.parametrize("name", list(NOT_BOTNET))
def test_botnet_needs_botnet_structure(name):
    config, shown = NOT_BOTNET[name]
    layer = MultiHeadSelfAttention2D(**{"num_heads": 2, **config})
    with pytest.raises(
        ValueError, match=match_all("load_botnet_weights", "BoTNet's structure", shown)
    ):
        layer.load_botnet_weights(**_botnet_arrays())
    assert not layer.built


def test_botnet_non_numeric_changes_nothing():
    layer = MultiHeadSelfAttention2D.botnet(num_heads=2, position_size=(3, 5))
    layer.build((None, None, None, 8))
    before = snapshot(layer)
    arrays = _botnet_arrays()
    arrays["rel_width"] = np.full((9, 4), "x")
    with pytest.raises(ValueError, match=match_all("rel_width", "dtype=<U1")):
        layer.load_botnet_weights(**arrays)
    assert_unchanged(layer, before)


# ------------------------------------------------- from_official, from_timm
def _official(**changes):
    arrays = {
        "wq": np.zeros((8, 2, 4)),
        "wk": np.zeros((8, 2, 4)),
        "wv": np.zeros((8, 2, 4)),
        "r_height": np.zeros((5, 4)),
        "r_width": np.zeros((9, 4)),
    }
    return convert.from_official(**{**arrays, **changes})


@pytest.mark.parametrize("name", ["wq", "wk", "wv"])
def test_from_official_needs_3d_kernels(name):
    with pytest.raises(
        ValueError,
        match=match_all(
            f"`{name}`", "(C, heads, dim)", f"Received: {name}.shape=(8, 8)"
        ),
    ):
        _official(**{name: np.zeros((8, 8))})


@pytest.mark.parametrize(
    "shape,num_heads,parts",
    [
        pytest.param(
            (24, 8, 3, 3),
            2,
            ("`qkv_weight`", "Received: qkv_weight.shape=(24, 8, 3, 3)"),
            id="3x3 conv",
        ),
        pytest.param(
            (24,), 2, ("`qkv_weight`", "Received: qkv_weight.shape=(24,)"), id="1-D"
        ),
        pytest.param(
            (8, 8),
            2,
            ("2 * num_heads * dqk + C", "qkv_weight.shape=(8, 8)", "num_heads=2"),
            id="no q and k rows",
        ),
        pytest.param(
            (22, 8, 1, 1),
            4,
            ("2 * num_heads * dqk + C", "(22, 8, 1, 1)", "num_heads=4"),
            id="14 q and k rows for 4 heads",
        ),
    ],
)
def test_from_timm_bad_qkv_weight(shape, num_heads, parts):
    with pytest.raises(ValueError, match=match_all(*parts)):
        convert.from_timm(
            np.zeros(shape), np.zeros((5, 4)), np.zeros((9, 4)), num_heads
        )
