"""The fused path: the backend's own attention kernel, `ops.dot_product_attention`.

On torch CPU it reaches SDPA's flash kernel, whose backward is O(N) memory.
Used only where it is exact enough (`choice.resolve`, `choice.fused_misfit`):
float32 or lower (torch and JAX compute 64-bit in 32-bit there), query and
value heads of one width, no scores, no dropout, and a position term that
folds into the keys (none or "absolute"), a bias of no query
("relative_bias"), or none at all: a rotary encoding ("rope", "rope_mixed")
has rotated q and k before (`PositionEncoding.rotate`). Under mixed precision
the kernel runs in float32, as the other paths' logits and softmax.

An additive bias (Swin's per-head bias, the shift mask) goes to the kernel's
`bias`: keras 3.15's `ops.dot_product_attention` takes one on every backend
(torch: SDPA's float `attn_mask`; JAX: `jax.nn.dot_product_attention`'s
`bias`; TensorFlow: added to its logits). It is a whole (B, heads, N, N)
tensor, which torch will not take together with a `mask`, so the key mask
is then folded into it; SDPA's flash kernel takes no bias, so torch runs its
math kernel.
"""

from __future__ import annotations

import keras
from keras import ops

from mhsa_core._typing import Tensor
from mhsa_core.layers.attention.full import MASKED_LOGIT, logits_dtype


def fused_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    *,
    scale: float,
    key_mask: Tensor | None = None,
    bias: Tensor | None = None,
) -> Tensor:
    """Softmax attention with the backend's fused kernel.

    Args:
        query: (B, heads, N, d); key, value: (B, heads, Nk, d), same dtype
            (Nk = N but for keys of another map).
        scale: Python float, the logit scale.
        key_mask: optional bool (B, Nk), True = may be attended to. A query
            whose keys are all masked gets zeros (and zero gradients).
        bias: optional term added to the scaled logits, broadcastable to
            (B, heads, N, Nk), in the logits dtype.

    Returns:
        (B, heads, N, d) in the dtype of `value`.
    """
    # The kernel's inputs in the logits dtype (float32 under mixed
    # precision), as the other paths compute logits and softmax: given
    # float16 q and k, TensorFlow's kernel rounds the logits to float16
    # (measured 1.2-1.6x the mixed-precision budget).
    dtype = logits_dtype(query.dtype)
    # Keras's layout is (B, N, heads, d).
    q, k, v = (
        ops.transpose(ops.cast(t, dtype), (0, 2, 1, 3)) for t in (query, key, value)
    )
    mask = any_key = None
    if key_mask is not None:
        keep = ops.cast(key_mask, "bool")  # (B, N)
        any_key = ops.any(keep, axis=-1)  # (B,)
        # A batch item with every key masked is given every key instead: the
        # kernels' 0/0 there is kernel- and version-dependent (NaN, uniform,
        # zeros); its output is zeroed below.
        keep = ops.logical_or(keep, ops.logical_not(ops.expand_dims(any_key, -1)))
        mask = ops.expand_dims(keep, (1, 2))  # (B, 1, 1, N)
    if bias is not None:
        shape = ops.shape(query)
        bias = ops.broadcast_to(
            ops.cast(bias, dtype), (shape[0], shape[1], shape[2], ops.shape(key)[2])
        )  # (B, heads, N, Nk): JAX's kernel wants every axis
        if mask is not None:
            # torch takes a bias or a mask, not both: masked keys' bias is
            # the full path's masked logit instead (exp() of it is 0).
            penalty = ops.convert_to_tensor(MASKED_LOGIT, dtype=dtype)
            bias = ops.where(mask, bias, penalty)
            mask = None
    # On torch, flash_attention=False only skips Keras's own eligibility
    # probe (a pybind object that breaks torch.compile's graph); SDPA still
    # picks its fastest kernel itself (the flash kernel on CPU). Elsewhere
    # None lets Keras choose (cuDNN / Pallas on accelerators).
    flash = False if keras.backend.backend() == "torch" else None
    out = ops.dot_product_attention(
        q, k, v, bias=bias, mask=mask, scale=scale, flash_attention=flash
    )  # (B, N, heads, d)
    if any_key is not None:
        out = ops.where(ops.reshape(any_key, (-1, 1, 1, 1)), out, ops.zeros_like(out))
    return ops.cast(ops.transpose(out, (0, 2, 1, 3)), value.dtype)
