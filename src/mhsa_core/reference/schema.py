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
    relative_bias_table (2*Hr - 1, 2*Wr - 1, heads)       # "relative_bias" only
    rope_frequencies (2, heads, kd / 2)                             # "rope_mixed" only
    query_norm_scale (kd,)          query_norm_bias (kd,)    # qk_norm ("layer": bias)
    key_norm_scale   (kd,)          key_norm_bias   (kd,)    # qk_norm ("layer": bias)
    output_norm_scale (C,)          output_norm_bias (C,)    # output_norm="layer"
    output_kernel   (C, C)          output_bias (C,)         # output_dense

(Hr, Wr) is the reference size of the learned tables (the layer's
`position_size`; with windows it defaults to the window). The norms' weights
are one per channel of a head, shared by the heads (timm's `q_norm` /
`k_norm`), and have no bias for "rms" (timm's RmsNorm has none); their bias
does not follow `use_bias`. The rotary encodings ("rope", "rope_mixed") act on
q and k (stage "qk"); their settings are the layer's `rope_*` arguments,
resolved by `rope_settings`.
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
    "GRID_INDEXINGS",
    "ROPE_DEFAULTS",
    "ROPE_LAYOUTS",
    "RopeSettings",
    "Rotary",
    "rope_mixed_frequencies",
    "rope_settings",
    "POSITION_ENCODINGS",
    "PRESETS",
    "PROJECTIONS",
    "WEIGHT_ARGUMENTS",
    "encoding",
    "norm_weight_names",
    "option_weight_shapes",
    "table_names",
    "table_shapes",
    "position_size_of_table",
    "weight_shapes",
    "random_weights",
    "weight_arguments",
    "table_stddev",
    "logits_dtype",
    "preset",
    "SHIFT_MASK_LOGIT",
]


# The rotation layouts of the rotary encodings: timm's `rot` (pairs of
# neighbouring channels) and `rope_rotate_half` (channel i with i + kd / 2).
ROPE_LAYOUTS = ("interleaved", "half")
# How the two grid axes map onto the rotary channels (timm's `grid_indexing`).
GRID_INDEXINGS = ("ij", "xy")
# The layer's rope_* arguments and their defaults (EVA-02's settings; None:
# the encoding's own default, `Rotary`).
ROPE_DEFAULTS: dict[str, Any] = {
    "rope_temperature": None,
    "rope_layout": "interleaved",
    "rope_grid_indexing": None,
    "rope_grid_offset": 0.0,
    "rope_in_pixels": False,
    "rope_max_resolution": 224,
}


@dataclasses.dataclass(frozen=True)
class Rotary:
    """What a rotary encoding ("qk" stage) reads of the `rope_*` arguments.

    Attributes:
        temperature: the default of `rope_temperature`.
        grid_indexing: the default of `rope_grid_indexing`.
        arguments: the `rope_*` arguments it reads; any other one must keep
            its default (`ROPE_DEFAULTS`).
    """

    temperature: float
    grid_indexing: str
    arguments: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class RopeSettings:
    """The resolved settings of a rotary encoding (`rope_settings`).

    Attributes:
        temperature: base of the frequencies ("rope": w_k =
            temperature^(-k / (kd / 4)); "rope_mixed": of their initial
            magnitudes).
        layout: "interleaved" or "half" (`ROPE_LAYOUTS`).
        grid_indexing: "ij" (the first half of the rotary channels follows
            the row) or "xy" (the column).
        grid_offset: added to the integer grid ("rope", not in pixels).
        in_pixels: the grid is linspace(-1, 1) per axis and the frequencies
            pixel bands up to `max_resolution` ("rope").
        max_resolution: see `in_pixels`.
        reference_size: (Hr, Wr): the grid is scaled by Hr / H and Wr / W
            (EVA's `ref_feat_shape`), or None: unscaled.
    """

    temperature: float
    layout: str
    grid_indexing: str
    grid_offset: float
    in_pixels: bool
    max_resolution: float
    reference_size: tuple[int, int] | None


@dataclasses.dataclass(frozen=True)
class Encoding:
    """What every implementation must know of one position encoding.

    Attributes:
        name: the value of `position_encoding`.
        stage: "tokens" (a term added to the tokens before the projections),
            "logits" (a term added to the attention logits), "qk" (a
            rotation of q and k before the attention) or None (nothing).
        tables: prefix of the learned per-axis tables ("relative" gives
            `relative_height`, `relative_width`), or None.
        rows: rows of a table for a reference size of n along its axis
            (None without tables; `table_rows` is the checked call).
        token_weights: names of the weights of a "tokens" stage, kernel then
            bias, (C, C) and (C,), created before the projections.
        channels_multiple: C must be a multiple of this.
        key_dim_multiple: the key_dim of a head must be a multiple of this.
        rotary: the `rope_*` arguments it reads and their defaults, or None.
        reference_grid: whether `position_size` is the reference grid its
            positions are normalised against ("rope": EVA's `ref_feat_shape`;
            None there means no normalisation).
        frequencies: the name of its learned rotary frequencies, (2, heads,
            kd / 2) (a "qk" stage weight, created after the projections), or
            None.
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
    key_dim_multiple: int = 1
    rotary: Rotary | None = None
    reference_grid: bool = False
    frequencies: str | None = None
    summary: str = ""
    per_head_table: bool = False
    init_stddev: float | None = None
    refused_in_windows: str = ""

    @property
    def learned_tables(self) -> bool:
        return self.tables is not None

    @property
    def refused_with_prefix_tokens(self) -> str:
        """Why the encoding cannot take prefix tokens (class, register
        tokens), or "" when it can: a "logits" term is a table of offsets
        (or of the key's row and column) between places in the map, and a
        prefix token has no place (BEiT's extra class entries of its
        relative table are not modelled). The others act on the map's tokens
        only: a "tokens" term is added to the map's tokens, a "qk" rotation
        rotates the map's q and k and leaves the prefix tokens' as they are
        (EVA, DINOv3)."""
        if self.stage != "logits":
            return ""
        return (
            "its logits term is a table of the places of the map's tokens, and "
            "prefix tokens have no place in the map (BEiT's extra class-token "
            "entries of the relative table are not modelled)"
        )

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
        Encoding(
            "rope",
            "qk",
            key_dim_multiple=4,
            rotary=Rotary(10000.0, "ij", tuple(ROPE_DEFAULTS)),
            reference_grid=True,
            summary="2-D axial rotary embedding of q and k (EVA's RotaryEmbeddingCat)",
        ),
        Encoding(
            "rope_mixed",
            "qk",
            key_dim_multiple=4,
            rotary=Rotary(
                10.0, "xy", ("rope_temperature", "rope_layout", "rope_grid_indexing")
            ),
            frequencies="rope_frequencies",
            summary="2-D rotary embedding of q and k with learned per-head "
            "frequencies (RoPE-Mixed)",
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
    "kv_reduction",
    "context_channels",
)

# The learned vectors of each norm: timm's LayerNorm has a scale and a bias,
# its RmsNorm a scale only.
_NORM_PARAMETERS = {"layer": ("scale", "bias"), "rms": ("scale",)}
# (kernel, bias) of the output projection (`output_dense`).
OUTPUT_PROJECTION = ("output_kernel", "output_bias")
# (kernel, bias) of `kv_reduction`'s conv, before its norm's weights
# (`norm_weight_names("reduction", "layer")`).
REDUCTION_CONV = ("reduction_kernel", "reduction_bias")


def reduction_weight_shapes(
    channels: int, kv_reduction: int | str | None, use_bias: bool = True
) -> dict[str, tuple[int, ...]]:
    """The weights of `kv_reduction` on a key/value map of `channels`, in
    creation order (after every other weight): the conv kernel (R, R, C, C)
    for an int R (Keras's HWIO layout) or (C, C) for "pool" (its 1x1 conv),
    its bias (C,) with `use_bias`, then its LayerNorm's scale and bias (C,)."""
    if kv_reduction is None:
        return {}
    kernel, bias = REDUCTION_CONV
    shapes: dict[str, tuple[int, ...]] = {}
    if kv_reduction == "pool":
        shapes[kernel] = (channels, channels)
    else:
        r = int(kv_reduction)
        shapes[kernel] = (r, r, channels, channels)
    if use_bias:
        shapes[bias] = (channels,)
    shapes.update({n: (channels,) for n in norm_weight_names("reduction", "layer")})
    return shapes


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


def rope_settings(
    position_encoding: str,
    *,
    position_size: Sequence[int] | None = None,
    rope_temperature: float | None = None,
    rope_layout: str = "interleaved",
    rope_grid_indexing: str | None = None,
    rope_grid_offset: float = 0.0,
    rope_in_pixels: bool = False,
    rope_max_resolution: float = 224,
) -> RopeSettings | None:
    """The resolved `RopeSettings` of a rotary encoding, None for the others.

    The arguments are the layer's (unchecked here: `reference.arguments`);
    None takes the encoding's default (`Encoding.rotary`). `position_size`
    is the reference grid of "rope" (EVA's `ref_feat_shape`); "rope_mixed"
    has none (timm's RotaryEmbeddingMixed takes no `ref_feat_shape`).
    """
    spec = encoding(position_encoding)
    rotary = spec.rotary
    if rotary is None:
        return None
    return RopeSettings(
        temperature=float(
            rotary.temperature if rope_temperature is None else rope_temperature
        ),
        layout=rope_layout,
        grid_indexing=rotary.grid_indexing
        if rope_grid_indexing is None
        else rope_grid_indexing,
        grid_offset=float(rope_grid_offset),
        in_pixels=bool(rope_in_pixels),
        max_resolution=float(rope_max_resolution),
        reference_size=(
            (int(position_size[0]), int(position_size[1]))
            if spec.reference_grid and position_size is not None
            else None
        ),
    )


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
    *,
    use_key_bias: bool | None = None,
    qk_norm: str | None = None,
    output_norm: str | None = None,
    output_dense: bool = False,
    kv_reduction: int | str | None = None,
    context_channels: int | None = None,
) -> dict[str, tuple[int, ...]]:
    """Shapes of the canonical weight dict, in the layer's creation order.

    `position_size` (Hr, Wr) is needed by the learned encodings only;
    `use_key_bias` None means `use_bias`. `context_channels` C' (cross-
    attention): the key and value kernels are (C', heads * kd) and (C', C),
    and `kv_reduction`'s weights act on C' channels.
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
    kv_channels = channels if context_channels is None else int(context_channels)
    for name, width in zip(PROJECTIONS, (qk, qk, channels)):
        shapes[f"{name}_kernel"] = (channels if name == "query" else kv_channels, width)
        if biases[name]:
            shapes[f"{name}_bias"] = (width,)
    shapes.update(table_shapes(position_encoding, position_size, key_dim, num_heads))
    if spec.frequencies is not None:
        shapes[spec.frequencies] = (2, num_heads, key_dim // 2)
    shapes.update(
        option_weight_shapes(
            channels, key_dim, use_bias, qk_norm, output_norm, output_dense
        )
    )
    shapes.update(reduction_weight_shapes(kv_channels, kv_reduction, use_bias))
    return shapes


def weight_arguments(config: Mapping[str, Any]) -> dict[str, Any]:
    """The `WEIGHT_ARGUMENTS` a layer config states (for `weight_shapes` /
    `random_weights` after the channels)."""
    return {k: config[k] for k in WEIGHT_ARGUMENTS if k in config}


def rope_mixed_frequencies(
    num_heads: int, key_dim: int, angles: np.ndarray, temperature: float = 10.0
) -> np.ndarray:
    """RoPE-Mixed's initial frequencies (2, heads, kd / 2), as timm's
    `init_random_2d_freqs` for one layer.

    Per head h, with magnitudes m_k = temperature^(-4k / kd), k < kd / 4, and
    the head's angle a_h (`angles`, (heads,), uniform in [0, 2 pi) at init):
    f_x = [m cos(a_h), m cos(a_h + pi / 2)], f_y = [m sin(a_h), m sin(a_h + pi / 2)].
    """
    magnitude = 1.0 / temperature ** (np.arange(0, key_dim, 4) / key_dim)  # (kd/4,)
    a = np.asarray(angles, np.float64).reshape(num_heads, 1)
    fx = np.concatenate([magnitude * np.cos(a), magnitude * np.cos(a + np.pi / 2)], -1)
    fy = np.concatenate([magnitude * np.sin(a), magnitude * np.sin(a + np.pi / 2)], -1)
    return np.stack([fx, fy])  # (2, heads, kd / 2)


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
    *,
    use_key_bias: bool | None = None,
    qk_norm: str | None = None,
    output_norm: str | None = None,
    output_dense: bool = False,
    kv_reduction: int | str | None = None,
    context_channels: int | None = None,
) -> dict[str, np.ndarray]:
    """He-normal kernels, small random biases, N(0, 1/key_dim) position tables
    (N(0, `RANDOM_BIAS_STDDEV`) per-head bias tables), RoPE-Mixed's initial
    frequencies (a random angle per head), norm scales N(1, 0.2^2), drawn with
    NumPy (in creation order, so the weights that an option adds at the end
    leave the others' draws as they were).

    Cross-backend comparisons always inject these: the same Keras seed gives
    different initial values on each backend.
    """
    rng = np.random.default_rng(seed)
    tables = (
        set(table_names(position_encoding))
        if encoding(position_encoding).learned_tables
        else set()
    )
    spec = encoding(position_encoding)
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
        kv_reduction=kv_reduction,
        context_channels=context_channels,
    ).items():
        if name == spec.frequencies and spec.rotary is not None:
            angles = rng.uniform(0.0, 2 * np.pi, shape[1])
            out[name] = rope_mixed_frequencies(
                shape[1], 2 * shape[2], angles, spec.rotary.temperature
            ).astype(dtype)
            continue
        if name in tables and encoding(position_encoding).per_head_table:
            std = RANDOM_BIAS_STDDEV
        elif name in tables:
            std = table_stddev(shape[1])
        elif name.endswith("kernel"):
            std = math.sqrt(2.0 / math.prod(shape[:-1]))  # fan-in
        elif name.endswith("_norm_scale"):
            std = 0.2
        else:
            std = 0.1
        values = rng.standard_normal(shape) * std
        if name.endswith("_norm_scale"):
            values = 1.0 + values  # around the norms' initial scale, 1
        out[name] = values.astype(dtype)
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
