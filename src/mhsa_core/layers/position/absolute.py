"""position_encoding="absolute": learned factorized embeddings of the key's row and
column."""

from __future__ import annotations

from keras import ops

from mhsa_core._typing import DType, Tensor
from mhsa_core.layers.position._grid import combine, split_rows
from mhsa_core.layers.position.tables import LearnedTables
from mhsa_core.reference import schema


def absolute_logits(
    q: Tensor,
    emb_h: Tensor,
    emb_w: Tensor,
    height: int | Tensor,
    width: int | Tensor,
) -> Tensor:
    """[i, j] = q_i . (E_h[y_j] + E_w[x_j]).

    Args:
        q: (B, heads, N, d) queries, N = height * width.
        emb_h: (H, d), emb_w: (W, d): the tables resized to this size.

    Returns:
        (B, heads, N, N).
    """
    q5 = split_rows(q, height, width)
    along_h = ops.einsum("bnyxd,kd->bnyxk", q5, emb_h)  # (B, heads, H, W, H_k)
    along_w = ops.einsum("bnyxd,kd->bnyxk", q5, emb_w)  # (B, heads, H, W, W_k)
    return combine(along_h, along_w, height, width)


class AbsolutePosition(LearnedTables):
    """Tables E_h (Hr, kd) and E_w (Wr, kd), shared across heads."""

    spec = schema.ENCODINGS["absolute"]
    folds_into_keys = True

    def logits_bias(
        self, q: Tensor, height: int | Tensor, width: int | Tensor
    ) -> Tensor:
        return absolute_logits(
            q, *self.resized_tables(height, width, q.dtype), height, width
        )

    def key_term(
        self, height: int | Tensor, width: int | Tensor, dtype: DType
    ) -> Tensor:
        # e_j = E_h[y_j] + E_w[x_j], (N, kd) row-major over (H, W).
        emb_h, emb_w = self.resized_tables(height, width, dtype)
        grid = ops.expand_dims(emb_h, 1) + ops.expand_dims(emb_w, 0)  # (H, W, kd)
        return ops.reshape(grid, (height * width, emb_h.shape[-1]))
