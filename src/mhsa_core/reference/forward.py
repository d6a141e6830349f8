"""The float64 oracle: the block's forward pass in plain NumPy.

Written independently of the Keras layer, in the most direct form NumPy allows
(explicit loops over batch items and heads, the masked softmax spelled out),
so that it is easy to check by eye. It runs in any float dtype: float64 gives
the reference values, float32 with sequential accumulation gives the error
budget of a float32 backend (`mhsa_core.reference.budget`).

Weights are the canonical dict of `mhsa_core.reference.schema`. With
`scale_position_logits` (default) the logits are scale * (q_i . k_j +
position term), else scale * q_i . k_j + position term; the position term is
shared across heads (but for "relative_bias", a bias per head). The options
of timm's and EVA's attention act where timm's do: `qk_norm` on each head's q
and k before the logits, `output_norm` on the merged heads and then
`output_dense` (`norms.py`). A rotary encoding ("rope", "rope_mixed") rotates
each head's (normed) q and k before the logits (`reference.position.rotate`),
by the angles of the token's place in the map (with windows too).

Windows (`window_size`, `shift_size`; Swin): attention within windows of the
map, `window_layout` says which token sits in which window slot: the map
cyclically shifted by -shift, padded at the bottom and right to whole
windows, cut into windows (row-major); the shift dropped along an axis that
fits in one window. Padding slots are keys of probability 0; keys of another
region of the shift (`window_layout`'s regions) get `schema.SHIFT_MASK_LOGIT`
(-100). Without windows the whole map is one window.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal, overload

import numpy as np
from numpy.typing import ArrayLike, DTypeLike

from mhsa_core.reference import arguments, schema
from mhsa_core.reference.norms import norm
from mhsa_core.reference.position import (
    FloatType,
    Matmul,
    Store,
    dense,
    position_bias,
    position_logits,
    relu,
    rotate,
    rotation_angles,
    token_term,
)

__all__ = [
    "mhsa_forward",
    "reduce_map",
    "window_layout",
    "rounded_forward",
    "reference_config",
    "ACTIVATIONS",
    "POLICIES",
    "LAYER_ARGUMENTS",
]

# The `MultiHeadSelfAttention2D` arguments that `mhsa_forward` takes too (same
# names, same defaults).
LAYER_ARGUMENTS = (
    "num_heads",
    "key_dim",
    "activation",
    "position_encoding",
    "scale",
    "scale_position_logits",
    "data_format",
    "use_key_bias",
    "qk_norm",
    "output_norm",
    "output_dense",
    "norm_epsilon",
    "position_size",
    *schema.ROPE_DEFAULTS,
    "window_size",
    "shift_size",
    "kv_reduction",
    "kv_pool_size",
)


def reference_config(layer_config: Mapping[str, Any]) -> dict[str, Any]:
    """The `mhsa_forward` arguments in a layer config (the others, such as
    initializers or dropout, do not change the forward pass)."""
    return {k: layer_config[k] for k in LAYER_ARGUMENTS if k in layer_config}


def _gelu(x: np.ndarray) -> np.ndarray:
    # Exact (erf) GELU, as keras.activations.gelu(approximate=False).
    erf = np.vectorize(math.erf, otypes=[x.dtype])
    return x * (0.5 * (1.0 + erf(x / math.sqrt(2.0)))).astype(x.dtype)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


ACTIVATIONS: dict[str | None, Callable[[np.ndarray], np.ndarray]] = {
    None: lambda x: x,
    "linear": lambda x: x,
    "relu": relu,
    "gelu": _gelu,
    "sigmoid": _sigmoid,
    "tanh": np.tanh,
    "silu": lambda x: x * _sigmoid(x),
    "swish": lambda x: x * _sigmoid(x),
}


def window_layout(
    height: int,
    width: int,
    window_size: int | tuple[int, int] | None = None,
    shift_size: int | tuple[int, int] = 0,
) -> tuple[tuple[int, int], list[list[int]], list[list[int]]]:
    """Which token of an H x W map sits in which slot of which window.

    Returns:
        `(extent, windows, regions)`: extent (wh, ww), the window's size (the
        map's without windows); windows: one list per window of wh * ww token
        indices (row-major over the map) or -1 for a padding slot, slots
        row-major over the window, windows row-major over the padded,
        shifted map; regions: the shift region of each slot (-1 padding),
        2 * (y < sh) + (x < sw) for the token at (y, x): the first sh rows
        (sw columns) of the map are the ones the shift by -sh wrapped to the
        bottom (right), which are no neighbours of the rows they land by.

    The shift along an axis is dropped when the map fits in one window along
    it (H <= wh), as timm's Swin does (one window, nothing to shift).
    """
    if window_size is None:
        n = height * width
        return (height, width), [list(range(n))], [[0] * n]
    wh, ww = arguments.pair(window_size)
    sh, sw = arguments.pair(shift_size)
    sh = 0 if height <= wh else sh
    sw = 0 if width <= ww else sw
    rows_of_windows = -(-height // wh)
    cols_of_windows = -(-width // ww)
    windows, regions = [], []
    for wy in range(rows_of_windows):
        for wx in range(cols_of_windows):
            slots, labels = [], []
            for r in range(wh):
                for c in range(ww):
                    gy, gx = wy * wh + r, wx * ww + c  # in the shifted map
                    if gy >= height or gx >= width:
                        slots.append(-1)
                        labels.append(-1)
                        continue
                    y, x = (gy + sh) % height, (gx + sw) % width  # in the map
                    slots.append(y * width + x)
                    labels.append(2 * int(y < sh) + int(x < sw))
            windows.append(slots)
            regions.append(labels)
    return (wh, ww), windows, regions


def _matmul_sequential(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """a @ b with every dot product summed left to right, one rounding per step.

    This is the textbook float32 algorithm, and the accuracy that XLA's CPU
    kernel shows (measured: within 10% of it). OpenBLAS's blocked kernels,
    which NumPy's `@` calls, are about 2x more accurate; an error budget taken
    from them would fail correct float32 implementations (see the README).
    """
    acc = np.zeros(a.shape[:-1] + b.shape[-1:], dtype=np.result_type(a, b))
    for i in range(a.shape[-1]):
        acc += a[..., i : i + 1] * b[..., i : i + 1, :]
    return acc


@overload
def mhsa_forward(
    x: ArrayLike,
    weights: Mapping[str, np.ndarray],
    *,
    num_heads: int = ...,
    key_dim: int | None = ...,
    activation: str | None = ...,
    position_encoding: str = ...,
    scale: float | None = ...,
    scale_position_logits: bool = ...,
    data_format: str = ...,
    use_key_bias: bool | None = ...,
    qk_norm: str | None = ...,
    output_norm: str | None = ...,
    output_dense: bool = ...,
    norm_epsilon: float = ...,
    position_size: Sequence[int] | None = ...,
    rope_temperature: float | None = ...,
    rope_layout: str = ...,
    rope_grid_indexing: str | None = ...,
    rope_grid_offset: float = ...,
    rope_in_pixels: bool = ...,
    rope_max_resolution: float = ...,
    window_size: int | tuple[int, int] | None = ...,
    shift_size: int | tuple[int, int] = ...,
    kv_reduction: int | str | None = ...,
    kv_pool_size: int | tuple[int, int] = ...,
    context: ArrayLike | None = ...,
    attention_mask: ArrayLike | None = ...,
    prefix_tokens: None = ...,
    return_attention_scores: Literal[False] = ...,
    dtype: FloatType = ...,
    accumulation: str = ...,
    storage_dtype: DTypeLike | None = ...,
) -> np.ndarray: ...


@overload
def mhsa_forward(
    x: ArrayLike,
    weights: Mapping[str, np.ndarray],
    *,
    num_heads: int = ...,
    key_dim: int | None = ...,
    activation: str | None = ...,
    position_encoding: str = ...,
    scale: float | None = ...,
    scale_position_logits: bool = ...,
    data_format: str = ...,
    use_key_bias: bool | None = ...,
    qk_norm: str | None = ...,
    output_norm: str | None = ...,
    output_dense: bool = ...,
    norm_epsilon: float = ...,
    position_size: Sequence[int] | None = ...,
    rope_temperature: float | None = ...,
    rope_layout: str = ...,
    rope_grid_indexing: str | None = ...,
    rope_grid_offset: float = ...,
    rope_in_pixels: bool = ...,
    rope_max_resolution: float = ...,
    window_size: int | tuple[int, int] | None = ...,
    shift_size: int | tuple[int, int] = ...,
    kv_reduction: int | str | None = ...,
    kv_pool_size: int | tuple[int, int] = ...,
    context: ArrayLike | None = ...,
    attention_mask: ArrayLike | None = ...,
    prefix_tokens: None = ...,
    return_attention_scores: Literal[True],
    dtype: FloatType = ...,
    accumulation: str = ...,
    storage_dtype: DTypeLike | None = ...,
) -> tuple[np.ndarray, np.ndarray]: ...


@overload
def mhsa_forward(
    x: ArrayLike,
    weights: Mapping[str, np.ndarray],
    *,
    num_heads: int = ...,
    key_dim: int | None = ...,
    activation: str | None = ...,
    position_encoding: str = ...,
    scale: float | None = ...,
    scale_position_logits: bool = ...,
    data_format: str = ...,
    use_key_bias: bool | None = ...,
    qk_norm: str | None = ...,
    output_norm: str | None = ...,
    output_dense: bool = ...,
    norm_epsilon: float = ...,
    position_size: Sequence[int] | None = ...,
    rope_temperature: float | None = ...,
    rope_layout: str = ...,
    rope_grid_indexing: str | None = ...,
    rope_grid_offset: float = ...,
    rope_in_pixels: bool = ...,
    rope_max_resolution: float = ...,
    window_size: int | tuple[int, int] | None = ...,
    shift_size: int | tuple[int, int] = ...,
    kv_reduction: int | str | None = ...,
    kv_pool_size: int | tuple[int, int] = ...,
    context: ArrayLike | None = ...,
    attention_mask: ArrayLike | None = ...,
    prefix_tokens: None = ...,
    return_attention_scores: bool,
    dtype: FloatType = ...,
    accumulation: str = ...,
    storage_dtype: DTypeLike | None = ...,
) -> np.ndarray | tuple[np.ndarray, np.ndarray]: ...


@overload
def mhsa_forward(
    x: ArrayLike,
    weights: Mapping[str, np.ndarray],
    *,
    num_heads: int = ...,
    key_dim: int | None = ...,
    activation: str | None = ...,
    position_encoding: str = ...,
    scale: float | None = ...,
    scale_position_logits: bool = ...,
    data_format: str = ...,
    use_key_bias: bool | None = ...,
    qk_norm: str | None = ...,
    output_norm: str | None = ...,
    output_dense: bool = ...,
    norm_epsilon: float = ...,
    position_size: Sequence[int] | None = ...,
    rope_temperature: float | None = ...,
    rope_layout: str = ...,
    rope_grid_indexing: str | None = ...,
    rope_grid_offset: float = ...,
    rope_in_pixels: bool = ...,
    rope_max_resolution: float = ...,
    window_size: int | tuple[int, int] | None = ...,
    shift_size: int | tuple[int, int] = ...,
    attention_mask: ArrayLike | None = ...,
    prefix_tokens: ArrayLike,
    return_attention_scores: bool = ...,
    dtype: FloatType = ...,
    accumulation: str = ...,
    storage_dtype: DTypeLike | None = ...,
) -> tuple[np.ndarray, ...]: ...


def mhsa_forward(
    x: ArrayLike,
    weights: Mapping[str, np.ndarray],
    *,
    num_heads: int = 1,
    key_dim: int | None = None,
    activation: str | None = None,
    position_encoding: str = "none",
    scale: float | None = None,
    scale_position_logits: bool = True,
    data_format: str = "channels_last",
    use_key_bias: bool | None = None,
    qk_norm: str | None = None,
    output_norm: str | None = None,
    output_dense: bool = False,
    norm_epsilon: float = 1e-6,
    position_size: Sequence[int] | None = None,
    rope_temperature: float | None = None,
    rope_layout: str = "interleaved",
    rope_grid_indexing: str | None = None,
    rope_grid_offset: float = 0.0,
    rope_in_pixels: bool = False,
    rope_max_resolution: float = 224,
    window_size: int | tuple[int, int] | None = None,
    shift_size: int | tuple[int, int] = 0,
    kv_reduction: int | str | None = None,
    kv_pool_size: int | tuple[int, int] = 7,
    context: ArrayLike | None = None,
    attention_mask: ArrayLike | None = None,
    prefix_tokens: ArrayLike | None = None,
    return_attention_scores: bool = False,
    dtype: FloatType = np.float64,
    accumulation: str = "blas",
    storage_dtype: DTypeLike | None = None,
) -> np.ndarray | tuple[np.ndarray, ...]:
    """Forward pass of the block in NumPy, every step in `dtype`.

    Args:
        x: (B, H, W, C) for "channels_last", (B, C, H, W) for "channels_first".
        weights: the canonical weight dict (`mhsa_core.reference.schema`).
        num_heads: as the layer's argument of that name, with its default;
            likewise `key_dim`, `activation`, `position_encoding`, `scale`,
            `scale_position_logits` and `data_format` (`schema.PRESETS` has
            the YOLOv4-MHSA block's values and BoTNet's).
        key_dim: as the layer's.
        activation: as the layer's.
        position_encoding: as the layer's.
        scale: as the layer's.
        scale_position_logits: as the layer's.
        data_format: as the layer's.
        use_key_bias: as the layer's, but the biases come from `weights` (as
            every bias here): False only asserts that it has no key_bias.
        qk_norm: as the layer's: None, "layer" or "rms" on each head's q and
            k (`query_norm_*`, `key_norm_*` of `weights`).
        output_norm: as the layer's: None or "layer" on the merged heads
            (`output_norm_*`).
        output_dense: as the layer's: the (C, C) projection `output_kernel`
            (+ `output_bias`) last.
        norm_epsilon: as the layer's: the norms' epsilon.
        position_size: as the layer's: the reference grid of "rope"
            (ignored by the others; learned tables give their size by their
            shapes).
        rope_temperature: as the layer's (the rotary encodings' settings,
            resolved by `schema.rope_settings`); likewise the next five.
        rope_layout: as the layer's.
        rope_grid_indexing: as the layer's.
        rope_grid_offset: as the layer's.
        rope_in_pixels: as the layer's.
        rope_max_resolution: as the layer's.
        window_size: as the layer's: None (global attention) or (wh, ww)
            (an int: square); see `window_layout`.
        shift_size: as the layer's (an int or (sh, sw), smaller than the
            window).
        prefix_tokens: optional (B, T, C), class and register tokens: they
            join the map's tokens first (after a "tokens" encoding's term,
            which they do not get), take the same projections, norms and
            output projection, are not rotated by a rotary encoding (the
            map's tokens are, by their places in the map), and are always
            keys (a map item whose keys are all masked attends to them
            only). Refused with windows and "logits" encodings
            (`arguments.check_prefix_tokens`).
        kv_reduction: as the layer's: None, an int R (an R x R stride-R
            conv of the key/value map, timm's floor for a map not divisible
            by R, then a LayerNorm) or "pool" (adaptive average pooling to
            `kv_pool_size`, torch's bins, a 1x1 conv, LayerNorm, exact GELU);
            `reduction_*` of `weights` (`reduce_map`).
        kv_pool_size: as the layer's: the pooled grid of "pool".
        context: optional (B, H', W', C') map (channels_first: (B, C', H',
            W')): keys and values from it (reduced with `kv_reduction`),
            queries from `x`.
        attention_mask: optional bool (B, H, W); True = may be attended to
            (the key mask: (B, H', W') with a context; no mask with
            `kv_reduction`).
        dtype: the float dtype of every intermediate (float64 for the oracle,
            float32 for the float32 error budget).
        accumulation: "blas" (NumPy's `@`) or "sequential" (every dot product
            summed left to right: the float32 error budget, see `error_budget`).
        storage_dtype: emulates mixed precision: with e.g. np.float16 (or
            ml_dtypes.bfloat16) and dtype=np.float32, the input, the weights and
            every tensor a Keras op hands to the next (projections, tokens,
            probabilities, output) are rounded to it, while each op computes in
            `dtype`, and the logits and softmax stay in `dtype` (as the layer
            does under a mixed_* policy). Position tables are not rounded
            (the layer keeps them, and the position term, in float32), nor
            are the norms' weights (float32 too); a norm computes in `dtype`
            from its rounded input and hands on a rounded result, as Keras's
            LayerNormalization does. Nor are rotary tables and the rotated q
            and k (the layer rotates in float32).

    Returns:
        The output in the layout of `x`, and with `return_attention_scores`
        also the attention probabilities (B, num_heads, N, Nk), N = H*W
        (with windows: zero between tokens of different windows), Nk the
        key map's tokens (N without a context or kv_reduction). With
        `prefix_tokens`: `(out, prefix_out)` (prefix_out (B, T, C)), or
        `(out, prefix_out, scores)`, scores (B, num_heads, T + N, T + N),
        the prefix tokens first.
    """
    inputs = np.asarray(x).astype(dtype)
    if data_format == "channels_first":
        inputs = inputs.transpose(0, 2, 3, 1)
    elif data_format != "channels_last":
        raise ValueError(f"Unknown data_format. Received: data_format={data_format!r}")
    batch, height, width, channels = inputs.shape
    n = height * width
    head_dim = channels // num_heads
    key_dim = head_dim if key_dim is None else key_dim
    if scale is None:
        scale = 1.0 / math.sqrt(key_dim)
    arguments.check_arguments(
        {
            "use_key_bias": use_key_bias,
            "qk_norm": qk_norm,
            "output_norm": output_norm,
            "output_dense": output_dense,
            "norm_epsilon": norm_epsilon,
        }
    )
    if use_key_bias is False and weights.get("key_bias") is not None:
        raise ValueError(
            "use_key_bias=False, and `weights` has a key_bias. "
            f"Received: key_bias.shape={np.shape(weights['key_bias'])}"
        )
    act = ACTIVATIONS[activation]
    matmuls: dict[str, Matmul] = {"blas": np.matmul, "sequential": _matmul_sequential}
    matmul = matmuls[accumulation]
    store: Store
    if storage_dtype is None:

        def store(a: np.ndarray) -> np.ndarray:
            return a
    else:

        def store(a: np.ndarray) -> np.ndarray:
            return np.asarray(a).astype(storage_dtype).astype(dtype)

    inputs = store(inputs)

    # Step 1: tokens, row-major over (H, W).
    t = inputs.reshape(batch, n, channels)
    # Step 2: a position encoding that acts on the tokens.
    schema.encoding(position_encoding)  # a ValueError for an unknown one
    t = token_term(t, weights, position_encoding, height, width, dtype, matmul, store)
    # Step 2b: prefix tokens first (timm's and EVA's order), no position term.
    num_prefix = 0
    if prefix_tokens is not None:
        prefix = np.asarray(prefix_tokens)
        if prefix.ndim != 3 or prefix.shape[0] != batch or prefix.shape[2] != channels:
            raise ValueError(
                f"`prefix_tokens` must have shape (B, T, C)=({batch}, T, {channels}). "
                f"Received: prefix_tokens.shape={prefix.shape}"
            )
        arguments.check_prefix_tokens(
            prefix.shape,
            position_encoding,
            window_size=window_size,
            kv_reduction=kv_reduction,
            context=context,
        )
        num_prefix = prefix.shape[1]
        t = np.concatenate([store(prefix.astype(dtype)), t], axis=1)
    total = num_prefix + n  # every token, the prefix tokens first
    # Step 2c: the key/value map: the tokens' own, or the context's; reduced
    # by `kv_reduction` (after a "tokens" term, as PVT adds its embedding).
    arguments.check_arguments(
        {"kv_reduction": kv_reduction, "kv_pool_size": kv_pool_size}
    )
    arguments.check_kv(
        kv_reduction, window_size, position_encoding, context=context is not None
    )
    if attention_mask is not None and kv_reduction is not None:
        raise ValueError(
            "attention_mask cannot be used with kv_reduction: a reduced key mixes "
            "masked and unmasked positions. Received: attention_mask of shape "
            f"{np.shape(attention_mask)}, kv_reduction={kv_reduction!r}"
        )
    other_keys = context is not None or kv_reduction is not None
    kv_tokens, key_height, key_width, nk = t, height, width, total
    if other_keys:
        if context is None:
            kv_map = t.reshape(batch, height, width, channels)
        else:
            kv_map = store(np.asarray(context).astype(dtype))
            if data_format == "channels_first":
                kv_map = kv_map.transpose(0, 2, 3, 1)
        if kv_reduction is not None:
            kv_map = reduce_map(
                kv_map,
                weights,
                kv_reduction,
                kv_pool_size,
                norm_epsilon,
                dtype,
                matmul,
                store,
            )
        key_height, key_width = kv_map.shape[1], kv_map.shape[2]
        arguments.check_key_grid(
            position_encoding, (height, width), (key_height, key_width)
        )
        nk = key_height * key_width
        kv_tokens = kv_map.reshape(batch, nk, kv_map.shape[3])
    # Step 3: projections.
    q, k, v = (
        act(dense(src, weights, f"{p}_kernel", f"{p}_bias", dtype, matmul, store))
        for p, src in zip(schema.PROJECTIONS, (t, kv_tokens, kv_tokens))
    )  # (B, N, heads*kd), (B, Nk, heads*kd), (B, Nk, C)
    # Step 4a: a norm of each head's q and k (over its kd channels; one
    # scale, and bias, shared by the heads).
    if qk_norm is not None:

        def head_norm(t: np.ndarray, prefix: str) -> np.ndarray:
            tokens = t.shape[1]
            per_head = t.reshape(batch, tokens, num_heads, key_dim)
            normed = norm(per_head, weights, prefix, qk_norm, norm_epsilon, dtype)
            return store(normed.reshape(batch, tokens, num_heads * key_dim))

        q, k = head_norm(q, "query"), head_norm(k, "key")
    # Step 4b: a rotary encoding's angles, (heads or 1, N, kd / 2); the
    # rotation (step 5) acts on the normed q and k, as timm.
    rope: dict[str, Any] = {
        "rope_temperature": rope_temperature,
        "rope_layout": rope_layout,
        "rope_grid_indexing": rope_grid_indexing,
        "rope_grid_offset": rope_grid_offset,
        "rope_in_pixels": rope_in_pixels,
        "rope_max_resolution": rope_max_resolution,
    }
    arguments.check_arguments({"position_encoding": position_encoding, **rope})
    arguments.check_key_dim(key_dim, position_encoding)
    settings = schema.rope_settings(
        position_encoding, position_size=position_size, **rope
    )
    angles = rotation_angles(
        weights, position_encoding, settings, height, width, key_dim, dtype
    )
    # The key map's angles: its cells spread over the query grid.
    key_angles = (
        angles
        if not other_keys
        else rotation_angles(
            weights,
            position_encoding,
            settings,
            key_height,
            key_width,
            key_dim,
            dtype,
            span=(height, width),
        )
    )

    keep = np.ones((batch, nk), dtype=bool)  # prefix tokens: always keys
    if attention_mask is not None:
        keep[:, num_prefix:] = np.asarray(attention_mask, dtype=bool).reshape(
            batch, nk - num_prefix
        )

    # Step 5: attention, per window, batch item and head; a rotary encoding
    # first rotates each head's q and k by the angles of their tokens' places
    # in the map (the map's tokens only: prefix tokens are not rotated).
    if angles is not None and key_angles is not None and settings is not None:
        q, k = q.copy(), k.copy()
        for h in range(num_heads):
            qs = slice(h * key_dim, (h + 1) * key_dim)
            head_angles = angles[h % angles.shape[0]]  # (N, kd / 2)
            head_key_angles = key_angles[h % key_angles.shape[0]]  # (Nk, kd / 2)
            for b in range(batch):
                mq, mk = q[b, num_prefix:, qs], k[b, num_prefix:, qs]
                q[b, num_prefix:, qs] = rotate(mq, head_angles, settings.layout)
                k[b, num_prefix:, qs] = rotate(mk, head_key_angles, settings.layout)
    arguments.check_window(window_size, shift_size, position_encoding)
    if other_keys:
        out, scores = _attend_other_keys(
            q,
            k,
            v,
            keep,
            weights=weights,
            num_heads=num_heads,
            key_dim=key_dim,
            scale=scale,
            scale_position_logits=scale_position_logits,
            position_encoding=position_encoding,
            grid=(height, width),
            dtype=dtype,
            matmul=matmul,
            store=store,
        )
        return _finish(
            out,
            scores,
            weights,
            (height, width),
            output_norm=output_norm,
            output_dense=output_dense,
            norm_epsilon=norm_epsilon,
            data_format=data_format,
            return_attention_scores=return_attention_scores,
            dtype=dtype,
            matmul=matmul,
            store=store,
        )
    (eh, ew), windows, regions = window_layout(height, width, window_size, shift_size)
    if num_prefix:  # one window of every token (no windows with prefix tokens)
        windows, regions = [list(range(total))], [[0] * total]
    # A term of no query ("relative_bias"), per head, at the window's size.
    biases = position_bias(weights, position_encoding, eh, ew, dtype)

    out = np.zeros((batch, total, channels), dtype=dtype)
    scores = np.zeros((batch, num_heads, total, total), dtype=dtype)
    for slots, labels in zip(windows, regions):
        slots_a = np.asarray(slots)
        real = slots_a >= 0  # padding slots: no token
        tokens = np.where(real, slots_a, 0)
        # Keys of another shift region: the shift mask (0 within a region).
        region = np.asarray(labels)
        shift_mask = np.where(
            region[:, None] == region[None, :], 0.0, schema.SHIFT_MASK_LOGIT
        ).astype(dtype)
        for b in range(batch):
            valid = real & keep[b, tokens]
            for h in range(num_heads):
                qs = slice(h * key_dim, (h + 1) * key_dim)
                vs = slice(h * head_dim, (h + 1) * head_dim)
                # (Nw, kd), padding slots zero (their rows and keys are unused)
                qh = np.where(real[:, None], q[b, tokens, qs], 0).astype(dtype)
                kh = np.where(real[:, None], k[b, tokens, qs], 0).astype(dtype)
                vh = np.where(real[:, None], v[b, tokens, vs], 0).astype(dtype)
                if not valid.any():
                    # Every key masked: probabilities and output are zero.
                    continue
                logits = matmul(qh, kh.T)  # (Nw, Nw)
                pos = position_logits(
                    qh, weights, position_encoding, eh, ew, dtype, matmul
                )
                if biases is not None:
                    pos = biases[h]
                if pos is None:
                    logits = dtype(scale) * logits
                elif scale_position_logits:
                    logits = dtype(scale) * (logits + pos)
                else:
                    logits = dtype(scale) * logits + pos
                if window_size is not None:
                    logits = logits + shift_mask
                logits = logits[:, valid]  # only the keys that may be attended to
                e = np.exp(logits - logits.max(axis=1, keepdims=True))
                p = e / e.sum(axis=1, keepdims=True)  # (Nw, valid keys)
                rows = tokens[real]
                scores[b, h][np.ix_(rows, tokens[valid])] = p[real]
                out[b, rows, vs] = store(matmul(store(p), vh[valid]))[real]

    return _finish(
        out,
        scores,
        weights,
        (height, width),
        output_norm=output_norm,
        output_dense=output_dense,
        norm_epsilon=norm_epsilon,
        data_format=data_format,
        return_attention_scores=return_attention_scores,
        dtype=dtype,
        matmul=matmul,
        store=store,
        num_prefix=None if prefix_tokens is None else num_prefix,
    )


def _finish(
    out: np.ndarray,
    scores: np.ndarray,
    weights: Mapping[str, np.ndarray],
    grid: tuple[int, int],
    *,
    output_norm: str | None,
    output_dense: bool,
    norm_epsilon: float,
    data_format: str,
    return_attention_scores: bool,
    dtype: FloatType,
    matmul: Matmul,
    store: Store,
    num_prefix: int | None = None,
) -> np.ndarray | tuple[np.ndarray, ...]:
    """Step 6: the merged heads (B, T + N, C), normed and projected (a fully
    masked item's zeros become what they give: the bias terms), in the
    layout of the input; with `num_prefix` T (prefix tokens given, T may be
    0) also the prefix tokens' (B, T, C), as `mhsa_forward` returns them."""
    if output_norm is not None:
        out = store(norm(out, weights, "output", output_norm, norm_epsilon, dtype))
    if output_dense:
        kernel, bias = schema.OUTPUT_PROJECTION
        out = dense(out, weights, kernel, bias, dtype, matmul, store)
    # Prefix tokens first: (B, T, C) as they are, the map's in its layout.
    prefix_out = out[:, :num_prefix]
    out = out[:, num_prefix:]
    out = out.reshape(out.shape[0], grid[0], grid[1], out.shape[-1])
    if data_format == "channels_first":
        out = out.transpose(0, 3, 1, 2)
    results = (out,) if num_prefix is None else (out, prefix_out)
    if return_attention_scores:
        return (*results, scores)
    return results[0] if num_prefix is None else results


def _attend_other_keys(
    q: np.ndarray,
    k: np.ndarray,
    v: np.ndarray,
    keep: np.ndarray,
    *,
    weights: Mapping[str, np.ndarray],
    num_heads: int,
    key_dim: int,
    scale: float,
    scale_position_logits: bool,
    position_encoding: str,
    grid: tuple[int, int],
    dtype: FloatType,
    matmul: Matmul,
    store: Store,
) -> tuple[np.ndarray, np.ndarray]:
    """Step 5 with keys and values from another map (a context, a reduced
    map): q (B, N, heads*kd), k (B, Nk, heads*kd), v (B, Nk, C), keep
    (B, Nk). No windows; a "logits" encoding only on equal grids (checked
    before), its term at the query grid. Returns the merged heads (B, N, C)
    and the probabilities (B, heads, N, Nk)."""
    batch, n, _ = q.shape
    nk, channels = v.shape[1], v.shape[2]
    head_dim = channels // num_heads
    out = np.zeros((batch, n, channels), dtype=dtype)
    scores = np.zeros((batch, num_heads, n, nk), dtype=dtype)
    biases = position_bias(weights, position_encoding, grid[0], grid[1], dtype)
    for b in range(batch):
        valid = keep[b]
        if not valid.any():
            continue  # every key masked: probabilities and output are zero
        for h in range(num_heads):
            qs = slice(h * key_dim, (h + 1) * key_dim)
            vs = slice(h * head_dim, (h + 1) * head_dim)
            qh = q[b, :, qs]
            logits = matmul(qh, k[b, :, qs].T)  # (N, Nk)
            pos = position_logits(
                qh, weights, position_encoding, grid[0], grid[1], dtype, matmul
            )
            if biases is not None:
                pos = biases[h]
            if pos is None:
                logits = dtype(scale) * logits
            elif scale_position_logits:
                logits = dtype(scale) * (logits + pos)
            else:
                logits = dtype(scale) * logits + pos
            logits = logits[:, valid]
            e = np.exp(logits - logits.max(axis=1, keepdims=True))
            p = e / e.sum(axis=1, keepdims=True)
            scores[b, h][:, valid] = p
            out[b, :, vs] = store(matmul(store(p), v[b][valid][:, vs]))
    return out, scores


def _adaptive_bins(size: int, out: int) -> list[tuple[int, int]]:
    """torch's adaptive pooling bins of an axis of `size` cells into `out`:
    [floor(i * size / out), ceil((i + 1) * size / out))."""
    return [((i * size) // out, -(-((i + 1) * size) // out)) for i in range(out)]


def reduce_map(
    m: np.ndarray,
    weights: Mapping[str, np.ndarray],
    kv_reduction: int | str,
    kv_pool_size: int | tuple[int, int],
    norm_epsilon: float,
    dtype: FloatType,
    matmul: Matmul,
    store: Store,
) -> np.ndarray:
    """`kv_reduction` of a key/value map (B, H, W, C) -> (B, H', W', C), as
    timm's pvt_v2 `Attention`.

    - int R: `sr` = Conv2d(C, C, R, stride R), no padding (H' = floor(H / R):
      the last H % R rows and W % R columns are in no window), kernel
      `reduction_kernel` (R, R, C, C) [dy, dx, in, out], then `norm`, a
      LayerNorm (`reduction_norm_*`);
    - "pool": AdaptiveAvgPool2d(kv_pool_size) (bin i of an axis of n cells:
      [floor(i n / o), ceil((i + 1) n / o)), a mean), the 1x1 conv
      `reduction_kernel` (C, C), the LayerNorm, exact GELU.
    """
    batch, height, width, channels = m.shape
    kernel, bias = schema.REDUCTION_CONV
    if kv_reduction == "pool":
        out_h, out_w = arguments.pair(kv_pool_size)
        pooled = np.zeros((batch, out_h, out_w, channels), dtype=dtype)
        for i, (y0, y1) in enumerate(_adaptive_bins(height, out_h)):
            for j, (x0, x1) in enumerate(_adaptive_bins(width, out_w)):
                cell = m[:, y0:y1, x0:x1].reshape(batch, -1, channels)
                pooled[:, i, j] = cell.sum(axis=1) / dtype(cell.shape[1])
        t = store(pooled).reshape(batch, out_h * out_w, channels)
        t = dense(t, weights, kernel, bias, dtype, matmul, store)
        t = store(norm(t, weights, "reduction", "layer", norm_epsilon, dtype))
        t = store(_gelu(t))
        return t.reshape(batch, out_h, out_w, channels)
    r = int(kv_reduction)
    out_h = arguments.reduced_size(height, r, kv_pool_size, 0)
    out_w = arguments.reduced_size(width, r, kv_pool_size, 1)
    patches = m[:, : out_h * r, : out_w * r].reshape(
        batch, out_h, r, out_w, r, channels
    )
    patches = patches.transpose(0, 1, 3, 2, 4, 5).reshape(
        batch, out_h * out_w, r * r * channels
    )  # [dy, dx, c] per patch, as the kernel's rows
    flat = {kernel: np.asarray(weights[kernel]).reshape(r * r * channels, -1)}
    if bias in weights:
        flat[bias] = weights[bias]
    t = dense(patches, flat, kernel, bias, dtype, matmul, store)
    t = store(norm(t, weights, "reduction", "layer", norm_epsilon, dtype))
    return t.reshape(batch, out_h, out_w, channels)


# policy -> (compute dtype, storage dtype between ops)
_POLICY_ROUNDING: dict[str, tuple[FloatType, DTypeLike | None]] = {
    "float32": (np.float32, None),
    "mixed_float16": (np.float32, np.float16),
    "mixed_bfloat16": (np.float32, "bfloat16"),
}
POLICIES = ("float64", *_POLICY_ROUNDING)


def rounded_forward(
    x: ArrayLike,
    weights: Mapping[str, np.ndarray],
    policy: str = "float32",
    **config: Any,
) -> np.ndarray | tuple[np.ndarray, ...]:
    """This reference run with the roundings of a Keras dtype `policy`.

    float32 arithmetic with sequential accumulation; for mixed_* also 16-bit
    storage between ops. The float32 budgets are built on its error.
    """
    if policy not in _POLICY_ROUNDING:
        raise ValueError(
            f"Unknown policy. Expected one of {sorted(_POLICY_ROUNDING)}. "
            f"Received: policy={policy!r}"
        )
    dtype, storage = _POLICY_ROUNDING[policy]
    if storage == "bfloat16":
        import ml_dtypes  # a dependency of keras; NumPy has no bfloat16

        storage = ml_dtypes.bfloat16
    return mhsa_forward(
        x,
        weights,
        dtype=dtype,
        accumulation="sequential",
        storage_dtype=storage,
        **config,
    )
