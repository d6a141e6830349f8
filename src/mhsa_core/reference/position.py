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
  resized to H and W rows.
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
    "sinusoidal_embedding",
    "position_logits",
    "token_term",
    "TOKEN_TERMS",
    "KEY_EMBEDDINGS",
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
    if spec.stage != "logits":
        return None
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
