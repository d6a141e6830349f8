"""Position encodings in the reference: explicit loops, float64 by default.

Each encoding of `schema.ENCODINGS` with a stage has one entry here: a
"tokens" encoding a function of the tokens (`TOKEN_TERMS`), a "logits"
encoding a function giving, for query i, the per-key embedding that q_i is
dotted with (`KEY_EMBEDDINGS`). (y, x) is a token's row and column, i a
query and j a key:

- "conv": t <- t + relu(t @ Wp + bp) (the Keras 2 YOLOv4-MHSA block's);
- "sinusoidal": t <- t + P(y, x), `sinusoidal_embedding`;
- "relative" (BoTNet): logits(i, j) += q_i . (R_h[y_j - y_i + H - 1]
  + R_w[x_j - x_i + W - 1]), the tables resized to 2H - 1 and 2W - 1 rows;
- "absolute": logits(i, j) += q_i . (E_h[y_j] + E_w[x_j]), the tables
  resized to H and W rows;
- "rope", "rope_mixed" (stage "qk"): q and k of every head rotated by angles
  of the token's (y, x) before the logits (`rotation_angles`, `rotate`), as
  timm's `RotaryEmbeddingCat` / `RotaryEmbeddingMixed` and
  `apply_rot_embed_cat`.
- "relative_bias" (Swin), a term of no query (`LOGIT_BIASES`): logits(i, j)
  += B[y_i - y_j + H - 1, x_i - x_j + W - 1, head] (query minus key, Swin's
  convention, the opposite of "relative"'s), the per-head table
  resized to (2H - 1, 2W - 1) by timm's rule for Swin's pretrained tables
  (`resize_bias_table`: BEiT's geometric spacing, linear interpolation).

With windows (`window_size`), H and W here are the window's, but for the
rotary encodings: their angles are of the token's place in the map.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import TypeAlias

import numpy as np
from numpy.typing import ArrayLike

from mhsa_core.reference import schema

__all__ = [
    "resize_table",
    "geometric_offsets",
    "resize_bias_table",
    "position_bias",
    "LOGIT_BIASES",
    "sinusoidal_embedding",
    "position_logits",
    "token_term",
    "TOKEN_TERMS",
    "KEY_EMBEDDINGS",
    "rope_angles",
    "rope_mixed_angles",
    "rotation_angles",
    "rotate",
]

# The float scalar type every step computes in (np.float64 for the oracle,
# np.float32 for the budgets): called on Python numbers, `dtype(0.5)`.
FloatType: TypeAlias = type[np.floating]
# a @ b, NumPy's or summed in order (`forward._matmul_sequential`).
Matmul: TypeAlias = Callable[[np.ndarray, np.ndarray], np.ndarray]
# The rounding between ops (identity, or through a 16-bit storage dtype).
Store: TypeAlias = Callable[[np.ndarray], np.ndarray]
# The canonical weight dict (`schema.weight_shapes`).
Weights: TypeAlias = Mapping[str, np.ndarray]


def resize_table(
    table: ArrayLike, length: int, dtype: FloatType = np.float64
) -> np.ndarray:
    """`table` (L, d) linearly interpolated along axis 0 to `length` rows.

    Row t of the result sits at source position s = (t + 0.5) * L / length - 0.5
    (pixel centers aligned, "half-pixel"), clamped to [0, L - 1]:
    out[t] = (1 - f) * table[floor(s)] + f * table[floor(s) + 1], f = s - floor(s).
    This is torch's `F.interpolate(mode="linear", align_corners=False)` and
    `tf.image.resize(method="bilinear")` along one axis (the latter only to
    float32: it always returns float32). With length == L, s = t
    and the table comes back unchanged, bit for bit.

    For a relative table (2n - 1 rows, offsets -(n-1)..n-1) the rule maps offset
    d at the new size to offset d * (2n - 1) / (2m - 1) at the reference size
    (m the new size): offset 0 stays at offset 0, and the largest offsets clamp
    to the table's ends.
    """
    table = np.asarray(table).astype(dtype)
    rows = table.shape[0]
    out = np.zeros((length,) + table.shape[1:], dtype=dtype)
    for t in range(length):
        s = (dtype(t) + dtype(0.5)) * dtype(rows) / dtype(length) - dtype(0.5)
        s = min(max(s, dtype(0)), dtype(rows - 1))
        i0 = int(math.floor(s))
        i1 = min(i0 + 1, rows - 1)
        f = dtype(s - i0)
        out[t] = (dtype(1) - f) * table[i0] + f * table[i1]
    return out


def geometric_offsets(src_rows: int, dst_rows: int) -> list[float]:
    """Where the offsets of a table of `src_rows` rows sit on the axis of a
    table of `dst_rows` rows, in timm's (BEiT's) rule for resizing relative
    position bias tables (`timm.layers.pos_embed_rel.resize_rel_pos_bias_table`,
    its `_calc`), written as timm writes it, in Python floats.

    With n = src_rows // 2 and m = dst_rows // 2, offsets 0, +-1, ..., +-n sit
    at 0, +-1, +-(1 + q), +-(1 + q + q^2), ... (a geometric progression): the
    ratio q in [1.01, 1.5] is found by bisection (to an interval of 1e-6) so
    that 1 + q + ... + q^(n-1) lands at about m, the new table's largest
    offset. Near offsets keep their spacing, far ones stretch. Without room to
    stretch (m <= n) q stays at about 1.01: a near-identity that crops.
    """

    def geometric_progression(a: float, r: float, n: int) -> float:
        return a * (1.0 - r**n) / (1.0 - r)

    left, right = 1.01, 1.5
    q = left
    while right - left > 1e-6:
        q = (left + right) / 2.0
        gp = geometric_progression(1, q, src_rows // 2)
        if gp > dst_rows // 2:
            right = q
        else:
            left = q
    dis: list[float] = []
    cur = 1.0
    for i in range(src_rows // 2):
        dis.append(cur)
        cur += q ** (i + 1)
    return [-d for d in reversed(dis)] + [0.0] + dis


def _interval(points: list[float], t: float) -> tuple[int, int, float, float]:
    """(i0, i1, w0, w1): t as w0 * points[i0] + w1 * points[i1], linear
    between neighbours, the end point beyond either end."""
    if t <= points[0]:
        return 0, 0, 1.0, 0.0
    if t >= points[-1]:
        last = len(points) - 1
        return last, last, 1.0, 0.0
    i = max(k for k, p in enumerate(points) if p <= t)
    if points[i] == t:
        return i, i, 1.0, 0.0
    f = (t - points[i]) / (points[i + 1] - points[i])
    return i, i + 1, 1.0 - f, f


def resize_bias_table(
    table: ArrayLike, rows_h: int, rows_w: int, dtype: FloatType = np.float64
) -> np.ndarray:
    """A per-head bias table (S_h, S_w, heads) resized to (rows_h, rows_w, heads)
    by timm's rule for Swin's pretrained tables (`resize_rel_pos_bias_table`,
    after BEiT; without scipy).

    Unchanged (bit for bit) when the size is the same along both axes.
    Otherwise, along each axis, the source offsets sit at
    `geometric_offsets(S, rows)` and the new table's integer offsets
    -(rows // 2)..rows // 2 read the source by linear interpolation between
    the two neighbouring offsets (bilinear over both axes; the end row
    beyond either end), like timm's `RegularGridInterpolator`. As timm, both
    axes are respaced once either changes (an axis of unchanged size moves
    by about 1% per offset: q stays at 1.01). The weights are Python floats;
    the products and sums are in `dtype`.
    """
    table = np.asarray(table).astype(dtype)
    src_h, src_w, heads = table.shape
    if (src_h, src_w) == (rows_h, rows_w):
        return table
    ys = geometric_offsets(src_h, rows_h)
    xs = geometric_offsets(src_w, rows_w)
    out = np.zeros((rows_h, rows_w, heads), dtype=dtype)
    for a in range(rows_h):
        i0, i1, wy0, wy1 = _interval(ys, float(a - rows_h // 2))
        for b in range(rows_w):
            j0, j1, wx0, wx1 = _interval(xs, float(b - rows_w // 2))
            out[a, b] = (
                dtype(wy0 * wx0) * table[i0, j0]
                + dtype(wy0 * wx1) * table[i0, j1]
                + dtype(wy1 * wx0) * table[i1, j0]
                + dtype(wy1 * wx1) * table[i1, j1]
            )
    return out


def sinusoidal_embedding(
    height: int, width: int, channels: int, dtype: FloatType = np.float64
) -> np.ndarray:
    """The fixed 2-D sine-cosine embedding P, (H*W, C), row-major over (H, W).

    With D = C / 4 frequencies w_k = 10000^(-k / D), k = 0..D-1, the token at
    row y and column x gets the channels

        [sin(y w_0..w_{D-1}), cos(y w), sin(x w), cos(x w)]

    (MAE's `get_2d_sincos_pos_embed` with the halves swapped: MAE encodes the
    column first). C must be divisible by 4.
    """
    if channels % 4:
        raise ValueError(
            "The sinusoidal embedding needs channels divisible by 4. "
            f"Received: channels={channels}"
        )
    d = channels // 4
    omega = np.asarray([10000.0 ** (-k / d) for k in range(d)], dtype=dtype)
    out = np.zeros((height * width, channels), dtype=dtype)
    for y in range(height):
        for x in range(width):
            i = y * width + x
            out[i, 0:d] = np.sin(dtype(y) * omega)
            out[i, d : 2 * d] = np.cos(dtype(y) * omega)
            out[i, 2 * d : 3 * d] = np.sin(dtype(x) * omega)
            out[i, 3 * d : 4 * d] = np.cos(dtype(x) * omega)
    return out


def relu(x: np.ndarray) -> np.ndarray:
    """max(x, 0): the "conv" token term's activation, and the reference's "relu"."""
    return np.maximum(x, 0)


def dense(
    t: np.ndarray,
    weights: Weights,
    kernel: str,
    bias: str,
    dtype: FloatType,
    matmul: Matmul,
    store: Store,
) -> np.ndarray:
    """t @ weights[kernel] + weights[bias] (bias optional), rounded by `store`."""
    y = store(matmul(t, store(weights[kernel].astype(dtype))))
    b = weights.get(bias)
    if b is not None:
        y = store(y + store(b.astype(dtype)))
    return y


def _conv_tokens(
    t: np.ndarray,
    weights: Weights,
    height: int,
    width: int,
    dtype: FloatType,
    matmul: Matmul,
    store: Store,
) -> np.ndarray:
    kernel, bias = schema.ENCODINGS["conv"].token_weights
    return store(t + relu(dense(t, weights, kernel, bias, dtype, matmul, store)))


def _sinusoidal_tokens(
    t: np.ndarray,
    weights: Weights,
    height: int,
    width: int,
    dtype: FloatType,
    matmul: Matmul,
    store: Store,
) -> np.ndarray:
    return store(t + store(sinusoidal_embedding(height, width, t.shape[-1], dtype)))


# name -> f(tokens (B, N, C), weights, H, W, dtype, matmul, store) -> tokens
TOKEN_TERMS: dict[
    str, Callable[[np.ndarray, Weights, int, int, FloatType, Matmul, Store], np.ndarray]
] = {"conv": _conv_tokens, "sinusoidal": _sinusoidal_tokens}


def _relative_embedding(
    tables: list[np.ndarray],
    ys: np.ndarray,
    xs: np.ndarray,
    i: int,
    height: int,
    width: int,
) -> np.ndarray:
    return tables[0][ys - ys[i] + height - 1] + tables[1][xs - xs[i] + width - 1]


def _absolute_embedding(
    tables: list[np.ndarray],
    ys: np.ndarray,
    xs: np.ndarray,
    i: int,
    height: int,
    width: int,
) -> np.ndarray:
    return tables[0][ys] + tables[1][xs]


# name -> f((table_h, table_w) resized, ys, xs, query i, H, W) -> (N, kd):
# row j is what q_i is dotted with for key j.
KEY_EMBEDDINGS: dict[
    str,
    Callable[[list[np.ndarray], np.ndarray, np.ndarray, int, int, int], np.ndarray],
] = {"relative": _relative_embedding, "absolute": _absolute_embedding}


def _relative_bias(
    weights: Weights, height: int, width: int, dtype: FloatType
) -> np.ndarray:
    (name,) = schema.table_names("relative_bias")
    table = resize_bias_table(weights[name], 2 * height - 1, 2 * width - 1, dtype)
    n = height * width
    out = np.zeros((table.shape[-1], n, n), dtype=dtype)
    for i in range(n):
        yi, xi = divmod(i, width)
        for j in range(n):
            yj, xj = divmod(j, width)
            # Query minus key, as Swin's relative_position_index.
            out[:, i, j] = table[yi - yj + height - 1, xi - xj + width - 1]
    return out


# name -> f(weights, H, W, dtype) -> (heads, N, N): a logits term that does not
# depend on the query (a learned bias per head and offset).
LOGIT_BIASES: dict[str, Callable[[Weights, int, int, FloatType], np.ndarray]] = {
    "relative_bias": _relative_bias
}


def position_bias(
    weights: Weights,
    position_encoding: str,
    height: int,
    width: int,
    dtype: FloatType = np.float64,
) -> np.ndarray | None:
    """The position term that does not depend on the query, (heads, N, N) for
    N = height * width row-major, or None ("relative_bias" has one)."""
    term = LOGIT_BIASES.get(position_encoding)
    return None if term is None else term(weights, height, width, dtype)


def token_term(
    t: np.ndarray,
    weights: Weights,
    position_encoding: str,
    height: int,
    width: int,
    dtype: FloatType,
    matmul: Matmul,
    store: Store,
) -> np.ndarray:
    """The tokens after a "tokens" stage encoding (unchanged for the others)."""
    term = TOKEN_TERMS.get(position_encoding)
    return t if term is None else term(t, weights, height, width, dtype, matmul, store)


def position_logits(
    q: np.ndarray,
    weights: Weights,
    position_encoding: str,
    height: int,
    width: int,
    dtype: FloatType = np.float64,
    matmul: Matmul = np.matmul,
) -> np.ndarray | None:
    """The position term of one head's logits, (N, N), or None.

    Args:
        q: (N, key_dim) queries of one head, N = height * width row-major.
        weights: the canonical dict (its `relative_*` / `absolute_*` tables).
        position_encoding: a "logits" stage encoding gives a term; others None.
    """
    spec = schema.encoding(position_encoding)
    if position_encoding not in KEY_EMBEDDINGS:
        return None  # no term, a tokens term, or one of no query (`position_bias`)
    tables = [
        resize_table(weights[name], spec.table_rows(n), dtype)
        for name, n in zip(schema.table_names(position_encoding), (height, width))
    ]
    embedding_of = KEY_EMBEDDINGS[position_encoding]
    n = height * width
    ys, xs = np.divmod(np.arange(n), width)  # (y_j, x_j) of every token
    out = np.zeros((n, n), dtype=dtype)
    for i in range(n):
        emb = embedding_of(tables, ys, xs, i, height, width)  # (N, kd)
        out[i] = matmul(emb, q[i][:, None])[:, 0]  # (N, kd) @ (kd, 1)
    return out


# ------------------------------------------------------ rotary encodings
def _linspace(start: float, stop: float, steps: int, dtype: FloatType) -> np.ndarray:
    """`steps` evenly spaced values from `start` to `stop` ([start] for one)."""
    if steps == 1:
        return np.asarray([dtype(start)])
    step = (dtype(stop) - dtype(start)) / dtype(steps - 1)
    return np.asarray([dtype(start) + dtype(i) * step for i in range(steps)])


def _rope_bands(
    key_dim: int, settings: schema.RopeSettings, dtype: FloatType
) -> np.ndarray:
    """The kd / 4 frequencies of one axis: temperature^(-k / (kd / 4)), or
    with `in_pixels` pi * 2^u, u = kd / 4 values evenly spaced from 0 to
    log2(max_resolution) - 1 (timm's `freq_bands` and `pixel_freq_bands`)."""
    count = key_dim // 4
    if settings.in_pixels:
        top = math.log2(settings.max_resolution) - 1.0
        return np.asarray(
            [
                dtype(math.pi) * dtype(2.0) ** u
                for u in _linspace(0.0, top, count, dtype)
            ]
        )
    return np.asarray(
        [
            dtype(1) / dtype(settings.temperature) ** (dtype(k) / dtype(count))
            for k in range(count)
        ]
    )


def _rope_grid(
    size: int,
    reference: int | None,
    settings: schema.RopeSettings,
    dtype: FloatType,
    span: int | None = None,
) -> np.ndarray:
    """The positions along one axis of `size` cells: i + grid_offset, or
    linspace(-1, 1) with `in_pixels`; times reference / size when the grid is
    normalised against a reference size.

    `span`: the key grid of another map than the queries' (a context, a
    reduced map): its cell i sits at p = i * span / size of the query
    axis of `span` cells, which then gets the query axis's positions
    (p + grid_offset, or -1 + p * 2 / (span - 1)) and normalisation
    (reference / span). None (or `size`): the query grid itself."""
    if span is not None and span != size:
        p = [dtype(i) * dtype(span) / dtype(size) for i in range(size)]
        if settings.in_pixels:
            step = dtype(2.0) / dtype(max(span - 1, 1))
            t = np.asarray([dtype(-1.0) + v * step for v in p])
        else:
            t = np.asarray([v + dtype(settings.grid_offset) for v in p])
        if reference is not None:
            t = np.asarray([v / dtype(span) * dtype(reference) for v in t])
        return t
    if settings.in_pixels:
        t = _linspace(-1.0, 1.0, size, dtype)
    else:
        t = np.asarray([dtype(i) + dtype(settings.grid_offset) for i in range(size)])
    if reference is not None:
        t = np.asarray([v / dtype(size) * dtype(reference) for v in t])
    return t


def rope_angles(
    height: int,
    width: int,
    key_dim: int,
    settings: schema.RopeSettings,
    dtype: FloatType = np.float64,
    span: tuple[int, int] | None = None,
) -> np.ndarray:
    """The angles of "rope" (EVA's `RotaryEmbeddingCat`), (N, kd / 2),
    row-major over (H, W); with `span` (Hq, Wq) those of a key map of
    H x W cells spread over the query grid of Hq x Wq (`_rope_grid`).

    Token (y, x) gets [t_y * w, t_x * w] ("ij") or [t_x * w, t_y * w] ("xy"),
    t the positions of `_rope_grid` and w the kd / 4 frequencies of
    `_rope_bands`. Angle m turns the channel pair of `rotate`.
    """
    bands = _rope_bands(key_dim, settings, dtype)
    count = bands.size
    ref_h, ref_w = settings.reference_size or (None, None)
    span_h, span_w = span or (None, None)
    t_y = _rope_grid(height, ref_h, settings, dtype, span_h)
    t_x = _rope_grid(width, ref_w, settings, dtype, span_w)
    out = np.zeros((height * width, 2 * count), dtype=dtype)
    for y in range(height):
        for x in range(width):
            first, second = (
                (t_y[y], t_x[x]) if settings.grid_indexing == "ij" else (t_x[x], t_y[y])
            )
            out[y * width + x, :count] = first * bands
            out[y * width + x, count:] = second * bands
    return out


def rope_mixed_angles(
    height: int,
    width: int,
    frequencies: np.ndarray,
    grid_indexing: str = "xy",
    dtype: FloatType = np.float64,
    span: tuple[int, int] | None = None,
) -> np.ndarray:
    """The angles of "rope_mixed" (RoPE-Mixed), (heads, N, kd / 2); with
    `span` (Hq, Wq) those of a key map whose cell (y, x) sits at
    (y * Hq / H, x * Wq / W) of the query grid.

    Token (y, x), head h, pair m: t_x * F[0, h, m] + t_y * F[1, h, m], with
    (t_x, t_y) = (x, y) for "xy" (rope-vit's convention) and (y, x) for "ij"
    (timm's `get_mixed_grid`): no offset, no reference scaling.
    """
    f = np.asarray(frequencies).astype(dtype)
    heads, pairs = f.shape[1], f.shape[2]
    out = np.zeros((heads, height * width, pairs), dtype=dtype)
    for y in range(height):
        for x in range(width):
            py, px = dtype(y), dtype(x)
            if span is not None and span[0] != height:
                py = py * dtype(span[0]) / dtype(height)
            if span is not None and span[1] != width:
                px = px * dtype(span[1]) / dtype(width)
            t_x, t_y = (px, py) if grid_indexing == "xy" else (py, px)
            out[:, y * width + x] = dtype(t_x) * f[0] + dtype(t_y) * f[1]
    return out


def rotation_angles(
    weights: Weights,
    position_encoding: str,
    settings: schema.RopeSettings | None,
    height: int,
    width: int,
    key_dim: int,
    dtype: FloatType = np.float64,
    span: tuple[int, int] | None = None,
) -> np.ndarray | None:
    """The rotation angles of a "qk" stage encoding, (heads or 1, N, kd / 2),
    or None for the others. `span`: see `rope_angles` (a key map's angles)."""
    spec = schema.encoding(position_encoding)
    if spec.stage != "qk" or settings is None:
        return None
    if spec.frequencies is not None:
        return rope_mixed_angles(
            height,
            width,
            weights[spec.frequencies],
            settings.grid_indexing,
            dtype,
            span,
        )
    return rope_angles(height, width, key_dim, settings, dtype, span)[None]


def rotate(v: np.ndarray, angles: np.ndarray, layout: str) -> np.ndarray:
    """q or k of one head, (N, kd), rotated by `angles` (N, kd / 2).

    timm's `apply_rot_embed_cat(v, emb, half)`: v * cos + r(v) * sin, with
    the tables cos, sin (N, kd) holding angle m at channels 2m and 2m + 1
    (`RotaryEmbeddingCat`'s and `get_mixed_freqs`'s layout, whatever the
    rotation), and

    - "interleaved" (`rot`): r(v)[2m] = -v[2m + 1], r(v)[2m + 1] = v[2m]: pair
      (2m, 2m + 1) turned by angle m;
    - "half" (`rope_rotate_half`): r(v)[i] = -v[i + kd / 2], r(v)[i + kd / 2]
      = v[i] (i < kd / 2): channel i is paired with i + kd / 2, and each uses
      the angle of its own table slot, i // 2 and (i + kd / 2) // 2, which
      differ (timm's layout, a rotation only when both angles are equal).
    """
    n, kd = v.shape
    sin, cos = np.sin(angles), np.cos(angles)  # (N, kd / 2)
    out = np.zeros_like(v)
    if layout == "interleaved":
        for m in range(kd // 2):
            a, b = v[:, 2 * m], v[:, 2 * m + 1]
            out[:, 2 * m] = a * cos[:, m] - b * sin[:, m]
            out[:, 2 * m + 1] = b * cos[:, m] + a * sin[:, m]
        return out
    half = kd // 2
    for i in range(half):
        j = i + half
        out[:, i] = v[:, i] * cos[:, i // 2] - v[:, j] * sin[:, i // 2]
        out[:, j] = v[:, j] * cos[:, j // 2] + v[:, i] * sin[:, j // 2]
    return out
