"""position_encoding="relative_bias": Swin's learned per-head relative
position bias."""

from __future__ import annotations

import keras
from keras import ops

from mhsa_core._typing import DType, Tensor
from mhsa_core.layers.position._bias_resize import resize_bias_table
from mhsa_core.layers.position._grid import gather
from mhsa_core.layers.position.base import PositionEncoding
from mhsa_core.layers.weights import WeightFactory
from mhsa_core.reference import schema


def bias_rows(table: Tensor, rows: Tensor) -> Tensor:
    """The bias of a set of queries against every key, (..., c, N).

    Args:
        table: (..., 2H - 1, 2W - 1), entry [H - 1 + dy, W - 1 + dx] the bias
            of a key dy rows above and dx columns left of its query (query
            minus key, Swin's convention); leading axes (heads) kept.
        rows: (c,) int32, the queries' token indices (row-major, N = H * W).

    One gather with the offset index of each (query, key): never an (N, N)
    tensor per head unless `rows` is every token.
    """
    shape = ops.shape(table)
    height, width = (shape[-2] + 1) // 2, (shape[-1] + 1) // 2
    keys = ops.arange(height * width, dtype="int32")
    dy = ops.expand_dims(rows // width, 1) - ops.expand_dims(keys // width, 0)
    dx = ops.expand_dims(rows % width, 1) - ops.expand_dims(keys % width, 0)
    index = (dy + height - 1) * (2 * width - 1) + (dx + width - 1)  # (c, N)
    flat = ops.reshape(table, (*shape[:-2], shape[-2] * shape[-1]))
    return gather(flat, index, axis=-1)


class RelativeBias(PositionEncoding):
    """A table B (2Hr - 1, 2Wr - 1, heads): logits(i, j) of head h +=
    B[y_i - y_j + H - 1, x_i - x_j + W - 1, h], resized at another size by
    timm's rule for Swin's tables (`_bias_resize`). With windows (H, W) is
    the window, and (Hr, Wr) defaults to it.

    timm's `relative_position_bias_table` ((2Wh-1)(2Ww-1), heads) is this
    table reshaped to (2Wh - 1, 2Ww - 1, heads).
    """

    spec = schema.ENCODINGS["relative_bias"]
    bias_term = True
    row_tables_per_head = True

    def build(self, weights: WeightFactory, channels: int, key_dim: int) -> None:
        ((name, shape),) = schema.table_shapes(
            self.name, weights.position_size, key_dim, weights.num_heads
        ).items()
        self.table = weights.table(
            name, shape, stddev=schema.table_stddev(key_dim, self.name)
        )

    def heads_table(
        self, height: int | Tensor, width: int | Tensor, dtype: DType
    ) -> Tensor:
        """(heads, 2H - 1, 2W - 1): the table cast to `dtype`, resized to this
        size, heads first."""
        table = ops.cast(self.table, keras.backend.standardize_dtype(dtype))
        table = resize_bias_table(table, 2 * height - 1, 2 * width - 1)
        return ops.transpose(table, (2, 0, 1))

    def logits_bias(
        self, q: Tensor, height: int | Tensor, width: int | Tensor
    ) -> Tensor:
        table = self.heads_table(height, width, q.dtype)
        rows = ops.arange(height * width, dtype="int32")
        return ops.expand_dims(bias_rows(table, rows), 0)  # (1, heads, N, N)

    def row_tables(
        self, height: int | Tensor, width: int | Tensor, dtype: DType
    ) -> tuple[Tensor]:
        return (self.heads_table(height, width, dtype),)

    @staticmethod
    def row_bias(q_rows: Tensor, rows: Tensor, tables: tuple[Tensor, ...]) -> Tensor:
        return bias_rows(tables[0], rows)
