"""The matrix's budget for one result: `within_budget`, `assert_within_budget`.

Tests of a model ported to another runtime usually compare outputs with a
hand-picked `atol=1e-3`: too loose for a small model (a real bug hides under
it), too tight for a deep one (float32 rounding alone exceeds it). The matrix
instead derives each budget from the computation itself; these functions give
one result the verdict the matrix's forward check would give it:

    from mhsa_core.testing import assert_within_budget

    def test_onnx_export_matches(model, x):
        y = onnx_session.run(None, {"x": x})[0]
        assert_within_budget(y, model, x)

- oracle: the model run in float64 (its float64 twin, `float64.float64_clone`:
  the same config in float64, the same weights cast exactly), or, for a plain
  function, the function on float64 inputs;
- rounding: the same model in its own precision on the current backend
  (its float32 run); its distance from the oracle is how much float32
  rounding moves this computation;
- budget: `budgets.PEER_FACTOR` x that distance + `FLOOR` x max|oracle|, the
  matrix's peer rule with this backend as the only peer (`rtol` given:
  rtol x max|oracle|, the matrix's `--rtol`);
- verdict: error = max|result - oracle| <= budget.

All outputs of a multi-output model are judged at once (one budget, errors
and scale over all of them), as the matrix judges several result keys.
Runs on the current Keras backend, in this process. Under JAX, float64 needs
64-bit mode (JAX_ENABLE_X64=1 before JAX is imported); a float64 run that
comes back in a lower precision raises ValueError rather than giving an
oracle that is not one.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np
from numpy.typing import DTypeLike

from mhsa_core._typing import Nested
from mhsa_core.consistency.budgets import FLOOR, PEER_FACTOR, max_abs, scale

if TYPE_CHECKING:
    import keras

__all__ = ["BudgetVerdict", "within_budget", "assert_within_budget"]


@dataclasses.dataclass(frozen=True)
class BudgetVerdict:
    """One result judged against the float64 oracle.

    Attributes:
        error: max |result - oracle| over all outputs (inf if shapes differ).
        budget: what the matrix allows (see the module docstring).
        ratio: error / budget (passes when <= 1).
        passed: error <= budget.
        rounding_error: max |model in its own precision - oracle|, the
            float32 rounding of this computation (None with `rtol`).
        scale: max |oracle|.
    """

    error: float
    budget: float
    ratio: float
    passed: bool
    rounding_error: float | None
    scale: float

    def __str__(self) -> str:
        rule = (
            f"{PEER_FACTOR:g} x rounding error {self.rounding_error:.3g} + "
            f"{FLOOR:g} x max|oracle| {self.scale:.3g}"
            if self.rounding_error is not None
            else f"rtol x max|oracle| {self.scale:.3g}"
        )
        word = "within" if self.passed else "BEYOND"
        return (
            f"error {self.error:.3g} {word} budget {self.budget:.3g} "
            f"(ratio {self.ratio:.3g}; budget = {rule})"
        )


def _leaves(structure: Nested, what: str) -> list[np.ndarray]:
    import keras

    leaves = keras.tree.flatten(structure)
    if not leaves:
        raise ValueError(f"`{what}` holds no arrays. Received: {what}={structure!r}")
    return [np.asarray(keras.ops.convert_to_numpy(leaf)) for leaf in leaves]


def _cast_floats(structure: Nested, dtype: DTypeLike) -> Nested:
    import keras

    def cast(x: Any) -> np.ndarray:
        x = np.asarray(keras.ops.convert_to_numpy(x))
        return x.astype(dtype) if x.dtype.kind == "f" else x

    return keras.tree.map_structure(cast, structure)


def _runs(
    model: keras.layers.Layer | Callable[[Nested], Nested], inputs: Nested
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """(outputs in the model's own precision, outputs in float64), as leaves."""
    import keras

    from mhsa_core.consistency.float64 import float64_clone

    if isinstance(model, keras.layers.Layer):
        if not model.built:
            raise ValueError(
                f"`model` must be built (called once) so its weights exist. Received: "
                f"model={model.name!r} (not built)"
            )
        twin = float64_clone(model)
        # float32 inputs; a mixed-precision model casts them itself.
        own = model(_cast_floats(inputs, np.float32), training=False)
        high = twin(_cast_floats(inputs, np.float64), training=False)
    elif callable(model):
        own = model(_cast_floats(inputs, np.float32))
        high = model(_cast_floats(inputs, np.float64))
    else:
        raise ValueError(
            "`model` must be a Keras model or layer, or a function of the inputs that "
            f"computes in their dtype. Received: model={model!r}"
        )
    own, high = _leaves(own, "model(inputs)"), _leaves(high, "model(inputs)")
    low = [a.dtype for a in high if a.dtype.kind == "f" and a.dtype != np.float64]
    if low:
        raise ValueError(
            f"The float64 run of `model` returned {low[0]}: it is not a float64 "
            "oracle. Under JAX set JAX_ENABLE_X64=1 before importing jax; a function "
            "must compute in the dtype of its inputs."
        )
    return own, high


def within_budget(
    result: Nested,
    model: keras.layers.Layer | Callable[[Nested], Nested],
    inputs: Nested,
    *,
    rtol: float | None = None,
) -> BudgetVerdict:
    """Judges `result` as the matrix's forward check would: a `BudgetVerdict`.

    Args:
        result: the output to judge (an array, or the structure of a
            multi-output model), e.g. from an exported artifact or another
            backend.
        model: what `result` should equal: a built Keras model or layer (run
            here in its own precision and as its float64 twin), or a function
            of `inputs` that computes in the dtype of its inputs.
        inputs: the inputs `result` was computed from (an array, list or dict).
        rtol: if given, the budget is rtol x max|oracle| instead of the
            rounding-derived one (for computations that cannot run in float64).

    Returns:
        A `BudgetVerdict` (error, budget, ratio, passed, rounding_error, scale).
    """
    if rtol is not None and not rtol > 0:
        raise ValueError(
            f"`rtol` must be a positive number or None. Received: rtol={rtol!r}"
        )
    own, oracle = _runs(model, inputs)
    results = _leaves(result, "result")
    if len(results) != len(oracle):
        raise ValueError(
            f"`result` has {len(results)} arrays but the model returns {len(oracle)}. "
            f"Received: result shapes={[a.shape for a in results]}"
        )
    magnitude = scale(oracle)
    error = max(max_abs(r, o) for r, o in zip(results, oracle))
    if rtol is None:
        rounding = max(max_abs(a, o) for a, o in zip(own, oracle))
        budget = PEER_FACTOR * rounding + FLOOR * magnitude
    else:
        rounding, budget = None, rtol * magnitude
    ratio = error / budget if budget > 0 else (0.0 if error == 0 else float("inf"))
    return BudgetVerdict(
        error=error,
        budget=budget,
        ratio=ratio,
        passed=bool(error <= budget),
        rounding_error=rounding,
        scale=magnitude,
    )


def assert_within_budget(
    result: Nested,
    model: keras.layers.Layer | Callable[[Nested], Nested],
    inputs: Nested,
    *,
    rtol: float | None = None,
) -> BudgetVerdict:
    """`within_budget`, raising AssertionError (with the numbers) when it fails.

    Returns:
        The `BudgetVerdict` when `result` is within budget.
    """
    verdict = within_budget(result, model, inputs, rtol=rtol)
    if not verdict.passed:
        raise AssertionError(f"result is not the model's output: {verdict}")
    return verdict
