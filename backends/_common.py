"""What the three native references share: the schema's facts, checked one way.

`native_tensorflow.py`, `native_torch.py` and `native_jax.py` are independent
implementations, each in its framework's idiom; that is their worth as
oracles. What they must agree on is not theirs to define, so it is read here
from the NumPy reference, never written again:

- the position encodings, their tables (names, rows for a reference size) and
  the canonical weight dict: `mhsa_core.reference.schema`;
- the config's defaults: those of `mhsa_core.reference.mhsa_forward` (the
  layer's); the natives' signatures spell them out, tests/backends checks
  that they agree;
- the argument rules (`check_config` -> `BlockConfig`, `check_weights`) and
  how the NumPy helpers complete a config from the weights (`numpy_config`).

Imports NumPy and `mhsa_core.reference` only (no framework, no Keras).
"""

import dataclasses
import inspect
import math

import numpy as np

from mhsa_core.reference import LAYER_ARGUMENTS, mhsa_forward, schema

__all__ = [
    "DATA_FORMATS",
    "DEFAULTS",
    "check_channels",
    "check_config",
    "check_position_size",
    "check_weights",
    "has_bias",
    "numpy_config",
    "position_size_of",
]

DATA_FORMATS = ("channels_last", "channels_first")

# The block's config arguments and their defaults, as the reference's.
DEFAULTS = {
    name: parameter.default
    for name, parameter in inspect.signature(mhsa_forward).parameters.items()
    if name in LAYER_ARGUMENTS
}


def check_channels(position_encoding, channels):
    """Raise ValueError unless `position_encoding` is known and accepts C=`channels`.

    Returns the encoding's `schema.Encoding`.
    """
    spec = schema.encoding(position_encoding)
    if channels % spec.channels_multiple:
        raise ValueError(
            f"position_encoding={position_encoding!r} needs channels divisible by "
            f"{spec.channels_multiple}. Received: channels={channels}"
        )
    return spec


@dataclasses.dataclass(frozen=True)
class BlockConfig:
    """A checked block config for C=`channels`, the defaults resolved."""

    channels: int
    num_heads: int
    head_dim: int  # value width per head, C // num_heads
    key_dim: int
    activation: object
    position_encoding: str
    scale: float
    scale_position_logits: bool
    data_format: str
    use_bias: bool
    position_size: tuple | None

    @property
    def encoding(self) -> schema.Encoding:
        return schema.encoding(self.position_encoding)

    @property
    def weight_shapes(self) -> dict:
        """The canonical weight dict's shapes (`schema.weight_shapes`)."""
        return schema.weight_shapes(
            self.channels,
            self.num_heads,
            self.key_dim,
            self.position_encoding,
            self.use_bias,
            self.position_size,
        )


def check_config(
    channels,
    activations,
    *,
    num_heads,
    key_dim,
    activation,
    position_encoding,
    scale,
    scale_position_logits,
    data_format,
    use_bias,
    position_size,
):
    """Check a block config for C=`channels`; returns its `BlockConfig`.

    `activations` is the native's own table (name -> function). `key_dim`
    defaults to C // num_heads; `scale` None means 1/sqrt(key_dim).

    Raises:
        ValueError: naming the argument and the value received.
    """
    if data_format not in DATA_FORMATS:
        raise ValueError(
            f"Received an invalid value for argument `data_format`, expected one of "
            f"{DATA_FORMATS}. Received: data_format={data_format!r}"
        )
    if activation not in activations:
        raise ValueError(
            f"Received an invalid value for argument `activation`, expected one of "
            f"{sorted(activations, key=str)}. Received: activation={activation!r}"
        )
    check_channels(position_encoding, channels)
    if int(num_heads) != num_heads or num_heads < 1 or channels % num_heads:
        raise ValueError(
            "Received an invalid value for argument `num_heads`, expected a positive "
            f"integer that divides the channels C={channels}. "
            f"Received: num_heads={num_heads}"
        )
    head_dim = channels // num_heads
    key_dim = head_dim if key_dim is None else int(key_dim)
    return BlockConfig(
        channels=channels,
        num_heads=num_heads,
        head_dim=head_dim,
        key_dim=key_dim,
        activation=activation,
        position_encoding=position_encoding,
        scale=1.0 / math.sqrt(key_dim) if scale is None else float(scale),
        scale_position_logits=bool(scale_position_logits),
        data_format=data_format,
        use_bias=bool(use_bias),
        position_size=check_position_size(position_encoding, position_size),
    )


def check_position_size(position_encoding, position_size):
    """`position_size` as a tuple (Hr, Wr) of positive ints, or None.

    None when not given, or when the encoding has no learned tables (the
    argument is then ignored). A ValueError for anything but two positive ints.
    """
    if position_size is None or not schema.encoding(position_encoding).learned_tables:
        return None
    if (
        not isinstance(position_size, (tuple, list))
        or len(position_size) != 2
        or any(int(n) != n or n < 1 for n in position_size)
    ):
        raise ValueError(
            f"position_encoding={position_encoding!r} needs position_size=(Hr, Wr), "
            f"two positive integers. Received: position_size={position_size!r}"
        )
    return tuple(int(n) for n in position_size)


def position_size_of(weights, position_encoding):
    """(Hr, Wr) read off the learned tables in `weights`, or None (no tables).

    Raises ValueError when a table is missing, not 2-D, or has a row count
    that no reference size gives (an even one for "relative").
    """
    spec = schema.encoding(position_encoding)
    if not spec.learned_tables:
        return None
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
                f"(rows(1), rows(2) = {spec.rows(1)}, {spec.rows(2)})"
            )
        size.append(n)
    return tuple(size)


def has_bias(weights):
    """Whether a weight dict has biases (None entries count as absent)."""
    return any(v is not None for k, v in weights.items() if k.endswith("_bias"))


def check_weights(weights, expected):
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


def numpy_config(x, weights, config):
    """A NumPy helper's config, complete; returns (channels, config).

    The natives' `forward` / `value_and_grad` take the config as keywords:
    missing ones get the defaults, `use_bias` defaults to whether `weights`
    has biases and `position_size` to the size read off its tables (if given,
    it must agree with them: the weight check says so).
    """
    config = {**DEFAULTS, **config}
    if config.get("use_bias") is None:
        config["use_bias"] = has_bias(weights)
    encoding = config["position_encoding"]
    config["position_size"] = check_position_size(
        encoding, config.get("position_size")
    ) or position_size_of(weights, encoding)
    channels = np.shape(x)[1 if config["data_format"] == "channels_first" else -1]
    return channels, config
