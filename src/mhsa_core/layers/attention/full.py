"""The full path: logits, key mask, softmax, dropout, probs @ values over the
whole (B, heads, N, N). The only path that returns scores or drops out
probabilities; the reference arithmetic of the other two.
"""

from __future__ import annotations

import warnings
from typing import Any

from keras import backend, ops, random

from mhsa_core._typing import DType, Tensor
from mhsa_core.reference import schema

# Logit given to masked keys before the softmax. It is finite on purpose: with
# -inf, a row whose keys are all masked would give exp(-inf - -inf) = NaN; with a
# large finite value that row becomes uniform and is then zeroed explicitly. It is
# far below any real logit (float32 max is 3.4e38) yet exp(-1e9 - m) == 0.
MASKED_LOGIT = -1e9


def logits_dtype(dtype: DType) -> str:
    """The dtype the logits and softmax are computed in, for tensors of `dtype`
    (the rule: `mhsa_core.reference.schema.logits_dtype`)."""
    # standardize_dtype: torch reports torch.float16, not "float16".
    return schema.logits_dtype(backend.standardize_dtype(dtype))


def dot_product_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    *,
    scale: float,
    logits_bias: Tensor | None = None,
    key_mask: Tensor | None = None,
    logits_mask: Tensor | None = None,
    dropout: float = 0.0,
    training: bool | None = False,
    seed_generator: Any = None,
) -> tuple[Tensor, Tensor]:
    """Softmax attention of every query over the keys, per head.

    Args:
        query: (B, heads, N, key_dim).
        key: (B, heads, N, key_dim).
        value: (B, heads, N, value_dim).
        scale: Python float that multiplies the logits.
        logits_bias: optional (B, heads, N, N), or broadcastable to it, added
            to the scaled logits (a position term), in `logits_dtype`.
        key_mask: optional bool (B, N); True = the key may be attended to.
            Masked keys get probability 0; a query whose keys are all masked
            gets all-zero probabilities and so a zero output.
        logits_mask: optional additive mask, broadcastable like
            `logits_bias`, added after it (Swin's shift mask: its -100 added
            last, as the reference and timm do, rounds the logits once at
            that magnitude, not twice).
        dropout: rate at which attention probabilities are dropped, applied only
            when `training` is true.
        seed_generator: a `keras.random.SeedGenerator` for the dropout.

    Returns:
        `(outputs, probs)`: outputs (B, heads, N, value_dim) in the dtype of
        `value`; probs (B, heads, N, N), float32 under mixed precision (they are
        computed in float32, see below), else the dtype of `query`.
    """
    softmax_dtype = logits_dtype(query.dtype)
    query = ops.cast(query, softmax_dtype)
    key = ops.cast(key, softmax_dtype)

    logits = ops.einsum("bhqd,bhkd->bhqk", query, key)  # (B, heads, N, N)
    if scale != 1.0:
        # convert_to_tensor with the dtype: ops.cast(python_float) would round
        # the scale to float32 first on TF, costing float64 its precision.
        logits = logits * ops.convert_to_tensor(scale, dtype=softmax_dtype)
    if logits_bias is not None:
        logits = logits + ops.cast(logits_bias, softmax_dtype)
    if logits_mask is not None:
        logits = logits + ops.cast(logits_mask, softmax_dtype)

    if key_mask is not None:
        # (B, 1, 1, N). expand_dims, not [:, None, None, :]: TensorFlow's
        # strided slice with new axes has no LiteRT builtin (a Flex op, which
        # the LiteRT interpreter cannot run).
        keep = ops.expand_dims(ops.cast(key_mask, "bool"), (1, 2))
        logits = ops.where(
            keep, logits, ops.convert_to_tensor(MASKED_LOGIT, dtype=softmax_dtype)
        )
    if logits.shape[-1] == 1:
        # One key (a 1x1 map, or a trace at size 1): keras warns on a softmax
        # over an axis of size 1 (an error under strict warnings). Silence
        # that warning only; the op stays the softmax, because an exporter
        # that traces at size 1 with the sizes left dynamic (Keras's ONNX
        # export from torch without an input_signature) keeps this branch's
        # graph for every size: a size-1 shortcut (exp(x - x)) exported
        # attention weights of 1 for every key.
        with warnings.catch_warnings():
            warnings.filterwarnings(
                "ignore",
                message="You are using a softmax over axis",
                category=UserWarning,
            )
            probs = ops.softmax(logits, axis=-1)
    else:
        probs = ops.softmax(logits, axis=-1)
    if key_mask is not None:
        # Rows with every key masked were uniform: zero them (others are
        # already exactly 0 at masked keys, exp underflows).
        probs = ops.where(keep, probs, ops.zeros_like(probs))

    weights = probs
    if training and dropout > 0.0:
        weights = random.dropout(weights, rate=dropout, seed=seed_generator)
    weights = ops.cast(weights, value.dtype)
    outputs = ops.einsum("bhqk,bhkd->bhqd", weights, value)  # (B, heads, N, dv)
    return outputs, probs
