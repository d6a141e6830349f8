"""position_encoding="rope": 2-D axial rotary position embedding of q and k,
as EVA-02 (timm's `RotaryEmbeddingCat` and `apply_rot_embed_cat`).

Also the part every rotary encoding shares (`RotaryEncoding`): the settings,
the rotation of q and k, and where it runs (`PositionEncoding.rotate`, called
by the layer before the attention, so the full, chunked and fused paths all
take rotated q and k; the chunked path gets them before its loop).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import keras
import numpy as np
from keras import ops

from mhsa_core._typing import DType, Tensor
from mhsa_core.layers.position._grid import is_static
from mhsa_core.layers.position._trig import sin_cos
from mhsa_core.layers.position.base import PositionEncoding
from mhsa_core.layers.weights import WeightFactory
from mhsa_core.reference import schema


def rotate_channels(x: Tensor, layout: str) -> Tensor:
    """timm's `rot` ("interleaved": [-x1, x0, -x3, x2, ...]) or
    `rope_rotate_half` ("half": [-x_{d/2:}, x_{:d/2}]) of the last axis."""
    if layout == "half":
        first, second = ops.split(x, 2, axis=-1)
        return ops.concatenate([-second, first], axis=-1)
    shape = ops.shape(x)
    pairs = ops.reshape(x, (*shape[:-1], x.shape[-1] // 2, 2))
    even, odd = ops.split(pairs, 2, axis=-1)  # (..., kd / 2, 1) each
    return ops.reshape(ops.concatenate([-odd, even], axis=-1), shape)


def apply_rotation(x: Tensor, sin: Tensor, cos: Tensor, layout: str) -> Tensor:
    """x * cos + rotate_channels(x) * sin (timm's `apply_rot_embed_cat`).

    Args:
        x: (B, heads, N, kd).
        sin, cos: (N, kd) or (heads, N, kd), angle m at channels 2m and
            2m + 1 whatever the layout (timm's tables).
    """
    return x * cos + rotate_channels(x, layout) * sin


def _pairs(t: Tensor) -> Tensor:
    """(..., kd / 2) -> (..., kd): every entry twice (torch's repeat_interleave)."""
    return ops.repeat(t, 2, axis=-1)


class RotaryEncoding(PositionEncoding):
    """A rotation of every head's q and k by angles of the token's (y, x).

    Subclasses give the angles' sin and cos (`tables`). The rotation runs in
    the logits dtype: float32 under mixed precision (q and k are rounded to
    16 bits by the projections, then rotated in float32, as the logits are
    computed), else the compute dtype. The returned q and k are in that
    dtype, which every attention path takes as it is.

    Attributes:
        settings: the resolved `schema.RopeSettings`.
    """

    def __init__(self, settings: schema.RopeSettings) -> None:
        self.settings = settings

    @classmethod
    def from_arguments(cls, arguments: Mapping[str, Any]) -> RotaryEncoding:
        settings = schema.rope_settings(
            cls.spec.name,
            position_size=arguments.get("position_size"),
            **{
                name: arguments.get(name, default)
                for name, default in schema.ROPE_DEFAULTS.items()
            },
        )
        assert settings is not None  # a rotary spec always has settings
        return cls(settings)

    def build(self, weights: WeightFactory, channels: int, key_dim: int) -> None:
        self.key_dim = key_dim

    def tables(
        self,
        height: int | Tensor,
        width: int | Tensor,
        dtype: DType,
        span: tuple[int | Tensor, int | Tensor] | None = None,
    ) -> tuple[Tensor, Tensor]:
        """(sin, cos), (N, kd) or (heads, N, kd), in `dtype`. `span`: the
        query grid (Hq, Wq) that a key map of H x W cells spans (`rotate`),
        or None: the map is the query grid."""
        raise NotImplementedError

    def rotate(
        self,
        query: Tensor,
        key: Tensor,
        height: int | Tensor,
        width: int | Tensor,
        key_height: int | Tensor | None = None,
        key_width: int | Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        dtype = schema.logits_dtype(keras.backend.standardize_dtype(query.dtype))
        sin, cos = self.tables(height, width, dtype)
        key_sin, key_cos = sin, cos
        if key_height is not None and key_width is not None:
            key_sin, key_cos = self.tables(
                key_height, key_width, dtype, span=(height, width)
            )
        layout = self.settings.layout
        return (
            apply_rotation(ops.cast(query, dtype), sin, cos, layout),
            apply_rotation(ops.cast(key, dtype), key_sin, key_cos, layout),
        )


# ------------------------------------------------------------ "rope"
def _bands(key_dim: int, settings: schema.RopeSettings) -> list[float]:
    """The kd / 4 frequencies of an axis, Python floats (float64):
    temperature^(-k / (kd / 4)), or pi * 2^u with u evenly spaced on
    [0, log2(max_resolution) - 1] with `in_pixels` (timm's `freq_bands`,
    `pixel_freq_bands`)."""
    count = key_dim // 4
    if settings.in_pixels:
        top = math.log2(settings.max_resolution) - 1.0
        step = top / (count - 1) if count > 1 else 0.0
        return [math.pi * 2.0 ** (k * step) for k in range(count)]
    return [1.0 / settings.temperature ** (k / count) for k in range(count)]


def _grid_float64(
    size: int,
    reference: int | None,
    settings: schema.RopeSettings,
    span: int | None = None,
) -> np.ndarray:
    """Positions of the `size` cells of an axis, float64 NumPy (see `_grid`)."""
    index = np.arange(size, dtype=np.float64)
    if span is not None and span != size:
        index = index * span / size  # the key map's cells on the query axis
        size = span
    if settings.in_pixels:
        t = index * (2.0 / max(size - 1, 1)) - 1.0
    else:
        t = index + settings.grid_offset
    if reference is not None:
        t = t / size * reference
    return t


def _grid(
    size: int | Tensor,
    reference: int | None,
    settings: schema.RopeSettings,
    dtype: str,
    span: int | Tensor | None = None,
) -> Tensor:
    """Positions of the `size` cells of an axis: i + grid_offset, or
    linspace(-1, 1) with `in_pixels`; times reference / size when the grid is
    normalised against a reference size (EVA's `ref_feat_shape`). With
    `span` (a key map's axis): cell i at i * span / size of the query axis
    of `span` cells, then that axis's positions."""
    index = ops.arange(size, dtype="int32")
    t = ops.cast(index, dtype)
    # The size as a tensor computed from the index (see _grid.resize_table:
    # no cast of a symbolic size).
    n = ops.cast(ops.sum(ops.ones_like(index)), dtype)
    if span is not None:
        # (i * span) / size: exact for equal sizes (an integer times n, / n).
        n_span = ops.cast(
            ops.sum(ops.ones_like(ops.arange(span, dtype="int32"))), dtype
        )
        t, n = t * n_span / n, n_span
    if settings.in_pixels:
        one = ops.convert_to_tensor(1.0, dtype=dtype)
        t = t * (ops.convert_to_tensor(2.0, dtype=dtype) / ops.maximum(n - one, one))
        t = t - one
    else:
        t = t + ops.convert_to_tensor(settings.grid_offset, dtype=dtype)
    if reference is not None:
        t = t / n * ops.convert_to_tensor(float(reference), dtype=dtype)
    return t


def _first_second(settings: schema.RopeSettings, along_y: Any, along_x: Any) -> Any:
    """The axis of the first and of the second half of the angles: (y, x)
    for "ij", (x, y) for "xy"."""
    if settings.grid_indexing == "ij":
        return along_y, along_x
    return along_x, along_y


def rope_angles_float64(
    height: int,
    width: int,
    key_dim: int,
    settings: schema.RopeSettings,
    span: tuple[int, int] | None = None,
) -> np.ndarray:
    """The angles of a static size, (N, kd / 2) float64 NumPy, row-major."""
    bands = np.asarray(_bands(key_dim, settings))
    ref_h, ref_w = settings.reference_size or (None, None)
    span_h, span_w = span or (None, None)
    along_y = _grid_float64(height, ref_h, settings, span_h)[:, None] * bands
    along_x = _grid_float64(width, ref_w, settings, span_w)[:, None] * bands
    grid_y = np.broadcast_to(along_y[:, None], (height, width, bands.size))
    grid_x = np.broadcast_to(along_x[None, :], (height, width, bands.size))
    angles = np.concatenate(_first_second(settings, grid_y, grid_x), axis=-1)
    return angles.reshape(height * width, 2 * bands.size)


def rope_tables(
    height: int | Tensor,
    width: int | Tensor,
    key_dim: int,
    settings: schema.RopeSettings,
    dtype: str,
    span: tuple[int | Tensor, int | Tensor] | None = None,
) -> tuple[Tensor, Tensor]:
    """(sin, cos) of "rope", (N, kd), angle m at channels 2m and 2m + 1;
    `span`: the query grid a key map of H x W cells spans (`_grid`).

    A static size gets constants computed in float64 NumPy and rounded once
    to `dtype` (keras 3.15's `ops.sin` computes float64 in float32 on JAX); a
    size known only at run time (TensorFlow graphs) is computed with
    `keras.ops` in `dtype`, float64 exactly (`_trig.sin_cos`).
    """
    span_h, span_w = span or (None, None)
    static_span = span is None or (is_static(span_h) and is_static(span_w))
    if is_static(height) and is_static(width) and static_span:
        angles = rope_angles_float64(height, width, key_dim, settings, span)
        return (
            ops.convert_to_tensor(np.repeat(np.sin(angles), 2, axis=-1), dtype=dtype),
            ops.convert_to_tensor(np.repeat(np.cos(angles), 2, axis=-1), dtype=dtype),
        )
    bands = ops.convert_to_tensor(_bands(key_dim, settings), dtype=dtype)
    ref_h, ref_w = settings.reference_size or (None, None)
    along_y = ops.expand_dims(_grid(height, ref_h, settings, dtype, span_h), -1)
    along_x = ops.expand_dims(_grid(width, ref_w, settings, dtype, span_w), -1)
    along_y, along_x = along_y * bands, along_x * bands
    count = len(_bands(key_dim, settings))
    grid_y = ops.broadcast_to(ops.expand_dims(along_y, 1), (height, width, count))
    grid_x = ops.broadcast_to(ops.expand_dims(along_x, 0), (height, width, count))
    angles = ops.concatenate(_first_second(settings, grid_y, grid_x), axis=-1)
    sin, cos = sin_cos(ops.reshape(angles, (height * width, 2 * count)))
    return _pairs(sin), _pairs(cos)


class RopePosition(RotaryEncoding):
    """q, k <- rotated by [t_y w, t_x w] ("ij") per token, w_k =
    temperature^(-k / (kd / 4)): EVA-02's axial RoPE. No weights; with
    `position_size` the grid is t = i * ref / size (a new resolution spans
    the grid of the reference one)."""

    spec = schema.ENCODINGS["rope"]

    def tables(
        self,
        height: int | Tensor,
        width: int | Tensor,
        dtype: DType,
        span: tuple[int | Tensor, int | Tensor] | None = None,
    ) -> tuple[Tensor, Tensor]:
        return rope_tables(
            height,
            width,
            self.key_dim,
            self.settings,
            keras.backend.standardize_dtype(dtype),
            span,
        )
