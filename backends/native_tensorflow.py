"""Native TensorFlow reference of the 2-D multi-head self-attention block.

Written the way a TensorFlow user would write the block by hand, with no Keras:
a `tf.Module` holding `tf.Variable`s, `tf.einsum` projections and logits,
`tf.where` + `tf.nn.softmax` for the masked softmax, and `tf.GradientTape` for
gradients. It runs eagerly; `__call__` has no Python control flow on tensor
values, so it can be wrapped in `tf.function` for the benchmarks. It serves as an
independent oracle for the Keras layer on the tensorflow backend and, later, as
the native baseline of the benchmarks.

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

Weight layout. The variables use the canonical layout itself (kernels (in, out),
what `tf.einsum("bnc,cd->bnd")` wants), under the canonical names:

    position_kernel (C, C)          position_bias (C,)       # only for "conv"
    query_kernel    (C, heads*kd)   query_bias (heads*kd,)
    key_kernel      (C, heads*kd)   key_bias   (heads*kd,)
    value_kernel    (C, C)          value_bias (C,)

Biases are absent when `use_bias=False`.

Masking: masked logits are replaced by -inf with `tf.where` (a constant, so no
gradient flows to it) and `tf.nn.softmax` then gives them exactly 0. A row whose
keys were all -inf would give exp(-inf - -inf) = NaN, so items with no valid key
attend to every key instead (finite, unused) and their output is zeroed with
`tf.where`, which also gives them zero gradients.

Module-level helpers `forward` and `value_and_grad` take and return NumPy
arrays, for the tests and the cross-backend runner. This file imports only
TensorFlow and NumPy.
"""

import math

import numpy as np
import tensorflow as tf

__all__ = ["NativeMHSA2D", "forward", "value_and_grad"]

_ACTIVATIONS = {
    None: lambda x: x,
    "linear": lambda x: x,
    "relu": tf.nn.relu,
    "gelu": lambda x: tf.nn.gelu(x, approximate=False),  # exact, as the reference
    "sigmoid": tf.math.sigmoid,
    "tanh": tf.math.tanh,
    "silu": tf.nn.silu,
    "swish": tf.nn.silu,
}


class NativeMHSA2D(tf.Module):
    """The 2-D multi-head self-attention block as a `tf.Module`.

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
        dtype: dtype of the variables and of the computation.

    Variables start at zero; load the canonical weights with `load_weight_dict`.
    """

    def __init__(self, channels, num_heads=1, key_dim=None, activation="relu",
                 position_encoding="conv", scale=1.0, use_bias=True,
                 data_format="channels_last", dtype="float32", name=None):
        super().__init__(name=name)
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
        self.compute_dtype = tf.as_dtype(np.dtype(dtype).name)

        qk = num_heads * self.key_dim
        widths = {"query": qk, "key": qk, "value": channels}
        if position_encoding == "conv":
            widths = {"position": channels, **widths}
        # name -> tf.Variable, canonical names and shapes, in creation order.
        self.weights = {}
        for prefix, width in widths.items():
            self.weights[f"{prefix}_kernel"] = tf.Variable(
                tf.zeros((channels, width), self.compute_dtype), name=f"{prefix}_kernel")
            if use_bias:
                self.weights[f"{prefix}_bias"] = tf.Variable(
                    tf.zeros((width,), self.compute_dtype), name=f"{prefix}_bias")

    def load_weight_dict(self, weights):
        """Assign a canonical weight dict (NumPy arrays, any float dtype).

        Values are cast to the module's dtype. Missing, unexpected or wrongly
        shaped entries raise ValueError.
        """
        given = {k for k, v in weights.items() if v is not None}
        if given != set(self.weights):
            raise ValueError(f"Weight dict mismatch: unexpected "
                             f"{sorted(given - set(self.weights))}, missing "
                             f"{sorted(set(self.weights) - given)}")
        for name, variable in self.weights.items():
            value = np.asarray(weights[name])
            if value.shape != tuple(variable.shape):
                raise ValueError(f"{name} has shape {value.shape}, "
                                 f"expected {tuple(variable.shape)}")
            variable.assign(tf.cast(value, self.compute_dtype))
        return self

    def _dense(self, t, prefix):
        """t (B, N, C_in) @ kernel (C_in, C_out) [+ bias (C_out,)] -> (B, N, C_out)."""
        y = tf.einsum("bnc,cd->bnd", t, self.weights[f"{prefix}_kernel"])
        if self.use_bias:
            y = y + self.weights[f"{prefix}_bias"]
        return y

    def __call__(self, x, attention_mask=None):
        """x: (B, H, W, C) or (B, C, H, W); attention_mask: bool (B, H, W) or None."""
        act = _ACTIVATIONS[self.activation]
        x = tf.convert_to_tensor(x, self.compute_dtype)
        if self.data_format == "channels_first":
            x = tf.transpose(x, (0, 2, 3, 1))  # (B, C, H, W) -> (B, H, W, C)
        shape = tf.shape(x)
        batch, height, width = shape[0], shape[1], shape[2]
        n = height * width
        heads, kd, dv = self.num_heads, self.key_dim, self.head_dim

        t = tf.reshape(x, (batch, n, self.channels))  # (B, N, C), row-major over (H, W)
        if self.position_encoding == "conv":
            t = t + tf.nn.relu(self._dense(t, "position"))  # (B, N, C)

        # (B, N, heads*d) -> (B, N, heads, d): head i is the slice [i*d, (i+1)*d).
        q = tf.reshape(act(self._dense(t, "query")), (batch, n, heads, kd))
        k = tf.reshape(act(self._dense(t, "key")), (batch, n, heads, kd))
        v = tf.reshape(act(self._dense(t, "value")), (batch, n, heads, dv))

        logits = tf.einsum("bqhd,bkhd->bhqk", q, k)  # (B, heads, N, N)
        logits = logits * tf.constant(self.scale, self.compute_dtype)
        if attention_mask is None:
            probs = tf.nn.softmax(logits, axis=-1)
            out = tf.einsum("bhqk,bkhd->bqhd", probs, v)  # (B, N, heads, dv)
        else:
            keep = tf.reshape(tf.cast(attention_mask, tf.bool), (batch, n))  # (B, N)
            has_key = tf.reduce_any(keep, axis=1)  # (B,)
            # Fully masked items attend to everything (finite, discarded below).
            safe = tf.logical_or(keep, tf.logical_not(has_key)[:, None])  # (B, N)
            minus_inf = tf.constant(-np.inf, self.compute_dtype)
            logits = tf.where(safe[:, None, None, :], logits, minus_inf)
            probs = tf.nn.softmax(logits, axis=-1)
            out = tf.einsum("bhqk,bkhd->bqhd", probs, v)  # (B, N, heads, dv)
            out = tf.where(has_key[:, None, None, None], out, tf.zeros_like(out))

        out = tf.reshape(out, (batch, height, width, self.channels))  # heads concatenated
        if self.data_format == "channels_first":
            out = tf.transpose(out, (0, 3, 1, 2))  # -> (B, C, H, W)
        return out


def _build(x, weights, dtype, config):
    """A module of the right config and dtype, with `weights` loaded."""
    config = dict(config)
    data_format = config.get("data_format", "channels_last")
    channels = x.shape[-1] if data_format == "channels_last" else x.shape[1]
    if config.get("use_bias") is None:
        config["use_bias"] = any(v is not None for k, v in weights.items()
                                 if k.endswith("_bias"))
    module = NativeMHSA2D(channels, dtype=dtype, **config)
    return module.load_weight_dict(weights)


def _mask_tensor(attention_mask):
    if attention_mask is None:
        return None
    return tf.convert_to_tensor(np.asarray(attention_mask, dtype=bool))


def forward(x, weights, attention_mask=None, dtype="float32", **config):
    """Run the block on NumPy inputs; returns the output as a NumPy array.

    `config` holds the constructor arguments of `NativeMHSA2D` except
    `channels` (read from `x`) and `dtype`; `use_bias` defaults to whether
    `weights` has biases.
    """
    x = np.asarray(x)
    module = _build(x, weights, dtype, config)
    return module(tf.cast(x, module.compute_dtype), _mask_tensor(attention_mask)).numpy()


def value_and_grad(x, weights, loss_weights, attention_mask=None, dtype="float32",
                   **config):
    """Loss `sum(out * loss_weights)` and its gradients, as NumPy.

    Returns `(loss, grad_x, grad_weights)`: a NumPy scalar, an array shaped
    like `x`, and a canonical weight dict of gradients.
    """
    x = np.asarray(x)
    module = _build(x, weights, dtype, config)
    xt = tf.cast(x, module.compute_dtype)
    lw = tf.cast(np.asarray(loss_weights), module.compute_dtype)
    with tf.GradientTape() as tape:
        tape.watch(xt)
        out = module(xt, _mask_tensor(attention_mask))
        loss = tf.reduce_sum(out * lw)
    grad_x, grad_w = tape.gradient(loss, (xt, module.weights))
    return (loss.numpy()[()], grad_x.numpy(),
            {name: g.numpy() for name, g in grad_w.items()})
