"""The norms of `qk_norm` and `output_norm` in NumPy, as timm computes them.

Over the last axis of x (n entries), in the float dtype of the run, with
the mean square and the variance divided by n (biased, as torch's):

- "layer": timm's `LayerNorm` (torch's `F.layer_norm`):
  mu = sum(x) / n, var = sum((x - mu)^2) / n,
  y = (x - mu) / sqrt(var + eps) * scale + bias;
- "rms": timm's `RmsNorm` (torch's `F.rms_norm`): no centering, no bias,
  y = x / sqrt(sum(x^2) / n + eps) * scale.

eps is added inside the square root in both (timm/layers/norm.py,
fast_norm.py `rms_norm`). The scale and bias are the canonical weights
`<prefix>_norm_scale` / `<prefix>_norm_bias` (`schema.norm_weight_names`).
"""

from __future__ import annotations

import numpy as np

from mhsa_core.reference import schema
from mhsa_core.reference.position import FloatType, Weights

__all__ = ["NORMS", "layer_norm", "rms_norm", "norm"]

NORMS = ("layer", "rms")


def layer_norm(
    x: np.ndarray,
    scale: np.ndarray,
    bias: np.ndarray,
    epsilon: float,
    dtype: FloatType = np.float64,
) -> np.ndarray:
    """LayerNorm of x over its last axis, every step in `dtype`."""
    x = np.asarray(x).astype(dtype)
    n = dtype(x.shape[-1])
    mu = np.sum(x, axis=-1, keepdims=True) / n
    centered = x - mu
    var = np.sum(centered * centered, axis=-1, keepdims=True) / n
    y = centered / np.sqrt(var + dtype(epsilon))
    return y * np.asarray(scale).astype(dtype) + np.asarray(bias).astype(dtype)


def rms_norm(
    x: np.ndarray,
    scale: np.ndarray,
    epsilon: float,
    dtype: FloatType = np.float64,
) -> np.ndarray:
    """RMSNorm of x over its last axis, every step in `dtype`."""
    x = np.asarray(x).astype(dtype)
    n = dtype(x.shape[-1])
    mean_square = np.sum(x * x, axis=-1, keepdims=True) / n
    return x / np.sqrt(mean_square + dtype(epsilon)) * np.asarray(scale).astype(dtype)


def norm(
    x: np.ndarray,
    weights: Weights,
    prefix: str,
    kind: str,
    epsilon: float,
    dtype: FloatType = np.float64,
) -> np.ndarray:
    """x normalized over its last axis by the norm `kind` ("layer", "rms")
    with the weights `<prefix>_norm_*` of `weights`."""
    names = schema.norm_weight_names(prefix, kind)
    if kind == "layer":
        scale, bias = (weights[name] for name in names)
        return layer_norm(x, scale, bias, epsilon, dtype)
    if kind == "rms":
        return rms_norm(x, weights[names[0]], epsilon, dtype)
    raise ValueError(f"Unknown norm. Expected one of {NORMS}. Received: kind={kind!r}")
