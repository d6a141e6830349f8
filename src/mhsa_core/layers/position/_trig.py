"""sin and cos in `keras.ops` that stay float64-exact on every backend.

keras 3.15's `ops.sin` / `ops.cos` compute float64 in float32 on JAX (its
`result_type(x.dtype, float)` maps float64 to float32; canary
"sin-cos-float64" in tests/canaries). A table of a static size is computed in
NumPy instead (`sinusoidal.py`, `rope.py`), but RoPE-Mixed's angles depend on
a learned weight. Under a float64 compute dtype `sin_cos` therefore computes
both from ops that keep float64 everywhere (multiply, add, casts, where):

- range reduction: n = the integer nearest to x / (pi / 2), r = x - n pi / 2
  with pi / 2 split in two (fdlibm's `pio2_1`, 33 bits, and `pio2_1t`), so
  n * pio2_1 is exact for |n| < 2^20 and |r| <= pi / 4 (+ an ulp);
- Taylor series of sin r (to r^17) and cos r (to r^18), whose first
  omitted terms are below 1e-19 on |r| <= pi / 4;
- the quadrant n mod 4 picks +-sin r or +-cos r.

Measured against NumPy on 1e5 angles in [-1e3, 1e3]: within 2 ulp of 1
(tests/layers/test_rope.py). Gradients flow through r (n is an integer).
Other dtypes take `ops.sin` / `ops.cos` as they are, so float32 and mixed
precision keep the backends' own kernels.
"""

from __future__ import annotations

import math

import keras
from keras import ops

from mhsa_core._typing import Tensor

# pi / 2 = _PIO2_HI + _PIO2_LO: the high part has 33 significant bits.
_PIO2_HI = 1.57079632673412561417e00
_PIO2_LO = 6.07710050650619224932e-11
# Taylor coefficients in r^2: sin r = r * sum(S[i] r^2i), cos r = sum(C[i] r^2i).
_SIN = [(-1) ** i / math.factorial(2 * i + 1) for i in range(9)]
_COS = [(-1) ** i / math.factorial(2 * i) for i in range(10)]


def _horner(z: Tensor, coefficients: list[float]) -> Tensor:
    dtype = z.dtype
    out = ops.convert_to_tensor(coefficients[-1], dtype=dtype)
    for c in reversed(coefficients[:-1]):
        out = out * z + ops.convert_to_tensor(c, dtype=dtype)
    return out


def sin_cos(x: Tensor) -> tuple[Tensor, Tensor]:
    """(sin x, cos x) in the dtype of `x`; float64 exact on every backend."""
    if keras.backend.standardize_dtype(x.dtype) != "float64":
        return ops.sin(x), ops.cos(x)
    dtype = x.dtype

    def const(value: float) -> Tensor:
        # convert_to_tensor with the dtype: ops.cast of a Python float rounds
        # through float32 on TensorFlow (canary "cast-python-float").
        return ops.convert_to_tensor(value, dtype=dtype)

    half = ops.where(x >= 0, const(0.5), const(-0.5))
    n = ops.cast(x * const(2.0 / math.pi) + half, "int32")  # nearest, ties away
    nf = ops.cast(n, dtype)
    r = (x - nf * const(_PIO2_HI)) - nf * const(_PIO2_LO)  # |r| <= pi / 4
    z = r * r
    sin_r = r * _horner(z, _SIN)
    cos_r = _horner(z, _COS)
    quadrant = ops.mod(n, 4)  # floor mod: 0..3 for negative n too
    odd = ops.equal(ops.mod(quadrant, 2), 1)
    sin_x = ops.where(odd, cos_r, sin_r)
    cos_x = ops.where(odd, sin_r, cos_r)
    sin_x = ops.where(quadrant >= 2, -sin_x, sin_x)
    cos_x = ops.where(
        ops.logical_or(ops.equal(quadrant, 1), ops.equal(quadrant, 2)), -cos_x, cos_x
    )
    return sin_x, cos_x
