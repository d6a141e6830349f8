"""Position encodings of the 2-D attention block, in `keras.ops` only.

Definitions (the float64 oracle is `mhsa_core.reference`; (y, x) is a token's
row and column, i a query, j a key, q_i the query of one head):

- "relative" (BoTNet): logits(i, j) += q_i . (R_h[y_j - y_i + H - 1] + R_w[x_j - x_i + W - 1])
- "absolute":           logits(i, j) += q_i . (E_h[y_j] + E_w[x_j])
- "sinusoidal":         tokens += P(y, x), a fixed sine-cosine embedding

The learned tables belong to a reference size (Hr, Wr): R_h has 2*Hr - 1 rows
(offsets -(Hr-1)..Hr-1), E_h has Hr rows. At any other size they are resized
along their rows by `resize_table` inside the graph, so one model serves any
H x W, also under jit and with H, W unknown until run time (TensorFlow graphs).

`height` and `width` may be Python ints or scalar tensors (a dynamic spatial
size); every function here works with both.
"""

import math

import numpy as np
from keras import ops

__all__ = ["resize_table", "relative_logits", "absolute_logits", "sinusoidal_embedding"]


def _is_static(value):
    return isinstance(value, int)


def resize_table(table, length):
    """`table` (L, d) linearly interpolated along axis 0 to `length` rows.

    Half-pixel rule (torch `F.interpolate(mode="linear", align_corners=False)`):
    row t sits at source position s = (t + 0.5) * L / length - 0.5, clamped to
    [0, L - 1], and is (1 - f) * table[floor(s)] + f * table[floor(s) + 1],
    f = s - floor(s). With length == L the table comes back unchanged (s = t,
    f = 0 exactly). Computed in the table's dtype.
    """
    rows = int(table.shape[0])
    if _is_static(length) and length == rows:
        return table  # the formula gives exactly this; skip the gathers
    dtype = table.dtype
    t = ops.cast(ops.arange(length, dtype="int32"), dtype)  # (length,)
    # Same operation order as the reference: (t + 0.5) * L / length - 0.5.
    s = (t + 0.5) * float(rows) / ops.cast(length, dtype) - 0.5
    s = ops.clip(s, 0.0, float(rows - 1))
    # floor(s) as a cast (s >= 0 truncates): keras 3.15's `ops.floor` returns
    # float32 for float64 input on torch and JAX, which can round s up to the
    # next integer and make f slightly negative.
    i0 = ops.cast(s, "int32")
    i1 = ops.minimum(i0 + 1, rows - 1)
    f = ops.expand_dims(s - ops.cast(i0, dtype), -1)  # (length, 1)
    return ops.take(table, i0, axis=0) * (1.0 - f) + ops.take(table, i1, axis=0) * f


def _offsets(size):
    """(size, size) int32: [query, key] -> key - query + size - 1, the row of a
    relative table of 2 * size - 1 rows. Gathering with it is the whole
    relative-to-absolute step (no pad/reshape trick)."""
    r = ops.arange(size, dtype="int32")
    return ops.expand_dims(r, 0) - ops.expand_dims(r, 1) + (size - 1)


def _split_rows(q, height, width):
    """(B, heads, N, d) -> (B, heads, H, W, d), N = H * W row-major."""
    shape = ops.shape(q)
    return ops.reshape(q, (shape[0], shape[1], height, width, q.shape[-1]))


def _combine(along_h, along_w, height, width):
    """(B, heads, H, W, H_k) + (B, heads, H, W, W_k) -> (B, heads, N, N), the
    key axis row-major over (H_k, W_k) like the query axis."""
    shape = ops.shape(along_h)
    n = height * width
    full = ops.expand_dims(along_h, -1) + ops.expand_dims(along_w, -2)
    return ops.reshape(full, (shape[0], shape[1], n, n))


def relative_logits(q, table_h, table_w, height, width):
    """BoTNet's 2-D relative position logits.

    Args:
        q: (B, heads, N, d) queries, N = height * width.
        table_h: (2 * Hr - 1, d), row Hr - 1 + k for a key k rows below the query.
        table_w: (2 * Wr - 1, d), likewise for columns.

    Returns:
        (B, heads, N, N): [i, j] = q_i . (R_h[y_j - y_i + H - 1] + R_w[x_j - x_i + W - 1]),
        the tables resized to 2H - 1 and 2W - 1 rows.
    """
    q5 = _split_rows(q, height, width)
    rel_h = ops.take(resize_table(table_h, 2 * height - 1), _offsets(height), axis=0)
    rel_w = ops.take(resize_table(table_w, 2 * width - 1), _offsets(width), axis=0)
    # rel_h: (H_q, H_k, d), rel_w: (W_q, W_k, d)
    along_h = ops.einsum("bnyxd,ykd->bnyxk", q5, rel_h)  # (B, heads, H, W, H_k)
    along_w = ops.einsum("bnyxd,xkd->bnyxk", q5, rel_w)  # (B, heads, H, W, W_k)
    return _combine(along_h, along_w, height, width)


def absolute_logits(q, table_h, table_w, height, width):
    """Factorized absolute position logits: [i, j] = q_i . (E_h[y_j] + E_w[x_j]).

    Args as `relative_logits`, with tables (Hr, d) and (Wr, d), resized to H
    and W rows.
    """
    q5 = _split_rows(q, height, width)
    emb_h = resize_table(table_h, height)  # (H_k, d)
    emb_w = resize_table(table_w, width)  # (W_k, d)
    along_h = ops.einsum("bnyxd,kd->bnyxk", q5, emb_h)  # (B, heads, H, W, H_k)
    along_w = ops.einsum("bnyxd,kd->bnyxk", q5, emb_w)  # (B, heads, H, W, W_k)
    return _combine(along_h, along_w, height, width)


def _frequencies(channels):
    """w_k = 10000^(-k / D), k < D = C / 4, as Python floats (as the reference)."""
    d = channels // 4
    return [10000.0 ** (-k / d) for k in range(d)]


def _sinusoidal_float64(height, width, channels):
    """The embedding of a static size, in float64 NumPy.

    Not cached: torch.compile (dynamo) warns on every lru_cache it traces
    through, and the cost (4 sin/cos per token and frequency) is small next
    to the attention itself.
    """
    omega = np.asarray(_frequencies(channels))
    rows, cols = np.divmod(np.arange(height * width), width)  # (y, x) per token
    angle_y, angle_x = rows[:, None] * omega, cols[:, None] * omega  # (N, D)
    out = np.concatenate(
        [np.sin(angle_y), np.cos(angle_y), np.sin(angle_x), np.cos(angle_x)], axis=-1
    )
    return out


def sinusoidal_embedding(height, width, channels, dtype):
    """The fixed 2-D sine-cosine embedding, (N, C), row-major over (H, W).

    With D = C / 4 and w_k = 10000^(-k / D), token (y, x) gets
    [sin(y w), cos(y w), sin(x w), cos(x w)]. C must be divisible by 4 (the
    layer checks it at build).

    A static size (every backend except TensorFlow graphs with unknown H or W)
    gets a constant computed in float64 NumPy and rounded once to `dtype`:
    keras 3.15's `ops.sin`/`ops.cos` compute float64 in float32 on JAX. A
    dynamic size is computed with `keras.ops` in `dtype`.
    """
    if _is_static(height) and _is_static(width):
        return ops.convert_to_tensor(_sinusoidal_float64(height, width, channels),
                                     dtype=dtype)
    omega = ops.convert_to_tensor(_frequencies(channels), dtype=dtype)
    n = height * width
    index = ops.arange(n, dtype="int32")
    rows = ops.cast(index // width, dtype)  # y of every token
    cols = ops.cast(index % width, dtype)  # x of every token
    angle_y = ops.expand_dims(rows, -1) * omega  # (N, D)
    angle_x = ops.expand_dims(cols, -1) * omega  # (N, D)
    return ops.concatenate(
        [ops.sin(angle_y), ops.cos(angle_y), ops.sin(angle_x), ops.cos(angle_x)], axis=-1
    )


def default_table_stddev(key_dim):
    """BoTNet's (and timm's) initial standard deviation of the tables."""
    return 1.0 / math.sqrt(key_dim)
