"""The three attention paths (full, chunked, fused), on the current backend.

Every number is judged against the float64 oracle by the project's budget
rule (`mhsa_core.reference.budget`), never by a hand-picked tolerance:

- forward: the float64 NumPy reference (`reference.mhsa_forward`); a float32
  output must be within `reference.error_budget` (2x the error of the
  reference run in float32, + FLOOR x scale) and, against the full path,
  within `float32_budget(full path's float32 output, oracle)`: 2x the full
  path's own error. float64 outputs within `float64_budget`.
- gradients (of loss = sum(out * L), with respect to the input and every
  weight): the oracle is the full path in float64, which
  tests/layers/test_gradients.py checks against each backend's native
  reference and central differences (the NumPy reference has no backward
  pass). float32: `float32_budget(full path's float32 gradient, oracle,
  scale=G)`, G the largest entry of the whole float64 gradient (as
  test_gradients.py, where that floor is explained); float64:
  `float64_budget` of the whole gradient seen as one vector.

Cases: every position encoding (fused: those it supports, the rotary ones
included: q and k are rotated before any path runs), timm's options (q/k
norms act before `attend`, so every path gets them; the output norm and
projection after), Swin's shifted windows on a padded map (each window a
batch item of the paths: 9 tokens, 9 = 7 + 2), masks whose batch item 0 has
every key masked (zero output and zero gradients, never NaN), a ragged last
chunk (N = 30 = 4 * 7 + 2 in every other case) and chunk sizes 1 (N a
multiple) and 64 (> N), float32 and float64 (where fused falls back to
chunked and must stay float64-exact), mixed precision (forward); dynamic H
and W under each backend's compiler (TF: tf.function with None sizes, one
trace; JAX: jax.jit at two sizes; torch: torch.compile(dynamic=True), no
recompile at the second size) and "auto" choosing at run time in a TF graph;
the choice rule (`choice.resolve`) as a table, and the calls that must run
the full path (scores, dropout in training); the config round trip and bad
arguments.

Shapes are tiny (B=2, 5x6 map, C=8). The time goes to the chunked path's
loops and to compiles (JAX compiles each step, ~1-3 s of CPU; torch runs
Python loops; TF eager runs the while loop op by op), so every result is
computed once per process (`functools.cache`) and the numerics run eagerly
on TF and torch, under jax.jit on JAX.
"""

import functools

import keras
import numpy as np
import pytest
from keras import ops

from mhsa_core import MultiHeadSelfAttention2D, reference
from mhsa_core.consistency import gradients
from mhsa_core.layers import attention
from mhsa_core.layers.attention import choice

from cases import yolov4_mhsa
from harness import (
    magnitude,
    make_case,
    match_all,
    random_input,
    random_mask,
    reference_config,
    to_numpy,
)

BACKEND = keras.backend.backend()
HAS_GRADIENTS = BACKEND in ("tensorflow", "torch", "jax")

SHAPE = (2, 5, 6, 8)  # N = 30
CHUNK = 7  # 30 = 4 * 7 + 2: the last chunk is ragged
# The weights are injected from NumPy: zero initializers spare JAX compiling
# a random initializer per weight shape and dtype (~0.5 s each).
NO_RANDOM_INIT = {"kernel_initializer": "zeros", "position_initializer": "zeros"}
OTHER_SIZE = (4, 7)  # a second map size (N = 28) for the compiled tests

# name -> (layer config, masked): every position encoding. Masked cases get
# `random_mask` with batch item 0 fully masked; the unmasked ones run the
# chunk body without its mask arguments. "resized": tables learned at another
# size than 5x6.
CASES = {
    "none-masked": ({"num_heads": 2}, True),
    # key_dim != C // heads (the fused path cannot take it, nor "relative").
    "relative-resized-key_dim3-unscaled_pos-masked": (
        {
            "num_heads": 2,
            "key_dim": 3,
            "position_encoding": "relative",
            "position_size": (3, 9),
            "scale_position_logits": False,
        },
        True,
    ),
    # position_scale / scale != 1: the key term is divided by the scale.
    "absolute-resized-scale0.5-unscaled_pos-masked": (
        {
            "num_heads": 2,
            "position_encoding": "absolute",
            "position_size": (8, 4),
            "scale": 0.5,
            "scale_position_logits": False,
        },
        True,
    ),
    "sinusoidal": ({"num_heads": 2, "position_encoding": "sinusoidal"}, False),
    # The Keras 2 YOLOv4-MHSA block: ReLU, unscaled (large) logits, "conv".
    "conv-yolov4_mhsa": (yolov4_mhsa(num_heads=2), False),
    # timm/EVA options: normed q and k into every path (fused included), the
    # output norm and projection after; item 0's zeros become their bias terms.
    "qk_layer-out_norm-proj-no_key_bias-masked": (
        {
            "num_heads": 2,
            "qk_norm": "layer",
            "use_key_bias": False,
            "output_norm": "layer",
            "output_dense": True,
        },
        True,
    ),
    # RMS-normed q in the relative rows of every chunk.
    "qk_rms-relative": (
        {"num_heads": 2, "qk_norm": "rms", "position_encoding": "relative"},
        False,
    ),
    # Rotations of q and k, computed once before any path: on every path,
    # the fused one included. A reference grid other than 5x6; timm's half
    # layout; RoPE-Mixed's learned frequencies (their gradients too).
    "rope-reference_grid-half-masked": (
        {
            "num_heads": 2,
            "position_encoding": "rope",
            "position_size": (3, 9),
            "rope_layout": "half",
        },
        True,
    ),
    "rope_mixed-masked": ({"num_heads": 2, "position_encoding": "rope_mixed"}, True),
    # Swin's bias over the whole map, its table learned at another size (the
    # fused kernels take it as their additive bias).
    "relative_bias-resized-masked": (
        {"num_heads": 2, "position_encoding": "relative_bias", "position_size": (3, 4)},
        True,
    ),
    # Swin's shifted windows: 3x3 windows of the 5x6 map padded to 6x6,
    # shifted by (1, 1): the bias, the shift mask, the padding and the key
    # mask on each path, per window.
    "swin-window3-shift1-masked": (
        {
            "num_heads": 2,
            "position_encoding": "relative_bias",
            "window_size": 3,
            "shift_size": 1,
            "scale_position_logits": False,
        },
        True,
    ),
    # RoPE-Mixed inside shifted windows: q and k rotated by their place in
    # the map before the windows are cut, on every path.
    "rope_mixed-window3-shift1-masked": (
        {
            "num_heads": 2,
            "position_encoding": "rope_mixed",
            "window_size": 3,
            "shift_size": 1,
        },
        True,
    ),
}
RELATIVE = "relative-resized-key_dim3-unscaled_pos-masked"
ABSOLUTE = "absolute-resized-scale0.5-unscaled_pos-masked"
OPTIONS = "qk_layer-out_norm-proj-no_key_bias-masked"
ROPE = "rope-reference_grid-half-masked"
ROPE_MIXED = "rope_mixed-masked"
SWIN = "swin-window3-shift1-masked"
# (case, path) run in float64 too (each chunked run costs JAX a compile):
# fused falls back to chunked there, checked on the encoding it folds in.
FLOAT64_RUNS = (
    ("none-masked", "chunked"),
    (RELATIVE, "chunked"),
    (ABSOLUTE, "chunked"),
    (ABSOLUTE, "fused"),
    (OPTIONS, "chunked"),
    (ROPE, "chunked"),
    (ROPE_MIXED, "fused"),
    ("relative_bias-resized-masked", "chunked"),
    (SWIN, "chunked"),
    (SWIN, "fused"),
)


def _fused_supported(case):
    config, _ = CASES[case]
    return config.get("position_encoding") != "relative" and config.get("key_dim") in (
        None,
        SHAPE[-1] // config.get("num_heads", 1),
    )


def _numeric_ids():
    ids = []
    for case in CASES:
        for path in ("chunked", "fused"):
            if path == "chunked" or _fused_supported(case):
                ids.append((case, path, "float32"))
    return ids + [(case, path, "float64") for case, path in FLOAT64_RUNS]


# ------------------------------------------------------------------ running


def _forward_and_grads(layer, x, mask, loss_weights):
    """One forward and backward pass of loss = sum(out * loss_weights): eager
    on TF (where `keras.remat`'s eager gradient has its own trap) and torch,
    one jit on JAX.

    Returns (out, grads): NumPy; grads {"x": d loss / d x, weight name:
    d loss / d weight}. (`gradients.value_and_grad` gives no output; a second
    forward would cost the chunked path another compile on JAX.)
    """
    variables = list(layer.trainable_variables)
    if BACKEND == "tensorflow":
        import tensorflow as tf

        xt = tf.convert_to_tensor(x)
        with tf.GradientTape() as tape:
            tape.watch(xt)
            out = layer(xt, attention_mask=mask)
            loss = tf.reduce_sum(out * tf.cast(loss_weights, out.dtype))
        grads = tape.gradient(
            loss,
            [xt] + [v.value for v in variables],
            unconnected_gradients=tf.UnconnectedGradients.ZERO,
        )
    elif BACKEND == "torch":
        import torch

        xt = torch.tensor(x, requires_grad=True)
        out = layer(xt, attention_mask=None if mask is None else torch.tensor(mask))
        loss = (out * torch.as_tensor(loss_weights, dtype=out.dtype)).sum()
        grads = torch.autograd.grad(
            loss, [xt] + [v.value for v in variables], allow_unused=True
        )
        grads = [
            torch.zeros_like(p) if g is None else g
            for g, p in zip(grads, [xt] + [v.value for v in variables])
        ]
    else:
        import jax
        import jax.numpy as jnp

        non_trainable = [v.value for v in layer.non_trainable_variables]

        def loss_fn(trainable, xj):
            out, _ = layer.stateless_call(
                trainable, non_trainable, xj, attention_mask=mask
            )
            return jnp.sum(out * jnp.asarray(loss_weights, out.dtype)), out

        # jit: one compile of the whole step (eagerly, every primitive is
        # compiled at its shapes and every scan on its own: slower).
        (_, out), (weight_grads, gx) = jax.jit(
            jax.value_and_grad(loss_fn, argnums=(0, 1), has_aux=True)
        )([v.value for v in variables], jnp.asarray(x))
        grads = [gx, *weight_grads]
    return to_numpy(out), _named(layer, [to_numpy(g) for g in grads])


def _config(case, path, chunk_size=CHUNK):
    config, _ = CASES[case]
    return {
        **config,
        "attention_implementation": path,
        "chunk_size": chunk_size,
        **NO_RANDOM_INIT,
    }


@functools.cache
def _layer(case, path, dtype, chunk_size=CHUNK):
    """The case's layer on `path`, built for SHAPE, with the case's weights
    (the same NumPy draw for every path and dtype); its weights."""
    layer, _, weights = make_case(_config(case, path, chunk_size), SHAPE, dtype=dtype)
    return layer, weights


def _data(case, shape, dtype):
    """Input, mask (or None) and loss weights of a case at `shape`."""
    _, masked = CASES[case]
    seed = 0 if shape == SHAPE else 1
    x = random_input(shape, dtype, seed=seed)
    mask = random_mask(*shape[:3], fully_masked_item=True) if masked else None
    return x, mask, gradients.loss_weights(shape, seed=seed)


@functools.cache
def _result(case, path, dtype, chunk_size=CHUNK):
    """(out, grads) of the case on `path` at SHAPE (eager), computed once."""
    layer, _ = _layer(case, path, dtype, chunk_size)
    return _forward_and_grads(layer, *_data(case, SHAPE, dtype))


@functools.cache
def _reference(case, shape=SHAPE):
    """The NumPy reference's float64 output and the budget of a float32 one."""
    config, _ = CASES[case]
    _, weights = _layer(case, "full", "float64")
    x, mask, _ = _data(case, shape, "float64")
    ref64, budget, _ = reference.error_budget(
        x, weights, attention_mask=mask, **reference_config(config)
    )
    return ref64, budget


@functools.cache
def _gradient_oracle(case):
    """(g64, G): the full path's float64 gradients at SHAPE, their largest entry."""
    full_out, g64 = _result(case, "full", "float64")
    # Its anchor: the float64 full path's output is the NumPy reference's.
    ref64, _ = _reference(case)
    assert reference.max_abs(full_out, ref64) <= reference.float64_budget(ref64)
    return g64, max(magnitude(g) for g in g64.values())


def _check_forward(out, dtype, case, shape=SHAPE, what="output"):
    """`out` against the NumPy reference, and (float32 at SHAPE) against the
    full path's own error."""
    ref64, budget = _reference(case, shape)
    assert out.dtype == np.dtype(dtype) and out.shape == ref64.shape, (
        out.dtype,
        out.shape,
    )
    assert np.all(np.isfinite(out)), f"{what}: non-finite values"
    error = reference.max_abs(out, ref64)
    if dtype == "float64":
        budget = reference.float64_budget(ref64)
        assert error <= budget, (
            f"{what}: float64 error {error:.3g} > budget {budget:.3g}"
        )
        return
    full_budget = np.inf
    if shape == SHAPE:
        full_budget = reference.float32_budget(
            _result(case, "full", "float32")[0], ref64
        )
    assert error <= budget and error <= full_budget, (
        f"{what}: float32 error {error:.3g}; budgets: reference rule {budget:.3g}, "
        f"2x the full path's error + floor {full_budget:.3g}"
    )


def _check_grads(grads, dtype, case):
    """Every gradient array (at SHAPE) against the float64 full path's."""
    g64, scale = _gradient_oracle(case)
    assert set(grads) == set(g64)
    whole = np.concatenate([g.ravel() for g in g64.values()])
    report, failures = [], []
    for key, exact in g64.items():
        grad = grads[key]
        assert grad.dtype == np.dtype(dtype) and grad.shape == exact.shape, key
        assert np.all(np.isfinite(grad)), f"d loss / d {key}: non-finite"
        error = reference.max_abs(grad, exact)
        if dtype == "float64":
            budget = reference.float64_budget(whole)
        else:
            full_grad = _result(case, "full", "float32")[1][key]
            budget = reference.float32_budget(full_grad, exact, scale=scale)
        report.append(
            f"{key}: {error / scale:.2e} of G, {error / budget:.2f} of budget"
        )
        if error > budget:
            failures.append(key)
    assert not failures, (
        f"{dtype} gradients over budget for {failures} (G = largest "
        f"float64 gradient entry {scale:.3e}):\n  " + "\n  ".join(report)
    )


def _check_fully_masked_item(out, grads):
    """Batch item 0 has every key masked: exactly zero attention output and
    input gradient. (Its share of the weight gradients is 0 too: they are
    within budget of the oracle's, where it is exactly 0, and finite.) The
    layer's output is then zero, or, after an output norm / projection, what
    they make of zeros (judged by the forward check; not bit-identical at
    every position: test_options.py says why)."""
    if "output_kernel" not in grads and "output_norm_scale" not in grads:
        assert np.all(out[0] == 0), "fully masked item: output not 0"
    assert np.all(grads["x"][0] == 0), "fully masked item: input gradient not 0"
    assert magnitude(grads["x"][1]) > 0


# --------------------------------------------------------------- numerics


class TestNumerics:
    __test__ = HAS_GRADIENTS

    @pytest.mark.parametrize(
        ("case", "path", "dtype"),
        _numeric_ids(),
        ids=["-".join(i) for i in _numeric_ids()],
    )
    def test_forward_and_gradients(self, case, path, dtype):
        out, grads = _result(case, path, dtype)
        _check_forward(out, dtype, case)
        _check_grads(grads, dtype, case)
        if CASES[case][1]:
            _check_fully_masked_item(out, grads)

    @pytest.mark.parametrize("case", [c for c in CASES if CASES[c][1]])
    def test_full_path_fully_masked_item(self, case):
        # The reference arithmetic of the other two: the same claims.
        out, grads = _result(case, "full", "float32")
        _check_fully_masked_item(out, grads)

    @pytest.mark.parametrize("chunk_size", [1, 64], ids=["chunk1", "chunk64-over-N"])
    def test_chunk_sizes(self, chunk_size):
        """30 chunks of one query (N a multiple of the chunk), one chunk larger
        than N; float64-exact. (7, a ragged last chunk, is every case above.)"""
        out, grads = _result(RELATIVE, "chunked", "float64", chunk_size)
        _check_forward(out, "float64", RELATIVE)
        _check_grads(grads, "float64", RELATIVE)
        _check_fully_masked_item(out, grads)


@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"])
@pytest.mark.parametrize("path", ["chunked", "fused"])
@pytest.mark.parametrize("encoding", ["conv", "rope_mixed"])
def test_mixed_precision(encoding, path, policy):
    """Logits and softmax in float32 under mixed precision on every path: the
    output within the budget of the reference run with the policy's roundings.
    With "rope_mixed": q and k rounded to 16 bits by the projections, then
    rotated in float32 with float32 frequencies, as the emulated reference.

    (2, 12, 10, 64) and the YOLOv4-MHSA block's unscaled logits, as the full
    path's test in test_numerics.py: at C = 8 the policy's budget is not
    met by the full path itself on TensorFlow (measured 1.23 of it under
    mixed_bfloat16).
    """
    shape = (2, 12, 10, 64)
    config = yolov4_mhsa(
        position_encoding=encoding,
        attention_implementation=path,
        chunk_size=32,
        **NO_RANDOM_INIT,
    )
    _, x, weights = make_case(config, shape)
    layer = MultiHeadSelfAttention2D(**config, dtype=policy)
    layer.build(shape)
    layer.set_weight_dict(weights)
    mask = random_mask(*shape[:3], fully_masked_item=True)
    out = layer(x, attention_mask=mask)
    assert keras.backend.standardize_dtype(out.dtype) == policy.split("_")[1]
    out = to_numpy(ops.cast(out, "float32")).astype(np.float64)
    assert np.all(np.isfinite(out)) and np.all(out[0] == 0)
    ref64, budget, emulated = reference.error_budget(
        x, weights, policy=policy, attention_mask=mask, **reference_config(config)
    )
    error = reference.max_abs(out, ref64)
    assert error <= budget, (
        f"{policy} {path}: error {error:.3g} > budget {budget:.3g} "
        f"(emulated reference error {emulated:.3g})"
    )


# -------------------------------------------------- dynamic H and W, compiled

# path -> (case, chunk_size) of the compiled two-size tests: a term per
# chunk (relative) and one folded into the keys (absolute). On torch the
# chunked one has no position term, in chunks of 16 (2 chunks at both sizes):
# torch.compile unrolls `ops.map`, so it guards on the chunk count, and
# inside the checkpointed chunk the relative tables' length is specialized
# (a guard 2H - 1 == 9: a recompile per H). OTHER_SIZE shares neither H nor W
# with the tables' reference sizes (3, 9) and (8, 4): `resize_table` skips
# the reference size, one guard more.
# "rope": the rotary tables of a size known only at run time (keras.ops,
# not the NumPy constants of a static size), on the fused path where it is
# the fast one (torch), else chunked.
DYNAMIC = {
    "torch": {
        "chunked": ("none-masked", "chunked", 16),
        "fused": (ABSOLUTE, "fused", CHUNK),
        "rope": (ROPE_MIXED, "fused", CHUNK),
    },
}.get(
    BACKEND,
    {
        "chunked": (RELATIVE, "chunked", CHUNK),
        "fused": (ABSOLUTE, "fused", CHUNK),
        "rope": (ROPE, "chunked", CHUNK),
    },
)
SIZES = (SHAPE, (SHAPE[0],) + OTHER_SIZE + SHAPE[3:])


def _dynamic_layers():
    return {
        label: _layer(case, path, "float32", chunk)[0]
        for label, (case, path, chunk) in DYNAMIC.items()
    }


def _check_dynamic(results):
    """results[shape][path] = (out, grads) from the compiled step: the output
    at both sizes against the NumPy reference, the gradients at SHAPE against
    the oracle and at the other size finite, item 0 (fully masked) zero."""
    for shape in SIZES:
        for path, (case, _, _) in DYNAMIC.items():
            out, grads = results[shape][path]
            _check_forward(out, "float32", case, shape, what=f"{path} at {shape}")
            if shape == SHAPE:
                _check_grads(grads, "float32", case)
            assert all(np.all(np.isfinite(g)) for g in grads.values()), (path, shape)
            _check_fully_masked_item(out, grads)


def _step_inputs(shape):
    # Every DYNAMIC case is masked; the data depend on the shape only.
    x, mask, loss_weights = _data(DYNAMIC["chunked"][0], shape, "float32")
    return x, mask, loss_weights.astype("float32")


@pytest.mark.slow
class TestTensorFlowGraph:
    __test__ = BACKEND == "tensorflow"

    def test_dynamic_size_one_trace(self):
        """tf.function with H and W unknown: one trace runs both sizes,
        forward and gradients."""
        import tensorflow as tf

        layers = _dynamic_layers()

        @tf.function(
            input_signature=[
                tf.TensorSpec((None, None, None, SHAPE[-1]), tf.float32),
                tf.TensorSpec((None, None, None), tf.bool),
                tf.TensorSpec((None, None, None, SHAPE[-1]), tf.float32),
            ]
        )
        def step(x, mask, loss_weights):
            results = {}
            for path, layer in layers.items():
                variables = [v.value for v in layer.trainable_variables]
                with tf.GradientTape() as tape:
                    tape.watch(x)
                    out = layer(x, attention_mask=mask)
                    loss = tf.reduce_sum(out * loss_weights)
                # (The resized tables' gradients come as IndexedSlices.)
                results[path] = (out, tape.gradient(loss, [x] + variables))
            return results

        results = {}
        for shape in SIZES:
            raw = step(*_step_inputs(shape))
            results[shape] = {
                path: (
                    out.numpy(),
                    _named(
                        layers[path], [tf.convert_to_tensor(g).numpy() for g in grads]
                    ),
                )
                for path, (out, grads) in raw.items()
            }
        assert step.experimental_get_tracing_count() == 1
        _check_dynamic(results)

    def test_auto_picks_by_size_at_run_time(self, monkeypatch):
        """ "auto" with N unknown: `ops.cond` runs the full path up to
        FULL_MAX_TOKENS and the chunked one above; which ran is counted by
        spies in the two branches (only the branch taken runs its ops)."""
        import tensorflow as tf

        ran = {"full": tf.Variable(0), "chunked": tf.Variable(0)}

        def spy(name, fn):
            def counted(*args, **kwargs):
                result = fn(*args, **kwargs)
                out = result[0] if isinstance(result, tuple) else result
                with tf.control_dependencies([ran[name].assign_add(1)]):
                    out = tf.identity(out)
                return (out,) + tuple(result[1:]) if isinstance(result, tuple) else out

            return counted

        monkeypatch.setattr(
            attention,
            "dot_product_attention",
            spy("full", attention.dot_product_attention),
        )
        monkeypatch.setattr(
            attention, "chunked_attention", spy("chunked", attention.chunked_attention)
        )
        # C = 4: the >1024-token map stays tiny.
        config = {"num_heads": 1, **NO_RANDOM_INIT}
        layer, _, weights = make_case(config, (1, 5, 6, 4))
        step = tf.function(
            lambda x: layer(x),
            input_signature=[tf.TensorSpec((None, None, None, 4), tf.float32)],
        )
        side = int(np.ceil(np.sqrt(choice.FULL_MAX_TOKENS + 1)))
        for shape, expected in [
            ((1, 5, 6, 4), {"full": 1, "chunked": 0}),
            ((1, side, side, 4), {"full": 1, "chunked": 1}),
        ]:
            x = random_input(shape, seed=3)
            out = step(x).numpy()
            assert {k: int(v.numpy()) for k, v in ran.items()} == expected, shape
            ref64, budget, _ = reference.error_budget(
                x, weights, **reference_config(config)
            )
            error = reference.max_abs(out, ref64)
            assert error <= budget, f"{shape}: error {error:.3g} > budget {budget:.3g}"
        assert side * side > choice.FULL_MAX_TOKENS
        assert step.experimental_get_tracing_count() == 1


class TestJaxJit:
    __test__ = BACKEND == "jax"

    def test_two_sizes(self):
        """jax.jit of forward and gradients at two sizes, both paths (jit
        specializes on shapes: a trace per size). At SHAPE these are the
        numerics tests' own runs (`_forward_and_grads` jits on JAX)."""
        layers = _dynamic_layers()
        results = {
            SHAPE: {
                label: _result(case, path, "float32", chunk)
                for label, (case, path, chunk) in DYNAMIC.items()
            }
        }
        other = SIZES[1]
        results[other] = {
            path: _forward_and_grads(layer, *_step_inputs(other))
            for path, layer in layers.items()
        }
        _check_dynamic(results)


class TestTorchCompile:
    __test__ = BACKEND == "torch"

    def test_dynamic_size_one_compile(self):
        """torch.compile(dynamic=True, fullgraph=True): one graph, no graph
        break, runs both sizes; the second size must not recompile.

        backend="eager": dynamo's capture with symbolic H and W (what decides
        graph breaks, guards and recompiles) without inductor's code
        generation, which costs 60-90 s cold on this machine and nothing
        here controls. Gradients by autograd through the captured graph.
        """
        import torch

        layers = _dynamic_layers()
        for layer in layers.values():
            # An eager call first: Keras's first call in a process sets a
            # global that the compiled graph would guard on (a recompile).
            x, mask, _ = _step_inputs(SHAPE)
            layer(x, attention_mask=mask)

        def forward(x, mask):
            return {
                path: layer(x, attention_mask=mask) for path, layer in layers.items()
            }

        compiled = torch.compile(forward, dynamic=True, fullgraph=True, backend="eager")
        results = {}
        for i, shape in enumerate(SIZES):
            x, mask, loss_weights = _step_inputs(shape)
            xt = torch.tensor(x, requires_grad=True)
            if i:
                torch.compiler.set_stance("fail_on_recompile")
            try:
                outs = compiled(xt, torch.tensor(mask))
            finally:
                torch.compiler.set_stance("default")
            results[shape] = {}
            for path, out in outs.items():
                params = [v.value for v in layers[path].trainable_variables]
                loss = (out * torch.as_tensor(loss_weights)).sum()
                grads = torch.autograd.grad(loss, [xt] + params)
                results[shape][path] = (
                    to_numpy(out.detach()),
                    _named(layers[path], [to_numpy(g) for g in grads]),
                )
        _check_dynamic(results)


def _named(layer, grads):
    """[d x, d w...] -> {"x": ..., weight name: ...}."""
    return {
        "x": grads[0],
        **{v.name: g for v, g in zip(layer.trainable_variables, grads[1:])},
    }


# ------------------------------------------------------ the calls that need full


def test_scores_with_chunked_run_the_full_path():
    """return_attention_scores=True on "chunked" (and "fused") gives the full
    path's scores and outputs, exactly."""
    case = ABSOLUTE
    x, mask, _ = _data(case, SHAPE, "float32")
    full, _ = _layer(case, "full", "float32")
    want_out, want_scores = (
        to_numpy(t) for t in full(x, attention_mask=mask, return_attention_scores=True)
    )
    n = SHAPE[1] * SHAPE[2]
    assert want_scores.shape == (SHAPE[0], 2, n, n)
    for path in ("chunked", "fused"):
        layer, _ = _layer(case, path, "float32")
        out, scores = layer(x, attention_mask=mask, return_attention_scores=True)
        assert np.array_equal(to_numpy(scores), want_scores), path
        assert np.array_equal(to_numpy(out), want_out), path


@pytest.mark.parametrize("path", ["chunked", "fused"])
def test_dropout_in_training_runs_the_full_path(path):
    """Same seed, same weights: the same dropped probabilities as "full"."""
    config = {
        "num_heads": 2,
        "dropout": 0.5,
        "seed": 3,
        "chunk_size": CHUNK,
        **NO_RANDOM_INIT,
    }
    outs = {}
    for implementation in ("full", path):
        layer, x, _ = make_case(
            {**config, "attention_implementation": implementation}, SHAPE
        )
        outs[implementation] = (to_numpy(layer(x, training=True)), to_numpy(layer(x)))
    assert np.array_equal(outs[path][0], outs["full"][0])
    # Dropout really happened (training differs from inference).
    assert not np.allclose(outs["full"][0], outs["full"][1])


# ----------------------------------------------------------- the choice rule


def _position(encoding):
    layer = MultiHeadSelfAttention2D(position_encoding=encoding, position_size=(2, 2))
    return layer.position


_LARGE = choice.FULL_MAX_TOKENS + 1
# name -> (implementation, resolve keyword overrides, expected path, or a dict
# backend -> path). Defaults: N = 30, float32, q and v heads of 4, no
# position term, no scores, no dropout.
CHOICES = {
    "full": ("full", {"n": 4096}, choice.FULL),
    "chunked": ("chunked", {}, choice.CHUNKED),
    "fused": ("fused", {}, choice.FUSED),
    "scores-chunked": ("chunked", {"scores": True}, choice.FULL),
    "scores-fused": ("fused", {"scores": True}, choice.FULL),
    "scores-auto-large": ("auto", {"scores": True, "n": 4096}, choice.FULL),
    "dropout-chunked": ("chunked", {"dropout": True}, choice.FULL),
    "dropout-fused": ("fused", {"dropout": True}, choice.FULL),
    "dropout-auto-large": ("auto", {"dropout": True, "n": 4096}, choice.FULL),
    "fused-float64": ("fused", {"dtype": "float64"}, choice.CHUNKED),
    "fused-absolute": ("fused", {"position": "absolute"}, choice.FUSED),
    # A bias of no query is the fused kernels' additive bias.
    "fused-relative_bias": ("fused", {"position": "relative_bias"}, choice.FUSED),
    "fused-shift-mask": ("fused", {"bias": True}, choice.FUSED),
    "auto-small": ("auto", {}, choice.FULL),
    "auto-at-max": ("auto", {"n": choice.FULL_MAX_TOKENS}, choice.FULL),
    "auto-large": (
        "auto",
        {"n": _LARGE},
        {"torch": choice.FUSED, "tensorflow": choice.CHUNKED, "jax": choice.CHUNKED},
    ),
    "auto-large-absolute": (
        "auto",
        {"n": _LARGE, "position": "absolute"},
        {"torch": choice.FUSED, "tensorflow": choice.CHUNKED, "jax": choice.CHUNKED},
    ),
    "auto-large-float64": ("auto", {"n": _LARGE, "dtype": "float64"}, choice.CHUNKED),
    "auto-large-relative": (
        "auto",
        {"n": _LARGE, "position": "relative"},
        choice.CHUNKED,
    ),
    "auto-large-key_dim3": ("auto", {"n": _LARGE, "query_dim": 3}, choice.CHUNKED),
    # A (heads, N, N) bias on a large map: not the fused kernel by default
    # (its memory is what chunks avoid; SDPA's flash kernel takes no bias).
    "auto-large-relative_bias": (
        "auto",
        {"n": _LARGE, "position": "relative_bias", "bias": True},
        choice.CHUNKED,
    ),
    # Keys of another map (kv_reduction, a context): N * Nk logits decide.
    "auto-reduced-keys-fit": ("auto", {"n": 4096, "key_count": 256}, choice.FULL),
    "auto-reduced-keys-over": (
        "auto",
        {"n": 2048, "key_count": 1024},
        {"torch": choice.FUSED, "tensorflow": choice.CHUNKED, "jax": choice.CHUNKED},
    ),
    "auto-dynamic-N": ("auto", {"n": "tensor"}, choice.BY_SIZE),
    "chunked-dynamic-N": ("chunked", {"n": "tensor"}, choice.CHUNKED),
}
if BACKEND == "jax":
    # jax.export's symbolic H * W: not comparable, not a chunk count.
    CHOICES["auto-symbolic-N"] = ("auto", {"n": "symbolic"}, choice.FULL)


@pytest.mark.parametrize("name", list(CHOICES))
def test_choice(name):
    implementation, overrides, expected = CHOICES[name]
    if isinstance(expected, dict):
        expected = expected[BACKEND]
    kwargs = {
        "n": 30,
        "dtype": "float32",
        "query_dim": 4,
        "value_dim": 4,
        "position": "none",
        "scores": False,
        "dropout": False,
        **overrides,
    }
    kwargs["position"] = _position(kwargs["position"])
    if kwargs["n"] == "tensor":  # N known only at run time
        kwargs["n"] = ops.convert_to_tensor(30)
    elif kwargs["n"] == "symbolic":
        import jax

        height, width = jax.export.symbolic_shape("h, w")
        kwargs["n"] = height * width
    assert choice.resolve(implementation, **kwargs) == expected


@pytest.mark.parametrize(
    ("n", "expected"),
    [
        (1, choice.MAX_CHUNK),
        (1024, choice.MAX_CHUNK),
        (4096, 256),
        (16384, 64),
        (1 << 20, choice.MIN_CHUNK),
    ],
)
def test_default_chunk_size(n, expected):
    assert choice.default_chunk_size(n) == expected
    assert (
        int(to_numpy(choice.default_chunk_size(ops.convert_to_tensor(n)))) == expected
    )


# ------------------------------------------------------- config and arguments


def test_config_round_trip_and_keras_file(tmp_path):
    layer, _, _ = make_case(
        {
            "num_heads": 2,
            "attention_implementation": "chunked",
            "chunk_size": CHUNK,
            **NO_RANDOM_INIT,
        },
        SHAPE,
    )
    config = layer.get_config()
    assert (
        config["attention_implementation"] == "chunked"
        and config["chunk_size"] == CHUNK
    )
    assert MultiHeadSelfAttention2D.from_config(config).get_config() == config
    defaults = MultiHeadSelfAttention2D().get_config()
    assert (
        defaults["attention_implementation"] == "auto"
        and defaults["chunk_size"] is None
    )

    inputs = keras.Input((None, None, SHAPE[-1]))
    model = keras.Model(inputs, layer(inputs))
    path = tmp_path / "chunked.keras"
    model.save(path)
    loaded = keras.saving.load_model(path)
    (revived,) = [
        lay for lay in loaded.layers if isinstance(lay, MultiHeadSelfAttention2D)
    ]
    assert revived.get_config() == config
    for a, b in zip(revived.weights, layer.weights):
        assert np.array_equal(to_numpy(a), to_numpy(b)), a.name


@pytest.mark.parametrize(
    ("kwargs", "parts"),
    [
        (
            {"attention_implementation": "flash"},
            ["attention_implementation", "Received: attention_implementation='flash'"],
        ),
        (
            {"attention_implementation": None},
            ["attention_implementation", "Received: attention_implementation=None"],
        ),
        ({"chunk_size": 0}, ["chunk_size", "Received: chunk_size=0"]),
        ({"chunk_size": -1}, ["chunk_size", "Received: chunk_size=-1"]),
        ({"chunk_size": 1.5}, ["chunk_size", "Received: chunk_size=1.5"]),
        ({"chunk_size": True}, ["chunk_size", "Received: chunk_size=True"]),
        ({"chunk_size": "8"}, ["chunk_size", "Received: chunk_size='8'"]),
        (
            {
                "attention_implementation": "fused",
                "position_encoding": "relative",
                "position_size": (2, 2),
            },
            [
                "attention_implementation='fused'",
                "Received: attention_implementation='fused'",
                "position_encoding='relative'",
            ],
        ),
    ],
    ids=[
        "flash",
        "implementation-None",
        "chunk0",
        "chunk-1",
        "chunk1.5",
        "chunk-True",
        "chunk-str",
        "fused-relative",
    ],
)
def test_bad_arguments(kwargs, parts):
    with pytest.raises(ValueError, match=match_all(*parts)):
        MultiHeadSelfAttention2D(**kwargs)


def test_fused_needs_one_head_width():
    """key_dim != C // num_heads: known at build (C), a ValueError there."""
    layer = MultiHeadSelfAttention2D(
        num_heads=2, key_dim=3, attention_implementation="fused"
    )
    with pytest.raises(
        ValueError,
        match=match_all(
            "attention_implementation='fused'",
            "key_dim=3",
            "Received: attention_implementation='fused'",
        ),
    ):
        layer.build((None, 5, 6, 8))
    # key_dim equal to C // num_heads is fine.
    MultiHeadSelfAttention2D(
        num_heads=2, key_dim=4, attention_implementation="fused"
    ).build((None, 5, 6, 8))
