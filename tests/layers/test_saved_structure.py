"""What the backward pass keeps: the chunks' inputs, not their probabilities.

The chunked attention path is O(c * N) memory only if the backward pass does
not hold on to every chunk's (c, N) probabilities. `_saved.saved_for_backward`
lists what the backward pass keeps, read from its structure on the current
backend (torch: saved-tensor hooks; JAX: the VJP's residuals; TF: the
tf.function graph's forward tensors used by gradient ops and its while loops'
accumulators), never from time or memory measurements.

The rule, per case: a saved tensor "holds probabilities" when it keeps
>= c * N elements per loop iteration (per chunk), where c is the chunk's rows
and N the keys. A case that keeps them must also keep at least N * N such
elements in all (every chunk's tile, stacked or one per iteration), so the
test proves the helper sees the whole of them, not one stray tensor.

The rule separates the paths only if every tensor a path legitimately keeps
whole (the input, the keys, the projections: about N x width) is smaller
than c * N: the cases keep batch x width below the chunk size (a toy of
width 8 with 16-query chunks; the layer at B=1, C=8).

Cases:
- a toy attention in keras.ops, `ops.map` over (query chunk, chunk index)
  like the layer's: without `keras.remat` it keeps every (c, N) tile
  (flagged: the test can fail); with `keras.remat` around the chunk body it
  keeps only the chunks (clean); the same per head, an outer `ops.map` over
  heads around the one over chunks as in the layer (nested loops: JAX stacks
  the tiles over heads x chunks, TF accumulates them in the inner loop's
  body), flagged without remat and clean with it; the plain full attention
  keeps N x N (flagged).
- the layer (B=1, C=8, 2 heads, chunk_size=16, a random mask):
  `attention_implementation="chunked"` with the relative encoding at N = 64,
  150 (a ragged last chunk) and 256, and with the absolute one at N = 64, is
  clean; "full" is flagged.
Plus: the toy's chunked gradients (without remat, with it, and per head with
it) equal the full attention's in float64, eager and compiled (tf.function,
jax.jit; torch eager), so the toy's clean structure is not a lost gradient.
(Checked by hand: a tensor closed over by a `tf.recompute_grad` body, not
passed as an argument, gets a None gradient eagerly and silently zeros under
tf.function. The layer's own gradients are checked against the full path in
its numerics tests.)

One pytest process runs one backend; under numpy (no gradients) only the
helper's error is tested.
"""

import keras
import numpy as np
import pytest
from keras import ops

from mhsa_core import MultiHeadSelfAttention2D

from _saved import Saved, layer_loss, saved_for_backward
from harness import random_mask

BACKEND = keras.backend.backend()
HAS_GRADIENTS = BACKEND in ("tensorflow", "torch", "jax")

CHUNK = 16
TOY_WIDTH = 8  # < CHUNK: the toy's q, k, v (N, 8) stay below c * N


# The toy: single-head attention over N tokens of width d, a per-query term
# gathered by the chunk's index (like the layer's relative position rows).


def _toy_data(n, *, seed=0, dtype="float32"):
    """q, k, v (N, d), a query table (padded N, d), the loss weights (N, d)."""
    rng = np.random.default_rng(seed)
    padded = -(-n // CHUNK) * CHUNK
    q, k, v, weights = (
        rng.standard_normal((n, TOY_WIDTH)).astype(dtype) for _ in range(4)
    )
    table = rng.standard_normal((padded, TOY_WIDTH)).astype(dtype)
    return (q, k, v, table), weights


def _toy_chunk(q, start, k, v, table):
    """One chunk: (c, d) queries, its first row `start`; -> (c, d)."""
    rows = ops.take(table, start + ops.arange(CHUNK, dtype="int32"), axis=0)
    logits = ops.einsum("cd,nd->cn", q + rows, k)  # (c, N)
    return ops.einsum("cn,nd->cd", ops.softmax(logits, axis=-1), v)


def _toy_chunked(remat):
    # k, v and the table enter the remat'd body as arguments: TF's
    # recompute_grad differentiates only its arguments.
    body = keras.remat(_toy_chunk) if remat else _toy_chunk

    def attention(q, k, v, table):
        n = q.shape[0]
        chunks = -(-n // CHUNK)
        q = ops.pad(q, [[0, chunks * CHUNK - n], [0, 0]])
        q = ops.reshape(q, (chunks, CHUNK, q.shape[1]))
        starts = ops.arange(chunks, dtype="int32") * CHUNK
        out = ops.map(lambda xs: body(xs[0], xs[1], k, v, table), (q, starts))
        return ops.reshape(out, (chunks * CHUNK, out.shape[-1]))[:n]

    return attention


def _toy_per_head(attention, heads=2):
    """`attention` on each of `heads` slices of the width: an outer ops.map
    over heads around the inner one over chunks, the layer's nesting."""

    def split(a):  # (N, d) -> (heads, N, d / heads)
        return ops.transpose(ops.reshape(a, (a.shape[0], heads, -1)), (1, 0, 2))

    def per_head(q, k, v, table):
        out = ops.map(lambda xs: attention(*xs), tuple(map(split, (q, k, v, table))))
        return ops.reshape(ops.transpose(out, (1, 0, 2)), (q.shape[0], -1))

    return per_head


def _toy_full(q, k, v, table):
    logits = ops.einsum("qd,nd->qn", q + table[: q.shape[0]], k)  # (N, N)
    return ops.einsum("qn,nd->qd", ops.softmax(logits, axis=-1), v)


def _toy_loss(attention, weights):
    def loss(*args):
        return ops.sum(ops.multiply(attention(*args), ops.convert_to_tensor(weights)))

    return loss


def _toy_case(attention, n):
    args, weights = _toy_data(n)
    return _toy_loss(attention, weights), args, CHUNK, n


def _layer_case(implementation, height, width, encoding="relative"):
    layer = MultiHeadSelfAttention2D(
        num_heads=2,
        position_encoding=encoding,
        attention_implementation=implementation,
        chunk_size=CHUNK,
    )
    x = (
        np.random.default_rng(0)
        .standard_normal((1, height, width, 8))
        .astype("float32")
    )
    layer.build(x.shape)
    mask = random_mask(1, height, width)
    fn, args = layer_loss(layer, x, attention_mask=mask)
    # Per (batch, head), chunks of min(chunk_size, N) queries over N keys.
    n = height * width
    return fn, args, min(CHUNK, n), n


# id -> (case builder, whether the backward pass keeps the probabilities)
CASES = {
    "toy-chunked-N=64": (lambda: _toy_case(_toy_chunked(remat=False), 64), True),
    "toy-chunked-N=150": (lambda: _toy_case(_toy_chunked(remat=False), 150), True),
    "toy-chunked-remat-N=64": (lambda: _toy_case(_toy_chunked(remat=True), 64), False),
    "toy-chunked-remat-N=150": (
        lambda: _toy_case(_toy_chunked(remat=True), 150),
        False,
    ),
    "toy-heads-chunked-N=64": (
        lambda: _toy_case(_toy_per_head(_toy_chunked(remat=False)), 64),
        True,
    ),
    "toy-heads-chunked-remat-N=64": (
        lambda: _toy_case(_toy_per_head(_toy_chunked(remat=True)), 64),
        False,
    ),
    "toy-full-N=64": (lambda: _toy_case(_toy_full, 64), True),
    "layer-chunked-8x8": (lambda: _layer_case("chunked", 8, 8), False),
    "layer-chunked-10x15": (lambda: _layer_case("chunked", 10, 15), False),
    "layer-chunked-16x16": (lambda: _layer_case("chunked", 16, 16), False),
    "layer-chunked-absolute-8x8": (
        lambda: _layer_case("chunked", 8, 8, encoding="absolute"),
        False,
    ),
    "layer-full-8x8": (lambda: _layer_case("full", 8, 8), True),
}


def _describe(saved, limit=6):
    return ", ".join(f"{s.shape} {s.dtype} steps={s.steps}" for s in saved[:limit])


class TestSavedStructure:
    __test__ = HAS_GRADIENTS

    @pytest.mark.parametrize("name", list(CASES))
    def test_backward_keeps_probabilities(self, name):
        build, keeps_probabilities = CASES[name]
        fn, args, rows, n = build()
        saved = saved_for_backward(fn, *args)
        tile = rows * n
        holding = [s for s in saved if s.step_size >= tile]
        if keeps_probabilities:
            assert holding, (
                f"{name}: nothing saved with >= {rows} x {n} elements per step; "
                f"largest: {_describe(saved)}"
            )
            held = sum(int(np.prod(s.shape)) for s in holding)
            assert held >= n * n, (
                f"{name}: the probabilities held add up to {held} elements, "
                f"fewer than N x N = {n * n}: {_describe(holding)}"
            )
        else:
            assert not holding, (
                f"{name}: the backward pass keeps tensors of >= {rows} x {n} "
                f"elements per step: {_describe(holding)}"
            )


def _gradients(loss, args, compiled):
    """Gradients of `loss` with respect to every argument, as NumPy."""
    if BACKEND == "jax":
        import jax

        grad = jax.grad(loss, argnums=tuple(range(len(args))))
        return [np.asarray(g) for g in (jax.jit(grad) if compiled else grad)(*args)]
    if BACKEND == "tensorflow":
        import tensorflow as tf

        def grad(*args):
            with tf.GradientTape() as tape:
                tape.watch(args)
                value = loss(*args)
            return tape.gradient(value, args)

        grads = (tf.function(grad) if compiled else grad)(*map(tf.constant, args))
        # None (a lost gradient) fails the comparison below on purpose.
        return [None if g is None else tf.convert_to_tensor(g).numpy() for g in grads]
    import torch

    tensors = [torch.tensor(a, requires_grad=True) for a in args]
    return [g.numpy() for g in torch.autograd.grad(loss(*tensors), tensors)]


# Each backend's usual ways to run a gradient: TF eager and tf.function;
# JAX under jit (an eager jax.grad of a scan compiles the scan anyway, at
# several times the cost); torch eager (torch.compile was checked by hand, not
# here: its compile costs tens of seconds).
_GRADIENT_MODES = {
    "tensorflow": ["eager", "tf.function"],
    "jax": ["jax.jit"],
    "torch": ["eager"],
}.get(BACKEND, [])


# variant -> (chunked attention, its full counterpart)
_GRADIENT_VARIANTS = {
    "chunked": (lambda: (_toy_chunked(remat=False), _toy_full)),
    "chunked-remat": (lambda: (_toy_chunked(remat=True), _toy_full)),
    "heads-chunked-remat": (
        lambda: (_toy_per_head(_toy_chunked(remat=True)), _toy_per_head(_toy_full))
    ),
}


class TestToyGradients:
    __test__ = HAS_GRADIENTS

    @pytest.mark.parametrize("variant", list(_GRADIENT_VARIANTS))
    @pytest.mark.parametrize("mode", _GRADIENT_MODES)
    def test_chunked_equal_full(self, mode, variant):
        """float64, N = 60 (a ragged last chunk): the chunked toy against the
        full one. The same arithmetic up to summation order: they agree to
        float64 round-off (1e-10 of each gradient's largest magnitude)."""
        args, weights = _toy_data(60, dtype="float64")
        chunked, full = _GRADIENT_VARIANTS[variant]()
        compiled = mode != "eager"
        got_all = _gradients(_toy_loss(chunked, weights), args, compiled)
        want_all = _gradients(_toy_loss(full, weights), args, compiled)
        for name, got, want in zip(("q", "k", "v", "table"), got_all, want_all):
            assert got is not None, f"no gradient for {name}"
            assert got.dtype == np.float64
            scale = np.max(np.abs(want))
            assert scale > 0
            np.testing.assert_allclose(
                got, want, rtol=0, atol=1e-10 * scale, err_msg=f"gradient of {name}"
            )


class TestWithoutGradients:
    __test__ = not HAS_GRADIENTS

    def test_saved_for_backward_raises(self):
        with pytest.raises(ValueError, match=f"Received: backend={BACKEND}"):
            saved_for_backward(lambda x: ops.sum(x), np.zeros(3, "float32"))


def test_step_size():
    assert Saved((4, 16, 60), "float32", 4).step_size == 16 * 60
    assert Saved((2, 4, 16, 60), "float32", 8).step_size == 16 * 60
    assert Saved((None, 16, 60), "float32", None).step_size == 16 * 60
    assert Saved((16, 60), "float32").step_size == 16 * 60
    with pytest.raises(ValueError, match=r"Received: shape=\(4, None\)"):
        _ = Saved((4, None), "float32").step_size
