"""Position encodings of the layer against the float64 NumPy reference, on the
current backend: every encoding at its reference size and at other sizes
(larger, smaller non-square, 1xN, Nx1), float32 and float64, masks and scores,
mixed precision, jit with sizes unknown until run time, and .keras files.
The rotary encodings' own pieces (tables, sin/cos, init, invariances) are in
test_rope.py, the comparison with timm in test_rope_timm.py."""

import keras
import numpy as np
import pytest
from keras import ops

from mhsa_core import MultiHeadSelfAttention2D, reference
from mhsa_core.layers import position

from cases import ENCODING_CONFIGS, POSITION_CONFIGS, REF_SIZE, SIZES
from cases import POSITION_CHANNELS as CHANNELS
from harness import (
    LEARNED_ENCODINGS,
    assert_float32_within_budget,
    assert_float64_close,
    make_case,
    padded_mask,
    random_input,
    reference_config,
    to_numpy,
)

BACKEND = keras.backend.backend()
ENCODINGS = list(ENCODING_CONFIGS)  # relative, absolute, sinusoidal, rope(_mixed), ...
# The weights kept in float32 under mixed precision, like the logits.
POSITION_WEIGHTS = ("_height", "_width", "_frequencies", "_table")


def _shape(size, config, batch=2):
    if config.get("data_format") == "channels_first":
        return (batch, CHANNELS) + tuple(size)
    return (batch,) + tuple(size) + (CHANNELS,)


def _layer(config, dtype="float32", seed=0):
    """A layer on an unknown spatial size (position_size given for learned
    tables), with NumPy weights injected."""
    config = dict(config)
    if config["position_encoding"] in LEARNED_ENCODINGS:
        config["position_size"] = REF_SIZE
    layer, _, weights = make_case(
        config, _shape(REF_SIZE, config), seed=seed, dtype=dtype
    )
    return layer, weights, config


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("name", sorted(POSITION_CONFIGS))
def test_float32_at_every_size(name, size):
    """Tables of REF_SIZE, run at `size`."""
    layer, weights, config = _layer(POSITION_CONFIGS[name])
    x = random_input(_shape(size, config), seed=sum(size))
    assert_float32_within_budget(
        to_numpy(layer(x)), x, weights, config, what=f"{name} at {size}"
    )


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("name", sorted(POSITION_CONFIGS))
def test_float64_at_every_size(name, size):
    layer, weights, config = _layer(POSITION_CONFIGS[name], dtype="float64")
    x = random_input(_shape(size, config), "float64", seed=sum(size))
    expected = reference.mhsa_forward(x, weights, **reference_config(config))
    assert_float64_close(to_numpy(layer(x)), expected, what=f"{name} at {size}")


@pytest.mark.parametrize("name", ENCODINGS)
def test_mask_and_scores_at_another_size(name):
    """Masked keys, a fully masked item, and the scores (which include the
    position term) against the reference, at a size that is not the reference's."""
    layer, weights, config = _layer(ENCODING_CONFIGS[name], dtype="float64")
    x = random_input(_shape((4, 6), config), "float64")
    mask = padded_mask(2, 4, 6)
    out, scores = layer(x, attention_mask=mask, return_attention_scores=True)
    ref_out, ref_scores = reference.mhsa_forward(
        x,
        weights,
        attention_mask=mask,
        return_attention_scores=True,
        **reference_config(config),
    )
    assert_float64_close(to_numpy(out), ref_out, what="output")
    assert_float64_close(to_numpy(scores), ref_scores, what="scores")
    assert np.all(to_numpy(out)[0] == 0)


@pytest.mark.parametrize("name", ["relative", "absolute"])
def test_position_term_is_not_a_no_op(name):
    """Zeroing the tables changes the output (the term is really used), and
    the same layer with "none" equals the reference with zero tables."""
    layer, weights, config = _layer(ENCODING_CONFIGS[name], dtype="float64")
    x = random_input(_shape((4, 6), config), "float64")
    zeroed = {
        k: (np.zeros_like(v) if k.endswith(("_height", "_width")) else v)
        for k, v in weights.items()
    }
    before = to_numpy(layer(x))
    layer.set_weight_dict(zeroed)
    after = to_numpy(layer(x))
    assert np.abs(before - after).max() > 1e-3
    plain = {k: v for k, v in weights.items() if not k.endswith(("_height", "_width"))}
    none = reference.mhsa_forward(
        x, plain, **{**reference_config(config), "position_encoding": "none"}
    )
    assert_float64_close(after, none)


def test_sinusoidal_differs_from_none():
    layer, weights, config = _layer(ENCODING_CONFIGS["sinusoidal"], dtype="float64")
    x = random_input(_shape((4, 6), config), "float64")
    none = reference.mhsa_forward(
        x, weights, **{**reference_config(config), "position_encoding": "none"}
    )
    assert np.abs(to_numpy(layer(x)) - none).max() > 1e-2


# ------------------------------------------------------ the ops themselves
@pytest.mark.parametrize("length_is", ["int", "tensor"])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize(
    "rows,length", [(9, 9), (9, 15), (9, 5), (9, 1), (13, 17), (1, 5), (4, 11)]
)
def test_resize_table_matches_reference(rows, length, dtype, length_is):
    """Static (int) and dynamic (tensor) lengths; bit-identical at the same size."""
    table = (
        np.random.default_rng(rows + length).standard_normal((rows, 3)).astype(dtype)
    )
    expected = reference.resize_table(table, length, np.dtype(dtype).type)
    n = length if length_is == "int" else ops.convert_to_tensor(length, dtype="int32")
    out = to_numpy(position.resize_table(ops.convert_to_tensor(table), n))
    assert out.dtype == np.dtype(dtype)
    if rows == length:
        np.testing.assert_array_equal(out, table)
    # s = (t + 0.5) * rows / length - 0.5 may round differently (XLA turns
    # the division into a multiplication): up to an ulp of `rows`, which f
    # inherits and multiplies by |T[i+1] - T[i]| <= 2 max|T|; the products
    # and the sum add a few ulps of max|T|. 8 eps rows max|T| bounds both.
    tol = 8 * np.finfo(dtype).eps * rows * np.abs(table).max()
    np.testing.assert_allclose(out, expected, rtol=0, atol=tol)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_sinusoidal_embedding_matches_reference(dtype):
    """The static path (a float64 NumPy constant) on every backend; the path
    for a size known only at run time (keras.ops) in float32, and in float64
    where Keras keeps float64 through sin/cos (not JAX in keras 3.15)."""
    expected = reference.sinusoidal_embedding(7, 5, 16)
    static = to_numpy(position.sinusoidal_embedding(7, 5, 16, dtype))
    assert static.dtype == np.dtype(dtype)
    np.testing.assert_allclose(
        static, expected, rtol=0, atol=1e-15 if dtype == "float64" else 6e-8
    )
    dynamic = to_numpy(
        position.sinusoidal_embedding(
            ops.convert_to_tensor(7, "int32"),
            ops.convert_to_tensor(5, "int32"),
            16,
            dtype,
        )
    )
    if dtype == "float32" or BACKEND != "jax":
        # float32 sin of angles up to 6 rad: a few ulp of the angle.
        np.testing.assert_allclose(
            dynamic, expected, rtol=0, atol=1e-15 if dtype == "float64" else 1e-6
        )


# ------------------------------------------------------------ arguments
def test_position_size_defaults_to_the_build_size_and_is_in_the_config():
    layer = MultiHeadSelfAttention2D(position_encoding="absolute", num_heads=2)
    assert layer.get_config()["position_size"] is None
    layer(keras.Input((6, 4, 8)))
    assert layer.position_size == (6, 4)
    config = layer.get_config()
    assert config["position_size"] == (6, 4)
    clone = MultiHeadSelfAttention2D.from_config(config)
    clone.build((None, None, None, 8))  # no size needed any more
    assert clone.get_weight_dict()["absolute_height"].shape == (6, 4)
    # Non-learned encodings keep what they were given.
    assert (
        MultiHeadSelfAttention2D(position_encoding="sinusoidal").position_size is None
    )


def test_config_of_new_arguments_round_trips():
    layer = MultiHeadSelfAttention2D(
        num_heads=2,
        position_encoding="relative",
        position_size=[5, 7],
        scale_position_logits=False,
        position_initializer="zeros",
    )
    config = layer.get_config()
    assert config["position_size"] == (5, 7)
    assert config["scale_position_logits"] is False
    clone = MultiHeadSelfAttention2D.from_config(config)
    assert clone.get_config() == config
    clone.build((None, None, None, 8))
    assert np.all(clone.get_weight_dict()["relative_height"] == 0)


def test_default_table_initializer_is_botnets():
    """N(0, 1/key_dim), as the official code and timm."""
    layer = MultiHeadSelfAttention2D(
        num_heads=1, key_dim=64, position_encoding="relative", position_size=(40, 40)
    )
    layer.build((None, None, None, 8))
    table = layer.get_weight_dict()["relative_height"]
    assert abs(table.std() - 1 / 8) < 0.01 and abs(table.mean()) < 0.01


def test_relative_bias_table_and_its_default_initializer():
    """One (2Hr - 1, 2Wr - 1, heads) table, N(0, 0.02) as timm's Swin; its
    reference size defaults to the window with windows."""
    layer = MultiHeadSelfAttention2D(
        num_heads=3, position_encoding="relative_bias", window_size=(7, 5)
    )
    layer.build((None, None, None, 12))
    assert layer.position_size == (7, 5)
    table = layer.get_weight_dict()["relative_bias_table"]
    assert table.shape == (13, 9, 3)
    assert abs(table.std() - 0.02) < 0.004 and abs(table.mean()) < 0.004
    assert list(layer.get_weight_dict())[-1] == "relative_bias_table"


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("size_is", ["int", "tensor"])
@pytest.mark.parametrize(
    "shape, rows", [((13, 13), (23, 23)), ((13, 13), (9, 9)), ((5, 9), (13, 7))]
)
def test_resize_bias_table_matches_reference(shape, rows, size_is, dtype):
    """timm's rule for Swin's tables: static sizes (float64 NumPy matrices)
    and sizes known at run time (keras.ops, q from a float64 table)."""
    from mhsa_core.layers.position._bias_resize import resize_bias_table

    table = np.random.default_rng(0).standard_normal((*shape, 2)).astype(dtype)
    expected = reference.resize_bias_table(table, *rows)
    sizes = rows if size_is == "int" else [ops.convert_to_tensor(r) for r in rows]
    out = to_numpy(resize_bias_table(ops.convert_to_tensor(table), *sizes))
    assert out.dtype == np.dtype(dtype)
    # A few roundings of max|T| (the interpolation weights and the two sums).
    tol = 16 * np.finfo(dtype).eps * np.abs(table).max()
    np.testing.assert_allclose(out, expected, rtol=0, atol=tol)
    same = to_numpy(
        resize_bias_table(
            ops.convert_to_tensor(table),
            *(shape if size_is == "int" else [ops.convert_to_tensor(r) for r in shape]),
        )
    )
    np.testing.assert_array_equal(same, table)  # its own size: the table itself


def test_symbolic_unknown_size_with_position_size():
    x = keras.Input((None, None, 16))
    out, scores = MultiHeadSelfAttention2D(
        num_heads=2, position_encoding="relative", position_size=(4, 4)
    )(x, return_attention_scores=True)
    assert tuple(out.shape) == (None, None, None, 16)
    assert tuple(scores.shape) == (None, 2, None, None)


@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"])
@pytest.mark.parametrize("name", ENCODINGS)
def test_mixed_precision_matches_emulated_reference(name, policy):
    """Tables and frequencies stay float32 (the position term and the
    rotation are computed like the logits); the output is within 2x the error
    of the reference run with the same 16-bit roundings, at a size other than
    the reference size."""
    _, weights, config = _layer(ENCODING_CONFIGS[name])
    mixed = MultiHeadSelfAttention2D(**config, dtype=policy)
    mixed.build((None, None, None, CHANNELS))
    mixed.set_weight_dict(weights)
    for w in mixed.trainable_weights:
        if w.name.endswith(POSITION_WEIGHTS):
            assert keras.backend.standardize_dtype(w.dtype) == "float32"
    x = random_input(_shape((6, 4), config))
    out = mixed(x)
    assert keras.backend.standardize_dtype(out.dtype) == policy.split("_")[1]
    out = to_numpy(ops.cast(out, "float32")).astype(np.float64)
    ref64, budget, emulated = reference.error_budget(
        x, weights, policy=policy, **reference_config(config)
    )
    error = float(np.abs(out - ref64).max())
    assert error <= budget, (
        f"{policy}: error {error:.3g} > budget {budget:.3g} (emulated {emulated:.3g})"
    )


# -------------------------------------------------- jit and dynamic sizes
# Keras's torch trainer reads .grad of non-leaf tensors while dynamo traces it
# (a warning from keras+torch internals, not from this layer).
@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:The .grad attribute of a Tensor that is not a leaf")
@pytest.mark.parametrize("name", ENCODINGS)
def test_compiled_model_at_two_sizes(name):
    """jit_compile=True (XLA on TF and JAX, torch.compile on torch): the
    reference size and another through one compiled model, and a compiled
    training step at the other size."""
    layer, weights, config = _layer(ENCODING_CONFIGS[name])
    inputs = keras.Input((None, None, CHANNELS))
    model = keras.Model(inputs, layer(inputs))
    model.compile(jit_compile=True, optimizer="sgd", loss="mse")
    for size in (REF_SIZE, (8, 3)):
        x = random_input(_shape(size, config), seed=size[1])
        assert_float32_within_budget(
            model.predict(x, verbose=0), x, weights, config, what=f"jit {size}"
        )
    before = to_numpy(layer.trainable_weights[-1]).copy()
    assert np.isfinite(model.train_on_batch(x, np.zeros_like(x)))
    assert not np.array_equal(before, to_numpy(layer.trainable_weights[-1]))


@pytest.mark.slow
@pytest.mark.skipif(BACKEND != "tensorflow", reason="TensorFlow graphs only")
@pytest.mark.parametrize("jit_compile", [False, True])
@pytest.mark.parametrize("name", ENCODINGS)
def test_tensorflow_graph_with_unknown_size(name, jit_compile):
    """One tf.function traced once with H and W unknown (None): the sizes are
    tensors inside the graph (the resize and the offsets are computed from
    them), then run at three sizes."""
    import tensorflow as tf

    layer, weights, config = _layer(ENCODING_CONFIGS[name])
    spec = tf.TensorSpec([None, None, None, CHANNELS], tf.float32)
    fn = tf.function(
        lambda x: layer(x), input_signature=[spec], jit_compile=jit_compile
    )
    for size in (REF_SIZE, (8, 9), (3, 2)):
        x = random_input(_shape(size, config), seed=size[0])
        assert_float32_within_budget(
            fn(x).numpy(), x, weights, config, what=f"graph {size}"
        )
    assert len(fn.get_concrete_function().graph.inputs) >= 1
    assert fn.experimental_get_tracing_count() == 1


@pytest.mark.parametrize("name", ENCODINGS)
def test_keras_round_trip_then_another_size(tmp_path, name):
    """Saved at the reference size, loaded (safe mode), run at another size:
    weights bit-identical, outputs equal to the original layer's."""
    layer, weights, config = _layer(ENCODING_CONFIGS[name])
    inputs = keras.Input((None, None, CHANNELS))
    model = keras.Model(inputs, layer(inputs))
    path = tmp_path / f"{name}.keras"
    model.save(path)
    loaded = keras.saving.load_model(path)
    for a, b in zip(model.weights, loaded.weights):
        assert a.name == b.name
        np.testing.assert_array_equal(to_numpy(a), to_numpy(b))
    x = random_input(_shape((7, 3), config))
    np.testing.assert_array_equal(to_numpy(model(x)), to_numpy(loaded(x)))
    assert_float32_within_budget(to_numpy(loaded(x)), x, weights, config)
