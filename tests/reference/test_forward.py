"""The oracle's forward pass, checked against values computed by hand and a
brute-force double loop."""

import math

import numpy as np
import pytest

from mhsa_core import reference

from cases import YOLOV4_MHSA as BLOCK
from harness import match_all, reference_config

pytestmark = pytest.mark.machine_sensitive

E = math.e
# The reference's arguments of the Keras 2 YOLOv4-MHSA block (ReLU, the "conv"
# encoding, unscaled logits): the defaults before 0.2.0.
YOLOV4_MHSA = reference_config(BLOCK)


def identity_weights(channels=2, position=False):
    eye, zero = np.eye(channels), np.zeros(channels)
    weights = {}
    if position:
        weights.update(position_kernel=eye, position_bias=zero)
    for name in ("query", "key", "value"):
        weights[f"{name}_kernel"], weights[f"{name}_bias"] = eye, zero
    return weights


def test_golden_two_tokens():
    # tokens (1, 0), (0, 1); q = k = v = t; logits [[1, 0], [0, 1]].
    x = np.array([[[[1.0, 0.0], [0.0, 1.0]]]])  # (1, 1, 2, 2)
    out, scores = reference.mhsa_forward(
        x,
        identity_weights(),
        activation=None,
        position_encoding="none",
        scale=1.0,
        return_attention_scores=True,
    )
    a, b = E / (1 + E), 1 / (1 + E)
    np.testing.assert_allclose(out, [[[[a, b], [b, a]]]], rtol=1e-15)
    np.testing.assert_allclose(scores, [[[[a, b], [b, a]]]], rtol=1e-15)


def test_golden_yolov4_mhsa_position_conv():
    # Identity position conv: t + relu(t) = 2t, so q = k = v = 2t, logits 4*I.
    x = np.array([[[[1.0, 0.0], [0.0, 1.0]]]])
    out = reference.mhsa_forward(x, identity_weights(position=True), **YOLOV4_MHSA)
    a, b = E**4 / (1 + E**4), 1 / (1 + E**4)
    np.testing.assert_allclose(out, [[[[2 * a, 2 * b], [2 * b, 2 * a]]]], rtol=1e-15)


def test_golden_2x2_map_with_mask():
    # 1x2x2x2: tokens row-major (1,0), (0,1), (1,1), (0,0).
    x = np.array([[[[1.0, 0.0], [0.0, 1.0]], [[1.0, 1.0], [0.0, 0.0]]]])
    config = dict(activation=None, position_encoding="none", scale=1.0)
    out = reference.mhsa_forward(x, identity_weights(), **config)
    # Query (1,0): logits [1, 0, 1, 0] -> weights [e, 1, e, 1] / (2e + 2)
    # -> out = (2e, 1 + e) / (2e + 2) = (e / (e + 1), 1 / 2).
    np.testing.assert_allclose(out[0, 0, 0], [E / (E + 1), 0.5], rtol=1e-15)
    # Query (0,0): all logits 0 -> mean of the tokens = (1/2, 1/2).
    np.testing.assert_allclose(out[0, 1, 1], [0.5, 0.5], rtol=1e-15)

    # Mask out key (1,1) (row 1, column 0): query (1,0) -> (e, 1) / (e + 2).
    mask = np.array([[[True, True], [False, True]]])
    out = reference.mhsa_forward(x, identity_weights(), attention_mask=mask, **config)
    np.testing.assert_allclose(out[0, 0, 0], [E / (E + 2), 1 / (E + 2)], rtol=1e-15)


def test_two_heads_use_contiguous_channel_slices():
    # With 2 heads on C=2, head 0 sees channel 0 only, head 1 channel 1 only.
    x = np.array([[[[1.0, 0.0], [0.0, 1.0]]]])
    out = reference.mhsa_forward(
        x, identity_weights(), num_heads=2, activation=None, position_encoding="none"
    )
    # Head 0: q=k=v=(1, 0): logits [[1,0],[0,0]] -> token 0: e/(1+e); token 1: 1/2.
    # Head 1 is the mirror image.
    np.testing.assert_allclose(
        out, [[[[E / (1 + E), 0.5], [0.5, E / (1 + E)]]]], rtol=1e-15
    )


def test_scale_none_is_inverse_sqrt_key_dim():
    x = np.random.default_rng(0).standard_normal((1, 2, 3, 4))
    w = reference.random_weights(4, num_heads=2, key_dim=3, seed=1)
    w_scaled = dict(w)
    # Scaling q by 1/sqrt(3) is the same as scale=None on key_dim 3 (linear q).
    w_scaled["query_kernel"] = w["query_kernel"] / math.sqrt(3)
    w_scaled["query_bias"] = w["query_bias"] / math.sqrt(3)
    a = reference.mhsa_forward(
        x, w, num_heads=2, key_dim=3, activation=None, scale=None
    )
    b = reference.mhsa_forward(
        x, w_scaled, num_heads=2, key_dim=3, activation=None, scale=1.0
    )
    np.testing.assert_allclose(a, b, rtol=1e-12)


def test_fully_masked_item_is_zero_and_scores_sum_to_one():
    x = np.random.default_rng(0).standard_normal((2, 3, 4, 8))
    w = reference.random_weights(8, num_heads=2, seed=1)
    mask = np.ones((2, 3, 4), dtype=bool)
    mask[0] = False
    mask[1, 0, :2] = False
    out, scores = reference.mhsa_forward(
        x, w, num_heads=2, attention_mask=mask, return_attention_scores=True
    )
    assert np.all(out[0] == 0) and np.all(scores[0] == 0)
    np.testing.assert_allclose(scores[1].sum(-1), 1.0, rtol=1e-12)
    assert np.all(scores[1][..., :2] == 0)


CONFIGS = {"standard": {}, "yolov4_mhsa": YOLOV4_MHSA}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_channels_first_is_a_transpose(name):
    config = {**CONFIGS[name], "num_heads": 4}
    x = np.random.default_rng(0).standard_normal((2, 3, 5, 8))
    w = reference.random_weights(
        8,
        num_heads=4,
        seed=1,
        position_encoding=config.get("position_encoding", "none"),
    )
    last = reference.mhsa_forward(x, w, **config)
    first = reference.mhsa_forward(
        x.transpose(0, 3, 1, 2), w, **{**config, "data_format": "channels_first"}
    )
    np.testing.assert_array_equal(first, last.transpose(0, 3, 1, 2))


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("storage", [None, np.float16])
def test_accumulation_orders_agree_in_float64(storage, name):
    config = {**CONFIGS[name], "num_heads": 2}
    x = np.random.default_rng(0).standard_normal((1, 4, 5, 16))
    w = reference.random_weights(
        16,
        num_heads=2,
        seed=1,
        position_encoding=config.get("position_encoding", "none"),
    )
    dtype = np.float64 if storage is None else np.float32
    a = reference.mhsa_forward(x, w, dtype=dtype, storage_dtype=storage, **config)
    b = reference.mhsa_forward(
        x, w, dtype=dtype, storage_dtype=storage, accumulation="sequential", **config
    )
    tol = 1e-12 if storage is None else 1e-2
    np.testing.assert_allclose(a, b, rtol=0, atol=tol * np.abs(a).max())


# ------------------------------------------------------- position encodings
def _brute_force_forward(
    x, weights, *, num_heads, key_dim, position_encoding, scale, scale_position_logits
):
    """The block with a position term, one scalar at a time: every logit of
    every (batch, head, query i, key j) is a double loop over (i, j) and a sum
    over channels, straight from the definition (key minus query offsets for
    "relative", the key's own row and column for "absolute")."""
    batch, height, width, channels = x.shape
    n = height * width
    head_dim = channels // num_heads
    t = x.reshape(batch, n, channels)
    q = t @ weights["query_kernel"] + weights["query_bias"]
    k = t @ weights["key_kernel"] + weights["key_bias"]
    v = t @ weights["value_kernel"] + weights["value_bias"]
    prefix = position_encoding
    table_h = reference.resize_table(
        weights[f"{prefix}_height"], 2 * height - 1 if prefix == "relative" else height
    )
    table_w = reference.resize_table(
        weights[f"{prefix}_width"], 2 * width - 1 if prefix == "relative" else width
    )
    out = np.zeros((batch, n, channels))
    for b in range(batch):
        for h in range(num_heads):
            qs = slice(h * key_dim, (h + 1) * key_dim)
            logits = np.zeros((n, n))
            for i in range(n):
                yi, xi = divmod(i, width)
                for j in range(n):
                    yj, xj = divmod(j, width)
                    if prefix == "relative":
                        row_h, row_w = yj - yi + height - 1, xj - xi + width - 1
                    else:
                        row_h, row_w = yj, xj
                    content = sum(
                        q[b, i, qs][d] * k[b, j, qs][d] for d in range(key_dim)
                    )
                    pos = sum(
                        q[b, i, qs][d] * (table_h[row_h, d] + table_w[row_w, d])
                        for d in range(key_dim)
                    )
                    logits[i, j] = (
                        scale * (content + pos)
                        if scale_position_logits
                        else scale * content + pos
                    )
            p = np.exp(logits - logits.max(axis=1, keepdims=True))
            p /= p.sum(axis=1, keepdims=True)
            vs = slice(h * head_dim, (h + 1) * head_dim)
            out[b, :, vs] = p @ v[b, :, vs]
    return out.reshape(batch, height, width, channels)


@pytest.mark.parametrize("position_encoding", ["relative", "absolute"])
@pytest.mark.parametrize("scale_position_logits", [True, False])
@pytest.mark.parametrize("size", [(3, 4), (5, 2), (1, 4), (3, 1)], ids=str)
def test_position_encodings_match_brute_force(
    position_encoding, scale_position_logits, size
):
    """Reference size (3, 4), one larger non-square, 1xN and Nx1; 3 heads,
    key_dim 2, and a scale != 1 so that the two settings differ."""
    config = dict(
        num_heads=3,
        key_dim=2,
        position_encoding=position_encoding,
        scale=0.7,
        scale_position_logits=scale_position_logits,
    )
    w = reference.random_weights(
        12, 3, 2, position_encoding, position_size=(3, 4), seed=5
    )
    x = np.random.default_rng(6).standard_normal((2,) + size + (12,))
    expected = _brute_force_forward(x, w, **config)
    actual = reference.mhsa_forward(x, w, activation=None, **config)
    np.testing.assert_allclose(
        actual, expected, rtol=0, atol=1e-12 * np.abs(expected).max()
    )
    # The two settings really differ here (the flag is not ignored).
    other = reference.mhsa_forward(
        x,
        w,
        activation=None,
        **{**config, "scale_position_logits": not scale_position_logits},
    )
    assert np.abs(other - actual).max() > 1e-3


def test_golden_relative_offset_is_key_minus_query():
    # A 1x2 map, tokens (1, 0) and (0, 1), identity projections, one head.
    # R_w rows are offsets -1, 0, +1; only +1 (key right of the query) is set.
    x = np.array([[[[1.0, 0.0], [0.0, 1.0]]]])
    w = identity_weights()
    w["relative_height"] = np.zeros((1, 2))
    w["relative_width"] = np.array([[0.0, 0.0], [0.0, 0.0], [2.0, 0.0]])
    out = reference.mhsa_forward(
        x, w, activation=None, position_encoding="relative", scale=1.0
    )
    # Query 0 (x=0): key 1 has offset +1 -> q0 . (2, 0) = 2: logits [1, 2].
    # Query 1 (x=1): key 0 has offset -1 -> 0: logits [0, 1].
    # Both rows: softmax [1, e] / (1 + e) -> out (1, e) / (1 + e).
    expected = np.array([1.0, E]) / (1.0 + E)
    np.testing.assert_allclose(out[0, 0], [expected, expected], rtol=1e-15)


def test_golden_absolute_uses_the_key_position():
    # Same map; E_w adds (3, 0) to the key in column 1 only.
    x = np.array([[[[1.0, 0.0], [0.0, 1.0]]]])
    w = identity_weights()
    w["absolute_height"] = np.zeros((1, 2))
    w["absolute_width"] = np.array([[0.0, 0.0], [3.0, 0.0]])
    out = reference.mhsa_forward(
        x, w, activation=None, position_encoding="absolute", scale=1.0
    )
    # Query 0 = (1, 0): logits [1, 0 + 3]; query 1 = (0, 1): logits [0, 1 + 0].
    row0 = np.array([E, E**3]) / (E + E**3)
    row1 = np.array([1.0, E]) / (1.0 + E)
    np.testing.assert_allclose(
        out[0, 0, 0], row0[0] * x[0, 0, 0] + row0[1] * x[0, 0, 1], rtol=1e-15
    )
    np.testing.assert_allclose(
        out[0, 0, 1], row1[0] * x[0, 0, 0] + row1[1] * x[0, 0, 1], rtol=1e-15
    )


def test_sinusoidal_is_added_to_the_tokens():
    """position_encoding='sinusoidal' equals 'none' on x + P."""
    x = np.random.default_rng(0).standard_normal((2, 3, 5, 8))
    w = reference.random_weights(8, num_heads=2, position_encoding="none", seed=1)
    p = reference.sinusoidal_embedding(3, 5, 8).reshape(1, 3, 5, 8)
    a = reference.mhsa_forward(x, w, num_heads=2, position_encoding="sinusoidal")
    b = reference.mhsa_forward(x + p, w, num_heads=2, position_encoding="none")
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-13 * np.abs(a).max())


# ------------------------------------------------------ rotary encodings
# A 1x2 map, tokens (1, 0, 1, 0) and (0, 1, 0, 1), identity projections, one
# head of kd = 4: one frequency (1) per axis, token 1 = (y, x) = (0, 1).
ROPE_X = np.array([[[[1.0, 0.0, 1.0, 0.0], [0.0, 1.0, 0.0, 1.0]]]])
LINEAR = dict(activation=None, scale=1.0)


def _two_token_output(l01, l11, l00=2.0):
    """Both rows' softmax over logits [[l00, l01], [l01, l11]] times the
    (unrotated) values."""
    p0 = np.array([math.exp(l00), math.exp(l01)]) / (math.exp(l00) + math.exp(l01))
    p1 = np.array([math.exp(l01), math.exp(l11)]) / (math.exp(l01) + math.exp(l11))
    v = ROPE_X[0, 0]
    return np.array([[[p0 @ v, p1 @ v]]])


def test_golden_rope_interleaved():
    # "ij": token 1's angles (0, 1): pair (2, 3) turned by 1 radian:
    # q1 = k1 = (0, 1, -sin 1, cos 1); q0 = k0 = (1, 0, 1, 0).
    # Logits [[2, -sin 1], [-sin 1, 2]]: a rotation keeps |q1|^2 = 2.
    out = reference.mhsa_forward(
        ROPE_X, identity_weights(4), position_encoding="rope", **LINEAR
    )
    expected = _two_token_output(-math.sin(1.0), 2.0)
    np.testing.assert_allclose(out, expected, rtol=1e-14)


def test_golden_rope_half_with_timms_tables():
    # "half": channel i with i + 2, tables [cos 0, cos 0, cos 1, cos 1]:
    # q1 = (0, 1, 0 cos 1 + 0 sin 1, 1 cos 1 + 1 sin 1) = (0, 1, 0, cos 1 + sin 1),
    # not a rotation: |q1|^2 = 1 + (cos 1 + sin 1)^2 = 2 + sin 2; q0 . q1 = 0.
    out = reference.mhsa_forward(
        ROPE_X,
        identity_weights(4),
        position_encoding="rope",
        rope_layout="half",
        **LINEAR,
    )
    expected = _two_token_output(0.0, 2.0 + math.sin(2.0))
    np.testing.assert_allclose(out, expected, rtol=1e-14)


@pytest.mark.parametrize("indexing,angle", [("xy", 1.0), ("ij", 3.0)], ids=["xy", "ij"])
def test_golden_rope_mixed(indexing, angle):
    # F[0] = (1, 0), F[1] = (0, 3). "xy": t_x = x = 1, t_y = 0: angles
    # (1, 0), pair (0, 1) turned by 1: q1 = (-sin 1, cos 1, 0, 1).
    # "ij": t_x = y = 0, t_y = x = 1: angles (0, 3), pair (2, 3) by 3:
    # q1 = (0, 1, -sin 3, cos 3). Either way q0 . q1 = -sin(angle).
    w = identity_weights(4)
    w["rope_frequencies"] = np.array([[[1.0, 0.0]], [[0.0, 3.0]]])
    out = reference.mhsa_forward(
        ROPE_X,
        w,
        position_encoding="rope_mixed",
        rope_grid_indexing=indexing,
        **LINEAR,
    )
    expected = _two_token_output(-math.sin(angle), 2.0)
    np.testing.assert_allclose(out, expected, rtol=1e-14)


def test_rope_checks_its_arguments():
    with pytest.raises(ValueError, match=match_all("`key_dim`", "key_dim=6")):
        reference.mhsa_forward(
            np.zeros((1, 2, 2, 12)),
            reference.random_weights(12, 2),
            num_heads=2,
            position_encoding="rope",
        )
    with pytest.raises(ValueError, match="rope_layout='diagonal'"):
        reference.mhsa_forward(
            ROPE_X,
            identity_weights(4),
            position_encoding="rope",
            rope_layout="diagonal",
        )


# --------------------------------------------------------------- windows
def _swin_weights(channels, heads, size, seed=0):
    return reference.random_weights(
        channels, heads, None, "relative_bias", position_size=size, seed=seed
    )


SWIN = {"num_heads": 2, "position_encoding": "relative_bias", "activation": None}


def test_golden_relative_bias_is_added_per_head():
    """A 1x2 map, identity projections, tokens (1, 0) and (0, 1), two heads of
    one channel each: head h adds table[0, 1 + x_i - x_j, h] to q.k."""
    x = np.array([[[[1.0, 0.0], [0.0, 1.0]]]])
    w = identity_weights()
    # (1, 3, 2): offsets -1, 0, +1 (query minus key) per head.
    w["relative_bias_table"] = np.array([[[1.0, 0.0], [0.0, 0.0], [2.0, -1.0]]])
    out, scores = reference.mhsa_forward(
        x,
        w,
        num_heads=2,
        position_encoding="relative_bias",
        scale=1.0,
        return_attention_scores=True,
    )
    # Head 0 (channel 0), query 0 (x=0): q.k [1, 0]; key 0 is offset 0 (+0),
    # key 1 offset 0 - 1 = -1 (+1): logits [1, 1].
    np.testing.assert_allclose(scores[0, 0, 0], [0.5, 0.5], rtol=1e-15)
    # Head 0, query 1: q.k [0, 0]; key 0 offset +1 (+2), key 1 (+0): [2, 0].
    expected = np.array([E**2, 1.0]) / (E**2 + 1)
    np.testing.assert_allclose(scores[0, 0, 1], expected, rtol=1e-15)
    # Head 1 (channel 1), query 1: q.k [0, 1]; key 0 (-1), key 1 (+0): [-1, 1].
    np.testing.assert_allclose(scores[0, 1, 1], expected[::-1], rtol=1e-15)
    assert out.shape == x.shape


def test_one_window_over_the_whole_map_is_global_attention():
    x = np.random.default_rng(0).standard_normal((2, 4, 6, 8))
    w = _swin_weights(8, 2, (4, 6))
    plain = reference.mhsa_forward(x, w, **SWIN)
    windowed = reference.mhsa_forward(x, w, window_size=(4, 6), **SWIN)
    np.testing.assert_array_equal(windowed, plain)


def test_windows_are_separate_attentions():
    """No shift, a divisible map: each window is the block on its own crop."""
    x = np.random.default_rng(1).standard_normal((2, 4, 6, 8))
    w = _swin_weights(8, 2, (2, 3))
    out = reference.mhsa_forward(x, w, window_size=(2, 3), **SWIN)
    for y in (0, 2):
        for x0 in (0, 3):
            crop = x[:, y : y + 2, x0 : x0 + 3]
            np.testing.assert_allclose(
                out[:, y : y + 2, x0 : x0 + 3],
                reference.mhsa_forward(crop, w, **SWIN),
                rtol=0,
                atol=1e-14,
            )


@pytest.mark.parametrize("encoding", ["rope", "rope_mixed"])
def test_rope_in_windows_is_rope_of_each_window(encoding):
    """The rotary angles are of the token's place in the map; q_i . k_j then
    depends on the offset only, so each window (no shift, a divisible map) is
    the rotary block on its own crop, whose grid starts at 0."""
    x = np.random.default_rng(6).standard_normal((2, 4, 6, 8))
    w = reference.random_weights(8, 2, None, encoding, seed=6)
    config = {"num_heads": 2, "position_encoding": encoding, "activation": None}
    out = reference.mhsa_forward(x, w, window_size=(2, 3), **config)
    for y in (0, 2):
        for x0 in (0, 3):
            crop = x[:, y : y + 2, x0 : x0 + 3]
            np.testing.assert_allclose(
                out[:, y : y + 2, x0 : x0 + 3],
                reference.mhsa_forward(crop, w, **config),
                rtol=0,
                atol=1e-13,
            )
    # Teeth: rotating by the place in the window, not the map, is the same
    # only because of that invariance; without windows the map differs.
    assert np.abs(out - reference.mhsa_forward(x, w, **config)).max() > 1e-3


def test_padded_keys_get_zero_weight():
    """A 3x2 map in one 4x4 window: three padding rows/columns that are no
    keys. The result is global attention over the map with the table's
    entries at the map's true offsets (its center 5x3, no resize)."""
    x = np.random.default_rng(2).standard_normal((2, 3, 2, 8))
    w = _swin_weights(8, 2, (4, 4))  # a 7x7 table
    out, scores = reference.mhsa_forward(
        x, w, window_size=4, shift_size=2, return_attention_scores=True, **SWIN
    )
    center = {**w, "relative_bias_table": w["relative_bias_table"][1:6, 2:5]}
    np.testing.assert_allclose(
        out, reference.mhsa_forward(x, center, **SWIN), rtol=0, atol=1e-14
    )
    np.testing.assert_allclose(scores.sum(-1), 1.0, rtol=1e-14)


def test_shift_mask_separates_wrapped_tokens():
    """Shift (1, 1) on a 4x4 map with 2x2 windows equals the unshifted
    windows of the map rolled by -1 (rolled back) in the one window whose
    tokens are all of one region (rows 1-2, columns 1-2 of the map); the
    others differ (their wrapped tokens are masked)."""
    x = np.random.default_rng(3).standard_normal((1, 4, 4, 8))
    w = _swin_weights(8, 2, (2, 2))
    out, scores = reference.mhsa_forward(
        x, w, window_size=2, shift_size=1, return_attention_scores=True, **SWIN
    )
    rolled = np.roll(x, (-1, -1), axis=(1, 2))
    plain = np.roll(
        reference.mhsa_forward(rolled, w, window_size=2, **SWIN), (1, 1), axis=(1, 2)
    )
    np.testing.assert_allclose(out[:, 1:3, 1:3], plain[:, 1:3, 1:3], atol=1e-14)
    assert np.abs(out[:, 3, 3] - plain[:, 3, 3]).max() > 1e-3
    # Token 15 = (3, 3) and token 0 = (0, 0) share a window (the shifted
    # map's last) but not a region: weight exp(-100)-small, not 0.
    assert 0 < scores[0, 0, 15, 0] < 1e-30
    # Tokens of different windows: exactly 0.
    assert scores[0, 0, 5, 0] == 0.0


def test_mask_inside_windows():
    """Masked keys get probability 0 within their window; a window whose keys
    are all masked gives zeros for its queries."""
    x = np.random.default_rng(4).standard_normal((1, 4, 4, 8))
    w = _swin_weights(8, 2, (2, 2))
    mask = np.ones((1, 4, 4), dtype=bool)
    mask[0, :2, :2] = False  # the first window (no shift): every key masked
    mask[0, 2, 3] = False  # one key of the last window
    out, scores = reference.mhsa_forward(
        x,
        w,
        window_size=2,
        attention_mask=mask,
        return_attention_scores=True,
        **SWIN,
    )
    assert np.all(out[0, :2, :2] == 0)
    assert np.all(scores[0, :, :, 2 * 4 + 3] == 0)
    np.testing.assert_allclose(scores[0, :, 15].sum(-1), 1.0, rtol=1e-14)


@pytest.mark.parametrize("scale_position_logits", [True, False])
def test_relative_bias_follows_scale_position_logits(scale_position_logits):
    """scale * (q.k + bias), or scale * q.k + bias (timm's)."""
    x = np.random.default_rng(5).standard_normal((1, 2, 3, 4))
    w = _swin_weights(4, 2, (2, 3))
    zero = {**w, "relative_bias_table": np.zeros_like(w["relative_bias_table"])}
    config = {**SWIN, "scale": 0.5, "scale_position_logits": scale_position_logits}
    _, with_bias = reference.mhsa_forward(x, w, return_attention_scores=True, **config)
    _, without = reference.mhsa_forward(x, zero, return_attention_scores=True, **config)
    factor = 0.5 if scale_position_logits else 1.0
    bias = reference.position_bias(w, "relative_bias", 2, 3)
    # log p differs by the (scaled) bias up to a per-row constant.
    diff = np.log(with_bias[0]) - np.log(without[0]) - factor * bias
    np.testing.assert_allclose(diff - diff[..., :1], 0.0, atol=1e-12)
