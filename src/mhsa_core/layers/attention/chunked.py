"""The chunked path: queries in chunks, O(c * N) memory forward and backward.

Per head (an `ops.map` over batch x heads) and per chunk of c queries (an
inner `ops.map` over the padded chunk count ceil(N / c)), one (c, N) tile of
logits, softmax and probs @ values. Each chunk's body runs under
`keras.remat`, so the backward pass keeps only the chunks' inputs and
recomputes their probabilities, instead of keeping every (c, N) tile.

A tile that fits in the cache is also what makes this path fast on CPU: the
full path streams the (B, heads, N, N) logits through memory several times
(exp at ~0.7 G elements/s on XLA CPU against ~5 G/s on cache-sized arrays).

Each row's softmax is the full path's (same logits, same max-subtracted
softmax over all N keys), so the two agree to float32 round-off, and float64
stays float64 (einsum everywhere: keras 3.15's torch matmul computes float64
in float32; canary "matmul-float64" in tests/canaries).

Traps this code steps around (all verified): TensorFlow's `recompute_grad`
rejects None and bool arguments and differentiates only its arguments (the
mask travels as a float, every tensor the chunk needs is an argument);
torch.compile with checkpointing crashes on closed-over Python floats and
symbolic sizes (the scale is folded into the keys and tables before the
loop; sizes are read off the arguments' shapes); `ops.fori_loop` with
`slice_update` has no TensorFlow gradient (`ops.map` does).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import TypeAlias

import keras
from keras import ops

from mhsa_core._typing import Tensor
from mhsa_core.layers.attention.full import MASKED_LOGIT

# `PositionEncoding.row_bias`: (q_rows, rows, tables) -> the chunk's term.
RowBias: TypeAlias = Callable[[Tensor, Tensor, tuple[Tensor, ...]], Tensor]


def _chunk_body(
    with_mask: bool,
    row_bias: RowBias | None,
    with_regions: bool = False,
    head_tables: int = 0,
) -> Callable[..., Tensor]:
    """The remat'd function of one chunk of one head.

    Its arguments (all tensors): q (c, d), rows (c,) int32, k (N, d) already
    times the scale, v (N, dv), [keep (N,) 1./0. and penalty (N,) 0./-1e9,
    floats], [regions (N,) float labels], `head_tables` per-head tables
    (this head's), [the shift-mask logit, a scalar, with regions], *tables.
    With several heads at once every per-(batch, head) argument has a
    leading (B * heads) axis.
    """

    def body(q: Tensor, rows: Tensor, k: Tensor, v: Tensor, *rest: Tensor) -> Tensor:
        logits = ops.einsum("...cd,...nd->...cn", q, k)  # (..., c, N)
        keep = penalty = labels = region_logit = None
        if with_mask:
            (keep, penalty), rest = rest[:2], rest[2:]
        if with_regions:
            labels, rest = rest[0], rest[1:]
        heads_part, rest = rest[:head_tables], rest[head_tables:]
        if with_regions:
            region_logit, rest = rest[0], rest[1:]
        if row_bias is not None:
            logits = logits + row_bias(q, rows, (*heads_part, *rest))
        if labels is not None and region_logit is not None:
            # Swin's shift mask: the logit of a key of another region than
            # the query's gets the (finite) shift-mask logit added, as the
            # full path does. Labels and logit are arguments: no Python
            # number inside the checkpointed function (torch.compile).
            own = ops.expand_dims(ops.take(labels, rows, axis=-1), -1)  # (..., c, 1)
            other = ops.not_equal(own, ops.expand_dims(labels, -2))  # (..., c, N)
            logits = logits + ops.cast(other, logits.dtype) * region_logit
        if keep is not None:
            # Masked keys: logit - 1e9 (the full path sets them to -1e9; both
            # give exp(...) == 0 exactly, and unmasked logits are untouched:
            # + 0). The penalty is an argument: any Python float inside the
            # checkpointed function crashes torch.compile.
            logits = logits + penalty
        probs = ops.softmax(logits, axis=-1)
        if keep is not None:
            # Masked keys are already exactly 0; a query whose keys are all
            # masked was a finite softmax: zero it, as the full path does.
            probs = probs * keep
        return ops.einsum(
            "...cn,...nd->...cd", ops.cast(probs, v.dtype), v
        )  # (..., c, dv)

    return keras.remat(body)


def chunked_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    *,
    chunk_size: int | Tensor,
    key_scale: Tensor,
    key_mask: Tensor | None = None,
    row_bias: RowBias | None = None,
    tables: Sequence[Tensor] = (),
    per_head: bool = True,
    head_tables: Sequence[Tensor] = (),
    regions: Tensor | None = None,
    region_logit: Tensor | None = None,
) -> Tensor:
    """Softmax attention, queries in chunks of `chunk_size`.

    Args:
        query: (B, heads, N, kd), in the logits dtype.
        key: (B, heads, Nk, kd), in the logits dtype, with any key term
            folded in (Nk = N but for keys of another map).
        value: (B, heads, Nk, dv).
        chunk_size: int or scalar int32 tensor, 1 <= chunk_size; chunks of
            min(chunk_size, N) queries, the last one padded.
        key_scale: scalar tensor, the logit scale (folded into the keys).
        key_mask: optional bool (B, Nk), True = may be attended to.
        row_bias: optional `PositionEncoding.row_bias` (a position term per
            chunk of queries), with its `tables` already times the position
            scale.
        per_head: whether a tile is one head's (c, N) (an `ops.map` over
            batch x heads around the map over chunks), else all heads'
            (B * heads, c, N) at once (one map, fewer and larger steps). Which
            is faster depends on the backend (`choice.CHUNK_PER_HEAD`).
        head_tables: `row_bias`'s per-head tables, (B * heads, ...) (batch
            major), each chunk given its head's (`row_tables_per_head`);
            `row_bias` gets them before `tables`.
        regions: optional int (B, N): Swin's shift-region label of each key
            (and query); a key of another region than the query's gets
            `region_logit` (a scalar tensor in the logits dtype) added.

    Returns:
        (B, heads, N, dv) in the dtype of `value`.
    """
    if keras.backend.backend() == "jax" and isinstance(chunk_size, int):
        return _compiled_on_jax(chunk_size, row_bias, per_head)(
            query,
            key,
            value,
            key_scale,
            key_mask,
            tuple(tables),
            tuple(head_tables),
            regions,
            region_logit,
        )
    return _chunks(
        query,
        key,
        value,
        chunk_size=chunk_size,
        key_scale=key_scale,
        key_mask=key_mask,
        row_bias=row_bias,
        tables=tables,
        per_head=per_head,
        head_tables=head_tables,
        regions=regions,
        region_logit=region_logit,
    )


@functools.cache
def _compiled_on_jax(
    chunk_size: int, row_bias: RowBias | None, per_head: bool
) -> Callable[..., Tensor]:
    """One `jax.jit` of the chunked core per (chunk size, row term, layout).

    Eager JAX runs `ops.map` (`lax.map`) by tracing and compiling its body
    afresh at every call: an eager call of the chunked layer took 0.8 s at
    8x8 tokens and its gradient 2.5 s, against 5 ms and 25 ms compiled once
    (jax.jit then caches per shape and dtype). Inside a jit already (fit,
    predict, the user's own jax.jit) the inner jit is inlined. The key is
    hashable and small: an int, a position encoding's static `row_bias`
    function or None, a bool.
    """
    import jax

    def core(
        query: Tensor,
        key: Tensor,
        value: Tensor,
        key_scale: Tensor,
        key_mask: Tensor | None,
        tables: tuple[Tensor, ...],
        head_tables: tuple[Tensor, ...],
        regions: Tensor | None,
        region_logit: Tensor | None,
    ) -> Tensor:
        return _chunks(
            query,
            key,
            value,
            chunk_size=chunk_size,
            key_scale=key_scale,
            key_mask=key_mask,
            row_bias=row_bias,
            tables=tables,
            per_head=per_head,
            head_tables=head_tables,
            regions=regions,
            region_logit=region_logit,
        )

    return jax.jit(core)


def _chunks(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    *,
    chunk_size: int | Tensor,
    key_scale: Tensor,
    key_mask: Tensor | None,
    row_bias: RowBias | None,
    tables: Sequence[Tensor],
    per_head: bool,
    head_tables: Sequence[Tensor] = (),
    regions: Tensor | None = None,
    region_logit: Tensor | None = None,
) -> Tensor:
    shape = ops.shape(query)
    batch, heads, n, kd = shape[0], shape[1], shape[2], query.shape[-1]
    nk = ops.shape(key)[2]  # the keys' count: every chunk of queries sees all
    dv = value.shape[-1]
    bh = batch * heads
    if isinstance(n, int) and isinstance(chunk_size, int):
        c = min(chunk_size, n)
    else:
        c = ops.minimum(chunk_size, n)
    num_chunks = (n + c - 1) // c
    padded = num_chunks * c

    # Token index of every (padded) query; padded queries repeat the last
    # token, a valid position for the position term; their rows are dropped.
    # (n - 1 as a tensor, the last index: keras ops given a symbolic size
    # break torch.compile's graph.)
    last = ops.arange(n, dtype="int32")[-1]
    rows = ops.minimum(ops.arange(padded, dtype="int32"), last)
    q = ops.reshape(query, (bh, n, kd))
    if not (isinstance(padded, int) and padded == n):
        # Zeros concatenated, not `ops.pad`: it makes a Keras Operation on
        # every call, even eager, whose new unique name changes a global
        # dict that torch.compile guards on (the model was recompiled at
        # every call). Not `ops.take` either: Keras's torch `take` becomes
        # ops that ONNX (Squeeze) and OpenVINO (ravel) exports cannot run.
        zeros = ops.zeros((bh, padded - n, kd), dtype=q.dtype)
        q = ops.concatenate([q, zeros], axis=1)
    q = ops.reshape(q, (bh, num_chunks, c, kd))
    rows = ops.reshape(rows, (num_chunks, c))
    k = ops.reshape(key * key_scale, (bh, nk, kd))
    v = ops.reshape(value, (bh, nk, dv))

    operands = [q, k, v]
    if key_mask is not None:
        keep = ops.cast(key_mask, k.dtype)  # (B, N); float: remat rejects bool
        keep = ops.reshape(
            ops.repeat(ops.expand_dims(keep, 1), heads, axis=1), (bh, 1, nk)
        )
        operands += [keep, (keep - 1.0) * -MASKED_LOGIT]
    unmapped = list(tables)
    with_regions = regions is not None and region_logit is not None
    if with_regions:
        labels = ops.cast(regions, k.dtype)  # (B, N); float: remat takes floats
        operands.append(
            ops.reshape(ops.repeat(ops.expand_dims(labels, 1), heads, axis=1), (bh, n))
        )
    operands += list(head_tables)
    if with_regions:
        unmapped = [region_logit, *unmapped]
    chunk = _chunk_body(key_mask is not None, row_bias, with_regions, len(head_tables))

    if per_head:

        def head(xs: tuple[Tensor, ...]) -> Tensor:
            q_head, *rest = xs  # (num_chunks, c, kd), then k, v [, keep, penalty]

            def one(ys: tuple[Tensor, Tensor]) -> Tensor:
                q_chunk, rows_chunk = ys
                return chunk(q_chunk, rows_chunk, *rest, *unmapped)

            return ops.map(one, (q_head, rows))  # (num_chunks, c, dv)

        out = ops.map(head, tuple(operands))  # (BH, num_chunks, c, dv)
    else:
        rest = operands[1:]

        def one(ys: tuple[Tensor, Tensor]) -> Tensor:
            q_chunk, rows_chunk = ys  # (BH, c, kd), (c,)
            return chunk(q_chunk, rows_chunk, *rest, *unmapped)

        out = ops.map(
            one, (ops.transpose(q, (1, 0, 2, 3)), rows)
        )  # (num_chunks, BH, c, dv)
        out = ops.transpose(out, (1, 0, 2, 3))
    out = ops.reshape(out, (bh, padded, dv))[:, :n]
    return ops.reshape(out, (batch, heads, n, dv))
