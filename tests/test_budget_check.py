"""`within_budget` / `assert_within_budget`: one result judged with the matrix's budget.

Runs on the current backend (one pytest process per backend).
"""

import keras
import numpy as np
import pytest

from mhsa_core import reference
from mhsa_core.consistency.budgets import FLOOR, PEER_FACTOR
from mhsa_core.testing import BudgetVerdict, assert_within_budget, within_budget

from harness import make_case


def _dense_model(seed=0):
    rng = np.random.default_rng(seed)
    inputs = keras.Input((6,), name="x")
    hidden = keras.layers.Dense(16, activation="tanh", name="hidden")(inputs)
    outputs = keras.layers.Dense(3, name="out")(hidden)
    model = keras.Model(inputs, outputs)
    model.set_weights(
        [
            rng.standard_normal(w.shape).astype("float32") * 0.5
            for w in model.get_weights()
        ]
    )
    return model, rng.standard_normal((4, 6)).astype("float32")


def _two_output_model():
    rng = np.random.default_rng(1)
    a, b = keras.Input((5,), name="a"), keras.Input((5,), name="b")
    total = keras.layers.Add()([a, b])
    outputs = {
        "small": keras.layers.Dense(2, name="small")(total),
        "big": keras.layers.Dense(4, name="big")(total),
    }
    model = keras.Model({"a": a, "b": b}, outputs)
    model.set_weights(
        [rng.standard_normal(w.shape).astype("float32") for w in model.get_weights()]
    )
    inputs = {
        "a": rng.standard_normal((3, 5)).astype("float32"),
        "b": rng.standard_normal((3, 5)).astype("float32"),
    }
    return model, inputs


def test_golden_function_budget():
    # f(x) = 3x at x = 1/3: float32 gives fl(fl(1/3) * 3) = 1.0 exactly and the
    # float64 oracle 3 * (1/3) = 1.0, so the rounding error is 0 and the budget
    # is FLOOR x max|oracle| = 1e-6.
    x = np.array([1.0 / 3.0])
    fn = lambda t: t * 3  # noqa: E731 -- computes in the dtype of its input
    ok = within_budget(np.array([1.0 + 5e-7]), fn, x)
    assert ok.rounding_error == 0.0
    assert ok.budget == pytest.approx(FLOOR)
    assert ok.error == pytest.approx(5e-7)
    assert ok.passed and ok.ratio == pytest.approx(0.5)
    assert not within_budget(np.array([1.0 + 2e-6]), fn, x).passed


def test_own_float32_output_passes_and_a_perturbed_one_fails():
    model, x = _dense_model()
    own = keras.ops.convert_to_numpy(model(x))
    verdict = assert_within_budget(own, model, x)
    assert isinstance(verdict, BudgetVerdict)
    # Its error is the rounding error itself: 1/PEER_FACTOR of the budget at most.
    assert verdict.error <= verdict.budget / PEER_FACTOR + 1e-12
    assert verdict.rounding_error > 0  # float32 rounding really moved it
    off = own * (1 + 1e-3)  # what a hand-picked atol=1e-3 would wave through
    with pytest.raises(AssertionError, match="BEYOND budget"):
        assert_within_budget(off, model, x)


def test_multi_output_dict_model_judged_on_every_output():
    model, inputs = _two_output_model()
    out = {k: keras.ops.convert_to_numpy(v) for k, v in model(inputs).items()}
    assert within_budget(out, model, inputs).passed
    out["small"] = out["small"] + 1e-2  # only one output wrong
    assert not within_budget(out, model, inputs).passed


def test_our_layer_against_the_numpy_reference_float32():
    # A float32 result from outside Keras (the NumPy reference in float32)
    # judged against the layer: within budget.
    config = dict(num_heads=2, key_dim=4, position_encoding="relative")
    layer, x, weights = make_case(config, (2, 5, 4, 8))
    config = layer.get_config()
    ref32 = reference.mhsa_forward(
        x, weights, dtype=np.float32, **reference.reference_config(config)
    )
    assert within_budget(ref32, layer, x).passed


def test_rtol_budget():
    model, x = _dense_model()
    own = keras.ops.convert_to_numpy(model(x))
    verdict = within_budget(own * (1 + 1e-3), model, x, rtol=1e-2)
    assert verdict.passed and verdict.rounding_error is None
    assert verdict.budget == pytest.approx(1e-2 * verdict.scale)


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda m, x: within_budget(np.zeros(3), m, x, rtol=0.0), "rtol"),
        (lambda m, x: within_budget([np.zeros((4, 3))] * 2, m, x), "2 arrays"),
        (lambda m, x: within_budget(np.zeros((4, 3)), "model", x), "Received: model="),
        (
            lambda m, x: within_budget(
                np.zeros((4, 3)),
                lambda t: keras.ops.convert_to_numpy(t).astype("float32"),
                x,
            ),
            "not a float64 oracle",
        ),
        (
            lambda m, x: within_budget(np.zeros((4, 3)), keras.layers.Dense(3), x),
            "must be built",
        ),
    ],
    ids=[
        "rtol-zero",
        "output-count",
        "not-a-model",
        "float32-only-function",
        "unbuilt-layer",
    ],
)
def test_bad_arguments(call, match):
    model, x = _dense_model()
    with pytest.raises(ValueError, match=match):
        call(model, x)
