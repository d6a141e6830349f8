"""The resize of a per-head bias table ("relative_bias"): timm's rule for
Swin's pretrained tables, as interpolation matrices.

timm (`timm.layers.pos_embed_rel.resize_rel_pos_bias_table`, after BEiT)
respaces each axis of the (2Hr - 1, 2Wr - 1) table: its offsets 0, +-1, ...,
+-n sit at 0, +-1, +-(1 + q), +-(1 + q + q^2), ..., with q in [1.01, 1.5]
found by bisection so that the last lands at about the new table's largest
offset, and the new table's integer offsets are read off by linear
interpolation between neighbouring source offsets (bilinear over both axes;
the end value beyond either end). Not bicubic: that is `_simple`'s rule,
which Swin does not use. Along each axis that is one (rows, S) matrix, and
the resized table is M_h @ T @ M_w^T per head.

A static size (every call but a TensorFlow graph with dynamic H or W, and
symbolic exports) gets matrices computed in float64 NumPy and rounded once
to the table's dtype: all backends agree, and float64 stays exact. A
dynamic size gets the same matrices from `keras.ops`, with q read from a
float64 table of the bisection's result per new size (the bisection's
comparisons would flip in float32), in the table's dtype. The float64
oracle, written as timm writes it, is
`mhsa_core.reference.position.resize_bias_table`.
"""

from __future__ import annotations

import numpy as np
from keras import ops

from mhsa_core._typing import Tensor
from mhsa_core.layers.position._grid import is_static

# timm's bisection interval for q and its stopping width.
_Q_LOW, _Q_HIGH, _Q_TOLERANCE = 1.01, 1.5, 1e-6
# A dynamic size reads q from a table of this many new sizes m (the new
# table's largest offset; m = H - 1); larger maps take the last entry (for
# tables of fewer than 20 rows q has long reached 1.5 there).
DYNAMIC_MAX_OFFSET = 4096


def _bisect(n: int, m: np.ndarray) -> np.ndarray:
    """timm's q for every largest new offset in `m`, float64: its Python loop
    elementwise (the same float64 operations; each element stops when its
    own interval is narrow enough, as timm's loop does)."""
    left = np.full(m.shape, _Q_LOW)
    right = np.full(m.shape, _Q_HIGH)
    q = left.copy()
    active = right - left > _Q_TOLERANCE
    while np.any(active):
        mid = (left + right) / 2.0
        q = np.where(active, mid, q)
        above = (1.0 - mid**n) / (1.0 - mid) > m
        right = np.where(active & above, mid, right)
        left = np.where(active & ~above, mid, left)
        active = right - left > _Q_TOLERANCE
    return q


def _positions(q: float, n: int) -> np.ndarray:
    """The 2n + 1 source offsets' places: -(1 + ... + q^(n-1)), ..., -1, 0,
    1, ..., 1 + ... + q^(n-1)."""
    dis = np.cumsum(q ** np.arange(n)) if n else np.zeros(0)
    return np.concatenate([-dis[::-1], [0.0], dis])


def _tent(points: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """(len(targets), len(points)): linear interpolation weights on the
    sorted, non-uniform `points`, the end point beyond either end."""
    t = targets[:, None]
    weights = np.zeros((targets.size, points.size))
    if points.size > 1:
        lo, hi = points[:-1], points[1:]  # each interval [lo, hi]
        inside = (t >= lo) & (t <= hi)
        f = np.where(inside, (t - lo) / (hi - lo), 0.0)
        # Weights of the interval's ends; a target on a knot gets 1 from both
        # intervals around it: max, not sum.
        weights[:, :-1] = np.where(inside, 1.0 - f, 0.0)
        weights[:, 1:] = np.maximum(weights[:, 1:], np.where(inside, f, 0.0))
    weights[:, 0] = np.where(targets <= points[0], 1.0, weights[:, 0])
    weights[:, -1] = np.where(targets >= points[-1], 1.0, weights[:, -1])
    return weights


# Not cached: torch.compile (dynamo) warns on every lru_cache it traces
# through (an error under the tests' strict warnings), and each costs
# microseconds (the q table, only for sizes known at run time, is traced once).
def resize_matrix(src_rows: int, dst_rows: int) -> np.ndarray:
    """float64 (dst_rows, src_rows): one axis of timm's resize, as a matrix."""
    q = float(_bisect(src_rows // 2, np.asarray(float(dst_rows // 2))))
    m = dst_rows // 2
    return _tent(_positions(q, src_rows // 2), np.arange(-m, m + 1, dtype=float))


def _q_by_offset(n: int) -> np.ndarray:
    """float64 (DYNAMIC_MAX_OFFSET,): q for every largest new offset m."""
    return _bisect(n, np.arange(DYNAMIC_MAX_OFFSET, dtype=float))


def _count(rows: int | Tensor) -> Tensor:
    """`rows` as an int32 tensor, summed from an arange: never a cast of the
    size itself, which torch.export turns into a Python number (pinning H
    and W; see `_grid.resize_table`)."""
    return ops.sum(ops.ones_like(ops.arange(rows, dtype="int32")))


def _dynamic_matrix(src_rows: int, dst_rows: Tensor, dtype: str) -> Tensor:
    """`resize_matrix` with `keras.ops`, for a size known at run time."""
    n = src_rows // 2
    m = _count(dst_rows) // 2
    targets = ops.cast(ops.arange(dst_rows, dtype="int32") - m, dtype)[:, None]
    if n == 0:
        return ops.ones_like(targets)  # one offset: every row reads it
    index = ops.minimum(m, DYNAMIC_MAX_OFFSET - 1)
    q = ops.take(ops.convert_to_tensor(_q_by_offset(n), dtype=dtype), index)
    # 1, 1 + q, 1 + q + q^2, ...: summed in a Python loop (n is the table's,
    # static), not ops.cumsum, which computes float64 in float32 on torch
    # (canary "cumsum-float64").
    powers = ops.power(q, ops.arange(n, dtype=dtype))
    sums = [powers[0]]
    for i in range(1, n):
        sums.append(sums[-1] + powers[i])
    dis = ops.stack(sums)
    points = ops.concatenate([-ops.flip(dis, 0), ops.zeros((1,), dtype), dis])
    lo, hi = points[:-1], points[1:]
    inside = ops.logical_and(targets >= lo, targets <= hi)  # (dst, S - 1)
    f = ops.where(inside, (targets - lo) / (hi - lo), 0.0)
    zero = ops.zeros_like(targets)
    lower = ops.concatenate([ops.where(inside, 1.0 - f, 0.0), zero], axis=1)
    upper = ops.concatenate([zero, ops.where(inside, f, 0.0)], axis=1)
    # max, as a where: ops.maximum computes float64 in float32 on torch
    # (canary "maximum-float64").
    weights = ops.where(lower > upper, lower, upper)  # (dst, S)
    first = ops.where(targets <= points[0], 1.0, weights[:, :1])
    last = ops.where(targets >= points[-1], 1.0, weights[:, -1:])
    return ops.concatenate([first, weights[:, 1:-1], last], axis=1)


def _identity(rows: Tensor, src_rows: int, dtype: str) -> Tensor:
    """(rows, src_rows): 1 where row == column (the identity at rows == S)."""
    r = ops.expand_dims(ops.arange(rows, dtype="int32"), 1)
    return ops.cast(ops.equal(r, ops.arange(src_rows, dtype="int32")), dtype)


def resize_bias_table(
    table: Tensor, rows_h: int | Tensor, rows_w: int | Tensor
) -> Tensor:
    """A per-head table (S_h, S_w, heads) resized to (rows_h, rows_w, heads)
    by timm's rule (the module's docstring), in the table's dtype. Unchanged
    when both sizes are the table's own (timm respaces both axes once either
    changes)."""
    src_h, src_w = int(table.shape[0]), int(table.shape[1])
    dtype = table.dtype
    if is_static(rows_h) and is_static(rows_w):
        if (rows_h, rows_w) == (src_h, src_w):
            return table
        m_h = ops.convert_to_tensor(resize_matrix(src_h, rows_h), dtype=dtype)
        m_w = ops.convert_to_tensor(resize_matrix(src_w, rows_w), dtype=dtype)
    else:
        same = ops.logical_and(
            ops.equal(_count(rows_h), src_h), ops.equal(_count(rows_w), src_w)
        )
        m_h = ops.where(
            same,
            _identity(rows_h, src_h, dtype),
            _dynamic_matrix(src_h, rows_h, dtype),
        )
        m_w = ops.where(
            same,
            _identity(rows_w, src_w, dtype),
            _dynamic_matrix(src_w, rows_w, dtype),
        )
    # Two products, not one three-operand einsum: torch plans those with
    # opt_einsum, whose size comparisons pin a size torch.export keeps dynamic.
    rows = ops.einsum("as,stk->atk", m_h, table)
    return ops.einsum("atk,bt->abk", rows, m_w)
