"""`MultiHeadSelfAttention2D`: the 2-D multi-head self-attention block as one
Keras 3 layer."""

from __future__ import annotations

import inspect
import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import keras
import numpy as np
from keras import ops
from numpy.typing import ArrayLike

from mhsa_core._typing import Tensor
from mhsa_core.distribution import check_head_sharding
from mhsa_core.layers import activations, weight_import
from mhsa_core.layers._arrays import as_float_array
from mhsa_core.layers.attention import attend, logits_dtype
from mhsa_core.layers.attention.choice import fused_misfit
from mhsa_core.layers.attention.windows import Windows
from mhsa_core.layers.norms import apply_norm
from mhsa_core.layers.position import ENCODINGS
from mhsa_core.layers.projection import check_quantization_mode, int4_block_size
from mhsa_core.layers.weights import WeightFactory, dense
from mhsa_core.reference import arguments, schema

# Keyword arguments that keras.layers.Layer itself accepts and may write into a config.
_BASE_LAYER_KEYS = ("name", "trainable", "dtype", "autocast", "activity_regularizer")


def _sizes_fit(expected: Sequence[Any], shape: Sequence[Any]) -> bool:
    """Whether `shape` has `expected`'s rank and sizes, comparing only sizes
    known on both sides: a symbolic size (JAX's shape polymorphism in jax2tf
    exports, torch.export) names each input's dimensions apart, so "a" !=
    "c" says nothing about the sizes."""
    return len(shape) == len(expected) and all(
        not (arguments.is_int(e) and arguments.is_int(m)) or e == m
        for e, m in zip(expected, shape)
    )


def _check_lora_rank(rank: Any, name: str = "lora_rank") -> int | None:
    if rank is None:
        return None
    if isinstance(rank, bool) or not isinstance(rank, (int, np.integer)) or rank < 1:
        raise ValueError(f"`{name}` must be an int >= 1. Received: {name}={rank!r}")
    return int(rank)


def _initializer_or_none(value: Any) -> keras.initializers.Initializer | None:
    return None if value is None else keras.initializers.get(value)


def _adaptive_bins(size: int | Tensor, out: int, dtype: str) -> tuple[Tensor, Tensor]:
    """torch's adaptive average pooling of an axis of `size` cells into
    `out` bins, bin i = [floor(i * size / out), ceil((i + 1) * size / out)):
    the (out, size) 0/1 matrix of the bins' cells and the cell counts (out,),
    in `dtype`, from iota (a size known only at run time works)."""
    i = ops.arange(out, dtype="int32")
    start = (i * size) // out
    end = ((i + 1) * size + (out - 1)) // out
    cells = ops.expand_dims(ops.arange(size, dtype="int32"), 0)  # (1, size)
    inside = ops.logical_and(
        ops.greater_equal(cells, ops.expand_dims(start, 1)),
        ops.less(cells, ops.expand_dims(end, 1)),
    )
    return ops.cast(inside, dtype), ops.cast(end - start, dtype)


@keras.saving.register_keras_serializable(package="mhsa_core")
class MultiHeadSelfAttention2D(keras.layers.Layer):
    """Multi-head self-attention over the positions of a 2-D feature map.

    The map is flattened row-major into N = H * W tokens of C channels; every
    token attends to every other token; the result has the input's shape, so the
    layer drops into a convolutional backbone (YOLO-style detectors, U-Nets,
    BoTNet-style ResNets). With the defaults it is standard scaled dot-product
    attention with linear 1x1 projections and no position term:

        t = tokens(x)                                  # (B, N, C)
        t = position.tokens(t)                         # "conv", "sinusoidal"
        q, k, v = act(t @ Wq + bq), act(t @ Wk + bk), act(t @ Wv + bv)
        q_i, k_i = norm(q_i), norm(k_i)                # qk_norm (off by default)
        head i: softmax(scale * q_i k_i^T + bias) v_i  # channels [i*d, (i+1)*d)
        o = norm(concat(heads))                        # output_norm (off)
        o = o @ Wo + bo                                # output_dense (off)
        out = o reshaped to x's layout

    Position encodings ((y, x) = a token's row and column, i a query, j a key):
    "relative" (BoTNet) adds q_i . (R_h[y_j - y_i + H - 1] + R_w[x_j - x_i + W - 1])
    to the logits, "absolute" adds q_i . (E_h[y_j] + E_w[x_j]) (both shared
    across heads; times `scale` too if `scale_position_logits`), "sinusoidal"
    adds a fixed sine-cosine embedding of (y, x) to the tokens, and "conv" is
    the Keras 2 YOLOv4-MHSA block's ReLU 1x1 conv of each token added to the
    tokens. "relative_bias" (Swin) adds a learned bias per head and offset,
    B[y_i - y_j + H - 1, x_i - x_j + W - 1, h]. The learned tables R, E belong
    to the size `position_size`; at any other size they are resized (R and E
    linearly, B by timm's rule for Swin's tables), so one layer runs at any
    H x W. "rope" (EVA-02's axial rotary embedding) and "rope_mixed"
    (RoPE-Mixed's learned per-head frequencies) rotate every head's q and k
    by angles of the token's (y, x) before the attention, on every attention
    path.

    Prefix tokens (`call(x, prefix_tokens=p)`, p of shape (B, T, C): a class
    token, register tokens, as ViT, DINOv2 with registers, EVA-02, DINOv3)
    join the map's tokens in the attention, first: tokens = concat(p,
    position.tokens(t)), (B, T + N, C), timm's order. The same projections,
    q/k norms, output norm and output projection act on them, they are keys
    and queries of every attention path, and they come back as a second
    output. They get no position term: "none" has none; "sinusoidal" and
    "conv" add theirs to the map's tokens only; "rope" and "rope_mixed"
    rotate the map's q and k only (EVA's and DINOv3's rope on q[:, :, T:]),
    by the same angles as without prefix tokens. "relative", "absolute" and
    "relative_bias" refuse them (their tables are of places in the map), as
    do windows.

    Windows (Swin, `window_size`): every token attends only to the tokens of
    its window; with `shift_size` the windows are cyclically shifted and the
    tokens the shift wrapped around are masked from their new neighbours, as
    Swin's shifted windows. A map not divisible by the window is padded, and
    the padding is masked (timm's Swin does not mask it).

    Presets: `MultiHeadSelfAttention2D.yolov4_mhsa()` is the Keras 2
    YOLOv4-MHSA / CSPDarknet53-MHSA `mhsa_block` exactly (one head, ReLU
    projections, the "conv" encoding, unscaled logits), and
    `MultiHeadSelfAttention2D.botnet()` is BoTNet's attention.

    The computation uses only `keras.ops`, so the same layer, and the same saved
    `.keras` file, runs under TensorFlow, PyTorch and JAX with the same numbers.

    Args:
        num_heads: Number of attention heads. C must be divisible by it.
        key_dim: Channels per head of query and key. Defaults to
            C // num_heads. Values always have C // num_heads per head.
        activation: Activation of the query, key and value projections.
            Default None (linear); the YOLOv4-MHSA block uses "relu".
        position_encoding: "none" (default), "relative" (BoTNet's 2-D relative
            logits), "absolute" (learned factorized embeddings of the key's row
            and column, in the logits), "sinusoidal" (fixed 2-D sine-cosine
            embedding added to the tokens; C divisible by 4), "conv" (the
            YOLOv4-MHSA block's ReLU 1x1 conv of each token's own features,
            added to the tokens; it carries no position), "relative_bias"
            (Swin's learned per-head bias of the offset, in the logits),
            "rope" (2-D axial rotary embedding of q and k, timm's EVA
            `RotaryEmbeddingCat`; key_dim divisible by 4) or "rope_mixed"
            (rotary embedding with learned per-head frequencies, RoPE-Mixed /
            timm's `RotaryEmbeddingMixed`; key_dim divisible by 4).
        position_size: (Hr, Wr), the reference size of the learned tables of
            "relative" (2*Hr - 1 and 2*Wr - 1 rows of key_dim), "absolute"
            (Hr and Wr rows) and "relative_bias" ((2*Hr - 1, 2*Wr - 1, heads)).
            Default: the window with `window_size`, else the spatial size seen
            at build, which must then be static. For "rope", the reference
            grid (EVA's `ref_feat_shape`): at H x W the grid positions are
            scaled by Hr / H and Wr / W; default None, no scaling. Ignored by
            the other encodings.
        window_size: None (default: every token attends to the whole map),
            or (wh, ww) (an int: square): attention within non-overlapping
            windows of the map, Swin's window attention. Memory and time
            O(N * wh * ww). The map is padded at the bottom and right to
            whole windows and the padding is masked. "absolute" cannot run
            inside windows. The rotary encodings rotate by the token's place
            in the map (q_i . k_j depends on the offset only, so this is the
            rotation by the place in the window).
        shift_size: 0 (default), or (sh, sw) (an int: both), each smaller
            than the window: Swin's shifted windows (the map rolled by
            -shift before the windows, back after; keys the roll wrapped
            around get -100 against the others, as Swin's mask). Dropped
            along an axis where the map fits in one window, as timm. Needs
            `window_size`.
        scale_position_logits: Whether `scale` multiplies the position term
            of "relative"/"absolute"/"relative_bias" too (BoTNet's official
            code: True) or only q.k (timm's default, and Swin's: False).
        scale: Factor of the logits. Default None: 1 / sqrt(key_dim). The
            YOLOv4-MHSA block uses 1.0 (no scaling).
        use_bias: Whether the projections have biases.
        dropout: Rate at which attention probabilities are dropped, in training
            only.
        data_format: "channels_last" (B, H, W, C) or "channels_first"
            (B, C, H, W). Default: `keras.config.image_data_format()`.
        kernel_initializer: Initializer of the projection kernels (default
            "glorot_uniform", as Keras's MultiHeadAttention).
        bias_initializer: Initializer of the biases.
        position_initializer: Initializer of the position tables. Default
            None: normal with stddev 1 / sqrt(key_dim), as BoTNet and timm.
        kernel_regularizer: Regularizer of the kernels.
        bias_regularizer: Regularizer of the biases.
        kernel_constraint: Constraint of the kernels.
        bias_constraint: Constraint of the biases.
        seed: Integer seed of the dropout.
        attention_implementation: Which computation of the attention runs:
            "auto" (default), "full", "chunked" or "fused". "full" materialises
            the (B, heads, N, N) logits and probabilities (the only path that
            returns scores or applies dropout: those calls always use it).
            "chunked" processes queries in chunks of `chunk_size`, each
            recomputed in the backward pass, so memory grows with N rather
            than N^2; the numbers equal the full path's to round-off.
            "fused" uses the backend's own kernel (`ops.dot_product_attention`,
            PyTorch's SDPA flash kernel on CPU): it needs `key_dim` equal to
            C // num_heads and no "relative" encoding, and runs float64 on
            the chunked path (the kernels compute 64-bit in 32-bit). "auto":
            full up to 1024 tokens, then fused on PyTorch where it applies,
            else chunked. The rules: `mhsa_core.layers.attention.choice`.
        chunk_size: Queries per chunk of the chunked path. Default None: a
            (chunk, N) tile of about 1M elements (256 queries at N = 4096),
            between 16 and 1024.
        use_key_bias: Whether the key projection has a bias. Default None:
            `use_bias`. EVA's attention has q and v biases and no k bias
            (`use_bias=True, use_key_bias=False`).
        qk_norm: None (default), "layer" or "rms": a LayerNorm or RMSNorm of
            each head's queries and keys over their key_dim channels, before
            the logits and any position term (timm's `Attention(qk_norm=True)`
            with `norm_layer` LayerNorm or RmsNorm): one learned scale (and,
            for "layer", bias) of key_dim entries each for q and for k,
            shared by the heads.
        output_norm: None (default) or "layer": a LayerNorm of the merged
            heads (C channels) before the output projection (timm's and
            EVA's `scale_norm`).
        output_dense: Whether a learned (C, C) projection (with a bias if
            `use_bias`) follows the merged heads (timm's `proj`, the output
            projection of Keras's MultiHeadAttention). Default False: the
            output is the heads' values concatenated.
        norm_epsilon: The norms' epsilon, added to the variance (mean square
            for "rms") under the square root. Default 1e-6, timm's ViT/EVA
            norm layers' (torch's `nn.LayerNorm` default is 1e-5).
        rope_temperature: Base of the rotary frequencies: "rope"'s w_k =
            rope_temperature^(-k / (key_dim / 4)), "rope_mixed"'s initial
            magnitudes. Default None: 10000 for "rope" (EVA-02), 10 for
            "rope_mixed" (RoPE-Mixed).
        rope_layout: How the rotation pairs the channels of q and k:
            "interleaved" (default; channels 2m and 2m + 1, timm's `rot`, EVA-02)
            or "half" (channel i with i + key_dim / 2, timm's
            `rope_rotate_half`). The sin/cos tables keep timm's layout in both
            (angle m at channels 2m and 2m + 1).
        rope_grid_indexing: Which axis the first half of the rotary angles
            follows: "ij" (the row, then the column) or "xy" (the column
            first; for "rope_mixed", t_x is the column). Default None: "ij"
            for "rope" (EVA-02), "xy" for "rope_mixed" (rope-vit, timm's
            `RotaryEmbeddingMixed`).
        rope_grid_offset: Added to the integer positions of "rope"'s grid
            (timm's `grid_offset`; Perception Encoder uses 1). Default 0.
        rope_in_pixels: "rope" with positions linspace(-1, 1) per axis and
            pixel frequencies pi * 2^u, u evenly spaced in
            [0, log2(rope_max_resolution) - 1] (timm's `in_pixels=True`).
            Default False (EVA-02).
        rope_max_resolution: The top of the pixel frequencies with
            `rope_in_pixels` (timm's `max_res`). Default 224.
        kv_reduction: None (default), an int R >= 2 or "pool": keys and
            values from the key/value map reduced as timm's pvt_v2
            `Attention` (PVT v1/v2, SegFormer). R: an R x R conv of stride R
            without padding (`reduction_kernel` (R, R, C', C'),
            `reduction_bias` with `use_bias`), then a LayerNorm
            (`reduction_norm_*`, eps `norm_epsilon`): a key grid of
            (H // R, W // R), the last H % R rows and W % R columns in no
            window, as timm's conv. "pool" (pvt_v2's `linear_attn`):
            adaptive average pooling to `kv_pool_size` (torch's bins), a 1x1
            conv (`reduction_kernel` (C', C')), the LayerNorm, exact GELU.
            The map is the inputs' tokens (after a "tokens" encoding's term)
            or the context. Not with windows, an `attention_mask`, or the
            "relative", "absolute" and "relative_bias" encodings.
        kv_pool_size: The pooled grid of `kv_reduction="pool"`, an int or
            (h, w). Default 7 (pvt_v2's).
        context_channels: C' of the context of cross-attention (`context`),
            or None: read off the context when the layer is built with one
            (`key_kernel` (C', heads * key_dim), `value_kernel` (C', C)).
            Setting it makes a cross-attention layer: every call needs a
            context.
        lora_rank: LoRA on the dense maps from the build (what
            `enable_lora(rank)` sets, and what a loaded layer reads off its
            config), or None (default).
        lora_alpha: LoRA's scale alpha (the product is scaled by alpha /
            rank), or None: the rank.
        **kwargs: Base layer arguments (`name`, `dtype`, `trainable`, ...).

    Call arguments:
        inputs: (B, H, W, C) for channels_last, (B, C, H, W) for
            channels_first. H and W may differ from call to call.
        attention_mask: Optional bool (B, H, W). True = this position may be
            attended to (e.g. the valid part of a padded image). A query whose
            keys are all masked (with windows: all of its window's) gets a
            zero output. Always the key mask: (B, H', W') with a context.
        return_attention_scores: If True, also return the attention
            probabilities.
        training: Whether dropout is active.
        prefix_tokens: Optional float (B, T, C) (any layout: tokens have
            none), T static or not, T = 0 allowed: class and register
            tokens, attended to by every query and attending to every
            key. The attention_mask covers the map's keys only: prefix
            tokens are always keys.
        context: Optional (B, H', W', C') ((B, C', H', W') for
            channels_first), any H', W': cross-attention, keys and values
            from it (reduced with `kv_reduction`), queries from `inputs`.
            Rotary encodings place key cell (y', x') at (y' * H / H',
            x' * W / W') of the query grid. A layer built with a context is
            always called with one, and the other way round.

    Returns:
        The output, same shape as `inputs` and in the compute dtype; with
        `return_attention_scores=True` the tuple `(outputs, scores)`, scores of
        shape (B, num_heads, H * W, Nk), Nk = H * W, or the key map's tokens
        with a context or `kv_reduction` (float32 under mixed precision: they
        are computed in float32; with windows, zero between tokens of
        different windows). With `prefix_tokens`, `(outputs,
        prefix_outputs)`, prefix_outputs (B, T, C), and with scores
        `(outputs, prefix_outputs, scores)`, scores (B, num_heads, T + N,
        T + N), prefix tokens first. A query whose keys are all masked
        (never with prefix tokens: they are always keys) has zero
        attention output: the output itself with no output_norm or
        output_dense, else what those make of zeros (their bias terms).
        Under mixed precision the norms compute in float32 (their weights
        are float32) and return the compute dtype, as Keras's
        LayerNormalization.

    Example:

    >>> x = keras.Input((None, None, 64))
    >>> y = MultiHeadSelfAttention2D(num_heads=4)(x)
    >>> y.shape
    (None, None, None, 64)
    """

    def __init__(
        self,
        num_heads: int = 1,
        key_dim: int | None = None,
        activation: str | Callable[[Tensor], Tensor] | None = None,
        position_encoding: str = "none",
        position_size: tuple[int, int] | None = None,
        scale_position_logits: bool = True,
        scale: float | None = None,
        use_bias: bool = True,
        dropout: float = 0.0,
        data_format: str | None = None,
        kernel_initializer: str | keras.initializers.Initializer = "glorot_uniform",
        bias_initializer: str | keras.initializers.Initializer = "zeros",
        position_initializer: str | keras.initializers.Initializer | None = None,
        kernel_regularizer: str | keras.regularizers.Regularizer | None = None,
        bias_regularizer: str | keras.regularizers.Regularizer | None = None,
        kernel_constraint: str | keras.constraints.Constraint | None = None,
        bias_constraint: str | keras.constraints.Constraint | None = None,
        seed: int | None = None,
        attention_implementation: str = "auto",
        chunk_size: int | None = None,
        use_key_bias: bool | None = None,
        qk_norm: str | None = None,
        output_norm: str | None = None,
        output_dense: bool = False,
        norm_epsilon: float = 1e-6,
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
        context_channels: int | None = None,
        lora_rank: int | None = None,
        lora_alpha: float | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if data_format is None:
            data_format = keras.config.image_data_format()
        # Every rule and message: `mhsa_core.reference.arguments` (the natives
        # apply the same table). Keras resolves what only it can judge.
        checked = arguments.check_arguments(
            {
                "num_heads": num_heads,
                "key_dim": key_dim,
                "position_encoding": position_encoding,
                "position_size": position_size,
                "window_size": window_size,
                "shift_size": shift_size,
                "scale_position_logits": scale_position_logits,
                "scale": scale,
                "dropout": dropout,
                "data_format": data_format,
                "seed": seed,
                "attention_implementation": attention_implementation,
                "chunk_size": chunk_size,
                "use_key_bias": use_key_bias,
                "qk_norm": qk_norm,
                "output_norm": output_norm,
                "output_dense": output_dense,
                "norm_epsilon": norm_epsilon,
                "activation": activation,
                "position_initializer": position_initializer,
                "rope_temperature": rope_temperature,
                "rope_layout": rope_layout,
                "rope_grid_indexing": rope_grid_indexing,
                "rope_grid_offset": rope_grid_offset,
                "rope_in_pixels": rope_in_pixels,
                "rope_max_resolution": rope_max_resolution,
                "kv_reduction": kv_reduction,
                "kv_pool_size": kv_pool_size,
                "context_channels": context_channels,
            },
            convert={
                "activation": keras.activations.get,
                "position_initializer": _initializer_or_none,
            },
        )
        arguments.check_window(window_size, shift_size, position_encoding)
        arguments.check_kv(
            kv_reduction,
            window_size,
            position_encoding,
            context=context_channels is not None,
        )

        self.num_heads = int(num_heads)
        self.key_dim = None if key_dim is None else int(key_dim)
        self.activation = checked["activation"]
        self.position_encoding = position_encoding
        self.position_size = (
            None if position_size is None else tuple(int(n) for n in position_size)
        )
        self.scale_position_logits = bool(scale_position_logits)
        self.scale = None if scale is None else float(scale)
        self.use_bias = bool(use_bias)
        self.dropout = float(dropout)
        self.data_format = data_format
        self.kernel_initializer = keras.initializers.get(kernel_initializer)
        self.bias_initializer = keras.initializers.get(bias_initializer)
        self.position_initializer = checked["position_initializer"]
        self.kernel_regularizer = keras.regularizers.get(kernel_regularizer)
        self.bias_regularizer = keras.regularizers.get(bias_regularizer)
        self.kernel_constraint = keras.constraints.get(kernel_constraint)
        self.bias_constraint = keras.constraints.get(bias_constraint)
        self.seed = None if seed is None else int(seed)
        self.seed_generator = (
            keras.random.SeedGenerator(self.seed) if self.dropout > 0 else None
        )
        self.attention_implementation = attention_implementation
        self.chunk_size = None if chunk_size is None else int(chunk_size)
        self.use_key_bias = None if use_key_bias is None else bool(use_key_bias)
        self.qk_norm = qk_norm
        self.output_norm = output_norm
        self.output_dense = bool(output_dense)
        self.norm_epsilon = float(norm_epsilon)
        self.rope_temperature = (
            None if rope_temperature is None else float(rope_temperature)
        )
        self.rope_layout = rope_layout
        self.rope_grid_indexing = rope_grid_indexing
        self.rope_grid_offset = float(rope_grid_offset)
        self.rope_in_pixels = bool(rope_in_pixels)
        self.rope_max_resolution = float(rope_max_resolution)
        # As pairs (height, width): the config's canonical form.
        self.window_size = None if window_size is None else arguments.pair(window_size)
        self.shift_size = arguments.pair(shift_size)
        self.kv_reduction = (
            kv_reduction if kv_reduction in (None, "pool") else int(kv_reduction)
        )
        self.kv_pool_size = arguments.pair(kv_pool_size)
        self.context_channels = (
            None if context_channels is None else int(context_channels)
        )
        # LoRA (Keras's Dense's arguments): set by `enable_lora`, and in a
        # config so that `build` gives a loaded layer its adapters back.
        self.lora_rank = _check_lora_rank(lora_rank)
        self.lora_alpha = None if lora_alpha is None else float(lora_alpha)
        self._channel_axis = -1 if data_format == "channels_last" else 1
        # The encoding object: its weights, its tokens / logits terms, its
        # rotation of q and k; it reads its own settings among the arguments.
        self.position = ENCODINGS[position_encoding].from_arguments(
            {**checked, "position_size": self.position_size}
        )
        if attention_implementation == "fused":
            self._check_fused(key_dim, None)
        self.input_spec = keras.InputSpec(ndim=4)

    # The dense maps' variables under their canonical names (None when the
    # map or its bias is absent): read-only views of the `Projection`s.
    @property
    def query_kernel(self) -> Any:
        return self._query.kernel

    @property
    def query_bias(self) -> Any:
        return self._query.bias

    @property
    def key_kernel(self) -> Any:
        return self._key.kernel

    @property
    def key_bias(self) -> Any:
        return self._key.bias

    @property
    def value_kernel(self) -> Any:
        return self._value.kernel

    @property
    def value_bias(self) -> Any:
        return self._value.bias

    @property
    def output_kernel(self) -> Any:
        return None if self._output is None else self._output.kernel

    @property
    def output_bias(self) -> Any:
        return None if self._output is None else self._output.bias

    # ------------------------------------------------------------------ shapes
    # A shape's entries are ints, None (unknown) or symbolic sizes (jax.export,
    # torch.export): `Any`.
    def _spatial_and_channels(self, input_shape: Sequence[Any]) -> tuple[Any, Any, Any]:
        """(H, W, C) of a static input shape, any of them None if unknown."""
        if self.data_format == "channels_last":
            return input_shape[1], input_shape[2], input_shape[3]
        return input_shape[2], input_shape[3], input_shape[1]

    def _check_input_shape(self, input_shape: Sequence[Any]) -> tuple[Any, ...]:
        input_shape = tuple(input_shape)
        if len(input_shape) != 4:
            raise ValueError(
                f"{self.__class__.__name__} expects a rank-4 input, (B, H, W, C) "
                "for channels_last or (B, C, H, W) for channels_first. "
                f"Received: inputs.shape={input_shape}"
            )
        channels = self._spatial_and_channels(input_shape)[2]
        if channels is None:
            raise ValueError(
                "The channel dimension of the inputs must be known "
                f"(data_format={self.data_format!r}). "
                f"Received: inputs.shape={input_shape}"
            )
        return input_shape

    def _check_mask_shape(
        self, input_shape: Sequence[Any], mask_shape: Sequence[Any]
    ) -> None:
        height, width, _ = self._spatial_and_channels(input_shape)
        expected = (input_shape[0], height, width)
        mask_shape = tuple(mask_shape)
        if not _sizes_fit(expected, mask_shape):
            raise ValueError(
                f"`attention_mask` must have shape (B, H, W)={expected}. "
                f"Received: attention_mask.shape={mask_shape}"
            )

    def _check_prefix_tokens(
        self, input_shape: Sequence[Any], prefix: Any, **others: object
    ) -> None:
        """ValueError unless `prefix_tokens` is a float (B, T, C) of the
        inputs' batch and channels that this layer can take: not with
        windows, nor with any of `others` (call arguments that refuse prefix
        tokens when set) given."""
        shape = tuple(prefix.shape)
        batch = input_shape[0]
        channels = self._spatial_and_channels(input_shape)[2]
        dtype = keras.backend.standardize_dtype(prefix.dtype)
        if "float" not in dtype:
            raise ValueError(
                "`prefix_tokens` must be a float tensor. "
                f"Received: prefix_tokens.dtype={dtype}"
            )
        if len(shape) != 3 or not _sizes_fit((batch, channels), (shape[0], shape[-1])):
            raise ValueError(
                f"`prefix_tokens` must have shape (B, T, C)=({batch}, T, {channels}). "
                f"Received: prefix_tokens.shape={shape}"
            )
        arguments.check_prefix_tokens(
            shape,
            self.position_encoding,
            window_size=self.window_size,
            kv_reduction=self.kv_reduction,
            **others,
        )

    @property
    def head_key_dim(self) -> int:
        """Channels per head of query and key (key_dim, or C // num_heads)."""
        return self._head_key_dim

    @property
    def scale_value(self) -> float:
        """The factor actually applied to the logits."""
        if self.scale is None:
            return 1.0 / math.sqrt(self._head_key_dim)
        return self.scale

    def _resolve_position_size(self, input_shape: Sequence[Any]) -> tuple[int, ...]:
        """position_size, defaulting to the window, else to the static
        spatial size of the input."""
        if self.position_size is not None:
            return self.position_size
        if self.window_size is not None:
            return self.window_size
        height, width, _ = self._spatial_and_channels(input_shape)
        if height is None or width is None:
            raise ValueError(
                f"position_encoding={self.position_encoding!r} learns tables for "
                "a reference size, and the spatial size of the input is unknown "
                "at build. Pass `position_size`, the (height, width) of the "
                "tables' reference grid. "
                f"Received: position_size=None, inputs.shape={tuple(input_shape)}"
            )
        return (int(height), int(width))

    def build(
        self,
        inputs_shape: Sequence[int | None],
        context_shape: Sequence[int | None] | None = None,
    ) -> None:
        # (Keras matches a build argument `<name>_shape` to the call argument
        # `<name>`: hence `inputs_shape`, not `input_shape`.)
        input_shape = self._check_input_shape(inputs_shape)
        channels = self._spatial_and_channels(input_shape)[2]
        kv_channels = (
            channels if self.context_channels is None else self.context_channels
        )
        if context_shape is not None:
            context_shape = self._check_context_shape(input_shape, context_shape)
            kv_channels = self._spatial_and_channels(context_shape)[2]
        self._cross = context_shape is not None or self.context_channels is not None
        self._kv_channels = kv_channels
        self._build_shapes = (tuple(input_shape), context_shape)
        arguments.check_kv(
            self.kv_reduction,
            self.window_size,
            self.position_encoding,
            context=self._cross,
        )
        arguments.check_channels(
            channels, self.num_heads, self.position_encoding, self.key_dim
        )
        if self.attention_implementation == "fused":
            self._check_fused(self.key_dim, channels // self.num_heads)
        if self.position.spec.learned_tables:
            self.position_size = self._resolve_position_size(input_shape)
        self.channels = channels
        self._head_key_dim = (
            self.key_dim if self.key_dim is not None else channels // self.num_heads
        )
        qk_width = self.num_heads * self._head_key_dim
        # Under keras.distribution (JAX): a layout must split q/k/v into whole heads.
        check_head_sharding(self)
        weights = WeightFactory(
            self,
            use_bias=self.use_bias,
            kernel_initializer=self.kernel_initializer,
            bias_initializer=self.bias_initializer,
            kernel_regularizer=self.kernel_regularizer,
            bias_regularizer=self.bias_regularizer,
            kernel_constraint=self.kernel_constraint,
            bias_constraint=self.bias_constraint,
            position_initializer=self.position_initializer,
            position_size=self.position_size,
            variable_dtype=self.variable_dtype,
            num_heads=self.num_heads,
        )
        # Creation order = the canonical weight-dict order
        # (`mhsa_core.reference.schema.weight_shapes`), which is also the
        # order of the YOLOv4-MHSA block's convs: a "tokens" encoding's
        # weights, the projections, then a "logits" encoding's tables or a
        # "qk" encoding's frequencies.
        if self.position.spec.stage == "tokens":
            self.position.build(weights, channels, self._head_key_dim)
        self._query = weights.projection(
            ("query_kernel", "query_bias"), channels, qk_width
        )
        self._key = weights.projection(
            ("key_kernel", "key_bias"),
            kv_channels,
            qk_width,
            use_bias=self.use_key_bias,
        )
        self._value = weights.projection(
            ("value_kernel", "value_bias"), kv_channels, channels
        )
        if self.position.spec.stage != "tokens":
            self.position.build(weights, channels, self._head_key_dim)
        self._build_options(weights, channels)
        # `kv_reduction`'s conv and LayerNorm, on the key/value map: last.
        self.reduction_kernel = self.reduction_bias = None
        self.reduction_norm_scale = self.reduction_norm_bias = None
        if self.kv_reduction is not None:
            shapes = schema.reduction_weight_shapes(
                kv_channels, self.kv_reduction, self.use_bias
            )
            self.reduction_kernel, self.reduction_bias = weights.conv(
                schema.REDUCTION_CONV, shapes[schema.REDUCTION_CONV[0]]
            )
            self.reduction_norm_scale, self.reduction_norm_bias = weights.norm(
                schema.norm_weight_names("reduction", "layer"), kv_channels
            )
        # The dense maps in the canonical order: what `quantize` and
        # `enable_lora` change; the float weights' names, for the weight dict.
        self._projections = tuple(
            p
            for p in (
                *self.position.projections(),
                self._query,
                self._key,
                self._value,
                self._output,
            )
            if p is not None
        )
        self._canonical_names = tuple(v.name for v in self.weights)
        # A quantized dtype policy (a loaded quantized layer's, or one given):
        # the integer variables in place of the float kernels, in the order
        # `quantize` makes them; then LoRA's adapters (`lora_rank`).
        mode = self.quantization_mode
        if mode is not None:
            check_quantization_mode(mode)
            policy: Any = self.dtype_policy  # type: ignore[has-type]  # Keras: untyped property
            block_size = int4_block_size(policy) if mode == "int4" else None
            for projection in self._projections:
                projection.quantized_build(mode, block_size)
            self._is_quantized = True
        if self.lora_rank is not None:
            self._add_lora(self.lora_rank, self.lora_alpha, "he_uniform", "zeros")
        # One spec per call input: the context's channels are checked by the
        # layer itself (`_check_context_shape`), with its own message.
        self.input_spec = keras.InputSpec(ndim=4, axes={self._channel_axis: channels})

    def _build_options(self, weights: WeightFactory, channels: int) -> None:
        """The q/k norms, the output norm and the output projection (each
        None when off), after the position tables: the canonical order."""
        self.query_norm_scale, self.query_norm_bias = self._norm_weights(
            weights, "query", self.qk_norm, self._head_key_dim
        )
        self.key_norm_scale, self.key_norm_bias = self._norm_weights(
            weights, "key", self.qk_norm, self._head_key_dim
        )
        self.output_norm_scale, self.output_norm_bias = self._norm_weights(
            weights, "output", self.output_norm, channels
        )
        self._output = None
        if self.output_dense:
            self._output = weights.projection(
                schema.OUTPUT_PROJECTION, channels, channels
            )

    @staticmethod
    def _norm_weights(
        weights: WeightFactory, prefix: str, kind: str | None, width: int
    ) -> tuple[Tensor | None, Tensor | None]:
        if kind is None:
            return None, None
        return weights.norm(schema.norm_weight_names(prefix, kind), width)

    def _check_fused(self, key_dim: int | None, value_dim: int | None) -> None:
        misfit = fused_misfit(self.position, key_dim, value_dim)
        if misfit is not None:
            raise ValueError(
                f"attention_implementation='fused' cannot run this layer: {misfit}. "
                "Use 'chunked' (the same memory bound, any encoding) or 'auto'. "
                f"Received: attention_implementation='fused', "
                f"position_encoding={self.position_encoding!r}, key_dim={key_dim!r}"
            )

    def compute_output_shape(
        self, input_shape: Sequence[int | None]
    ) -> tuple[int | None, ...]:
        return tuple(self._check_input_shape(input_shape))

    def compute_output_spec(
        self,
        inputs: keras.KerasTensor,
        attention_mask: keras.KerasTensor | None = None,
        return_attention_scores: bool = False,
        training: bool | None = None,
        context: keras.KerasTensor | None = None,
        prefix_tokens: keras.KerasTensor | None = None,
    ) -> keras.KerasTensor | tuple[keras.KerasTensor, ...]:
        shape = self._check_input_shape(inputs.shape)
        self._check_context_use(context)
        key_grid = self._key_grid(shape, context)
        if attention_mask is not None:
            self._check_mask(shape, attention_mask.shape, context)
        results = [keras.KerasTensor(shape, dtype=self.compute_dtype)]
        height, width, channels = self._spatial_and_channels(shape)
        n = None if height is None or width is None else height * width
        nk = n
        if context is not None or self.kv_reduction is not None:
            kh, kw = key_grid
            nk = None if kh is None or kw is None else kh * kw
        if prefix_tokens is not None:
            self._check_prefix_tokens(shape, prefix_tokens, context=context)
            prefix_shape = tuple(prefix_tokens.shape)
            results.append(
                keras.KerasTensor(
                    (prefix_shape[0], prefix_shape[1], channels),
                    dtype=self.compute_dtype,
                )
            )
            n = None if n is None or prefix_shape[1] is None else n + prefix_shape[1]
            nk = n  # prefix tokens: self-attention only
        if return_attention_scores:
            results.append(
                keras.KerasTensor(
                    (shape[0], self.num_heads, n, nk),
                    dtype=logits_dtype(self.compute_dtype),
                )
            )
        return results[0] if len(results) == 1 else tuple(results)

    # ------------------------------------------------- keys from another map
    def _check_context_use(self, context: Any) -> None:
        """ValueError when a layer built for a context is called without one,
        or the other way round."""
        cross = getattr(self, "_cross", None)
        if cross is None:  # not built yet: build decides
            cross = self.context_channels is not None
            if context is None and not cross:
                return
            if context is not None:
                return
        if cross and context is None:
            raise ValueError(
                f"{self.__class__.__name__} {self.name!r} attends to a context "
                f"(context_channels={self.context_channels!r}, or built with a "
                "context): call it with `context`. Received: context=None"
            )
        if not cross and context is not None:
            raise ValueError(
                f"{self.__class__.__name__} {self.name!r} was built for "
                "self-attention (no context): make a layer for cross-attention "
                "(called with `context` first, or `context_channels`). Received: "
                f"context.shape={tuple(context.shape)}"
            )

    def _check_context_shape(
        self, input_shape: Sequence[Any], context_shape: Sequence[Any]
    ) -> tuple[Any, ...]:
        """The context's shape, checked against the inputs': rank 4, the
        same batch, C' known and equal to `context_channels` (once built:
        the built C')."""
        context_shape = tuple(context_shape)
        if len(context_shape) != 4:
            raise ValueError(
                "`context` must be a rank-4 map, (B, H', W', C') for channels_last "
                "or (B, C', H', W') for channels_first. "
                f"Received: context.shape={context_shape}"
            )
        batch, other = input_shape[0], context_shape[0]
        if arguments.is_int(batch) and arguments.is_int(other) and batch != other:
            raise ValueError(
                f"`context` must have the inputs' batch size {batch}. "
                f"Received: context.shape={context_shape}"
            )
        channels = self._spatial_and_channels(context_shape)[2]
        expected = getattr(self, "_kv_channels", None) if self.built else None
        expected = expected if expected is not None else self.context_channels
        if channels is None or (expected is not None and channels != expected):
            raise ValueError(
                f"`context` must have {expected if expected else 'known'} channels "
                f"(context_channels={self.context_channels!r}, "
                f"data_format={self.data_format!r}). "
                f"Received: context.shape={context_shape}"
            )
        return context_shape

    def _key_grid(self, input_shape: Sequence[Any], context: Any) -> tuple[Any, Any]:
        """(H', W') of the keys' map where known (None where not): the
        inputs' or the context's grid, reduced by `kv_reduction`. Checks
        the context's shape, R against the map, and the encoding's need
        for equal grids."""
        height, width, _ = self._spatial_and_channels(input_shape)
        grid: tuple[Any, ...] = (height, width)
        if context is not None:
            context_shape = self._check_context_shape(input_shape, context.shape)
            grid = self._spatial_and_channels(context_shape)[:2]
        if self.kv_reduction is not None:
            grid = tuple(
                None
                if not arguments.is_int(size)
                else arguments.reduced_size(
                    int(size), self.kv_reduction, self.kv_pool_size, axis
                )
                for axis, size in enumerate(grid)
            )
            if self.kv_reduction == "pool":
                grid = self.kv_pool_size
        if context is not None or self.kv_reduction is not None:
            arguments.check_key_grid(self.position_encoding, (height, width), grid)
        return grid[0], grid[1]

    def _check_mask(
        self, input_shape: Sequence[Any], mask_shape: Sequence[Any], context: Any
    ) -> None:
        if self.kv_reduction is not None:
            raise ValueError(
                "`attention_mask` cannot be used with kv_reduction: a reduced key "
                "mixes masked and unmasked positions. Received: "
                f"attention_mask.shape={tuple(mask_shape)}, "
                f"kv_reduction={self.kv_reduction!r}"
            )
        if context is None:
            self._check_mask_shape(input_shape, mask_shape)
            return
        # The key mask: the context's grid.
        context_shape = tuple(context.shape)
        height, width, _ = self._spatial_and_channels(context_shape)
        expected = (input_shape[0], height, width)
        mask_shape = tuple(mask_shape)
        if not _sizes_fit(expected, mask_shape):
            raise ValueError(
                "`attention_mask` masks the context's keys: it must have shape "
                f"(B, H', W')={expected}. Received: attention_mask.shape={mask_shape}"
            )

    def _reduce(self, kv_map: Tensor) -> Tensor:
        """`kv_reduction` of the key/value map (B, H, W, C') -> (B, H', W', C'),
        as timm's pvt_v2 `Attention` (`mhsa_core.reference.forward.reduce_map`)."""
        shape = ops.shape(kv_map)
        batch, height, width = shape[0], shape[1], shape[2]
        channels = self._kv_channels
        dtype = self.compute_dtype
        if self.kv_reduction == "pool":
            out_h, out_w = self.kv_pool_size
            # torch's adaptive bins as 0/1 matrices (o, n) from iota, sums
            # over them, then / the bin's cell count (dynamic H, W work).
            ind_h, count_h = _adaptive_bins(height, out_h, dtype)
            ind_w, count_w = _adaptive_bins(width, out_w, dtype)
            sums = ops.einsum("ih,bhwc->biwc", ind_h, kv_map)
            sums = ops.einsum("jw,biwc->bijc", ind_w, sums)
            counts = ops.expand_dims(count_h, 1) * ops.expand_dims(count_w, 0)
            pooled = sums / ops.expand_dims(counts, -1)  # (B, oh, ow, C')
            t = ops.reshape(pooled, (batch, out_h * out_w, channels))
            t = dense(t, self.reduction_kernel, self.reduction_bias)
            t = apply_norm(
                t,
                "layer",
                self.reduction_norm_scale,
                self.reduction_norm_bias,
                self.norm_epsilon,
            )
            gelu = activations.for_dtype(keras.activations.gelu, dtype)
            assert gelu is not None
            t = gelu(t)
            return ops.reshape(t, (batch, out_h, out_w, channels))
        r = int(self.kv_reduction)  # type: ignore[arg-type]
        if arguments.is_int(height) and arguments.is_int(width):
            out_h = arguments.reduced_size(int(height), r, None, 0)
            out_w = arguments.reduced_size(int(width), r, None, 1)
            if out_h * r != height or out_w * r != width:
                kv_map = kv_map[:, : out_h * r, : out_w * r]
        else:
            # A size known at run time: floor too (no check there: a map
            # smaller than R has no keys).
            out_h, out_w = height // r, width // r
            kv_map = kv_map[:, : out_h * r, : out_w * r]
        # The stride-R conv without padding as patches @ kernel (einsum:
        # float64-exact on every backend).
        patches = ops.reshape(kv_map, (batch, out_h, r, out_w, r, channels))
        patches = ops.transpose(patches, (0, 1, 3, 2, 4, 5))
        patches = ops.reshape(patches, (batch, out_h * out_w, r * r * channels))
        kernel = ops.reshape(self.reduction_kernel, (r * r * channels, channels))
        t = dense(patches, kernel, self.reduction_bias)
        t = apply_norm(
            t,
            "layer",
            self.reduction_norm_scale,
            self.reduction_norm_bias,
            self.norm_epsilon,
        )
        return ops.reshape(t, (batch, out_h, out_w, channels))

    def get_build_config(self) -> dict[str, Any]:
        if getattr(self, "_build_shapes", None) is None:
            return super().get_build_config()
        config: dict[str, Any] = {"input_shape": self._build_shapes[0]}
        if self._build_shapes[1] is not None:
            config["context_shape"] = self._build_shapes[1]
        return config

    def build_from_config(self, config: dict[str, Any]) -> None:
        if not config:
            return
        if "shapes_dict" in config:  # Keras's own form, more than one input
            shapes = config["shapes_dict"]
            self.build(shapes["inputs_shape"], shapes.get("context_shape"))
        else:
            self.build(config["input_shape"], config.get("context_shape"))

    # -------------------------------------------------------------------- call
    def call(
        self,
        inputs: Tensor,
        attention_mask: Tensor | None = None,
        return_attention_scores: bool = False,
        training: bool | None = None,
        context: Tensor | None = None,
        prefix_tokens: Tensor | None = None,
    ) -> Tensor | tuple[Tensor, ...]:
        self._check_context_use(context)
        x = inputs
        if self.data_format == "channels_first":
            # 1x1 projections act on tokens, so the layout is resolved once here.
            x = ops.transpose(x, (0, 2, 3, 1))  # (B, H, W, C)
        shape = ops.shape(x)  # entries may be dynamic (None at trace time)
        batch, height, width = shape[0], shape[1], shape[2]
        channels, heads, key_dim = self.channels, self.num_heads, self._head_key_dim
        n = height * width

        tokens = ops.reshape(x, (batch, n, channels))  # (B, N, C), row-major
        tokens = self.position.tokens(tokens, height, width)
        num_prefix, total = 0, n  # prefix tokens, all tokens
        if prefix_tokens is not None:
            prefix_tokens = ops.convert_to_tensor(prefix_tokens)
            self._check_prefix_tokens(
                tuple(inputs.shape), prefix_tokens, context=context
            )
            # Prefix first (timm/EVA), after the map's token term: the same
            # projections and norms, no position term.
            prefix_tokens = ops.cast(prefix_tokens, tokens.dtype)
            num_prefix = ops.shape(prefix_tokens)[1]
            tokens = ops.concatenate([prefix_tokens, tokens], axis=1)  # (B, T+N, C)
            total = n + num_prefix
        # Keys and values from another map than the queries' (a context, the
        # map reduced by `kv_reduction`): its grid (kh, kw), Nk tokens. (Never
        # with prefix tokens: `_check_prefix_tokens` refuses both.)
        other_keys = context is not None or self.kv_reduction is not None
        kv_tokens, key_height, key_width, nk = tokens, height, width, total
        if other_keys:
            if context is None:
                kv_map = ops.reshape(tokens, (batch, height, width, channels))
            else:
                context = ops.convert_to_tensor(context)
                self._key_grid(tuple(inputs.shape), context)  # the shape rules
                # The compute dtype, as Keras casts `inputs` (a NumPy float64
                # context under float32, a float32 one under mixed precision).
                kv_map = ops.cast(context, self.compute_dtype)
                if self.data_format == "channels_first":
                    kv_map = ops.transpose(kv_map, (0, 2, 3, 1))
            if self.kv_reduction is not None:
                if context is None:
                    self._key_grid(tuple(inputs.shape), None)  # R against the map
                kv_map = self._reduce(kv_map)
            kv_shape = ops.shape(kv_map)
            key_height, key_width = kv_shape[1], kv_shape[2]
            nk = key_height * key_width
            kv_tokens = ops.reshape(kv_map, (batch, nk, self._kv_channels))
        activation = activations.for_dtype(self.activation, self.compute_dtype)
        q = self._query(tokens, activation)
        k = self._key(kv_tokens, activation)
        v = self._value(kv_tokens, activation)
        # q: (B, N, heads*kd); k: (B, Nk, heads*kd); v: (B, Nk, C)

        def split_heads(t: Tensor, dim: int, count: Any = total) -> Tensor:
            # (B, count, h*d) -> (B, h, count, d)
            return ops.transpose(
                ops.reshape(t, (batch, count, heads, dim)), (0, 2, 1, 3)
            )

        key_mask = None
        if attention_mask is not None:
            attention_mask = ops.convert_to_tensor(attention_mask)
            self._check_mask(tuple(inputs.shape), tuple(attention_mask.shape), context)
            # On the keys' map: (B, Nk) of another map, else (B, N).
            key_mask = ops.reshape(attention_mask, (batch, nk if other_keys else n))
            if prefix_tokens is not None:
                # Prefix tokens are always keys: (B, T + N), True first.
                always = ops.ones_like(prefix_tokens[:, :, 0], dtype="bool")
                key_mask = ops.concatenate([always, key_mask], axis=1)

        query = split_heads(q, key_dim)  # (B, heads, N, kd)
        key = split_heads(k, key_dim, nk)  # (B, heads, Nk, kd)
        value = split_heads(v, channels // heads, nk)  # (B, heads, Nk, dv)
        if self.qk_norm is not None:
            # Per head over kd, one scale (and bias) for every head, as timm.
            query = apply_norm(
                query,
                self.qk_norm,
                self.query_norm_scale,
                self.query_norm_bias,
                self.norm_epsilon,
            )
            key = apply_norm(
                key,
                self.qk_norm,
                self.key_norm_scale,
                self.key_norm_bias,
                self.norm_epsilon,
            )

        # A rotary encoding rotates the (normed) q and k here, once, so every
        # attention path takes the rotated q and k (after the norm, as timm).
        # With windows too: the angles are of the token's place in the map,
        # and q_i . k_j then depends only on their offset, inside a window
        # as anywhere.
        # Keys of another map: rotated by their cells' places spread over
        # the query grid (`PositionEncoding.rotate`).
        if other_keys:
            query, key = self.position.rotate(
                query, key, height, width, key_height, key_width
            )
        elif prefix_tokens is None:
            query, key = self.position.rotate(query, key, height, width)
        else:
            # The map's q and k only: prefix tokens are not rotated (EVA's
            # and DINOv3's rope on q[:, :, T:], k[:, :, T:]).
            query, key = self._rotate_map_tokens(query, key, num_prefix, height, width)

        # Swin's windows: each window a batch item of the attention, with
        # the padding masked and the shift regions apart.
        windows = regions = None
        extent = (height, width)  # the grid the attention (and its terms) see
        if self.window_size is not None:
            windows = Windows(height, width, self.window_size, self.shift_size)
            query, key, value = (windows.partition(t) for t in (query, key, value))
            key_mask = windows.key_mask(key_mask, batch)  # (B * nW, Nw) or None
            regions = windows.regions(batch)  # (B * nW, Nw) or None
            extent = windows.window

        outputs, scores = attend(
            query,
            key,
            value,
            scale=self.scale_value,
            position=self.position,
            position_scale=self.scale_value if self.scale_position_logits else 1.0,
            height=extent[0],
            width=extent[1],
            key_mask=key_mask,
            dropout=self.dropout,
            training=training,
            seed_generator=self.seed_generator,
            return_attention_scores=return_attention_scores,
            implementation=self.attention_implementation,
            chunk_size=self.chunk_size,
            regions=regions,
            key_count=nk if other_keys else None,
        )  # (B', heads, N', C // heads), (B', heads, N', Nk') or None
        if windows is not None:
            outputs = windows.merge(outputs)  # (B, heads, N, dv)
            if return_attention_scores and scores is not None:
                # O(N^2): only when asked (the full path always has them).
                scores = windows.scores_to_map(scores)  # (B, heads, N, N)
        outputs = ops.reshape(
            ops.transpose(outputs, (0, 2, 1, 3)), (batch, total, channels)
        )  # the heads merged: (B, T + N, C)
        if self.output_norm is not None:
            outputs = apply_norm(
                outputs,
                self.output_norm,
                self.output_norm_scale,
                self.output_norm_bias,
                self.norm_epsilon,
            )
        if self._output is not None:
            outputs = self._output(outputs)
        prefix_outputs = None
        if prefix_tokens is not None:
            prefix_outputs = outputs[:, :num_prefix]  # (B, T, C): no layout
            outputs = outputs[:, num_prefix:]
        outputs = ops.reshape(outputs, (batch, height, width, channels))
        if self.data_format == "channels_first":
            outputs = ops.transpose(outputs, (0, 3, 1, 2))
        results = (outputs,) if prefix_outputs is None else (outputs, prefix_outputs)
        if return_attention_scores:
            return (*results, scores)
        return results[0] if len(results) == 1 else results

    def _rotate_map_tokens(
        self,
        query: Tensor,
        key: Tensor,
        num_prefix: int | Tensor,
        height: int | Tensor,
        width: int | Tensor,
    ) -> tuple[Tensor, Tensor]:
        """The position's rotation of the map's q and k (B, heads, T + N, kd),
        the first T (the prefix tokens') as they are, in the dtype of the
        rotated ones."""
        q_map, k_map = self.position.rotate(
            query[:, :, num_prefix:], key[:, :, num_prefix:], height, width
        )
        q_prefix = ops.cast(query[:, :, :num_prefix], q_map.dtype)
        k_prefix = ops.cast(key[:, :, :num_prefix], k_map.dtype)
        return (
            ops.concatenate([q_prefix, q_map], axis=2),
            ops.concatenate([k_prefix, k_map], axis=2),
        )

    # ------------------------------------------------------------ weights I/O
    def get_weight_dict(self) -> dict[str, np.ndarray]:
        """The weights as the canonical dict of NumPy arrays (see
        `mhsa_core.reference`), trainable or not.

        A quantized layer gives its dequantized kernels (integers / scale),
        a layer with LoRA its kernels with the adapters' product added: the
        kernels it applies, for the reference and the natives.
        """
        self._require_built("get_weight_dict")
        kernels = {p.kernel_name: p for p in self._projections}
        variables = {v.name: v for v in self.weights}
        out: dict[str, np.ndarray] = {}
        for name in self._canonical_names:
            if name in kernels:
                out[name] = kernels[name].float_kernel()
            else:
                out[name] = keras.ops.convert_to_numpy(variables[name])
        return out

    def set_weight_dict(self, weights: Mapping[str, ArrayLike]) -> None:
        """Assigns weights from the canonical dict of arrays (names as
        `get_weight_dict`).

        Every weight must be given, with its exact shape; arrays are cast to the
        variables' dtype. The float weights of a layer without quantization
        or LoRA: set them before `quantize` or `enable_lora`.
        """
        self._require_built("set_weight_dict")
        if self.quantization_mode is not None or self.lora_rank is not None:
            raise ValueError(
                "set_weight_dict sets the float weights of a layer without "
                "quantization or LoRA: set them first, then quantize or enable "
                f"LoRA. Received: a layer with quantization_mode="
                f"{self.quantization_mode!r}, lora_rank={self.lora_rank!r}"
            )
        variables = {v.name: v for v in self.weights}
        expected = {name: variables[name] for name in self._canonical_names}
        if set(weights) != set(expected):
            raise ValueError(
                "`weights` must have exactly the keys "
                f"{sorted(expected)}. Received: keys={sorted(weights)}"
            )
        arrays: dict[str, np.ndarray] = {}
        for name, variable in expected.items():
            array = np.asarray(weights[name])
            if array.shape != tuple(variable.shape):
                raise ValueError(
                    f"Weight {name!r} must have shape {tuple(variable.shape)}. "
                    f"Received: shape={array.shape}"
                )
            arrays[name] = as_float_array(array, f"weight {name!r}", variable.dtype)
        # Assign only after every check and cast passed: never half-loaded.
        for name, variable in expected.items():
            variable.assign(arrays[name])

    # ------------------------------------------------- quantization and LoRA
    # Keras's hooks (those of its Dense), on the dense maps: `Projection`
    # (layers/projection.py) has the arithmetic and says why not sublayers.
    def quantize(
        self, mode: str | None = None, type_check: bool = True, config: Any = None
    ) -> None:
        """Quantizes the dense maps (query, key, value, the output
        projection, the "conv" encoding's conv) to int8 (weights and
        activations) or int4 (weights), per output channel, as Keras's
        Dense; what `model.quantize(mode)` calls. The position tables, norms,
        biases and `kv_reduction`'s conv stay float (Keras's Conv2D has no
        quantized form either).

        Args:
            mode: "int8" or "int4".
            type_check: Keras's argument (unused: every subclass quantizes).
            config: Keras's resolved `QuantizationConfig` (default quantizers
                only; int4 per channel).
        """
        del type_check
        mode = check_quantization_mode(mode, config)
        block_size = int4_block_size(config) if mode == "int4" else None
        for projection in self._projections:
            projection.quantize(mode, block_size)
        self._is_quantized = True  # before the policy: its setter would quantize
        name = f"int4/{block_size or -1}" if mode == "int4" else mode
        source: Any = self.dtype_policy  # type: ignore[has-type]  # Keras: untyped property
        self.dtype_policy = keras.dtype_policies.get(f"{name}_from_{source.name}")

    def quantized_call(self, *args: Any, **kwargs: Any) -> Any:
        # The dense maps apply their own mode (`Projection.__call__`).
        return self.call(*args, **kwargs)

    def enable_lora(
        self,
        rank: int,
        lora_alpha: float | None = None,
        a_initializer: str | keras.initializers.Initializer = "he_uniform",
        b_initializer: str | keras.initializers.Initializer = "zeros",
    ) -> None:
        """LoRA on the dense maps (Keras's Dense's method): each gets
        A (C_in, rank) and B (rank, C_out), its output + (alpha / rank) *
        (x @ A) @ B; only A and B train from then on (every other weight of
        the layer is frozen). Saved and loaded as they are (`lora_rank` in
        the config).

        Args:
            rank: The adapters' rank, an int >= 1.
            lora_alpha: alpha, or None: `rank`.
            a_initializer: A's initializer ("he_uniform", as Dense).
            b_initializer: B's initializer ("zeros": the layer's function
                is unchanged until training).
        """
        self._require_built("enable_lora")
        if self.lora_rank is not None:
            raise ValueError(
                "LoRA is already enabled on this layer (once per layer, as "
                f"Dense). Received: rank={rank!r}, lora_rank={self.lora_rank!r}"
            )
        if self.kernel_constraint is not None:
            raise ValueError(
                "LoRA cannot keep a kernel_constraint (the adapters change "
                "the kernel the constraint holds). Received: kernel_constraint="
                f"{self.kernel_constraint!r}"
            )
        checked = _check_lora_rank(rank, "rank")
        if checked is None:
            raise ValueError(f"`rank` must be an int >= 1. Received: rank={rank!r}")
        # Keras's Dense.enable_lora unlocks its tracker the same way: Keras
        # has no public way to add variables to a built layer.
        self._tracker.unlock()
        try:
            self._add_lora(checked, lora_alpha, a_initializer, b_initializer)
        finally:
            self._tracker.lock()

    def _add_lora(
        self,
        rank: int,
        alpha: float | None,
        a_initializer: str | keras.initializers.Initializer,
        b_initializer: str | keras.initializers.Initializer,
    ) -> None:
        frozen = list(self.weights)
        alpha = float(rank if alpha is None else alpha)
        for projection in self._projections:
            projection.enable_lora(
                rank,
                alpha,
                keras.initializers.get(a_initializer),
                keras.initializers.get(b_initializer),
            )
        for variable in frozen:
            variable.trainable = False
        self.lora_rank, self.lora_alpha = rank, alpha

    # ------------------------------------------------------------ presets
    @classmethod
    def yolov4_mhsa(cls, **kwargs: Any) -> MultiHeadSelfAttention2D:
        """The Keras 2 YOLOv4-MHSA / CSPDarknet53-MHSA `mhsa_block`, exactly.

        One head, ReLU 1x1 projections with biases, the block's ReLU 1x1
        "position" conv added to the tokens (`position_encoding="conv"`),
        unscaled logits (`scale=1.0`), "he_normal" kernels (the block's
        Conv2D). Any other argument, or an override, goes in `kwargs`.
        Import trained weights with `load_yolov4_mhsa_weights`.
        """
        return cls(**schema.preset("yolov4_mhsa", **kwargs))

    @classmethod
    def botnet(
        cls,
        num_heads: int | None = None,
        position_size: tuple[int, int] | None = None,
        **kwargs: Any,
    ) -> MultiHeadSelfAttention2D:
        """BoTNet's multi-head self-attention (Srinivas et al. 2021).

        Linear, bias-free q/k/v projections (`activation=None`,
        `use_bias=False`), logits scaled by 1/sqrt(key_dim) (`scale=None`),
        2-D relative position logits (`position_encoding="relative"`,
        `scale_position_logits=True` as the official code; pass False for
        timm's default), and kernels initialized "lecun_normal" (truncated
        normal, stddev 1/sqrt(C), as timm). Any other argument, or an
        override of these, goes in `kwargs`.

        Import trained BoTNet or timm weights with `load_botnet_weights`
        (`mhsa_core.convert.from_official` / `from_timm` rearrange them).
        """
        if num_heads is not None:  # else the preset's (4)
            kwargs["num_heads"] = num_heads
        return cls(**schema.preset("botnet", position_size=position_size, **kwargs))

    # ------------------------------------------------------------ converters
    def load_yolov4_mhsa_weights(self, weights: Sequence[ArrayLike]) -> None:
        """Loads the eight arrays of a Keras 2 YOLOv4-MHSA `mhsa_block`.

        See `mhsa_core.layers.weight_import.load_yolov4_mhsa_weights`: position, query,
        key, value conv kernels and biases in creation order (not the
        topological order of `model.get_weights()`). The layer needs the
        block's settings (`MultiHeadSelfAttention2D.yolov4_mhsa()`); nothing
        is built or assigned unless every array is valid.
        """
        weight_import.load_yolov4_mhsa_weights(self, weights)

    def load_seed_weights(self, weights: Sequence[ArrayLike]) -> None:
        """Deprecated alias of `load_yolov4_mhsa_weights` (kept for this release)."""
        warnings.warn(
            "load_seed_weights is renamed load_yolov4_mhsa_weights; the alias "
            "goes away in the next release.",
            DeprecationWarning,
            stacklevel=2,
        )
        self.load_yolov4_mhsa_weights(weights)

    def load_botnet_weights(
        self,
        q_kernel: ArrayLike,
        k_kernel: ArrayLike,
        v_kernel: ArrayLike,
        rel_height: ArrayLike,
        rel_width: ArrayLike,
    ) -> None:
        """Loads the weights of a BoTNet (official or timm) attention layer.

        See `mhsa_core.layers.weight_import.load_botnet_weights`: kernels
        (C, heads * kd) (value (C, C)), relative tables (2Hr - 1, kd) and
        (2Wr - 1, kd).
        Nothing is built or assigned unless every array is valid.
        """
        weight_import.load_botnet_weights(
            self, q_kernel, k_kernel, v_kernel, rel_height, rel_width
        )

    def _require_built(self, what: str) -> None:
        if not self.built:
            raise ValueError(
                f"{what} needs a built layer: call the layer on an input (or "
                "`build(input_shape)`) first."
            )

    # ------------------------------------------------------------------ config
    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config.update(
            {
                "num_heads": self.num_heads,
                "key_dim": self.key_dim,
                "activation": keras.activations.serialize(self.activation),
                "position_encoding": self.position_encoding,
                "position_size": self.position_size,
                "scale_position_logits": self.scale_position_logits,
                "scale": self.scale,
                "use_bias": self.use_bias,
                "dropout": self.dropout,
                "data_format": self.data_format,
                "kernel_initializer": keras.initializers.serialize(
                    self.kernel_initializer
                ),
                "bias_initializer": keras.initializers.serialize(self.bias_initializer),
                "position_initializer": (
                    None
                    if self.position_initializer is None
                    else keras.initializers.serialize(self.position_initializer)
                ),
                "kernel_regularizer": keras.regularizers.serialize(
                    self.kernel_regularizer
                ),
                "bias_regularizer": keras.regularizers.serialize(self.bias_regularizer),
                "kernel_constraint": keras.constraints.serialize(
                    self.kernel_constraint
                ),
                "bias_constraint": keras.constraints.serialize(self.bias_constraint),
                "seed": self.seed,
                "attention_implementation": self.attention_implementation,
                "chunk_size": self.chunk_size,
                "use_key_bias": self.use_key_bias,
                "qk_norm": self.qk_norm,
                "output_norm": self.output_norm,
                "output_dense": self.output_dense,
                "norm_epsilon": self.norm_epsilon,
                "rope_temperature": self.rope_temperature,
                "rope_layout": self.rope_layout,
                "rope_grid_indexing": self.rope_grid_indexing,
                "rope_grid_offset": self.rope_grid_offset,
                "rope_in_pixels": self.rope_in_pixels,
                "rope_max_resolution": self.rope_max_resolution,
                "window_size": self.window_size,
                "shift_size": self.shift_size,
                "kv_reduction": self.kv_reduction,
                "kv_pool_size": self.kv_pool_size,
                "context_channels": self.context_channels,
            }
        )
        if self.lora_rank is not None:
            # Only with LoRA: a float layer's config stays 0.2.0's (and loads
            # there).
            config.update({"lora_rank": self.lora_rank, "lora_alpha": self.lora_alpha})
        return config

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> MultiHeadSelfAttention2D:
        known = set(inspect.signature(cls.__init__).parameters) - {"self", "kwargs"}
        known |= set(_BASE_LAYER_KEYS)
        unknown = sorted(set(config) - known)
        if unknown:
            raise ValueError(
                f"Unknown key(s) in the config of {cls.__name__}: {unknown}. "
                f"Known keys: {sorted(known)}. Received: config={config!r}"
            )
        return cls(**config)
