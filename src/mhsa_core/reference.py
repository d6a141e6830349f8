"""Plain NumPy reference of the 2-D multi-head self-attention block.

This module is the oracle of every numerical test. It is written independently
of the Keras layer, in the most direct form that NumPy allows (explicit loops over
batch items and heads, masked softmax spelled out), so that it is easy to check
by eye. It imports nothing but NumPy and runs in any float dtype: float64 gives
the reference values, float32 gives the error budget that a float32 backend is
allowed (see the tolerance policy in the README).

Weights are passed as a dict of NumPy arrays, the canonical layout shared by the
layer (`MultiHeadSelfAttention2D.get_weight_dict`), the native per-framework
references under `backends/`, and the cross-backend runner:

    position_kernel (C, C)          position_bias (C,)       # only for "conv"
    query_kernel    (C, heads*kd)   query_bias (heads*kd,)
    key_kernel      (C, heads*kd)   key_bias   (heads*kd,)
    value_kernel    (C, C)          value_bias (C,)
    relative_height (2*Hr - 1, kd)  relative_width (2*Wr - 1, kd)   # "relative" only
    absolute_height (Hr, kd)        absolute_width (Wr, kd)         # "absolute" only

Biases are absent (or None) when the block has no bias. (Hr, Wr) is the
reference size of the learned position tables (the layer's `position_size`);
here it is read off the tables' shapes.

Position encodings (`position_encoding`), with (y, x) a token's row and
column, i a query and j a key, q_i the query of one head:

- "conv": t <- t + relu(t @ Wp + bp) before the projections (the seed's);
- "none": nothing;
- "sinusoidal": t <- t + P(y, x) before the projections, P the fixed
  sine-cosine embedding of `sinusoidal_embedding`;
- "relative" (BoTNet): logits(i, j) += q_i . (R_h[y_j - y_i + H - 1]
  + R_w[x_j - x_i + W - 1]), R_h and R_w the tables resized to 2H - 1 and
  2W - 1 rows (`resize_table`);
- "absolute": logits(i, j) += q_i . (E_h[y_j] + E_w[x_j]), the tables resized
  to H and W rows.

With `scale_position_logits` (default) the logits are scale * (q_i . k_j +
position term), else scale * q_i . k_j + position term. Shared across heads.
"""

import math

import numpy as np

__all__ = [
    "mhsa_forward", "random_weights", "weight_shapes", "error_budget", "rounded_forward",
    "resize_table", "sinusoidal_embedding", "position_logits", "POSITION_ENCODINGS",
]

POSITION_ENCODINGS = ("conv", "none", "relative", "absolute", "sinusoidal")
# Learned per-axis tables of each encoding: (name prefix, rows for a reference
# size of n along that axis).
_TABLES = {
    "relative": ("relative", lambda n: 2 * n - 1),
    "absolute": ("absolute", lambda n: n),
}


def _relu(x):
    return np.maximum(x, 0)


def _gelu(x):
    # Exact (erf) GELU, as keras.activations.gelu(approximate=False).
    erf = np.vectorize(math.erf, otypes=[x.dtype])
    return x * (0.5 * (1.0 + erf(x / math.sqrt(2.0)))).astype(x.dtype)


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


_ACTIVATIONS = {
    None: lambda x: x,
    "linear": lambda x: x,
    "relu": _relu,
    "gelu": _gelu,
    "sigmoid": _sigmoid,
    "tanh": np.tanh,
    "silu": lambda x: x * _sigmoid(x),
    "swish": lambda x: x * _sigmoid(x),
}


def weight_shapes(channels, num_heads=1, key_dim=None, position_encoding="conv",
                  use_bias=True, position_size=None):
    """Shapes of the canonical weight dict, in the layer's creation order.

    `position_size` (Hr, Wr) is needed by the learned encodings ("relative",
    "absolute") only.
    """
    head_dim = channels // num_heads
    key_dim = head_dim if key_dim is None else key_dim
    qk = num_heads * key_dim
    shapes = {}
    if position_encoding == "conv":
        shapes["position_kernel"] = (channels, channels)
        if use_bias:
            shapes["position_bias"] = (channels,)
    for name, width in (("query", qk), ("key", qk), ("value", channels)):
        shapes[f"{name}_kernel"] = (channels, width)
        if use_bias:
            shapes[f"{name}_bias"] = (width,)
    if position_encoding in _TABLES:
        if position_size is None:
            raise ValueError(
                f"position_encoding={position_encoding!r} has learned tables: "
                "pass position_size=(Hr, Wr). Received: position_size=None"
            )
        prefix, rows = _TABLES[position_encoding]
        height, width = position_size
        shapes[f"{prefix}_height"] = (rows(height), key_dim)
        shapes[f"{prefix}_width"] = (rows(width), key_dim)
    return shapes


def random_weights(channels, num_heads=1, key_dim=None, position_encoding="conv",
                   use_bias=True, seed=0, dtype=np.float64, position_size=None):
    """He-normal kernels, small random biases, N(0, 1/key_dim) position tables,
    drawn with NumPy.

    Cross-backend comparisons always inject these: the same Keras seed gives
    different initial values on each backend.
    """
    rng = np.random.default_rng(seed)
    out = {}
    for name, shape in weight_shapes(channels, num_heads, key_dim, position_encoding,
                                     use_bias, position_size).items():
        if name.endswith("kernel"):
            std = math.sqrt(2.0 / shape[0])
        elif name.endswith(("_height", "_width")):
            std = 1.0 / math.sqrt(shape[1])  # BoTNet's and timm's initialization
        else:
            std = 0.1
        out[name] = (rng.standard_normal(shape) * std).astype(dtype)
    return out


# ------------------------------------------------------- position encodings
def resize_table(table, length, dtype=np.float64):
    """`table` (L, d) linearly interpolated along axis 0 to `length` rows.

    Row t of the result sits at source position s = (t + 0.5) * L / length - 0.5
    (pixel centers aligned, "half-pixel"), clamped to [0, L - 1]:
    out[t] = (1 - f) * table[floor(s)] + f * table[floor(s) + 1], f = s - floor(s).
    This is torch's `F.interpolate(mode="linear", align_corners=False)` and
    `tf.image.resize(method="bilinear")` along one axis (the latter only to
    float32: it always returns float32). With length == L, s = t
    and the table comes back unchanged, bit for bit.

    For a relative table (2n - 1 rows, offsets -(n-1)..n-1) the rule maps offset
    d at the new size to offset d * (2n - 1) / (2m - 1) at the reference size
    (m the new size): offset 0 stays at offset 0, and the largest offsets clamp
    to the table's ends.
    """
    table = np.asarray(table).astype(dtype)
    rows = table.shape[0]
    out = np.zeros((length,) + table.shape[1:], dtype=dtype)
    for t in range(length):
        s = (dtype(t) + dtype(0.5)) * dtype(rows) / dtype(length) - dtype(0.5)
        s = min(max(s, dtype(0)), dtype(rows - 1))
        i0 = int(math.floor(s))
        i1 = min(i0 + 1, rows - 1)
        f = dtype(s - i0)
        out[t] = (dtype(1) - f) * table[i0] + f * table[i1]
    return out


def sinusoidal_embedding(height, width, channels, dtype=np.float64):
    """The fixed 2-D sine-cosine embedding P, (H*W, C), row-major over (H, W).

    With D = C / 4 frequencies w_k = 10000^(-k / D), k = 0..D-1, the token at
    row y and column x gets the channels

        [sin(y w_0..w_{D-1}), cos(y w), sin(x w), cos(x w)]

    (MAE's `get_2d_sincos_pos_embed` with the halves swapped: MAE encodes the
    column first). C must be divisible by 4.
    """
    if channels % 4:
        raise ValueError(
            "The sinusoidal embedding needs channels divisible by 4. "
            f"Received: channels={channels}"
        )
    d = channels // 4
    omega = np.asarray([10000.0 ** (-k / d) for k in range(d)], dtype=dtype)
    out = np.zeros((height * width, channels), dtype=dtype)
    for y in range(height):
        for x in range(width):
            i = y * width + x
            out[i, 0:d] = np.sin(dtype(y) * omega)
            out[i, d:2 * d] = np.cos(dtype(y) * omega)
            out[i, 2 * d:3 * d] = np.sin(dtype(x) * omega)
            out[i, 3 * d:4 * d] = np.cos(dtype(x) * omega)
    return out


def position_logits(q, weights, position_encoding, height, width, dtype=np.float64,
                    matmul=np.matmul):
    """The position term of one head's logits, (N, N), or None.

    Args:
        q: (N, key_dim) queries of one head, N = height * width row-major.
        weights: the canonical dict (its `relative_*` / `absolute_*` tables).
        position_encoding: "relative" or "absolute" give a term; others None.

    Row i (query at (y_i, x_i)), column j (key at (y_j, x_j)):
    relative: q_i . (R_h[y_j - y_i + H - 1] + R_w[x_j - x_i + W - 1]);
    absolute: q_i . (E_h[y_j] + E_w[x_j]); the tables resized first.
    """
    if position_encoding not in _TABLES:
        return None
    prefix, rows = _TABLES[position_encoding]
    table_h = resize_table(weights[f"{prefix}_height"], rows(height), dtype)
    table_w = resize_table(weights[f"{prefix}_width"], rows(width), dtype)
    n = height * width
    ys, xs = np.divmod(np.arange(n), width)  # (y_j, x_j) of every token
    out = np.zeros((n, n), dtype=dtype)
    for i in range(n):
        if position_encoding == "relative":
            emb = table_h[ys - ys[i] + height - 1] + table_w[xs - xs[i] + width - 1]
        else:
            emb = table_h[ys] + table_w[xs]
        out[i] = matmul(emb, q[i][:, None])[:, 0]  # (N, kd) @ (kd, 1)
    return out


def _matmul_sequential(a, b):
    """a @ b with every dot product summed left to right, one rounding per step.

    This is the textbook float32 algorithm, and the accuracy that XLA's CPU
    kernel shows (measured: within 10% of it). OpenBLAS's blocked kernels,
    which NumPy's `@` calls, are about 2x more accurate; an error budget taken
    from them would fail correct float32 implementations (see the README).
    """
    acc = np.zeros(a.shape[:-1] + b.shape[-1:], dtype=np.result_type(a, b))
    for i in range(a.shape[-1]):
        acc += a[..., i:i + 1] * b[..., i:i + 1, :]
    return acc


def _dense(t, weights, name, dtype, matmul, store):
    y = store(matmul(t, store(weights[f"{name}_kernel"].astype(dtype))))
    bias = weights.get(f"{name}_bias")
    if bias is not None:
        y = store(y + store(bias.astype(dtype)))
    return y


def mhsa_forward(x, weights, *, num_heads=1, key_dim=None, activation="relu",
                 position_encoding="conv", scale=1.0, scale_position_logits=True,
                 data_format="channels_last", attention_mask=None,
                 return_attention_scores=False, dtype=np.float64,
                 accumulation="blas", storage_dtype=None):
    """Forward pass of the block in NumPy, every step in `dtype`.

    Args:
        x: (B, H, W, C) for "channels_last", (B, C, H, W) for "channels_first".
        weights: the canonical weight dict (see the module docstring).
        position_encoding, scale_position_logits: see the module docstring.
        attention_mask: optional bool (B, H, W); True = may be attended to.
        dtype: the float dtype of every intermediate (float64 for the oracle,
            float32 for the float32 error budget).
        accumulation: "blas" (NumPy's `@`) or "sequential" (every dot product
            summed left to right: the float32 error budget, see `error_budget`).
        storage_dtype: emulates mixed precision: with e.g. np.float16 (or
            ml_dtypes.bfloat16) and dtype=np.float32, the input, the weights and
            every tensor a Keras op hands to the next (projections, tokens,
            probabilities, output) are rounded to it, while each op computes in
            `dtype`, and the logits and softmax stay in `dtype` (as the layer
            does under a mixed_* policy). Position tables are not rounded
            (the layer keeps them, and the position term, in float32).

    Returns:
        The output in the layout of `x`, and with `return_attention_scores`
        also the attention probabilities (B, num_heads, N, N), N = H*W.
    """
    x = np.asarray(x).astype(dtype)
    if data_format == "channels_first":
        x = x.transpose(0, 2, 3, 1)
    elif data_format != "channels_last":
        raise ValueError(f"Unknown data_format. Received: data_format={data_format!r}")
    batch, height, width, channels = x.shape
    n = height * width
    head_dim = channels // num_heads
    key_dim = head_dim if key_dim is None else key_dim
    if scale is None:
        scale = 1.0 / math.sqrt(key_dim)
    act = _ACTIVATIONS[activation]
    matmul = {"blas": np.matmul, "sequential": _matmul_sequential}[accumulation]
    if storage_dtype is None:
        def store(a):
            return a
    else:
        def store(a):
            return np.asarray(a).astype(storage_dtype).astype(dtype)
    x = store(x)

    # Step 1: tokens, row-major over (H, W).
    t = x.reshape(batch, n, channels)
    # Step 2: position encodings that act on the tokens.
    if position_encoding not in POSITION_ENCODINGS:
        raise ValueError(f"Unknown position_encoding={position_encoding!r}")
    if position_encoding == "conv":  # the seed's ReLU 1x1 conv, added back
        t = store(t + _relu(_dense(t, weights, "position", dtype, matmul, store)))
    elif position_encoding == "sinusoidal":
        t = store(t + store(sinusoidal_embedding(height, width, channels, dtype)))
    # Step 3: projections.
    q = act(_dense(t, weights, "query", dtype, matmul, store))  # (B, N, heads*kd)
    k = act(_dense(t, weights, "key", dtype, matmul, store))  # (B, N, heads*kd)
    v = act(_dense(t, weights, "value", dtype, matmul, store))  # (B, N, C)

    if attention_mask is None:
        keep = np.ones((batch, n), dtype=bool)
    else:
        keep = np.asarray(attention_mask, dtype=bool).reshape(batch, n)

    out = np.zeros((batch, n, channels), dtype=dtype)
    scores = np.zeros((batch, num_heads, n, n), dtype=dtype)
    for b in range(batch):
        valid = keep[b]
        for h in range(num_heads):
            qh = q[b, :, h * key_dim:(h + 1) * key_dim]  # (N, kd)
            kh = k[b, :, h * key_dim:(h + 1) * key_dim]  # (N, kd)
            vh = v[b, :, h * head_dim:(h + 1) * head_dim]  # (N, dv)
            if not valid.any():
                # Every key masked: probabilities and output are zero.
                continue
            logits = matmul(qh, kh.T)  # (N, N)
            pos = position_logits(qh, weights, position_encoding, height, width,
                                  dtype, matmul)
            if pos is None:
                logits = dtype(scale) * logits
            elif scale_position_logits:
                logits = dtype(scale) * (logits + pos)
            else:
                logits = dtype(scale) * logits + pos
            logits = logits[:, valid]  # only the keys that may be attended to
            e = np.exp(logits - logits.max(axis=1, keepdims=True))
            p = e / e.sum(axis=1, keepdims=True)
            scores[b, h][:, valid] = p
            out[b, :, h * head_dim:(h + 1) * head_dim] = store(matmul(store(p), vh[valid]))

    out = out.reshape(batch, height, width, channels)
    if data_format == "channels_first":
        out = out.transpose(0, 3, 1, 2)
    if return_attention_scores:
        return out, scores
    return out


FLOAT64_RTOL = 1e-10
_POLICY_ROUNDING = {  # policy -> (compute dtype, storage dtype between ops)
    "float32": (np.float32, None),
    "mixed_float16": (np.float32, np.float16),
    "mixed_bfloat16": (np.float32, "bfloat16"),
}


def rounded_forward(x, weights, policy="float32", **config):
    """This reference run with the roundings of a Keras dtype `policy`.

    float32 arithmetic with sequential accumulation; for mixed_* also 16-bit
    storage between ops. The float32 budgets are built on its error.
    """
    if policy not in _POLICY_ROUNDING:
        raise ValueError(
            f"Unknown policy. Expected one of {sorted(_POLICY_ROUNDING)}. "
            f"Received: policy={policy!r}"
        )
    dtype, storage = _POLICY_ROUNDING[policy]
    if storage == "bfloat16":
        import ml_dtypes  # a dependency of keras; NumPy has no bfloat16

        storage = ml_dtypes.bfloat16
    return mhsa_forward(x, weights, dtype=dtype, accumulation="sequential",
                        storage_dtype=storage, **config)


def error_budget(x, weights, policy="float32", **config):
    """Reference output and the error budget of a result computed under `policy`.

    Returns `(ref64, budget, base_error)`:
    - ref64: the float64 output;
    - base_error: the error of `rounded_forward` (this reference with the
      roundings of `policy`) against ref64;
    - budget: the largest error allowed against ref64, 2 * base_error plus a
      floor of 1e-6 * max|ref64|. For "float64": FLOAT64_RTOL * max|ref64|,
      and base_error is None.

    See the README's tolerance policy for why the accumulation is sequential.
    """
    ref64 = mhsa_forward(x, weights, dtype=np.float64, **config)
    scale = float(np.max(np.abs(ref64)))
    if policy == "float64":
        return ref64, FLOAT64_RTOL * scale, None
    rounded = rounded_forward(x, weights, policy, **config)
    base_error = float(np.max(np.abs(rounded.astype(np.float64) - ref64)))
    return ref64, 2.0 * base_error + 1e-6 * scale, base_error
