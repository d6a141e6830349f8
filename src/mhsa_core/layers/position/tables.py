"""Learned per-axis position tables: the shared part of "relative" and "absolute"."""

from __future__ import annotations

import keras
from keras import ops

from mhsa_core._typing import DType, Tensor
from mhsa_core.layers.position._grid import resize_table
from mhsa_core.layers.position.base import PositionEncoding
from mhsa_core.layers.weights import WeightFactory
from mhsa_core.reference import schema


class LearnedTables(PositionEncoding):
    """An encoding with a (rows(Hr), kd) height table and a (rows(Wr), kd)
    width table, learned for the reference size (Hr, Wr) (the layer's
    `position_size`) and linearly resized (`resize_table`) to rows(H), rows(W)
    at any other size.

    The tables are float32 under mixed precision (`WeightFactory.table`), like
    the logits they feed.
    """

    def build(self, weights: WeightFactory, channels: int, key_dim: int) -> None:
        shapes = schema.table_shapes(self.name, weights.position_size, key_dim)
        self.height_table, self.width_table = (
            weights.table(name, shape) for name, shape in shapes.items()
        )

    def resized_tables(
        self, height: int | Tensor, width: int | Tensor, dtype: DType
    ) -> tuple[Tensor, Tensor]:
        """(table_h, table_w) cast to `dtype` and resized to rows(H), rows(W)."""
        rows = self.spec.table_rows
        dtype = keras.backend.standardize_dtype(dtype)
        return (
            resize_table(ops.cast(self.height_table, dtype), rows(height)),
            resize_table(ops.cast(self.width_table, dtype), rows(width)),
        )
