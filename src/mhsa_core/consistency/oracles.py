"""What each result is compared with: the oracles of the matrix.

- Layer cases, forward outputs and attention scores: `mhsa_core.reference`
  in float64 (`reference_oracles`), with the reference's own budget rule.
- Gradients, and every check of a user model (no NumPy oracle exists): the
  float64 run of TensorFlow, else the elementwise median of the backends'
  float64 runs (`float64_oracle`); without a float64 run, the median of the
  float32 results (`median_oracle`).
- Optimizer steps: the update formula applied in float64 to the start weights
  and to the float32 gradients the backend computed (`step_oracle`), with the
  settings of `protocol.OPTIMIZER_SETTINGS`.
"""

import math
from typing import Any, NamedTuple

import numpy as np

from mhsa_core import reference
from mhsa_core.consistency import protocol

__all__ = [
    "CALL_INPUTS",
    "Oracle",
    "reference_oracles",
    "float64_oracle",
    "median",
    "median_oracle",
    "step_oracle",
]


# The layer's call inputs beside x and attention_mask that a layer case may
# carry (issue 20: cross-attention's context map, class/register tokens).
CALL_INPUTS = ("context", "prefix_tokens")


class Oracle(NamedTuple):
    """Oracle arrays and the budget of each, both keyed by result key."""

    values: dict
    budgets: dict


def reference_oracles(case: Any) -> dict[str, Oracle]:
    """Oracles and budgets of a layer case from `mhsa_core.reference`.

    Returns:
        {"out": Oracle of the output in the case's dtype, "out64": of the
        output of a float64 run, "scores": of the attention scores}, keyed
        `protocol.output_key(v, o)` per input variant v and output o (the
        prefix tokens' outputs are output 1), the scores `protocol.out_key(v)`.
        A variant's context and prefix tokens (`CALL_INPUTS`) go to the
        reference as the layer takes them. One rounded reference run
        per variant gives the float32 budgets of both output and scores
        (`reference.float32_budget`); float64 results get
        `reference.float64_budget`.
    """
    config = reference.reference_config(case.config)
    out, out_b, out64_b, scores, scores_b = {}, {}, {}, {}, {}
    for v, variant in enumerate(case.variants):
        kwargs = dict(
            attention_mask=variant.get("attention_mask"),
            return_attention_scores=True,
            **{k: variant[k] for k in CALL_INPUTS if k in variant},
            **config,
        )
        # (outputs, scores), or with prefix tokens (outputs, prefix
        # outputs, scores): output o of variant v is `output_key(v, o)`.
        *outputs, scores[protocol.out_key(v)] = reference.mhsa_forward(
            variant["x"], case.weights, **kwargs
        )
        rounded = None
        if case.dtype != "float64":
            *rounded, scores32 = reference.rounded_forward(
                variant["x"], case.weights, case.dtype, **kwargs
            )
        for o, output in enumerate(outputs):
            key = protocol.output_key(v, o)
            out[key] = output
            out64_b[key] = reference.float64_budget(output)
            out_b[key] = (
                out64_b[key]
                if rounded is None
                else reference.float32_budget(rounded[o], output)
            )
        key = protocol.out_key(v)
        scores_b[key] = (
            reference.float64_budget(scores[key])
            if rounded is None
            else reference.float32_budget(scores32, scores[key])
        )
    return {
        "out": Oracle(out, out_b),
        "out64": Oracle(out, out64_b),
        "scores": Oracle(scores, scores_b),
    }


def median(values):
    """The elementwise median over the backends of `values` (arrays of one
    shape, or numbers), in float64; None when their shapes differ or there
    are none. The one median of the tool: the median oracle, the peer
    budgets' median own error, the drift's."""
    arrays = [np.asarray(a, np.float64) for a in values]
    shapes = {a.shape for a in arrays}
    if len(shapes) != 1:
        return None
    return np.median(np.stack(arrays), axis=0)


def median_oracle(results, keys):
    """{key: elementwise median over the backends' `results`}; None when some
    key is missing everywhere or the backends' shapes differ."""
    oracle = {}
    for k in keys:
        m = median([res[k] for res in results.values() if k in res])
        if m is None:
            return None
        oracle[k] = m
    return oracle


def float64_oracle(results64, keys):
    """TensorFlow's float64 result if it ran, else the elementwise median.

    keras 3.15 keeps float64 as float64 only on TensorFlow: on JAX (even with
    x64) and torch some ops (jax `ops.tanh`, torch `ops.matmul` and so Dense)
    compute float64 inputs in float32 (`keras.backend.result_type` maps 64-bit
    types to 32-bit there).
    """
    tf = results64.get("tensorflow")
    if tf is not None and all(k in tf for k in keys):
        return {k: np.asarray(tf[k], np.float64) for k in keys}
    return median_oracle(results64, keys)


def step_oracle(optimizer, w, g):
    """One step of `protocol.OPTIMIZER_SETTINGS[optimizer]` from weights `w`
    with gradients `g`, in float64 (a fresh optimizer: Adam's first step)."""
    w, g = np.asarray(w, np.float64), np.asarray(g, np.float64)
    class_name, args = protocol.OPTIMIZER_SETTINGS[optimizer]
    # The hyperparameters as a float32 model's optimizer holds them (keras
    # 3.15's Adam.update_step): the learning rate a float32 variable, and
    # beta_1, beta_2, epsilon cast to the variables' dtype in the bias
    # correction (alpha) and the denominator; but the moments' factors
    # 1 - beta are Python floats (exact, then float32). So alpha carries
    # sqrt(1 - float32(0.999)), 6.4e-6 (relative) off the sqrt(1 - 0.999)
    # of v: every first Adam step is that much off the textbook formula, which
    # no budget of a step whose weights are all zero (a model whose only
    # trainable weights are fresh biases: a quantized one) can cover.
    f32 = {k: float(np.float32(a)) for k, a in args.items()}
    if class_name == "SGD":
        return w - f32["learning_rate"] * g
    if class_name == "Adam":
        # Step 1: m = (1-b1) g, v = (1-b2) g^2,
        # w -= lr * sqrt(1-b2) / (1-b1) * m / (sqrt(v) + eps).
        m = float(np.float32(1 - args["beta_1"])) * g
        v = float(np.float32(1 - args["beta_2"])) * g * g
        alpha = (
            f32["learning_rate"] * math.sqrt(1 - f32["beta_2"]) / (1 - f32["beta_1"])
        )
        return w - alpha * m / (np.sqrt(v) + f32["epsilon"])
    raise ValueError(f"No step formula for optimizer {class_name!r}")
