"""Native JAX reference of the 2-D multi-head self-attention block.

Written the way a JAX user would write the block by hand, with no Keras: a pure
function `apply(params, x, attention_mask, *, config)` on a dict of arrays,
`jax.numpy` einsums, `jax.nn.softmax(..., where=mask)` for the masked softmax,
`jax.jit` with the config as static arguments, and `jax.value_and_grad` for
gradients. It serves as an independent oracle for the Keras layer on the jax
backend (every encoding, mask and dtype); `fused_block`, at the end, is the
form the bench measures (`jax.nn.dot_product_attention` with the position term
as its bias).

What it computes is `mhsa_core.reference.mhsa_forward` (`mhsa_core.natives`);
the schema's facts and the argument rules come from `_common`. In JAX's idiom:

- "relative" (BoTNet): pos(i, j) = q_i . (R_h[y_j - y_i + H - 1]
  + R_w[x_j - x_i + W - 1]). Per axis, q is first contracted with every row
  of the table (q @ R^T: (B, heads, N, 2L - 1), one logit per offset), then
  `jnp.take` picks, for every (query, key) pair, the logit of their offset
  (flat index i * (2L - 1) + offset row, a static NumPy index matrix).
- "absolute": pos(i, j) = q_i . (E_h[y_j] + E_w[x_j]): the same with the key's
  own row (y_j, x_j) instead of the offset.
- The tables are entries of `params` of the reference size (Hr, Wr), read off
  their shapes; at an input of size (H, W) they are resized along their rows to
  2H - 1 / 2W - 1 (relative) or H / W (absolute) rows with
  `jax.image.resize(method="linear", antialias=False)`: half-pixel centers,
  the reference's `resize_table`, and an exact identity at the reference size
  (JAX skips axes whose size does not change). antialias=False matters: the
  default antialias=True widens the kernel when shrinking, which is not the
  reference's rule.
- "sinusoidal": w_k = 10000^(-k / D), D = C / 4 (the frequencies a float64
  NumPy constant, cast; angles and sin/cos by `jnp` in the dtype of x).
- "relative_bias" (Swin), pos(i, j) = B[y_i - y_j + H - 1, x_i - x_j + W - 1,
  head]: the table indexed with static NumPy offset matrices, heads first. At
  another size the table is resized as timm resizes Swin's: `jnp.interp` of
  the new integer offsets on the respaced source offsets, along one axis
  then the other (`jax.vmap` over the rest; `jnp.interp` holds the end
  values beyond the ends, as timm).
- Windows (`window_size`, `shift_size`; `_partition` / `_merge`): `jnp.roll`
  by -shift, `jnp.pad` at the bottom and right, reshapes into (B * nW,
  wh * ww, C) windows that the attention takes as its batch, with the shift
  mask (-100 between the regions of the shift, a static NumPy array) and the
  padding masked, and back.
- "rope", "rope_mixed": q and k rotated before the logits. "rope": the
  positions of each axis (`jnp.arange` + offset, or `jnp.linspace(-1, 1)`,
  times reference / size) times the frequencies (a float64 NumPy constant,
  cast), in a `jnp.meshgrid`; "rope_mixed": the positions times the learned
  frequencies (`params["rope_frequencies"]` (2, heads, kd / 2)), by
  `jnp.einsum`. sin and cos `jnp.repeat`ed to kd, then x * cos + r(x) * sin,
  r the interleaved pair swap (`x.reshape(..., kd / 2, 2)`, the pair
  reversed with one sign flipped) or the half swap (`jnp.split`).

- The norms (`qk_norm` on each head's q and k, `output_norm` on the merged
  heads), as Flax writes them: `jnp.mean` and `jnp.var` (biased) over the
  last axis and `jax.lax.rsqrt`, the scale (and bias) broadcast over the
  heads. `output_dense`: one more einsum projection, (C, C).

`params` is the canonical weight dict itself (kernels (in, out)), with jnp
arrays instead of NumPy arrays; `params_from_weight_dict` drops None entries.

float64. JAX computes in float32 unless 64-bit mode is on. `apply` leaves that to
the caller (set JAX_ENABLE_X64=1, or call it inside `with jax.enable_x64(True):`).
The NumPy helpers `forward` and `value_and_grad` switch it on themselves, only
for their own duration and only when asked for float64, with the scoped
`jax.enable_x64(True)` context: no global config change leaks to the caller.
They check that float64 results really are float64.

The fully masked case: `jax.nn.softmax(where=...)` already gives zeros for a row
with no valid key, but through 0/0 internally. Here such items attend to every
key instead (finite, unused), and their output is zeroed with `jnp.where`,
so no NaN is ever formed, in the forward or the backward pass.

The NumPy helpers `resize_table` and `sinusoidal_embedding` give the
position-encoding pieces on their own (jitted, same precision rule).

This file imports JAX, NumPy and the NumPy-only `mhsa_core.reference`.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import AbstractContextManager
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from numpy.typing import ArrayLike, DTypeLike

from mhsa_core.natives import _common
from mhsa_core.reference import arguments, schema

__all__ = [
    "apply",
    "forward",
    "fused_block",
    "params_from_weight_dict",
    "resize_table",
    "sinusoidal_embedding",
    "value_and_grad",
]

_ACTIVATIONS: dict[str | None, Callable[[jax.Array], jax.Array]] = {
    None: lambda x: x,
    "linear": lambda x: x,
    "relu": jax.nn.relu,
    "gelu": functools.partial(
        jax.nn.gelu, approximate=False
    ),  # exact, as the reference
    "sigmoid": jax.nn.sigmoid,
    "tanh": jnp.tanh,
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
}

_STATIC = (
    "num_heads",
    "key_dim",
    "activation",
    "position_encoding",
    "scale",
    "data_format",
    "scale_position_logits",
    "use_bias",
    "position_size",
    "use_key_bias",
    "qk_norm",
    "output_norm",
    "output_dense",
    "norm_epsilon",
    *schema.ROPE_DEFAULTS,
    "window_size",
    "shift_size",
    "kv_reduction",
    "kv_pool_size",
    "context_channels",
)


def _dense(
    t: jax.Array, params: Mapping[str, jax.Array], kernel: str, bias: str
) -> jax.Array:
    """t (B, N, C_in) @ kernel (C_in, C_out) [+ bias (C_out,)] -> (B, N, C_out).

    `kernel`, `bias`: canonical weight names (no bias when `params` has none).
    """
    y = jnp.einsum("bnc,cd->bnd", t, params[kernel])
    if params.get(bias) is not None:
        y = y + params[bias]
    return y


def _norm(
    x: jax.Array, params: Mapping[str, jax.Array], names: Sequence[str], eps: float
) -> jax.Array:
    """x normalized over its last axis: LayerNorm with (scale, bias) `names`,
    RMSNorm with (scale,)."""
    if len(names) == 1:  # "rms"
        mean_square = jnp.mean(jnp.square(x), axis=-1, keepdims=True)
        return x * jax.lax.rsqrt(mean_square + eps) * params[names[0]]
    mean = jnp.mean(x, axis=-1, keepdims=True)
    variance = jnp.var(x, axis=-1, keepdims=True)
    y = (x - mean) * jax.lax.rsqrt(variance + eps)
    return y * params[names[0]] + params[names[1]]


def _resize(table: jax.Array, length: int) -> jax.Array:
    """table (L, d) -> (length, d), linear along the rows, half-pixel centers."""
    return jax.image.resize(
        table, (length, table.shape[1]), method="linear", antialias=False
    )


def _resize_bias(table: jax.Array, rows_h: int, rows_w: int) -> jax.Array:
    """(S_h, S_w, heads) -> (rows_h, rows_w, heads) by timm's rule for Swin's
    tables: per axis, `jnp.interp` of the integer offsets on the respaced
    source offsets (`_common.bias_offsets`). The identity at the same size."""
    src_h, src_w, heads = table.shape
    if (src_h, src_w) == (rows_h, rows_w):
        return table

    def along_rows(t: jax.Array, dst: int) -> jax.Array:  # (src, M) -> (dst, M)
        points = jnp.asarray(_common.bias_offsets(t.shape[0], dst), dtype=t.dtype)
        x = jnp.arange(dst, dtype=t.dtype) - dst // 2
        return jax.vmap(lambda col: jnp.interp(x, points, col), 1, 1)(t)

    t = along_rows(table.reshape(src_h, src_w * heads), rows_h)
    t = t.reshape(rows_h, src_w, heads).transpose(1, 0, 2)  # (S_w, rows_h, heads)
    t = along_rows(t.reshape(src_w, rows_h * heads), rows_w)
    return t.reshape(rows_w, rows_h, heads).transpose(1, 0, 2)


def _window_layout(
    height: int, width: int, window: tuple[int, int], shift: tuple[int, int]
) -> tuple[tuple[int, int], tuple[int, int]]:
    """(shift, pad): the shift applied (none along an axis the map fits in
    one window, as timm) and the padding to whole windows."""
    applied = (
        0 if height <= window[0] else shift[0],
        0 if width <= window[1] else shift[1],
    )
    return applied, ((-height) % window[0], (-width) % window[1])


def _partition(
    x: jax.Array, window: tuple[int, int], shift: Sequence[int], pad: Sequence[int]
) -> jax.Array:
    """(B, H, W, C) -> (B * nW, wh * ww, C): rolled, padded, cut."""
    x = jnp.roll(x, (-shift[0], -shift[1]), axis=(1, 2))
    x = jnp.pad(x, ((0, 0), (0, pad[0]), (0, pad[1]), (0, 0)))
    batch, height, width, channels = x.shape
    wh, ww = window
    x = x.reshape(batch, height // wh, wh, width // ww, ww, channels)
    return x.transpose(0, 1, 3, 2, 4, 5).reshape(-1, wh * ww, channels)


def _merge(
    windows: jax.Array,
    size: tuple[int, int],
    window: tuple[int, int],
    shift: Sequence[int],
    pad: Sequence[int],
) -> jax.Array:
    """(B * nW, wh * ww, C) -> (B, H, W, C): `_partition` undone."""
    (wh, ww), channels = window, windows.shape[-1]
    rows, cols = (size[0] + pad[0]) // wh, (size[1] + pad[1]) // ww
    x = windows.reshape(-1, rows, cols, wh, ww, channels).transpose(0, 1, 3, 2, 4, 5)
    x = x.reshape(-1, rows * wh, cols * ww, channels)[:, : size[0], : size[1]]
    return jnp.roll(x, tuple(shift), axis=(1, 2))


def _shift_mask(
    height: int,
    width: int,
    window: tuple[int, int],
    shift: Sequence[int],
    pad: Sequence[int],
) -> jax.Array:
    """(nW, Nw, Nw): -100 between two regions of the shift (tokens of the
    first sh rows / sw columns of the map, which the roll wrapped, against
    the others), else 0 (constants: XLA folds them)."""
    ys, xs = np.meshgrid(np.arange(height), np.arange(width), indexing="ij")
    labels = 2 * (ys < shift[0]) + (xs < shift[1])
    windows = _partition(jnp.asarray(labels)[None, :, :, None], window, shift, pad)
    windows = windows[..., 0]  # (nW, Nw)
    differ = windows[:, None, :] != windows[:, :, None]
    return jnp.where(differ, schema.SHIFT_MASK_LOGIT, 0.0)


def _pair_index(
    height: int, width: int, rows: int, relative: bool, axis: str
) -> np.ndarray:
    """Static flat indices (N, N) into logits (N, rows) flattened, per (i, j).

    Entry (i, j) is i * rows + r, r the table row of the pair along `axis`
    ("height": y, "width": x): y_j - y_i + H - 1 (relative) or y_j (absolute).
    """
    ys, xs = np.divmod(np.arange(height * width), width)
    pos, length = (ys, height) if axis == "height" else (xs, width)
    r = (
        pos[None, :] - pos[:, None] + length - 1
        if relative
        else np.broadcast_to(pos[None, :], (pos.size, pos.size))
    )
    return (np.arange(pos.size)[:, None] * rows + r).astype(np.int32)


def _position_logits(
    q: jax.Array,
    params: Mapping[str, jax.Array],
    position_encoding: str,
    height: int,
    width: int,
) -> jax.Array | None:
    """The position term (B, heads, N, N) of "relative"/"absolute", else None.

    q: (B, N, heads, kd). Row i = (y_i, x_i) is a query, column j a key.
    """
    spec = schema.encoding(position_encoding)
    if not spec.learned_tables:
        return None
    if spec.per_head_table:  # "relative_bias": (1, heads, N, N), no q
        (name,) = schema.table_names(position_encoding)
        table = _resize_bias(
            params[name], spec.table_rows(height), spec.table_rows(width)
        )
        ys, xs = np.divmod(np.arange(height * width), width)
        offset_y = ys[:, None] - ys[None, :] + height - 1  # query minus key
        offset_x = xs[:, None] - xs[None, :] + width - 1
        return jnp.transpose(table[offset_y, offset_x], (2, 0, 1))[None]
    relative = position_encoding == "relative"
    batch, n, heads, _ = q.shape
    pos = 0
    for name, axis, length in zip(
        schema.table_names(position_encoding), ("height", "width"), (height, width)
    ):
        rows = spec.table_rows(length)
        table = _resize(params[name], rows)  # (rows, kd)
        per_row = jnp.einsum("bnhd,rd->bhnr", q, table)  # (B, heads, N, rows)
        index = _pair_index(height, width, rows, relative, axis)
        flat = per_row.reshape(batch, heads, n * rows)
        pos = pos + jnp.take(flat, index, axis=-1)  # (B, heads, N, N)
    return pos


def _sincos(height: int, width: int, channels: int, dtype: DTypeLike) -> jax.Array:
    """The fixed 2-D sine-cosine embedding (H*W, C), row-major over (H, W)."""
    d = channels // 4
    omega = jnp.asarray(np.power(10000.0, -np.arange(d) / d), dtype=dtype)  # (d,)
    ang_y = jnp.arange(height, dtype=dtype)[:, None] * omega  # (H, d)
    ang_x = jnp.arange(width, dtype=dtype)[:, None] * omega  # (W, d)
    emb_y = jnp.concatenate([jnp.sin(ang_y), jnp.cos(ang_y)], axis=-1)  # (H, 2d)
    emb_x = jnp.concatenate([jnp.sin(ang_x), jnp.cos(ang_x)], axis=-1)  # (W, 2d)
    emb = jnp.concatenate(
        [
            jnp.broadcast_to(emb_y[:, None, :], (height, width, 2 * d)),
            jnp.broadcast_to(emb_x[None, :, :], (height, width, 2 * d)),
        ],
        axis=-1,
    )
    return emb.reshape(height * width, channels)


def _rope_angles(
    height: int,
    width: int,
    key_dim: int,
    rope: schema.RopeSettings,
    dtype: DTypeLike,
    span: tuple[int, int] | None = None,
) -> jax.Array:
    """ "rope"'s angles (N, kd / 2): per token, the positions of its row and
    column ("ij"; column first for "xy") times the kd / 4 frequencies.
    `span` (Hq, Wq): a key map's cells spread over the query grid."""
    count = key_dim // 4
    if rope.in_pixels:
        top = np.log2(rope.max_resolution) - 1.0
        bands = np.pi * 2.0 ** np.linspace(0.0, top, count)
    else:
        bands = 1.0 / rope.temperature ** (np.arange(count) / count)
    bands = jnp.asarray(bands, dtype=dtype)

    def positions(size: int, reference: int | None, query: int | None) -> jax.Array:
        if query is not None and query != size:
            # Cell i of the key axis at i * Hq / H of the query axis.
            p = jnp.arange(size, dtype=dtype) * query / size
            if rope.in_pixels:
                t = p * (2.0 / max(query - 1, 1)) - 1.0
            else:
                t = p + rope.grid_offset
            return t if reference is None else t / query * reference
        if rope.in_pixels:
            t = jnp.linspace(-1.0, 1.0, size, dtype=dtype)
        else:
            t = jnp.arange(size, dtype=dtype) + rope.grid_offset
        return t if reference is None else t / size * reference

    ref_h, ref_w = rope.reference_size or (None, None)
    span_h, span_w = span or (None, None)
    t_y, t_x = jnp.meshgrid(
        positions(height, ref_h, span_h),
        positions(width, ref_w, span_w),
        indexing="ij",
    )  # (H, W) each
    first, second = (t_y, t_x) if rope.grid_indexing == "ij" else (t_x, t_y)
    angles = jnp.concatenate([first[..., None] * bands, second[..., None] * bands], -1)
    return angles.reshape(height * width, 2 * count)


def _mixed_angles(
    height: int,
    width: int,
    frequencies: jax.Array,
    grid_indexing: str,
    span: tuple[int, int] | None = None,
) -> jax.Array:
    """ "rope_mixed"'s angles (N, heads, kd / 2): t_x F[0] + t_y F[1];
    `span` (Hq, Wq): of a key map spread over the query grid."""
    ys, xs = jnp.divmod(jnp.arange(height * width), width)
    ys, xs = ys.astype(frequencies.dtype), xs.astype(frequencies.dtype)
    if span is not None and span[0] != height:
        ys = ys * span[0] / height
    if span is not None and span[1] != width:
        xs = xs * span[1] / width
    t_x, t_y = (xs, ys) if grid_indexing == "xy" else (ys, xs)
    return jnp.einsum("n,hp->nhp", t_x, frequencies[0]) + jnp.einsum(
        "n,hp->nhp", t_y, frequencies[1]
    )


def _sin_cos(angles: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The rotary tables (..., kd): the angles' sin and cos repeated twice
    each (angle m at channels 2m and 2m + 1, whatever the layout)."""
    return (
        jnp.repeat(jnp.sin(angles), 2, axis=-1),
        jnp.repeat(jnp.cos(angles), 2, axis=-1),
    )


def _rotate(
    x: jax.Array, tables: tuple[jax.Array, jax.Array], layout: str
) -> jax.Array:
    """x (B, N, heads, kd) * cos + r(x) * sin; (sin, cos) = `tables`, (N, 1
    or heads, kd)."""
    sin, cos = tables
    if layout == "half":
        x1, x2 = jnp.split(x, 2, axis=-1)
        rotated = jnp.concatenate([-x2, x1], axis=-1)
    else:
        pairs = x.reshape(*x.shape[:-1], x.shape[-1] // 2, 2)
        rotated = jnp.stack([-pairs[..., 1], pairs[..., 0]], axis=-1).reshape(x.shape)
    return x * cos + rotated * sin


def _reduce(
    m: jax.Array, params: Mapping[str, jax.Array], cfg: _common.BlockConfig
) -> jax.Array:
    """timm pvt_v2's reduction of the key/value map (B, H, W, C') ->
    (B, H', W', C'): a stride-R `jax.lax.conv_general_dilated` (VALID: the
    last H % R rows are in no window), LayerNorm; or adaptive average pooling
    (torch's bins, each a mean), the 1x1 conv, LayerNorm, exact GELU."""
    kernel_name, bias_name = schema.REDUCTION_CONV
    kernel = params[kernel_name]
    if cfg.kv_reduction == "pool":
        height, width = m.shape[1], m.shape[2]
        out_h, out_w = cfg.kv_pool_size

        def bins(size: int, out: int) -> list[tuple[int, int]]:
            return [(i * size // out, -(-(i + 1) * size // out)) for i in range(out)]

        m = jnp.stack(
            [
                jnp.stack(
                    [
                        jnp.mean(m[:, y0:y1, x0:x1], axis=(1, 2))
                        for x0, x1 in bins(width, out_w)
                    ],
                    axis=1,
                )
                for y0, y1 in bins(height, out_h)
            ],
            axis=1,
        )  # (B, oh, ow, C')
        kernel, stride = kernel[None, None], 1
    else:
        for axis, size in enumerate(m.shape[1:3]):
            arguments.reduced_size(int(size), cfg.kv_reduction, None, axis)
        stride = int(cfg.kv_reduction)  # type: ignore[arg-type]
    m = jax.lax.conv_general_dilated(
        m,
        kernel,
        window_strides=(stride, stride),
        padding="VALID",
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
        precision=jax.lax.Precision.HIGHEST,
    )
    if params.get(bias_name) is not None:
        m = m + params[bias_name]
    names = schema.norm_weight_names("reduction", "layer")
    m = _norm(m, params, names, cfg.norm_epsilon)
    if cfg.kv_reduction == "pool":
        m = jax.nn.gelu(m, approximate=False)
    return m


def apply(
    params: Mapping[str, jax.Array],
    x: jax.Array,
    attention_mask: jax.Array | None = None,
    context: jax.Array | None = None,
    *,
    num_heads: int = 1,
    key_dim: int | None = None,
    activation: str | None = None,
    position_encoding: str = "none",
    scale: float | None = None,
    data_format: str = "channels_last",
    scale_position_logits: bool = True,
    use_bias: bool | None = None,
    position_size: Sequence[int] | None = None,
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
    prefix_tokens: jax.Array | None = None,
) -> jax.Array | tuple[jax.Array, jax.Array]:
    """The block's forward pass, a pure function (jit it with the config static).

    Args:
        params: canonical weight dict of jnp arrays (see module docstring).
        x: (B, H, W, C) for "channels_last", (B, C, H, W) for "channels_first".
        attention_mask: optional bool (B, H, W) (with a context: (B, H',
            W')); True = may be attended to.
        context: optional (B, H', W', C') (channels_first: (B, C', H', W')):
            keys and values from it (cross-attention).
        num_heads, key_dim, activation, position_encoding, scale, data_format,
            scale_position_logits: the block's config, with the reference's
            defaults; `scale=None` means 1/sqrt(key_dim).
        use_bias: optional; when given, `params` must have biases exactly when
            it is True (else they are read off `params`).
        position_size: optional (Hr, Wr); when given, the learned tables must
            have that reference size (it is read off their shapes anyway);
            "rope"'s reference grid.
        use_key_bias, qk_norm, output_norm, output_dense, norm_epsilon: as
            the reference's (`use_key_bias` None: `use_bias`).
        rope_temperature, rope_layout, rope_grid_indexing, rope_grid_offset,
            rope_in_pixels, rope_max_resolution: the rotary encodings'
            settings, as the layer's.
        window_size, shift_size: Swin's windows, as the layer's.
        kv_reduction, kv_pool_size: as the layer's.
        context_channels: C' (None: read off `context`).
        prefix_tokens: optional (B, T, C) class and register tokens, first
            among the tokens, not rotated, always keys (as the layer's).

    Returns:
        The output in the layout and dtype of `x`; with `prefix_tokens`,
        `(out, prefix_out)`, prefix_out (B, T, C).

    Raises:
        ValueError: on an invalid config value, or when `params` does not hold
            exactly the weights of this config (checked at trace time: shapes
            are static).
    """
    if data_format == "channels_first":
        x = jnp.transpose(x, (0, 2, 3, 1))  # (B, C, H, W) -> (B, H, W, C)
    batch, height, width, channels = x.shape
    if context is not None and data_format == "channels_first":
        context = jnp.transpose(context, (0, 2, 3, 1))
    if context is not None and context_channels is None:
        context_channels = context.shape[-1]
    cfg = _common.check_config(
        channels,
        _ACTIVATIONS,
        num_heads=num_heads,
        key_dim=key_dim,
        activation=activation,
        position_encoding=position_encoding,
        scale=scale,
        scale_position_logits=scale_position_logits,
        data_format=data_format,
        use_bias=_common.has_bias(params) if use_bias is None else use_bias,
        position_size=position_size
        or _common.position_size_of(params, position_encoding),
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
    _common.check_weights(params, cfg.weight_shapes)
    dv, kd, scale = cfg.head_dim, cfg.key_dim, cfg.scale  # dv: value width per head
    n = height * width
    act = _ACTIVATIONS[activation]

    t = x.reshape(batch, n, channels)  # (B, N, C), row-major over (H, W)
    token_weights = cfg.encoding.token_weights
    if token_weights:  # "conv"
        t = t + jax.nn.relu(_dense(t, params, *token_weights))  # (B, N, C)
    elif position_encoding == "sinusoidal":
        t = t + _sincos(height, width, channels, t.dtype)
    prefix = 0  # T: class and register tokens first, as timm's ViT and EVA
    if prefix_tokens is not None:
        prefix = cfg.check_prefix_tokens(batch, prefix_tokens.shape)
        t = jnp.concatenate([prefix_tokens.astype(t.dtype), t], axis=1)
    n_all = prefix + n  # (B, T + N, C)

    # The keys' and values' map: the tokens', or the context's; reduced.
    kv, key_grid = t, (height, width)
    other_keys = context is not None or kv_reduction is not None
    if (context is None) != (cfg.context_channels is None):
        raise ValueError(
            "`context` must be given exactly when context_channels is set. "
            f"Received: context_channels={cfg.context_channels}, "
            f"context={'a map' if context is not None else None}"
        )
    if other_keys:
        m = t.reshape(batch, height, width, channels) if context is None else context
        if kv_reduction is not None:
            m = _reduce(m, params, cfg)
        key_grid = (m.shape[1], m.shape[2])
        kv = m.reshape(batch, key_grid[0] * key_grid[1], m.shape[3])
    nk = kv.shape[1]
    # (B, N, heads*d) -> (B, N, heads, d): head i is the channel slice [i*d, (i+1)*d).
    q = act(_dense(t, params, "query_kernel", "query_bias"))
    k = act(_dense(kv, params, "key_kernel", "key_bias"))
    v = act(_dense(kv, params, "value_kernel", "value_bias"))
    q = q.reshape(batch, n_all, num_heads, kd)
    k = k.reshape(batch, nk, num_heads, kd)
    v = v.reshape(batch, nk, num_heads, dv)
    if qk_norm is not None:  # over kd, every head with the same weights
        q = _norm(q, params, cfg.norm_weights("query"), norm_epsilon)
        k = _norm(k, params, cfg.norm_weights("key"), norm_epsilon)
    if cfg.rope is not None:
        name = cfg.encoding.frequencies
        rope = cfg.rope

        def angles_of(
            h: int, w: int, span: tuple[int, int] | None = None
        ) -> jax.Array:  # (N, 1 or heads, kd / 2)
            if name is not None:
                return _mixed_angles(h, w, params[name], rope.grid_indexing, span)
            return _rope_angles(h, w, kd, rope, q.dtype, span)[:, None]

        tables = _sin_cos(angles_of(height, width))
        key_tables = tables
        if other_keys:
            key_tables = _sin_cos(angles_of(*key_grid, span=(height, width)))
        # The map's tokens only (EVA's rope on x[:, :, T:]).
        q = q.at[:, prefix:].set(_rotate(q[:, prefix:], tables, cfg.rope.layout))
        k = k.at[:, prefix:].set(_rotate(k[:, prefix:], key_tables, cfg.rope.layout))
    keep = None  # (B, Nk) bool, per key
    if attention_mask is not None:
        keep = jnp.asarray(attention_mask, dtype=bool).reshape(batch, nk - prefix)
        keep = jnp.pad(keep, ((0, 0), (prefix, 0)), constant_values=True)

    # Swin's windows become the batch: (B * nW, wh * ww, heads*d).
    size, shift_mask = (height, width), None  # of the grid attention runs on
    if cfg.window_size is not None:
        window = cfg.window_size
        shift, pad = _window_layout(height, width, window, cfg.shift_size)
        q, k, v = (
            _partition(t.reshape(batch, height, width, -1), window, shift, pad)
            for t in (q, k, v)
        )
        if keep is not None or any(pad):
            image = jnp.ones((batch, n), bool) if keep is None else keep
            image = image.reshape(batch, height, width, 1).astype(jnp.int32)
            keep = _partition(image, window, shift, pad)[..., 0].astype(bool)
        if any(shift):
            mask = _shift_mask(height, width, window, shift, pad)  # (nW, Nw, Nw)
            shift_mask = jnp.tile(mask, (batch, 1, 1))[:, None].astype(q.dtype)
        size = window
    items, tokens, keys = q.shape[0], q.shape[1], k.shape[1]
    q = q.reshape(items, tokens, num_heads, kd)
    k = k.reshape(items, keys, num_heads, kd)
    v = v.reshape(items, keys, num_heads, dv)

    # The Python float `scale` is weakly typed: it keeps the dtype of the logits.
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k)  # (B', heads, N', N')
    pos = _position_logits(q, params, position_encoding, *size)
    if pos is None:
        logits = scale * logits
    elif scale_position_logits:
        logits = scale * (logits + pos)
    else:
        logits = scale * logits + pos
    if shift_mask is not None:
        logits = logits + shift_mask
    if keep is None:
        probs = jax.nn.softmax(logits, axis=-1)
        out = jnp.einsum("bhqk,bkhd->bqhd", probs, v)  # (B', N', heads, dv)
    else:
        has_key = jnp.any(keep, axis=1)  # (B',)
        # Fully masked items attend to everything (finite, discarded below).
        safe = keep | ~has_key[:, None]  # (B', N')
        probs = jax.nn.softmax(logits, axis=-1, where=safe[:, None, None, :])
        out = jnp.einsum("bhqk,bkhd->bqhd", probs, v)  # (B', N', heads, dv)
        out = jnp.where(has_key[:, None, None, None], out, 0)
    if cfg.window_size is not None:
        out = _merge(
            out.reshape(items, tokens, channels), (height, width), window, shift, pad
        )

    out = out.reshape(batch, n_all, channels)  # heads concatenated
    if output_norm is not None:
        out = _norm(out, params, cfg.norm_weights("output"), norm_epsilon)
    if output_dense:
        out = _dense(out, params, *schema.OUTPUT_PROJECTION)
    prefix_out, out = out[:, :prefix], out[:, prefix:]
    out = out.reshape(batch, height, width, channels)
    if data_format == "channels_first":
        out = jnp.transpose(out, (0, 3, 1, 2))  # -> (B, C, H, W)
    return out if prefix_tokens is None else (out, prefix_out)


_apply_jit = jax.jit(apply, static_argnames=_STATIC)


def _loss(
    params: Mapping[str, jax.Array],
    x: jax.Array,
    attention_mask: jax.Array | None,
    loss_weights: jax.Array,
    context: jax.Array | None,
    config_items: Iterable[tuple[str, Any]],
) -> jax.Array:
    """sum(out * loss_weights); the config comes as hashable (name, value) pairs."""
    out = apply(params, x, attention_mask, context, **dict(config_items))
    return jnp.sum(out * loss_weights)


_value_and_grad_jit = jax.jit(
    jax.value_and_grad(_loss, argnums=(0, 1)), static_argnames=("config_items",)
)


def params_from_weight_dict(
    weights: Mapping[str, ArrayLike | None], dtype: DTypeLike = "float32"
) -> dict[str, jax.Array]:
    """Canonical NumPy weight dict -> dict of jnp arrays of `dtype` (None dropped).

    float64 needs 64-bit mode to be on (see the module docstring).
    """
    return {
        k: jnp.asarray(np.asarray(v), dtype=dtype)
        for k, v in weights.items()
        if v is not None
    }


def _precision(dtype: DTypeLike) -> AbstractContextManager[Any]:
    """jax.enable_x64(True) for float64 (scoped), else nothing."""
    if np.dtype(dtype) == np.float64:
        return jax.enable_x64(True)
    return contextlib.nullcontext()


def _check_dtype(array: np.ndarray, dtype: DTypeLike) -> np.ndarray:
    if array.dtype != np.dtype(dtype):
        raise AssertionError(
            f"JAX computed in {array.dtype}, asked for {np.dtype(dtype)}"
        )
    return array


def forward(
    x: ArrayLike,
    weights: Mapping[str, ArrayLike | None],
    attention_mask: ArrayLike | None = None,
    dtype: DTypeLike = "float32",
    context: ArrayLike | None = None,
    prefix_tokens: ArrayLike | None = None,
    **config: Any,
) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """Run the block on NumPy inputs; returns the output as a NumPy array
    (with `prefix_tokens` (B, T, C), `(out, prefix_out)`).

    `config`: keywords of `apply`, completed by `_common.numpy_config`.
    """
    # complete and hashable
    _, config = _common.numpy_config(x, weights, config, context)
    with _precision(dtype):
        params = params_from_weight_dict(weights, dtype)
        xj = jnp.asarray(np.asarray(x), dtype=dtype)
        mask = (
            None if attention_mask is None else jnp.asarray(attention_mask, dtype=bool)
        )
        cj = None if context is None else jnp.asarray(np.asarray(context), dtype=dtype)
        if prefix_tokens is not None:
            pj = jnp.asarray(np.asarray(prefix_tokens), dtype=dtype)
            out, prefix_out = _apply_jit(
                params, xj, mask, cj, prefix_tokens=pj, **config
            )
            return (
                _check_dtype(np.asarray(out), dtype),
                _check_dtype(np.asarray(prefix_out), dtype),
            )
        out = np.asarray(_apply_jit(params, xj, mask, cj, **config))
    return _check_dtype(out, dtype)


def value_and_grad(
    x: ArrayLike,
    weights: Mapping[str, ArrayLike | None],
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
    # complete and hashable
    _, config = _common.numpy_config(x, weights, config, context)
    with _precision(dtype):
        params = params_from_weight_dict(weights, dtype)
        xj = jnp.asarray(np.asarray(x), dtype=dtype)
        lw = jnp.asarray(np.asarray(loss_weights), dtype=dtype)
        mask = (
            None if attention_mask is None else jnp.asarray(attention_mask, dtype=bool)
        )
        cj = None if context is None else jnp.asarray(np.asarray(context), dtype=dtype)
        loss, (grad_params, grad_x) = _value_and_grad_jit(
            params, xj, mask, lw, cj, config_items=tuple(sorted(config.items()))
        )
        loss = np.asarray(loss)
        grad_x = np.asarray(grad_x)
        grad_params = {k: np.asarray(v) for k, v in grad_params.items()}
    _check_dtype(loss, dtype)
    _check_dtype(grad_x, dtype)
    for g in grad_params.values():
        _check_dtype(g, dtype)
    return loss[()], grad_x, grad_params


_resize_jit = jax.jit(_resize, static_argnames=("length",))
_sincos_jit = jax.jit(_sincos, static_argnums=(0, 1, 2, 3))


def resize_table(
    table: ArrayLike, length: int, dtype: DTypeLike = "float32"
) -> np.ndarray:
    """The native's table resize on NumPy: (L, d) -> (length, d) in `dtype`."""
    with _precision(dtype):
        out = np.asarray(
            _resize_jit(jnp.asarray(np.asarray(table), dtype=dtype), length)
        )
    return _check_dtype(out, dtype)


def sinusoidal_embedding(
    height: int, width: int, channels: int, dtype: DTypeLike = "float32"
) -> np.ndarray:
    """The native's sine-cosine embedding on NumPy: (H*W, C) in `dtype`."""
    arguments.check_channels(channels, position_encoding="sinusoidal")
    with _precision(dtype):
        out = np.asarray(_sincos_jit(height, width, channels, np.dtype(dtype)))
    return _check_dtype(out, dtype)


# ------------------------------------------------------- the bench's fused form
def fused_block(
    config: _common.BenchShape, weights: Mapping[str, ArrayLike]
) -> tuple[
    Callable[[Mapping[str, jax.Array], jax.Array], jax.Array], dict[str, jax.Array]
]:
    """The bench's form: (apply(params, x) -> out, params), pure, for
    `jax.jit` / `jax.grad`, for a bench config (`_common.FusedBlock.of`).

    `jax.nn.dot_product_attention`, "relative"'s term (gathered with the
    offset index, times the scale) as its `bias`; "rope" rotates q and k
    first (the tables computed once). With Swin's windows: `jnp.roll`, the
    windows as the batch, the per-head bias (gathered with the window's
    index) plus the shift mask as `bias`, merged and rolled back. float32; no
    mask, no other encoding.
    """
    block = _common.FusedBlock.of(config)
    params = {k: jnp.asarray(np.asarray(v, np.float32)) for k, v in weights.items()}
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
        index_h, index_w = _common.relative_index(height), _common.relative_index(width)
    rope = block.rope
    if rope is not None:
        sin, cos = _sin_cos(_rope_angles(height, width, d, rope, jnp.float32))
        tables = (sin[:, None], cos[:, None])  # (N, 1, d)
    w, shift = block.window, block.shift
    if w:
        rows, cols = block.bias_index()
        shift_mask = block.window_bias()[:, None]  # (nW, 1, Nw, Nw)

    def apply(params: Mapping[str, jax.Array], x: jax.Array) -> jax.Array:
        b = x.shape[0]
        if w:  # (B * nW, Nw, C) windows of the rolled map
            t = jnp.roll(x, (-shift, -shift), axis=(1, 2))
            t = t.reshape(b, height // w, w, width // w, w, channels)
            t = t.transpose(0, 1, 3, 2, 4, 5).reshape(-1, w * w, channels)
        else:
            t = x.reshape(b, n, channels)
        items, tokens = t.shape[0], t.shape[1]

        def project(
            name: str,
        ) -> jax.Array:  # (B', N', heads, d): dot_product_attention's
            y = t @ params[f"{name}_kernel"] + params[f"{name}_bias"]
            return y.reshape(items, tokens, heads, d)

        q, k, v = project("query"), project("key"), project("value")
        if rope is not None:
            q, k = _rotate(q, tables, rope.layout), _rotate(k, tables, rope.layout)
        if w:
            window_bias = jnp.tile(jnp.asarray(shift_mask), (b, 1, 1, 1))
            if block.bias_table is not None:
                table = params[block.bias_table][rows, cols].transpose(2, 0, 1)
                window_bias = window_bias + table  # (B * nW, heads, Nw, Nw)
            window_bias = jnp.broadcast_to(window_bias, (items, heads, tokens, tokens))
            out = jax.nn.dot_product_attention(q, k, v, bias=window_bias, scale=scale)
            out = out.reshape(b, height // w, width // w, w, w, channels)
            out = out.transpose(0, 1, 3, 2, 4, 5).reshape(b, height, width, channels)
            return jnp.roll(out, (shift, shift), axis=(1, 2))
        bias = None
        if relative:
            q5 = q.reshape(b, height, width, heads, d)
            logits_h = jnp.einsum("byxhd,yvd->bhyxv", q5, params[name_h][index_h])
            logits_w = jnp.einsum("byxhd,xud->bhyxu", q5, params[name_w][index_w])
            bias = (logits_h[..., :, None] + logits_w[..., None, :]).reshape(
                b, heads, n, n
            )
            bias = bias * scale
        out = jax.nn.dot_product_attention(q, k, v, bias=bias, scale=scale)
        return out.reshape(b, height, width, channels)

    return apply, params
