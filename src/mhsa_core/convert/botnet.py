"""Weights of BoTNet's attention: the official TF code and timm's `BottleneckAttn`.

`MultiHeadSelfAttention2D.load_botnet_weights` (`mhsa_core.layers.weight_import`)
takes the five arrays of the attention in our layout; `from_official` and
`from_timm` turn the two public implementations' parameters into them, as a
dict of its keyword arguments:

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

from mhsa_core.layers.weight_import import BOTNET_ARRAYS

__all__ = ["from_official", "from_timm"]


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
    return dict(
        zip(BOTNET_ARRAYS, (*kernels, np.asarray(r_height), np.asarray(r_width)))
    )


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
        zip(
            BOTNET_ARRAYS,
            (q.T, k.T, v.T, np.asarray(height_rel), np.asarray(width_rel)),
        )
    )
