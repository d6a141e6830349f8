"""What the native implementations share: the schema's facts and the layer's
argument rules, applied one way, and the bench configs' block.

`tensorflow.py`, `torch.py` and `jax.py` are independent implementations,
each in its framework's idiom; that is their worth as oracles. What they must
agree on is not theirs to define, so it is read here from the NumPy
reference, never written again:

- the position encodings, their tables (names, rows for a reference size) and
  the canonical weight dict: `mhsa_core.reference.schema`;
- the argument rules and their messages: `mhsa_core.reference.arguments`, the
  table the layer applies too (`check_config` -> `BlockConfig`), and the
  weight-dict check (`check_weights`);
- the config's defaults: those of `mhsa_core.reference.mhsa_forward` (the
  layer's); the natives' signatures spell them out, tests/backends checks
  that they agree; how the NumPy helpers complete a config from the weights
  (`numpy_config`);
- Swin's "relative_bias" and windows: where the resize of a per-head table
  puts the source offsets (`bias_offsets`, timm's bisection, read from the
  reference: scalar Python, no framework idiom to it); each native does the
  interpolation, the gather and the windows in its own idiom;
- for the fused forms the bench measures: what they need of a bench config
  (`FusedBlock`) and the relative tables' offset index (`relative_index`).

Imports NumPy and `mhsa_core.reference` only (no framework, no Keras).
"""

from __future__ import annotations

import dataclasses
import inspect
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

import numpy as np
from numpy.typing import ArrayLike

from mhsa_core.reference import LAYER_ARGUMENTS, arguments, mhsa_forward, schema
from mhsa_core.reference.forward import window_layout
from mhsa_core.reference.position import geometric_offsets

__all__ = [
    "DEFAULTS",
    "FUSED_ENCODINGS",
    "BlockConfig",
    "FusedBlock",
    "bias_offsets",
    "check_config",
    "check_weights",
    "has_bias",
    "learned_size",
    "numpy_config",
    "position_size_of",
    "relative_index",
]

# The block's config arguments and their defaults, as the reference's.
DEFAULTS = {
    name: parameter.default
    for name, parameter in inspect.signature(mhsa_forward).parameters.items()
    if name in LAYER_ARGUMENTS
}


@dataclasses.dataclass(frozen=True)
class BlockConfig:
    """A checked block config for C=`channels`, the defaults resolved."""

    channels: int
    num_heads: int
    head_dim: int  # value width per head, C // num_heads
    key_dim: int
    activation: str | None  # a name of the native's table
    position_encoding: str
    scale: float
    scale_position_logits: bool
    data_format: str
    use_bias: bool
    position_size: tuple[int, ...] | None
    use_key_bias: bool = True  # resolved: `use_bias` when given as None
    qk_norm: str | None = None
    output_norm: str | None = None
    output_dense: bool = False
    norm_epsilon: float = 1e-6
    rope: schema.RopeSettings | None = None  # the rotary encodings' settings
    window_size: tuple[int, int] | None = None  # (wh, ww), or None: no windows
    shift_size: tuple[int, int] = (0, 0)
    kv_reduction: int | str | None = None  # None, R or "pool"
    kv_pool_size: tuple[int, int] = (7, 7)
    context_channels: int | None = None  # C' of a context, None: no context

    @property
    def kv_channels(self) -> int:
        """The channels of the keys' and values' map: C', else C."""
        return self.channels if self.context_channels is None else self.context_channels

    @property
    def encoding(self) -> schema.Encoding:
        return schema.encoding(self.position_encoding)

    def norm_weights(self, prefix: str) -> tuple[str, ...]:
        """The canonical names of the norm `prefix` ("query", "key" or
        "output"): (scale,), (scale, bias) or () when that norm is off."""
        kind = self.output_norm if prefix == "output" else self.qk_norm
        return schema.norm_weight_names(prefix, kind)

    def check_prefix_tokens(self, batch: int, shape: Sequence[int]) -> int:
        """T of prefix tokens of `shape` (B, T, C) for an input of `batch`
        items, after the layer's rules (`arguments.check_prefix_tokens`)."""
        shape = tuple(int(s) for s in shape)
        if len(shape) != 3 or shape[0] != batch or shape[2] != self.channels:
            raise ValueError(
                f"`prefix_tokens` must have shape (B, T, C)=({batch}, T, "
                f"{self.channels}). Received: prefix_tokens.shape={shape}"
            )
        arguments.check_prefix_tokens(
            shape,
            self.position_encoding,
            window_size=self.window_size,
            kv_reduction=self.kv_reduction,
            context_channels=self.context_channels,
        )
        return shape[1]

    @property
    def weight_shapes(self) -> dict[str, tuple[int, ...]]:
        """The canonical weight dict's shapes (`schema.weight_shapes`)."""
        return schema.weight_shapes(
            self.channels,
            self.num_heads,
            self.key_dim,
            self.position_encoding,
            self.use_bias,
            self.position_size,
            use_key_bias=self.use_key_bias,
            qk_norm=self.qk_norm,
            output_norm=self.output_norm,
            output_dense=self.output_dense,
            kv_reduction=self.kv_reduction,
            context_channels=self.context_channels,
        )


def check_config(
    channels: int,
    activations: Mapping[str | None, Callable[..., Any]],
    *,
    num_heads: int,
    key_dim: int | None,
    activation: str | None,
    position_encoding: str,
    scale: float | None,
    scale_position_logits: bool,
    data_format: str,
    use_bias: bool,
    position_size: Sequence[int] | None,
    use_key_bias: bool | None = None,
    qk_norm: str | None = None,
    output_norm: str | None = None,
    output_dense: bool = False,
    norm_epsilon: float = 1e-6,
    window_size: int | Sequence[int] | None = None,
    shift_size: int | Sequence[int] = 0,
    kv_reduction: int | str | None = None,
    kv_pool_size: int | Sequence[int] = 7,
    context_channels: int | None = None,
    **rope: Any,
) -> BlockConfig:
    """Check a block config for C=`channels`; returns its `BlockConfig`.

    The layer's rules (`reference.arguments`), but for `activation`: a name
    of `activations`, the native's own table (name -> function). `key_dim`
    defaults to C // num_heads; `scale` None means 1/sqrt(key_dim);
    `use_key_bias` None means `use_bias`. `rope`:
    the layer's `rope_*` arguments (`schema.ROPE_DEFAULTS`), resolved into
    `BlockConfig.rope` for a rotary encoding. `kv_reduction`,
    `kv_pool_size`: as the layer's; `context_channels`: C' of the context
    (cross-attention), None without one.

    Raises:
        ValueError: naming the argument and the value received.
    """
    arguments.check_arguments(
        {
            "num_heads": num_heads,
            "key_dim": key_dim,
            "position_encoding": position_encoding,
            "scale_position_logits": scale_position_logits,
            "scale": scale,
            "data_format": data_format,
            "use_key_bias": use_key_bias,
            "qk_norm": qk_norm,
            "output_norm": output_norm,
            "output_dense": output_dense,
            "norm_epsilon": norm_epsilon,
            "activation": activation,
            "window_size": window_size,
            "shift_size": shift_size,
            "kv_reduction": kv_reduction,
            "kv_pool_size": kv_pool_size,
            "context_channels": context_channels,
            **rope,
        },
        rules={"activation": arguments.one_of(sorted(activations, key=str))},
    )
    arguments.check_window(window_size, shift_size, position_encoding)
    arguments.check_kv(
        kv_reduction,
        window_size,
        position_encoding,
        context=context_channels is not None,
    )
    position_size = learned_size(position_encoding, position_size)
    arguments.check_channels(channels, num_heads, position_encoding, key_dim)
    head_dim = channels // num_heads
    key_dim = head_dim if key_dim is None else int(key_dim)
    return BlockConfig(
        channels=channels,
        num_heads=int(num_heads),
        head_dim=head_dim,
        key_dim=key_dim,
        activation=activation,
        position_encoding=position_encoding,
        scale=1.0 / math.sqrt(key_dim) if scale is None else float(scale),
        scale_position_logits=bool(scale_position_logits),
        data_format=data_format,
        use_bias=bool(use_bias),
        position_size=position_size,
        use_key_bias=bool(use_bias if use_key_bias is None else use_key_bias),
        qk_norm=qk_norm,
        output_norm=output_norm,
        output_dense=bool(output_dense),
        norm_epsilon=float(norm_epsilon),
        rope=schema.rope_settings(
            position_encoding, position_size=position_size, **rope
        ),
        window_size=None if window_size is None else arguments.pair(window_size),
        shift_size=arguments.pair(shift_size),
        kv_reduction=kv_reduction
        if kv_reduction in (None, "pool")
        else int(kv_reduction),
        kv_pool_size=arguments.pair(kv_pool_size),
        context_channels=None if context_channels is None else int(context_channels),
    )


def learned_size(
    position_encoding: str, position_size: Sequence[int] | None
) -> tuple[int, ...] | None:
    """`position_size` checked (the layer's rule), as a tuple (Hr, Wr) of ints
    for an encoding with learned tables or a reference grid ("rope"); else
    None (the argument is ignored).
    """
    arguments.check_arguments(
        {"position_encoding": position_encoding, "position_size": position_size}
    )
    spec = schema.encoding(position_encoding)
    if position_size is None or not (spec.learned_tables or spec.reference_grid):
        return None
    return tuple(int(n) for n in position_size)


def position_size_of(
    weights: Mapping[str, ArrayLike | None], position_encoding: str
) -> tuple[int, ...] | None:
    """(Hr, Wr) read off the learned tables in `weights`, or None (no tables).

    Raises ValueError when a table is missing, not 2-D, or has a row count
    that no reference size gives (an even one for "relative").
    """
    spec = schema.encoding(position_encoding)
    if not spec.learned_tables:
        return None
    if spec.per_head_table:
        (name,) = schema.table_names(position_encoding)
        table = weights.get(name)
        shape = None if table is None else np.shape(table)
        size_of = (
            None
            if shape is None
            else schema.position_size_of_table(position_encoding, shape)
        )
        if size_of is None:
            raise ValueError(
                f"position_encoding={position_encoding!r} needs a table {name!r} "
                "(2Hr - 1, 2Wr - 1, heads), odd rows and columns. "
                f"Received: {shape}"
            )
        return size_of
    size = []
    for name in schema.table_names(position_encoding):
        table = weights.get(name)
        if table is None or np.ndim(table) != 2:
            raise ValueError(
                f"position_encoding={position_encoding!r} needs a 2-D table {name!r}. "
                f"Received: {None if table is None else np.shape(table)}"
            )
        rows = np.shape(table)[0]
        n = spec.size_for_rows(rows)
        if n is None:
            raise ValueError(
                f"{name} has {rows} rows, which no reference size gives "
                f"(rows(1), rows(2) = {spec.table_rows(1)}, {spec.table_rows(2)})"
            )
        size.append(n)
    return tuple(size)


def has_bias(weights: Mapping[str, object]) -> bool:
    """Whether a weight dict has the biases of `use_bias` (None entries count
    as absent): those of the projections but the key's (`use_key_bias`), not
    the norms' (a LayerNorm's bias is there whatever `use_bias` says)."""
    return any(
        v is not None
        for k, v in weights.items()
        if k.endswith("_bias") and k != "key_bias" and "_norm_" not in k
    )


def check_weights(
    weights: Mapping[str, ArrayLike | None], expected: Mapping[str, Sequence[int]]
) -> None:
    """Raise ValueError unless `weights` has exactly the names and shapes of `expected`.

    `weights`: name -> array (None entries count as absent); `expected`:
    name -> shape, e.g. `schema.weight_shapes(...)`. Only shapes are read, so
    traced arrays will do.
    """
    given = {name: tuple(np.shape(v)) for name, v in weights.items() if v is not None}
    unexpected = sorted(set(given) - set(expected))
    missing = sorted(set(expected) - set(given))
    wrong = {
        name: f"{given[name]}, expected {tuple(shape)}"
        for name, shape in expected.items()
        if name in given and given[name] != tuple(shape)
    }
    if unexpected or missing or wrong:
        raise ValueError(
            f"The weight dict does not fit the block: unexpected {unexpected}, "
            f"missing {missing}, wrong shapes {wrong}"
        )


def numpy_config(
    x: ArrayLike,
    weights: Mapping[str, ArrayLike | None],
    config: Mapping[str, Any],
    context: ArrayLike | None = None,
) -> tuple[int, dict[str, Any]]:
    """A NumPy helper's config, complete; returns (channels, config).

    The natives' `forward` / `value_and_grad` take the config as keywords:
    missing ones get the defaults, `use_bias` defaults to whether `weights`
    has biases and `position_size` to the size read off its tables (if given,
    it must agree with them: the weight check says so), `context_channels`
    to the channels of `context` (None without one).
    """
    complete = {**DEFAULTS, **config}
    if context is not None:
        axis = 1 if complete["data_format"] == "channels_first" else -1
        complete.setdefault("context_channels", np.shape(context)[axis])
    # hashable (JAX's static arguments)
    for name in ("window_size", "shift_size", "kv_pool_size"):
        if isinstance(complete.get(name), list):
            complete[name] = tuple(complete[name])
    if complete.get("use_bias") is None:
        complete["use_bias"] = has_bias(weights)
    encoding = complete["position_encoding"]
    complete["position_size"] = learned_size(
        encoding, complete.get("position_size")
    ) or position_size_of(weights, encoding)
    channels = np.shape(x)[1 if complete["data_format"] == "channels_first" else -1]
    return channels, complete


# ------------------------------------------------------ the bench's fused forms
# What the fused forms carry (the bench's configs); the oracles carry all.
FUSED_ENCODINGS = ("none", "relative", "rope", "relative_bias")


class BenchShape(Protocol):
    """What `FusedBlock.of` reads of a bench config
    (`mhsa_core.bench.configs.BenchConfig`; the natives do not import the
    bench)."""

    @property
    def height(self) -> int: ...
    @property
    def width(self) -> int: ...
    @property
    def channels(self) -> int: ...
    @property
    def num_heads(self) -> int: ...
    @property
    def head_dim(self) -> int: ...
    @property
    def tokens(self) -> int: ...
    @property
    def position_encoding(self) -> str: ...
    @property
    def window_size(self) -> int: ...
    @property
    def shift_size(self) -> int: ...


@dataclasses.dataclass(frozen=True)
class FusedBlock:
    """What every fused form needs of a bench config: sizes, scale, the
    relative tables (at their reference size, the config's), rope's settings
    (the layer's defaults, EVA-02's), and Swin's windows (square, the map
    divisible by them, no padding) with the per-head bias table of the window
    (timm's convention: the bias is not scaled)."""

    height: int
    width: int
    channels: int
    heads: int
    d: int  # head dim (kd = dv)
    n: int  # tokens
    scale: float
    relative: bool
    tables: tuple[str, ...]  # (name of R_h, name of R_w) in the weight dict, or ()
    rope: schema.RopeSettings | None = None  # "rope": q and k rotated
    window: int = 0  # square windows of this side, or 0: global attention
    shift: int = 0
    bias_table: str | None = None  # "relative_bias": the table's name

    @classmethod
    def of(cls, config: BenchShape) -> FusedBlock:
        """From a bench config (`mhsa_core.bench.configs.BenchConfig`, or any
        object with its `height`, `width`, `channels`, `num_heads`,
        `head_dim`, `tokens` and `position_encoding`)."""
        kv_reduction = getattr(config, "kv_reduction", 0)
        if kv_reduction:
            raise ValueError(
                "The fused natives carry no kv_reduction (the bench plans no "
                f"native row for it). Received: kv_reduction={kv_reduction!r}"
            )
        if config.position_encoding not in FUSED_ENCODINGS:
            raise ValueError(
                f"The fused natives support position_encoding in {FUSED_ENCODINGS}. "
                f"Received: position_encoding={config.position_encoding!r}"
            )
        relative = config.position_encoding == "relative"
        window = getattr(config, "window_size", 0)
        windowed_encoding = config.position_encoding in ("none", "relative_bias")
        if window and (
            not windowed_encoding or config.height % window or config.width % window
        ):
            raise ValueError(
                "The fused natives take windows that divide the map, with no "
                "position term or 'relative_bias'. Received: "
                f"window_size={window}, map {config.height}x{config.width}, "
                f"position_encoding={config.position_encoding!r}"
            )
        if config.position_encoding == "relative_bias" and not window:
            raise ValueError(
                "The fused natives take 'relative_bias' in windows only. "
                f"Received: window_size={window}"
            )
        return cls(
            config.height,
            config.width,
            config.channels,
            config.num_heads,
            config.head_dim,
            config.tokens,
            1.0 / math.sqrt(config.head_dim),
            relative,
            schema.table_names("relative") if relative else (),
            rope=schema.rope_settings(config.position_encoding),
            window=window,
            shift=getattr(config, "shift_size", 0) if window else 0,
            bias_table=(
                schema.table_names("relative_bias")[0]
                if config.position_encoding == "relative_bias"
                else None
            ),
        )

    @property
    def windows(self) -> int:
        """Windows per map."""
        return (self.height // self.window) * (self.width // self.window)

    def window_bias(self) -> np.ndarray:
        """(nW, Nw, Nw) float32: Swin's shift mask of each window (-100 between
        the shift's regions, 0 within; all 0 without a shift), from the
        reference's window layout."""
        _, _, regions = window_layout(self.height, self.width, self.window, self.shift)
        labels = np.asarray(regions)  # (nW, Nw), no padding here
        apart = labels[:, :, None] != labels[:, None, :]
        return np.where(apart, schema.SHIFT_MASK_LOGIT, 0.0).astype(np.float32)

    def bias_index(self) -> tuple[np.ndarray, np.ndarray]:
        """((Nw, Nw), (Nw, Nw)) int: the (row, column) of the per-head table
        for (query, key) of a window: query minus key + window - 1."""
        ys, xs = np.divmod(np.arange(self.window**2), self.window)
        return (
            ys[:, None] - ys[None, :] + self.window - 1,
            xs[:, None] - xs[None, :] + self.window - 1,
        )


def bias_offsets(src_rows: int, dst_rows: int) -> np.ndarray:
    """float64 (src_rows,): where timm's resize of a per-head bias table puts
    the source table's offsets on the axis of a table of `dst_rows` rows
    (`reference.position.geometric_offsets`); the new table's offsets are
    the integers -(dst_rows // 2)..dst_rows // 2."""
    return np.asarray(geometric_offsets(src_rows, dst_rows), dtype=np.float64)


def relative_index(length: int) -> np.ndarray:
    """(L, L) int rows of a relative table for (query a, key b): b - a + L - 1."""
    return np.arange(length)[None, :] - np.arange(length)[:, None] + length - 1
