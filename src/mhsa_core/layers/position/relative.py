"""position_encoding="relative": BoTNet's 2-D relative position logits."""

from __future__ import annotations

from keras import ops

from mhsa_core._typing import DType, Tensor
from mhsa_core.layers.position._grid import combine, offsets, split_rows
from mhsa_core.layers.position.tables import LearnedTables
from mhsa_core.reference import schema


def relative_logits(
    q: Tensor,
    rel_h: Tensor,
    rel_w: Tensor,
    height: int | Tensor,
    width: int | Tensor,
) -> Tensor:
    """[i, j] = q_i . (R_h[y_j - y_i + H - 1] + R_w[x_j - x_i + W - 1]).

    Args:
        q: (B, heads, N, d) queries, N = height * width.
        rel_h: (2H - 1, d), row H - 1 + k for a key k rows below the query
            (the table already resized to this size).
        rel_w: (2W - 1, d), likewise for columns.

    Returns:
        (B, heads, N, N). Gathering with the (size, size) offset index is the
        whole relative-to-absolute step (no pad/reshape trick).
    """
    q5 = split_rows(q, height, width)
    rel_h = ops.take(rel_h, offsets(height), axis=0)  # (H_q, H_k, d)
    rel_w = ops.take(rel_w, offsets(width), axis=0)  # (W_q, W_k, d)
    along_h = ops.einsum("bnyxd,ykd->bnyxk", q5, rel_h)  # (B, heads, H, W, H_k)
    along_w = ops.einsum("bnyxd,xkd->bnyxk", q5, rel_w)  # (B, heads, H, W, W_k)
    return combine(along_h, along_w, height, width)


def relative_row_logits(
    q_rows: Tensor, rows: Tensor, rel_h: Tensor, rel_w: Tensor
) -> Tensor:
    """`relative_logits` for a chunk of queries, (..., c, N).

    Args:
        q_rows: (..., c, d) queries; rows: (c,) int32 their token indices.
        rel_h: (2H - 1, d), rel_w: (2W - 1, d), resized to this size.

    Each query's logits against every table row (a matmul, (..., c, 2H - 1)),
    then the H entries of its own offsets gathered: row H - 1 + y_j - y_i.
    Never an (N, N) tensor.
    """
    height = (ops.shape(rel_h)[0] + 1) // 2
    width = (ops.shape(rel_w)[0] + 1) // 2
    c = ops.shape(q_rows)[-2]
    y, x = rows // width, rows % width  # (c,)

    def along(table: Tensor, size: Tensor, own: Tensor) -> Tensor:  # (..., c, size)
        # einsum, not matmul: keras 3.15's torch matmul computes float64 in
        # float32 (canary "matmul-float64").
        per_row = ops.einsum("...cd,kd->...ck", q_rows, table)  # (..., c, 2 size - 1)
        span = 2 * size - 1
        index = (
            ops.expand_dims(ops.arange(size, dtype="int32"), 0)
            - ops.expand_dims(own, 1)
            + (size - 1)
        )  # (c, size)
        # Query i's entries sit at i * span + index in the flattened last two
        # axes: one gather along one axis, whatever the leading axes.
        flat = ops.reshape(per_row, (*ops.shape(per_row)[:-2], c * span))
        index = index + ops.expand_dims(ops.arange(c, dtype="int32") * span, 1)
        return ops.take(flat, index, axis=-1)

    term = ops.expand_dims(along(rel_h, height, y), -1) + ops.expand_dims(
        along(rel_w, width, x), -2
    )  # (..., c, H, W)
    return ops.reshape(term, (*ops.shape(term)[:-3], c, height * width))


class RelativePosition(LearnedTables):
    """Tables R_h (2Hr - 1, kd) and R_w (2Wr - 1, kd), shared across heads;
    row Hr - 1 + d holds a key d rows below the query."""

    spec = schema.ENCODINGS["relative"]

    def logits_bias(
        self, q: Tensor, height: int | Tensor, width: int | Tensor
    ) -> Tensor:
        return relative_logits(
            q, *self.resized_tables(height, width, q.dtype), height, width
        )

    def row_tables(
        self, height: int | Tensor, width: int | Tensor, dtype: DType
    ) -> tuple[Tensor, Tensor]:
        return self.resized_tables(height, width, dtype)

    @staticmethod
    def row_bias(q_rows: Tensor, rows: Tensor, tables: tuple[Tensor, ...]) -> Tensor:
        return relative_row_logits(q_rows, rows, *tables)
