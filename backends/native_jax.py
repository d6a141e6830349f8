"""Native JAX reference of the 2-D multi-head self-attention block.

Written the way a JAX user would write the block by hand, with no Keras: a pure
function `apply(params, x, attention_mask, *, config)` on a dict of arrays,
`jax.numpy` einsums, `jax.nn.softmax(..., where=mask)` for the masked softmax,
`jax.jit` with the config as static arguments, and `jax.value_and_grad` for
gradients. It serves as an independent oracle for the Keras layer on the jax
backend and, later, as the native baseline of the benchmarks.

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
- "sinusoidal": P(y, x) = [sin(y w), cos(y w), sin(x w), cos(x w)],
  w_k = 10000^(-k / D), D = C / 4 (the frequencies a float64 NumPy constant,
  cast; angles and sin/cos by `jnp` in the dtype of x).

`attention_mask` is bool (B, H, W), True = the key may be attended to. A batch
item whose keys are all masked gets an all-zero output (never NaN).

Weight layout. `params` is the canonical weight dict itself (kernels (in, out)),
with jnp arrays instead of NumPy arrays:

    position_kernel (C, C)          position_bias (C,)       # only for "conv"
    query_kernel    (C, heads*kd)   query_bias (heads*kd,)
    key_kernel      (C, heads*kd)   key_bias   (heads*kd,)
    value_kernel    (C, C)          value_bias (C,)
    relative_height (2*Hr - 1, kd)  relative_width (2*Wr - 1, kd)   # "relative" only
    absolute_height (Hr, kd)        absolute_width (Wr, kd)         # "absolute" only

Biases are absent (or None) when the block has no bias; `params_from_weight_dict`
drops None entries.

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

This file imports only JAX and NumPy.
"""

import contextlib
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["apply", "params_from_weight_dict", "forward", "value_and_grad", "resize_table",
           "sinusoidal_embedding"]

_ACTIVATIONS = {
    None: lambda x: x,
    "linear": lambda x: x,
    "relu": jax.nn.relu,
    "gelu": functools.partial(jax.nn.gelu, approximate=False),  # exact, as the reference
    "sigmoid": jax.nn.sigmoid,
    "tanh": jnp.tanh,
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
}

_POSITION_ENCODINGS = ("conv", "none", "relative", "absolute", "sinusoidal")
# Encodings with learned per-axis tables: name prefix, rows for a size n.
_TABLES = {
    "relative": ("relative", lambda n: 2 * n - 1),
    "absolute": ("absolute", lambda n: n),
}

_STATIC = ("num_heads", "key_dim", "activation", "position_encoding", "scale",
           "data_format", "scale_position_logits", "position_size")


def _dense(t, params, name):
    """t (B, N, C_in) @ kernel (C_in, C_out) [+ bias (C_out,)] -> (B, N, C_out)."""
    y = jnp.einsum("bnc,cd->bnd", t, params[f"{name}_kernel"])
    bias = params.get(f"{name}_bias")
    if bias is not None:
        y = y + bias
    return y


def _table_size(params, position_encoding):
    """(Hr, Wr) read off the tables in `params`, or None (no learned tables).

    Raises ValueError when a table is missing or its row count fits no size.
    """
    if position_encoding not in _TABLES:
        return None
    prefix, _ = _TABLES[position_encoding]
    size = []
    for axis in ("height", "width"):
        table = params.get(f"{prefix}_{axis}")
        if table is None or table.ndim != 2:
            raise ValueError(f"Weight dict mismatch: {prefix}_{axis} missing or not 2-D")
        rows = table.shape[0]
        if prefix == "relative":
            if rows % 2 == 0:
                raise ValueError(f"{prefix}_{axis} has {rows} rows, expected an odd "
                                 "number (2 * n - 1)")
            rows = (rows + 1) // 2
        if rows < 1:
            raise ValueError(f"{prefix}_{axis} has shape {table.shape}")
        size.append(rows)
    return tuple(size)


def _check_params(params, channels, num_heads, key_dim, position_encoding,
                  position_size):
    """Raise ValueError unless `params` has exactly the expected names and shapes.

    Runs at trace time (shapes are static). Biases are all present or all absent.
    `position_size` None: the learned tables' size is read off their shapes.
    """
    use_bias = params.get("query_bias") is not None
    qk = num_heads * key_dim
    widths = {"query": qk, "key": qk, "value": channels}
    if position_encoding == "conv":
        widths["position"] = channels
    expected = {}
    for prefix, width in widths.items():
        expected[f"{prefix}_kernel"] = (channels, width)
        if use_bias:
            expected[f"{prefix}_bias"] = (width,)
    if position_encoding in _TABLES:
        if position_size is None:
            position_size = _table_size(params, position_encoding)
        prefix, rows = _TABLES[position_encoding]
        for axis, n in zip(("height", "width"), position_size):
            expected[f"{prefix}_{axis}"] = (rows(n), key_dim)
    given = {k: tuple(v.shape) for k, v in params.items() if v is not None}
    if given != expected:
        raise ValueError(f"Weight dict mismatch: expected {expected}, got {given}")


def _resize(table, length):
    """table (L, d) -> (length, d), linear along the rows, half-pixel centers."""
    return jax.image.resize(table, (length, table.shape[1]), method="linear",
                            antialias=False)


def _pair_index(height, width, rows, relative, axis):
    """Static flat indices (N, N) into logits (N, rows) flattened, per (i, j).

    Entry (i, j) is i * rows + r, r the table row of the pair along `axis`
    ("height": y, "width": x): y_j - y_i + H - 1 (relative) or y_j (absolute).
    """
    ys, xs = np.divmod(np.arange(height * width), width)
    pos, length = (ys, height) if axis == "height" else (xs, width)
    r = pos[None, :] - pos[:, None] + length - 1 if relative else np.broadcast_to(
        pos[None, :], (pos.size, pos.size))
    return (np.arange(pos.size)[:, None] * rows + r).astype(np.int32)


def _position_logits(q, params, position_encoding, height, width):
    """The position term (B, heads, N, N) of "relative"/"absolute", else None.

    q: (B, N, heads, kd). Row i = (y_i, x_i) is a query, column j a key.
    """
    if position_encoding not in _TABLES:
        return None
    prefix, rows = _TABLES[position_encoding]
    relative = position_encoding == "relative"
    batch, n, heads, _ = q.shape
    pos = 0
    for axis, length in (("height", height), ("width", width)):
        table = _resize(params[f"{prefix}_{axis}"], rows(length))  # (rows, kd)
        per_row = jnp.einsum("bnhd,rd->bhnr", q, table)  # (B, heads, N, rows)
        index = _pair_index(height, width, rows(length), relative, axis)
        flat = per_row.reshape(batch, heads, n * rows(length))
        pos = pos + jnp.take(flat, index, axis=-1)  # (B, heads, N, N)
    return pos


def _sincos(height, width, channels, dtype):
    """The fixed 2-D sine-cosine embedding (H*W, C), row-major over (H, W)."""
    d = channels // 4
    omega = jnp.asarray(np.power(10000.0, -np.arange(d) / d), dtype=dtype)  # (d,)
    ang_y = jnp.arange(height, dtype=dtype)[:, None] * omega  # (H, d)
    ang_x = jnp.arange(width, dtype=dtype)[:, None] * omega  # (W, d)
    emb_y = jnp.concatenate([jnp.sin(ang_y), jnp.cos(ang_y)], axis=-1)  # (H, 2d)
    emb_x = jnp.concatenate([jnp.sin(ang_x), jnp.cos(ang_x)], axis=-1)  # (W, 2d)
    emb = jnp.concatenate([jnp.broadcast_to(emb_y[:, None, :], (height, width, 2 * d)),
                           jnp.broadcast_to(emb_x[None, :, :], (height, width, 2 * d))],
                          axis=-1)
    return emb.reshape(height * width, channels)


def apply(params, x, attention_mask=None, *, num_heads=1, key_dim=None,
          activation="relu", position_encoding="conv", scale=1.0,
          data_format="channels_last", scale_position_logits=True,
          position_size=None):
    """The block's forward pass, a pure function (jit it with the config static).

    Args:
        params: canonical weight dict of jnp arrays (see module docstring).
        x: (B, H, W, C) for "channels_last", (B, C, H, W) for "channels_first".
        attention_mask: optional bool (B, H, W); True = may be attended to.
        num_heads, key_dim, activation, position_encoding, scale, data_format,
            scale_position_logits: the block's config; `scale=None` means
            1/sqrt(key_dim).
        position_size: optional (Hr, Wr); when given, the learned tables must
            have that reference size (it is read off their shapes anyway).

    Returns:
        The output in the layout and dtype of `x`.

    Raises:
        ValueError: on an unknown config value, or when `params` does not hold
            exactly the weights of this config (checked at trace time).
    """
    if position_encoding not in _POSITION_ENCODINGS:
        raise ValueError(f"Unknown position_encoding={position_encoding!r}")
    if activation not in _ACTIVATIONS:
        raise ValueError(f"Unknown activation={activation!r}")
    if data_format == "channels_first":
        x = jnp.transpose(x, (0, 2, 3, 1))  # (B, C, H, W) -> (B, H, W, C)
    elif data_format != "channels_last":
        raise ValueError(f"Unknown data_format={data_format!r}")
    batch, height, width, channels = x.shape
    if channels % num_heads:
        raise ValueError(f"num_heads={num_heads} must divide channels={channels}")
    if position_encoding == "sinusoidal" and channels % 4:
        raise ValueError(f"The sinusoidal embedding needs channels divisible by 4. "
                         f"Received: channels={channels}")
    n = height * width
    dv = channels // num_heads  # value width per head
    kd = dv if key_dim is None else key_dim
    scale = 1.0 / math.sqrt(kd) if scale is None else float(scale)
    act = _ACTIVATIONS[activation]
    _check_params(params, channels, num_heads, kd, position_encoding, position_size)

    t = x.reshape(batch, n, channels)  # (B, N, C), row-major over (H, W)
    if position_encoding == "conv":
        t = t + jax.nn.relu(_dense(t, params, "position"))  # (B, N, C)
    elif position_encoding == "sinusoidal":
        t = t + _sincos(height, width, channels, t.dtype)

    # (B, N, heads*d) -> (B, N, heads, d): head i is the channel slice [i*d, (i+1)*d).
    q = act(_dense(t, params, "query")).reshape(batch, n, num_heads, kd)
    k = act(_dense(t, params, "key")).reshape(batch, n, num_heads, kd)
    v = act(_dense(t, params, "value")).reshape(batch, n, num_heads, dv)

    # The Python float `scale` is weakly typed: it keeps the dtype of the logits.
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k)  # (B, heads, N, N)
    pos = _position_logits(q, params, position_encoding, height, width)
    if pos is None:
        logits = scale * logits
    elif scale_position_logits:
        logits = scale * (logits + pos)
    else:
        logits = scale * logits + pos
    if attention_mask is None:
        probs = jax.nn.softmax(logits, axis=-1)
        out = jnp.einsum("bhqk,bkhd->bqhd", probs, v)  # (B, N, heads, dv)
    else:
        keep = jnp.asarray(attention_mask, dtype=bool).reshape(batch, n)  # (B, N)
        has_key = jnp.any(keep, axis=1)  # (B,)
        # Fully masked items attend to everything (finite, discarded below).
        safe = keep | ~has_key[:, None]  # (B, N)
        probs = jax.nn.softmax(logits, axis=-1, where=safe[:, None, None, :])
        out = jnp.einsum("bhqk,bkhd->bqhd", probs, v)  # (B, N, heads, dv)
        out = jnp.where(has_key[:, None, None, None], out, 0)

    out = out.reshape(batch, height, width, channels)  # heads concatenated
    if data_format == "channels_first":
        out = jnp.transpose(out, (0, 3, 1, 2))  # -> (B, C, H, W)
    return out


_apply_jit = jax.jit(apply, static_argnames=_STATIC)


def _loss(params, x, attention_mask, loss_weights, config_items):
    """sum(out * loss_weights); the config comes as hashable (name, value) pairs."""
    out = apply(params, x, attention_mask, **dict(config_items))
    return jnp.sum(out * loss_weights)


_value_and_grad_jit = jax.jit(
    jax.value_and_grad(_loss, argnums=(0, 1)), static_argnames=("config_items",))


def params_from_weight_dict(weights, dtype="float32"):
    """Canonical NumPy weight dict -> dict of jnp arrays of `dtype` (None dropped).

    float64 needs 64-bit mode to be on (see the module docstring).
    """
    return {k: jnp.asarray(np.asarray(v), dtype=dtype)
            for k, v in weights.items() if v is not None}


def _precision(dtype):
    """jax.enable_x64(True) for float64 (scoped), else nothing."""
    if np.dtype(dtype) == np.float64:
        return jax.enable_x64(True)
    return contextlib.nullcontext()


def _config(config, weights):
    config = dict(config)
    # use_bias is implied by the presence of biases in `weights`; if given, it
    # must agree with them.
    use_bias = config.pop("use_bias", None)
    has_bias = weights.get("query_bias") is not None
    if use_bias is not None and bool(use_bias) != has_bias:
        raise ValueError(f"use_bias={use_bias} but the weight dict "
                         f"{'has' if has_bias else 'has no'} biases")
    unknown = set(config) - set(_STATIC)
    if unknown:
        raise TypeError(f"Unknown config arguments: {sorted(unknown)}")
    if config.get("position_size") is not None:  # hashable, for the static config
        config["position_size"] = tuple(int(n) for n in config["position_size"])
    return config


def _check_dtype(array, dtype):
    if array.dtype != np.dtype(dtype):
        raise AssertionError(f"JAX computed in {array.dtype}, asked for {np.dtype(dtype)}")
    return array


def forward(x, weights, attention_mask=None, dtype="float32", **config):
    """Run the block on NumPy inputs; returns the output as a NumPy array.

    `config` holds the keyword arguments of `apply`.
    """
    config = _config(config, weights)
    with _precision(dtype):
        params = params_from_weight_dict(weights, dtype)
        xj = jnp.asarray(np.asarray(x), dtype=dtype)
        mask = None if attention_mask is None else jnp.asarray(attention_mask, dtype=bool)
        out = np.asarray(_apply_jit(params, xj, mask, **config))
    return _check_dtype(out, dtype)


def value_and_grad(x, weights, loss_weights, attention_mask=None, dtype="float32",
                   **config):
    """Loss `sum(out * loss_weights)` and its gradients, as NumPy.

    Returns `(loss, grad_x, grad_weights)`: a NumPy scalar, an array shaped
    like `x`, and a canonical weight dict of gradients.
    """
    config = _config(config, weights)
    with _precision(dtype):
        params = params_from_weight_dict(weights, dtype)
        xj = jnp.asarray(np.asarray(x), dtype=dtype)
        lw = jnp.asarray(np.asarray(loss_weights), dtype=dtype)
        mask = None if attention_mask is None else jnp.asarray(attention_mask, dtype=bool)
        loss, (grad_params, grad_x) = _value_and_grad_jit(
            params, xj, mask, lw, config_items=tuple(sorted(config.items())))
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


def resize_table(table, length, dtype="float32"):
    """The native's table resize on NumPy: (L, d) -> (length, d) in `dtype`."""
    with _precision(dtype):
        out = np.asarray(_resize_jit(jnp.asarray(np.asarray(table), dtype=dtype), length))
    return _check_dtype(out, dtype)


def sinusoidal_embedding(height, width, channels, dtype="float32"):
    """The native's sine-cosine embedding on NumPy: (H*W, C) in `dtype`."""
    if channels % 4:
        raise ValueError(f"The sinusoidal embedding needs channels divisible by 4. "
                         f"Received: channels={channels}")
    with _precision(dtype):
        out = np.asarray(_sincos_jit(height, width, channels, np.dtype(dtype)))
    return _check_dtype(out, dtype)
