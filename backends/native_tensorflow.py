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
    t = t + P                                   # "sinusoidal" only
    q, k, v = act(t @ Wq + bq), act(t @ Wk + bk), act(t @ Wv + bv)
    head i = channels [i*d, (i+1)*d); q, k: d = key_dim, v: d = C // num_heads
    out_h = softmax(scale * (q_h k_h^T + pos_h), keys not masked) @ v_h
            (scale * q_h k_h^T + pos_h without scale_position_logits;
             pos_h = 0 unless "relative" or "absolute")
    out = heads concatenated in order, back in the layout of x

Position encodings, with (y, x) a token's row and column, i a query, j a key:

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
  reference size. tests/test_native.py checks it against `tf.image.resize`.
- "sinusoidal": P(y, x) = [sin(y w), cos(y w), sin(x w), cos(x w)],
  w_k = 1 / 10000^(k / D), D = C / 4 (the frequencies in float64, then cast;
  angles and sin/cos in the module's dtype).

`attention_mask` is bool (B, H, W), True = the key may be attended to. A batch
item whose keys are all masked gets an all-zero output (never NaN).

Weight layout. The variables use the canonical layout itself (kernels (in, out),
what `tf.einsum("bnc,cd->bnd")` wants), under the canonical names:

    position_kernel (C, C)          position_bias (C,)       # only for "conv"
    query_kernel    (C, heads*kd)   query_bias (heads*kd,)
    key_kernel      (C, heads*kd)   key_bias   (heads*kd,)
    value_kernel    (C, C)          value_bias (C,)
    relative_height (2*Hr - 1, kd)  relative_width (2*Wr - 1, kd)   # "relative" only
    absolute_height (Hr, kd)        absolute_width (Wr, kd)         # "absolute" only

Biases are absent when `use_bias=False`.

Masking: masked logits are replaced by -inf with `tf.where` (a constant, so no
gradient flows to it) and `tf.nn.softmax` then gives them exactly 0. A row whose
keys were all -inf would give exp(-inf - -inf) = NaN, so items with no valid key
attend to every key instead (finite, unused) and their output is zeroed with
`tf.where`, which also gives them zero gradients.

Module-level helpers `forward` and `value_and_grad` take and return NumPy
arrays, for the tests and the cross-backend runner; so do `resize_table` and
`sinusoidal_embedding`, the position-encoding pieces on their own. This file
imports only TensorFlow and NumPy.
"""

import math

import numpy as np
import tensorflow as tf

__all__ = ["NativeMHSA2D", "forward", "value_and_grad", "resize_table", "sinusoidal_embedding"]


def _gelu(x):
    """Exact (erf) GELU, as the reference: x/2 * erfc(-x / sqrt(2)).

    Not `tf.nn.gelu(approximate=False)`: it builds its 1/sqrt(2) with
    `cast(0.7071067811865476, dtype)`, a float32 constant cast to float64, so in
    float64 it is only float32-accurate (measured: 5e-9 absolute, 4.5e-8
    relative error on [-5, 5], TF 2.21).
    """
    return 0.5 * x * tf.math.erfc(-x * tf.constant(1.0 / math.sqrt(2.0), x.dtype))


_ACTIVATIONS = {
    None: lambda x: x,
    "linear": lambda x: x,
    "relu": tf.nn.relu,
    "gelu": _gelu,
    "sigmoid": tf.math.sigmoid,
    "tanh": tf.math.tanh,
    "silu": tf.nn.silu,
    "swish": tf.nn.silu,
}

_POSITION_ENCODINGS = ("conv", "none", "relative", "absolute", "sinusoidal")
# Encodings with learned per-axis tables: name prefix, rows for a size n.
_TABLES = {
    "relative": ("relative", lambda n: 2 * n - 1),
    "absolute": ("absolute", lambda n: n),
}


def _resize(table, length):
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
    l = tf.cast(tf.range(tf.shape(table)[0]), dtype)
    weights = tf.nn.relu(1.0 - tf.abs(s[:, None] - l[None, :]))  # (length, L)
    return tf.linalg.matmul(weights, table)


def _index_matrix(length, relative):
    """(L, L) int32 table rows for (query a, key b): b - a + L - 1, or b."""
    b = tf.range(length)[None, :]
    if relative:
        return b - tf.range(length)[:, None] + length - 1
    return tf.tile(b, (length, 1))


def _sincos(height, width, channels, dtype):
    """The fixed 2-D sine-cosine embedding (H*W, C), row-major over (H, W)."""
    d = channels // 4
    k = tf.range(d, dtype=tf.float64)
    omega = tf.cast(1.0 / tf.pow(tf.constant(10000.0, tf.float64), k / d), dtype)  # (d,)
    ang_y = tf.cast(tf.range(height), dtype)[:, None] * omega  # (H, d)
    ang_x = tf.cast(tf.range(width), dtype)[:, None] * omega  # (W, d)
    emb_y = tf.concat([tf.sin(ang_y), tf.cos(ang_y)], axis=-1)  # (H, 2d)
    emb_x = tf.concat([tf.sin(ang_x), tf.cos(ang_x)], axis=-1)  # (W, 2d)
    emb = tf.concat([tf.tile(emb_y[:, None, :], (1, width, 1)),
                     tf.tile(emb_x[None, :, :], (height, 1, 1))], axis=-1)  # (H, W, C)
    return tf.reshape(emb, (height * width, channels))


class NativeMHSA2D(tf.Module):
    """The 2-D multi-head self-attention block as a `tf.Module`.

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
        dtype: dtype of the variables and of the computation.

    Variables start at zero; load the canonical weights with `load_weight_dict`.
    """

    def __init__(self, channels, num_heads=1, key_dim=None, activation="relu",
                 position_encoding="conv", scale=1.0, use_bias=True,
                 data_format="channels_last", position_size=None,
                 scale_position_logits=True, dtype="float32", name=None):
        super().__init__(name=name)
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
        if position_encoding in _TABLES:
            if (not isinstance(position_size, (tuple, list)) or len(position_size) != 2
                    or any(int(n) != n or n < 1 for n in position_size)):
                raise ValueError(f"position_encoding={position_encoding!r} needs "
                                 f"position_size=(Hr, Wr). Received: {position_size!r}")
            prefix, rows = _TABLES[position_encoding]
            for axis, n in zip(("height", "width"), position_size):
                self.weights[f"{prefix}_{axis}"] = tf.Variable(
                    tf.zeros((rows(int(n)), self.key_dim), self.compute_dtype),
                    name=f"{prefix}_{axis}")

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

    def _position_logits(self, q, height, width):
        """The position term (B, heads, N, N) of "relative"/"absolute", else None.

        q: (B, H, W, heads, kd). Row i = (y_i, x_i) is a query, column j a key.
        """
        if self.position_encoding not in _TABLES:
            return None
        prefix, rows = _TABLES[self.position_encoding]
        relative = self.position_encoding == "relative"
        table_h = _resize(self.weights[f"{prefix}_height"], rows(height))
        table_w = _resize(self.weights[f"{prefix}_width"], rows(width))
        emb_h = tf.gather(table_h, _index_matrix(height, relative))  # (H, H, kd): [y_i, y_j]
        emb_w = tf.gather(table_w, _index_matrix(width, relative))  # (W, W, kd): [x_i, x_j]
        logits_h = tf.einsum("byxhd,yvd->bhyxv", q, emb_h)  # (B, heads, H, W, H)
        logits_w = tf.einsum("byxhd,xud->bhyxu", q, emb_w)  # (B, heads, H, W, W)
        # (B, heads, H, W, H, W): [y_i, x_i, y_j, x_j] -> (B, heads, N, N)
        pos = logits_h[..., :, None] + logits_w[..., None, :]
        n = height * width
        return tf.reshape(pos, (tf.shape(q)[0], self.num_heads, n, n))

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
        elif self.position_encoding == "sinusoidal":
            t = t + _sincos(height, width, self.channels, self.compute_dtype)

        # (B, N, heads*d) -> (B, N, heads, d): head i is the slice [i*d, (i+1)*d).
        q = tf.reshape(act(self._dense(t, "query")), (batch, n, heads, kd))
        k = tf.reshape(act(self._dense(t, "key")), (batch, n, heads, kd))
        v = tf.reshape(act(self._dense(t, "value")), (batch, n, heads, dv))

        logits = tf.einsum("bqhd,bkhd->bhqk", q, k)  # (B, heads, N, N)
        scale = tf.constant(self.scale, self.compute_dtype)
        pos = self._position_logits(tf.reshape(q, (batch, height, width, heads, kd)),
                                    height, width)
        if pos is None:
            logits = logits * scale
        elif self.scale_position_logits:
            logits = (logits + pos) * scale
        else:
            logits = logits * scale + pos
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
    `weights` has biases, `position_size` to the size read off the tables'
    shapes.
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


def resize_table(table, length, dtype="float32"):
    """The native's table resize on NumPy: (L, d) -> (length, d) in `dtype`."""
    table = tf.constant(np.asarray(table), dtype=tf.as_dtype(np.dtype(dtype).name))
    return _resize(table, length).numpy()


def sinusoidal_embedding(height, width, channels, dtype="float32"):
    """The native's sine-cosine embedding on NumPy: (H*W, C) in `dtype`."""
    if channels % 4:
        raise ValueError(f"The sinusoidal embedding needs channels divisible by 4. "
                         f"Received: channels={channels}")
    return _sincos(height, width, channels, tf.as_dtype(np.dtype(dtype).name)).numpy()
