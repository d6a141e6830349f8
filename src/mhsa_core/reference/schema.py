"""The schema every implementation shares: encodings, weights, presets (NumPy only).

The layer (`mhsa_core.layers`), the float64 reference (`mhsa_core.reference`),
the native per-framework references (`mhsa_core.natives`) and the
consistency tool all read these facts from here, so each is written once:

- `ENCODINGS`: each position encoding's stage (tokens or logits), its learned
  per-axis tables (name prefix, rows for a reference size) and its
  constraints on the channels;
- `weight_shapes` / `random_weights`: the canonical weight dict, in the
  layer's creation order;
- `PRESETS`: the configurations of the Keras 2 YOLOv4-MHSA block and BoTNet;
- `logits_dtype`: the dtype the logits and softmax are computed in.

Canonical weight dict (biases only with `use_bias`):

    position_kernel (C, C)          position_bias (C,)       # "conv" only
    query_kernel    (C, heads*kd)   query_bias (heads*kd,)
    key_kernel      (C, heads*kd)   key_bias   (heads*kd,)
    value_kernel    (C, C)          value_bias (C,)
    relative_height (2*Hr - 1, kd)  relative_width (2*Wr - 1, kd)   # "relative" only
    absolute_height (Hr, kd)        absolute_width (Wr, kd)         # "absolute" only
    relative_bias_table (2*Hr - 1, 2*Wr - 1, heads)       # "relative_bias" only

(Hr, Wr) is the reference size of the learned tables (the layer's
`position_size`; with windows it defaults to the window).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from numpy.typing import DTypeLike

__all__ = [
    "Encoding",
    "ENCODINGS",
    "POSITION_ENCODINGS",
    "PRESETS",
    "PROJECTIONS",
    "encoding",
    "table_names",
    "table_shapes",
    "position_size_of_table",
    "weight_shapes",
    "random_weights",
    "table_stddev",
    "logits_dtype",
    "preset",
    "SHIFT_MASK_LOGIT",
]


@dataclasses.dataclass(frozen=True)
class Encoding:
    """What every implementation must know of one position encoding.

    Attributes:
        name: the value of `position_encoding`.
        stage: "tokens" (a term added to the tokens before the projections),
            "logits" (a term added to the attention logits) or None (nothing).
        tables: prefix of the learned per-axis tables ("relative" gives
            `relative_height`, `relative_width`), or None.
        rows: rows of a table for a reference size of n along its axis
            (None without tables; `table_rows` is the checked call).
        token_weights: names of the weights of a "tokens" stage, kernel then
            bias, (C, C) and (C,), created before the projections.
        channels_multiple: C must be a multiple of this.
        summary: one line for errors and docs.
        per_head_table: the learned weights are one table of per-head logit
            biases, `{tables}_table` (rows(Hr), rows(Wr), heads) indexed by
            the (row, column) offset of key from query (Swin's relative
            position bias), instead of a height and a width table of
            (rows(n), key_dim).
        init_stddev: the default initializer's standard deviation of the
            tables (normal); None: 1 / sqrt(key_dim) (`table_stddev`).
        refused_in_windows: why the encoding cannot run inside windows
            (`window_size`), or "" when it can.
    """

    name: str
    stage: str | None
    tables: str | None = None
    rows: Callable[[int], int] | None = None
    token_weights: tuple[str, ...] = ()
    channels_multiple: int = 1
    summary: str = ""
    per_head_table: bool = False
    init_stddev: float | None = None
    refused_in_windows: str = ""

    @property
    def learned_tables(self) -> bool:
        return self.tables is not None

    def table_rows(self, n: int) -> int:
        """`rows(n)`: the rows of a table for a reference size of n along its
        axis; a ValueError for an encoding without learned tables."""
        if self.rows is None:
            raise ValueError(
                f"position_encoding={self.name!r} has no learned tables, so no "
                f"table rows. Received: n={n!r}"
            )
        return self.rows(n)

    def size_for_rows(self, rows: int) -> int | None:
        """The reference size n whose table has `rows` rows, or None if no n
        gives that many (an even count for "relative")."""
        return next(
            (n for n in range(1, int(rows) + 1) if self.table_rows(n) == rows), None
        )


ENCODINGS: dict[str, Encoding] = {
    e.name: e
    for e in (
        Encoding("none", None, summary="no position term"),
        Encoding(
            "conv",
            "tokens",
            token_weights=("position_kernel", "position_bias"),
            summary="the Keras 2 YOLOv4-MHSA block's ReLU 1x1 conv of each token, "
            "added to the tokens (it carries no position)",
        ),
        Encoding(
            "sinusoidal",
            "tokens",
            channels_multiple=4,
            summary="fixed 2-D sine-cosine embedding added to the tokens",
        ),
        Encoding(
            "relative",
            "logits",
            tables="relative",
            rows=lambda n: 2 * n - 1,
            summary="BoTNet's 2-D relative position logits",
        ),
        Encoding(
            "absolute",
            "logits",
            tables="absolute",
            rows=lambda n: n,
            summary=(
                "learned factorized row and column embeddings of the key, in the logits"
            ),
            refused_in_windows=(
                "it embeds the key's own row and column; inside a window that "
                "would be the key's place in its window, which says nothing of "
                "its place in the map and changes with the shift. Use "
                "'relative_bias' or 'relative' (offsets within the window), or a "
                "'tokens' encoding ('sinusoidal'), which sees the whole map"
            ),
        ),
        Encoding(
            "relative_bias",
            "logits",
            tables="relative_bias",
            rows=lambda n: 2 * n - 1,
            per_head_table=True,
            # timm's Swin: trunc_normal_(std=.02) (truncated at +-2, i.e.
            # 100 standard deviations: a normal).
            init_stddev=0.02,
            summary="Swin's learned per-head bias of the (row, column) offset",
        ),
    )
}
POSITION_ENCODINGS = tuple(ENCODINGS)

# The q/k/v projections, in creation order (after a "tokens" encoding's weights).
PROJECTIONS = ("query", "key", "value")


def encoding(name: str) -> Encoding:
    """The `Encoding` of `name`, or a ValueError naming `position_encoding`."""
    if name not in ENCODINGS:
        raise ValueError(
            "Received an invalid value for argument `position_encoding`, "
            f"expected one of {POSITION_ENCODINGS}. "
            f"Received: position_encoding={name!r}"
        )
    return ENCODINGS[name]


def table_names(name: str) -> tuple[str, ...]:
    """The learned tables' names: (height table, width table), or the one
    per-head bias table of "relative_bias"."""
    spec = encoding(name)
    if spec.per_head_table:
        return (f"{spec.tables}_table",)
    return (f"{spec.tables}_height", f"{spec.tables}_width")


def table_shapes(
    name: str,
    position_size: Sequence[int] | None,
    key_dim: int,
    num_heads: int = 1,
) -> dict[str, tuple[int, ...]]:
    """{table name: shape} of a learned encoding at reference size (Hr, Wr):
    (rows(Hr), key_dim) and (rows(Wr), key_dim), or (rows(Hr), rows(Wr),
    num_heads) for a per-head bias table."""
    spec = encoding(name)
    if not spec.learned_tables:
        return {}
    if position_size is None:
        raise ValueError(
            f"position_encoding={name!r} has learned tables: pass "
            "position_size=(Hr, Wr). Received: position_size=None"
        )
    if spec.per_head_table:
        rows = tuple(spec.table_rows(int(n)) for n in position_size)
        return {table_names(name)[0]: (*rows, int(num_heads))}
    return {
        table: (spec.table_rows(int(n)), int(key_dim))
        for table, n in zip(table_names(name), position_size)
    }


def position_size_of_table(name: str, shape: Sequence[int]) -> tuple[int, ...] | None:
    """(Hr, Wr) of a per-head bias table of `shape` (rows(Hr), rows(Wr),
    heads), or None if no reference size gives those rows (an even count)."""
    spec = encoding(name)
    if len(shape) != 3:
        return None
    size = [spec.size_for_rows(int(rows)) for rows in shape[:2]]
    return tuple(n for n in size if n is not None) if None not in size else None


def weight_shapes(
    channels: int,
    num_heads: int = 1,
    key_dim: int | None = None,
    position_encoding: str = "none",
    use_bias: bool = True,
    position_size: Sequence[int] | None = None,
) -> dict[str, tuple[int, ...]]:
    """Shapes of the canonical weight dict, in the layer's creation order.

    `position_size` (Hr, Wr) is needed by the learned encodings only.
    """
    spec = encoding(position_encoding)
    key_dim = channels // num_heads if key_dim is None else key_dim
    qk = num_heads * key_dim
    shapes: dict[str, tuple[int, ...]] = {}
    if spec.token_weights:
        kernel, bias = spec.token_weights
        shapes[kernel] = (channels, channels)
        if use_bias:
            shapes[bias] = (channels,)
    for name, width in zip(PROJECTIONS, (qk, qk, channels)):
        shapes[f"{name}_kernel"] = (channels, width)
        if use_bias:
            shapes[f"{name}_bias"] = (width,)
    shapes.update(table_shapes(position_encoding, position_size, key_dim, num_heads))
    return shapes


def table_stddev(key_dim: int, position_encoding: str | None = None) -> float:
    """The default initial standard deviation of a position table: BoTNet's
    (and timm's) 1 / sqrt(key_dim), or the encoding's own `init_stddev`
    (timm's 0.02 for Swin's "relative_bias")."""
    if position_encoding is not None:
        stddev = encoding(position_encoding).init_stddev
        if stddev is not None:
            return stddev
    return 1.0 / math.sqrt(key_dim)


# The spread of a per-head bias table in `random_weights`: trained Swin
# tables reach several units, so that the bias moves the softmax as much as
# q.k does (a 0.02 table would hide a wrong offset in round-off).
RANDOM_BIAS_STDDEV = 1.0


def random_weights(
    channels: int,
    num_heads: int = 1,
    key_dim: int | None = None,
    position_encoding: str = "none",
    use_bias: bool = True,
    seed: int | None = 0,
    dtype: DTypeLike = np.float64,
    position_size: Sequence[int] | None = None,
) -> dict[str, np.ndarray]:
    """He-normal kernels, small random biases, N(0, 1/key_dim) position tables
    (N(0, `RANDOM_BIAS_STDDEV`) per-head bias tables), drawn with NumPy.

    Cross-backend comparisons always inject these: the same Keras seed gives
    different initial values on each backend.
    """
    rng = np.random.default_rng(seed)
    tables = (
        set(table_names(position_encoding))
        if encoding(position_encoding).learned_tables
        else set()
    )
    out = {}
    for name, shape in weight_shapes(
        channels, num_heads, key_dim, position_encoding, use_bias, position_size
    ).items():
        if name in tables and encoding(position_encoding).per_head_table:
            std = RANDOM_BIAS_STDDEV
        elif name in tables:
            std = table_stddev(shape[1])
        elif name.endswith("kernel"):
            std = math.sqrt(2.0 / shape[0])
        else:
            std = 0.1
        out[name] = (rng.standard_normal(shape) * std).astype(dtype)
    return out


# What Swin's shifted-window mask adds to the logits of a query and a key of
# two regions that the cyclic shift put in one window (timm's
# `get_attn_mask`): -100, not -inf, as the checkpoints were trained with it.
SHIFT_MASK_LOGIT = -100.0


def logits_dtype(dtype: str) -> str:
    """The dtype the logits and softmax are computed in, for inputs of `dtype`.

    At least float32: under mixed_float16 the YOLOv4-MHSA block's unscaled
    ReLU logits reach several hundred; exp() of that overflows float16 (max
    65504) and the sums lose every digit. `dtype` is a standardized name
    ("float16", "bfloat16", "float32", "float64").
    """
    return "float32" if dtype in ("float16", "bfloat16") else dtype


# Layer configurations of the blocks the library reproduces. The classmethods
# `MultiHeadSelfAttention2D.yolov4_mhsa()` / `.botnet()`, the reference and the
# consistency tool's cases all take them from here.
PRESETS: dict[str, dict[str, Any]] = {
    # The Keras 2 `mhsa_block` of YOLOv4-MHSA / CSPDarknet53-MHSA: one head,
    # ReLU 1x1 projections with biases, a ReLU 1x1 "position" conv added to the
    # tokens, unscaled logits, he_normal kernels (Conv2D's in that code).
    "yolov4_mhsa": {
        "num_heads": 1,
        "key_dim": None,
        "activation": "relu",
        "position_encoding": "conv",
        "scale": 1.0,
        "use_bias": True,
        "kernel_initializer": "he_normal",
    },
    # BoTNet (Srinivas et al. 2021): linear bias-free projections, logits
    # scaled by 1/sqrt(key_dim), 2-D relative position logits scaled with them
    # (the official code; timm's default is scale_position_logits=False),
    # lecun_normal kernels (timm's truncated normal with stddev 1/sqrt(C)).
    "botnet": {
        "num_heads": 4,
        "activation": None,
        "use_bias": False,
        "scale": None,
        "position_encoding": "relative",
        "scale_position_logits": True,
        "kernel_initializer": "lecun_normal",
    },
}


def preset(name: str, /, **overrides: Any) -> dict[str, Any]:
    """A copy of `PRESETS[name]` with `overrides` applied."""
    if name not in PRESETS:
        raise ValueError(
            f"Unknown preset. Expected one of {sorted(PRESETS)}. "
            f"Received: name={name!r}"
        )
    return {**PRESETS[name], **overrides}
