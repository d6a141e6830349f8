"""The layer's argument rules, written once (NumPy and the standard library only).

`MultiHeadSelfAttention2D.__init__` and the natives' `check_config`
(`mhsa_core.natives._common`) both apply `ARGUMENTS`, so a rule and its
message exist in one place. The table maps each argument to a `Rule`: what it
expects (the words of the message) and the test a value must pass. A bad value
gets Keras's wording:

    Received an invalid value for argument `num_heads`, expected a positive
    integer. Received: num_heads=0

Two kinds of argument cannot be judged without a framework: `activation` and
`position_initializer` are whatever Keras can resolve. Their rules carry only
the words; the caller passes its resolver (`convert=`), and a resolver's
ValueError or TypeError becomes the rule's message. The natives, which take
activation names from their own table, pass their own rule instead
(`rules={"activation": one_of(...)}`).

Two rules join arguments, and `check_arguments` applies them after the table
when their arguments are among the values: a rotary encoding's `key_dim` is a
multiple of 4 (`check_key_dim`), and a `rope_*` argument that the encoding
(or `rope_in_pixels`) leaves unread keeps its default (`check_rope`).

`check_channels` is the rule between the channels of an input and the config
(divisible by `num_heads`, and by what the encoding needs), applied where the
channels are first known: the layer's `build`, a native's constructor.
`check_window` is the rule between `window_size`, `shift_size` and the
encoding (a shift smaller than the window, no shift without windows, an
encoding that can run inside windows), applied after the table's rules;
`pair` gives a size argument as (height, width). `check_prefix_tokens` is
the rule between prefix tokens (a call's class and register tokens) and the
config and call arguments they cannot be combined with. `check_kv` is the rule
between keys and values of another map (`kv_reduction`, a context), windows
and the encoding; `check_key_grid` refuses a table encoding on a key grid
other than the query grid; `reduced_size` is `kv_reduction`'s key grid (and
its refusal of an R larger than the map).
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Callable, Collection, Mapping
from typing import Any, TypeGuard

import numpy as np

from mhsa_core.reference import schema

__all__ = [
    "ARGUMENTS",
    "DATA_FORMATS",
    "IMPLEMENTATIONS",
    "OUTPUT_NORMS",
    "QK_NORMS",
    "Rule",
    "check_arguments",
    "check_channels",
    "check_key_dim",
    "check_prefix_tokens",
    "check_rope",
    "check_key_grid",
    "check_kv",
    "check_window",
    "invalid",
    "is_int",
    "one_of",
    "pair",
    "reduced_size",
]

DATA_FORMATS = ("channels_last", "channels_first")
# The layer's attention paths (`mhsa_core.layers.attention.choice` says which
# runs when).
IMPLEMENTATIONS = ("auto", "full", "chunked", "fused")
# The norms of `qk_norm` (on each head's queries and keys) and `output_norm`
# (on the merged heads): timm's LayerNorm and RmsNorm (`reference.norms`).
QK_NORMS = (None, "layer", "rms")
OUTPUT_NORMS = (None, "layer")


def is_int(value: object) -> TypeGuard[int | np.integer]:
    """An integer (Python or NumPy), not a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value: object) -> TypeGuard[float]:
    """A real number (Python, NumPy, `Fraction`, ...), not a bool.

    Typed `float`, which every such number compares like: the `numbers.Real`
    ABC declares too few comparisons for a type checker (no `>`, `>=`).
    """
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def invalid(name: str, value: object, expected: str) -> ValueError:
    """The error of a bad argument, in Keras's words."""
    return ValueError(
        f"Received an invalid value for argument `{name}`, expected {expected}. "
        f"Received: {name}={value!r}"
    )


@dataclasses.dataclass(frozen=True)
class Rule:
    """What one argument accepts.

    Attributes:
        expected: the message's words for the accepted values.
        accepts: value -> bool. None: the caller resolves the value
            (`check_arguments(convert=...)`), which is the test.
    """

    expected: str
    accepts: Callable[[object], bool] | None = None

    def check(self, name: str, value: object) -> None:
        if self.accepts is None:
            raise TypeError(f"`{name}` is checked by resolving it: pass a converter")
        if not self.accepts(value):
            raise invalid(name, value, self.expected)


@dataclasses.dataclass(frozen=True)
class _Lookup:
    """An argument that the schema itself looks up: its ValueError (naming the
    argument) is the message, so it is written once, there."""

    lookup: Callable[[Any], object]

    def check(self, name: str, value: object) -> None:
        self.lookup(value)


def one_of(options: Collection[Any]) -> Rule:
    """A rule accepting the members of `options` (shown as given: a tuple or a
    list)."""
    return Rule(f"one of {options}", lambda value: value in options)


def _optional(accepts: Callable[[object], bool]) -> Callable[[object], bool]:
    return lambda value: value is None or accepts(value)


def _positive_int(value: object) -> bool:
    return is_int(value) and bool(value >= 1)  # bool(): NumPy ints compare to np.bool


def _positive_finite(value: object) -> bool:
    return _is_real(value) and math.isfinite(value) and value > 0


def _bool(value: object) -> bool:
    return isinstance(value, (bool, np.bool_))


def _rate(value: object) -> bool:
    # NaN fails both comparisons.
    return _is_real(value) and 0.0 <= value < 1.0


def _finite(value: object) -> bool:
    return _is_real(value) and math.isfinite(value)


def _size(value: object) -> bool:
    return (
        isinstance(value, (tuple, list))
        and len(value) == 2
        and all(_positive_int(n) for n in value)
    )


def _non_negative_int(value: object) -> bool:
    return is_int(value) and bool(value >= 0)


def _window(value: object) -> bool:
    return _positive_int(value) or _size(value)


def _shift(value: object) -> bool:
    return _non_negative_int(value) or (
        isinstance(value, (tuple, list))
        and len(value) == 2
        and all(_non_negative_int(n) for n in value)
    )


def _kv_reduction(value: object) -> bool:
    return value is None or value == "pool" or (is_int(value) and bool(value >= 2))


def pair(value: Any) -> tuple[int, int]:
    """An int or a pair (a checked `window_size` / `shift_size`) as
    (height, width) Python ints."""
    if isinstance(value, (tuple, list)):
        return (int(value[0]), int(value[1]))
    return (int(value), int(value))


# In the order the layer checks them (the first bad one is reported).
ARGUMENTS: dict[str, Rule | _Lookup] = {
    "num_heads": Rule("a positive integer", _positive_int),
    "key_dim": Rule("None or a positive integer", _optional(_positive_int)),
    "position_encoding": _Lookup(schema.encoding),
    "position_size": Rule(
        "None or two positive integers (height, width)", _optional(_size)
    ),
    "window_size": Rule(
        "None, a positive integer or two positive integers (height, width)",
        _optional(_window),
    ),
    "shift_size": Rule(
        "a non-negative integer or two non-negative integers (height, width)", _shift
    ),
    "scale_position_logits": Rule(
        "a boolean", lambda value: isinstance(value, (bool, np.bool_))
    ),
    # The rotary encodings' settings (`schema.rope_settings`).
    "rope_temperature": Rule(
        "None or a positive finite number", _optional(_positive_finite)
    ),
    "rope_layout": one_of(schema.ROPE_LAYOUTS),
    "rope_grid_indexing": Rule(
        f"None or one of {schema.GRID_INDEXINGS}",
        lambda value: value is None or value in schema.GRID_INDEXINGS,
    ),
    "rope_grid_offset": Rule("a finite number", _finite),
    "rope_in_pixels": Rule(
        "a boolean", lambda value: isinstance(value, (bool, np.bool_))
    ),
    "rope_max_resolution": Rule("a positive finite number", _positive_finite),
    "scale": Rule("None or a positive finite number", _optional(_positive_finite)),
    "dropout": Rule("a number in [0, 1)", _rate),
    "data_format": one_of(DATA_FORMATS),
    "seed": Rule("None or an integer", _optional(is_int)),
    "attention_implementation": one_of(IMPLEMENTATIONS),
    "chunk_size": Rule("None or a positive integer", _optional(_positive_int)),
    "use_key_bias": Rule("None or a boolean", _optional(_bool)),
    "qk_norm": one_of(QK_NORMS),
    "output_norm": one_of(OUTPUT_NORMS),
    "output_dense": Rule("a boolean", _bool),
    "norm_epsilon": Rule("a positive finite number", _positive_finite),
    "activation": Rule("None, the name of a Keras activation or a callable"),
    # Keys and values from another map than the queries' (`check_kv`).
    "kv_reduction": Rule('None, an integer >= 2 or "pool"', _kv_reduction),
    "kv_pool_size": Rule(
        "a positive integer or two positive integers (height, width)", _window
    ),
    "context_channels": Rule("None or a positive integer", _optional(_positive_int)),
    "position_initializer": Rule(
        "None, the name of a Keras initializer or an initializer"
    ),
}


def check_arguments(
    values: Mapping[str, object],
    *,
    rules: Mapping[str, Rule] | None = None,
    convert: Mapping[str, Callable[[Any], object]] | None = None,
) -> dict[str, Any]:
    """Checks each of `values` against its rule, in the order of `ARGUMENTS`.

    Args:
        values: argument name -> value, names of `ARGUMENTS`.
        rules: rules that replace those of `ARGUMENTS` for this caller.
        convert: name -> resolver for the arguments whose rule has no test
            (its ValueError or TypeError becomes the rule's message).

    Returns:
        The values, those with a resolver resolved.

    Raises:
        ValueError: naming the first bad argument and the value received.
    """
    table = {**ARGUMENTS, **(rules or {})}
    convert = convert or {}
    unknown = sorted(set(values) - set(table))
    if unknown:
        raise TypeError(f"No rule for argument(s) {unknown}")
    out = dict(values)
    for name in sorted(values, key=list(table).index):
        rule, value = table[name], values[name]
        if name in convert:
            if not isinstance(rule, Rule):
                # A schema lookup judges the value itself (and has no words
                # for a converter's error): a converter would skip it.
                raise TypeError(f"`{name}` is checked by the schema: pass no converter")
            try:
                out[name] = convert[name](value)
            except (ValueError, TypeError) as e:
                raise invalid(name, value, rule.expected) from e
        else:
            rule.check(name, value)
    if "position_encoding" in values:
        encoding = str(values["position_encoding"])
        key_dim = values.get("key_dim")
        if is_int(key_dim):
            check_key_dim(int(key_dim), encoding)
        check_rope(
            encoding, {k: v for k, v in values.items() if k in schema.ROPE_DEFAULTS}
        )
    return out


def check_key_dim(
    key_dim: int,
    position_encoding: str = "none",
    *,
    channels: int | None = None,
    num_heads: int | None = None,
) -> None:
    """ValueError unless a head's `key_dim` suits `position_encoding` (a
    rotary encoding rotates pairs of channels, half of them per axis: a
    multiple of 4). `channels` and `num_heads`, when given, say that key_dim
    is the default C // num_heads (for the message)."""
    multiple = schema.encoding(position_encoding).key_dim_multiple
    if key_dim % multiple == 0:
        return
    received = f"key_dim={key_dim}"
    if channels is not None:
        received = (
            f"key_dim=None (C // num_heads = {key_dim}), channels={channels}, "
            f"num_heads={num_heads}"
        )
    raise ValueError(
        f"position_encoding={position_encoding!r} rotates pairs of query and key "
        f"channels, half of them per axis of the map, so `key_dim` must be "
        f"divisible by {multiple}. Received: {received}"
    )


def check_rope(position_encoding: str, values: Mapping[str, object]) -> None:
    """ValueError for a `rope_*` argument (of `values`) set away from its
    default where nothing reads it: with an encoding that does not read it
    (`schema.Encoding.rotary`), `rope_temperature` / `rope_grid_offset` with
    `rope_in_pixels=True`, `rope_max_resolution` without it (timm's
    `RotaryEmbeddingCat` uses each in one mode only)."""
    rotary = schema.encoding(position_encoding).rotary
    in_pixels = bool(values.get("rope_in_pixels", False))
    for name, value in values.items():
        default = schema.ROPE_DEFAULTS[name]
        if value is None or value == default:
            continue
        if rotary is None or name not in rotary.arguments:
            where = f"position_encoding={position_encoding!r}"
        elif in_pixels and name in ("rope_temperature", "rope_grid_offset"):
            where = "rope_in_pixels=True (the pixel frequencies and grid)"
        elif not in_pixels and name == "rope_max_resolution":
            where = "rope_in_pixels=False"
        else:
            continue
        raise ValueError(
            f"`{name}` has no effect with {where}; leave it at its default "
            f"{default!r}. Received: {name}={value!r}"
        )


def check_channels(
    channels: int,
    num_heads: int = 1,
    position_encoding: str = "none",
    key_dim: int | None = None,
) -> None:
    """ValueError unless C=`channels` splits into `num_heads` heads and suits
    `position_encoding` (e.g. "sinusoidal" needs C divisible by 4), and the
    heads' key_dim (`key_dim`, or C // num_heads) suits it too ("rope": a
    multiple of 4)."""
    if channels % num_heads:
        raise ValueError(
            "The number of channels must be divisible by `num_heads`. "
            f"Received: channels={channels}, num_heads={num_heads}"
        )
    multiple = schema.encoding(position_encoding).channels_multiple
    if channels % multiple:
        raise ValueError(
            f"position_encoding={position_encoding!r} needs channels divisible by "
            f"{multiple}. Received: channels={channels}"
        )
    if key_dim is None:
        check_key_dim(
            channels // num_heads,
            position_encoding,
            channels=channels,
            num_heads=num_heads,
        )
    else:
        check_key_dim(key_dim, position_encoding)


def check_window(
    window_size: Any, shift_size: Any = 0, position_encoding: str = "none"
) -> None:
    """ValueError unless the (individually valid) `window_size` and
    `shift_size` fit together and with `position_encoding`: a shift needs
    windows and is smaller than the window along each axis (Swin's cyclic
    shift by the window or more is a shift by less, or none), and the
    encoding can run inside windows (`schema.Encoding.refused_in_windows`)."""
    shift = pair(shift_size)
    if window_size is None:
        if any(shift):
            raise invalid(
                "shift_size",
                shift_size,
                "0 without windows (window_size=None): the shift moves the windows",
            )
        return
    window = pair(window_size)
    if any(s >= w for s, w in zip(shift, window)):
        raise invalid(
            "shift_size",
            shift_size,
            f"values smaller than the window, window_size={window_size!r}, "
            "along each axis",
        )
    refused = schema.encoding(position_encoding).refused_in_windows
    if refused:
        raise ValueError(
            f"position_encoding={position_encoding!r} cannot run inside windows: "
            f"{refused}. Received: position_encoding={position_encoding!r}, "
            f"window_size={window_size!r}"
        )


# The encodings that take prefix tokens (derived: the schema says which not).
_PREFIX_ENCODINGS = tuple(
    name for name, e in schema.ENCODINGS.items() if not e.refused_with_prefix_tokens
)


def _shown(value: object) -> str:
    """An argument's value for a message: a tensor or array by its shape."""
    shape = getattr(value, "shape", None)
    return repr(value) if shape is None else f"<tensor of shape {tuple(shape)}>"


def check_prefix_tokens(
    prefix_shape: tuple[Any, ...], position_encoding: str = "none", **others: object
) -> None:
    """ValueError when prefix tokens (of shape `prefix_shape`) meet what
    cannot take them: a "logits" position encoding
    (`schema.Encoding.refused_with_prefix_tokens`), or any argument of
    `others` that is set (not None): `window_size` (a prefix token belongs to
    no window), and the arguments of reduced keys and values and of
    cross-attention (`kv_reduction`, `context`) where the caller has them.
    """
    refused = schema.encoding(position_encoding).refused_with_prefix_tokens
    if refused:
        raise ValueError(
            f"`prefix_tokens` cannot be used with position_encoding="
            f"{position_encoding!r}: {refused}. Use one of {_PREFIX_ENCODINGS}. "
            "Received: "
            f"position_encoding={position_encoding!r}, "
            f"prefix_tokens.shape={tuple(prefix_shape)}"
        )
    for name, value in others.items():
        if value is not None:
            raise ValueError(
                f"`prefix_tokens` cannot be combined with `{name}`. Received: "
                f"{name}={_shown(value)}, prefix_tokens.shape={tuple(prefix_shape)}"
            )


def check_kv(
    kv_reduction: Any,
    window_size: Any = None,
    position_encoding: str = "none",
    *,
    context: bool = False,
) -> None:
    """ValueError unless the (individually valid) `kv_reduction`, a context
    (`context`: whether the call has one) and `window_size` fit together and
    with `position_encoding`: keys and values from another map than the
    queries' (reduced, or a context) take no windows, no logits encoding
    that needs the key grid to be the query grid (`kv_reduction` always
    changes the grid: refused when made; a context only when its grid differs,
    `check_key_grid`), and no "tokens" encoding with a context (its term
    belongs to one map)."""
    spec = schema.encoding(position_encoding)
    for name, on, value in (
        ("kv_reduction", kv_reduction is not None, kv_reduction),
        ("context", context, "a map"),
    ):
        if on and window_size is not None:
            raise ValueError(
                f"`{name}` cannot run with windows (`window_size`): the windows "
                "split one map into groups of queries and keys. "
                f"Received: {name}={value!r}, window_size={window_size!r}"
            )
    if kv_reduction is not None and spec.stage == "logits":
        raise ValueError(
            f"position_encoding={position_encoding!r} needs the key grid to be the "
            "query grid, and kv_reduction makes the keys a smaller map. Use 'rope', "
            "'rope_mixed', a 'tokens' encoding or 'none'. "
            f"Received: position_encoding={position_encoding!r}, "
            f"kv_reduction={kv_reduction!r}"
        )
    if context and spec.stage == "tokens":
        raise ValueError(
            f"position_encoding={position_encoding!r} adds a term to the tokens of "
            "one map; with a context the keys and values come from another. Use "
            "'rope', 'rope_mixed' or 'none' (or a table encoding with a context "
            f"of the inputs' grid). Received: position_encoding={position_encoding!r}"
            ", context=a map"
        )


def check_key_grid(
    position_encoding: str, query_grid: tuple[Any, Any], key_grid: tuple[Any, Any]
) -> None:
    """ValueError when a "logits" encoding (its tables index the offset or
    the key's place in one grid) gets a key grid other than the query grid
    (a context of another size). Sizes known on one side only pass."""
    if schema.encoding(position_encoding).stage != "logits":
        return
    if all(
        not (is_int(q) and is_int(k)) or int(q) == int(k)
        for q, k in zip(query_grid, key_grid)
    ):
        return
    raise ValueError(
        f"position_encoding={position_encoding!r} needs the key grid to be the "
        "query grid: a context of the inputs' (H, W), or 'rope', 'rope_mixed' or "
        f"'none'. Received: position_encoding={position_encoding!r}, query grid "
        f"(H, W)={tuple(query_grid)}, key grid (H', W')={tuple(key_grid)}"
    )


def reduced_size(size: int, kv_reduction: Any, kv_pool_size: Any, axis: int) -> int:
    """The key map's size along an axis of `size` cells (axis 0: rows, 1:
    columns): floor(size / R) (timm's stride-R conv, no padding: the last
    size % R rows or columns are dropped), or the pooled size. A ValueError
    when R is larger than the map."""
    if kv_reduction == "pool":
        return pair(kv_pool_size)[axis]
    if kv_reduction is None:
        return size
    if size < kv_reduction:
        raise ValueError(
            f"kv_reduction={kv_reduction!r} is larger than the key/value map "
            f"({'height' if axis == 0 else 'width'} {size}): the R x R stride-R conv "
            f"has no window. Received: kv_reduction={kv_reduction!r}, map size={size}"
        )
    return size // int(kv_reduction)
