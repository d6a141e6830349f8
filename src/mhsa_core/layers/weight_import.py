"""The layer's import of trained weights: the blocks it reproduces.

`MultiHeadSelfAttention2D.load_yolov4_mhsa_weights` and `.load_botnet_weights`
are these functions (`mhsa_core.convert` exports them too): each checks the
layer's settings and every array against the layer, names the arrays as the
canonical weight dict (`mhsa_core.reference.schema.weight_shapes`), builds the
layer for their channels if needed, then fills it through `set_weight_dict`.
Nothing is built or assigned unless every array is valid.

They live with the layer, not in `mhsa_core.convert`, so that the dependency
runs one way: `convert` (the rearrangement of other projects' parameters,
`from_official`, `from_timm`) imports the layer's package, never the reverse.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, cast

import keras
import numpy as np
from numpy.typing import ArrayLike

from mhsa_core.layers._arrays import as_float_array
from mhsa_core.reference import schema

if TYPE_CHECKING:  # the layer imports this module
    from mhsa_core.layers.mhsa2d import MultiHeadSelfAttention2D

__all__ = ["BOTNET_ARRAYS", "load_botnet_weights", "load_yolov4_mhsa_weights"]


# ------------------------------------------------------------------ checks
def _require_settings(
    layer: MultiHeadSelfAttention2D, what: str, description: str, **expected: Any
) -> None:
    """ValueError listing every setting of `layer` that differs from `expected`
    (activations compared by their serialized names)."""

    def comparable(name: str, value: Any) -> Any:
        if name == "activation":
            return keras.activations.serialize(keras.activations.get(value))
        return value

    differing = {
        name: comparable(name, getattr(layer, name))
        for name, value in expected.items()
        if comparable(name, getattr(layer, name)) != comparable(name, value)
    }
    if differing:
        wanted = ", ".join(f"{k}={v!r}" for k, v in expected.items())
        raise ValueError(
            f"{what} needs a layer with {description} ({wanted}). Received: "
            + ", ".join(f"{k}={v!r}" for k, v in differing.items())
        )


def _build_for_channels(layer: MultiHeadSelfAttention2D, channels: int) -> None:
    """Builds `layer` for inputs of `channels` channels and unknown H, W."""
    shape: list[int | None] = [None, None, None, None]
    shape[-1 if layer.data_format == "channels_last" else 1] = channels
    layer.build(tuple(shape))


# ------------------------------------------- the Keras 2 YOLOv4-MHSA block
# The block's four 1x1 Conv2D layers in creation order, and the canonical
# weight names of each (kernel, bias).
_CONVS = ("position", "query", "key", "value")
_CONV_NAMES = {
    "position": schema.ENCODINGS["conv"].token_weights,
    **{p: (f"{p}_kernel", f"{p}_bias") for p in schema.PROJECTIONS},
}
# Neither block has timm's options (their weights are not among the arrays):
# checked with the settings, so a layer with them is refused before it is built.
_NO_OPTIONS = {
    "use_key_bias": None,
    "qk_norm": None,
    "output_norm": None,
    "output_dense": False,
}
# The settings that make the layer compute that block (data_format and
# dropout are free; key_dim must be None: C // heads).
_YOLOV4_MHSA_SETTINGS = {
    **{
        k: v
        for k, v in schema.PRESETS["yolov4_mhsa"].items()
        if k != "kernel_initializer"
    },
    **_NO_OPTIONS,
}


def load_yolov4_mhsa_weights(
    layer: MultiHeadSelfAttention2D, weights: Sequence[ArrayLike]
) -> None:
    """Loads the eight arrays of a Keras 2 `mhsa_block` into `layer`.

    Args:
        layer: a `MultiHeadSelfAttention2D` with the block's settings (as
            `MultiHeadSelfAttention2D.yolov4_mhsa()` makes it); built from the
            kernels' shape if needed.
        weights: the kernels and biases of the block's four 1x1 Conv2D layers
            in the order the block creates them: position, query, key, value;
            kernel then bias each. Kernels may be (1, 1, C, C) (as
            `Conv2D.get_weights()` returns them) or (C, C).

    Beware: `model.get_weights()` of a Keras 2 functional model lists the convs
    in topological order, which is not creation order (tf_keras 2.21 gives
    position, key, query, value). Pick them by layer name instead (README).

    Nothing is built or assigned unless every array is valid.
    """
    weights = list(weights)
    if len(weights) != 2 * len(_CONVS):
        raise ValueError(
            "load_yolov4_mhsa_weights expects 8 arrays (kernel and bias of the "
            "position, query, key and value convs). "
            f"Received: {len(weights)} arrays"
        )
    _require_settings(
        layer,
        "load_yolov4_mhsa_weights",
        "the Keras 2 YOLOv4-MHSA block's settings",
        **_YOLOV4_MHSA_SETTINGS,
    )
    arrays = [np.asarray(w) for w in weights]
    kernel = arrays[0]
    if layer.built:
        channels = layer.channels
    elif kernel.ndim in (2, 4) and kernel.shape[-1] > 0:
        channels = kernel.shape[-1]
    else:
        raise ValueError(
            "Weight 0 (position kernel) must have shape (1, 1, C, C) or "
            f"(C, C). Received: shape={kernel.shape}"
        )
    # Everything is checked before anything is built or assigned.
    converted = {}
    for i, conv in enumerate(_CONVS):
        for j, part in enumerate(("kernel", "bias")):
            array = arrays[2 * i + j]
            expected = (channels, channels) if part == "kernel" else (channels,)
            if part == "kernel" and array.ndim == 4 and array.shape[:2] == (1, 1):
                array = array[0, 0]  # (1, 1, C_in, C_out) -> (C_in, C_out)
            if array.shape != expected:
                raise ValueError(
                    f"Weight {2 * i + j} ({conv} {part}) must have shape "
                    f"{expected}"
                    + (f" or {(1, 1) + expected}" if part == "kernel" else "")
                    + f". Received: shape={arrays[2 * i + j].shape}"
                )
            converted[_CONV_NAMES[conv][j]] = as_float_array(
                array, f"weight {2 * i + j} ({conv} {part})"
            )
    if not layer.built:
        _build_for_channels(layer, channels)
    layer.set_weight_dict(converted)


# ------------------------------------------------------------------ BoTNet
# The five arrays of `load_botnet_weights`, in its order, and their canonical
# names; `mhsa_core.convert.from_official` / `from_timm` return them as a dict.
BOTNET_ARRAYS = ("q_kernel", "k_kernel", "v_kernel", "rel_height", "rel_width")
_BOTNET_NAMES = dict(
    zip(
        BOTNET_ARRAYS,
        ("query_kernel", "key_kernel", "value_kernel", *schema.table_names("relative")),
    )
)
# BoTNet's structure; num_heads, scale and scale_position_logits are free.
_BOTNET_STRUCTURE = {
    **{
        k: schema.PRESETS["botnet"][k]
        for k in ("position_encoding", "use_bias", "activation")
    },
    **_NO_OPTIONS,
}


def load_botnet_weights(
    layer: MultiHeadSelfAttention2D,
    q_kernel: ArrayLike,
    k_kernel: ArrayLike,
    v_kernel: ArrayLike,
    rel_height: ArrayLike,
    rel_width: ArrayLike,
) -> None:
    """Loads the weights of a BoTNet (official or timm) attention into `layer`.

    Args:
        layer: a `MultiHeadSelfAttention2D` with BoTNet's structure
            (`position_encoding="relative"`, `use_bias=False`,
            `activation=None`, as `MultiHeadSelfAttention2D.botnet()` makes
            it); built from the arrays' shapes if needed, (Hr, Wr) taken from
            the tables when `position_size` is None.
        q_kernel: (C, num_heads * key_dim), head h in columns
            [h * key_dim, (h + 1) * key_dim).
        k_kernel: (C, num_heads * key_dim), laid out as `q_kernel`.
        v_kernel: (C, C), head h in columns [h * C/heads, (h + 1) * C/heads).
        rel_height: (2 * Hr - 1, key_dim); row Hr - 1 + d holds a key d rows
            below the query (key minus query), shared across heads.
        rel_width: (2 * Wr - 1, key_dim), likewise for columns.

    Nothing is built or assigned unless every array is valid.
    """
    _require_settings(
        layer,
        "load_botnet_weights",
        "BoTNet's structure (see MultiHeadSelfAttention2D.botnet)",
        **_BOTNET_STRUCTURE,
    )
    arrays = dict(
        zip(
            BOTNET_ARRAYS,
            (
                np.asarray(a)
                for a in (q_kernel, k_kernel, v_kernel, rel_height, rel_width)
            ),
        )
    )
    if layer.built:
        channels = layer.channels
    elif arrays["q_kernel"].ndim == 2 and arrays["q_kernel"].shape[0] > 0:
        channels = arrays["q_kernel"].shape[0]
    else:
        raise ValueError(
            "`q_kernel` must have shape (C, num_heads * key_dim). "
            f"Received: q_kernel.shape={arrays['q_kernel'].shape}"
        )
    heads = layer.num_heads
    if channels % heads:
        raise ValueError(
            "The number of channels must be divisible by `num_heads`. "
            f"Received: channels={channels} (q_kernel.shape[0]), num_heads={heads}"
        )
    key_dim = layer.key_dim if layer.key_dim is not None else channels // heads
    size: tuple[int | None, ...] | None = layer.position_size
    spec = schema.ENCODINGS["relative"]
    if size is None:  # read off the tables
        size = tuple(
            spec.size_for_rows(arrays[n].shape[0]) if arrays[n].ndim == 2 else None
            for n in ("rel_height", "rel_width")
        )
    rows = spec.table_rows
    expected = {
        "q_kernel": (channels, heads * key_dim),
        "k_kernel": (channels, heads * key_dim),
        "v_kernel": (channels, channels),
        "rel_height": (None if size[0] is None else rows(size[0]), key_dim),
        "rel_width": (None if size[1] is None else rows(size[1]), key_dim),
    }
    for name, shape in expected.items():
        if arrays[name].shape != shape:
            shown = shape if None not in shape else f"(2 * n - 1, {key_dim}), odd rows"
            raise ValueError(
                f"`{name}` must have shape {shown}. "
                f"Received: {name}.shape={arrays[name].shape}"
            )
    converted = {_BOTNET_NAMES[n]: as_float_array(a, n) for n, a in arrays.items()}
    if not layer.built:
        # Every entry an int: a None (no size gives a table's rows) failed
        # the shape check above.
        layer.position_size = cast("tuple[int, ...]", size)
        _build_for_channels(layer, channels)
    layer.set_weight_dict(converted)
