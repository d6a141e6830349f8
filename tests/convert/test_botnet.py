"""BoTNet: `MultiHeadSelfAttention2D.botnet` and `load_botnet_weights` against
NumPy ports of the two public parameter layouts (the official TF1 code of
Srinivas et al. 2021 and timm's `BottleneckAttn`), written here from their
algorithms: per-head einsums and the pad/reshape "rel_to_abs" trick for the
relative logits, which is independent of the layer's gather. Trained weights
in either layout, mapped as docs/presets.md documents, give the same outputs in
our layer, on every backend, to float64 precision."""

import math

import numpy as np
import pytest

from mhsa_core import MultiHeadSelfAttention2D, convert, reference

from harness import assert_float64_close, to_numpy

C, HEADS, KEY_DIM = 16, 4, 4
SIZE = (5, 3)  # non-square: a transposed table would not even fit


def _softmax(z):
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def _rel_to_abs(rel):
    """(..., L, 2L - 1) logits per relative offset (key - query + L - 1) ->
    (..., L, L) per key: pad a column, flatten, pad L - 1, view as
    (L + 1, 2L - 1), keep [:L, L - 1:]."""
    *lead, length, _ = rel.shape
    flat = np.pad(rel, [(0, 0)] * len(lead) + [(0, 0), (0, 1)])
    flat = flat.reshape(*lead, 2 * length * length)
    flat = np.pad(flat, [(0, 0)] * len(lead) + [(0, length - 1)])
    return flat.reshape(*lead, length + 1, 2 * length - 1)[..., :length, length - 1 :]


def _rel_logits_1d(q, table):
    """q (B, h, X, Y, d) and a table (2Y - 1, d) -> (B, h, X, Y_q, Y_k)."""
    return _rel_to_abs(np.einsum("bhxyd,md->bhxym", q, table))


def _official_forward(x, wq, wk, wv, r_height, r_width):
    """The official code's relpos self-attention, channels_last.

    wq, wk, wv: (C, heads, dim) ("group_pointwise" kernels); q is scaled by
    dim^-0.5 before both the content and the relative logits.
    """
    q = np.einsum("bHWD,Dhd->bhHWd", x, wq)
    k = np.einsum("bHWD,Dhd->bhHWd", x, wk)
    v = np.einsum("bHWD,Dhd->bhHWd", x, wv)
    b, heads, height, width, dim = q.shape
    q = q * dim**-0.5
    logits = np.einsum("bhHWd,bhPQd->bhHWPQ", q, k)
    along_w = _rel_logits_1d(q, r_width)  # (b, h, H, W_q, W_k)
    along_h = _rel_logits_1d(
        q.transpose(0, 1, 3, 2, 4), r_height
    )  # (b, h, W, H_q, H_k)
    logits = logits + along_w[:, :, :, :, None, :]  # broadcast over key rows P
    logits = logits + along_h.transpose(0, 1, 3, 2, 4)[:, :, :, :, :, None]
    weights = _softmax(logits.reshape(b, heads, height, width, -1))
    weights = weights.reshape(logits.shape)
    out = np.einsum("bhHWPQ,bhPQd->bHWhd", weights, v)
    return out.reshape(b, height, width, heads * v.shape[-1])


def _timm_forward(x, qkv_weight, height_rel, width_rel, num_heads, scale_pos_embed):
    """timm's BottleneckAttn.forward, channels_first, stride 1.

    qkv_weight: (2 * heads * dqk + heads * dv, C, 1, 1), the 1x1 conv's weight;
    q, k, v are its output channels in that order, each head-major.
    """
    b, c, height, width = x.shape
    n = height * width
    out_v = c  # dim_out = dim
    dqk = (qkv_weight.shape[0] - out_v) // (2 * num_heads)
    qkv = np.einsum("oc,bchw->bohw", qkv_weight[:, :, 0, 0], x)
    q, k, v = np.split(qkv, [num_heads * dqk, 2 * num_heads * dqk], axis=1)
    q = q.reshape(b * num_heads, dqk, n).transpose(0, 2, 1)  # (B*h, N, dqk)
    k = k.reshape(b * num_heads, dqk, n)  # (B*h, dqk, N)
    v = v.reshape(b * num_heads, out_v // num_heads, n).transpose(0, 2, 1)
    # PosEmbedRel: width logits on (B, H, W, d) queries, height on the transpose.
    q4 = q.reshape(b * num_heads, height, width, dqk)
    rel_w = _rel_logits_1d(q4[:, None], width_rel)[:, 0]  # (B*h, H, W_q, W_k)
    rel_h = _rel_logits_1d(q4.transpose(0, 2, 1, 3)[:, None], height_rel)[:, 0]
    # rel_h: (B*h, W, H_q, H_k) -> [i=(H_q, W), j=(H_k, W_k)]
    pos = rel_w[:, :, :, None, :] + rel_h.transpose(0, 2, 1, 3)[:, :, :, :, None]
    pos = pos.reshape(b * num_heads, n, n)
    scale = dqk**-0.5
    if scale_pos_embed:
        attn = (q @ k + pos) * scale
    else:
        attn = (q @ k) * scale + pos
    out = _softmax(attn) @ v  # (B*h, N, dv)
    return out.transpose(0, 2, 1).reshape(b, out_v, height, width)


def _arrays(seed=0):
    rng = np.random.default_rng(seed)
    return {
        "wq": rng.standard_normal((C, HEADS, KEY_DIM)) / math.sqrt(C),
        "wk": rng.standard_normal((C, HEADS, KEY_DIM)) / math.sqrt(C),
        "wv": rng.standard_normal((C, HEADS, C // HEADS)) / math.sqrt(C),
        "r_height": rng.standard_normal((2 * SIZE[0] - 1, KEY_DIM))
        / math.sqrt(KEY_DIM),
        "r_width": rng.standard_normal((2 * SIZE[1] - 1, KEY_DIM)) / math.sqrt(KEY_DIM),
    }


def test_official_layout():
    """Official kernels (C, heads, dim) reshape to (C, heads * dim); r_height
    and r_width are our rel_height and rel_width as they are."""
    a = _arrays()
    x = np.random.default_rng(1).standard_normal((2,) + SIZE + (C,))
    expected = _official_forward(
        x, a["wq"], a["wk"], a["wv"], a["r_height"], a["r_width"]
    )
    layer = MultiHeadSelfAttention2D.botnet(num_heads=HEADS, dtype="float64")
    layer.load_botnet_weights(
        a["wq"].reshape(C, -1),
        a["wk"].reshape(C, -1),
        a["wv"].reshape(C, -1),
        a["r_height"],
        a["r_width"],
    )
    assert layer.position_size == SIZE
    assert_float64_close(to_numpy(layer(x)), expected, what="official layout")
    # The mapping is not vacuous: transposing the tables' meaning (query minus
    # key, i.e. the rows reversed) breaks it.
    flipped = MultiHeadSelfAttention2D.botnet(num_heads=HEADS, dtype="float64")
    flipped.load_botnet_weights(
        a["wq"].reshape(C, -1),
        a["wk"].reshape(C, -1),
        a["wv"].reshape(C, -1),
        a["r_height"][::-1],
        a["r_width"][::-1],
    )
    assert np.abs(to_numpy(flipped(x)) - expected).max() > 1e-3 * np.abs(expected).max()


@pytest.mark.parametrize("scale_pos_embed", [False, True])
def test_timm_layout(scale_pos_embed):
    """timm's fused qkv conv weight (2*h*dqk + C, C, 1, 1): rows [0, h*dqk) are
    q, then k, then v; each kernel is that block's [:, :, 0, 0].T. height_rel
    and width_rel are rel_height and rel_width. timm's scale_pos_embed is our
    scale_position_logits (timm defaults to False)."""
    a = _arrays(seed=2)
    qkv = np.concatenate([a[n].reshape(C, -1).T for n in ("wq", "wk", "wv")])[
        :, :, None, None
    ]
    x = np.random.default_rng(3).standard_normal((2, C) + SIZE)
    expected = _timm_forward(
        x, qkv, a["r_height"], a["r_width"], HEADS, scale_pos_embed
    )
    layer = MultiHeadSelfAttention2D.botnet(
        num_heads=HEADS,
        position_size=SIZE,
        scale_position_logits=scale_pos_embed,
        data_format="channels_first",
        dtype="float64",
    )
    qk = HEADS * KEY_DIM
    w = qkv[:, :, 0, 0]
    layer.load_botnet_weights(
        w[:qk].T, w[qk : 2 * qk].T, w[2 * qk :].T, a["r_height"], a["r_width"]
    )
    assert_float64_close(to_numpy(layer(x)), expected, what="timm layout")


def test_ports_agree_with_the_reference():
    """The two ports and the reference describe one computation (so a shared
    mistake in the ports cannot hide behind the layer)."""
    a = _arrays(seed=4)
    x = np.random.default_rng(5).standard_normal((1,) + SIZE + (C,))
    official = _official_forward(
        x, a["wq"], a["wk"], a["wv"], a["r_height"], a["r_width"]
    )
    weights = {
        "query_kernel": a["wq"].reshape(C, -1),
        "key_kernel": a["wk"].reshape(C, -1),
        "value_kernel": a["wv"].reshape(C, -1),
        "relative_height": a["r_height"],
        "relative_width": a["r_width"],
    }
    ref = reference.mhsa_forward(
        x,
        weights,
        num_heads=HEADS,
        activation=None,
        scale=None,
        position_encoding="relative",
    )
    np.testing.assert_allclose(official, ref, rtol=0, atol=1e-12 * np.abs(ref).max())


def test_botnet_weights_run_at_another_size():
    """Imported at (5, 3), run at (8, 6): the result is the reference's."""
    a = _arrays(seed=6)
    layer = MultiHeadSelfAttention2D.botnet(num_heads=HEADS, dtype="float64")
    kernels = [a[n].reshape(C, -1) for n in ("wq", "wk", "wv")]
    layer.load_botnet_weights(*kernels, a["r_height"], a["r_width"])
    weights = dict(zip(("query_kernel", "key_kernel", "value_kernel"), kernels))
    weights.update(relative_height=a["r_height"], relative_width=a["r_width"])
    x = np.random.default_rng(7).standard_normal((2, 8, 6, C))
    expected = reference.mhsa_forward(
        x,
        weights,
        num_heads=HEADS,
        activation=None,
        scale=None,
        position_encoding="relative",
    )
    assert_float64_close(to_numpy(layer(x)), expected)


def test_from_official_is_the_documented_mapping():
    """Kernels (C, heads, dim) -> (C, heads * dim); the tables as they are."""
    a = _arrays(seed=8)
    ours = convert.from_official(**a)
    assert list(ours) == ["q_kernel", "k_kernel", "v_kernel", "rel_height", "rel_width"]
    for name, theirs in zip(ours, ("wq", "wk", "wv")):
        np.testing.assert_array_equal(ours[name], a[theirs].reshape(C, -1))
    np.testing.assert_array_equal(ours["rel_height"], a["r_height"])
    np.testing.assert_array_equal(ours["rel_width"], a["r_width"])


@pytest.mark.parametrize("squeezed", [False, True], ids=["Cout_C_1_1", "Cout_C"])
def test_from_timm_is_the_documented_mapping(squeezed):
    """qkv rows [0, h*dqk) are q, then k, then v; each kernel is its block's
    transpose, and a model loaded through from_timm is the timm port."""
    a = _arrays(seed=9)
    qkv = np.concatenate([a[n].reshape(C, -1).T for n in ("wq", "wk", "wv")])
    ours = convert.from_timm(
        qkv if squeezed else qkv[:, :, None, None],
        a["r_height"],
        a["r_width"],
        num_heads=HEADS,
    )
    for name, theirs in zip(("q_kernel", "k_kernel", "v_kernel"), ("wq", "wk", "wv")):
        np.testing.assert_array_equal(ours[name], a[theirs].reshape(C, -1))
    layer = MultiHeadSelfAttention2D.botnet(
        num_heads=HEADS,
        scale_position_logits=False,
        data_format="channels_first",
        dtype="float64",
    )
    layer.load_botnet_weights(**ours)
    x = np.random.default_rng(10).standard_normal((1, C) + SIZE)
    expected = _timm_forward(
        x,
        qkv[:, :, None, None],
        a["r_height"],
        a["r_width"],
        HEADS,
        scale_pos_embed=False,
    )
    assert_float64_close(to_numpy(layer(x)), expected, what="through from_timm")
