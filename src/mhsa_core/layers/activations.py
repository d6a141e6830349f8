"""Float64-exact stand-ins for Keras activations that lose precision in float64.

Keras 3.15 computes two activations of float64 inputs less exactly than
float64 allows (docs/keras-quirks.md): `gelu` on TensorFlow goes through
`tf.math.erfc`, off by up to 5e-9 there, and `ops.tanh` on JAX returns
float32 (canaries "gelu-float64", "tanh-float64" in tests/canaries). Under
a float64 compute dtype the layer uses the formulas below,
built from ops that stay exact in float64 on every backend (erf, expm1). In
other dtypes it uses the Keras activation as it is: its float32 result is
within float32 round-off, and `.keras` files keep their exact output bits.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import keras
from keras import ops

from mhsa_core._typing import DType, Tensor


def _gelu_erf(x: Tensor) -> Tensor:
    """Exact GELU, 0.5 * x * (1 + erf(x / sqrt(2))), as keras's
    gelu(approximate=False)."""
    inv_sqrt2 = ops.convert_to_tensor(1.0 / math.sqrt(2.0), dtype=x.dtype)
    return 0.5 * x * (1.0 + ops.erf(x * inv_sqrt2))


def _tanh_expm1(x: Tensor) -> Tensor:
    """tanh(x) = sign(x) * -expm1(-2|x|) / (2 + expm1(-2|x|)): no cancellation
    near 0."""
    e = ops.expm1(-2.0 * ops.abs(x))
    return ops.sign(x) * (-e / (2.0 + e))


_FLOAT64_EXACT = {
    keras.activations.gelu: _gelu_erf,
    keras.activations.tanh: _tanh_expm1,
}


def for_dtype(
    activation: Callable[[Tensor], Tensor] | None, dtype: DType
) -> Callable[[Tensor], Tensor] | None:
    """`activation`, or its float64-exact stand-in when `dtype` is float64."""
    if dtype == "float64":
        return _FLOAT64_EXACT.get(activation, activation)
    return activation
