"""The reference's norms and timm's options (`qk_norm`, `output_norm`,
`output_dense`, `use_key_bias`, `norm_epsilon`): values computed by hand,
where each acts in `mhsa_forward`, and the schema's weights for them.

timm's own modules are compared in tests/backends/test_timm.py (torch lane).
"""

import inspect
import math

import numpy as np
import pytest

from mhsa_core import reference
from mhsa_core.reference import norms, schema

from harness import match_all

X = np.array([1.0, 2.0, 3.0, 6.0])
SCALE = np.array([1.0, 2.0, 3.0, 0.5])
BIAS = np.array([0.5, 0.0, -1.0, 1.0])


def test_golden_layer_norm():
    # mean 3, centered (-2, -1, 0, 3), variance 14 / 4 = 3.5 (biased: / n);
    # eps 0.5: sqrt(4) = 2, so (-1, -0.5, 0, 1.5); * scale + bias.
    out = norms.layer_norm(X, SCALE, BIAS, 0.5)
    np.testing.assert_array_equal(out, [-0.5, -1.0, -1.0, 1.75])


def test_golden_rms_norm():
    # mean square 50 / 4 = 12.5, eps 3.5: sqrt(16) = 4, so (0.25, 0.5, 0.75,
    # 1.5); * scale. No centering, no bias.
    out = norms.rms_norm(X, SCALE, 3.5)
    np.testing.assert_array_equal(out, [0.25, 1.0, 2.25, 0.75])


def test_norms_act_on_the_last_axis_of_any_shape():
    x = np.stack([X, X[::-1] * 2])[None]  # (1, 2, 4)
    out = norms.rms_norm(x, np.ones(4), 3.5)
    np.testing.assert_allclose(out[0, 0], X / 4, rtol=1e-15)
    np.testing.assert_allclose(out[0, 1], X[::-1] * 2 / math.sqrt(4 * 12.5 + 3.5))


def _identity(channels, **extra):
    eye, zero = np.eye(channels), np.zeros(channels)
    weights = {}
    for name in ("query", "key", "value"):
        weights[f"{name}_kernel"], weights[f"{name}_bias"] = eye, zero
    return {**weights, **extra}


def test_golden_output_norm_and_dense():
    """One token: its attention output is its value, the token itself; then
    the LayerNorm above, then an identity projection with bias 1."""
    x = X.reshape(1, 1, 1, 4)
    weights = _identity(
        4,
        output_norm_scale=SCALE,
        output_norm_bias=BIAS,
        output_kernel=np.eye(4),
        output_bias=np.ones(4),
    )
    out = reference.mhsa_forward(
        x, weights, output_norm="layer", output_dense=True, norm_epsilon=0.5
    )
    np.testing.assert_array_equal(out.reshape(4), [0.5, 0.0, 0.0, 2.75])


def test_golden_qk_rms_norm_logits():
    """Two tokens (1, 7) and (1, 1), one head, q = k = the token, RMS-normed
    with eps 24: mean squares 25 and 1, so q / 7 and q / 5. Logits (scale 1):
    [[1/49 + 1, 1/35 + 1/5], [1/35 + 1/5, 2/25]]."""
    x = np.array([[[[1.0, 7.0], [1.0, 1.0]]]])  # (1, 1, 2, 2)
    weights = _identity(
        2,
        query_norm_scale=np.ones(2),
        key_norm_scale=np.ones(2),
    )
    _, scores = reference.mhsa_forward(
        x,
        weights,
        scale=1.0,
        qk_norm="rms",
        norm_epsilon=24.0,
        return_attention_scores=True,
    )
    logits = np.array([[50 / 49, 8 / 35], [8 / 35, 2 / 25]])
    expected = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    np.testing.assert_allclose(scores[0, 0], expected, rtol=1e-15)


def test_qk_norm_is_per_head_with_shared_weights():
    """Two heads of 2 channels, tokens (1, 7, 1, 1) and (1, 1, 1, 7): each head
    is RMS-normed over its own channels (eps 24: mean squares 25 and 1, so
    / 7 and / 5; over all 4 channels it would be / sqrt(37)), and both heads
    take the one scale (2, 0.5). q = k = the token, scale 1."""
    x = np.array([[[[1.0, 7.0, 1.0, 1.0], [1.0, 1.0, 1.0, 7.0]]]])  # (1, 1, 2, 4)
    scale = np.array([2.0, 0.5])
    weights = _identity(4, query_norm_scale=scale, key_norm_scale=scale)
    _, scores = reference.mhsa_forward(
        x,
        weights,
        num_heads=2,
        scale=1.0,
        qk_norm="rms",
        norm_epsilon=24.0,
        return_attention_scores=True,
    )
    big, small, cross = 4 / 49 + 1 / 4, 0.4**2 + 0.1**2, 4 / 35 + 1 / 20
    for head, logits in enumerate(
        [[[big, cross], [cross, small]], [[small, cross], [cross, big]]]
    ):
        logits = np.array(logits)
        expected = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
        np.testing.assert_allclose(scores[0, head], expected, rtol=1e-14)
    with pytest.raises(KeyError):  # the norms' weights come from the dict
        reference.mhsa_forward(
            x,
            {k: v for k, v in weights.items() if k != "key_norm_scale"},
            num_heads=2,
            qk_norm="rms",
        )


def test_key_bias_absent_with_use_key_bias_false():
    weights = schema.random_weights(4, use_key_bias=False)
    assert "key_bias" not in weights and "query_bias" in weights
    x = np.random.default_rng(0).standard_normal((1, 2, 3, 4))
    reference.mhsa_forward(x, weights, use_key_bias=False)
    with pytest.raises(ValueError, match=match_all("use_key_bias=False", "key_bias")):
        reference.mhsa_forward(
            x, {**weights, "key_bias": np.zeros(4)}, use_key_bias=False
        )


@pytest.mark.parametrize(
    "argument,value",
    [
        ("qk_norm", "batch"),
        ("output_norm", "rms"),
        ("output_dense", 1),
        ("use_key_bias", "no"),
        ("norm_epsilon", 0.0),
    ],
)
def test_bad_option_is_named(argument, value):
    x = np.zeros((1, 1, 2, 4))
    with pytest.raises(
        ValueError, match=match_all(f"`{argument}`", f"Received: {argument}={value!r}")
    ):
        reference.mhsa_forward(x, schema.random_weights(4), **{argument: value})


# ------------------------------------------------------------------ schema
def test_option_weights_follow_the_tables_in_the_contracts_order():
    shapes = schema.weight_shapes(
        12,
        3,
        5,
        "relative",
        position_size=(4, 7),
        use_key_bias=False,
        qk_norm="layer",
        output_norm="layer",
        output_dense=True,
    )
    assert list(shapes) == [
        "query_kernel",
        "query_bias",
        "key_kernel",
        "value_kernel",
        "value_bias",
        "relative_height",
        "relative_width",
        "query_norm_scale",
        "query_norm_bias",
        "key_norm_scale",
        "key_norm_bias",
        "output_norm_scale",
        "output_norm_bias",
        "output_kernel",
        "output_bias",
    ]
    assert shapes["query_norm_scale"] == shapes["key_norm_bias"] == (5,)
    assert shapes["output_norm_scale"] == (12,) and shapes["output_kernel"] == (12, 12)


@pytest.mark.parametrize(
    "kwargs,names",
    [
        ({"qk_norm": "rms"}, ["query_norm_scale", "key_norm_scale"]),
        ({"use_bias": False, "output_dense": True}, ["output_kernel"]),
        ({"use_bias": False, "use_key_bias": True}, ["key_bias"]),
        ({"use_bias": False, "qk_norm": "layer"}, ["query_norm_scale"]),
    ],
    ids=["rms-no-norm-bias", "no-output-bias", "key-bias-only", "norm-bias-kept"],
)
def test_option_weights(kwargs, names):
    shapes = schema.weight_shapes(8, 2, **kwargs)
    assert set(names) <= set(shapes)
    if kwargs.get("qk_norm") == "rms":
        assert not any(n.endswith("_norm_bias") for n in shapes)
    if kwargs.get("qk_norm") == "layer":
        assert "key_norm_bias" in shapes  # a LayerNorm's bias is not use_bias's
    if kwargs.get("use_key_bias"):
        assert [n for n in shapes if n.endswith("_bias")] == ["key_bias"]


def test_defaults_add_no_weight_and_draw_as_before():
    """The options off: the weight dict and its random draws are the old ones;
    on, the weights before the options' keep their draws."""
    plain = schema.random_weights(8, 2, seed=5)
    assert list(plain) == list(schema.weight_shapes(8, 2))
    with_options = schema.random_weights(
        8, 2, seed=5, qk_norm="layer", output_norm="layer", output_dense=True
    )
    for name, value in plain.items():
        np.testing.assert_array_equal(with_options[name], value)
    scales = with_options["query_norm_scale"]
    assert np.all(np.abs(scales - 1) < 1)  # around the norms' initial 1


def test_weight_arguments_pick_the_weight_deciding_keys():
    config = {
        "num_heads": 2,
        "activation": "relu",
        "qk_norm": "rms",
        "output_dense": True,
        "scale": 0.5,
    }
    assert schema.weight_arguments(config) == {
        "num_heads": 2,
        "qk_norm": "rms",
        "output_dense": True,
    }
    parameters = inspect.signature(schema.weight_shapes).parameters
    assert set(schema.WEIGHT_ARGUMENTS) == set(parameters) - {"channels"}
