"""The layer's norms (`qk_norm`, `output_norm`): timm's LayerNorm and RmsNorm
in keras.ops, exact in float64 on every backend.

Over the last axis (n channels), the variance and mean square divided by n
(`mhsa_core.reference.norms` has the formulas, checked against timm):

- "layer": (x - mean) * rsqrt(var + eps) * scale + bias;
- "rms": x * rsqrt(mean(x^2) + eps) * scale (no bias).

The means are `ops.sum(...) / n`, not `ops.mean` / `ops.var` or
`ops.layer_normalization`: keras 3.15 computes those in float32 for float64
inputs on torch and JAX (its `result_type(x, "float32")` maps 64-bit to
32-bit there; canaries "mean-float64", "var-float64",
"layer-normalization-float64" in tests/canaries), while `ops.sum` keeps
float64.

Under mixed precision a norm computes in float32 (its input cast up, its
float32 weights as they are) and hands on the compute dtype, as Keras's
LayerNormalization does; in float32 and float64 it computes in that dtype.
"""

from __future__ import annotations

from keras import backend, ops

from mhsa_core._typing import Tensor
from mhsa_core.reference import schema

__all__ = ["apply_norm", "norm_dtype"]


def norm_dtype(dtype: str) -> str:
    """The dtype a norm computes in for inputs of `dtype`: at least float32
    (the logits' rule, `schema.logits_dtype`)."""
    return schema.logits_dtype(backend.standardize_dtype(dtype))


def _mean_last(x: Tensor) -> Tensor:
    """mean over the last axis, kept: a sum divided by the static count."""
    return ops.sum(x, axis=-1, keepdims=True) / x.shape[-1]


def apply_norm(
    x: Tensor,
    kind: str,
    scale: Tensor,
    bias: Tensor | None,
    epsilon: float,
) -> Tensor:
    """`x` normalized over its last axis (static size) by the norm `kind`
    ("layer" or "rms") with its weights; in the dtype of `x`."""
    dtype = norm_dtype(x.dtype)
    y = ops.cast(x, dtype)
    eps = ops.convert_to_tensor(epsilon, dtype=dtype)  # not ops.cast: TF rounds
    if kind == "layer":
        y = y - _mean_last(y)
        y = y * ops.rsqrt(_mean_last(ops.square(y)) + eps)
    else:  # "rms"
        y = y * ops.rsqrt(_mean_last(ops.square(y)) + eps)
    y = y * ops.cast(scale, dtype)
    if bias is not None:
        y = y + ops.cast(bias, dtype)
    return ops.cast(y, x.dtype)
