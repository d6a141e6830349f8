"""Native PyTorch reference of the 2-D multi-head self-attention block.

Written the way a PyTorch user would write the block by hand, with no Keras:
`nn.Linear` projections and `F.scaled_dot_product_attention` (SDPA) for the
attention itself. It serves as an independent oracle for the Keras layer on the
torch backend (every encoding, mask and dtype); `fused_block`, at the end, is
the form the bench measures (SDPA with the position term as its float mask).

What it computes is `mhsa_core.reference.mhsa_forward` (`mhsa_core.natives`);
the schema's facts and the argument rules come from `_common`. In PyTorch's idiom:

- "relative" (BoTNet), pos(i, j) = q_i . (R_h[y_j - y_i + H - 1]
  + R_w[x_j - x_i + W - 1]): per axis q @ R^T gives (.., L, 2L - 1) logits per
  relative offset; padding and reshaping turn them into (.., L, L) logits per
  absolute key position (the "rel_to_abs" trick, `_rel_to_abs`). The height
  and width terms are broadcast-summed over the other axis.
- "absolute", pos(i, j) = q_i . (E_h[y_j] + E_w[x_j]): q @ E_h^T and q @ E_w^T,
  broadcast-summed.
- The tables are `nn.Parameter`s of the reference size (Hr, Wr)
  (`position_size`); at an input of size (H, W) they are resized along their
  rows with `F.interpolate(mode="linear", align_corners=False)` (half-pixel
  centers, the reference's `resize_table`; the identity at the reference size).
- The position term enters SDPA as a float `attn_mask`, which SDPA adds after
  scaling: scale * pos is passed when `scale_position_logits`, pos otherwise.
- "sinusoidal": w_k = exp(-k ln(10000) / D), D = C / 4 (the frequencies in
  float64, then cast; angles and sin/cos in the run's dtype).
- The options of timm's `Attention` as timm writes them: `qk_norm` is one
  `nn.LayerNorm(key_dim)` or `nn.RMSNorm(key_dim)` each for q and k, applied
  to (B, heads, N, key_dim) (so shared by the heads); `output_norm` an
  `nn.LayerNorm(C)` of the merged heads; `output_dense` an `nn.Linear(C, C)`
  after it. `use_key_bias=False`: the key's `nn.Linear` has no bias.
- "rope", "rope_mixed": q and k rotated before SDPA. "rope": a
  `torch.meshgrid` of the two axes' positions (`torch.arange` + offset, or
  `torch.linspace(-1, 1)`, times reference / size) times the frequencies
  (float64, then cast); "rope_mixed": the positions times the learned
  frequencies (`nn.Parameter` (2, heads, kd / 2)), per head. sin and cos
  `repeat_interleave`d to kd, then x * cos + rot(x) * sin, rot the
  interleaved pair swap (`torch.stack([-x[..., 1::2], x[..., ::2]], -1)`) or
  the half swap (`torch.cat([-x2, x1])`).
- "relative_bias" (Swin), pos(i, j) = B[y_i - y_j + H - 1, x_i - x_j + W - 1,
  head]: the table indexed with Swin's `relative_position_index` (query minus
  key coordinates, `_bias_index`), heads first, as timm's `WindowAttention`.
  At another size the table is resized as timm resizes Swin's (`_resize_bias`,
  its `RegularGridInterpolator` written out: `torch.bucketize` on the
  respaced source offsets, bilinear weights).
- Windows (`window_size`, `shift_size`), as timm's `SwinTransformerBlock._attn`
  (`_Windows`): `torch.roll` by -shift, `F.pad` at the bottom and right,
  `view`/`permute` into (B * nW, wh * ww, C) windows, attention per window
  with the shift mask (-100 between regions, built from an image of region
  labels like timm's `get_attn_mask`, but labelled by where each token came
  from) and the padding masked, then back. The shift is dropped along an axis
  the map fits in one window.

`nn.Linear.weight` is (out, in) while the canonical kernels are (in, out), so
`load_weight_dict` stores `kernel.T` and `weight_grad_dict` returns the
transposed gradient, in the canonical layout again. Tables are stored as they
are. Biases are absent (or None) when `use_bias=False`.

SDPA notes:
- `scale` is passed explicitly, as a float (None, 1/sqrt(key_dim), is resolved
  before the call, as SDPA's own default would do).
- A bool `attn_mask` means True = take part in attention, as here. With a
  position term, the key mask is folded into the float mask: masked keys get
  -inf there.
- A query row whose keys are all masked: older PyTorch releases return NaN
  there (0/0 in the softmax). torch 2.13 on CPU returns zeros (math and flash
  kernels alike), but that is kernel- and version-dependent behaviour. So those
  rows are never handed to SDPA fully masked: their mask is replaced by all-True
  (a finite, unused result) and the output is then zeroed with `torch.where`,
  which also gives those items exactly zero gradients.
- The CPU flash kernel needs key_dim == value head dim; otherwise SDPA falls back
  to its math kernel. Both give the same result up to rounding.

NumPy in, NumPy out: `forward`, `value_and_grad`, `resize_table`,
`sinusoidal_embedding` (`mhsa_core.natives`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from numpy.typing import ArrayLike, DTypeLike
from torch import nn

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

_ACTIVATIONS: dict[str | None, Callable[[torch.Tensor], torch.Tensor]] = {
    None: lambda x: x,
    "linear": lambda x: x,
    "relu": F.relu,
    "gelu": F.gelu,  # exact (erf) GELU, as the reference
    "sigmoid": torch.sigmoid,
    "tanh": torch.tanh,
    "silu": F.silu,
    "swish": F.silu,
}

_TORCH_DTYPES = {
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float32": torch.float32,
    "float64": torch.float64,
}


def _torch_dtype(dtype: DTypeLike | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    name = "bfloat16" if dtype == "bfloat16" else np.dtype(dtype).name
    return _TORCH_DTYPES[name]


def _resize(table: torch.Tensor, length: int) -> torch.Tensor:
    """table (L, d) -> (length, d), linear along the rows, half-pixel centers."""
    # F.interpolate resizes the last axis of (N, C, L): the rows go last.
    resized = F.interpolate(
        table.t()[None], size=length, mode="linear", align_corners=False
    )
    return resized[0].t()


def _rel_to_abs(rel: torch.Tensor) -> torch.Tensor:
    """Relative logits (..., L, 2L - 1) -> absolute logits (..., L, L).

    rel[..., i, m] is the logit of query i for the key at offset m - (L - 1)
    from it; out[..., i, j] = rel[..., i, j - i + L - 1]. Pad one column (L, 2L),
    flatten, pad L - 1 more: (L + 1)(2L - 1) entries; seen as (L + 1, 2L - 1),
    row i starts at flat i * (2L - 1) = i * 2L - i, so its column L - 1 + j is
    flat i * 2L + (j - i + L - 1), entry j - i + L - 1 of padded row i.
    """
    *lead, length, _ = rel.shape
    flat = F.pad(rel, (0, 1)).reshape(*lead, 2 * length * length)
    flat = F.pad(flat, (0, length - 1))
    return flat.reshape(*lead, length + 1, 2 * length - 1)[..., :length, length - 1 :]


def _resize_bias(table: torch.Tensor, rows_h: int, rows_w: int) -> torch.Tensor:
    """A per-head table (S_h, S_w, heads) -> (rows_h, rows_w, heads) by timm's
    rule for Swin's tables: along each axis the source offsets sit at
    `_common.bias_offsets`, the new integer offsets are interpolated between
    the two around them (`torch.bucketize`, as timm's RegularGridInterpolator;
    the end value beyond either end). The identity at the same size."""
    src_h, src_w = table.shape[:2]
    if (src_h, src_w) == (rows_h, rows_w):
        return table

    def axis(src: int, dst: int) -> tuple[torch.Tensor, ...]:
        points = torch.as_tensor(_common.bias_offsets(src, dst), dtype=table.dtype)
        x = torch.arange(dst, dtype=table.dtype) - dst // 2
        right = torch.bucketize(x, points).clamp(max=src - 1)
        left = (right - 1).clamp(min=0)
        to_left = (x - points[left]).clamp(min=0)
        to_right = (points[right] - x).clamp(min=0)
        both = (to_left == 0) & (to_right == 0)  # on a single point: its value
        to_left = torch.where(both, torch.ones_like(x), to_left)
        to_right = torch.where(both, torch.ones_like(x), to_right)
        total = to_left + to_right
        return left, right, to_right / total, to_left / total  # weights of each

    left_y, right_y, wl_y, wr_y = axis(src_h, rows_h)
    left_x, right_x, wl_x, wr_x = axis(src_w, rows_w)
    out = 0
    for index_y, weight_y in ((left_y, wl_y), (right_y, wr_y)):
        for index_x, weight_x in ((left_x, wl_x), (right_x, wr_x)):
            corner = table[index_y][:, index_x]  # (rows_h, rows_w, heads)
            out = out + weight_y[:, None, None] * weight_x[None, :, None] * corner
    return out


def _bias_index(height: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Swin's relative_position_index as (row, column) of the table: for
    query i and key j, (y_i - y_j + H - 1, x_i - x_j + W - 1), each (N, N)."""
    ys, xs = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    coords = torch.stack([ys.flatten(), xs.flatten()])  # (2, N)
    relative = coords[:, :, None] - coords[:, None, :]  # (2, N, N): query - key
    return relative[0] + height - 1, relative[1] + width - 1


class _Windows:
    """timm's window partition of an H x W map (`SwinTransformerBlock._attn`)."""

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
        self.shift = tuple(
            0 if size <= w else s for size, w, s in zip((height, width), window, shift)
        )
        self.pad = ((-height) % window[0], (-width) % window[1])

    def partition(self, x: torch.Tensor) -> torch.Tensor:
        """(B, H, W, C) -> (B * nW, wh * ww, C)."""
        if any(self.shift):
            x = torch.roll(x, shifts=(-self.shift[0], -self.shift[1]), dims=(1, 2))
        x = F.pad(x, (0, 0, 0, self.pad[1], 0, self.pad[0]))
        batch, height, width, channels = x.shape
        wh, ww = self.window
        x = x.view(batch, height // wh, wh, width // ww, ww, channels)
        return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, self.tokens, channels)

    def merge(self, windows: torch.Tensor) -> torch.Tensor:
        """(B * nW, wh * ww, C) -> (B, H, W, C)."""
        wh, ww = self.window
        height, width = self.height + self.pad[0], self.width + self.pad[1]
        channels = windows.shape[-1]
        x = windows.view(-1, height // wh, width // ww, wh, ww, channels)
        x = x.permute(0, 1, 3, 2, 4, 5).reshape(-1, height, width, channels)
        x = x[:, : self.height, : self.width]
        if any(self.shift):
            x = torch.roll(x, shifts=self.shift, dims=(1, 2))
        return x

    def keep(self, keep: torch.Tensor | None, batch: int) -> torch.Tensor | None:
        """Keys each window may see (B * nW, wh * ww): the mask, not the padding."""
        if keep is None and not any(self.pad):
            return None
        if keep is None:
            keep = torch.ones(batch, self.height, self.width, dtype=torch.bool)
        image = keep.reshape(batch, self.height, self.width, 1).to(torch.uint8)
        return self.partition(image)[..., 0].bool()

    def shift_mask(self, batch: int, dtype: torch.dtype) -> torch.Tensor | None:
        """(B * nW, 1, Nw, Nw): -100 between two regions of the shift (tokens
        from the first sh rows / sw columns of the map, which the roll wrapped
        around, against the others), as timm's get_attn_mask; or None."""
        if not any(self.shift):
            return None
        ys, xs = torch.meshgrid(
            torch.arange(self.height), torch.arange(self.width), indexing="ij"
        )
        labels = 2 * (ys < self.shift[0]).long() + (xs < self.shift[1]).long()
        windows = self.partition(labels[None, :, :, None])[..., 0]  # (nW, Nw)
        differ = windows[:, None, :] != windows[:, :, None]  # (nW, Nw, Nw)
        mask = torch.zeros(differ.shape, dtype=dtype).masked_fill(
            differ, schema.SHIFT_MASK_LOGIT
        )
        return mask.repeat(batch, 1, 1)[:, None]  # window b * nW + w


def _sincos(
    height: int,
    width: int,
    channels: int,
    dtype: torch.dtype,
    device: torch.device | str,
) -> torch.Tensor:
    """The fixed 2-D sine-cosine embedding (H*W, C), row-major over (H, W)."""
    d = channels // 4
    k = torch.arange(d, dtype=torch.float64, device=device)
    omega = torch.exp(k * (-math.log(10000.0) / d)).to(dtype)  # (d,)
    ang_y = torch.arange(height, dtype=dtype, device=device)[:, None] * omega  # (H, d)
    ang_x = torch.arange(width, dtype=dtype, device=device)[:, None] * omega  # (W, d)
    emb_y = torch.cat([ang_y.sin(), ang_y.cos()], dim=-1)  # (H, 2d)
    emb_x = torch.cat([ang_x.sin(), ang_x.cos()], dim=-1)  # (W, 2d)
    emb = torch.cat(
        [
            emb_y[:, None, :].expand(height, width, 2 * d),
            emb_x[None, :, :].expand(height, width, 2 * d),
        ],
        dim=-1,
    )
    return emb.reshape(height * width, channels)


def _norm_parameters(norm: nn.Module) -> tuple[torch.Tensor, ...]:
    """(weight,) of an nn.RMSNorm, (weight, bias) of an nn.LayerNorm."""
    bias = getattr(norm, "bias", None)
    return (norm.weight,) if bias is None else (norm.weight, bias)


def _rope_angles(
    height: int,
    width: int,
    key_dim: int,
    rope: schema.RopeSettings,
    dtype: torch.dtype,
    device: torch.device | str,
    span: tuple[int, int] | None = None,
) -> torch.Tensor:
    """ "rope"'s angles (N, kd / 2): per token, the positions of its row and
    column ("ij"; column first for "xy") times the kd / 4 frequencies.
    `span` (Hq, Wq): a key map's cells spread over the query grid."""
    count = key_dim // 4
    if rope.in_pixels:
        top = math.log2(rope.max_resolution) - 1
        bands = math.pi * 2.0 ** torch.linspace(0.0, top, count, dtype=torch.float64)
    else:
        exponent = torch.arange(count, dtype=torch.float64) / count
        bands = 1.0 / rope.temperature**exponent
    bands = bands.to(dtype=dtype, device=device)

    def positions(size: int, reference: int | None, query: int | None) -> torch.Tensor:
        if query is not None and query != size:
            # Cell i of the key axis at i * Hq / H of the query axis.
            p = torch.arange(size, dtype=dtype, device=device) * query / size
            if rope.in_pixels:
                t = p * (2.0 / max(query - 1, 1)) - 1.0
            else:
                t = p + rope.grid_offset
            return t if reference is None else t / query * reference
        if rope.in_pixels:
            t = torch.linspace(-1.0, 1.0, size, dtype=dtype, device=device)
        else:
            t = torch.arange(size, dtype=dtype, device=device) + rope.grid_offset
        return t if reference is None else t / size * reference

    ref_h, ref_w = rope.reference_size or (None, None)
    span_h, span_w = span or (None, None)
    grid = torch.stack(
        torch.meshgrid(
            positions(height, ref_h, span_h),
            positions(width, ref_w, span_w),
            indexing="ij",
        ),
        dim=-1,
    )  # (H, W, 2): [t_y, t_x]
    if rope.grid_indexing == "xy":
        grid = grid.flip(-1)  # [t_x, t_y]
    return (grid[..., None] * bands).reshape(height * width, 2 * count)


def _sin_cos(angles: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The rotary tables (..., kd): the angles' sin and cos repeated twice
    each (angle m at channels 2m and 2m + 1, whatever the layout)."""
    return (
        angles.sin().repeat_interleave(2, dim=-1),
        angles.cos().repeat_interleave(2, dim=-1),
    )


def _rotate(
    x: torch.Tensor, tables: tuple[torch.Tensor, torch.Tensor], layout: str
) -> torch.Tensor:
    """x (B, heads, N, kd) * cos + rot(x) * sin, (sin, cos) = `tables`."""
    sin, cos = tables
    if layout == "half":
        x1, x2 = x.chunk(2, dim=-1)
        rotated = torch.cat([-x2, x1], dim=-1)
    else:
        rotated = torch.stack([-x[..., 1::2], x[..., ::2]], dim=-1).reshape(x.shape)
    return x * cos + rotated * sin


class NativeMHSA2D(nn.Module):
    """The 2-D multi-head self-attention block as a `torch.nn.Module`.

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

    The parameters are created by `nn.Linear` (PyTorch's default init) and the
    tables N(0, 1/key_dim); load the canonical weights with `load_weight_dict`.
    The dtype follows `.to(dtype)`.
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
    ) -> None:
        super().__init__()
        self.config = cfg = _common.check_config(
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
        # The canonical (in, out) shapes; also what `load_weight_dict` accepts.
        shapes = cfg.weight_shapes

        # nn.Linear(in, out): weight (out, in), bias (out,).
        self._token_weights = cfg.encoding.token_weights  # ("conv" only)
        self.position = (
            nn.Linear(*shapes[self._token_weights[0]], bias=cfg.use_bias)
            if self._token_weights
            else None
        )
        self.query = nn.Linear(*shapes["query_kernel"], bias=cfg.use_bias)
        self.key = nn.Linear(*shapes["key_kernel"], bias=cfg.use_key_bias)
        self.value = nn.Linear(*shapes["value_kernel"], bias=cfg.use_bias)

        # Learned tables: canonical name -> nn.Parameter (rows, key_dim).
        stddev = schema.table_stddev(cfg.key_dim)
        self.tables = nn.ParameterDict(
            {
                name: nn.Parameter(torch.randn(shape) * stddev)
                for name, shape in schema.table_shapes(
                    position_encoding, cfg.position_size, cfg.key_dim, cfg.num_heads
                ).items()
            }
        )
        # RoPE-Mixed's learned frequencies (2, heads, kd / 2), or None.
        name = cfg.encoding.frequencies
        self.frequencies = (
            nn.Parameter(torch.zeros(shapes[name])) if name is not None else None
        )

        # timm's q_norm / k_norm / norm (scale_norm) / proj; None when off.
        def make_norm(kind: str | None, width: int) -> nn.Module | None:
            if kind is None:
                return None
            norm = nn.LayerNorm if kind == "layer" else nn.RMSNorm
            return norm(width, eps=cfg.norm_epsilon)

        self.query_norm = make_norm(cfg.qk_norm, cfg.key_dim)
        self.key_norm = make_norm(cfg.qk_norm, cfg.key_dim)
        self.output_norm = make_norm(cfg.output_norm, channels)
        self.output = (
            nn.Linear(*shapes[schema.OUTPUT_PROJECTION[0]], bias=cfg.use_bias)
            if cfg.output_dense
            else None
        )
        # timm pvt_v2's `sr` (Conv2d R x R stride R, or the 1x1 conv after
        # the pool) and `norm`, on the key/value map; None when off.
        self.reduction = self.reduction_norm = None
        if cfg.kv_reduction is not None:
            ckv = cfg.kv_channels
            size = 1 if cfg.kv_reduction == "pool" else int(cfg.kv_reduction)
            self.reduction = nn.Conv2d(ckv, ckv, size, stride=size, bias=cfg.use_bias)
            self.reduction_norm = nn.LayerNorm(ckv, eps=cfg.norm_epsilon)

    def _linears(self) -> list[tuple[tuple[str, ...], nn.Linear]]:
        """((kernel name, bias name), nn.Linear) pairs, in creation order."""
        pairs = (
            [(self._token_weights, self.position)] if self.position is not None else []
        )
        pairs += [
            ((f"{p}_kernel", f"{p}_bias"), getattr(self, p)) for p in schema.PROJECTIONS
        ]
        if self.output is not None:
            pairs.append((schema.OUTPUT_PROJECTION, self.output))
        return pairs

    def _norms(self) -> list[tuple[tuple[str, ...], nn.Module]]:
        """((scale name[, bias name]), norm module) pairs, in creation order."""
        modules = (self.query_norm, self.key_norm, self.output_norm)
        pairs = [
            (self.config.norm_weights(prefix), module)
            for prefix, module in zip(("query", "key", "output"), modules)
            if module is not None
        ]
        if self.reduction_norm is not None:
            names = schema.norm_weight_names("reduction", "layer")
            pairs.append((names, self.reduction_norm))
        return pairs

    def _conv_kernel(self) -> torch.Tensor:
        """The reduction conv's kernel in the canonical layout: (R, R, C, C)
        [dy, dx, in, out] from torch's (out, in, R, R); (C, C) for "pool"."""
        assert self.reduction is not None
        kernel = self.reduction.weight.permute(2, 3, 1, 0)
        if self.config.kv_reduction == "pool":
            return kernel[0, 0]
        return kernel

    def load_weight_dict(self, weights: Mapping[str, ArrayLike]) -> NativeMHSA2D:
        """Copy a canonical weight dict (NumPy arrays, any float dtype) in.

        Values are cast to the dtype of the module's parameters. Missing,
        unexpected or wrongly shaped entries raise ValueError.
        """
        _common.check_weights(weights, self.config.weight_shapes)
        with torch.no_grad():
            for (kernel, bias), linear in self._linears():
                # Canonical (in, out) -> nn.Linear (out, in).
                linear.weight.copy_(
                    torch.from_numpy(
                        np.ascontiguousarray(np.asarray(weights[kernel]).T)
                    )
                )
                if linear.bias is not None:
                    linear.bias.copy_(
                        torch.from_numpy(np.ascontiguousarray(weights[bias]))
                    )
            for name, table in self.tables.items():
                table.copy_(torch.from_numpy(np.ascontiguousarray(weights[name])))
            for names, norm in self._norms():
                for name, parameter in zip(names, _norm_parameters(norm)):
                    parameter.copy_(
                        torch.from_numpy(np.ascontiguousarray(weights[name]))
                    )
            name = self.config.encoding.frequencies
            if self.frequencies is not None and name is not None:
                self.frequencies.copy_(
                    torch.from_numpy(np.ascontiguousarray(weights[name]))
                )
            if self.reduction is not None:
                kernel, bias = schema.REDUCTION_CONV
                array = np.asarray(weights[kernel])
                if array.ndim == 2:  # "pool"'s 1x1 conv
                    array = array[None, None]
                # (R, R, in, out) -> torch's (out, in, R, R)
                self.reduction.weight.copy_(
                    torch.from_numpy(np.ascontiguousarray(array.transpose(3, 2, 0, 1)))
                )
                if self.reduction.bias is not None:
                    self.reduction.bias.copy_(
                        torch.from_numpy(np.ascontiguousarray(weights[bias]))
                    )
        return self

    def weight_grad_dict(self) -> dict[str, np.ndarray]:
        """Gradients of the parameters as a canonical dict of NumPy arrays."""
        grads = {}
        for (kernel, bias), linear in self._linears():
            grads[kernel] = linear.weight.grad.detach().T.cpu().numpy()
            if linear.bias is not None:
                grads[bias] = linear.bias.grad.detach().cpu().numpy()
        for name, table in self.tables.items():
            grads[name] = table.grad.detach().cpu().numpy()
        for names, norm in self._norms():
            for name, parameter in zip(names, _norm_parameters(norm)):
                grads[name] = parameter.grad.detach().cpu().numpy()
        name = self.config.encoding.frequencies
        if self.frequencies is not None and name is not None:
            grads[name] = self.frequencies.grad.detach().cpu().numpy()
        if self.reduction is not None:
            kernel, bias = schema.REDUCTION_CONV
            grad = self.reduction.weight.grad.detach().permute(2, 3, 1, 0)
            if self.config.kv_reduction == "pool":
                grad = grad[0, 0]
            grads[kernel] = grad.cpu().numpy()
            if self.reduction.bias is not None:
                grads[bias] = self.reduction.bias.grad.detach().cpu().numpy()
        return grads

    def _reduce(self, m: torch.Tensor) -> torch.Tensor:
        """timm pvt_v2's reduction of the key/value map (B, H, W, C') ->
        (B, H', W', C'): `sr` (stride-R conv), `norm`; or adaptive average
        pooling, the 1x1 `sr`, `norm`, GELU."""
        cfg = self.config
        assert self.reduction is not None and self.reduction_norm is not None
        m = m.permute(0, 3, 1, 2)  # (B, C', H, W)
        if cfg.kv_reduction == "pool":
            m = F.adaptive_avg_pool2d(m, cfg.kv_pool_size)
        else:
            for axis, size in enumerate(m.shape[2:]):
                arguments.reduced_size(size, cfg.kv_reduction, None, axis)
        m = self.reduction(m).permute(0, 2, 3, 1)  # (B, H', W', C')
        m = self.reduction_norm(m)
        if cfg.kv_reduction == "pool":
            m = F.gelu(m)  # exact (erf)
        return m

    def _position_logits(
        self, q: torch.Tensor, height: int, width: int
    ) -> torch.Tensor | None:
        """The position term (B, heads, N, N) of "relative"/"absolute", else None.

        q: (B, heads, N, kd). Row i = (y_i, x_i) is a query, column j a key.
        """
        spec = self.config.encoding
        if not spec.learned_tables:
            return None
        if spec.per_head_table:  # "relative_bias": (1, heads, N, N), no q
            (name,) = schema.table_names(spec.name)
            table = _resize_bias(
                self.tables[name], spec.table_rows(height), spec.table_rows(width)
            )
            rows, cols = _bias_index(height, width)
            return table[rows, cols].permute(2, 0, 1)[None]
        name_h, name_w = schema.table_names(spec.name)
        table_h = _resize(self.tables[name_h], spec.table_rows(height))
        table_w = _resize(self.tables[name_w], spec.table_rows(width))
        batch, heads, n, kd = q.shape
        q = q.reshape(batch, heads, height, width, kd)
        if spec.name == "relative":
            # Along x: (B, heads, H, W, 2W - 1) per offset -> (.., W) per key x_j.
            logits_w = _rel_to_abs(q @ table_w.t())  # [y_i, x_i, x_j]
            # Along y: rows of the map last but one, then back.
            logits_h = _rel_to_abs(q.transpose(2, 3) @ table_h.t())  # [x_i, y_i, y_j]
            logits_h = logits_h.transpose(2, 3)  # [y_i, x_i, y_j]
        else:
            logits_h = q @ table_h.t()  # (B, heads, H, W, H): [y_i, x_i, y_j]
            logits_w = q @ table_w.t()  # (B, heads, H, W, W): [y_i, x_i, x_j]
        # (B, heads, H, W, H, W): [y_i, x_i, y_j, x_j] -> (B, heads, N, N)
        pos = logits_h[..., :, None] + logits_w[..., None, :]
        return pos.reshape(batch, heads, n, n)

    def _rotary_angles(
        self,
        height: int,
        width: int,
        dtype: torch.dtype,
        device: torch.device,
        span: tuple[int, int] | None = None,
    ) -> torch.Tensor:
        """The rotary angles, (N, kd / 2) ("rope") or (heads, N, kd / 2)
        ("rope_mixed"), row-major over (H, W); `span` (Hq, Wq): of a key map
        spread over the query grid."""
        rope = self.config.rope
        assert rope is not None
        if self.frequencies is not None:
            rows = torch.arange(height, dtype=dtype, device=device)
            cols = torch.arange(width, dtype=dtype, device=device)
            if span is not None and span[0] != height:
                rows = rows * span[0] / height
            if span is not None and span[1] != width:
                cols = cols * span[1] / width
            ys, xs = torch.meshgrid(rows, cols, indexing="ij")
            ys, xs = ys.flatten(), xs.flatten()  # (N,)
            t_x, t_y = (xs, ys) if rope.grid_indexing == "xy" else (ys, xs)
            f = self.frequencies.to(dtype)
            # (heads, N, kd / 2)
            return (
                t_x[None, :, None] * f[0][:, None] + t_y[None, :, None] * f[1][:, None]
            )
        return _rope_angles(
            height, width, self.config.key_dim, rope, dtype, device, span
        )

    def forward(
        self,
        x: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        context: torch.Tensor | None = None,
        prefix_tokens: torch.Tensor | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """x: (B, H, W, C) or (B, C, H, W); attention_mask: bool (B, H, W)
        (with a context: (B, H', W')) or None; context: (B, H', W', C') or
        (B, C', H', W') (with `context_channels`) or None; prefix_tokens:
        (B, T, C) or None (then `(out, prefix_out)`)."""
        cfg = self.config
        act = _ACTIVATIONS[cfg.activation]
        if cfg.data_format == "channels_first":
            x = x.permute(0, 2, 3, 1)  # (B, C, H, W) -> (B, H, W, C)
        batch, height, width, channels = x.shape
        n = height * width
        heads, kd, dv = cfg.num_heads, cfg.key_dim, cfg.head_dim

        t = x.reshape(batch, n, channels)  # (B, N, C), row-major over (H, W)
        if self.position is not None:
            t = t + F.relu(self.position(t))  # (B, N, C)
        elif cfg.position_encoding == "sinusoidal":
            t = t + _sincos(height, width, channels, t.dtype, t.device)
        prefix = 0  # T: class and register tokens first, as timm's ViT and EVA
        if prefix_tokens is not None:
            prefix = cfg.check_prefix_tokens(batch, prefix_tokens.shape)
            t = torch.cat([prefix_tokens.to(t.dtype), t], dim=1)  # (B, T + N, C)
        n_all = prefix + n

        # The keys' and values' map: the tokens', or the context's; reduced.
        kv, key_grid = t, (height, width)
        other_keys = context is not None or cfg.kv_reduction is not None
        if (context is None) != (cfg.context_channels is None):
            raise ValueError(
                "`context` must be given exactly when context_channels is set. "
                f"Received: context_channels={cfg.context_channels}, "
                f"context={'a map' if context is not None else None}"
            )
        if other_keys:
            m = t.reshape(batch, height, width, channels)
            if context is not None:
                m = (
                    context.permute(0, 2, 3, 1)
                    if cfg.data_format == "channels_first"
                    else context
                )
            if cfg.kv_reduction is not None:
                m = self._reduce(m)
            key_grid = (m.shape[1], m.shape[2])
            kv = m.reshape(batch, key_grid[0] * key_grid[1], m.shape[3])
        nk = kv.shape[1]
        # (B, N, heads*d) -> (B, N, heads, d) -> (B, heads, N, d): head i is
        # the contiguous channel slice [i*d, (i+1)*d).
        q = act(self.query(t)).view(batch, n_all, heads, kd).transpose(1, 2)
        k = act(self.key(kv)).view(batch, nk, heads, kd).transpose(1, 2)
        v = act(self.value(kv)).view(batch, nk, heads, dv).transpose(1, 2)
        if self.query_norm is not None and self.key_norm is not None:
            q, k = self.query_norm(q), self.key_norm(k)  # over kd: timm's q/k_norm
        if cfg.rope is not None:
            tables = _sin_cos(self._rotary_angles(height, width, q.dtype, q.device))
            key_tables = tables
            if other_keys:
                key_tables = _sin_cos(
                    self._rotary_angles(*key_grid, q.dtype, q.device, (height, width))
                )
            # The map's tokens only (EVA's rope on x[:, :, T:]).
            q, k = (
                torch.cat(
                    [
                        p[:, :, :prefix],
                        _rotate(p[:, :, prefix:], table, cfg.rope.layout),
                    ],
                    2,
                )
                for p, table in ((q, tables), (k, key_tables))
            )
        # Back to (B, N, heads, d), the layout the windows are cut from.
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        keep = None  # (B, N) bool, per key
        if attention_mask is not None:
            keep = torch.as_tensor(attention_mask, device=x.device)
            keep = keep.to(torch.bool).reshape(batch, nk - prefix)
            keep = F.pad(keep, (prefix, 0), value=True)  # prefix: always keys

        # Swin's windows become the batch: (B * nW, wh * ww, heads, d).
        windows, shift_mask = None, None
        size = (height, width)  # of the grid attention runs on
        if cfg.window_size is not None:
            windows = _Windows(height, width, cfg.window_size, cfg.shift_size)
            q, k, v = (
                windows.partition(part.reshape(batch, height, width, -1)).view(
                    -1, windows.tokens, heads, part.shape[-1]
                )
                for part in (q, k, v)
            )
            keep = windows.keep(keep, batch)
            shift_mask = windows.shift_mask(batch, q.dtype)
            size = windows.window
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        items, tokens = q.shape[0], q.shape[2]  # (B', heads, N', d)
        keys = k.shape[2]

        # Float mask added by SDPA to the scaled logits, or None.
        bias = self._position_logits(q, *size)
        if bias is not None and cfg.scale_position_logits:
            bias = cfg.scale * bias
        if shift_mask is not None:
            bias = shift_mask if bias is None else bias + shift_mask
        if keep is None:
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=bias, scale=cfg.scale
            )
        else:
            has_key = keep.any(dim=1)  # (B',)
            # Fully masked items attend to everything (finite, discarded below).
            safe = keep | ~has_key[:, None]  # (B', N')
            if bias is None:
                mask = safe[:, None, None, :]  # bool: True = attend
            else:  # float: the position term, -inf at the masked keys
                bias = bias.expand(items, heads, tokens, keys)
                mask = bias.masked_fill(~safe[:, None, None, :], float("-inf"))
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, scale=cfg.scale
            )
            out = torch.where(has_key[:, None, None, None], out, out.new_zeros(()))
        # out: (B', heads, N', dv) -> (B', N', heads, dv) -> (B, H, W, C)
        out = out.transpose(1, 2).reshape(items, tokens, channels)
        if windows is not None:
            out = windows.merge(out)
        out = out.reshape(batch, n_all, channels)
        if self.output_norm is not None:
            out = self.output_norm(out)
        if self.output is not None:
            out = self.output(out)
        prefix_out, out = out[:, :prefix], out[:, prefix:]
        out = out.reshape(batch, height, width, channels)
        if cfg.data_format == "channels_first":
            out = out.permute(0, 3, 1, 2)  # -> (B, C, H, W)
        return out if prefix_tokens is None else (out, prefix_out)


def _build(
    x: np.ndarray,
    weights: Mapping[str, ArrayLike],
    dtype: DTypeLike | torch.dtype,
    config: Mapping[str, Any],
    context: ArrayLike | None = None,
) -> NativeMHSA2D:
    """A module of the complete config and dtype, with `weights` loaded."""
    channels, config = _common.numpy_config(x, weights, config, context)
    module = NativeMHSA2D(channels, **config).to(_torch_dtype(dtype))
    return module.load_weight_dict(weights)


def _mask_tensor(attention_mask: ArrayLike | None) -> torch.Tensor | None:
    if attention_mask is None:
        return None
    return torch.from_numpy(np.asarray(attention_mask, dtype=bool))


def forward(
    x: ArrayLike,
    weights: Mapping[str, ArrayLike],
    attention_mask: ArrayLike | None = None,
    dtype: DTypeLike | torch.dtype = "float32",
    context: ArrayLike | None = None,
    prefix_tokens: ArrayLike | None = None,
    **config: Any,
) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """Run the block on NumPy inputs; returns the output as a NumPy array
    (with `prefix_tokens` (B, T, C), `(out, prefix_out)`).

    `config`: keywords of `NativeMHSA2D` but `channels` (read off `x`),
    completed by `_common.numpy_config` (`context_channels` off `context`).
    """
    array = np.asarray(x)
    module = _build(array, weights, dtype, config, context)
    tdtype = _torch_dtype(dtype)
    xt = torch.from_numpy(np.ascontiguousarray(array)).to(tdtype)
    ct = pt = None
    if context is not None:
        ct = torch.from_numpy(np.ascontiguousarray(context)).to(tdtype)
    if prefix_tokens is not None:
        pt = torch.from_numpy(np.ascontiguousarray(prefix_tokens)).to(tdtype)
    with torch.no_grad():
        out = module(xt, _mask_tensor(attention_mask), context=ct, prefix_tokens=pt)
    if isinstance(out, tuple):
        return out[0].numpy(), out[1].numpy()
    return out.numpy()


def value_and_grad(
    x: ArrayLike,
    weights: Mapping[str, ArrayLike],
    loss_weights: ArrayLike,
    attention_mask: ArrayLike | None = None,
    dtype: DTypeLike | torch.dtype = "float32",
    context: ArrayLike | None = None,
    **config: Any,
) -> tuple[Any, np.ndarray, dict[str, np.ndarray]]:  # loss: a NumPy scalar
    """Loss `sum(out * loss_weights)` and its gradients, as NumPy.

    Returns `(loss, grad_x, grad_weights)`: a NumPy scalar, an array shaped
    like `x`, and a canonical weight dict (kernels (in, out)) of gradients
    (`context`, as `forward`'s, is a constant).
    """
    array = np.asarray(x)
    tdtype = _torch_dtype(dtype)
    module = _build(array, weights, dtype, config, context)
    xt = torch.from_numpy(np.ascontiguousarray(array)).to(tdtype).requires_grad_(True)
    lw = torch.from_numpy(np.ascontiguousarray(loss_weights)).to(tdtype)
    ct = None
    if context is not None:
        ct = torch.from_numpy(np.ascontiguousarray(context)).to(tdtype)
    out = module(xt, _mask_tensor(attention_mask), ct)
    loss = torch.sum(out * lw)
    loss.backward()
    return (loss.detach().numpy()[()], xt.grad.numpy(), module.weight_grad_dict())


def resize_table(
    table: ArrayLike, length: int, dtype: DTypeLike | torch.dtype = "float32"
) -> np.ndarray:
    """The native's table resize on NumPy: (L, d) -> (length, d) in `dtype`."""
    tensor = torch.from_numpy(np.ascontiguousarray(table)).to(_torch_dtype(dtype))
    with torch.no_grad():
        return _resize(tensor, length).numpy()


def sinusoidal_embedding(
    height: int, width: int, channels: int, dtype: DTypeLike | torch.dtype = "float32"
) -> np.ndarray:
    """The native's sine-cosine embedding on NumPy: (H*W, C) in `dtype`."""
    arguments.check_channels(channels, position_encoding="sinusoidal")
    return _sincos(height, width, channels, _torch_dtype(dtype), "cpu").numpy()


# ------------------------------------------------------- the bench's fused form
def fused_block(
    config: _common.BenchShape, weights: Mapping[str, ArrayLike]
) -> tuple[Callable[[torch.Tensor], torch.Tensor], list[torch.Tensor]]:
    """The bench's form: (call(x) -> out, [parameters]), x and out (B, H, W, C)
    torch float32, for a bench config (`_common.FusedBlock.of`).

    SDPA as the bench measures it: the flash kernel on CPU when there is no
    position term ("rope" rotates q and k before it, the tables computed
    once), else "relative"'s term (gathered with the offset index, times the
    scale) as its float `attn_mask`. With Swin's windows, as timm's block: the
    map rolled and cut into windows (a batch of B * nW), the per-head bias
    gathered with the window's index plus the shift mask as `attn_mask`,
    merged and rolled back. No mask, no other encoding.
    """
    block = _common.FusedBlock.of(config)
    params = {
        k: torch.tensor(np.asarray(v, np.float32), requires_grad=True)
        for k, v in weights.items()
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
        index_h = torch.as_tensor(_common.relative_index(height))
        index_w = torch.as_tensor(_common.relative_index(width))
    rope = block.rope
    if rope is not None:
        tables = _sin_cos(_rope_angles(height, width, d, rope, torch.float32, "cpu"))
    w, shift = block.window, block.shift
    if w:
        rows, cols = (torch.as_tensor(i) for i in block.bias_index())
        shift_mask = torch.as_tensor(block.window_bias())[:, None]  # (nW, 1, Nw, Nw)

    def call(x: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        if w:  # (B * nW, Nw, C) windows of the rolled map
            t = torch.roll(x, shifts=(-shift, -shift), dims=(1, 2))
            t = t.view(b, height // w, w, width // w, w, channels)
            t = t.permute(0, 1, 3, 2, 4, 5).reshape(-1, w * w, channels)
        else:
            t = x.reshape(b, n, channels)
        items, tokens = t.shape[0], t.shape[1]

        def project(name: str) -> torch.Tensor:  # (B', N', C) -> (B', heads, N', d)
            y = t @ params[f"{name}_kernel"] + params[f"{name}_bias"]
            return y.reshape(items, tokens, heads, d).transpose(1, 2)

        q, k, v = project("query"), project("key"), project("value")
        if rope is not None:
            q, k = _rotate(q, tables, rope.layout), _rotate(k, tables, rope.layout)
        if w:
            bias = shift_mask.repeat(b, 1, 1, 1)  # (B * nW, 1, Nw, Nw)
            if block.bias_table is not None:
                table = params[block.bias_table][rows, cols].permute(2, 0, 1)
                bias = bias + table  # (B * nW, heads, Nw, Nw)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=scale)
            out = out.transpose(1, 2).reshape(b, height // w, width // w, w, w, -1)
            out = out.permute(0, 1, 3, 2, 4, 5).reshape(b, height, width, channels)
            return torch.roll(out, shifts=(shift, shift), dims=(1, 2))
        bias = None
        if relative:
            q5 = q.reshape(b, heads, height, width, d)
            logits_h = torch.einsum("bhyxd,yvd->bhyxv", q5, params[name_h][index_h])
            logits_w = torch.einsum("bhyxd,xud->bhyxu", q5, params[name_w][index_w])
            bias = (logits_h[..., :, None] + logits_w[..., None, :]).reshape(
                b, heads, n, n
            )
            bias = bias * scale
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=scale)
        return out.transpose(1, 2).reshape(b, height, width, channels)

    return call, list(params.values())
