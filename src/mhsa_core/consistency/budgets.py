"""How far from its oracle a result may be: the budgets of the matrix.

Our layer has a NumPy oracle, and its budgets are `mhsa_core.reference.budget`'s
rule (used as is, never re-written here): float32 results 2x the reference's
own float32 error + FLOOR x max|oracle|, float64 results FLOAT64_RTOL x
max|oracle|.

What has no NumPy oracle (gradients, and every check of a user's model) is
judged against the backends' own float64 runs, with *peer* budgets: the
spread that float32 rounding causes, measured on the backends themselves
(`peer_budgets`). Budgets are per input variant: each (e.g. each spatial
size) is its own computation, with its own scale and rounding error.

The README's tolerance policy has the reasoning.
"""

import numpy as np

from mhsa_core.consistency import oracles, protocol
from mhsa_core.reference.budget import (
    FLOAT64_RTOL,
    FLOOR,
    float32_budget,
    float64_budget,
    max_abs,
)

__all__ = [
    "FLOOR",
    "FLOAT64_RTOL",
    "PEER_FACTOR",
    "float32_budget",
    "float64_budget",
    "max_abs",
    "scale",
    "peer_budgets",
    "variant_budgets",
    "float64_budgets",
    "variant_float64_budgets",
    "repeat_budget",
    "step_budget",
    "INT8_STEP",
    "quantization_steps",
]

# Correct float32 backends differ by more than 2x once errors compound, and
# in ill-conditioned computations by much more: each backend's own error is
# the worst element of one draw of rounding noise, amplified. Gradients of the
# block stacked 4x (random inits, two sizes; `tools/peer_spread.py`) put a
# correct backend's own error at up to 6.5x the median backend's (48 draws;
# 3 of them above 4x, the factor this was before that measurement). 10x
# leaves 1.5x over the worst seen; precision bugs (a float16/bfloat16 path:
# >1000x in the same computation) stay far outside it, and logic bugs are
# caught at 1e-10 by the float64 rows.
PEER_FACTOR = 10.0


# An int8 activation quantizer (Keras's, per token: round(x * 127 / max|x|))
# rounds a float32 product that sits within float32 rounding of a half
# step to the other integer than the float64 twin does, now and then: one
# activation off by one step, 1/127 of its token's largest value.
# `tools/quant_spread.py` (the built-in int8 case's block, 300 random draws
# per backend): float32 rounding alone moves the output by 3e-7 of its scale
# (median); 18 of the 900 draws had a flip, the largest moving it by 0.60 of
# this slack (INT8_STEP x the output's scale), on TensorFlow, torch and JAX
# alike. The slack does not hide a backend whose quantizer differs (rounding
# mode, scale, clipping): that shows in every float64 row, at 1e-10.
INT8_STEP = 1.0 / 127.0


def quantization_steps(by_key, oracle, keys, quantization):
    """`by_key` plus one int8 activation step (INT8_STEP x the variant's
    max|oracle|) when `quantization` has int8 (an activation quantizer);
    unchanged otherwise (float, or weights only: int4 has no activation
    quantizer, and no flips)."""
    if not quantization or "int8" not in quantization.split("+"):
        return by_key
    out = dict(by_key)
    for group in _by_variant(keys).values():
        slack = INT8_STEP * scale([oracle[k] for k in group])
        out.update({k: by_key[k] + slack for k in group})
    return out


def scale(arrays):
    """max |a| over all `arrays` (0 when they are all empty)."""
    return max((float(np.max(np.abs(a))) for a in arrays if np.size(a)), default=0.0)


def peer_budgets(results32, results64, oracle, keys, rtol=None):
    """One budget for all `keys`: rtol x scale, or PEER_FACTOR x the median over
    backends of their *own* float32 error (float32 run vs their float64 run)
    + FLOOR x scale; errors and scale over all keys at once (per-array maxima
    are single samples, too noisy to judge by).

    Each backend's own float32-vs-float64 difference measures how much float32
    rounding moves this computation; it does not grow when the backends
    disagree with each other, which is what the checks must catch.

    Args:
        results32: {backend: result} of the float32 task.
        results64: {backend: result} of its float64 task, or None.
        oracle: {key: array}.
        keys: the keys judged together.
        rtol: if given, the budget is rtol x max|oracle| instead.

    Returns:
        {key: budget}.
    """
    magnitude = scale([oracle[k] for k in keys])
    if rtol is not None:
        budget = rtol * magnitude
    else:
        errors = []
        for b, r32 in results32.items():
            r64 = (results64 or {}).get(b)
            if r64 is not None and all(k in r32 and k in r64 for k in keys):
                errors.append(max((max_abs(r32[k], r64[k]) for k in keys), default=0.0))
        median = float(oracles.median(errors)) if errors else 0.0
        budget = PEER_FACTOR * median + FLOOR * magnitude
    return {k: budget for k in keys}


def _by_variant(keys):
    """{v: the keys of input variant v}, in variant order."""
    groups: dict[int, list[str]] = {}
    for k in keys:
        groups.setdefault(protocol.variant_of(k), []).append(k)
    return dict(sorted(groups.items()))


def variant_budgets(results32, results64, oracle, keys, rtol=None):
    """`peer_budgets` for each input variant's keys on its own: a small variant
    must not hide under a large one's budget."""
    budgets = {}
    for group in _by_variant(keys).values():
        budgets.update(peer_budgets(results32, results64, oracle, group, rtol=rtol))
    return budgets


def float64_budgets(oracle, keys):
    """`float64_budget` of all `keys` at once: FLOAT64_RTOL x their max|oracle|."""
    budget = max((float64_budget(oracle[k]) for k in keys), default=0.0)
    return {k: budget for k in keys}


def variant_float64_budgets(oracle, keys):
    """`float64_budgets` for each input variant's keys on its own."""
    budgets = {}
    for group in _by_variant(keys).values():
        budgets.update(float64_budgets(oracle, group))
    return budgets


def repeat_budget(output):
    """The same input twice through the same model: FLOOR x max|output| (CPU
    kernels may reduce in another order; a model drawing random numbers in
    call() is far off)."""
    return FLOOR * scale([output])


def step_budget(new_weights, steps):
    """One optimizer step, float32 against the formula in float64: FLOOR x
    (max|w| + max|step|). float32 rounds the new weights (~1e-7 x |w|) and
    keeps lr in float32 (1e-2 -> 2.2e-8 relative off, times the step): both
    under FLOOR x that."""
    return FLOOR * (scale(new_weights) + scale(steps))
