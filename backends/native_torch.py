"""Native PyTorch reference of the 2-D multi-head self-attention block.

Written the way a PyTorch user would write the block by hand, with no Keras:
`nn.Linear` projections and `F.scaled_dot_product_attention` (SDPA) for the
attention itself. It serves as an independent oracle for the Keras layer on the
torch backend and, later, as the native baseline of the benchmarks.

Semantics (the same as `mhsa_core.reference.mhsa_forward`):

    x (B, H, W, C) "channels_last" or (B, C, H, W) "channels_first"
    t = x as tokens (B, N, C), N = H*W, row-major over (H, W)
    t = t + relu(t @ Wp + bp)                   # position_encoding "conv" only
    t = t + P                                   # "sinusoidal" only
    q, k, v = act(t @ Wq + bq), act(t @ Wk + bk), act(t @ Wv + bv)
    head i = channels [i*d, (i+1)*d); q, k: d = key_dim, v: d = C // num_heads
    out_h = softmax(scale * (q_h k_h^T + pos_h), keys not masked) @ v_h
            (scale * q_h k_h^T + pos_h without scale_position_logits;
             pos_h = 0 unless "relative" or "absolute")
    out = heads concatenated in order, back in the layout of x

Position encodings, with (y, x) a token's row and column, i a query, j a key:

- "relative" (BoTNet): pos(i, j) = q_i . (R_h[y_j - y_i + H - 1]
  + R_w[x_j - x_i + W - 1]). Computed per axis with the "rel_to_abs" trick:
  q @ R^T gives (.., L, 2L - 1) logits per relative offset; padding and
  reshaping turn them into (.., L, L) logits per absolute key position (see
  `_rel_to_abs`). The height and width terms are broadcast-summed over the
  other axis.
- "absolute": pos(i, j) = q_i . (E_h[y_j] + E_w[x_j]): q @ E_h^T and q @ E_w^T,
  broadcast-summed.
- The tables are `nn.Parameter`s of the reference size (Hr, Wr)
  (`position_size`); at an input of size (H, W) they are resized along their
  rows to 2H - 1 / 2W - 1 (relative) or H / W (absolute) rows with
  `F.interpolate(mode="linear", align_corners=False)` (half-pixel centers,
  the reference's `resize_table`; the identity at the reference size).
- The position term enters SDPA as a float `attn_mask`, which SDPA adds after
  scaling: scale * pos is passed when `scale_position_logits`, pos otherwise.
- "sinusoidal": P(y, x) = [sin(y w), cos(y w), sin(x w), cos(x w)],
  w_k = exp(-k ln(10000) / D), D = C / 4 (the frequencies in float64, then
  cast; angles and sin/cos in the run's dtype).

`attention_mask` is bool (B, H, W), True = the key may be attended to. A batch
item whose keys are all masked gets an all-zero output (never NaN).

Weight layout. The canonical weight dict (NumPy arrays, see
`mhsa_core.reference`) stores kernels as (in, out):

    position_kernel (C, C)          position_bias (C,)       # only for "conv"
    query_kernel    (C, heads*kd)   query_bias (heads*kd,)
    key_kernel      (C, heads*kd)   key_bias   (heads*kd,)
    value_kernel    (C, C)          value_bias (C,)
    relative_height (2*Hr - 1, kd)  relative_width (2*Wr - 1, kd)   # "relative" only
    absolute_height (Hr, kd)        absolute_width (Wr, kd)         # "absolute" only

`nn.Linear.weight` is (out, in), so `load_weight_dict` stores `kernel.T` and
`value_and_grad` returns the transposed gradient, in the canonical layout again.
Tables are stored as they are. Biases are absent (or None) when
`use_bias=False`.

SDPA notes:
- `scale` is passed explicitly. SDPA's own `scale=None` default would be
  1/sqrt(key_dim), while this block's default is 1.0; `scale=None` here means
  1/sqrt(key_dim) and is converted to a float before the call.
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

Module-level helpers `forward` and `value_and_grad` take and return NumPy
arrays, for the tests and the cross-backend runner; so do `resize_table` and
`sinusoidal_embedding`, the position-encoding pieces on their own. This file
imports only PyTorch and NumPy.
"""

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["NativeMHSA2D", "forward", "value_and_grad", "resize_table", "sinusoidal_embedding"]

_ACTIVATIONS = {
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

_POSITION_ENCODINGS = ("conv", "none", "relative", "absolute", "sinusoidal")
# Encodings with learned per-axis tables: name prefix, rows for a size n.
_TABLES = {
    "relative": ("relative", lambda n: 2 * n - 1),
    "absolute": ("absolute", lambda n: n),
}


def _torch_dtype(dtype):
    if isinstance(dtype, torch.dtype):
        return dtype
    name = dtype if dtype == "bfloat16" else np.dtype(dtype).name
    return _TORCH_DTYPES[name]


def _resize(table, length):
    """table (L, d) -> (length, d), linear along the rows, half-pixel centers."""
    # F.interpolate resizes the last axis of (N, C, L): the rows go last.
    resized = F.interpolate(table.t()[None], size=length, mode="linear",
                            align_corners=False)
    return resized[0].t()


def _rel_to_abs(rel):
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
    return flat.reshape(*lead, length + 1, 2 * length - 1)[..., :length, length - 1:]


def _sincos(height, width, channels, dtype, device):
    """The fixed 2-D sine-cosine embedding (H*W, C), row-major over (H, W)."""
    d = channels // 4
    k = torch.arange(d, dtype=torch.float64, device=device)
    omega = torch.exp(k * (-math.log(10000.0) / d)).to(dtype)  # (d,)
    ang_y = torch.arange(height, dtype=dtype, device=device)[:, None] * omega  # (H, d)
    ang_x = torch.arange(width, dtype=dtype, device=device)[:, None] * omega  # (W, d)
    emb_y = torch.cat([ang_y.sin(), ang_y.cos()], dim=-1)  # (H, 2d)
    emb_x = torch.cat([ang_x.sin(), ang_x.cos()], dim=-1)  # (W, 2d)
    emb = torch.cat([emb_y[:, None, :].expand(height, width, 2 * d),
                     emb_x[None, :, :].expand(height, width, 2 * d)], dim=-1)
    return emb.reshape(height * width, channels)


class NativeMHSA2D(nn.Module):
    """The 2-D multi-head self-attention block as a `torch.nn.Module`.

    Args:
        channels: C, the channels of the input (and of the output).
        num_heads: number of heads; must divide `channels`.
        key_dim: query/key width per head; default `channels // num_heads`.
        activation: applied to q, k and v: "relu" (default), None/"linear",
            "gelu", "sigmoid", "tanh", "silu"/"swish".
        position_encoding: "conv" (t + relu(t @ Wp + bp)), "none", "relative",
            "absolute" or "sinusoidal" (see the module docstring).
        scale: logit multiplier; None means 1/sqrt(key_dim). Default 1.0.
        use_bias: whether the projections have biases.
        data_format: "channels_last" (B, H, W, C) or "channels_first" (B, C, H, W).
        position_size: (Hr, Wr), the reference size of the learned tables;
            required by "relative" and "absolute", ignored otherwise.
        scale_position_logits: whether `scale` multiplies the position term of
            "relative"/"absolute" too.

    The parameters are created by `nn.Linear` (PyTorch's default init) and the
    tables N(0, 1/key_dim); load the canonical weights with `load_weight_dict`.
    The dtype follows `.to(dtype)`.
    """

    def __init__(self, channels, num_heads=1, key_dim=None, activation="relu",
                 position_encoding="conv", scale=1.0, use_bias=True,
                 data_format="channels_last", position_size=None,
                 scale_position_logits=True):
        super().__init__()
        if channels % num_heads:
            raise ValueError(f"num_heads={num_heads} must divide channels={channels}")
        if position_encoding not in _POSITION_ENCODINGS:
            raise ValueError(f"Unknown position_encoding={position_encoding!r}")
        if position_encoding == "sinusoidal" and channels % 4:
            raise ValueError(f"The sinusoidal embedding needs channels divisible by 4. "
                             f"Received: channels={channels}")
        if data_format not in ("channels_last", "channels_first"):
            raise ValueError(f"Unknown data_format={data_format!r}")
        if activation not in _ACTIVATIONS:
            raise ValueError(f"Unknown activation={activation!r}")
        self.channels = channels
        self.num_heads = num_heads
        self.head_dim = channels // num_heads  # value width per head
        self.key_dim = self.head_dim if key_dim is None else key_dim
        self.activation = activation
        self.position_encoding = position_encoding
        self.scale = 1.0 / math.sqrt(self.key_dim) if scale is None else float(scale)
        self.scale_position_logits = bool(scale_position_logits)
        self.use_bias = use_bias
        self.data_format = data_format

        qk = num_heads * self.key_dim
        # nn.Linear(in, out): weight (out, in), bias (out,).
        self.position = (nn.Linear(channels, channels, bias=use_bias)
                         if position_encoding == "conv" else None)
        self.query = nn.Linear(channels, qk, bias=use_bias)
        self.key = nn.Linear(channels, qk, bias=use_bias)
        self.value = nn.Linear(channels, channels, bias=use_bias)

        # Learned tables: canonical name -> nn.Parameter (rows, key_dim).
        self.tables = nn.ParameterDict()
        if position_encoding in _TABLES:
            if (not isinstance(position_size, (tuple, list)) or len(position_size) != 2
                    or any(int(n) != n or n < 1 for n in position_size)):
                raise ValueError(f"position_encoding={position_encoding!r} needs "
                                 f"position_size=(Hr, Wr). Received: {position_size!r}")
            prefix, rows = _TABLES[position_encoding]
            for axis, n in zip(("height", "width"), position_size):
                self.tables[f"{prefix}_{axis}"] = nn.Parameter(
                    torch.randn(rows(int(n)), self.key_dim) / math.sqrt(self.key_dim))

    def _linears(self):
        """(canonical name prefix, nn.Linear) pairs, in creation order."""
        names = ["query", "key", "value"]
        if self.position is not None:
            names.insert(0, "position")
        return [(name, getattr(self, name)) for name in names]

    def load_weight_dict(self, weights):
        """Copy a canonical weight dict (NumPy arrays, any float dtype) in.

        Values are cast to the dtype of the module's parameters. Missing,
        unexpected or wrongly shaped entries raise ValueError.
        """
        given = {k for k, v in weights.items() if v is not None}
        expected = set(self.tables)
        for name, linear in self._linears():
            expected.add(f"{name}_kernel")
            if linear.bias is not None:
                expected.add(f"{name}_bias")
        if given != expected:
            raise ValueError(f"Weight dict mismatch: unexpected {sorted(given - expected)}, "
                             f"missing {sorted(expected - given)}")
        with torch.no_grad():
            for name, linear in self._linears():
                kernel = np.asarray(weights[f"{name}_kernel"])
                if kernel.shape != (linear.in_features, linear.out_features):
                    raise ValueError(
                        f"{name}_kernel has shape {kernel.shape}, expected "
                        f"{(linear.in_features, linear.out_features)}")
                # Canonical (in, out) -> nn.Linear (out, in).
                linear.weight.copy_(torch.from_numpy(np.ascontiguousarray(kernel.T)))
                if linear.bias is not None:
                    bias = np.asarray(weights[f"{name}_bias"])
                    if bias.shape != (linear.out_features,):
                        raise ValueError(f"{name}_bias has shape {bias.shape}, "
                                         f"expected {(linear.out_features,)}")
                    linear.bias.copy_(torch.from_numpy(np.ascontiguousarray(bias)))
            for name, table in self.tables.items():
                value = np.asarray(weights[name])
                if value.shape != tuple(table.shape):
                    raise ValueError(f"{name} has shape {value.shape}, "
                                     f"expected {tuple(table.shape)}")
                table.copy_(torch.from_numpy(np.ascontiguousarray(value)))
        return self

    def weight_grad_dict(self):
        """Gradients of the parameters as a canonical dict of NumPy arrays."""
        grads = {}
        for name, linear in self._linears():
            grads[f"{name}_kernel"] = linear.weight.grad.detach().T.cpu().numpy()
            if linear.bias is not None:
                grads[f"{name}_bias"] = linear.bias.grad.detach().cpu().numpy()
        for name, table in self.tables.items():
            grads[name] = table.grad.detach().cpu().numpy()
        return grads

    def _position_logits(self, q, height, width):
        """The position term (B, heads, N, N) of "relative"/"absolute", else None.

        q: (B, heads, N, kd). Row i = (y_i, x_i) is a query, column j a key.
        """
        if self.position_encoding not in _TABLES:
            return None
        prefix, rows = _TABLES[self.position_encoding]
        table_h = _resize(self.tables[f"{prefix}_height"], rows(height))
        table_w = _resize(self.tables[f"{prefix}_width"], rows(width))
        batch, heads, n, kd = q.shape
        q = q.reshape(batch, heads, height, width, kd)
        if self.position_encoding == "relative":
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

    def forward(self, x, attention_mask=None):
        """x: (B, H, W, C) or (B, C, H, W); attention_mask: bool (B, H, W) or None."""
        act = _ACTIVATIONS[self.activation]
        if self.data_format == "channels_first":
            x = x.permute(0, 2, 3, 1)  # (B, C, H, W) -> (B, H, W, C)
        batch, height, width, channels = x.shape
        n = height * width
        heads, kd, dv = self.num_heads, self.key_dim, self.head_dim

        t = x.reshape(batch, n, channels)  # (B, N, C), row-major over (H, W)
        if self.position is not None:
            t = t + F.relu(self.position(t))  # (B, N, C)
        elif self.position_encoding == "sinusoidal":
            t = t + _sincos(height, width, channels, t.dtype, t.device)

        # (B, N, heads*d) -> (B, N, heads, d) -> (B, heads, N, d): head i is
        # the contiguous channel slice [i*d, (i+1)*d).
        q = act(self.query(t)).view(batch, n, heads, kd).transpose(1, 2)
        k = act(self.key(t)).view(batch, n, heads, kd).transpose(1, 2)
        v = act(self.value(t)).view(batch, n, heads, dv).transpose(1, 2)

        # Float mask added by SDPA to the scaled logits, or None.
        bias = self._position_logits(q, height, width)
        if bias is not None and self.scale_position_logits:
            bias = self.scale * bias
        if attention_mask is None:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=self.scale)
        else:
            keep = torch.as_tensor(attention_mask, device=x.device)
            keep = keep.to(torch.bool).reshape(batch, n)  # (B, N), per key
            has_key = keep.any(dim=1)  # (B,)
            # Fully masked items attend to everything (finite, discarded below).
            safe = keep | ~has_key[:, None]  # (B, N)
            if bias is None:
                mask = safe[:, None, None, :]  # bool: True = attend
            else:  # float: the position term, -inf at the masked keys
                mask = bias.masked_fill(~safe[:, None, None, :], float("-inf"))
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scale)
            out = torch.where(has_key[:, None, None, None], out, out.new_zeros(()))
        # out: (B, heads, N, dv) -> (B, N, heads, dv) -> (B, H, W, C)
        out = out.transpose(1, 2).reshape(batch, height, width, channels)
        if self.data_format == "channels_first":
            out = out.permute(0, 3, 1, 2)  # -> (B, C, H, W)
        return out


def _position_size(weights, position_encoding):
    """(Hr, Wr) read off the learned tables in `weights`, or None.

    Raises ValueError when a table is missing or its row count fits no size.
    """
    if position_encoding not in _TABLES:
        return None
    prefix, _ = _TABLES[position_encoding]
    size = []
    for axis in ("height", "width"):
        table = weights.get(f"{prefix}_{axis}")
        if table is None:
            raise ValueError(f"Weight dict mismatch: missing {prefix}_{axis}")
        rows = np.shape(table)[0] if np.ndim(table) else 0
        if prefix == "relative":
            if rows % 2 == 0:
                raise ValueError(f"{prefix}_{axis} has {rows} rows, expected an odd "
                                 "number (2 * n - 1)")
            rows = (rows + 1) // 2
        if rows < 1:
            raise ValueError(f"{prefix}_{axis} has shape {np.shape(table)}")
        size.append(rows)
    return tuple(size)


def _build(x, weights, dtype, config):
    """A module of the right config and dtype, with `weights` loaded."""
    config = dict(config)
    data_format = config.get("data_format", "channels_last")
    channels = x.shape[-1] if data_format == "channels_last" else x.shape[1]
    if config.get("use_bias") is None:
        config["use_bias"] = any(v is not None for k, v in weights.items()
                                 if k.endswith("_bias"))
    if config.get("position_size") is None:
        config["position_size"] = _position_size(
            weights, config.get("position_encoding", "conv"))
    module = NativeMHSA2D(channels, **config).to(_torch_dtype(dtype))
    return module.load_weight_dict(weights)


def _mask_tensor(attention_mask):
    if attention_mask is None:
        return None
    return torch.from_numpy(np.asarray(attention_mask, dtype=bool))


def forward(x, weights, attention_mask=None, dtype="float32", **config):
    """Run the block on NumPy inputs; returns the output as a NumPy array.

    `config` holds the constructor arguments of `NativeMHSA2D` except
    `channels` (read from `x`); `use_bias` defaults to whether `weights`
    has biases, `position_size` to the size read off the tables' shapes.
    """
    x = np.asarray(x)
    module = _build(x, weights, dtype, config)
    xt = torch.from_numpy(np.ascontiguousarray(x)).to(_torch_dtype(dtype))
    with torch.no_grad():
        out = module(xt, _mask_tensor(attention_mask))
    return out.numpy()


def value_and_grad(x, weights, loss_weights, attention_mask=None, dtype="float32",
                   **config):
    """Loss `sum(out * loss_weights)` and its gradients, as NumPy.

    Returns `(loss, grad_x, grad_weights)`: a NumPy scalar, an array shaped
    like `x`, and a canonical weight dict (kernels (in, out)) of gradients.
    """
    x = np.asarray(x)
    tdtype = _torch_dtype(dtype)
    module = _build(x, weights, dtype, config)
    xt = torch.from_numpy(np.ascontiguousarray(x)).to(tdtype).requires_grad_(True)
    lw = torch.from_numpy(np.ascontiguousarray(loss_weights)).to(tdtype)
    out = module(xt, _mask_tensor(attention_mask))
    loss = torch.sum(out * lw)
    loss.backward()
    return (loss.detach().numpy()[()], xt.grad.numpy(), module.weight_grad_dict())


def resize_table(table, length, dtype="float32"):
    """The native's table resize on NumPy: (L, d) -> (length, d) in `dtype`."""
    table = torch.from_numpy(np.ascontiguousarray(table)).to(_torch_dtype(dtype))
    with torch.no_grad():
        return _resize(table, length).numpy()


def sinusoidal_embedding(height, width, channels, dtype="float32"):
    """The native's sine-cosine embedding on NumPy: (H*W, C) in `dtype`."""
    if channels % 4:
        raise ValueError(f"The sinusoidal embedding needs channels divisible by 4. "
                         f"Received: channels={channels}")
    return _sincos(height, width, channels, _torch_dtype(dtype), "cpu").numpy()
