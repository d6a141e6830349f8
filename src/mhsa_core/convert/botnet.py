"""Weights of BoTNet's attention: the official TF code and timm's `BottleneckAttn`.

`load_botnet_weights` takes the five arrays of the attention in our layout;
`from_official` and `from_timm` turn the two public implementations'
parameters into it:

| ours | official TF code (`relpos_self_attention`) | timm `BottleneckAttn` |
| --- | --- | --- |
| q_kernel | q's `group_pointwise` w (C, heads, dim) | `qkv.weight[:h*dqk, :, 0, 0].T` |
| k_kernel | k's w | `qkv.weight[h*dqk:2*h*dqk, :, 0, 0].T` |
| v_kernel | v's w | `qkv.weight[2*h*dqk:, :, 0, 0].T` |
| rel_height | r_height (2H-1, dim) | `pos_embed.height_rel` |
| rel_width | r_width (2W-1, dim) | `pos_embed.width_rel` |

(h = heads, dqk = timm's `dim_head_qk`; `.T` because our kernels are
(in, out) and torch's are (out, in).) timm's `scale_pos_embed` is our
`scale_position_logits` (False by default there) and its layout is
channels_first.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike

from mhsa_core.convert._checks import (
    as_float_array,
    build_for_channels,
    require_settings,
)
from mhsa_core.reference import schema

__all__ = ["load_botnet_weights", "from_official", "from_timm"]

_ARRAYS = ("q_kernel", "k_kernel", "v_kernel", "rel_height", "rel_width")
_NAMES = dict(
    zip(
        _ARRAYS,
        ("query_kernel", "key_kernel", "value_kernel", *schema.table_names("relative")),
    )
)
# BoTNet's structure; num_heads, scale and scale_position_logits are free.
_STRUCTURE = {
    k: schema.PRESETS["botnet"][k]
    for k in ("position_encoding", "use_bias", "activation")
}


def from_official(
    wq: ArrayLike, wk: ArrayLike, wv: ArrayLike, r_height: ArrayLike, r_width: ArrayLike
) -> dict[str, np.ndarray]:
    """Our five arrays from the official code's q, k, v `group_pointwise`
    kernels (C, heads, dim) and its `r_height`, `r_width` tables."""
    kernels = []
    for name, w in (("wq", wq), ("wk", wk), ("wv", wv)):
        w = np.asarray(w)
        if w.ndim != 3:
            raise ValueError(
                f"`{name}` must have shape (C, heads, dim). "
                f"Received: {name}.shape={w.shape}"
            )
        kernels.append(w.reshape(w.shape[0], -1))
    return dict(zip(_ARRAYS, (*kernels, np.asarray(r_height), np.asarray(r_width))))


def from_timm(
    qkv_weight: ArrayLike, height_rel: ArrayLike, width_rel: ArrayLike, num_heads: int
) -> dict[str, np.ndarray]:
    """Our five arrays from timm's `qkv.weight` (2*h*dqk + C, C, 1, 1) (or
    without the 1x1 axes), `pos_embed.height_rel` and `pos_embed.width_rel`."""
    w = np.asarray(qkv_weight)
    if w.ndim == 4 and w.shape[2:] == (1, 1):
        w = w[:, :, 0, 0]
    if w.ndim != 2:
        raise ValueError(
            "`qkv_weight` must have shape (2 * heads * dqk + C, C, 1, 1) or (.., C). "
            f"Received: qkv_weight.shape={np.shape(qkv_weight)}"
        )
    channels = w.shape[1]
    qk = w.shape[0] - channels
    if qk <= 0 or qk % (2 * num_heads):
        raise ValueError(
            "`qkv_weight` must have 2 * num_heads * dqk + C output rows. Received: "
            f"qkv_weight.shape={np.shape(qkv_weight)}, num_heads={num_heads}"
        )
    q, k, v = np.split(w, [qk // 2, qk], axis=0)
    return dict(
        zip(_ARRAYS, (q.T, k.T, v.T, np.asarray(height_rel), np.asarray(width_rel)))
    )


def load_botnet_weights(
    layer,
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
        q_kernel, k_kernel: (C, num_heads * key_dim), head h in columns
            [h * key_dim, (h + 1) * key_dim).
        v_kernel: (C, C), head h in columns [h * C/heads, (h + 1) * C/heads).
        rel_height: (2 * Hr - 1, key_dim); row Hr - 1 + d holds a key d rows
            below the query (key minus query), shared across heads.
        rel_width: (2 * Wr - 1, key_dim), likewise for columns.

    Nothing is built or assigned unless every array is valid.
    """
    require_settings(
        layer,
        "load_botnet_weights",
        "BoTNet's structure (see MultiHeadSelfAttention2D.botnet)",
        **_STRUCTURE,
    )
    arrays = dict(
        zip(
            _ARRAYS,
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
    size = layer.position_size
    spec = schema.ENCODINGS["relative"]
    if size is None:  # read off the tables
        size = tuple(
            spec.size_for_rows(arrays[n].shape[0]) if arrays[n].ndim == 2 else None
            for n in ("rel_height", "rel_width")
        )
    rows = spec.rows
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
    converted = {_NAMES[n]: as_float_array(a, n) for n, a in arrays.items()}
    if not layer.built:
        layer.position_size = size
        build_for_channels(layer, channels)
    layer.set_weight_dict(converted)
