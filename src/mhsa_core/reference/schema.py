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

Canonical weight dict (biases only with `use_bias`; key_bias only with
`use_key_bias`, which defaults to `use_bias`):

    position_kernel (C, C)          position_bias (C,)       # "conv" only
    query_kernel    (C, heads*kd)   query_bias (heads*kd,)
    key_kernel      (C, heads*kd)   key_bias   (heads*kd,)
    value_kernel    (C, C)          value_bias (C,)
    relative_height (2*Hr - 1, kd)  relative_width (2*Wr - 1, kd)   # "relative" only
    absolute_height (Hr, kd)        absolute_width (Wr, kd)         # "absolute" only
    query_norm_scale (kd,)          query_norm_bias (kd,)    # qk_norm ("layer": bias)
    key_norm_scale   (kd,)          key_norm_bias   (kd,)    # qk_norm ("layer": bias)
    output_norm_scale (C,)          output_norm_bias (C,)    # output_norm="layer"
    output_kernel   (C, C)          output_bias (C,)         # output_dense

(Hr, Wr) is the reference size of the learned tables (the layer's
`position_size`). The norms' weights are one per channel of a head, shared by
the heads (timm's `q_norm` / `k_norm`), and have no bias for "rms" (timm's
RmsNorm has none); their bias does not follow `use_bias`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
from numpy.typing import DTypeLike

__all__ = [
    "Encoding",
    "ENCODINGS",
    "POSITION_ENCODINGS",
    "PRESETS",
    "PROJECTIONS",
    "WEIGHT_ARGUMENTS",
    "encoding",
    "norm_weight_names",
    "option_weight_shapes",
    "table_names",
    "table_shapes",
    "weight_shapes",
    "random_weights",
    "weight_arguments",
    "table_stddev",
    "logits_dtype",
    "preset",
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
    """

    name: str
    stage: str | None
    tables: str | None = None
    rows: Callable[[int], int] | None = None
    token_weights: tuple[str, ...] = ()
    channels_multiple: int = 1
    summary: str = ""

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
        ),
    )
}
POSITION_ENCODINGS = tuple(ENCODINGS)

# The q/k/v projections, in creation order (after a "tokens" encoding's weights).
PROJECTIONS = ("query", "key", "value")

# The layer arguments that decide the weight dict: `weight_shapes`'s (and
# `random_weights`') arguments after the channels.
WEIGHT_ARGUMENTS = (
    "num_heads",
    "key_dim",
    "position_encoding",
    "use_bias",
    "position_size",
    "use_key_bias",
    "qk_norm",
    "output_norm",
    "output_dense",
)

# The learned vectors of each norm: timm's LayerNorm has a scale and a bias,
# its RmsNorm a scale only.
_NORM_PARAMETERS = {"layer": ("scale", "bias"), "rms": ("scale",)}
# (kernel, bias) of the output projection (`output_dense`).
OUTPUT_PROJECTION = ("output_kernel", "output_bias")


def encoding(name: str) -> Encoding:
    """The `Encoding` of `name`, or a ValueError naming `position_encoding`."""
    if name not in ENCODINGS:
        raise ValueError(
            "Received an invalid value for argument `position_encoding`, "
            f"expected one of {POSITION_ENCODINGS}. "
            f"Received: position_encoding={name!r}"
        )
    return ENCODINGS[name]


def table_names(name: str) -> tuple[str, str]:
    """(height table, width table) names of a learned encoding."""
    prefix = encoding(name).tables
    return (f"{prefix}_height", f"{prefix}_width")


def table_shapes(
    name: str, position_size: Sequence[int] | None, key_dim: int
) -> dict[str, tuple[int, int]]:
    """{table name: shape} of a learned encoding at reference size (Hr, Wr)."""
    spec = encoding(name)
    if not spec.learned_tables:
        return {}
    if position_size is None:
        raise ValueError(
            f"position_encoding={name!r} has learned tables: pass "
            "position_size=(Hr, Wr). Received: position_size=None"
        )
    return {
        table: (spec.table_rows(int(n)), int(key_dim))
        for table, n in zip(table_names(name), position_size)
    }


def norm_weight_names(prefix: str, norm: str | None) -> tuple[str, ...]:
    """The weights of a norm: ("query_norm_scale", "query_norm_bias") for
    `prefix` "query" and `norm` "layer", ("query_norm_scale",) for "rms",
    () for None."""
    return tuple(f"{prefix}_norm_{p}" for p in _NORM_PARAMETERS.get(norm or "", ()))


def option_weight_shapes(
    channels: int,
    key_dim: int,
    use_bias: bool = True,
    qk_norm: str | None = None,
    output_norm: str | None = None,
    output_dense: bool = False,
) -> dict[str, tuple[int, ...]]:
    """The weights that follow a "logits" encoding's tables, in creation
    order: the q and k norms (key_dim each, shared by the heads), the norm of
    the merged heads (C) and the output projection ((C, C), a bias with
    `use_bias`)."""
    shapes: dict[str, tuple[int, ...]] = {}
    for prefix in ("query", "key"):
        shapes.update({n: (key_dim,) for n in norm_weight_names(prefix, qk_norm)})
    shapes.update({n: (channels,) for n in norm_weight_names("output", output_norm)})
    if output_dense:
        kernel, bias = OUTPUT_PROJECTION
        shapes[kernel] = (channels, channels)
        if use_bias:
            shapes[bias] = (channels,)
    return shapes


def weight_shapes(
    channels: int,
    num_heads: int = 1,
    key_dim: int | None = None,
    position_encoding: str = "none",
    use_bias: bool = True,
    position_size: Sequence[int] | None = None,
    *,
    use_key_bias: bool | None = None,
    qk_norm: str | None = None,
    output_norm: str | None = None,
    output_dense: bool = False,
) -> dict[str, tuple[int, ...]]:
    """Shapes of the canonical weight dict, in the layer's creation order.

    `position_size` (Hr, Wr) is needed by the learned encodings only;
    `use_key_bias` None means `use_bias`.
    """
    spec = encoding(position_encoding)
    key_dim = channels // num_heads if key_dim is None else key_dim
    qk = num_heads * key_dim
    biases = {
        "query": use_bias,
        "key": use_bias if use_key_bias is None else use_key_bias,
        "value": use_bias,
    }
    shapes: dict[str, tuple[int, ...]] = {}
    if spec.token_weights:
        kernel, bias = spec.token_weights
        shapes[kernel] = (channels, channels)
        if use_bias:
            shapes[bias] = (channels,)
    for name, width in zip(PROJECTIONS, (qk, qk, channels)):
        shapes[f"{name}_kernel"] = (channels, width)
        if biases[name]:
            shapes[f"{name}_bias"] = (width,)
    shapes.update(table_shapes(position_encoding, position_size, key_dim))
    shapes.update(
        option_weight_shapes(
            channels, key_dim, use_bias, qk_norm, output_norm, output_dense
        )
    )
    return shapes


def weight_arguments(config: Mapping[str, Any]) -> dict[str, Any]:
    """The `WEIGHT_ARGUMENTS` a layer config states (for `weight_shapes` /
    `random_weights` after the channels)."""
    return {k: config[k] for k in WEIGHT_ARGUMENTS if k in config}


def table_stddev(key_dim: int) -> float:
    """BoTNet's (and timm's) initial standard deviation of the position tables."""
    return 1.0 / math.sqrt(key_dim)


def random_weights(
    channels: int,
    num_heads: int = 1,
    key_dim: int | None = None,
    position_encoding: str = "none",
    use_bias: bool = True,
    seed: int | None = 0,
    dtype: DTypeLike = np.float64,
    position_size: Sequence[int] | None = None,
    *,
    use_key_bias: bool | None = None,
    qk_norm: str | None = None,
    output_norm: str | None = None,
    output_dense: bool = False,
) -> dict[str, np.ndarray]:
    """He-normal kernels, small random biases, N(0, 1/key_dim) position tables,
    norm scales N(1, 0.2^2), drawn with NumPy (in creation order, so the
    weights that an option adds at the end leave the others' draws as they
    were).

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
        channels,
        num_heads,
        key_dim,
        position_encoding,
        use_bias,
        position_size,
        use_key_bias=use_key_bias,
        qk_norm=qk_norm,
        output_norm=output_norm,
        output_dense=output_dense,
    ).items():
        if name in tables:
            std = table_stddev(shape[1])
        elif name.endswith("kernel"):
            std = math.sqrt(2.0 / shape[0])
        elif name.endswith("_norm_scale"):
            std = 0.2
        else:
            std = 0.1
        values = rng.standard_normal(shape) * std
        if name.endswith("_norm_scale"):
            values = 1.0 + values  # around the norms' initial scale, 1
        out[name] = values.astype(dtype)
    return out


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
