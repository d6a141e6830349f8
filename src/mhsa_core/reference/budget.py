"""The error budgets: how far from the float64 oracle a result may be.

One rule, used by the tests, `mhsa-core demo` and the consistency matrix:

- float64 results: `FLOAT64_RTOL` x max|oracle|;
- float32 (and mixed precision) results of our block: 2 x the error of the
  reference run with the same roundings (`rounded_forward`: float32 with
  sequential accumulation, 16-bit storage for mixed_*) + `FLOOR` x max|oracle|.

Why sequential accumulation and 2x: docs/tolerances.md.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
from numpy.typing import ArrayLike

from mhsa_core.reference.forward import mhsa_forward, rounded_forward

__all__ = [
    "FLOAT64_RTOL",
    "FLOOR",
    "float32_budget",
    "float64_budget",
    "max_abs",
    "error_budget",
]

FLOAT64_RTOL = 1e-10
# x max|oracle|: a budget never goes below float32 resolution.
FLOOR = 1e-6
# A correct float32 result is within this many times the reference's own
# float32 error (measured worst over 100 random draws per backend: 0.82 of the
# budget; docs/tolerances.md).
FLOAT32_FACTOR = 2.0


def max_abs(a: ArrayLike, b: ArrayLike) -> float:
    """max |a - b| in float64; inf when the shapes differ; 0 for empty arrays."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.shape != b.shape:
        return float("inf")
    return float(np.max(np.abs(a - b))) if a.size else 0.0


def _scale(oracle: ArrayLike) -> float:
    array = np.asarray(oracle)
    return float(np.max(np.abs(array))) if array.size else 0.0


def float32_budget(
    rounded: ArrayLike, oracle: ArrayLike, scale: float | None = None
) -> float:
    """The budget of a float32 result: 2 x |rounded - oracle| + FLOOR x scale.

    `rounded` is a trusted float32 computation of the same thing (the
    reference run with the result's roundings, or a native reference),
    `oracle` the float64 result, `scale` max|oracle| unless given (e.g. the
    largest of several arrays judged together).
    """
    if scale is None:
        scale = _scale(oracle)
    return FLOAT32_FACTOR * max_abs(rounded, oracle) + FLOOR * scale


def float64_budget(oracle: ArrayLike) -> float:
    """The budget of a float64 result: FLOAT64_RTOL x max|oracle|."""
    return FLOAT64_RTOL * _scale(oracle)


def error_budget(
    x: ArrayLike,
    weights: Mapping[str, np.ndarray],
    policy: str = "float32",
    **config: Any,
) -> tuple[np.ndarray, float, float | None]:
    """Reference output and the error budget of a result computed under `policy`.

    Returns `(ref64, budget, base_error)`:
    - ref64: the float64 output;
    - base_error: the error of `rounded_forward` (this reference with the
      roundings of `policy`) against ref64, None for "float64";
    - budget: `float32_budget` (`float64_budget` for "float64").
    """
    ref64 = mhsa_forward(x, weights, dtype=np.float64, **config)
    if policy == "float64":
        return ref64, float64_budget(ref64), None
    rounded = rounded_forward(x, weights, policy, **config)
    return ref64, float32_budget(rounded, ref64), max_abs(rounded, ref64)
