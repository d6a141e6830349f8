"""The native fused references of the bench: the block in each framework's own
attention, no Keras.

Each computes exactly the bench configs' block (`mhsa_core.reference.mhsa_forward`
with linear q/k/v projections with biases, heads as contiguous channel
slices, scale 1/sqrt(kd), and for "relative" BoTNet's logits
q_i . (R_h[y_j - y_i + H - 1] + R_w[x_j - x_i + W - 1]) times the scale, at
the tables' reference size), from the canonical weight dict, in float32:

- torch: `F.scaled_dot_product_attention` (the flash kernel on CPU when there
  is no bias; the position term enters as a float `attn_mask`);
- JAX: `jax.nn.dot_product_attention` (the position term as its `bias`);
- TensorFlow has no fused attention op: einsum, softmax, einsum, which is what
  XLA (`jit_compile=True`) fuses.

They are the bench's own and not `backends/native_*.py` (the oracles of the
layer's tests): those live outside the installed package and carry every
encoding, mask and dtype; these carry only what the bench runs, so the
installed `mhsa-core bench` has them. Every bench worker checks the forward
output of what it measured against the float64 NumPy reference where N is
small enough (`worker.CHECK_MAX_LOGITS`): the "none" block at the legacy
config of every default run, the relative one at `tiny_relative`
(tests/consistency/test_bench.py runs it on JAX; `mhsa-core bench --configs
tiny_relative --paths native` checks all three).

Imports its framework inside each builder: a worker imports only its own.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from mhsa_core.bench.configs import BenchConfig
from mhsa_core.reference import schema

ENCODINGS = ("none", "relative")


@dataclasses.dataclass(frozen=True)
class _Block:
    """What every native needs of a config: sizes, scale, the relative tables."""

    height: int
    width: int
    channels: int
    heads: int
    d: int  # head dim (kd = dv)
    n: int  # tokens
    scale: float
    relative: bool
    tables: tuple  # (name of R_h, name of R_w) in the weight dict, or ()

    @classmethod
    def of(cls, config: BenchConfig) -> _Block:
        if config.position_encoding not in ENCODINGS:
            raise ValueError(
                f"The bench natives support position_encoding in {ENCODINGS}. "
                f"Received: position_encoding={config.position_encoding!r}"
            )
        relative = config.position_encoding == "relative"
        return cls(
            config.height,
            config.width,
            config.channels,
            config.num_heads,
            config.head_dim,
            config.tokens,
            1.0 / math.sqrt(config.head_dim),
            relative,
            schema.table_names("relative") if relative else (),
        )


def _relative_index(length):
    """(L, L) int rows of a relative table for (query a, key b): b - a + L - 1."""
    return np.arange(length)[None, :] - np.arange(length)[:, None] + length - 1


def torch_native(config: BenchConfig, weights: dict):
    """(call(x) -> out, [parameters]): x and out (B, H, W, C) torch float32."""
    import torch
    import torch.nn.functional as F

    block = _Block.of(config)
    params = {
        k: torch.tensor(np.asarray(v, np.float32), requires_grad=True)
        for k, v in weights.items()
    }
    height, width, channels = block.height, block.width, block.channels
    heads, d, n, scale, relative = (
        block.heads,
        block.d,
        block.n,
        block.scale,
        block.relative,
    )
    if relative:
        name_h, name_w = block.tables
        index_h = torch.as_tensor(_relative_index(height))
        index_w = torch.as_tensor(_relative_index(width))

    def call(x):
        b = x.shape[0]
        t = x.reshape(b, n, channels)

        def project(name):  # (B, N, C) -> (B, heads, N, d)
            y = t @ params[f"{name}_kernel"] + params[f"{name}_bias"]
            return y.reshape(b, n, heads, d).transpose(1, 2)

        q, k, v = project("query"), project("key"), project("value")
        bias = None
        if relative:
            q5 = q.reshape(b, heads, height, width, d)
            logits_h = torch.einsum("bhyxd,yvd->bhyxv", q5, params[name_h][index_h])
            logits_w = torch.einsum("bhyxd,xud->bhyxu", q5, params[name_w][index_w])
            bias = (logits_h[..., :, None] + logits_w[..., None, :]).reshape(
                b, heads, n, n
            )
            bias = bias * scale
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=scale)
        return out.transpose(1, 2).reshape(b, height, width, channels)

    return call, list(params.values())


def jax_native(config: BenchConfig, weights: dict):
    """(apply(params, x) -> out, params): pure, for `jax.jit` / `jax.grad`."""
    import jax
    import jax.numpy as jnp

    block = _Block.of(config)
    params = {k: jnp.asarray(np.asarray(v, np.float32)) for k, v in weights.items()}
    height, width, channels = block.height, block.width, block.channels
    heads, d, n, scale, relative = (
        block.heads,
        block.d,
        block.n,
        block.scale,
        block.relative,
    )
    if relative:
        name_h, name_w = block.tables
        index_h, index_w = _relative_index(height), _relative_index(width)

    def apply(params, x):
        b = x.shape[0]
        t = x.reshape(b, n, channels)

        def project(name):  # (B, N, heads, d), the layout of dot_product_attention
            y = t @ params[f"{name}_kernel"] + params[f"{name}_bias"]
            return y.reshape(b, n, heads, d)

        q, k, v = project("query"), project("key"), project("value")
        bias = None
        if relative:
            q5 = q.reshape(b, height, width, heads, d)
            logits_h = jnp.einsum("byxhd,yvd->bhyxv", q5, params[name_h][index_h])
            logits_w = jnp.einsum("byxhd,xud->bhyxu", q5, params[name_w][index_w])
            bias = (logits_h[..., :, None] + logits_w[..., None, :]).reshape(
                b, heads, n, n
            )
            bias = bias * scale
        out = jax.nn.dot_product_attention(q, k, v, bias=bias, scale=scale)
        return out.reshape(b, height, width, channels)

    return apply, params


def tensorflow_native(config: BenchConfig, weights: dict):
    """(call(x) -> out, [tf.Variable]): x and out (B, H, W, C) float32."""
    import tensorflow as tf

    block = _Block.of(config)
    params = {
        k: tf.Variable(np.asarray(v, np.float32), name=k) for k, v in weights.items()
    }
    height, width, channels = block.height, block.width, block.channels
    heads, d, n, scale, relative = (
        block.heads,
        block.d,
        block.n,
        block.scale,
        block.relative,
    )
    if relative:
        name_h, name_w = block.tables
        index_h = tf.constant(_relative_index(height))
        index_w = tf.constant(_relative_index(width))

    def call(x):
        b = tf.shape(x)[0]
        t = tf.reshape(x, (b, n, channels))

        def project(name):  # (B, N, heads, d)
            y = (
                tf.einsum("bnc,cd->bnd", t, params[f"{name}_kernel"])
                + params[f"{name}_bias"]
            )
            return tf.reshape(y, (b, n, heads, d))

        q, k, v = project("query"), project("key"), project("value")
        logits = tf.einsum("bqhd,bkhd->bhqk", q, k) * scale  # (B, heads, N, N)
        if relative:
            q5 = tf.reshape(q, (b, height, width, heads, d))
            logits_h = tf.einsum(
                "byxhd,yvd->bhyxv", q5, tf.gather(params[name_h], index_h)
            )
            logits_w = tf.einsum(
                "byxhd,xud->bhyxu", q5, tf.gather(params[name_w], index_w)
            )
            pos = tf.reshape(
                logits_h[..., :, None] + logits_w[..., None, :], (b, heads, n, n)
            )
            logits = logits + pos * scale
        probs = tf.nn.softmax(logits, axis=-1)
        out = tf.einsum("bhqk,bkhd->bqhd", probs, v)  # (B, N, heads, d)
        return tf.reshape(out, (b, height, width, channels))

    return call, list(params.values())


BUILDERS = {"tensorflow": tensorflow_native, "torch": torch_native, "jax": jax_native}
