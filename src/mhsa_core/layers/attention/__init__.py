"""The attention arithmetic of `MultiHeadSelfAttention2D`, on three paths.

- full (`full.py`): logits, softmax and probs @ values over the whole
  (B, heads, N, N); the only path that can return the scores or drop
  probabilities out.
- chunked (`chunked.py`): queries in chunks, each under `keras.remat`:
  O(c * N) memory forward and backward; exact like the full path.
- fused (`fused.py`): the backend's own kernel (`ops.dot_product_attention`;
  SDPA on torch), where it is exact enough.

`attend` is the one entry point; `choice.py` holds the rule that picks a path.
A rotary encoding's q and k arrive already rotated (the layer calls
`PositionEncoding.rotate` before `attend`): every path takes them as they are,
and the chunked path's loop never recomputes the rotation.
Windows (`windows.py`, Swin) come before it: the layer hands `attend` the
windows as batch items, with their masks and shift regions.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from keras import ops

from mhsa_core._typing import Tensor
from mhsa_core.layers.attention import choice
from mhsa_core.layers.attention.chunked import chunked_attention
from mhsa_core.layers.attention.full import dot_product_attention, logits_dtype
from mhsa_core.layers.attention.fused import fused_attention
from mhsa_core.reference import schema

if TYPE_CHECKING:
    from mhsa_core.layers.position.base import PositionEncoding

IMPLEMENTATIONS = choice.IMPLEMENTATIONS


def attend(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    *,
    scale: float,
    position: PositionEncoding,
    position_scale: float,
    height: int | Tensor,
    width: int | Tensor,
    key_mask: Tensor | None = None,
    dropout: float = 0.0,
    training: bool | None = False,
    seed_generator: Any = None,
    return_attention_scores: bool = False,
    implementation: str = "auto",
    chunk_size: int | Tensor | None = None,
    regions: Tensor | None = None,
    key_count: int | Tensor | None = None,
) -> tuple[Tensor, Tensor | None]:
    """Softmax attention of every query over the keys, per head, by one path.

    Args:
        query: (B, heads, N, kd); key: (B, heads, Nk, kd); value: (B, heads,
            Nk, dv). Nk = N (self-attention) or the token count of another
            key map (a context, a reduced map): every path chunks or fuses
            the N queries over all Nk keys. N may be more than height * width
            (prefix tokens first: then the position has no logits term).
        scale: Python float, the factor of q.k.
        position: the layer's `PositionEncoding` (its logits term, if any).
        position_scale: Python float, the factor of the position term
            (`scale` or 1.0).
        height, width: the query map's size (ints, or scalar tensors when
            dynamic); only the position terms read them (a "logits" term
            needs the key grid to be the query grid).
        key_mask: optional bool (B, Nk), True = may be attended to.
        dropout, training, seed_generator: attention dropout (full path).
        return_attention_scores: whether to return the probabilities.
        implementation: "auto", "full", "chunked" or "fused" (the layer's
            `attention_implementation`); `choice.resolve` says which path runs.
        chunk_size: queries per chunk of the chunked path, None for the
            default (`choice.default_chunk_size`).
        regions: optional int (B, N): Swin's shift region of each token (the
            batch axis holds windows); logits between tokens of two regions
            get `schema.SHIFT_MASK_LOGIT` (-100), on every path.
        key_count: Nk when the keys are another map's (its tokens, an int or
            a scalar tensor), None: N (self-attention).

    Returns:
        `(outputs, scores)`: outputs (B, heads, N, dv) in the dtype of
        `value`; scores (B, heads, N, Nk) from the full path, else None.
    """
    softmax_dtype = logits_dtype(query.dtype)
    # The token count from the tensors: height and width feed the position
    # terms only (with prefix tokens N = T + H * W).
    n = ops.shape(query)[2]
    path = choice.resolve(
        implementation,
        n=n,
        key_count=key_count,
        dtype=softmax_dtype,
        query_dim=query.shape[-1],
        value_dim=value.shape[-1],
        position=position,
        scores=return_attention_scores,
        dropout=bool(training) and dropout > 0.0,
        bias=position.bias_term or regions is not None,
    )

    def position_bias() -> Tensor | None:
        """The position term of the logits (times its scale), (B or 1,
        heads, N, N), or None."""
        bias = position.logits_bias(ops.cast(query, softmax_dtype), height, width)
        if bias is not None and position_scale != 1.0:
            bias = bias * ops.convert_to_tensor(position_scale, dtype=softmax_dtype)
        return bias

    def shift_mask() -> Tensor | None:  # (B, 1, N, N)
        return None if regions is None else _shift_mask(regions, softmax_dtype)

    def full() -> tuple[Tensor, Tensor]:
        return dot_product_attention(
            query,
            key,
            value,
            scale=scale,
            logits_bias=position_bias(),
            logits_mask=shift_mask(),
            key_mask=key_mask,
            dropout=dropout,
            training=training,
            seed_generator=seed_generator,
        )

    if path == choice.FULL:
        return full()
    if path == choice.FUSED:
        # A term of no query ("relative_bias") and the shift mask: the
        # kernel's one additive bias (a term folded into the keys is not).
        bias = position_bias() if position.bias_term else None
        mask = shift_mask()
        if mask is not None:
            bias = mask if bias is None else bias + mask
        return fused_attention(
            query,
            _keys_with_term(key, position, position_scale / scale, height, width),
            value,
            scale=scale,
            key_mask=key_mask,
            bias=bias,
        ), None

    def chunked() -> Tensor:
        q = ops.cast(query, softmax_dtype)
        k = _keys_with_term(
            ops.cast(key, softmax_dtype),
            position,
            position_scale / scale,
            height,
            width,
        )
        tables: tuple[Tensor, ...] = ()
        head_tables: tuple[Tensor, ...] = ()
        row_bias = None
        if not position.folds_into_keys:
            tables = position.row_tables(height, width, softmax_dtype)
            if tables:
                factor = ops.convert_to_tensor(position_scale, dtype=softmax_dtype)
                tables, row_bias = tuple(t * factor for t in tables), position.row_bias
        if position.row_tables_per_head:
            # (heads, ...) -> (B * heads, ...), batch major like the chunks.
            batch = ops.shape(query)[0]
            head_tables = tuple(_per_item(t, batch) for t in tables)
            tables = ()
        size = (
            chunk_size
            if chunk_size is not None
            else choice.default_chunk_size(n if key_count is None else key_count)
        )
        return chunked_attention(
            q,
            k,
            value,
            chunk_size=size,
            key_scale=ops.convert_to_tensor(scale, dtype=softmax_dtype),
            key_mask=key_mask,
            row_bias=row_bias,
            tables=tables,
            per_head=choice.chunk_per_head(),
            head_tables=head_tables,
            regions=regions,
            region_logit=(
                None
                if regions is None
                else ops.convert_to_tensor(schema.SHIFT_MASK_LOGIT, dtype=softmax_dtype)
            ),
        )

    if path == choice.CHUNKED:
        return chunked(), None
    # choice.BY_SIZE: N is only known at run time (a TensorFlow graph with
    # dynamic H, W): the full path for small maps, chunked above.
    out = ops.cond(choice.full_fits(n, key_count), lambda: full()[0], chunked)
    return out, None


def _shift_mask(regions: Tensor, dtype: str) -> Tensor:
    """(B, N) region labels -> (B, 1, N, N): 0 within a region, the
    shift-mask logit (-100) across two."""
    same = ops.equal(ops.expand_dims(regions, 2), ops.expand_dims(regions, 1))
    mask = ops.where(
        same,
        ops.zeros((), dtype=dtype),
        ops.convert_to_tensor(schema.SHIFT_MASK_LOGIT, dtype=dtype),
    )
    return ops.expand_dims(mask, 1)


def _per_item(table: Tensor, batch: int | Tensor) -> Tensor:
    """(heads, ...) -> (batch * heads, ...): the per-head table of every
    (batch item, head) pair, batch major."""
    tiled = ops.repeat(ops.expand_dims(table, 0), batch, axis=0)
    shape = ops.shape(table)
    return ops.reshape(tiled, (batch * shape[0], *shape[1:]))


def _keys_with_term(
    key: Tensor,
    position: PositionEncoding,
    factor: float,
    height: int | Tensor,
    width: int | Tensor,
) -> Tensor:
    """k + factor * e_j when the position term is q_i . e_j (`key_term`), so
    that scale * q.k' = scale * q.k + position_scale * q.e."""
    term = position.key_term(height, width, key.dtype)
    if term is None:
        return key
    if factor != 1.0:
        term = term * ops.convert_to_tensor(factor, dtype=key.dtype)
    return key + ops.cast(term, key.dtype)


__all__ = ["IMPLEMENTATIONS", "attend", "dot_product_attention", "logits_dtype"]
