"""position_encoding="sinusoidal": a fixed 2-D sine-cosine embedding of (y, x)."""

from __future__ import annotations

import numpy as np
from keras import ops

from mhsa_core._typing import DType, Tensor
from mhsa_core.layers.position._grid import is_static
from mhsa_core.layers.position.base import PositionEncoding
from mhsa_core.layers.weights import WeightFactory
from mhsa_core.reference import schema


def _frequencies(channels: int) -> list[float]:
    """w_k = 10000^(-k / D), k < D = C / 4, as Python floats (as the reference)."""
    d = channels // 4
    return [10000.0 ** (-k / d) for k in range(d)]


def _sinusoidal_float64(height: int, width: int, channels: int) -> np.ndarray:
    """The embedding of a static size, in float64 NumPy.

    Not cached: torch.compile (dynamo) warns on every lru_cache it traces
    through, and the cost (4 sin/cos per token and frequency) is small next
    to the attention itself.
    """
    omega = np.asarray(_frequencies(channels))
    rows, cols = np.divmod(np.arange(height * width), width)  # (y, x) per token
    angle_y, angle_x = rows[:, None] * omega, cols[:, None] * omega  # (N, D)
    return np.concatenate(
        [np.sin(angle_y), np.cos(angle_y), np.sin(angle_x), np.cos(angle_x)], axis=-1
    )


def sinusoidal_embedding(
    height: int | Tensor, width: int | Tensor, channels: int, dtype: DType
) -> Tensor:
    """The fixed 2-D sine-cosine embedding, (N, C), row-major over (H, W).

    With D = C / 4 and w_k = 10000^(-k / D), token (y, x) gets
    [sin(y w), cos(y w), sin(x w), cos(x w)]. C must be divisible by 4 (the
    layer checks it at build).

    A static size (every backend except TensorFlow graphs with unknown H or W)
    gets a constant computed in float64 NumPy and rounded once to `dtype`:
    keras 3.15's `ops.sin`/`ops.cos` compute float64 in float32 on JAX
    (canary "sin-cos-float64" in tests/canaries). A
    dynamic size is computed with `keras.ops` in `dtype`.
    """
    if is_static(height) and is_static(width):
        return ops.convert_to_tensor(
            _sinusoidal_float64(height, width, channels), dtype=dtype
        )
    omega = ops.convert_to_tensor(_frequencies(channels), dtype=dtype)
    n = height * width
    index = ops.arange(n, dtype="int32")
    rows = ops.cast(index // width, dtype)  # y of every token
    cols = ops.cast(index % width, dtype)  # x of every token
    angle_y = ops.expand_dims(rows, -1) * omega  # (N, D)
    angle_x = ops.expand_dims(cols, -1) * omega  # (N, D)
    return ops.concatenate(
        [ops.sin(angle_y), ops.cos(angle_y), ops.sin(angle_x), ops.cos(angle_x)],
        axis=-1,
    )


class SinusoidalPosition(PositionEncoding):
    """tokens += P(y, x): [sin(y w), cos(y w), sin(x w), cos(x w)], w_k =
    10000^(-k / D), D = C / 4. No weights: every size is its own embedding."""

    spec = schema.ENCODINGS["sinusoidal"]

    def build(self, weights: WeightFactory, channels: int, key_dim: int) -> None:
        # The embedding is computed in the variable dtype (float32 under mixed
        # precision) and rounded once to the compute dtype.
        self.embedding_dtype = weights.variable_dtype

    def tokens(
        self, tokens: Tensor, height: int | Tensor, width: int | Tensor
    ) -> Tensor:
        embedding = sinusoidal_embedding(
            height, width, tokens.shape[-1], self.embedding_dtype
        )  # (N, C)
        return tokens + ops.cast(embedding, tokens.dtype)
