"""Prefix tokens (class and register tokens, `call(x, prefix_tokens=p)`), on
the current backend.

Against the float64 NumPy reference (`mhsa_forward(..., prefix_tokens=p)`):

- every case of `CASES` (each attention path; rope and rope_mixed, whose
  rotation skips the prefix tokens; the tokens encodings, whose term is the
  map's only; q/k norms, output norm and projection; channels_first), float64
  within 1e-10 and float32 within the budget of the reference's own float32
  run, map and prefix outputs judged together, on a padded batch whose item
  0 has every map key masked: prefix tokens are always keys, so item 0's map
  tokens attend to the prefix tokens only (the reference does the same: its
  key mask is True for the prefix tokens);
- the scores: (B, heads, T + N, T + N), rows summing to 1, zero on masked
  map keys, the reference's;
- T = 0 gives the output of the layer without prefix tokens;
- gradients with respect to the prefix tokens against central finite
  differences of the float64 reference, the others finite;
- mixed precision: both outputs in the compute dtype, within the budget of
  the reference run with the policy's roundings;
- a functional model with two inputs (map, prefix tokens; H, W and T
  unknown) and two outputs: two sizes against the reference, and its
  `.keras` file loads to the same numbers;
- H, W and T unknown in one compiled graph: a tf.function of unknown sizes
  (TensorFlow), torch.compile(dynamic=True) without a recompile (torch);
  JAX's jit of the model above traces per size; jax.export with B, H, W
  and T symbolic, torch.export with H, W and T dynamic;
- the errors: a ValueError naming `prefix_tokens` and the value received.
"""

import os

import keras
import numpy as np
import pytest

from mhsa_core import MultiHeadSelfAttention2D, reference
from mhsa_core.consistency import gradients

from harness import make_case, match_all, padded_mask, reference_config, to_numpy

pytestmark = pytest.mark.machine_sensitive

BACKEND = keras.backend.backend()
SHAPE = (2, 4, 5, 16)  # B, H, W, C
T = 3  # a class token and two registers

# name -> layer config; each run with prefix tokens and `padded_mask`.
CASES = {
    "none-full": {"num_heads": 2, "attention_implementation": "full"},
    "none-chunked": {
        "num_heads": 2,
        "attention_implementation": "chunked",
        "chunk_size": 8,
    },
    "none-fused": {"num_heads": 2, "attention_implementation": "fused"},
    "rope-qk_layer-chunked": {
        "num_heads": 2,
        "position_encoding": "rope",
        "qk_norm": "layer",
        "attention_implementation": "chunked",
        "chunk_size": 8,
    },
    "rope-eva-fused": {
        "num_heads": 2,
        "position_encoding": "rope",
        "use_key_bias": False,
        "output_norm": "layer",
        "output_dense": True,
        "attention_implementation": "fused",
    },
    "rope_mixed-full": {"num_heads": 2, "position_encoding": "rope_mixed"},
    "sinusoidal-proj-full": {
        "num_heads": 2,
        "position_encoding": "sinusoidal",
        "output_dense": True,
    },
    "conv-chunked": {
        "num_heads": 1,
        "position_encoding": "conv",
        "attention_implementation": "chunked",
        "chunk_size": 16,
    },
    "rope-channels_first-fused": {
        "num_heads": 2,
        "position_encoding": "rope",
        "data_format": "channels_first",
        "attention_implementation": "fused",
    },
}


def _layout(config, shape=SHAPE):
    if config.get("data_format") == "channels_first":
        return (shape[0], shape[3], shape[1], shape[2])
    return shape


def _prefix(shape=SHAPE, t=T, dtype="float32", seed=5):
    return (
        np.random.default_rng(seed)
        .standard_normal((shape[0], t, shape[3]))
        .astype(dtype)
    )


def _flat(results):
    return np.concatenate([np.asarray(r, np.float64).ravel() for r in results])


def _check(actual, x, prefix, weights, config, dtype, mask=None, what="output"):
    """(outputs, prefix_outputs[, scores]) against the reference: float64 to
    1e-10 of the largest value, float32 within the budget of the reference's
    float32 run (`reference.float32_budget`), all arrays judged together."""
    kwargs = dict(
        attention_mask=mask,
        prefix_tokens=prefix,
        return_attention_scores=len(actual) == 3,
        **reference_config(config),
    )
    expected = reference.mhsa_forward(x, weights, **kwargs)
    assert [np.shape(a) for a in actual] == [e.shape for e in expected], what
    got, oracle = _flat(actual), _flat(expected)
    assert np.all(np.isfinite(got)), what
    if dtype == "float64":
        budget = reference.float64_budget(oracle)
    else:
        rounded = _flat(reference.rounded_forward(x, weights, **kwargs))
        budget = reference.float32_budget(rounded, oracle)
    error = reference.max_abs(got, oracle)
    assert error <= budget, f"{what}: error {error:.3g} > budget {budget:.3g}"


def _case(config, dtype, seed=0):
    shape = _layout(config)
    layer, x, weights = make_case(config, shape, seed=seed, dtype=dtype)
    return layer, x, _prefix(dtype=dtype), weights


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("name", list(CASES))
def test_matches_reference(name, dtype):
    config = CASES[name]
    layer, x, prefix, weights = _case(config, dtype)
    mask = padded_mask(SHAPE[0], *SHAPE[1:3])
    out, prefix_out = layer(x, attention_mask=mask, prefix_tokens=prefix)
    actual = (to_numpy(out), to_numpy(prefix_out))
    _check(actual, x, prefix, weights, config, dtype, mask, what=name)
    # Item 0 has no map key but attends to the prefix tokens: not zero.
    assert np.all(np.abs(actual[0][0]).sum(axis=-1) > 0)


@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"])
def test_mixed_precision(policy):
    """Both outputs in the compute dtype, within the budget of the reference
    run with the policy's roundings (the rotation in float32, as the map's)."""
    config = {**CASES["rope-qk_layer-chunked"], "output_dense": True}
    _, x, weights = make_case(config, SHAPE)
    layer = MultiHeadSelfAttention2D(**config, dtype=policy)
    layer.build(SHAPE)
    layer.set_weight_dict(weights)
    prefix = _prefix()
    mask = padded_mask(*SHAPE[:3])
    actual = layer(x, attention_mask=mask, prefix_tokens=prefix)
    compute = policy.split("_")[1]
    assert [keras.backend.standardize_dtype(a.dtype) for a in actual] == [compute] * 2
    kwargs = dict(attention_mask=mask, prefix_tokens=prefix, **reference_config(config))
    oracle = _flat(reference.mhsa_forward(x, weights, **kwargs))
    rounded = _flat(reference.rounded_forward(x, weights, policy, **kwargs))
    budget = reference.float32_budget(rounded, oracle)
    got = _flat([to_numpy(keras.ops.cast(a, "float32")) for a in actual])
    error = reference.max_abs(got, oracle)
    assert error <= budget, f"{policy}: error {error:.3g} > budget {budget:.3g}"


def test_scores_cover_the_prefix_tokens():
    config = CASES["rope-qk_layer-chunked"]  # scores: the full path runs
    layer, x, prefix, weights = _case(config, "float64")
    mask = padded_mask(SHAPE[0], *SHAPE[1:3])
    out, prefix_out, scores = (
        to_numpy(t)
        for t in layer(
            x, attention_mask=mask, prefix_tokens=prefix, return_attention_scores=True
        )
    )
    n = SHAPE[1] * SHAPE[2]
    assert scores.shape == (SHAPE[0], 2, T + n, T + n)
    np.testing.assert_allclose(scores.sum(axis=-1), 1.0, rtol=1e-12)
    keys = np.concatenate([np.ones((SHAPE[0], T), bool), mask.reshape(SHAPE[0], n)], 1)
    assert np.all(np.where(keys[:, None, None, :], 0.0, scores) == 0)  # masked keys
    assert np.all(scores[0, :, :, :T].sum(axis=-1) > 1 - 1e-12)  # item 0: prefix
    _check((out, prefix_out, scores), x, prefix, weights, config, "float64", mask)


def test_no_prefix_tokens_is_the_map_alone():
    """T = 0: the map's output of the layer without prefix tokens, and an
    empty (B, 0, C) second output."""
    layer, x, _, _ = _case(CASES["rope-eva-fused"], "float32")
    out, prefix_out = layer(x, prefix_tokens=_prefix(t=0))
    assert tuple(prefix_out.shape) == (SHAPE[0], 0, SHAPE[3])
    np.testing.assert_allclose(to_numpy(out), to_numpy(layer(x)), rtol=0, atol=1e-6)


def _loss(x, prefix, weights, config, loss_weights):
    out, prefix_out = reference.mhsa_forward(
        x, weights, prefix_tokens=prefix, **reference_config(config)
    )
    return float(np.sum(out * loss_weights[0]) + np.sum(prefix_out * loss_weights[1]))


@pytest.mark.skipif(BACKEND == "numpy", reason="no gradients on the numpy backend")
@pytest.mark.parametrize("name", ["rope-qk_layer-chunked", "sinusoidal-proj-full"])
def test_gradients_reach_the_prefix_tokens(name):
    """d loss / d prefix tokens of a model with both outputs, float64, against
    central differences of the reference (a few entries); every gradient
    finite."""
    config = CASES[name]
    layer, x, prefix, weights = _case(config, "float64")
    inputs = [
        keras.Input(SHAPE[1:], dtype="float64"),
        keras.Input((T, SHAPE[3]), dtype="float64"),
    ]
    model = keras.Model(inputs, layer(inputs[0], prefix_tokens=inputs[1]))
    loss_weights = [
        gradients.loss_weights(SHAPE, seed=1),
        gradients.loss_weights((SHAPE[0], T, SHAPE[3]), seed=2),
    ]
    loss, (dx, dp), dw = gradients.value_and_grad(model, [x, prefix], loss_weights)
    assert abs(loss - _loss(x, prefix, weights, config, loss_weights)) < 1e-9 * abs(
        loss
    )
    assert all(np.all(np.isfinite(g)) for g in [dx, dp, *dw])
    step = 1e-6
    for index in [(0, 0, 0), (1, 2, 7), (0, 1, 15)]:
        plus, minus = prefix.copy(), prefix.copy()
        plus[index] += step
        minus[index] -= step
        numeric = (
            _loss(x, plus, weights, config, loss_weights)
            - _loss(x, minus, weights, config, loss_weights)
        ) / (2 * step)
        assert abs(dp[index] - numeric) <= 1e-6 * max(1.0, abs(numeric)), index


def test_functional_model_two_sizes_and_keras_file(tmp_path):
    """Input((None, None, C)) and Input((None, C)): H, W and T unknown in the
    model; two sizes against the reference; the `.keras` file loads to the
    same numbers (the model compiled: a graph of unknown sizes on TensorFlow,
    jit on JAX)."""
    config = CASES["rope-eva-fused"]
    inputs = [keras.Input((None, None, SHAPE[3])), keras.Input((None, SHAPE[3]))]
    layer = MultiHeadSelfAttention2D(**config)
    out, prefix_out = layer(inputs[0], prefix_tokens=inputs[1])
    assert tuple(out.shape) == (None, None, None, SHAPE[3])
    assert tuple(prefix_out.shape) == (None, None, SHAPE[3])
    model = keras.Model(inputs, [out, prefix_out])
    _, _, weights = make_case(config, SHAPE)
    layer.set_weight_dict(weights)
    path = os.path.join(tmp_path, "prefix.keras")
    model.save(path)
    loaded = keras.saving.load_model(path)
    for shape, t in [(SHAPE, T), ((1, 3, 6, SHAPE[3]), 1)]:
        x = np.random.default_rng(t).standard_normal(shape).astype("float32")
        prefix = _prefix(shape, t)
        actual = model.predict([x, prefix], verbose=0)
        _check(actual, x, prefix, weights, config, "float32", what=f"{shape}, T={t}")
        again = loaded.predict([x, prefix], verbose=0)
        for a, b in zip(actual, again):
            np.testing.assert_array_equal(a, b)


# name -> (layer config, prefix tokens, the parts of the message).
ERRORS = {
    "rank-2": ({}, np.zeros((2, 16), "float32"), ["prefix_tokens", "(2, 16)"]),
    "channels": ({}, np.zeros((2, 1, 8), "float32"), ["prefix_tokens", "(2, 1, 8)"]),
    "batch": ({}, np.zeros((3, 1, 16), "float32"), ["prefix_tokens", "(3, 1, 16)"]),
    "int-dtype": ({}, np.zeros((2, 1, 16), "int32"), ["prefix_tokens", "int32"]),
    "relative": (
        {"position_encoding": "relative"},
        np.zeros((2, 1, 16), "float32"),
        ["prefix_tokens", "position_encoding='relative'", "(2, 1, 16)"],
    ),
    "absolute": (
        {"position_encoding": "absolute"},
        np.zeros((2, 1, 16), "float32"),
        ["prefix_tokens", "position_encoding='absolute'"],
    ),
    "relative_bias": (
        {"position_encoding": "relative_bias", "num_heads": 2},
        np.zeros((2, 1, 16), "float32"),
        ["prefix_tokens", "position_encoding='relative_bias'"],
    ),
    "windows": (
        {"window_size": 2},
        np.zeros((2, 1, 16), "float32"),
        ["prefix_tokens", "window_size=", "(2, 1, 16)"],
    ),
}


@pytest.mark.parametrize("how", ["eager", "symbolic"])
@pytest.mark.parametrize("name", list(ERRORS))
def test_errors(name, how):
    config, prefix, parts = ERRORS[name]
    layer = MultiHeadSelfAttention2D(**config)
    x = np.zeros(SHAPE, "float32")
    with pytest.raises(ValueError, match=match_all(*parts)):
        if how == "eager":
            layer(x, prefix_tokens=prefix)
        else:
            layer(
                keras.Input(batch_shape=SHAPE),
                prefix_tokens=keras.Input(batch_shape=prefix.shape, dtype=prefix.dtype),
            )


@pytest.mark.parametrize("name", ["channels", "relative", "windows"])
def test_reference_errors(name):
    """The reference refuses what the layer refuses, in the same words."""
    config, prefix, parts = ERRORS[name]
    weights = make_case(config, SHAPE)[2]
    with pytest.raises(ValueError, match=match_all(*parts)):
        reference.mhsa_forward(
            np.zeros(SHAPE), weights, prefix_tokens=prefix, **reference_config(config)
        )


@pytest.mark.skipif(BACKEND != "tensorflow", reason="a TensorFlow graph")
def test_tensorflow_graph_of_unknown_sizes():
    """tf.function with B, H, W and T unknown: one trace runs two sizes (the
    full path chosen at run time by size, `ops.cond`), the prefix tokens
    split off by a slice of unknown length."""
    import tensorflow as tf

    config = CASES["rope_mixed-full"]
    layer, _, _, weights = _case(
        {**config, "attention_implementation": "auto"}, "float32"
    )
    step = tf.function(
        lambda x, p: layer(x, prefix_tokens=p),
        input_signature=[
            tf.TensorSpec((None, None, None, SHAPE[3]), tf.float32),
            tf.TensorSpec((None, None, SHAPE[3]), tf.float32),
        ],
    )
    for shape, t in [(SHAPE, T), ((1, 3, 6, SHAPE[3]), 1)]:
        x = np.random.default_rng(t).standard_normal(shape).astype("float32")
        prefix = _prefix(shape, t)
        actual = [to_numpy(a) for a in step(x, prefix)]
        _check(actual, x, prefix, weights, config, "float32", what=f"{shape}, T={t}")
    assert step.experimental_get_tracing_count() == 1


@pytest.mark.skipif(BACKEND != "torch", reason="torch.compile")
def test_torch_compile_of_unknown_sizes():
    """torch.compile(dynamic=True, fullgraph=True): one graph, no graph
    break, runs two sizes with two T; the second must not recompile
    (backend="eager": dynamo's capture, without inductor's code generation,
    as tests/layers/test_paths.py)."""
    import torch

    # rope_mixed: "rope" at a size dynamo specializes takes NumPy tables,
    # which dynamo cannot trace (test_paths.py's torch case is rope_mixed too).
    config = {**CASES["rope_mixed-full"], "attention_implementation": "fused"}
    layer, x, prefix, weights = _case(config, "float32")
    layer(x, prefix_tokens=prefix)  # Keras's first call sets a global: eager first

    def forward(x, p):
        return layer(x, prefix_tokens=p)

    compiled = torch.compile(forward, dynamic=True, fullgraph=True, backend="eager")
    # Sizes of 0 or 1 are specialized by dynamo (a recompile): 2 and up.
    for i, (shape, t) in enumerate([(SHAPE, T), ((2, 3, 6, SHAPE[3]), 2)]):
        x = np.random.default_rng(t).standard_normal(shape).astype("float32")
        prefix = _prefix(shape, t)
        if i:
            torch.compiler.set_stance("fail_on_recompile")
        try:
            actual = compiled(torch.from_numpy(x), torch.from_numpy(prefix))
        finally:
            torch.compiler.set_stance("default")
        actual = [to_numpy(a.detach()) for a in actual]
        _check(actual, x, prefix, weights, config, "float32", what=f"{shape}, T={t}")


EXPORT_SIZES = [(SHAPE, T), ((2, 3, 6, SHAPE[3]), 2)]


@pytest.mark.skipif(BACKEND != "jax", reason="jax.export: the JAX backend only")
def test_jax_export_with_symbolic_prefix_length():
    """jax.export with B, H, W and T symbolic (the path of Keras's exports
    from JAX): the prefix tokens' slices and the token count are symbolic."""
    import jax

    config = CASES["rope_mixed-full"]
    layer, _, _, weights = _case(config, "float32")
    b, h, w, t = jax.export.symbolic_shape("b, h, w, t")
    exported = jax.export.export(jax.jit(lambda x, p: layer(x, prefix_tokens=p)))(
        jax.ShapeDtypeStruct((b, h, w, SHAPE[3]), np.float32),
        jax.ShapeDtypeStruct((b, t, SHAPE[3]), np.float32),
    )
    for shape, t in EXPORT_SIZES:
        x = np.random.default_rng(t).standard_normal(shape).astype("float32")
        prefix = _prefix(shape, t)
        actual = [np.asarray(a) for a in exported.call(x, prefix)]
        _check(actual, x, prefix, weights, config, "float32", what=f"{shape}, T={t}")


@pytest.mark.skipif(BACKEND != "torch", reason="torch.export: the torch backend only")
def test_torch_export_keeps_the_prefix_length_dynamic():
    """torch.export of the two-input model with H, W and T dynamic."""
    import torch

    config = CASES["rope_mixed-full"]
    layer, x, prefix, weights = _case(config, "float32")
    inputs = [keras.Input((None, None, SHAPE[3])), keras.Input((None, SHAPE[3]))]
    model = keras.Model(inputs, layer(inputs[0], prefix_tokens=inputs[1]))
    height, width, length = (torch.export.Dim(n, min=2, max=64) for n in "HWT")
    program = torch.export.export(
        model,
        ((torch.from_numpy(x), torch.from_numpy(prefix)),),
        # The model's one argument is the tuple of its two inputs.
        dynamic_shapes=((({1: height, 2: width}, {1: length}),),),
        strict=False,
    )
    for shape, t in EXPORT_SIZES:
        x = np.random.default_rng(t).standard_normal(shape).astype("float32")
        prefix = _prefix(shape, t)
        with torch.no_grad():
            outs = program.module()((torch.from_numpy(x), torch.from_numpy(prefix)))
        actual = [o.numpy() for o in outs]
        _check(actual, x, prefix, weights, config, "float32", what=f"{shape}, T={t}")
