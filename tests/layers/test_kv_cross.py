"""Keys and values from another map than the queries': `kv_reduction` (PVT's
strided conv, pvt_v2's pooled linear SRA) and cross-attention (`context`).

On the current backend, against the float64 reference (`mhsa_forward(...,
kv_reduction=, kv_pool_size=, context=)`, written apart from the layer):

- every case of `CASES` on the full, chunked and fused paths: float64
  within 1e-10 (full, chunked), float32 within the budget (every path);
- a context equal to the inputs is self-attention, bit for bit on the full
  path ("none", the rotary encodings, a table encoding);
- dynamic H, W (keras.Input((None, None, C))) at two sizes per model;
- gradients finite on the chunked path;
- `.keras` round trips (the build config keeps the context's shape);
- cross-attention equals Keras's MultiHeadAttention(query=x tokens,
  value=context tokens) with the same weights, within the float32 budget;
- the errors: a ValueError naming the argument and the value received.
"""

import keras
import numpy as np
import pytest

from mhsa_core import MultiHeadSelfAttention2D, reference
from mhsa_core.reference import schema

from harness import assert_float64_close, magnitude, reference_config, to_numpy

pytestmark = pytest.mark.machine_sensitive

SHAPE = (2, 4, 5, 16)  # B, H, W, C; 2 heads of 8 channels
CONTEXT = (2, 3, 2, 8)  # B, H', W', C'

# id -> (layer config, input shape, context shape or None, with a key mask)
CASES = {
    # 4 x 5 by a stride-2 conv: 2 x 2 keys (the last column in no window).
    "r2": ({"kv_reduction": 2}, SHAPE, None, False),
    "r2_rope": (
        {"kv_reduction": 2, "position_encoding": "rope", "position_size": (8, 8)},
        SHAPE,
        None,
        False,
    ),
    "r2_rope_mixed": (
        {"kv_reduction": 2, "position_encoding": "rope_mixed"},
        SHAPE,
        None,
        False,
    ),
    # PVT adds its embedding to the tokens: the term is reduced with them.
    "r2_conv_term": (
        {"kv_reduction": 2, "position_encoding": "conv"},
        SHAPE,
        None,
        False,
    ),
    # 7 x 9 pooled to 3 x 3: torch's overlapping bins.
    "pool3_7x9": (
        {"kv_reduction": "pool", "kv_pool_size": 3},
        (2, 7, 9, 16),
        None,
        False,
    ),
    "pool_2x3_qknorm": (
        {"kv_reduction": "pool", "kv_pool_size": (2, 3), "qk_norm": "layer"},
        SHAPE,
        None,
        False,
    ),
    "cross": ({}, SHAPE, CONTEXT, True),
    "cross_rope": ({"position_encoding": "rope"}, SHAPE, CONTEXT, True),
    "cross_rope_mixed_dense": (
        {"position_encoding": "rope_mixed", "output_dense": True},
        SHAPE,
        CONTEXT,
        False,
    ),
    "cross_r2": ({"kv_reduction": 2}, SHAPE, (2, 6, 4, 8), False),
    "cross_channels_first": (
        {"data_format": "channels_first"},
        (2, 16, 4, 5),
        (2, 8, 3, 2),
        True,
    ),
    # A table encoding with a context of the inputs' grid.
    "cross_relative_same_grid": (
        {"position_encoding": "relative", "position_size": (4, 5)},
        SHAPE,
        (2, 4, 5, 8),
        False,
    ),
}
PATHS = ("full", "chunked", "fused")


def _spatial(shape, config):
    if config.get("data_format") == "channels_first":
        return shape[2], shape[3], shape[1]
    return shape[1], shape[2], shape[3]


def _case(name, path, dtype, seed=0):
    """(layer, x, context, mask, weights, config) with NumPy weights."""
    config, shape, context_shape, masked = CASES[name]
    config = {**config, "num_heads": 2, "attention_implementation": path}
    if path == "chunked":
        config["chunk_size"] = 8
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape).astype(dtype)
    context = mask = None
    channels = _spatial(shape, config)[2]
    if context_shape is not None:
        context = rng.standard_normal(context_shape).astype(dtype)
        config["context_channels"] = _spatial(context_shape, config)[2]
        if masked:
            kh, kw, _ = _spatial(context_shape, config)
            mask = rng.random((shape[0], kh, kw)) < 0.6
            mask[:, 0, 0] = True
            mask[0] = False  # item 0: every key masked (zeros, never NaN)
    weights = reference.random_weights(
        channels, **schema.weight_arguments(config), seed=seed + 1
    )
    layer = MultiHeadSelfAttention2D(**config, dtype=dtype)
    layer.build(shape, context_shape)
    layer.set_weight_dict(weights)
    return layer, x, context, mask, weights, config


def _fused_ok(name):
    return CASES[name][0].get("position_encoding") != "relative"


# float32 on every path for every case; float64 (1e-10) on the full and
# chunked paths for a case of each kind (the fused path runs float64 chunked).
FLOAT64_CASES = ("r2", "pool3_7x9", "cross", "cross_rope")
PARAMS = [
    pytest.param(name, path, "float32", id=f"{name}-{path}-float32")
    for name in CASES
    for path in PATHS
    if path != "fused" or _fused_ok(name)
] + [
    pytest.param(name, path, "float64", id=f"{name}-{path}-float64")
    for name in FLOAT64_CASES
    for path in ("full", "chunked")
]


@pytest.mark.parametrize("name, path, dtype", PARAMS)
def test_matches_reference(name, path, dtype):
    layer, x, context, mask, weights, config = _case(name, path, dtype)
    out = to_numpy(layer(x, attention_mask=mask, context=context))
    kwargs = {
        **reference_config(config),
        "context": context,
        "attention_mask": mask,
    }
    if dtype == "float64":
        expected = reference.mhsa_forward(x, weights, **kwargs)
        assert_float64_close(out, expected)
        return
    ref64, budget, ref32_error = reference.error_budget(x, weights, **kwargs)
    error = reference.max_abs(out, ref64)
    assert np.all(np.isfinite(out))
    assert error <= budget, (error, budget, ref32_error)


@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"])
@pytest.mark.parametrize("name", ["pool3_7x9", "cross_r2"])
def test_mixed_precision(name, policy):
    """Within the budget of the reference run with the policy's roundings
    (the reduction's conv, pool and GELU in the compute dtype, its LayerNorm
    in float32 from a rounded input)."""
    config, shape, context_shape, _ = CASES[name]
    config = {**config, "num_heads": 2}
    rng = np.random.default_rng(0)
    x = rng.standard_normal(shape).astype("float32")
    context = None
    if context_shape is not None:
        context = rng.standard_normal(context_shape).astype("float32")
        config["context_channels"] = context_shape[-1]
    weights = reference.random_weights(16, **schema.weight_arguments(config), seed=1)
    layer = MultiHeadSelfAttention2D(**config, dtype=policy)
    layer.build(shape, context_shape)
    layer.set_weight_dict(weights)
    out = layer(x, context=context)
    assert keras.backend.standardize_dtype(out.dtype) == policy.split("_")[1]
    out = to_numpy(keras.ops.cast(out, "float32")).astype(np.float64)
    ref64, budget, _ = reference.error_budget(
        x, weights, policy=policy, context=context, **reference_config(config)
    )
    assert reference.max_abs(out, ref64) <= budget


def test_scores_cover_the_key_map():
    layer, x, context, mask, weights, config = _case("cross", "full", "float64")
    out, scores = layer(
        x, attention_mask=mask, context=context, return_attention_scores=True
    )
    _, expected = reference.mhsa_forward(
        x,
        weights,
        context=context,
        attention_mask=mask,
        return_attention_scores=True,
        **reference_config(config),
    )
    assert tuple(scores.shape) == (2, 2, 20, 6)
    assert_float64_close(to_numpy(scores), expected, what="scores")


@pytest.mark.parametrize(
    "config",
    [
        {},
        {"position_encoding": "rope", "position_size": (6, 6)},
        {"position_encoding": "rope_mixed"},
        {"position_encoding": "relative_bias", "position_size": (4, 5)},
    ],
    ids=["none", "rope", "rope_mixed", "relative_bias"],
)
def test_context_equal_to_inputs_is_self_attention(config):
    """Bit for bit on the full path: the key grid spread over the query grid
    is the query grid itself (i * H / H exactly)."""
    x = np.random.default_rng(0).standard_normal(SHAPE).astype("float32")
    weights = reference.random_weights(
        16, **schema.weight_arguments({**config, "num_heads": 2}), seed=1
    )
    self_layer = MultiHeadSelfAttention2D(
        num_heads=2, attention_implementation="full", **config
    )
    self_layer.build(SHAPE)
    self_layer.set_weight_dict(weights)
    cross = MultiHeadSelfAttention2D(
        num_heads=2, attention_implementation="full", context_channels=16, **config
    )
    cross.build(SHAPE, SHAPE)
    cross.set_weight_dict(weights)
    np.testing.assert_array_equal(
        to_numpy(cross(x, context=x)), to_numpy(self_layer(x))
    )


@pytest.mark.parametrize(
    "config, context_channels",
    [
        ({"kv_reduction": 2, "position_encoding": "rope"}, None),
        ({"kv_reduction": "pool", "kv_pool_size": 2}, None),
        ({"position_encoding": "rope_mixed"}, 8),
    ],
    ids=["r2_rope", "pool", "cross_rope_mixed"],
)
def test_dynamic_sizes(config, context_channels):
    """keras.Input((None, None, C)): one model at two sizes (a TensorFlow
    graph sees H, W and the key grid as tensors)."""
    config = {**config, "num_heads": 2, "attention_implementation": "auto"}
    inputs = keras.Input((None, None, 16))
    context = None if context_channels is None else keras.Input((None, None, 8))
    layer = MultiHeadSelfAttention2D(**config, context_channels=context_channels)
    outputs = layer(inputs, context=context)
    model = keras.Model([inputs] if context is None else [inputs, context], outputs)
    weights = reference.random_weights(
        16,
        **schema.weight_arguments({**config, "context_channels": context_channels}),
        seed=1,
    )
    layer.set_weight_dict(weights)
    rng = np.random.default_rng(0)
    for h, w in ((4, 6), (5, 3)):
        x = rng.standard_normal((2, h, w, 16)).astype("float32")
        feeds = [x]
        ctx = None
        if context is not None:
            ctx = rng.standard_normal((2, w, h, 8)).astype("float32")
            feeds.append(ctx)
        out = model.predict(feeds, verbose=0)
        ref64, budget, _ = reference.error_budget(
            x, weights, context=ctx, **reference_config(config)
        )
        assert reference.max_abs(out, ref64) <= budget, (h, w)


@pytest.mark.parametrize("name", ["r2", "pool3_7x9", "cross"])
def test_gradients_finite(name):
    layer, x, context, mask, _, _ = _case(name, "chunked", "float32")
    weights = layer.trainable_weights

    def loss():
        out = layer(x, attention_mask=mask, context=context)
        return keras.ops.sum(keras.ops.square(out))

    grads = _gradients(loss, weights)
    assert len(grads) == len(weights)
    for variable, grad in zip(weights, grads):
        g = to_numpy(grad)
        assert np.all(np.isfinite(g)), variable.name
    names = [v.name for v in weights]
    if name != "cross":
        reduction = to_numpy(grads[names.index("reduction_kernel")])
        assert magnitude(reduction) > 0


def _gradients(loss, variables):
    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        with tf.GradientTape() as tape:
            value = loss()
        return tape.gradient(value, [v.value for v in variables])
    if backend == "torch":
        value = loss()
        value.backward()
        return [v.value.grad for v in variables]
    import jax

    values = [v.value for v in variables]

    def f(vals):
        for v, val in zip(variables, vals):
            v.assign(val)
        return loss()

    # Stateless: bind the variables through keras's StatelessScope.
    def pure(vals):
        with keras.StatelessScope(state_mapping=list(zip(variables, vals))):
            return loss()

    del f
    return jax.grad(pure)(values)


@pytest.mark.parametrize("name", ["cross", "pool3_7x9"])
def test_keras_round_trip(name, tmp_path):
    layer, x, context, mask, weights, config = _case(name, "auto", "float32")
    shape = x.shape
    inputs = keras.Input(shape[1:])
    feeds = [x]
    if context is None:
        model = keras.Model(inputs, layer(inputs))
    else:
        ctx_in = keras.Input(context.shape[1:])
        model = keras.Model([inputs, ctx_in], layer(inputs, context=ctx_in))
        feeds.append(context)
    before = model.predict(feeds if context is not None else x, verbose=0)
    path = tmp_path / f"{name}.keras"
    feeds = feeds if context is not None else feeds[0]
    model.save(path)
    loaded = keras.saving.load_model(path)
    np.testing.assert_array_equal(loaded.predict(feeds, verbose=0), before)
    reloaded = loaded.layers[-1]
    assert reloaded.get_config()["kv_reduction"] == config.get("kv_reduction")
    assert reloaded.get_build_config() == layer.get_build_config()


def test_build_config_keeps_the_context():
    layer = MultiHeadSelfAttention2D(num_heads=2)
    layer(np.zeros(SHAPE, "float32"), context=np.zeros(CONTEXT, "float32"))
    assert layer.get_build_config() == {
        "input_shape": SHAPE,
        "context_shape": CONTEXT,
    }
    clone = MultiHeadSelfAttention2D.from_config(layer.get_config())
    clone.build_from_config(layer.get_build_config())
    assert {k: v.shape for k, v in clone.get_weight_dict().items()} == {
        k: v.shape for k, v in layer.get_weight_dict().items()
    }
    assert clone.get_weight_dict()["key_kernel"].shape == (8, 16)


def test_weights_canonical_order_and_shapes():
    for config, channels in (
        ({"kv_reduction": 4}, 16),
        ({"kv_reduction": "pool", "use_bias": False}, 16),
        ({"kv_reduction": 2, "context_channels": 8, "output_dense": True}, 8),
    ):
        layer = MultiHeadSelfAttention2D(num_heads=2, **config)
        context_shape = None if "context_channels" not in config else (1, 8, 8, 8)
        layer.build((1, 8, 8, 16), context_shape)
        expected = schema.weight_shapes(
            16, **schema.weight_arguments({**config, "num_heads": 2})
        )
        got = {k: tuple(v.shape) for k, v in layer.get_weight_dict().items()}
        assert list(got.items()) == list(expected.items())
        r = config["kv_reduction"]
        kernel = (r, r, channels, channels) if r != "pool" else (channels, channels)
        assert got["reduction_kernel"] == kernel


def test_matches_keras_multi_head_attention():
    """Cross-attention = Keras MHA(query=x tokens, value=context tokens) with
    the same weights and its output projection (`output_dense=True`),
    within the float32 budget of the float64 reference."""
    heads, kd, channels = 2, 8, 16
    layer, x, context, mask, weights, config = _case("cross", "full", "float32")
    layer = MultiHeadSelfAttention2D(
        num_heads=heads, output_dense=True, context_channels=8
    )
    layer.build(SHAPE, CONTEXT)
    weights = reference.random_weights(
        channels, num_heads=heads, output_dense=True, context_channels=8, seed=3
    )
    layer.set_weight_dict(weights)
    mha = keras.layers.MultiHeadAttention(num_heads=heads, key_dim=kd, value_dim=kd)
    q_tokens = x.reshape(2, 20, channels)
    c_tokens = context.reshape(2, 6, 8)
    mha(q_tokens, c_tokens)
    dv = channels // heads
    mha._query_dense.kernel.assign(weights["query_kernel"].reshape(channels, heads, kd))
    mha._query_dense.bias.assign(weights["query_bias"].reshape(heads, kd))
    mha._key_dense.kernel.assign(weights["key_kernel"].reshape(8, heads, kd))
    mha._key_dense.bias.assign(weights["key_bias"].reshape(heads, kd))
    mha._value_dense.kernel.assign(weights["value_kernel"].reshape(8, heads, dv))
    mha._value_dense.bias.assign(weights["value_bias"].reshape(heads, dv))
    mha._output_dense.kernel.assign(
        weights["output_kernel"].reshape(heads, dv, channels)
    )
    mha._output_dense.bias.assign(weights["output_bias"])
    key_mask = mask.reshape(2, 1, 6)[
        1:
    ]  # item 1 (MHA gives a fully masked row NaN-free uniform)
    theirs = to_numpy(
        mha(
            q_tokens[1:],
            c_tokens[1:],
            attention_mask=np.broadcast_to(key_mask, (1, 20, 6)),
        )
    ).reshape(1, 4, 5, channels)
    ours = to_numpy(layer(x, attention_mask=mask, context=context))[1:]
    ref64, budget, _ = reference.error_budget(
        x[1:],
        weights,
        num_heads=heads,
        output_dense=True,
        context=context[1:],
        attention_mask=mask[1:],
    )
    assert reference.max_abs(theirs, ref64) <= budget
    assert reference.max_abs(ours, ref64) <= budget


# ---------------------------------------------------------------- errors
# id -> (init kwargs, message fragment)
INIT_ERRORS = {
    "reduction_one": ({"kv_reduction": 1}, "`kv_reduction`"),
    "reduction_name": ({"kv_reduction": "avg"}, "kv_reduction='avg'"),
    "pool_size_zero": ({"kv_reduction": "pool", "kv_pool_size": 0}, "kv_pool_size=0"),
    "context_channels_zero": ({"context_channels": 0}, "context_channels=0"),
    "reduction_with_windows": (
        {"kv_reduction": 2, "window_size": 4},
        "kv_reduction=2, window_size=4",
    ),
    "reduction_with_relative": (
        {"kv_reduction": 2, "position_encoding": "relative", "position_size": (4, 4)},
        "position_encoding='relative', kv_reduction=2",
    ),
    "context_with_sinusoidal": (
        {"context_channels": 8, "position_encoding": "sinusoidal"},
        "position_encoding='sinusoidal'",
    ),
}


@pytest.mark.parametrize("name", list(INIT_ERRORS))
def test_init_errors(name):
    kwargs, fragment = INIT_ERRORS[name]
    with pytest.raises(ValueError, match=_escape(fragment)):
        MultiHeadSelfAttention2D(num_heads=2, **kwargs)


def _escape(fragment):
    import re

    return re.escape(fragment)


def _zeros(shape):
    return np.zeros(shape, "float32")


# id -> (init kwargs, call builder, message fragment)
CALL_ERRORS = {
    "reduction_larger_than_map": (
        {"kv_reduction": 4},
        lambda layer: layer(_zeros((1, 3, 8, 16))),
        "kv_reduction=4, map size=3",
    ),
    "mask_with_reduction": (
        {"kv_reduction": 2},
        lambda layer: layer(_zeros(SHAPE), attention_mask=np.ones(SHAPE[:3], bool)),
        "attention_mask.shape=(2, 4, 5), kv_reduction=2",
    ),
    "context_other_batch": (
        {},
        lambda layer: layer(_zeros(SHAPE), context=_zeros((3, 3, 2, 8))),
        "context.shape=(3, 3, 2, 8)",
    ),
    "context_other_channels": (
        {"context_channels": 8},
        lambda layer: layer(_zeros(SHAPE), context=_zeros((2, 3, 2, 4))),
        "context.shape=(2, 3, 2, 4)",
    ),
    "context_rank": (
        {},
        lambda layer: layer(_zeros(SHAPE), context=_zeros((2, 6, 8))),
        "context.shape=(2, 6, 8)",
    ),
    "mask_of_the_query_grid": (
        {},
        lambda layer: layer(
            _zeros(SHAPE),
            context=_zeros(CONTEXT),
            attention_mask=np.ones((2, 4, 5), bool),
        ),
        "attention_mask.shape=(2, 4, 5)",
    ),
    "relative_other_grid": (
        {"position_encoding": "relative", "position_size": (4, 5)},
        lambda layer: layer(_zeros(SHAPE), context=_zeros(CONTEXT)),
        "key grid (H', W')=(3, 2)",
    ),
    "context_channels_called_without": (
        {"context_channels": 8},
        lambda layer: layer(_zeros(SHAPE)),
        "context=None",
    ),
}


@pytest.mark.parametrize("name", list(CALL_ERRORS))
def test_call_errors(name):
    kwargs, call, fragment = CALL_ERRORS[name]
    layer = MultiHeadSelfAttention2D(num_heads=2, **kwargs)
    with pytest.raises(ValueError, match=_escape(fragment)):
        call(layer)


def test_self_attention_layer_called_with_a_context():
    layer = MultiHeadSelfAttention2D(num_heads=2)
    layer(_zeros(SHAPE))
    with pytest.raises(ValueError, match=_escape("context.shape=(2, 3, 2, 8)")):
        layer(_zeros(SHAPE), context=_zeros(CONTEXT))
