"""Native PyTorch reference of the 2-D multi-head self-attention block.

Written the way a PyTorch user would write the block by hand, with no Keras:
`nn.Linear` projections and `F.scaled_dot_product_attention` (SDPA) for the
attention itself. It serves as an independent oracle for the Keras layer on the
torch backend and, later, as the native baseline of the benchmarks.

Semantics (the same as `mhsa_core.reference.mhsa_forward`):

    x (B, H, W, C) "channels_last" or (B, C, H, W) "channels_first"
    t = x as tokens (B, N, C), N = H*W, row-major over (H, W)
    t = t + relu(t @ Wp + bp)                   # position_encoding "conv" only
    q, k, v = act(t @ Wq + bq), act(t @ Wk + bk), act(t @ Wv + bv)
    head i = channels [i*d, (i+1)*d); q, k: d = key_dim, v: d = C // num_heads
    out_h = softmax(scale * q_h k_h^T, keys not masked) @ v_h
    out = heads concatenated in order, back in the layout of x

`attention_mask` is bool (B, H, W), True = the key may be attended to. A batch
item whose keys are all masked gets an all-zero output (never NaN).

Weight layout. The canonical weight dict (NumPy arrays, see
`mhsa_core.reference`) stores kernels as (in, out):

    position_kernel (C, C)          position_bias (C,)       # only for "conv"
    query_kernel    (C, heads*kd)   query_bias (heads*kd,)
    key_kernel      (C, heads*kd)   key_bias   (heads*kd,)
    value_kernel    (C, C)          value_bias (C,)

`nn.Linear.weight` is (out, in), so `load_weight_dict` stores `kernel.T` and
`value_and_grad` returns the transposed gradient, in the canonical layout again.
Biases are absent (or None) when `use_bias=False`.

SDPA notes:
- `scale` is passed explicitly. SDPA's own `scale=None` default would be
  1/sqrt(key_dim), while this block's default is 1.0; `scale=None` here means
  1/sqrt(key_dim) and is converted to a float before the call.
- A bool `attn_mask` means True = take part in attention, as here.
- A query row whose keys are all masked: older PyTorch releases return NaN
  there (0/0 in the softmax). torch 2.13 on CPU returns zeros (math and flash
  kernels alike), but that is kernel- and version-dependent behaviour. So those
  rows are never handed to SDPA fully masked: their mask is replaced by all-True
  (a finite, unused result) and the output is then zeroed with `torch.where`,
  which also gives those items exactly zero gradients.
- The CPU flash kernel needs key_dim == value head dim; otherwise SDPA falls back
  to its math kernel. Both give the same result up to rounding.

Module-level helpers `forward` and `value_and_grad` take and return NumPy
arrays, for the tests and the cross-backend runner. This file imports only
PyTorch and NumPy.
"""

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["NativeMHSA2D", "forward", "value_and_grad"]

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


def _torch_dtype(dtype):
    if isinstance(dtype, torch.dtype):
        return dtype
    name = dtype if dtype == "bfloat16" else np.dtype(dtype).name
    return _TORCH_DTYPES[name]


class NativeMHSA2D(nn.Module):
    """The 2-D multi-head self-attention block as a `torch.nn.Module`.

    Args:
        channels: C, the channels of the input (and of the output).
        num_heads: number of heads; must divide `channels`.
        key_dim: query/key width per head; default `channels // num_heads`.
        activation: applied to q, k and v: "relu" (default), None/"linear",
            "gelu", "sigmoid", "tanh", "silu"/"swish".
        position_encoding: "conv" (t + relu(t @ Wp + bp)) or "none".
        scale: logit multiplier; None means 1/sqrt(key_dim). Default 1.0.
        use_bias: whether the projections have biases.
        data_format: "channels_last" (B, H, W, C) or "channels_first" (B, C, H, W).

    The parameters are created by `nn.Linear` (PyTorch's default init); load
    the canonical weights with `load_weight_dict`. The dtype follows `.to(dtype)`.
    """

    def __init__(self, channels, num_heads=1, key_dim=None, activation="relu",
                 position_encoding="conv", scale=1.0, use_bias=True,
                 data_format="channels_last"):
        super().__init__()
        if channels % num_heads:
            raise ValueError(f"num_heads={num_heads} must divide channels={channels}")
        if position_encoding not in ("conv", "none"):
            raise ValueError(f"Unknown position_encoding={position_encoding!r}")
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
        self.use_bias = use_bias
        self.data_format = data_format

        qk = num_heads * self.key_dim
        # nn.Linear(in, out): weight (out, in), bias (out,).
        self.position = (nn.Linear(channels, channels, bias=use_bias)
                         if position_encoding == "conv" else None)
        self.query = nn.Linear(channels, qk, bias=use_bias)
        self.key = nn.Linear(channels, qk, bias=use_bias)
        self.value = nn.Linear(channels, channels, bias=use_bias)

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
        expected = set()
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
        return self

    def weight_grad_dict(self):
        """Gradients of the parameters as a canonical dict of NumPy arrays."""
        grads = {}
        for name, linear in self._linears():
            grads[f"{name}_kernel"] = linear.weight.grad.detach().T.cpu().numpy()
            if linear.bias is not None:
                grads[f"{name}_bias"] = linear.bias.grad.detach().cpu().numpy()
        return grads

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

        # (B, N, heads*d) -> (B, N, heads, d) -> (B, heads, N, d): head i is
        # the contiguous channel slice [i*d, (i+1)*d).
        q = act(self.query(t)).view(batch, n, heads, kd).transpose(1, 2)
        k = act(self.key(t)).view(batch, n, heads, kd).transpose(1, 2)
        v = act(self.value(t)).view(batch, n, heads, dv).transpose(1, 2)

        if attention_mask is None:
            out = F.scaled_dot_product_attention(q, k, v, scale=self.scale)
        else:
            keep = torch.as_tensor(attention_mask, device=x.device)
            keep = keep.to(torch.bool).reshape(batch, n)  # (B, N), per key
            has_key = keep.any(dim=1)  # (B,)
            # Fully masked items attend to everything (finite, discarded below).
            safe = keep | ~has_key[:, None]  # (B, N)
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=safe[:, None, None, :], scale=self.scale)
            out = torch.where(has_key[:, None, None, None], out, out.new_zeros(()))
        # out: (B, heads, N, dv) -> (B, N, heads, dv) -> (B, H, W, C)
        out = out.transpose(1, 2).reshape(batch, height, width, channels)
        if self.data_format == "channels_first":
            out = out.permute(0, 3, 1, 2)  # -> (B, C, H, W)
        return out


def _build(x, weights, dtype, config):
    """A module of the right config and dtype, with `weights` loaded."""
    config = dict(config)
    data_format = config.get("data_format", "channels_last")
    channels = x.shape[-1] if data_format == "channels_last" else x.shape[1]
    if config.get("use_bias") is None:
        config["use_bias"] = any(v is not None for k, v in weights.items()
                                 if k.endswith("_bias"))
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
    has biases.
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
