"""Native TensorFlow reference of the 2-D multi-head self-attention block.

Written the way a TensorFlow user would write the block by hand, with no Keras:
a `tf.Module` holding `tf.Variable`s, `tf.einsum` projections and logits,
`tf.where` + `tf.nn.softmax` for the masked softmax, and `tf.GradientTape` for
gradients. It runs eagerly; `__call__` has no Python control flow on tensor
values, so it can be wrapped in `tf.function`. It serves as an independent
oracle for the Keras layer on the tensorflow backend (every encoding, mask and
dtype); `fused_block`, at the end, is the form the bench measures (einsum,
softmax, einsum, which XLA fuses).

What it computes is `mhsa_core.reference.mhsa_forward` (`mhsa_core.natives`);
the schema's facts and the argument rules come from `_common`. In TensorFlow's idiom:

- "relative" (BoTNet): pos(i, j) = q_i . (R_h[y_j - y_i + H - 1]
  + R_w[x_j - x_i + W - 1]). Per axis, `tf.gather` of the table with the
  offset index matrix idx[a, b] = b - a + L - 1 gives the (L, L, kd) embeddings
  of every (query, key) pair along that axis, contracted with q by `tf.einsum`;
  the height and width terms are broadcast-summed over the other axis.
- "absolute": pos(i, j) = q_i . (E_h[y_j] + E_w[x_j]): the same with the index
  matrix idx[a, b] = b.
- The tables are `tf.Variable`s of the reference size (Hr, Wr)
  (`position_size`); at an input of size (H, W) they are resized along their
  rows to 2H - 1 / 2W - 1 (relative) or H / W (absolute) rows by linear
  interpolation with half-pixel centers, written as a product with the
  interpolation matrix M[t, l] = max(0, 1 - |s_t - l|),
  s_t = clip((t + 0.5) * L / length - 0.5, 0, L - 1) (see `_resize`). This is
  what `tf.image.resize(method="bilinear", antialias=False)` computes along
  one axis, but that op always returns float32 (its weights are computed in
  float32 too), which would cap the float64 runs at float32 accuracy; the
  matrix form runs in the module's dtype. It is the identity at the
  reference size. tests/backends/test_native.py checks it against
  `tf.image.resize`.
- "sinusoidal": w_k = 1 / 10000^(k / D), D = C / 4 (the frequencies in
  float64, then cast; angles and sin/cos in the module's dtype).
- "relative_bias" (Swin), pos(i, j) = B[y_i - y_j + H - 1, x_i - x_j + W - 1,
  head]: `tf.gather_nd` of the table with the (N, N, 2) offsets of every
  (query, key), heads first. At another size the table is resized as timm
  resizes Swin's: per axis an interpolation matrix (`_bias_matrix`:
  `tf.searchsorted` of the new integer offsets among the respaced source
  offsets, `tf.one_hot` weights of the two around each), then M_h @ B @ M_w^T
  per head.
- Windows (`window_size`, `shift_size`; `_Windows`): `tf.roll` by -shift,
  `tf.pad` at the bottom and right, reshape/transpose into (B * nW, wh * ww,
  C) windows that the attention takes as its batch, the shift mask (-100
  between the regions of the shift) and the padding masked, and back. These
  need a static spatial size (`x.shape`), as the window layout is Python.
- "rope", "rope_mixed": q and k rotated before the logits. "rope": the
  positions of each axis (`tf.range` + offset, or `tf.linspace(-1, 1)`,
  times reference / size) times the frequencies, per axis, tiled over the
  other axis and concatenated in the grid order; "rope_mixed": the
  positions times the learned frequencies (`tf.Variable` (2, heads, kd / 2)),
  contracted with `tf.einsum`. sin and cos `tf.repeat`ed to kd, then
  x * cos + r(x) * sin, r the interleaved pair swap (strided slices
  x[..., 1::2], x[..., ::2], stacked) or the half swap (`tf.split`).

- The norms (`qk_norm` on each head's q and k, `output_norm` on the merged
  heads): "layer" as Keras 2's LayerNormalization wrote it, `tf.nn.moments`
  (the biased variance) and `tf.nn.batch_normalization`; "rms" as
  x * rsqrt(reduce_mean(x^2) + eps) * scale. `output_dense`: one more
  `tf.einsum` projection, (C, C).

The variables use the canonical layout itself (kernels (in, out), what
`tf.einsum("bnc,cd->bnd")` wants), under the canonical names.

Masking: masked logits are replaced by -inf with `tf.where` (a constant, so no
gradient flows to it) and `tf.nn.softmax` then gives them exactly 0. A row whose
keys were all -inf would give exp(-inf - -inf) = NaN, so items with no valid key
attend to every key instead (finite, unused) and their output is zeroed with
`tf.where`, which also gives them zero gradients.

NumPy in, NumPy out: `forward`, `value_and_grad`, `resize_table`,
`sinusoidal_embedding` (`mhsa_core.natives`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import tensorflow as tf
from numpy.typing import ArrayLike, DTypeLike

from mhsa_core.natives import _common
from mhsa_core.reference import arguments, schema

__all__ = [
    "NativeMHSA2D",
    "forward",
    "fused_block",
    "resize_table",
    "sinusoidal_embedding",
    "value_and_grad",
]


def _gelu(x: tf.Tensor) -> tf.Tensor:
    """Exact (erf) GELU, as the reference: x/2 * erfc(-x / sqrt(2)).

    Not `tf.nn.gelu(approximate=False)`: it builds its 1/sqrt(2) with
    `cast(0.7071067811865476, dtype)`, a float32 constant cast to float64, so in
    float64 it is only float32-accurate (measured: 5e-9 absolute, 4.5e-8
    relative error on [-5, 5], TF 2.21).
    """
    return 0.5 * x * tf.math.erfc(-x * tf.constant(1.0 / math.sqrt(2.0), x.dtype))


_ACTIVATIONS: dict[str | None, Callable[[tf.Tensor], tf.Tensor]] = {
    None: lambda x: x,
    "linear": lambda x: x,
    "relu": tf.nn.relu,
    "gelu": _gelu,
    "sigmoid": tf.math.sigmoid,
    "tanh": tf.math.tanh,
    "silu": tf.nn.silu,
    "swish": tf.nn.silu,
}


def _resize(table: tf.Tensor, length: int | tf.Tensor) -> tf.Tensor:
    """table (L, d) -> (length, d), linear along the rows, half-pixel centers.

    M (length, L) @ table, M[t, l] = max(0, 1 - |s_t - l|) the "tent" weights
    of source position s_t = clip((t + 0.5) * L / length - 0.5, 0, L - 1):
    (1 - f, f) on the two rows around s_t. With length == L, s_t = t and M is
    the identity, so the table comes back unchanged.
    """
    dtype = table.dtype
    rows = tf.cast(tf.shape(table)[0], dtype)
    t = tf.cast(tf.range(length), dtype)
    s = (t + 0.5) * (rows / tf.cast(length, dtype)) - 0.5
    s = tf.clip_by_value(s, tf.zeros((), dtype), rows - 1)
    row_index = tf.cast(tf.range(tf.shape(table)[0]), dtype)
    weights = tf.nn.relu(1.0 - tf.abs(s[:, None] - row_index[None, :]))  # (length, L)
    return tf.linalg.matmul(weights, table)


def _rope_angles(
    height: int | tf.Tensor,
    width: int | tf.Tensor,
    key_dim: int,
    rope: schema.RopeSettings,
    dtype: tf.DType,
    span: tuple[int, int] | None = None,
) -> tf.Tensor:
    """ "rope"'s angles (N, kd / 2): per token, the positions of its row and
    column ("ij"; column first for "xy") times the kd / 4 frequencies.
    `span` (Hq, Wq): a key map's cells spread over the query grid."""
    count = key_dim // 4
    if rope.in_pixels:
        top = math.log2(rope.max_resolution) - 1.0
        exponent = tf.linspace(tf.constant(0.0, tf.float64), top, count)
        bands = math.pi * tf.pow(tf.constant(2.0, tf.float64), exponent)
    else:
        exponent = tf.range(count, dtype=tf.float64) / count
        bands = 1.0 / tf.pow(tf.constant(rope.temperature, tf.float64), exponent)
    bands = tf.cast(bands, dtype)

    def along(
        size: int | tf.Tensor, reference: int | None, query: int | None = None
    ) -> tf.Tensor:
        if query is not None and query != size:
            # Cell i of the key axis at i * Hq / H of the query axis.
            p = tf.cast(tf.range(size), dtype) * query / tf.cast(size, dtype)
            if rope.in_pixels:
                t = p * (2.0 / max(query - 1, 1)) - 1.0
            else:
                t = p + tf.constant(rope.grid_offset, dtype)
            if reference is not None:
                t = t / query * tf.constant(reference, dtype)
            return t[:, None] * bands
        if rope.in_pixels:
            t = tf.linspace(tf.constant(-1.0, dtype), tf.constant(1.0, dtype), size)
        else:
            t = tf.cast(tf.range(size), dtype) + tf.constant(rope.grid_offset, dtype)
        if reference is not None:
            t = t / tf.cast(size, dtype) * tf.constant(reference, dtype)
        return t[:, None] * bands  # (size, kd / 4)

    ref_h, ref_w = rope.reference_size or (None, None)
    span_h, span_w = span or (None, None)
    along_y = tf.tile(along(height, ref_h, span_h)[:, None], (1, width, 1))
    along_x = tf.tile(along(width, ref_w, span_w)[None], (height, 1, 1))
    halves = [along_y, along_x] if rope.grid_indexing == "ij" else [along_x, along_y]
    return tf.reshape(tf.concat(halves, axis=-1), (height * width, 2 * count))


def _sin_cos(angles: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """The rotary tables (..., kd): the angles' sin and cos repeated twice
    each (angle m at channels 2m and 2m + 1, whatever the layout)."""
    return tf.repeat(tf.sin(angles), 2, axis=-1), tf.repeat(tf.cos(angles), 2, axis=-1)


def _rotate(
    x: tf.Tensor, tables: tuple[tf.Tensor, tf.Tensor], layout: str
) -> tf.Tensor:
    """x (B, N, heads, kd) * cos + r(x) * sin; (sin, cos) = `tables`, (N, 1
    or heads, kd)."""
    sin, cos = tables
    if layout == "half":
        x1, x2 = tf.split(x, 2, axis=-1)
        rotated = tf.concat([-x2, x1], axis=-1)
    else:
        rotated = tf.reshape(
            tf.stack([-x[..., 1::2], x[..., ::2]], axis=-1), tf.shape(x)
        )
    return x * cos + rotated * sin


def _index_matrix(length: int | tf.Tensor, relative: bool) -> tf.Tensor:
    """(L, L) int32 table rows for (query a, key b): b - a + L - 1, or b."""
    b = tf.range(length)[None, :]
    if relative:
        return b - tf.range(length)[:, None] + length - 1
    return tf.tile(b, (length, 1))


def _bias_matrix(src: int, dst: int, dtype: tf.DType) -> tf.Tensor:
    """(dst, src): one axis of timm's resize of a per-head table, linear
    interpolation of the integer offsets -(dst // 2)..dst // 2 on the
    respaced source offsets (`_common.bias_offsets`), the end value beyond
    either end."""
    points = tf.constant(_common.bias_offsets(src, dst), dtype)
    x = tf.cast(tf.range(dst) - dst // 2, dtype)
    right = tf.minimum(tf.searchsorted(points, x, side="left"), src - 1)
    left = tf.maximum(right - 1, 0)
    to_left = tf.nn.relu(x - tf.gather(points, left))
    to_right = tf.nn.relu(tf.gather(points, right) - x)
    total = to_left + to_right
    single = tf.equal(total, 0.0)  # on one point (left == right): its value
    w_left = tf.where(single, tf.ones_like(x), to_right / tf.where(single, 1.0, total))
    return (
        tf.one_hot(left, src, dtype=dtype) * w_left[:, None]
        + tf.one_hot(right, src, dtype=dtype) * (1.0 - w_left)[:, None]
    )


def _resize_bias(table: tf.Tensor, rows_h: int, rows_w: int) -> tf.Tensor:
    """(S_h, S_w, heads) -> (rows_h, rows_w, heads), timm's rule; the identity
    at the same size."""
    src_h, src_w = table.shape[:2]
    if (src_h, src_w) == (rows_h, rows_w):
        return table
    m_h = _bias_matrix(src_h, rows_h, table.dtype)
    m_w = _bias_matrix(src_w, rows_w, table.dtype)
    return tf.einsum("as,stk,bt->abk", m_h, table, m_w)


class _Windows:
    """Swin's window partition of an H x W map (static sizes)."""

    def __init__(
        self,
        height: int,
        width: int,
        window: tuple[int, int],
        shift: tuple[int, int],
    ) -> None:
        self.height, self.width = height, width
        self.window = window
        self.tokens = window[0] * window[1]
        # No shift along an axis the map fits in one window (timm's rule).
        self.shift = [
            0 if size <= w else s for size, w, s in zip((height, width), window, shift)
        ]
        self.pad = [(-height) % window[0], (-width) % window[1]]

    def partition(self, x: tf.Tensor) -> tf.Tensor:
        """(B, H, W, C) -> (B * nW, wh * ww, C)."""
        x = tf.roll(x, shift=[-self.shift[0], -self.shift[1]], axis=[1, 2])
        x = tf.pad(x, [[0, 0], [0, self.pad[0]], [0, self.pad[1]], [0, 0]])
        (wh, ww), channels = self.window, x.shape[-1]
        rows, cols = (self.height + self.pad[0]) // wh, (self.width + self.pad[1]) // ww
        x = tf.reshape(x, (-1, rows, wh, cols, ww, channels))
        x = tf.transpose(x, (0, 1, 3, 2, 4, 5))
        return tf.reshape(x, (-1, self.tokens, channels))

    def merge(self, windows: tf.Tensor) -> tf.Tensor:
        """(B * nW, wh * ww, C) -> (B, H, W, C)."""
        (wh, ww), channels = self.window, windows.shape[-1]
        rows, cols = (self.height + self.pad[0]) // wh, (self.width + self.pad[1]) // ww
        x = tf.reshape(windows, (-1, rows, cols, wh, ww, channels))
        x = tf.transpose(x, (0, 1, 3, 2, 4, 5))
        x = tf.reshape(x, (-1, rows * wh, cols * ww, channels))
        x = x[:, : self.height, : self.width]
        return tf.roll(x, shift=self.shift, axis=[1, 2])

    def keep(self, keep: tf.Tensor | None, batch: tf.Tensor) -> tf.Tensor | None:
        """(B * nW, wh * ww) bool: the keys each window may see (not padding)."""
        if keep is None and not any(self.pad):
            return None
        if keep is None:
            keep = tf.ones((batch, self.height * self.width), tf.bool)
        image = tf.reshape(tf.cast(keep, tf.int32), (-1, self.height, self.width, 1))
        return tf.cast(self.partition(image)[..., 0], tf.bool)

    def shift_mask(self, batch: tf.Tensor, dtype: tf.DType) -> tf.Tensor | None:
        """(B * nW, 1, Nw, Nw): -100 between two regions of the shift (tokens
        of the first sh rows / sw columns of the map, which the roll wrapped,
        against the others), else 0; None without a shift."""
        if not any(self.shift):
            return None
        ys = tf.cast(tf.range(self.height) < self.shift[0], tf.int32)
        xs = tf.cast(tf.range(self.width) < self.shift[1], tf.int32)
        labels = 2 * ys[:, None] + xs[None, :]  # (H, W)
        windows = self.partition(labels[None, :, :, None])[..., 0]  # (nW, Nw)
        differ = tf.not_equal(windows[:, None, :], windows[:, :, None])
        mask = tf.where(
            differ, tf.constant(schema.SHIFT_MASK_LOGIT, dtype), tf.zeros((), dtype)
        )
        return tf.tile(mask, (batch, 1, 1))[:, None]  # window b * nW + w


def _sincos(
    height: int | tf.Tensor, width: int | tf.Tensor, channels: int, dtype: tf.DType
) -> tf.Tensor:
    """The fixed 2-D sine-cosine embedding (H*W, C), row-major over (H, W)."""
    d = channels // 4
    k = tf.range(d, dtype=tf.float64)
    omega = tf.cast(
        1.0 / tf.pow(tf.constant(10000.0, tf.float64), k / d), dtype
    )  # (d,)
    ang_y = tf.cast(tf.range(height), dtype)[:, None] * omega  # (H, d)
    ang_x = tf.cast(tf.range(width), dtype)[:, None] * omega  # (W, d)
    emb_y = tf.concat([tf.sin(ang_y), tf.cos(ang_y)], axis=-1)  # (H, 2d)
    emb_x = tf.concat([tf.sin(ang_x), tf.cos(ang_x)], axis=-1)  # (W, 2d)
    emb = tf.concat(
        [
            tf.tile(emb_y[:, None, :], (1, width, 1)),
            tf.tile(emb_x[None, :, :], (height, 1, 1)),
        ],
        axis=-1,
    )  # (H, W, C)
    return tf.reshape(emb, (height * width, channels))


class NativeMHSA2D(tf.Module):
    """The 2-D multi-head self-attention block as a `tf.Module`.

    Args:
        channels: C, the channels of the input (and of the output).
        num_heads, key_dim, activation, position_encoding, scale, data_format,
            scale_position_logits: the block's config, with the meanings and
            defaults of `mhsa_core.reference.mhsa_forward` (standard scaled
            dot-product attention by default).
        use_bias: whether the projections have biases.
        position_size: (Hr, Wr), the reference size of the learned tables;
            required by "relative", "absolute" and "relative_bias", ignored
            otherwise.
        use_key_bias, qk_norm, output_norm, output_dense, norm_epsilon: as
            the reference's (`use_key_bias` None: `use_bias`).
        window_size, shift_size: Swin's windows, as the layer's.
        dtype: dtype of the variables and of the computation.

    Variables start at zero; load the canonical weights with `load_weight_dict`.
    """

    def __init__(
        self,
        channels: int,
        num_heads: int = 1,
        key_dim: int | None = None,
        activation: str | None = None,
        position_encoding: str = "none",
        scale: float | None = None,
        use_bias: bool = True,
        data_format: str = "channels_last",
        position_size: Sequence[int] | None = None,
        scale_position_logits: bool = True,
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
        window_size: int | Sequence[int] | None = None,
        shift_size: int | Sequence[int] = 0,
        kv_reduction: int | str | None = None,
        kv_pool_size: int | Sequence[int] = 7,
        context_channels: int | None = None,
        dtype: DTypeLike = "float32",
        name: str | None = None,
    ) -> None:
        super().__init__(name=name)
        self.config = _common.check_config(
            channels,
            _ACTIVATIONS,
            num_heads=num_heads,
            key_dim=key_dim,
            activation=activation,
            position_encoding=position_encoding,
            scale=scale,
            scale_position_logits=scale_position_logits,
            data_format=data_format,
            use_bias=use_bias,
            position_size=position_size,
            use_key_bias=use_key_bias,
            qk_norm=qk_norm,
            output_norm=output_norm,
            output_dense=output_dense,
            norm_epsilon=norm_epsilon,
            rope_temperature=rope_temperature,
            rope_layout=rope_layout,
            rope_grid_indexing=rope_grid_indexing,
            rope_grid_offset=rope_grid_offset,
            rope_in_pixels=rope_in_pixels,
            rope_max_resolution=rope_max_resolution,
            window_size=window_size,
            shift_size=shift_size,
            kv_reduction=kv_reduction,
            kv_pool_size=kv_pool_size,
            context_channels=context_channels,
        )
        self.compute_dtype = tf.as_dtype(np.dtype(dtype).name)
        # name -> tf.Variable, canonical names and shapes, in creation order.
        self.weights = {
            name: tf.Variable(tf.zeros(shape, self.compute_dtype), name=name)
            for name, shape in self.config.weight_shapes.items()
        }

    def load_weight_dict(self, weights: Mapping[str, ArrayLike]) -> NativeMHSA2D:
        """Assign a canonical weight dict (NumPy arrays, any float dtype).

        Values are cast to the module's dtype. Missing, unexpected or wrongly
        shaped entries raise ValueError.
        """
        _common.check_weights(
            weights,
            {name: tuple(variable.shape) for name, variable in self.weights.items()},
        )
        for name, variable in self.weights.items():
            variable.assign(tf.cast(np.asarray(weights[name]), self.compute_dtype))
        return self

    def _dense(self, t: tf.Tensor, kernel: str, bias: str) -> tf.Tensor:
        """t (B, N, C_in) @ kernel (C_in, C_out) [+ bias (C_out,)] -> (B, N, C_out).

        `kernel`, `bias`: canonical weight names.
        """
        y = tf.einsum("bnc,cd->bnd", t, self.weights[kernel])
        if bias in self.weights:  # use_bias (use_key_bias for the key)
            y = y + self.weights[bias]
        return y

    def _norm(self, x: tf.Tensor, prefix: str) -> tf.Tensor:
        """x normalized over its last axis by the norm `prefix` ("query",
        "key", "output"), with its weights."""
        names = self.config.norm_weights(prefix)
        scale = self.weights[names[0]]
        eps = tf.constant(self.config.norm_epsilon, self.compute_dtype)
        if len(names) == 1:  # "rms"
            mean_square = tf.reduce_mean(tf.square(x), axis=-1, keepdims=True)
            return x * tf.math.rsqrt(mean_square + eps) * scale
        mean, variance = tf.nn.moments(x, axes=[-1], keepdims=True)
        return tf.nn.batch_normalization(
            x, mean, variance, self.weights[names[1]], scale, eps
        )

    def _position_logits(
        self, q: tf.Tensor, height: tf.Tensor, width: tf.Tensor
    ) -> tf.Tensor | None:
        """The position term (B, heads, N, N) of "relative"/"absolute", else None.

        q: (B, H, W, heads, kd). Row i = (y_i, x_i) is a query, column j a key.
        """
        spec = self.config.encoding
        if not spec.learned_tables:
            return None
        if spec.per_head_table:  # "relative_bias": (1, heads, N, N), no q
            (name,) = schema.table_names(spec.name)
            table = _resize_bias(
                self.weights[name],
                int(spec.table_rows(height)),
                int(spec.table_rows(width)),
            )
            rows = _index_matrix(height * width, relative=False)  # (N, N): key j
            ys, xs = rows // width, rows % width
            offsets = tf.stack(
                [tf.transpose(ys) - ys + height - 1, tf.transpose(xs) - xs + width - 1],
                axis=-1,
            )  # (N, N, 2): query minus key, [i, j]
            return tf.transpose(tf.gather_nd(table, offsets), (2, 0, 1))[None]
        relative = spec.name == "relative"
        name_h, name_w = schema.table_names(spec.name)
        table_h = _resize(self.weights[name_h], spec.table_rows(height))
        table_w = _resize(self.weights[name_w], spec.table_rows(width))
        emb_h = tf.gather(
            table_h, _index_matrix(height, relative)
        )  # (H, H, kd): [y_i, y_j]
        emb_w = tf.gather(
            table_w, _index_matrix(width, relative)
        )  # (W, W, kd): [x_i, x_j]
        logits_h = tf.einsum("byxhd,yvd->bhyxv", q, emb_h)  # (B, heads, H, W, H)
        logits_w = tf.einsum("byxhd,xud->bhyxu", q, emb_w)  # (B, heads, H, W, W)
        # (B, heads, H, W, H, W): [y_i, x_i, y_j, x_j] -> (B, heads, N, N)
        pos = logits_h[..., :, None] + logits_w[..., None, :]
        n = height * width
        return tf.reshape(pos, (tf.shape(q)[0], self.config.num_heads, n, n))

    def _reduce(self, m: tf.Tensor) -> tf.Tensor:
        """timm pvt_v2's reduction of the key/value map (B, H, W, C') ->
        (B, H', W', C'): a stride-R `tf.nn.conv2d` (VALID: the last H % R
        rows are in no window), LayerNorm; or adaptive average pooling
        (torch's bins, each a `reduce_mean`), the 1x1 conv, LayerNorm, GELU."""
        cfg = self.config
        kernel_name, bias_name = schema.REDUCTION_CONV
        kernel = self.weights[kernel_name]
        if cfg.kv_reduction == "pool":
            height, width = int(m.shape[1]), int(m.shape[2])
            out_h, out_w = cfg.kv_pool_size

            def bins(size: int, out: int) -> list[tuple[int, int]]:
                return [
                    (i * size // out, -(-(i + 1) * size // out)) for i in range(out)
                ]

            rows = [
                tf.stack(
                    [
                        tf.reduce_mean(m[:, y0:y1, x0:x1], axis=(1, 2))
                        for x0, x1 in bins(width, out_w)
                    ],
                    axis=1,
                )
                for y0, y1 in bins(height, out_h)
            ]
            m = tf.stack(rows, axis=1)  # (B, oh, ow, C')
            kernel = kernel[None, None]
            stride = 1
        else:
            for axis, size in enumerate(m.shape[1:3]):
                arguments.reduced_size(int(size), cfg.kv_reduction, None, axis)
            stride = int(cfg.kv_reduction)  # type: ignore[arg-type]
        m = tf.nn.conv2d(m, kernel, strides=stride, padding="VALID")
        if bias_name in self.weights:
            m = m + self.weights[bias_name]
        scale, bias = (
            self.weights[n] for n in schema.norm_weight_names("reduction", "layer")
        )
        mean, variance = tf.nn.moments(m, axes=[-1], keepdims=True)
        eps = tf.constant(cfg.norm_epsilon, self.compute_dtype)
        m = tf.nn.batch_normalization(m, mean, variance, bias, scale, eps)
        if cfg.kv_reduction == "pool":
            m = _gelu(m)  # exact (erf), float64-accurate
        return m

    def _rotary_angles(
        self,
        height: tf.Tensor,
        width: tf.Tensor,
        span: tuple[int, int] | None = None,
    ) -> tf.Tensor:
        """The rotary angles, (N, 1, kd / 2) ("rope") or (N, heads, kd / 2)
        ("rope_mixed"), row-major over (H, W); `span` (Hq, Wq): of a key map
        spread over the query grid."""
        rope, dtype = self.config.rope, self.compute_dtype
        assert rope is not None
        name = self.config.encoding.frequencies
        if name is not None:
            index = tf.range(height * width)
            ys = tf.cast(index // width, dtype)
            xs = tf.cast(index % width, dtype)
            if span is not None:
                ys = ys * span[0] / tf.cast(height, dtype)
                xs = xs * span[1] / tf.cast(width, dtype)
            t_x, t_y = (xs, ys) if rope.grid_indexing == "xy" else (ys, xs)
            f = self.weights[name]  # (2, heads, kd / 2)
            return tf.einsum("n,hp->nhp", t_x, f[0]) + tf.einsum("n,hp->nhp", t_y, f[1])
        angles = _rope_angles(height, width, self.config.key_dim, rope, dtype, span)
        return angles[:, None]  # (N, 1, kd / 2)

    def __call__(
        self,
        x: tf.Tensor,
        attention_mask: tf.Tensor | None = None,
        context: tf.Tensor | None = None,
        prefix_tokens: tf.Tensor | None = None,
    ) -> tf.Tensor | tuple[tf.Tensor, tf.Tensor]:
        """x: (B, H, W, C) or (B, C, H, W); attention_mask: bool (B, H, W)
        (with a context: (B, H', W')) or None; context: (B, H', W', C') or
        (B, C', H', W') (with `context_channels`) or None; prefix_tokens:
        (B, T, C) or None (then `(out, prefix_out)`)."""
        cfg = self.config
        act = _ACTIVATIONS[cfg.activation]
        x = tf.convert_to_tensor(x, self.compute_dtype)
        if cfg.data_format == "channels_first":
            x = tf.transpose(x, (0, 2, 3, 1))  # (B, C, H, W) -> (B, H, W, C)
        shape = tf.shape(x)
        batch, height, width = shape[0], shape[1], shape[2]
        n = height * width
        heads, kd, dv = cfg.num_heads, cfg.key_dim, cfg.head_dim

        t = tf.reshape(x, (batch, n, cfg.channels))  # (B, N, C), row-major over (H, W)
        token_weights = cfg.encoding.token_weights
        if token_weights:  # "conv"
            t = t + tf.nn.relu(self._dense(t, *token_weights))  # (B, N, C)
        elif cfg.position_encoding == "sinusoidal":
            t = t + _sincos(height, width, cfg.channels, self.compute_dtype)
        prefix = 0  # T: class and register tokens first, as timm's ViT and EVA
        if prefix_tokens is not None:
            prefix_tokens = tf.convert_to_tensor(prefix_tokens, self.compute_dtype)
            prefix = cfg.check_prefix_tokens(
                int(x.shape[0]), tuple(prefix_tokens.shape)
            )
            t = tf.concat([prefix_tokens, t], axis=1)  # (B, T + N, C)
        n_all = prefix + n

        # The keys' and values' map: the tokens', or the context's; reduced.
        kv, nk = t, n_all
        other_keys = context is not None or cfg.kv_reduction is not None
        if (context is None) != (cfg.context_channels is None):
            raise ValueError(
                "`context` must be given exactly when context_channels is set. "
                f"Received: context_channels={cfg.context_channels}, "
                f"context={'a map' if context is not None else None}"
            )
        key_grid = (int(x.shape[1]), int(x.shape[2]))
        if other_keys:
            m = tf.reshape(t, (batch, height, width, cfg.channels))
            if context is not None:
                m = tf.convert_to_tensor(context, self.compute_dtype)
                if cfg.data_format == "channels_first":
                    m = tf.transpose(m, (0, 2, 3, 1))
            if cfg.kv_reduction is not None:
                m = self._reduce(m)
            key_grid = (int(m.shape[1]), int(m.shape[2]))
            nk = key_grid[0] * key_grid[1]
            kv = tf.reshape(m, (batch, nk, cfg.kv_channels))
        # (B, N, heads*d) -> (B, N, heads, d): head i is the slice [i*d, (i+1)*d).
        q = act(self._dense(t, "query_kernel", "query_bias"))
        k = act(self._dense(kv, "key_kernel", "key_bias"))
        v = act(self._dense(kv, "value_kernel", "value_bias"))
        q = tf.reshape(q, (batch, n_all, heads, kd))
        k = tf.reshape(k, (batch, nk, heads, kd))
        v = tf.reshape(v, (batch, nk, heads, dv))
        if cfg.qk_norm is not None:  # over kd, every head with the same weights
            q, k = self._norm(q, "query"), self._norm(k, "key")
        if cfg.rope is not None:
            tables = _sin_cos(self._rotary_angles(height, width))
            key_tables = tables
            if other_keys:
                span = (int(x.shape[1]), int(x.shape[2]))
                key_tables = _sin_cos(self._rotary_angles(*key_grid, span=span))
            # The map's tokens only (EVA's rope on x[:, :, T:]).
            q, k = (
                tf.concat(
                    [p[:, :prefix], _rotate(p[:, prefix:], table, cfg.rope.layout)], 1
                )
                for p, table in ((q, tables), (k, key_tables))
            )
        keep = None  # (B, Nk) bool, per key
        if attention_mask is not None:
            keep = tf.reshape(tf.cast(attention_mask, tf.bool), (batch, nk - prefix))
            keep = tf.pad(keep, ((0, 0), (prefix, 0)), constant_values=True)

        # Swin's windows become the batch: (B * nW, wh * ww, heads*d).
        windows = shift_mask = None
        size = (height, width)  # of the grid attention runs on
        if cfg.window_size is not None:
            windows = _Windows(
                int(x.shape[1]), int(x.shape[2]), cfg.window_size, cfg.shift_size
            )
            q, k, v = (
                windows.partition(tf.reshape(t, (batch, height, width, -1)))
                for t in (q, k, v)
            )
            keep = windows.keep(keep, batch)
            shift_mask = windows.shift_mask(batch, self.compute_dtype)
            size = windows.window
        items, tokens, keys = tf.shape(q)[0], tf.shape(q)[1], tf.shape(k)[1]
        q = tf.reshape(q, (items, tokens, heads, kd))
        k = tf.reshape(k, (items, keys, heads, kd))
        v = tf.reshape(v, (items, keys, heads, dv))

        logits = tf.einsum("bqhd,bkhd->bhqk", q, k)  # (B', heads, N', N')
        scale = tf.constant(cfg.scale, self.compute_dtype)
        pos = None  # (no position logits with prefix tokens: refused)
        if prefix_tokens is None:
            pos = self._position_logits(tf.reshape(q, (items, *size, heads, kd)), *size)
        if pos is None:
            logits = logits * scale
        elif cfg.scale_position_logits:
            logits = (logits + pos) * scale
        else:
            logits = logits * scale + pos
        if shift_mask is not None:
            logits = logits + shift_mask
        if keep is None:
            probs = tf.nn.softmax(logits, axis=-1)
            out = tf.einsum("bhqk,bkhd->bqhd", probs, v)  # (B', N', heads, dv)
        else:
            has_key = tf.reduce_any(keep, axis=1)  # (B',)
            # Fully masked items attend to everything (finite, discarded below).
            safe = tf.logical_or(keep, tf.logical_not(has_key)[:, None])  # (B', N')
            minus_inf = tf.constant(-np.inf, self.compute_dtype)
            logits = tf.where(safe[:, None, None, :], logits, minus_inf)
            probs = tf.nn.softmax(logits, axis=-1)
            out = tf.einsum("bhqk,bkhd->bqhd", probs, v)  # (B', N', heads, dv)
            out = tf.where(has_key[:, None, None, None], out, tf.zeros_like(out))
        if windows is not None:
            out = windows.merge(tf.reshape(out, (items, tokens, cfg.channels)))

        out = tf.reshape(out, (batch, n_all, cfg.channels))  # heads concatenated
        if cfg.output_norm is not None:
            out = self._norm(out, "output")
        if cfg.output_dense:
            out = self._dense(out, *schema.OUTPUT_PROJECTION)
        prefix_out, out = out[:, :prefix], out[:, prefix:]
        out = tf.reshape(out, (batch, height, width, cfg.channels))
        if cfg.data_format == "channels_first":
            out = tf.transpose(out, (0, 3, 1, 2))  # -> (B, C, H, W)
        return out if prefix_tokens is None else (out, prefix_out)


def _build(
    x: np.ndarray,
    weights: Mapping[str, ArrayLike],
    dtype: DTypeLike,
    config: Mapping[str, Any],
    context: ArrayLike | None = None,
) -> NativeMHSA2D:
    """A module of the complete config and dtype, with `weights` loaded."""
    channels, config = _common.numpy_config(x, weights, config, context)
    module = NativeMHSA2D(channels, dtype=dtype, **config)
    return module.load_weight_dict(weights)


def _mask_tensor(attention_mask: ArrayLike | None) -> tf.Tensor | None:
    if attention_mask is None:
        return None
    return tf.convert_to_tensor(np.asarray(attention_mask, dtype=bool))


def forward(
    x: ArrayLike,
    weights: Mapping[str, ArrayLike],
    attention_mask: ArrayLike | None = None,
    dtype: DTypeLike = "float32",
    context: ArrayLike | None = None,
    prefix_tokens: ArrayLike | None = None,
    **config: Any,
) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """Run the block on NumPy inputs; returns the output as a NumPy array
    (with `prefix_tokens` (B, T, C), `(out, prefix_out)`).

    `config`: keywords of `NativeMHSA2D` but `channels` (read off `x`) and
    `dtype`, completed by `_common.numpy_config` (`context_channels` off
    `context`).
    """
    array = np.asarray(x)
    module = _build(array, weights, dtype, config, context)
    x_tensor = tf.cast(array, module.compute_dtype)
    ct = prefix = None
    if context is not None:
        ct = tf.cast(np.asarray(context), module.compute_dtype)
    if prefix_tokens is not None:
        prefix = tf.cast(np.asarray(prefix_tokens), module.compute_dtype)
    out = module(
        x_tensor, _mask_tensor(attention_mask), context=ct, prefix_tokens=prefix
    )
    if isinstance(out, tuple):
        return out[0].numpy(), out[1].numpy()
    return out.numpy()


def value_and_grad(
    x: ArrayLike,
    weights: Mapping[str, ArrayLike],
    loss_weights: ArrayLike,
    attention_mask: ArrayLike | None = None,
    dtype: DTypeLike = "float32",
    context: ArrayLike | None = None,
    **config: Any,
) -> tuple[Any, np.ndarray, dict[str, np.ndarray]]:  # loss: a NumPy scalar
    """Loss `sum(out * loss_weights)` and its gradients, as NumPy.

    Returns `(loss, grad_x, grad_weights)`: a NumPy scalar, an array shaped
    like `x`, and a canonical weight dict of gradients (`context`, as
    `forward`'s, is a constant).
    """
    array = np.asarray(x)
    module = _build(array, weights, dtype, config, context)
    xt = tf.cast(array, module.compute_dtype)
    lw = tf.cast(np.asarray(loss_weights), module.compute_dtype)
    with tf.GradientTape() as tape:
        tape.watch(xt)
        ct = None if context is None else tf.cast(np.asarray(context), xt.dtype)
        out = module(xt, _mask_tensor(attention_mask), ct)
        loss = tf.reduce_sum(out * lw)
    grad_x, grad_w = tape.gradient(loss, (xt, module.weights))
    return (
        loss.numpy()[()],
        grad_x.numpy(),
        {name: g.numpy() for name, g in grad_w.items()},
    )


def resize_table(
    table: ArrayLike, length: int, dtype: DTypeLike = "float32"
) -> np.ndarray:
    """The native's table resize on NumPy: (L, d) -> (length, d) in `dtype`."""
    tensor = tf.constant(np.asarray(table), dtype=tf.as_dtype(np.dtype(dtype).name))
    return _resize(tensor, length).numpy()


def sinusoidal_embedding(
    height: int, width: int, channels: int, dtype: DTypeLike = "float32"
) -> np.ndarray:
    """The native's sine-cosine embedding on NumPy: (H*W, C) in `dtype`."""
    arguments.check_channels(channels, position_encoding="sinusoidal")
    return _sincos(height, width, channels, tf.as_dtype(np.dtype(dtype).name)).numpy()


# ------------------------------------------------------- the bench's fused form
def fused_block(
    config: _common.BenchShape, weights: Mapping[str, ArrayLike]
) -> tuple[Callable[[tf.Tensor], tf.Tensor], list[tf.Variable]]:
    """The bench's form: (call(x) -> out, [tf.Variable]), x and out
    (B, H, W, C) float32, for a bench config (`_common.FusedBlock.of`).

    TensorFlow has no fused attention op: einsum, softmax, einsum, which is
    what XLA (`jit_compile=True`) fuses. "relative"'s term gathered with the
    offset index, times the scale; "rope" rotates q and k first (the tables
    computed once). With Swin's windows: `tf.roll`, the windows as the batch,
    the per-head bias (gathered with the window's index) and the shift mask
    added to the logits, merged and rolled back. No mask, no other encoding.
    """
    block = _common.FusedBlock.of(config)
    params = {
        k: tf.Variable(np.asarray(v, np.float32), name=k) for k, v in weights.items()
    }
    height, width, channels = block.height, block.width, block.channels
    heads, d, n, scale, relative = (
        block.heads,
        block.d,
        block.n,
        block.scale,
        block.relative,
    )
    if relative:
        name_h, name_w = block.tables
        index_h = tf.constant(_common.relative_index(height))
        index_w = tf.constant(_common.relative_index(width))
    rope = block.rope
    if rope is not None:
        sin, cos = _sin_cos(_rope_angles(height, width, d, rope, tf.float32))
        tables = (sin[:, None], cos[:, None])  # (N, 1, d)
    w, shift = block.window, block.shift
    if w:
        offsets = tf.constant(np.stack(block.bias_index(), axis=-1))  # (Nw, Nw, 2)
        shift_mask = tf.constant(block.window_bias())[:, None]  # (nW, 1, Nw, Nw)

    def call(x: tf.Tensor) -> tf.Tensor:
        b = tf.shape(x)[0]
        if w:  # (B * nW, Nw, C) windows of the rolled map
            t = tf.roll(x, shift=[-shift, -shift], axis=[1, 2])
            t = tf.reshape(t, (b, height // w, w, width // w, w, channels))
            t = tf.reshape(tf.transpose(t, (0, 1, 3, 2, 4, 5)), (-1, w * w, channels))
        else:
            t = tf.reshape(x, (b, n, channels))
        items, tokens = tf.shape(t)[0], t.shape[1]

        def project(name: str) -> tf.Tensor:  # (B', N', heads, d)
            y = (
                tf.einsum("bnc,cd->bnd", t, params[f"{name}_kernel"])
                + params[f"{name}_bias"]
            )
            return tf.reshape(y, (items, tokens, heads, d))

        q, k, v = project("query"), project("key"), project("value")
        if rope is not None:
            q, k = _rotate(q, tables, rope.layout), _rotate(k, tables, rope.layout)
        logits = tf.einsum("bqhd,bkhd->bhqk", q, k) * scale  # (B', heads, N', N')
        if w:
            logits = logits + tf.tile(shift_mask, (b, 1, 1, 1))
            if block.bias_table is not None:
                # The variable read first: XLA has no gather_nd of a resource.
                table = tf.convert_to_tensor(params[block.bias_table])
                table = tf.gather_nd(table, offsets)
                logits = logits + tf.transpose(table, (2, 0, 1))
            probs = tf.nn.softmax(logits, axis=-1)
            out = tf.einsum("bhqk,bkhd->bqhd", probs, v)  # (B * nW, Nw, heads, d)
            out = tf.reshape(out, (b, height // w, width // w, w, w, channels))
            out = tf.reshape(
                tf.transpose(out, (0, 1, 3, 2, 4, 5)), (b, height, width, channels)
            )
            return tf.roll(out, shift=[shift, shift], axis=[1, 2])
        if relative:
            q5 = tf.reshape(q, (b, height, width, heads, d))
            logits_h = tf.einsum(
                "byxhd,yvd->bhyxv", q5, tf.gather(params[name_h], index_h)
            )
            logits_w = tf.einsum(
                "byxhd,xud->bhyxu", q5, tf.gather(params[name_w], index_w)
            )
            pos = tf.reshape(
                logits_h[..., :, None] + logits_w[..., None, :], (b, heads, n, n)
            )
            logits = logits + pos * scale
        probs = tf.nn.softmax(logits, axis=-1)
        out = tf.einsum("bhqk,bkhd->bqhd", probs, v)  # (B, N, heads, d)
        return tf.reshape(out, (b, height, width, channels))

    return call, list(params.values())
