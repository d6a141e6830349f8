"""The schema every implementation shares (`mhsa_core.reference.schema`):
weight order and shapes, tables, presets, the encodings and their entries in
the layer and the reference."""

import subprocess
import sys

import numpy as np
import pytest

from mhsa_core.layers import position as layer_position
from mhsa_core.reference import position as reference_position
from mhsa_core.reference import schema

from harness import match_all

QKV = [
    "query_kernel",
    "query_bias",
    "key_kernel",
    "key_bias",
    "value_kernel",
    "value_bias",
]
# encoding -> the canonical weight names, in the layer's creation order.
WEIGHT_ORDER = {
    "none": QKV,
    "conv": ["position_kernel", "position_bias", *QKV],
    "sinusoidal": QKV,
    "relative": [*QKV, "relative_height", "relative_width"],
    "absolute": [*QKV, "absolute_height", "absolute_width"],
    "rope": QKV,
    "rope_mixed": [*QKV, "rope_frequencies"],
    "relative_bias": [*QKV, "relative_bias_table"],
}


def test_every_encoding_has_a_weight_order():
    assert set(WEIGHT_ORDER) == set(schema.ENCODINGS) == set(schema.POSITION_ENCODINGS)


@pytest.mark.parametrize("use_bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("encoding", list(WEIGHT_ORDER))
def test_weight_shapes_order(encoding, use_bias):
    """Token weights, then query, key, value (kernel, bias), then the tables;
    C=12, 3 heads of key_dim 5 (not C / heads) on a (4, 7) reference size."""
    shapes = schema.weight_shapes(12, 3, 5, encoding, use_bias, position_size=(4, 7))
    expected = [
        n for n in WEIGHT_ORDER[encoding] if use_bias or not n.endswith("_bias")
    ]
    assert list(shapes) == expected
    assert shapes["query_kernel"] == shapes["key_kernel"] == (12, 15)
    assert shapes["value_kernel"] == (12, 12)
    if use_bias:
        assert shapes["query_bias"] == (15,) and shapes["value_bias"] == (12,)
    if encoding == "conv":
        assert shapes["position_kernel"] == (12, 12)
    if encoding == "rope_mixed":  # (2, heads, kd / 2)
        assert shapes["rope_frequencies"] == (2, 3, 2)


def test_weight_shapes_defaults_are_standard_attention():
    """No position weights by default; key_dim C / heads."""
    assert schema.weight_shapes(16, 4) == {
        "query_kernel": (16, 16),
        "query_bias": (16,),
        "key_kernel": (16, 16),
        "key_bias": (16,),
        "value_kernel": (16, 16),
        "value_bias": (16,),
    }


def test_weight_shapes_of_learned_encodings():
    rel = schema.weight_shapes(
        16, 2, 5, "relative", use_bias=False, position_size=(4, 7)
    )
    assert list(rel) == [
        "query_kernel",
        "key_kernel",
        "value_kernel",
        "relative_height",
        "relative_width",
    ]
    assert rel["relative_height"] == (7, 5) and rel["relative_width"] == (13, 5)
    ab = schema.weight_shapes(16, 2, None, "absolute", position_size=(4, 7))
    assert ab["absolute_height"] == (4, 8) and ab["absolute_width"] == (7, 8)
    assert "relative_height" not in schema.weight_shapes(16, 2, None, "sinusoidal")
    with pytest.raises(ValueError, match="position_size"):
        schema.weight_shapes(16, 2, None, "relative")
    # Swin's per-head bias: one table, (2Hr - 1, 2Wr - 1, heads), no key_dim.
    bias = schema.weight_shapes(16, 2, 5, "relative_bias", position_size=(4, 7))
    assert list(bias)[-1] == "relative_bias_table"
    assert bias["relative_bias_table"] == (7, 13, 2)


@pytest.mark.parametrize(
    "encoding,size,expected",
    [
        ("relative", (4, 7), {"relative_height": (7, 5), "relative_width": (13, 5)}),
        ("relative", (1, 1), {"relative_height": (1, 5), "relative_width": (1, 5)}),
        ("absolute", (4, 7), {"absolute_height": (4, 5), "absolute_width": (7, 5)}),
        ("relative_bias", (4, 7), {"relative_bias_table": (7, 13, 1)}),
        ("relative_bias", (1, 2), {"relative_bias_table": (1, 3, 1)}),
        ("none", (4, 7), {}),
        ("conv", None, {}),
        ("sinusoidal", None, {}),
    ],
)
def test_table_shapes(encoding, size, expected):
    shapes = schema.table_shapes(encoding, size, 5)
    assert shapes == expected and list(shapes) == list(expected)


def test_per_head_table_shape_and_size():
    """The per-head table has one column per head, and its reference size is
    read off its rows (odd counts only)."""
    assert schema.table_shapes("relative_bias", (7, 7), 32, num_heads=3) == {
        "relative_bias_table": (13, 13, 3)
    }
    assert schema.position_size_of_table("relative_bias", (13, 5, 3)) == (7, 3)
    assert schema.position_size_of_table("relative_bias", (12, 5, 3)) is None
    assert schema.position_size_of_table("relative_bias", (13, 5)) is None


@pytest.mark.parametrize("encoding", ["relative", "absolute", "relative_bias"])
def test_table_shapes_need_a_size(encoding):
    with pytest.raises(ValueError, match="Received: position_size=None"):
        schema.table_shapes(encoding, None, 5)


@pytest.mark.parametrize("name", ["rotary", None, "CONV", "Relative", ""])
def test_encoding_unknown_name(name):
    with pytest.raises(
        ValueError,
        match=match_all("`position_encoding`", f"Received: position_encoding={name!r}"),
    ):
        schema.encoding(name)


@pytest.mark.parametrize("name", list(schema.ENCODINGS))
def test_encoding_has_a_layer_class_and_a_reference_entry(name):
    """One schema entry, one layer class (`layers.position.ENCODINGS`) with
    that spec, and the reference's term for its stage."""
    spec = schema.encoding(name)
    assert spec.name == name
    assert layer_position.ENCODINGS[name].spec is spec
    assert (name in reference_position.TOKEN_TERMS) == (spec.stage == "tokens")
    logits_terms = (
        name in reference_position.KEY_EMBEDDINGS,
        name in reference_position.LOGIT_BIASES,
    )
    assert sum(logits_terms) == (spec.stage == "logits")
    assert logits_terms[1] == spec.per_head_table
    assert spec.learned_tables == (spec.stage == "logits")
    # A "qk" stage rotates q and k: its settings and key_dim rule.
    assert (spec.rotary is not None) == (spec.stage == "qk")
    assert (spec.key_dim_multiple == 4) == (spec.stage == "qk")


def test_no_layer_class_or_reference_entry_without_a_schema_entry():
    assert set(layer_position.ENCODINGS) == set(schema.ENCODINGS)
    assert set(reference_position.TOKEN_TERMS) <= set(schema.ENCODINGS)
    assert set(reference_position.KEY_EMBEDDINGS) <= set(schema.ENCODINGS)
    assert set(reference_position.LOGIT_BIASES) <= set(schema.ENCODINGS)


# ---------------------------------------------------------------- rotary
def test_rope_settings_resolve_the_encodings_defaults():
    rope = schema.rope_settings("rope")
    assert (rope.temperature, rope.grid_indexing, rope.layout) == (
        10000.0,
        "ij",
        "interleaved",
    )
    assert rope.reference_size is None
    assert schema.rope_settings("rope", position_size=[3, 4]).reference_size == (3, 4)
    mixed = schema.rope_settings("rope_mixed", position_size=(3, 4))
    assert (mixed.temperature, mixed.grid_indexing) == (10.0, "xy")
    assert mixed.reference_size is None  # no reference grid
    given = schema.rope_settings(
        "rope_mixed", rope_temperature=100, rope_grid_indexing="ij"
    )
    assert (given.temperature, given.grid_indexing) == (100.0, "ij")
    assert schema.rope_settings("relative") is None


def test_rope_mixed_frequencies_by_hand():
    # kd = 8: magnitudes 1 and 10^(-1/2); angle 0 for head 0, pi/2 for head 1.
    f = schema.rope_mixed_frequencies(2, 8, np.array([0.0, np.pi / 2]))
    m = 10.0**-0.5
    np.testing.assert_allclose(f[0, 0], [1, m, 0, 0], atol=1e-15)  # cos 0, cos pi/2
    np.testing.assert_allclose(f[1, 0], [0, 0, 1, m], atol=1e-15)  # sin 0, sin pi/2
    np.testing.assert_allclose(f[0, 1], [0, 0, -1, -m], atol=1e-15)
    np.testing.assert_allclose(f[1, 1], [1, m, 0, 0], atol=1e-15)
    w = schema.random_weights(16, 2, 8, "rope_mixed", seed=0)
    assert w["rope_frequencies"].shape == (2, 2, 4)
    assert list(w)[-1] == "rope_frequencies"


# ------------------------------------------------------------------ presets
def test_yolov4_mhsa_preset_is_the_keras2_block():
    assert schema.preset("yolov4_mhsa") == {
        "num_heads": 1,
        "key_dim": None,
        "activation": "relu",
        "position_encoding": "conv",
        "scale": 1.0,
        "use_bias": True,
        "kernel_initializer": "he_normal",
    }


def test_botnet_preset():
    assert schema.preset("botnet") == {
        "num_heads": 4,
        "activation": None,
        "use_bias": False,
        "scale": None,
        "position_encoding": "relative",
        "scale_position_logits": True,
        "kernel_initializer": "lecun_normal",
    }


def test_preset_overrides_and_copies():
    preset = schema.preset(
        "yolov4_mhsa", num_heads=2, data_format="channels_first", name="mhsa"
    )  # `name` is a layer argument like any other
    assert preset["num_heads"] == 2 and preset["activation"] == "relu"
    assert preset["data_format"] == "channels_first" and preset["name"] == "mhsa"
    preset["activation"] = None
    assert schema.PRESETS["yolov4_mhsa"]["activation"] == "relu"
    assert schema.PRESETS["yolov4_mhsa"]["num_heads"] == 1
    assert "data_format" not in schema.preset("yolov4_mhsa")


def test_unknown_preset():
    with pytest.raises(ValueError, match="Unknown preset.*Received: name='seed'"):
        schema.preset("seed")


# ------------------------------------------------------------- no framework
def test_reference_imports_no_framework():
    """`import mhsa_core.reference` (and `import mhsa_core`) import NumPy only."""
    code = (
        "import sys, mhsa_core, mhsa_core.reference; "
        "print(sorted({'keras', 'tensorflow', 'torch', 'jax'} & set(sys.modules)))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
