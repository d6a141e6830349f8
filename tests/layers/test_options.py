"""timm's and EVA's attention options, on the current backend: `qk_norm`,
`output_norm`, `output_dense`, `norm_epsilon`, `use_key_bias`.

Against the float64 NumPy reference (its norms, reference/norms.py, are
written apart from the layer's and checked against timm in
tests/reference/test_norms.py and tests/backends/test_timm.py):

- every config of `cases.OPTION_CONFIGS`, float64 within 1e-10 and float32
  within the budget, on a padded batch whose item 0 has every key masked
  (its zero attention output becomes what the output norm and projection
  make of zeros: their bias terms);
- each option has teeth: the layer follows the reference with it, and is
  far from the reference without it (or with the other norm, or another
  epsilon);
- the q/k norms act per head over key_dim: a per-head rescaling of the
  queries' and keys' columns leaves an RMS-normed layer's output unchanged
  (it would not if the norm mixed the heads);
- the weights: canonical names, shapes and creation order, the named
  attributes (None when off), their initial values, float32 under mixed
  precision;
- mixed precision: the norms compute in float32 and hand on the compute
  dtype (Keras's LayerNormalization's rule), and the layer is within the
  budget of the reference run with those roundings;
- a `.keras` round trip under this backend (files saved under one backend
  load in the others: the matrix's `qknorm_proj` case).
"""

import keras
import numpy as np
import pytest
from keras import ops

from mhsa_core import MultiHeadSelfAttention2D, reference
from mhsa_core.layers import norms
from mhsa_core.reference import norms as reference_norms
from mhsa_core.reference import schema

from cases import OPTION_CONFIGS
from harness import (
    assert_float32_within_budget,
    assert_float64_close,
    magnitude,
    make_case,
    padded_mask,
    reference_config,
    spatial_of,
    to_numpy,
)

pytestmark = pytest.mark.machine_sensitive

SHAPE = (2, 5, 6, 16)  # B, H, W, C: 2 or 4 heads of 8 or 4 channels


def _shape(config, shape=SHAPE):
    if config.get("data_format") == "channels_first":
        return (shape[0], shape[3], shape[1], shape[2])
    return shape


def _run(config, dtype, shape=SHAPE, seed=0):
    """(layer output, input, weights, mask) of `config` on a padded batch."""
    shape = _shape(config, shape)
    layer, x, weights = make_case(config, shape, seed=seed, dtype=dtype)
    mask = padded_mask(
        shape[0], *spatial_of(shape, config.get("data_format", "channels_last"))
    )
    return to_numpy(layer(x, attention_mask=mask)), x, weights, mask


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("name", list(OPTION_CONFIGS))
def test_matches_reference(name, dtype):
    config = OPTION_CONFIGS[name]
    out, x, weights, mask = _run(config, dtype)
    if dtype == "float64":
        expected = reference.mhsa_forward(
            x, weights, attention_mask=mask, **reference_config(config)
        )
        assert_float64_close(out, expected)
    else:
        assert_float32_within_budget(out, x, weights, config, attention_mask=mask)
    # Item 0 has no key: zero without the output options, exactly. With them
    # it is what they make of zeros, which the reference check above judges;
    # not bit-identical across positions: a GEMM may take another kernel path
    # for some rows of identical inputs (torch's MKL under MKL_CBWR=AVX2 did,
    # in float64), so identical rows in are not identical bits out.
    item0 = np.moveaxis(out[0], 0, -1) if config.get("data_format") else out[0]
    if not (config.get("output_dense") or config.get("output_norm")):
        assert np.all(item0 == 0)


def test_fully_masked_item_gets_the_output_bias():
    """output_dense without output_norm: zeros @ Wo + bo is bo, exactly."""
    config = OPTION_CONFIGS["qk_layer-proj"]
    out, _, weights, _ = _run(config, "float32")
    expected = weights["output_bias"].astype(np.float32)
    assert np.all(out[0] == expected)


def _without(weights, *names):
    return {k: v for k, v in weights.items() if k not in names}


# name -> (layer config, the config and weights edit of the same layer
# without the option, or with another value of it). The layer must follow the
# reference with the option and be far from the other.
TEETH = {
    "qk_norm-layer": (
        {"num_heads": 2, "qk_norm": "layer"},
        {"num_heads": 2},
        lambda w: _without(w, *(k for k in w if "_norm_" in k)),
    ),
    "qk_norm-rms-is-not-layer": (
        {"num_heads": 2, "qk_norm": "rms"},
        {"num_heads": 2, "qk_norm": "layer"},
        lambda w: {**w, "query_norm_bias": np.zeros(8), "key_norm_bias": np.zeros(8)},
    ),
    "output_norm": (
        {"num_heads": 2, "output_norm": "layer"},
        {"num_heads": 2},
        lambda w: _without(w, "output_norm_scale", "output_norm_bias"),
    ),
    "output_dense": (
        {"num_heads": 2, "output_dense": True},
        {"num_heads": 2},
        lambda w: _without(w, "output_kernel", "output_bias"),
    ),
    "norm_epsilon": (
        {"num_heads": 2, "qk_norm": "layer", "norm_epsilon": 0.5},
        {"num_heads": 2, "qk_norm": "layer"},
        lambda w: w,
    ),
    "use_key_bias": (
        # With a q/k norm a key bias is no constant per softmax row (a bias
        # equal in every channel would still cancel in the LayerNorm's mean).
        {"num_heads": 2, "qk_norm": "layer", "use_key_bias": False},
        {"num_heads": 2, "qk_norm": "layer"},
        lambda w: {**w, "key_bias": np.linspace(-0.5, 0.5, w["query_bias"].size)},
    ),
}


@pytest.mark.parametrize("name", list(TEETH))
def test_each_option_reaches_the_computation(name):
    config, other_config, edit = TEETH[name]
    out, x, weights, mask = _run(config, "float64")
    expected = reference.mhsa_forward(
        x, weights, attention_mask=mask, **reference_config(config)
    )
    assert_float64_close(out, expected)
    elsewhere = reference.mhsa_forward(
        x, edit(weights), attention_mask=mask, **reference_config(other_config)
    )
    assert reference.max_abs(out, elsewhere) > 1e-3 * magnitude(expected)


def test_qk_norm_is_per_head():
    """RMSNorm over each head's key_dim channels is blind to a per-head scale
    of those channels: scaling head h's columns of the (bias-free) q and k
    kernels by c_h changes nothing. A norm over all heads' channels (or over
    the tokens) would change the output."""
    config = {
        "num_heads": 4,
        "qk_norm": "rms",
        "use_bias": False,
        "norm_epsilon": 1e-30,
    }
    layer, x, weights = make_case(config, SHAPE, dtype="float64")
    out = to_numpy(layer(x))
    factors = np.repeat([0.25, 1.0, 3.0, 7.0], SHAPE[-1] // 4)  # per column
    scaled = {
        **weights,
        "query_kernel": weights["query_kernel"] * factors,
        "key_kernel": weights["key_kernel"] * factors[::-1],
    }
    layer.set_weight_dict(scaled)
    assert_float64_close(to_numpy(layer(x)), out)
    # The same rescaling across the heads' boundaries changes the output.
    mixed = np.linspace(0.25, 7.0, SHAPE[-1])
    layer.set_weight_dict({**weights, "query_kernel": weights["query_kernel"] * mixed})
    assert reference.max_abs(to_numpy(layer(x)), out) > 1e-3 * magnitude(out)


# name -> layer config: the weights each option adds, in the schema's order.
WEIGHT_CASES = {
    "all": {
        "num_heads": 4,
        "key_dim": 3,
        "position_encoding": "absolute",
        "position_size": (4, 4),
        "qk_norm": "layer",
        "output_norm": "layer",
        "output_dense": True,
    },
    "rms-no_bias": {"num_heads": 2, "use_bias": False, "qk_norm": "rms"},
    "eva-conv": {
        "num_heads": 2,
        "activation": "relu",
        "position_encoding": "conv",
        "use_key_bias": False,
        "output_norm": "layer",
        "output_dense": True,
    },
    "key_bias_only-proj": {
        "num_heads": 2,
        "use_bias": False,
        "use_key_bias": True,
        "output_dense": True,
    },
}


@pytest.mark.parametrize("name", list(WEIGHT_CASES))
def test_weights_names_order_and_attributes(name):
    config = WEIGHT_CASES[name]
    layer = MultiHeadSelfAttention2D(**config)
    layer.build((None, None, None, 16))
    by_name = {w.name: w for w in layer.trainable_weights}
    expected = schema.weight_shapes(16, **schema.weight_arguments(config))
    assert list((n, tuple(w.shape)) for n, w in by_name.items()) == list(
        expected.items()
    )
    for attribute in (
        "key_bias",
        "query_norm_scale",
        "query_norm_bias",
        "key_norm_scale",
        "key_norm_bias",
        "output_norm_scale",
        "output_norm_bias",
        "output_kernel",
        "output_bias",
    ):
        variable = getattr(layer, attribute)
        if attribute in expected:
            assert variable is by_name[attribute], attribute
        else:
            assert variable is None, attribute
    for variable in layer.trainable_weights:
        if variable.name.endswith("_norm_scale"):
            assert np.all(to_numpy(variable) == 1.0), variable.name
        elif "_norm_" in variable.name:
            assert np.all(to_numpy(variable) == 0.0), variable.name


def test_defaults_add_no_weight():
    """Every option off: the weights of mhsa_core 0.2 (saved files keep
    their meaning)."""
    layer = MultiHeadSelfAttention2D(num_heads=2)
    layer.build((None, None, None, 8))
    assert [w.name for w in layer.trainable_weights] == [
        "query_kernel",
        "query_bias",
        "key_kernel",
        "key_bias",
        "value_kernel",
        "value_bias",
    ]
    config = layer.get_config()
    assert config["qk_norm"] is None and config["output_norm"] is None
    assert config["output_dense"] is False and config["use_key_bias"] is None
    assert config["norm_epsilon"] == 1e-6


# ------------------------------------------------------------ mixed precision
@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"])
def test_mixed_precision(policy):
    """The norms' weights are float32 variables, used as such; the output is
    in the compute dtype and within the budget of the reference run with the
    policy's roundings (norms in float32 from a rounded input, a rounded
    result)."""
    config = {
        "num_heads": 4,
        "qk_norm": "layer",
        "output_norm": "layer",
        "output_dense": True,
    }
    shape = (2, 12, 10, 64)
    _, x, weights = make_case(config, shape)
    layer = MultiHeadSelfAttention2D(**config, dtype=policy)
    layer.build(shape)
    layer.set_weight_dict(weights)
    compute = policy.split("_")[1]
    for variable in layer.trainable_weights:
        assert keras.backend.standardize_dtype(variable.dtype) == "float32"
    mask = padded_mask(*shape[:3])
    out = layer(x, attention_mask=mask)
    assert keras.backend.standardize_dtype(out.dtype) == compute
    out = to_numpy(ops.cast(out, "float32")).astype(np.float64)
    ref64, budget, emulated = reference.error_budget(
        x, weights, policy=policy, attention_mask=mask, **reference_config(config)
    )
    error = reference.max_abs(out, ref64)
    assert error <= budget, (
        f"{policy}: error {error:.3g} > budget {budget:.3g} "
        f"(emulated reference error {emulated:.3g})"
    )


@pytest.mark.parametrize("kind", ["layer", "rms"])
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_norm_computes_in_float32_under_16_bit_inputs(kind, dtype):
    """A 16-bit input comes back in its dtype, as the float32 norm of it
    rounded once: within half a 16-bit ulp of the float32 result (plus its
    own float32 rounding). A norm computed in 16 bits is off by several."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 5, 64)) * 4 + 2
    scale = 1 + 0.2 * rng.standard_normal(64)
    bias = 0.1 * rng.standard_normal(64) if kind == "layer" else None
    x16 = ops.cast(ops.convert_to_tensor(x, "float32"), dtype)
    out = norms.apply_norm(
        x16,
        kind,
        ops.convert_to_tensor(scale, "float32"),
        None if bias is None else ops.convert_to_tensor(bias, "float32"),
        1e-6,
    )
    assert keras.backend.standardize_dtype(out.dtype) == dtype
    exact = to_numpy(ops.cast(x16, "float32")).astype(np.float64)
    if kind == "layer":
        want = reference_norms.layer_norm(exact, scale, bias, 1e-6)
    else:
        want = reference_norms.rms_norm(exact, scale, 1e-6)
    got = to_numpy(ops.cast(out, "float32")).astype(np.float64)
    half_ulp = {"float16": 2.0**-11, "bfloat16": 2.0**-8}[dtype]
    assert np.all(np.abs(got - want) <= half_ulp * np.abs(want) * (1 + 1e-3) + 1e-6)


def test_keras_round_trip(tmp_path):
    """.keras save/load with every option: config equal, weights and
    outputs bit-identical."""
    config = {
        "num_heads": 4,
        "qk_norm": "rms",
        "use_key_bias": False,
        "output_norm": "layer",
        "output_dense": True,
        "norm_epsilon": 1e-5,
    }
    layer, x, _ = make_case(config, (2, 4, 5, 16))
    model = keras.Sequential([keras.Input((None, None, 16)), layer])
    model.save(tmp_path / "options.keras")
    loaded = keras.saving.load_model(tmp_path / "options.keras")
    (new_layer,) = loaded.layers
    assert new_layer.get_config() == layer.get_config()
    assert [w.name for w in new_layer.weights] == [w.name for w in layer.weights]
    for a, b in zip(layer.weights, new_layer.weights):
        np.testing.assert_array_equal(to_numpy(a), to_numpy(b))
    np.testing.assert_array_equal(to_numpy(model(x)), to_numpy(loaded(x)))
