"""The oracle itself, checked against values computed by hand."""

import math

import numpy as np
import pytest

from mhsa_core import reference

E = math.e


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
        x, identity_weights(), activation=None, position_encoding="none",
        return_attention_scores=True,
    )
    a, b = E / (1 + E), 1 / (1 + E)
    np.testing.assert_allclose(out, [[[[a, b], [b, a]]]], rtol=1e-15)
    np.testing.assert_allclose(scores, [[[[a, b], [b, a]]]], rtol=1e-15)


def test_golden_seed_position_conv():
    # Identity position conv: t + relu(t) = 2t, so q = k = v = 2t, logits 4*I.
    x = np.array([[[[1.0, 0.0], [0.0, 1.0]]]])
    out = reference.mhsa_forward(x, identity_weights(position=True))
    a, b = E**4 / (1 + E**4), 1 / (1 + E**4)
    np.testing.assert_allclose(out, [[[[2 * a, 2 * b], [2 * b, 2 * a]]]], rtol=1e-15)


def test_golden_2x2_map_with_mask():
    # 1x2x2x2: tokens row-major (1,0), (0,1), (1,1), (0,0).
    x = np.array([[[[1.0, 0.0], [0.0, 1.0]], [[1.0, 1.0], [0.0, 0.0]]]])
    config = dict(activation=None, position_encoding="none")
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
    a = reference.mhsa_forward(x, w, num_heads=2, key_dim=3, activation=None, scale=None)
    b = reference.mhsa_forward(x, w_scaled, num_heads=2, key_dim=3, activation=None)
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


def test_channels_first_is_a_transpose():
    x = np.random.default_rng(0).standard_normal((2, 3, 5, 8))
    w = reference.random_weights(8, num_heads=4, seed=1)
    last = reference.mhsa_forward(x, w, num_heads=4)
    first = reference.mhsa_forward(
        x.transpose(0, 3, 1, 2), w, num_heads=4, data_format="channels_first"
    )
    np.testing.assert_array_equal(first, last.transpose(0, 3, 1, 2))


@pytest.mark.parametrize("storage", [None, np.float16])
def test_accumulation_orders_agree_in_float64(storage):
    x = np.random.default_rng(0).standard_normal((1, 4, 5, 16))
    w = reference.random_weights(16, num_heads=2, seed=1)
    dtype = np.float64 if storage is None else np.float32
    a = reference.mhsa_forward(x, w, num_heads=2, dtype=dtype, storage_dtype=storage)
    b = reference.mhsa_forward(
        x, w, num_heads=2, dtype=dtype, storage_dtype=storage, accumulation="sequential"
    )
    tol = 1e-12 if storage is None else 1e-2
    np.testing.assert_allclose(a, b, rtol=0, atol=tol * np.abs(a).max())

