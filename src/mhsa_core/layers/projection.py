"""The layer's dense maps (query, key, value, the output projection, the
legacy block's position conv) in every form Keras's own `Dense` takes: float,
int8, int4 (`model.quantize`) and with LoRA (`layer.enable_lora`).

Why the layer implements Keras's quantization and LoRA hooks itself rather
than holding `EinsumDense` sublayers (as `keras.layers.MultiHeadAttention`
does): sublayers move every kernel to another place in the `.keras` file and
in `layer.weights`, and to another variable path (the keys of users'
`keras.distribution` layout maps), so every file saved by 0.1.0 and 0.2.0
would need a translation on load; and Keras 3.15 cannot load a quantized
model whose quantized `EinsumDense` sublayers belong to another layer (its
own `MultiHeadAttention`, measured: "Layer 'key' expected 2 variables, but
received 0"), because the parent's config does not carry the sublayers'
quantized dtype policies. Here the layer's dtype policy says the mode
("int8_from_float32", as a quantized `Dense`'s), `build` creates the
quantized variables from it, and the file layout of a float layer is
unchanged.

The arithmetic is `Dense`'s, written here in `keras.ops` so that it also
runs in float64 (the consistency tool's oracle: the same integer weights and
scales, the quantized arithmetic in float64), where
`keras.quantizers.abs_max_quantize` computes its scale in float32 on JAX and
NumPy (Keras maps 64-bit to 32-bit in `result_type`):
- int8: the kernel per output channel, scale = 127 / (max|w| + 1e-7), int8 =
  clip(round(w * scale), -127, 127) (NumPy, in the kernel's dtype: the same
  integers on every backend); each token's activations the same way over
  its channels at call time; y = (x_q @ w_q) / (x_scale * w_scale), the
  integer product exact in int32. Gradients: Keras's straight-through
  estimator (d/dx through the dequantized kernel; no gradient to the int8
  kernel).
- int4: weights only (Keras 3.15's int4: no activation quantizer), two
  values per byte along the output axis (`keras.quantizers.pack_int4`);
  grouped along the input axis with a zero point per group (`block_size`,
  Keras's default 128: `keras.quantizers.abs_max_quantize_grouped_with_zero_point`,
  w = (q - zero) * scale) or per output channel (block_size -1: value range
  [-8, 7], w = q / scale); y = x @ w.
- LoRA: y = x @ W + (alpha / rank) * (x @ A) @ B, A (C_in, rank) from
  `a_initializer`, B (rank, C_out) zeros; on a quantized map W is the
  quantized one. Unlike `Dense`, the adapters are saved as they are (not
  merged into the kernel): a loaded model goes on training where it stopped.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import keras
import numpy as np
from keras import ops

from mhsa_core._typing import Tensor

# The modes of `model.quantize` the layer takes. Keras 3.15's Dense also has
# float8 (delayed-scaling training), gptq and awq (calibrated): those raise
# NotImplementedError (`check_quantization_mode`).
QUANTIZATION_MODES = ("int8", "int4")
_NOT_IMPLEMENTED = {
    "float8": "float8 (Keras's delayed-scaling float8 training)",
    "gptq": "GPTQ (calibrated)",
    "awq": "AWQ (calibrated)",
}
# (value range, whether the activations are quantized too) per mode: Keras's
# AbsMaxQuantizer defaults for Dense.
_RANGES = {"int8": (-127, 127), "int4": (-8, 7)}
# `keras.backend.epsilon()`'s default, fixed: the quantizer is part of the
# saved arithmetic, not a setting that may change under it.
EPSILON = 1e-7


def check_quantization_mode(mode: Any, config: Any = None) -> str:
    """`mode` if the layer quantizes it with `config` (Keras's resolved
    `QuantizationConfig`, or None), else a ValueError naming what it
    received."""
    if mode in _NOT_IMPLEMENTED:
        # Keras's convention for a mode a layer lacks (Dense raises it too):
        # `model.quantize` warns and quantizes the model's other layers.
        raise NotImplementedError(
            f"MultiHeadSelfAttention2D quantizes to {' or '.join(QUANTIZATION_MODES)} "
            f"(Keras's Dense arithmetic); {_NOT_IMPLEMENTED[mode]} is not "
            f"implemented. Received: mode={mode!r}"
        )
    if mode not in QUANTIZATION_MODES:
        raise ValueError(
            "MultiHeadSelfAttention2D quantizes its dense maps to "
            f"{' or '.join(repr(m) for m in QUANTIZATION_MODES)} (Keras's "
            "Dense arithmetic). 'float8' (delayed-scaling training), 'gptq' and "
            f"'awq' (calibrated) are not implemented. Received: mode={mode!r}"
        )
    weight = getattr(config, "weight_quantizer", None)
    activation = getattr(config, "activation_quantizer", None)
    if weight is not None or not _is_default_activation(mode, activation):
        raise ValueError(
            "MultiHeadSelfAttention2D quantizes with Keras's default quantizers "
            "(int8: abs-max per output channel and per token; int4: weights "
            "only); custom quantizers are not implemented. Received: "
            f"weight_quantizer={weight!r}, activation_quantizer={activation!r}"
        )
    return str(mode)


def _is_default_activation(mode: str, quantizer: Any) -> bool:
    if mode == "int4":
        return quantizer is None
    if quantizer is None:  # int8 by policy (a loaded layer): the default
        return True
    return (
        isinstance(quantizer, keras.quantizers.AbsMaxQuantizer)
        and tuple(quantizer.value_range) == _RANGES["int8"]
        and quantizer.epsilon == EPSILON
        and quantizer.axis in (None, -1, (-1,))
    )


def int4_block_size(config_or_policy: Any) -> int | None:
    """The int4 group size along the input axis (Keras 3.15's default is
    128, with a zero point per group), or None: per output channel."""
    size = getattr(config_or_policy, "block_size", None)
    return None if size in (None, -1) else int(size)


def abs_max_quantize(
    x: Tensor, value_range: tuple[int, int], axis: int = -1
) -> tuple[Tensor, Tensor]:
    """(round(x * scale) clipped to `value_range` as int8, scale) with scale =
    max(value_range) / (max|x| over `axis` + 1e-7), kept dims, in x's dtype:
    keras.quantizers.abs_max_quantize's formula in any float dtype."""
    dtype = x.dtype
    peak = ops.max(ops.abs(x), axis=axis, keepdims=True)
    scale = ops.divide(
        ops.cast(value_range[1], dtype), ops.add(peak, ops.cast(EPSILON, dtype))
    )
    q = ops.clip(ops.round(ops.multiply(x, scale)), value_range[0], value_range[1])
    return ops.cast(q, "int8"), scale


def quantize_kernel(kernel: np.ndarray, mode: str) -> tuple[np.ndarray, np.ndarray]:
    """(integers (C_in, C_out) int8, scale (C_out,)) of a float kernel, per
    output channel, in NumPy in the kernel's dtype (Keras quantizes kernels
    in NumPy too): the same integers on every backend."""
    low, high = _RANGES[mode]
    kernel = np.asarray(kernel)
    scale = np.divide(
        kernel.dtype.type(high),
        np.max(np.abs(kernel), axis=0) + kernel.dtype.type(EPSILON),
    )
    q = np.clip(np.round(kernel * scale), low, high).astype("int8")
    return q, scale.astype(kernel.dtype)


class Projection:
    """One dense map of the layer, y = activation(x @ kernel + bias), over
    tokens x (B, N, C_in) -> (B, N, C_out), in float, int8 or int4 and with
    or without LoRA.

    The variables are the layer's own (created with its `add_weight`, saved
    with it), named after the kernel: `<kernel>` (float, or the integers:
    int8 (C_in, C_out), int4 packed (C_in, ceil(C_out / 2))), `<kernel>_scale`
    (C_out,), `<kernel>_lora_a` (C_in, rank), `<kernel>_lora_b` (rank, C_out).

    Args:
        owner: the layer (its `add_weight`).
        kernel_name: e.g. "query_kernel".
        kernel: the float kernel variable (C_in, C_out).
        bias: the bias variable (C_out,), or None.
    """

    def __init__(
        self,
        owner: keras.layers.Layer,
        kernel_name: str,
        kernel: Any,
        bias: Any | None,
    ) -> None:
        self._owner = owner
        self.kernel_name = kernel_name
        self.kernel = kernel
        self.bias = bias
        self.in_width, self.out_width = (int(n) for n in kernel.shape)
        self.mode: str | None = None
        self.block_size: int | None = None  # int4 groups along C_in
        self.kernel_scale: Any | None = None
        self.kernel_zero: Any | None = None
        self.lora_a: Any | None = None
        self.lora_b: Any | None = None
        self.lora_rank: int | None = None
        self.lora_alpha: float | None = None

    # ----------------------------------------------------------------- build
    def quantized_build(self, mode: str, block_size: int | None = None) -> None:
        """Replaces the float kernel by `mode`'s integer kernel and scale (and
        for grouped int4, zero points): zeros and ones, that `quantize` or a
        load fills."""
        add = self._owner.add_weight
        # Keras's own Dense does the same (`del self._kernel`): the float
        # kernel leaves the layer's variables, and its memory.
        self._owner._untrack_variable(self.kernel)
        shape = (self.in_width, self.out_width)
        if mode == "int4":
            shape = (self.in_width, (self.out_width + 1) // 2)
        self.kernel = add(
            name=self.kernel_name,
            shape=shape,
            initializer="zeros",
            dtype="int8",
            trainable=False,
        )
        scale_shape: tuple[int, ...] = (self.out_width,)
        if mode == "int4" and block_size is not None:
            scale_shape = (-(-self.in_width // block_size), self.out_width)
        self.kernel_scale = add(
            name=f"{self.kernel_name}_scale",
            shape=scale_shape,
            initializer="ones",
            trainable=False,
        )
        if mode == "int4" and block_size is not None:
            self.kernel_zero = add(
                name=f"{self.kernel_name}_zero",
                shape=scale_shape,
                initializer="zeros",
                dtype="int8",
                trainable=False,
            )
        self.mode, self.block_size = mode, block_size

    def quantize(self, mode: str, block_size: int | None = None) -> None:
        """Quantizes the float kernel (with LoRA: the kernel alone, the
        adapters stay float, as Dense)."""
        kernel = ops.convert_to_numpy(self.kernel)
        zero = None
        if mode == "int4" and block_size is not None:
            values, scale, zero = (
                ops.convert_to_numpy(t)
                for t in keras.quantizers.abs_max_quantize_grouped_with_zero_point(
                    kernel, block_size=block_size, to_numpy=True
                )
            )
        else:
            values, scale = quantize_kernel(kernel, mode)
        if mode == "int4":
            values = ops.convert_to_numpy(
                keras.quantizers.pack_int4(values, axis=-1)[0]
            )
        self.quantized_build(mode, block_size)
        assert self.kernel_scale is not None
        self.kernel.assign(values)
        self.kernel_scale.assign(scale)
        if zero is not None:
            assert self.kernel_zero is not None
            self.kernel_zero.assign(zero)

    def enable_lora(
        self,
        rank: int,
        alpha: float,
        a_initializer: keras.initializers.Initializer,
        b_initializer: keras.initializers.Initializer,
    ) -> None:
        add = self._owner.add_weight
        self.lora_a = add(
            name=f"{self.kernel_name}_lora_a",
            shape=(self.in_width, rank),
            initializer=a_initializer,
        )
        self.lora_b = add(
            name=f"{self.kernel_name}_lora_b",
            shape=(rank, self.out_width),
            initializer=b_initializer,
        )
        self.lora_rank, self.lora_alpha = rank, float(alpha)

    # ------------------------------------------------------------------ call
    def __call__(
        self,
        tokens: Tensor,
        activation: Callable[[Tensor], Tensor] | None = None,
    ) -> Tensor:
        # einsum, not matmul: keras 3.15's torch `ops.matmul` computes float64
        # inputs in float32 (its result_type maps 64-bit to 32-bit; canary
        # "matmul-float64" in tests/canaries).
        if self.mode is None:
            y = ops.einsum("bnc,cd->bnd", tokens, self.kernel)
        elif self.mode == "int8":
            y = _int8_dense(tokens, self.kernel, self.kernel_scale)
        else:
            # Weights only: autodiff of x @ w is the straight-through
            # gradient itself (the integers are constants).
            y = ops.einsum("bnc,cd->bnd", tokens, self._int4_kernel(tokens.dtype))
        if self.lora_a is not None:
            assert self.lora_alpha is not None and self.lora_rank is not None
            low = ops.einsum("bnc,cr->bnr", tokens, self.lora_a)
            y = y + (self.lora_alpha / self.lora_rank) * ops.einsum(
                "bnr,rd->bnd", low, self.lora_b
            )
        if self.bias is not None:
            y = y + self.bias
        return y if activation is None else activation(y)

    def _int4_kernel(self, dtype: Any) -> Tensor:
        """The int4 kernel dequantized (C_in, C_out) in `dtype`: q / scale per
        channel, (q - zero) * scale per group (Keras's two int4 forms)."""
        values = ops.cast(
            keras.quantizers.unpack_int4(self.kernel, self.out_width, axis=-1), dtype
        )
        scale = ops.cast(self.kernel_scale, dtype)
        if self.block_size is None:
            return ops.divide(values, scale)
        group = np.arange(self.in_width) // self.block_size  # (C_in,) static
        zero = ops.cast(ops.take(self.kernel_zero, group, axis=0), dtype)
        return ops.multiply(values - zero, ops.take(scale, group, axis=0))

    def float_kernel(self) -> np.ndarray:
        """The kernel this map applies, as a float NumPy array (C_in, C_out):
        dequantized, with the LoRA product added (the canonical weight's
        value; exact for float without LoRA)."""
        dtype = self.bias.dtype if self.bias is not None else "float32"
        if self.mode is None:
            kernel = ops.convert_to_numpy(self.kernel)
        elif self.mode == "int8":
            values = ops.convert_to_numpy(self.kernel)
            scale = ops.convert_to_numpy(self.kernel_scale)
            kernel = values.astype(scale.dtype) / scale
        else:
            kernel = ops.convert_to_numpy(self._int4_kernel(dtype))
        if self.lora_a is not None:
            assert self.lora_alpha is not None and self.lora_rank is not None
            a = ops.convert_to_numpy(self.lora_a).astype(kernel.dtype)
            b = ops.convert_to_numpy(self.lora_b).astype(kernel.dtype)
            kernel = kernel + (self.lora_alpha / self.lora_rank) * (a @ b)
        return np.asarray(kernel)


def _dequantized(kernel: Tensor, kernel_scale: Tensor, dtype: Any) -> Tensor:
    return ops.divide(ops.cast(kernel, dtype), ops.cast(kernel_scale, dtype))


def _int8_dense(tokens: Tensor, kernel: Tensor, kernel_scale: Tensor) -> Tensor:
    """(x_q @ w_q) / (x_scale * w_scale): Dense's int8 arithmetic, the
    integer product exact (int32), with its straight-through gradient."""
    kernel = ops.convert_to_tensor(kernel)
    kernel_scale = ops.convert_to_tensor(kernel_scale)

    @ops.custom_gradient
    def forward(x: Tensor) -> tuple[Tensor, Callable[..., Tensor]]:
        dtype = x.dtype

        def grad(*args: Any, upstream: Tensor | None = None) -> Tensor:
            if upstream is None:
                (upstream,) = args
            return ops.einsum(
                "bnd,cd->bnc", upstream, _dequantized(kernel, kernel_scale, dtype)
            )

        x_q, x_scale = abs_max_quantize(x, _RANGES["int8"])  # (B, N, C), (B, N, 1)
        y = ops.cast(ops.matmul(x_q, kernel), dtype)  # int32: exact
        return ops.divide(y, ops.multiply(x_scale, ops.cast(kernel_scale, dtype))), grad

    return forward(tokens)
