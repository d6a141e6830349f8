"""position_encoding="rope_mixed": 2-D rotary embedding of q and k with learned
per-head frequencies (RoPE-Mixed, Heo et al. 2024; timm's
`RotaryEmbeddingMixed`, `init_random_2d_freqs`, `get_mixed_freqs`)."""

from __future__ import annotations

import math
from typing import Any

import keras
import numpy as np
from keras import ops

from mhsa_core._typing import DType, Tensor
from mhsa_core.layers.position._trig import sin_cos
from mhsa_core.layers.position.rope import RotaryEncoding, _pairs
from mhsa_core.layers.weights import WeightFactory
from mhsa_core.reference import schema


class MixedFrequencies(keras.initializers.Initializer):
    """timm's `init_random_2d_freqs` for one layer, shape (2, heads, kd / 2).

    Per head a random angle a (uniform in [0, 2 pi), Keras's seeded RNG) and
    the magnitudes m_k = temperature^(-4k / kd), k < kd / 4:
    F[0, h] = [m cos(a), m cos(a + pi / 2)], F[1, h] = [m sin(a), m sin(a + pi / 2)].

    Args:
        temperature: base of the magnitudes (RoPE-Mixed: 10).
        seed: the seed of the angles (None: drawn once, when made, as
            Keras's initializers).
    """

    def __init__(self, temperature: float = 10.0, seed: int | None = None) -> None:
        self.temperature = float(temperature)
        self.seed = seed
        self._angles = keras.initializers.RandomUniform(0.0, 2 * math.pi, seed=seed)

    def __call__(self, shape: Any, dtype: Any = None) -> Tensor:
        _, heads, pairs = shape
        dtype = keras.backend.standardize_dtype(dtype or keras.config.floatx())
        key_dim = 2 * pairs
        magnitude = ops.convert_to_tensor(
            1.0 / self.temperature ** (np.arange(0, key_dim, 4) / key_dim), dtype=dtype
        )  # (kd / 4,)
        angle = self._angles((heads, 1), dtype=dtype)
        quarter = ops.convert_to_tensor(math.pi / 2, dtype=dtype)
        fx = ops.concatenate(
            [magnitude * ops.cos(angle), magnitude * ops.cos(angle + quarter)], -1
        )
        fy = ops.concatenate(
            [magnitude * ops.sin(angle), magnitude * ops.sin(angle + quarter)], -1
        )
        return ops.cast(ops.stack([fx, fy]), dtype)

    def get_config(self) -> dict[str, Any]:
        return {"temperature": self.temperature, "seed": self.seed}


class MixedRopePosition(RotaryEncoding):
    """q, k of head h <- rotated by t_x F[0, h] + t_y F[1, h] per token, pair
    by pair: the learned frequencies F (2, heads, kd / 2) mix both axes.
    (t_x, t_y) = (x, y) with "xy" (the default, rope-vit's), (y, x) with
    "ij". No reference size: the grid is the integer one at every size."""

    spec = schema.ENCODINGS["rope_mixed"]

    def build(self, weights: WeightFactory, channels: int, key_dim: int) -> None:
        super().build(weights, channels, key_dim)
        name = self.spec.frequencies
        assert name is not None
        self.frequencies = weights.position_weight(
            name,
            (2, weights.num_heads, key_dim // 2),
            MixedFrequencies(self.settings.temperature),
        )

    def tables(
        self,
        height: int | Tensor,
        width: int | Tensor,
        dtype: DType,
        span: tuple[int | Tensor, int | Tensor] | None = None,
    ) -> tuple[Tensor, Tensor]:
        index = ops.arange(height * width, dtype="int32")
        y = ops.reshape(ops.cast(index // width, dtype), (1, -1, 1))  # (1, N, 1)
        x = ops.reshape(ops.cast(index % width, dtype), (1, -1, 1))
        if span is not None:
            # A key map's cell (y, x) at (y * Hq / H, x * Wq / W) of the
            # query grid (exact for equal sizes).
            y = _spread(y, height, span[0], dtype)
            x = _spread(x, width, span[1], dtype)
        t_x, t_y = (x, y) if self.settings.grid_indexing == "xy" else (y, x)
        f = ops.cast(self.frequencies, dtype)
        fx = ops.expand_dims(f[0], 1)  # (heads, 1, kd / 2)
        fy = ops.expand_dims(f[1], 1)
        sin, cos = sin_cos(t_x * fx + t_y * fy)  # (heads, N, kd / 2)
        return _pairs(sin), _pairs(cos)


def _spread(t: Tensor, size: int | Tensor, span: int | Tensor, dtype: DType) -> Tensor:
    """Integer positions t of an axis of `size` cells times span / size."""
    if isinstance(size, int) and isinstance(span, int):
        if size == span:
            return t
        return t * ops.convert_to_tensor(float(span), dtype) / float(size)
    # Sizes as tensors of sums of ones (no cast of a symbolic size).
    n = ops.cast(ops.sum(ops.ones_like(ops.arange(size, dtype="int32"))), dtype)
    m = ops.cast(ops.sum(ops.ones_like(ops.arange(span, dtype="int32"))), dtype)
    return t * m / n
