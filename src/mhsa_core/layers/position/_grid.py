"""Grid helpers of the position encodings, in `keras.ops` only.

`height` and `width` may be Python ints or scalar tensors (a dynamic spatial
size, e.g. a TensorFlow graph traced with H and W unknown); every function
here works with both. The float64 oracle of each is in
`mhsa_core.reference.position`.
"""

from __future__ import annotations

from typing import TypeGuard

from keras import ops

from mhsa_core._typing import Tensor


def is_static(value: object) -> TypeGuard[int]:
    return isinstance(value, int)


def gather(t: Tensor, index: Tensor, axis: int) -> Tensor:
    """`ops.take(t, index, axis=axis)`, as a take along axis 0 of a 2-D
    tensor (the gathered axis first, the others as one) with the axes moved
    back: the index's axes where `axis` was.

    Keras's torch `take` along any other axis (or of a tensor of another
    rank) is `index_select` then `squeeze`: torch's ONNX export writes the
    squeeze as an ONNX Squeeze that ONNX Runtime refuses (of an axis whose
    size is not 1), and OpenVINO has no conversion rule for its `aten::ravel`.
    Along axis 0 of a 2-D tensor it is an embedding lookup, which both take.
    A gather moves values only: the result is the same on every backend.
    """
    rank = len(t.shape)
    axis = axis % rank
    moved = ops.moveaxis(t, axis, 0) if axis else t
    shape = ops.shape(moved)
    rows = ops.take(ops.reshape(moved, (shape[0], -1)), index, axis=0)
    index_rank = len(index.shape)
    rows = ops.reshape(rows, (*ops.shape(index), *shape[1:]))
    if not axis:
        return rows
    # (index axes, other axes) -> (other axes before `axis`, index axes, rest)
    order = [
        *range(index_rank, index_rank + axis),
        *range(index_rank),
        *range(index_rank + axis, index_rank + rank - 1),
    ]
    return ops.transpose(rows, order)


def resize_table(table: Tensor, length: int | Tensor) -> Tensor:
    """`table` (L, d) linearly interpolated along axis 0 to `length` rows.

    Half-pixel rule (torch `F.interpolate(mode="linear", align_corners=False)`):
    row t sits at source position s = (t + 0.5) * L / length - 0.5, clamped to
    [0, L - 1], and is (1 - f) * table[floor(s)] + f * table[floor(s) + 1],
    f = s - floor(s). With length == L the table comes back unchanged (s = t,
    f = 0 exactly). Computed in the table's dtype.
    """
    rows = int(table.shape[0])
    if is_static(length) and length == rows:
        return table  # the formula gives exactly this; skip the gathers
    dtype = table.dtype
    index = ops.arange(length, dtype="int32")
    t = ops.cast(index, dtype)  # (length,)
    # The length as a tensor computed from the index (an int32 sum of ones,
    # exact, then cast as the length itself would be), never
    # ops.cast(length): torch.export turns the cast of a symbolic size into a
    # Python number, which pins H and W to the size it traced at, and
    # torch.compile specializes on it (its symbolic sizes pass for ints
    # there, so `is_static` cannot tell them apart: a recompile per size).
    n = ops.cast(ops.sum(ops.ones_like(index)), dtype)
    # Same operation order as the reference: (t + 0.5) * L / length - 0.5.
    s = (t + 0.5) * float(rows) / n - 0.5
    s = ops.clip(s, 0.0, float(rows - 1))
    # floor(s) as a cast (s >= 0 truncates): keras 3.15's `ops.floor` returns
    # float32 for float64 input on torch and JAX, which can round s up to the
    # next integer and make f slightly negative (canary "floor-float64").
    i0 = ops.cast(s, "int32")
    i1 = ops.minimum(i0 + 1, rows - 1)
    f = ops.expand_dims(s - ops.cast(i0, dtype), -1)  # (length, 1)
    return ops.take(table, i0, axis=0) * (1.0 - f) + ops.take(table, i1, axis=0) * f


def offsets(size: int | Tensor) -> Tensor:
    """(size, size) int32: [query, key] -> key - query + size - 1, the row of a
    relative table of 2 * size - 1 rows. Gathering with it is the whole
    relative-to-absolute step (no pad/reshape trick)."""
    r = ops.arange(size, dtype="int32")
    return ops.expand_dims(r, 0) - ops.expand_dims(r, 1) + (size - 1)


def split_rows(q: Tensor, height: int | Tensor, width: int | Tensor) -> Tensor:
    """(B, heads, N, d) -> (B, heads, H, W, d), N = H * W row-major."""
    shape = ops.shape(q)
    return ops.reshape(q, (shape[0], shape[1], height, width, q.shape[-1]))


def combine(
    along_h: Tensor, along_w: Tensor, height: int | Tensor, width: int | Tensor
) -> Tensor:
    """(B, heads, H, W, H_k) + (B, heads, H, W, W_k) -> (B, heads, N, N), the
    key axis row-major over (H_k, W_k) like the query axis."""
    shape = ops.shape(along_h)
    n = height * width
    full = ops.expand_dims(along_h, -1) + ops.expand_dims(along_w, -2)
    return ops.reshape(full, (shape[0], shape[1], n, n))
