"""The rotary encodings' own pieces, on the current backend: the tables (static
and dynamic sizes, float32 and float64) and the float64-exact sin/cos against
the reference, the rotation hook's dtype, RoPE-Mixed's initial frequencies,
the settings and their config, and what rotary attention must and must not
be invariant to. Their numerics against the reference at every size are in
test_position.py (POSITION_CONFIGS), against timm in test_rope_timm.py."""

import math

import keras
import numpy as np
import pytest
from keras import ops

from mhsa_core import MultiHeadSelfAttention2D, reference
from mhsa_core.layers.position._trig import sin_cos
from mhsa_core.layers.position.rope import rope_tables
from mhsa_core.reference import position as reference_position
from mhsa_core.reference import schema

from harness import assert_float64_close, make_case, reference_config, to_numpy

BACKEND = keras.backend.backend()

# name -> the layer's rope_* arguments and position_size ("rope").
ROPE_SETTINGS = {
    "eva02": {},
    "reference_grid": {"position_size": (4, 9)},
    "half-xy-offset-temperature": {
        "position_size": (6, 3),
        "rope_layout": "half",
        "rope_grid_indexing": "xy",
        "rope_grid_offset": 1.0,
        "rope_temperature": 100.0,
    },
    "in_pixels": {"position_size": (4, 9), "rope_in_pixels": True},
    "in_pixels-max_resolution": {"rope_in_pixels": True, "rope_max_resolution": 48},
}


def _settings(arguments, encoding="rope"):
    arguments = dict(arguments)
    position_size = arguments.pop("position_size", None)
    return schema.rope_settings(encoding, position_size=position_size, **arguments)


# ------------------------------------------------------------ the tables
@pytest.mark.parametrize("size_is", ["int", "tensor"])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("name", list(ROPE_SETTINGS))
def test_rope_tables_match_reference(name, dtype, size_is):
    """Static sizes: float64 NumPy constants rounded once; dynamic sizes
    (tensors): keras.ops, float64 exactly on every backend (`_trig`)."""
    settings = _settings(ROPE_SETTINGS[name])
    height, width, key_dim = 5, 7, 16
    angles = reference_position.rope_angles(height, width, key_dim, settings)
    expected_sin = np.repeat(np.sin(angles), 2, axis=-1)
    expected_cos = np.repeat(np.cos(angles), 2, axis=-1)
    h, w = height, width
    if size_is == "tensor":
        h = ops.convert_to_tensor(height, dtype="int32")
        w = ops.convert_to_tensor(width, dtype="int32")
    sin, cos = (to_numpy(t) for t in rope_tables(h, w, key_dim, settings, dtype))
    assert sin.dtype == cos.dtype == np.dtype(dtype)
    assert sin.shape == cos.shape == (height * width, key_dim)
    # float64: a few ulp of the largest angle (the grid and the products
    # round in another order); float32: the float32 rounding of the angles.
    largest = np.abs(angles).max()
    tol = (8 * largest + 4) * np.finfo(dtype).eps
    np.testing.assert_allclose(sin, expected_sin, rtol=0, atol=tol)
    np.testing.assert_allclose(cos, expected_cos, rtol=0, atol=tol)


def test_rope_tables_layout():
    """Angle m at channels 2m and 2m + 1; the first half of the angles
    follows the row ("ij") or the column ("xy"); with kd = 4, one frequency
    (1): token (y, x) = (1, 2) has angles (1, 2) or (2, 1)."""
    for indexing, (a, b) in (("ij", (1.0, 2.0)), ("xy", (2.0, 1.0))):
        settings = schema.rope_settings("rope", rope_grid_indexing=indexing)
        sin, cos = rope_tables(2, 3, 4, settings, "float64")
        token = 1 * 3 + 2
        np.testing.assert_allclose(
            to_numpy(sin)[token], np.sin([a, a, b, b]), rtol=0, atol=1e-15
        )
        np.testing.assert_allclose(
            to_numpy(cos)[token], np.cos([a, a, b, b]), rtol=0, atol=1e-15
        )


def test_sin_cos_float64_is_exact():
    """The float64 route (range reduction + Taylor series) within 1 ulp of
    NumPy on |x| <= 1000, on every backend (keras 3.15's own ops.sin is
    float32 on JAX); float32 takes the backend's sin and cos."""
    x = np.random.default_rng(0).uniform(-1e3, 1e3, 20000)
    x = np.concatenate([x, [0.0, 1e-300, math.pi / 4, -math.pi / 4, 3 * math.pi]])
    sin, cos = sin_cos(ops.convert_to_tensor(x, dtype="float64"))
    sin, cos = to_numpy(sin), to_numpy(cos)
    assert sin.dtype == cos.dtype == np.float64
    eps = np.finfo(np.float64).eps
    assert np.abs(sin - np.sin(x)).max() <= eps
    assert np.abs(cos - np.cos(x)).max() <= eps
    sin32, cos32 = sin_cos(ops.convert_to_tensor(x[:100], dtype="float32"))
    assert to_numpy(sin32).dtype == np.float32
    np.testing.assert_allclose(to_numpy(cos32), np.cos(x[:100]), rtol=0, atol=1e-4)


class _SinCos(keras.layers.Layer):
    def call(self, x, training=None):
        s, c = sin_cos(x)
        return s + 2.0 * c


@pytest.mark.skipif(BACKEND == "numpy", reason="no gradients on the numpy backend")
def test_sin_cos_float64_gradient_is_cos_and_minus_sin():
    from mhsa_core.consistency import gradients

    x = np.linspace(-20.0, 20.0, 101)
    layer = _SinCos(dtype="float64")
    layer.build(x.shape)
    _, (grad,), _ = gradients.value_and_grad(layer, x, np.ones_like(x))
    assert grad.dtype == np.float64
    np.testing.assert_allclose(grad, np.cos(x) - 2 * np.sin(x), rtol=0, atol=1e-14)


# ------------------------------------------------------- the rotation hook
@pytest.mark.parametrize("encoding", ["rope", "rope_mixed"])
def test_rotate_returns_the_logits_dtype(encoding):
    """Under mixed precision q and k come as 16-bit and leave rotated in
    float32 (the rotation is computed like the logits); float32 and float64
    stay as they are."""
    for policy, expected in (
        ("mixed_float16", "float32"),
        ("mixed_bfloat16", "float32"),
        ("float32", "float32"),
        ("float64", "float64"),
    ):
        layer = MultiHeadSelfAttention2D(
            num_heads=2, position_encoding=encoding, dtype=policy
        )
        layer.build((1, 3, 4, 16))
        q = ops.ones((1, 2, 12, 8), dtype=layer.compute_dtype)
        rq, rk = layer.position.rotate(q, q, 3, 4)
        assert keras.backend.standardize_dtype(rq.dtype) == expected, policy
        assert keras.backend.standardize_dtype(rk.dtype) == expected, policy


def test_other_encodings_do_not_rotate():
    layer = MultiHeadSelfAttention2D(num_heads=2, position_encoding="absolute")
    layer.build((1, 3, 4, 16))
    q = ops.ones((1, 2, 12, 8))
    rq, rk = layer.position.rotate(q, q + 1.0, 3, 4)
    np.testing.assert_array_equal(to_numpy(rq), to_numpy(q))
    np.testing.assert_array_equal(to_numpy(rk), to_numpy(q + 1.0))


# ------------------------------------------------------------ invariances
def _float64_output(config, shape=(2, 4, 6, 16), seed=0):
    layer, x, weights = make_case(config, shape, seed=seed, dtype="float64")
    return to_numpy(layer(x)), x, weights


@pytest.mark.parametrize("indexing", ["ij", "xy"])
def test_interleaved_rope_only_sees_offsets(indexing):
    """Interleaved rope turns each channel pair by an angle linear in the
    position, so q_i . k_j depends on the offset only: shifting the grid
    (rope_grid_offset) leaves the output unchanged. The "half" layout with
    timm's interleaved tables is not a rotation of channel pairs and moves."""
    base = {"num_heads": 2, "position_encoding": "rope", "rope_grid_indexing": indexing}
    out, _, _ = _float64_output(base)
    shifted, _, _ = _float64_output({**base, "rope_grid_offset": 3.0})
    assert_float64_close(shifted, out, rtol=1e-12)
    half, _, _ = _float64_output({**base, "rope_layout": "half"})
    half_shifted, _, _ = _float64_output(
        {**base, "rope_layout": "half", "rope_grid_offset": 3.0}
    )
    assert np.abs(half_shifted - half).max() > 1e-3


@pytest.mark.parametrize("encoding", ["rope", "rope_mixed"])
def test_rotation_is_used(encoding):
    """The same weights without the rotation give another output."""
    config = {"num_heads": 2, "position_encoding": encoding}
    out, x, weights = _float64_output(config)
    plain = {k: v for k, v in weights.items() if not k.startswith("rope_")}
    none = reference.mhsa_forward(
        x, plain, **{**reference_config(config), "position_encoding": "none"}
    )
    assert np.abs(out - none).max() > 1e-2


def test_zero_frequencies_are_no_rotation():
    """position_initializer also initializes RoPE-Mixed's frequencies: zeros
    give angle 0 everywhere, the identity rotation, so "none"'s output."""
    config = {"num_heads": 2, "position_encoding": "rope_mixed"}
    layer, x, weights = make_case(config, (2, 4, 6, 16), dtype="float64")
    zeroed = MultiHeadSelfAttention2D(
        **config, position_initializer="zeros", dtype="float64"
    )
    zeroed.build(x.shape)
    assert np.all(to_numpy(zeroed.get_weight_dict()["rope_frequencies"]) == 0)
    zeroed.set_weight_dict({**weights, "rope_frequencies": np.zeros((2, 2, 4))})
    plain = {k: v for k, v in weights.items() if k != "rope_frequencies"}
    none = reference.mhsa_forward(
        x, plain, **{**reference_config(config), "position_encoding": "none"}
    )
    assert_float64_close(to_numpy(zeroed(x)), none)


def test_reference_grid_at_its_own_size_is_the_plain_grid():
    """position_size = the input size scales the grid by size / size: the
    plain grid, to rounding."""
    base = {"num_heads": 2, "position_encoding": "rope"}
    out, _, _ = _float64_output(base)
    scaled, _, _ = _float64_output({**base, "position_size": (4, 6)})
    assert_float64_close(scaled, out, rtol=1e-12)
    other, _, _ = _float64_output({**base, "position_size": (8, 12)})
    assert np.abs(other - out).max() > 1e-3


# --------------------------------------------------------- initial weights
def test_rope_mixed_initial_frequencies_are_timms():
    """(2, heads, kd / 2): per head one random angle a and the magnitudes
    m_k = 10^(-4k / kd): F[:, h, :kd/4] = m (cos a, sin a), F[:, h, kd/4:] =
    m (cos(a + pi/2), sin(a + pi/2)) (timm's init_random_2d_freqs). Seeded by
    keras.utils.set_random_seed; different angles per head."""
    heads, key_dim = 4, 16

    def frequencies():
        layer = MultiHeadSelfAttention2D(
            num_heads=heads, key_dim=key_dim, position_encoding="rope_mixed"
        )
        layer.build((1, 4, 4, 32))
        return layer.get_weight_dict()["rope_frequencies"].astype(np.float64)

    keras.utils.set_random_seed(3)
    f = frequencies()
    keras.utils.set_random_seed(3)
    np.testing.assert_array_equal(frequencies(), f)
    assert f.shape == (2, heads, key_dim // 2)
    quarter = key_dim // 4
    magnitude = 10.0 ** (-np.arange(0, key_dim, 4) / key_dim)
    first = np.arctan2(f[1, :, :quarter], f[0, :, :quarter])  # (heads, kd/4)
    second = np.arctan2(f[1, :, quarter:], f[0, :, quarter:])
    for half in (slice(None, quarter), slice(quarter, None)):
        np.testing.assert_allclose(
            np.hypot(f[0, :, half], f[1, :, half]),
            np.broadcast_to(magnitude, (heads, quarter)),
            rtol=1e-6,
        )
    # One angle per head; the second half a quarter turn further.
    np.testing.assert_allclose(first, first[:, :1].repeat(quarter, 1), atol=1e-5)
    turned = np.angle(np.exp(1j * (second - first - np.pi / 2)))
    np.testing.assert_allclose(turned, 0, atol=1e-5)
    assert np.ptp(first[:, 0]) > 0.1


def test_rope_mixed_frequencies_follow_the_temperature():
    layer = MultiHeadSelfAttention2D(
        num_heads=1, position_encoding="rope_mixed", rope_temperature=100.0
    )
    layer.build((1, 4, 4, 8))
    f = layer.get_weight_dict()["rope_frequencies"]
    np.testing.assert_allclose(
        np.hypot(f[0, 0], f[1, 0]), [1.0, 100.0**-0.5] * 2, rtol=1e-6
    )


# -------------------------------------------------------------- settings
def test_defaults_are_eva02_and_rope_mixed():
    rope = MultiHeadSelfAttention2D(position_encoding="rope").position.settings
    assert rope == schema.RopeSettings(
        temperature=10000.0,
        layout="interleaved",
        grid_indexing="ij",
        grid_offset=0.0,
        in_pixels=False,
        max_resolution=224.0,
        reference_size=None,
    )
    mixed = MultiHeadSelfAttention2D(position_encoding="rope_mixed").position.settings
    assert (mixed.temperature, mixed.grid_indexing) == (10.0, "xy")
    # rope_mixed has no reference grid (timm's RotaryEmbeddingMixed neither).
    layer = MultiHeadSelfAttention2D(
        position_encoding="rope_mixed", position_size=(4, 4)
    )
    assert layer.position.settings.reference_size is None


def test_rope_config_round_trips():
    layer = MultiHeadSelfAttention2D(
        num_heads=2,
        position_encoding="rope",
        position_size=[6, 8],
        rope_temperature=100,
        rope_layout="half",
        rope_grid_indexing="xy",
        rope_grid_offset=1,
        rope_max_resolution=np.float32(224),  # stored as a Python float
    )
    config = layer.get_config()
    assert {k: v for k, v in config.items() if k.startswith("rope_")} == {
        "rope_temperature": 100.0,
        "rope_layout": "half",
        "rope_grid_indexing": "xy",
        "rope_grid_offset": 1.0,
        "rope_in_pixels": False,
        "rope_max_resolution": 224.0,
    }
    assert config["position_size"] == (6, 8)
    assert all(type(v) in (str, float, bool) for k, v in config.items() if "rope" in k)
    clone = MultiHeadSelfAttention2D.from_config(config)
    assert clone.get_config() == config
    assert clone.position.settings == layer.position.settings
    # Building does not replace a reference grid by the input's size.
    clone.build((None, 3, 5, 16))
    assert clone.position_size == (6, 8)
    plain = MultiHeadSelfAttention2D(position_encoding="rope")
    plain.build((None, 3, 5, 16))
    assert plain.position_size is None and plain.get_weight_dict().keys() == {
        "query_kernel",
        "query_bias",
        "key_kernel",
        "key_bias",
        "value_kernel",
        "value_bias",
    }
