"""The cross-backend consistency matrix: cases, oracles, budgets, verdicts.

Every check of every case yields one cell per backend: the error of that
backend against the check's oracle, the budget it is allowed, and their
`ratio` = error / budget (a cell passes when ratio <= 1).

Oracles and budgets (the README's tolerance policy has the reasoning):
- layer cases, forward, jit, scores and `.keras` loads: `mhsa_core.reference`
  in float64; budget 2x the reference's own float32 error (sequential
  accumulation) + 1e-6 x max|ref|.
- float64 results: 1e-10 x max|oracle|.
- gradients, and every check of a user model (no NumPy oracle exists): the
  float64 result of TensorFlow (else the elementwise median of the backends'
  float64 results); float32 budget PEER_FACTOR x the median over backends of
  their own float32-vs-float64 difference + 1e-6 x max|oracle|, both over all
  the arrays of the check at once. Without a float64 run (or with `rtol`
  given): the median of the float32 results and rtol x max|oracle|.
- SGD and Adam steps: the update formula applied in float64 to the start
  weights and to the float32 gradients this backend computed (the gradients
  themselves are the "gradients" row); budget 1e-6 x (max|w| + max|step|).

Gradients and optimizer steps are taken for every input variant of a case (as
the forward pass: e.g. a position table differentiated at its reference size
and through its resizing to another), budgets per variant.
"""

import dataclasses
import json
import math
import zipfile

import numpy as np

from mhsa_core import reference
from mhsa_core.runner import ALL_TASKS, TRAINING_BACKENDS, Case, case_backends, run_backends
from mhsa_core.worker import ADAM_LR, SGD_LR

FLOOR = 1e-6  # x max|oracle|: the budget never goes below float32 resolution
# Correct float32 backends differ by more than 2x once errors compound: JAX's
# CPU matmul sums sequentially (2.3x the error of OpenBLAS/oneDNN's blocked
# kernels on one product), and through the forward and backward passes of
# four stacked blocks its gradients were measured at 2.2x the median
# backend's error (3.5x on single arrays). 4x covers that spread; precision
# bugs (a float16/bfloat16 path: >100x) stay far outside it, and logic bugs
# are caught at 1e-10 by the float64 rows.
PEER_FACTOR = 4.0
DEFAULT_SIZE = 8  # a None spatial/feature dimension of a user model's input
DEFAULT_BATCH = 2  # a None batch dimension
# keras.optimizers.Adam defaults, used by the worker's Adam step.
_ADAM_BETA_1, _ADAM_BETA_2, _ADAM_EPSILON = 0.9, 0.999, 1e-7


# ---------------------------------------------------------------- results
@dataclasses.dataclass
class Cell:
    """One check on one backend."""

    passed: bool | None  # None: not applicable on this backend
    ratio: float | None = None  # error / budget; passes when <= 1
    error: float | None = None
    budget: float | None = None
    note: str = ""


@dataclasses.dataclass
class Row:
    case: str
    check: str
    cells: dict  # backend -> Cell


@dataclasses.dataclass
class Report:
    backends: list
    rows: list
    worker_errors: dict  # backend -> message (crash, timeout, not installed)
    runs: dict = dataclasses.field(default_factory=dict, repr=False)

    @property
    def failures(self):
        return [(r, b, c) for r in self.rows for b, c in r.cells.items() if c.passed is False]

    @property
    def missing(self):
        """Backends that were asked for but are not installed."""
        return [b for b, e in self.worker_errors.items() if e.startswith("not installed")]

    @property
    def agree(self):
        crashed = [b for b in self.worker_errors if b not in self.missing]
        return not self.failures and not crashed and any(
            c.passed for r in self.rows for c in r.cells.values()
        )

    def cell(self, case, check, backend):
        for row in self.rows:
            if row.case == case and row.check == check:
                return row.cells.get(backend)
        raise KeyError((case, check))

    def to_json(self):
        return {
            "verdict": "agree" if self.agree else "disagree",
            "backends": self.backends,
            "worker_errors": self.worker_errors,
            "rows": [
                {"case": r.case, "check": r.check,
                 "cells": {b: dataclasses.asdict(c) for b, c in r.cells.items()}}
                for r in self.rows
            ],
        }


def _cell(error, budget, note=""):
    error, budget = float(error), float(budget)
    ratio = error / budget if budget > 0 else (0.0 if error == 0 else math.inf)
    return Cell(passed=bool(error <= budget), ratio=ratio, error=error, budget=budget,
                note=note)


def _max_abs(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.shape != b.shape:
        return math.inf
    return float(np.max(np.abs(a - b))) if a.size else 0.0


def _scale(arrays):
    return max((float(np.max(np.abs(a))) for a in arrays if np.size(a)), default=0.0)


# ------------------------------------------------------------------ cases
def _layer_case(name, config, shapes, *, seed, tasks=ALL_TASKS, dtype="float32", mask=False):
    data_format = config.get("data_format", "channels_last")
    rng = np.random.default_rng(seed)
    variants = []
    for shape in shapes:
        x = rng.standard_normal(shape).astype(np.float64 if dtype == "float64" else np.float32)
        variant = {"x": x}
        if mask:
            b, h, w = (shape[0], shape[2], shape[3]) if data_format == "channels_first" \
                else shape[:3]
            m = np.ones((b, h, w), dtype=bool)
            m[0] = False  # an item with every key masked: zeros, never NaN
            if b > 1:
                m[1, :, -2:] = False  # padding on the right
            variant["attention_mask"] = m
        variants.append(variant)
    channels = shapes[0][1] if data_format == "channels_first" else shapes[0][-1]
    # float32-representable weights: the float32 and float64 runs start equal.
    weights = reference.random_weights(
        channels, config.get("num_heads", 1), config.get("key_dim"),
        config.get("position_encoding", "conv"), config.get("use_bias", True),
        seed=seed + 1, dtype=np.float32, position_size=config.get("position_size"),
    )
    weights = {k: v.astype(np.float64) for k, v in weights.items()}
    return Case(name, config, variants, weights=weights, tasks=tuple(tasks), dtype=dtype)


def default_cases():
    """The cases `mhsa-core matrix` runs with no arguments."""
    return [
        _layer_case("seed", {}, [(2, 25, 25, 512)], seed=0),
        _layer_case("multihead", {"num_heads": 8, "data_format": "channels_first"},
                    [(2, 64, 7, 5)], seed=10),
        _layer_case("masked", {"num_heads": 2}, [(2, 6, 7, 32)], seed=20, mask=True),
        # MultiHeadSelfAttention2D.botnet(num_heads=4, position_size=(6, 6)): relative
        # tables learned for 6x6, run at 6x6 and at 4x9 (resized in the graph).
        _layer_case("botnet", {"num_heads": 4, "position_encoding": "relative",
                               "position_size": (6, 6), "activation": None,
                               "use_bias": False, "scale": None,
                               "kernel_initializer": "lecun_normal"},
                    [(2, 6, 6, 32), (1, 4, 9, 32)], seed=70),
    ]


# Position encodings: each learned one at its reference size (position_size)
# and at another size (its tables resized, down along one axis and up along
# the other); every check, gradients and optimizer steps included, runs at
# both sizes. "botnet" (in the default cases) is the third learned case.
_POSITION_CASES = (
    # Non-square reference size, channels_first; the other size comes first.
    ("relative", {"num_heads": 2, "position_encoding": "relative", "position_size": (5, 7),
                  "scale": None, "data_format": "channels_first"},
     [(2, 16, 8, 6), (1, 16, 5, 7)], {}),
    # scale multiplies q.k only; a masked batch; key_dim != C / heads.
    ("absolute", {"num_heads": 2, "key_dim": 6, "position_encoding": "absolute",
                  "position_size": (6, 5), "scale": None, "scale_position_logits": False},
     [(2, 6, 5, 16), (2, 8, 9, 16)], {"mask": True}),
    # Fixed, no weights: any size is its own embedding.
    ("sinusoidal", {"num_heads": 2, "position_encoding": "sinusoidal", "scale": None},
     [(2, 5, 6, 16), (1, 8, 9, 16)], {}),
    ("none", {"num_heads": 2, "position_encoding": "none"}, [(2, 4, 5, 16)], {}),
)


def extended_cases():
    """`default_cases` plus the configurations the test suite adds."""
    return default_cases() + [
        _layer_case("heads4-key_dim6", {"num_heads": 4, "key_dim": 6}, [(2, 5, 6, 32)],
                    seed=30),
        _layer_case("standard", {"activation": None, "scale": None, "num_heads": 2},
                    [(2, 4, 9, 32)], seed=40),
        _layer_case("float64", {"num_heads": 2}, [(2, 5, 4, 16)], seed=50,
                    dtype="float64"),
        _layer_case("dynamic", {"num_heads": 2}, [(2, 5, 7, 16), (1, 9, 4, 16)],
                    seed=60),
    ] + [_layer_case(name, config, shapes, seed=80 + 10 * i, **options)
         for i, (name, config, shapes, options) in enumerate(_POSITION_CASES)]


# --------------------------------------------------------- user models
class ModelFileError(ValueError):
    """A `.keras` file that cannot be used (unreadable, refused in safe mode)."""


def read_model_config(path):
    """The config.json of a `.keras` file, read without any framework."""
    try:
        with zipfile.ZipFile(path) as archive:
            return json.loads(archive.read("config.json"))
    except FileNotFoundError:
        raise ModelFileError(f"No such file: {path}") from None
    except (zipfile.BadZipFile, KeyError, json.JSONDecodeError, OSError) as e:
        raise ModelFileError(
            f"Not a readable .keras file: {path} ({type(e).__name__}: {e})"
        ) from None


def _walk(obj):
    if isinstance(obj, dict):
        yield obj
        for v in obj.values():
            yield from _walk(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from _walk(v)


def check_safe(config, path):
    """Refuses (ModelFileError) a model that Keras safe mode would refuse."""
    lambdas = [d.get("config", {}).get("name", "?") for d in _walk(config)
               if d.get("class_name") == "Lambda"]
    if lambdas:
        raise ModelFileError(
            f"{path} contains Lambda layer(s) {lambdas}: loading them runs arbitrary "
            "Python code, which Keras safe mode refuses. Pass --unsafe if you trust "
            "the file."
        )


def input_specs(config):
    """[(name, batch_shape, dtype)] of a saved model's inputs."""
    inner = config.get("config", {})
    layers = inner.get("layers", [])
    by_name = {l.get("config", {}).get("name"): l for l in layers}
    specs = []
    if config.get("class_name") == "Sequential":
        first = layers[0] if layers else {}
        if first.get("class_name") == "InputLayer":
            c = first["config"]
            specs.append((c.get("name", "input"), c.get("batch_shape"), c.get("dtype")))
        elif config.get("build_config", {}).get("input_shape"):
            specs.append(("input", config["build_config"]["input_shape"], "float32"))
    else:
        names = inner.get("input_layers", [])
        if names and isinstance(names[0], str):  # a single input: [name, 0, 0]
            names = [names]
        for entry in names:
            layer = by_name.get(entry[0], {})
            c = layer.get("config", {})
            specs.append((entry[0], c.get("batch_shape"), c.get("dtype")))
    if not specs or any(shape is None for _, shape, _ in specs):
        raise ModelFileError(
            "Cannot tell the model's input shapes from its config; pass --inputs."
        )
    return specs


def _dtype_name(dtype):
    if isinstance(dtype, dict):  # a serialized DTypePolicy
        dtype = dtype.get("config", {}).get("name", "float32")
    return str(dtype or "float32")


def make_inputs(config, seed=0):
    """Deterministic inputs for a saved model, from its input specs.

    None dimensions become DEFAULT_BATCH (the batch) or DEFAULT_SIZE (others).
    Floats are standard normal, ints uniform in [0, 10), bools fair coins.
    """
    rng = np.random.default_rng(seed)
    inputs = {}
    for k, (_, batch_shape, dtype) in enumerate(input_specs(config)):
        shape = [DEFAULT_BATCH if (i == 0 and d is None) else (DEFAULT_SIZE if d is None else d)
                 for i, d in enumerate(batch_shape)]
        dtype = _dtype_name(dtype)
        if dtype == "bool":
            array = rng.random(shape) < 0.5
        elif "int" in dtype:
            array = rng.integers(0, 10, size=shape).astype(dtype)
        else:
            array = rng.standard_normal(shape).astype(
                "float64" if dtype == "float64" else "float32")
        inputs[f"input_{k}"] = array
    return inputs


def model_case(path, inputs=None, *, name="model"):
    config = read_model_config(path)
    if inputs is None:
        inputs = make_inputs(config)
    elif not isinstance(inputs, dict):
        inputs = {f"input_{k}": np.asarray(a) for k, a in enumerate(
            inputs if isinstance(inputs, (list, tuple)) else [inputs])}
    tasks = tuple(t for t in ALL_TASKS if t != "scores")
    return Case(name, None, [inputs], model_path=str(path), tasks=tasks)


# -------------------------------------------------------------- oracles
def _results(runs, case, task):
    return {b: r.results[case][task] for b, r in runs.items()
            if case in r.results and task in r.results[case]}


def _array_keys(results, prefixes):
    """The keys starting with `prefixes` in any backend's result, in order."""
    keys = {k for res in results.values() for k in res if k.startswith(prefixes)}
    return sorted(keys, key=lambda k: [int(p) if p.isdigit() else p for p in k.split("/")])


def _median(arrays):
    arrays = [np.asarray(a, np.float64) for a in arrays]
    shapes = {a.shape for a in arrays}
    if len(shapes) != 1:
        return None
    return np.median(np.stack(arrays), axis=0)


def _peer_budgets(results32, results64, oracle, keys, rtol=None):
    """One budget for all `keys`: rtol x scale, or PEER_FACTOR x the median over
    backends of their *own* float32 error (float32 run vs their float64 run)
    + FLOOR x scale; errors and scale over all keys at once (per-array maxima
    are single samples, too noisy to judge by).

    Each backend's own float32-vs-float64 difference measures how much float32
    rounding moves this computation; it does not grow when the backends
    disagree with each other, which is what the checks must catch.
    """
    scale = _scale([oracle[k] for k in keys])
    if rtol is not None:
        budget = rtol * scale
    else:
        errors = []
        for b, r32 in results32.items():
            r64 = (results64 or {}).get(b)
            if r64 is not None and all(k in r32 and k in r64 for k in keys):
                errors.append(max((_max_abs(r32[k], r64[k]) for k in keys), default=0.0))
        median = float(np.median(errors)) if errors else 0.0
        budget = PEER_FACTOR * median + FLOOR * scale
    return {k: budget for k in keys}


def _variant_of(key):
    """The input variant of a per-variant result key, "{kind}/{v}/..." -> v."""
    return int(key.split("/")[1])


def _variant_budgets(results32, results64, oracle, keys, rtol=None):
    """`_peer_budgets` for each input variant's keys on its own: every variant
    (e.g. each spatial size) is its own computation, with its own scale and
    float32 error; a small variant must not hide under a large one's budget."""
    budgets = {}
    for v in sorted({_variant_of(k) for k in keys}):
        group = [k for k in keys if _variant_of(k) == v]
        budgets.update(_peer_budgets(results32, results64, oracle, group, rtol=rtol))
    return budgets


def _variant_float64_budgets(oracle, keys):
    budgets = {}
    for v in sorted({_variant_of(k) for k in keys}):
        budgets.update(_float64_budgets(oracle, [k for k in keys if _variant_of(k) == v]))
    return budgets


def _judge(result, oracle, keys, budgets):
    """The worst key of one backend's result as a Cell (a failing key first)."""
    cells = []
    for k in keys:
        error = _max_abs(result[k], oracle[k]) if k in result else math.inf
        cells.append(_cell(error, budgets[k], note=k if len(keys) > 1 else ""))
    if not cells:
        return Cell(passed=None, note="nothing to compare")
    failing = [c for c in cells if not c.passed]
    return max(failing or cells, key=lambda c: c.ratio)


def _row(case, check, results, oracle, budgets, keys, backends):
    return Row(case, check, {b: _judge(res, oracle, keys, budgets)
                             for b, res in results.items() if b in backends})


def _float64_budgets(oracle, keys):
    scale = _scale([oracle[k] for k in keys])
    return {k: reference.FLOAT64_RTOL * scale for k in keys}


def _repeatable_row(case, fwd, backends):
    """The same input twice through the same model: equal up to 1e-6 x max|out|
    (CPU kernels may reduce in another order; a model drawing random numbers
    in call() is far off)."""
    cells = {}
    for b, res in fwd.items():
        if b in backends and "again/0" in res:
            oracle = {"again/0": res["out/0"]}
            budget = {"again/0": FLOOR * _scale([res["out/0"]])}
            cells[b] = _judge(res, oracle, ["again/0"], budget)
    return Row(case, "forward repeatable", cells)


def _float64_oracle(results64, keys):
    """TensorFlow's float64 result if it ran, else the elementwise median.

    keras 3.15 keeps float64 as float64 only on TensorFlow: on JAX (even with
    x64) and torch some ops (jax `ops.tanh`, torch `ops.matmul` and so Dense)
    compute float64 inputs in float32 (`keras.backend.result_type` maps 64-bit
    types to 32-bit there).
    """
    tf = results64.get("tensorflow")
    if tf is not None and all(k in tf for k in keys):
        return {k: np.asarray(tf[k], np.float64) for k in keys}
    return _median_oracle(results64, keys)


def _lenient_float64_row(case, check, results64, oracle, float32_budgets, keys, backends):
    """float64 cells of a user model: a deviation that float32 arithmetic explains
    (within the float32 budget) is reported, not failed: it is Keras computing
    some float64 ops in float32 on that backend (see `_float64_oracle`)."""
    strict = _float64_budgets(oracle, keys)
    cells = {}
    for b, res in results64.items():
        if b not in backends:
            continue
        cell = _judge(res, oracle, keys, strict)
        if not cell.passed and _judge(res, oracle, keys, float32_budgets).passed:
            cell = dataclasses.replace(cell, passed=None, note="float32-level (Keras)")
        cells[b] = cell
    return Row(case, check, cells)


def _median_oracle(results, keys):
    oracle = {}
    for k in keys:
        m = _median([res[k] for res in results.values() if k in res])
        if m is None:
            return None
        oracle[k] = m
    return oracle


def _step_oracle(prefix, w, g):
    """One step of keras.optimizers.SGD / Adam (defaults), in float64."""
    w, g = np.asarray(w, np.float64), np.asarray(g, np.float64)
    if prefix == "sgd":
        return w - SGD_LR * g
    # Adam, step 1: m = (1-b1) g, v = (1-b2) g^2,
    # w -= lr * sqrt(1-b2) / (1-b1) * m / (sqrt(v) + eps).
    m, v = (1 - _ADAM_BETA_1) * g, (1 - _ADAM_BETA_2) * g * g
    alpha = ADAM_LR * math.sqrt(1 - _ADAM_BETA_2) / (1 - _ADAM_BETA_1)
    return w - alpha * m / (np.sqrt(v) + _ADAM_EPSILON)


def _judge_step(result, prefix, variants):
    """A backend's step against the formula applied to its own gradients, for
    each of the `variants` input variants (one step each, from the same start)."""
    n = len([k for k in result if k.startswith("start/")])
    keys, oracle, budgets = [], {}, {}
    for v in range(variants):
        group = [f"{prefix}/{v}/{j}" for j in range(n)]
        if not all(f"grad/{v}/{j}" in result for j in range(n)):
            return Cell(passed=False, note=f"no {prefix} step of input variant {v}")
        for j, key in enumerate(group):
            oracle[key] = _step_oracle(prefix, result[f"start/{j}"], result[f"grad/{v}/{j}"])
        # float32 rounds the new weights (~1e-7 x |w|) and keeps lr in float32
        # (1e-2 -> 2.2e-8 relative off, times the step): both under FLOOR x that.
        steps = [oracle[key] - result[f"start/{j}"] for j, key in enumerate(group)]
        budget = FLOOR * (_scale([oracle[k] for k in group]) + _scale(steps))
        budgets.update({k: budget for k in group})
        keys += group
    return _judge(result, oracle, keys, budgets)


def _missing_variants_row(case, check, results, variants, keys, backends):
    """A failing row when some input variant has no gradients on any backend
    (the oracle's keys come from the results: a lost variant would not show)."""
    present = {_variant_of(k) for k in keys}
    missing = [v for v in range(variants) if v not in present]
    if not missing:
        return None
    return Row(case, check, {b: Cell(passed=False, note=f"no gradients of input variant(s) "
                                                       f"{missing}")
                             for b in results if b in backends})


def _reference_oracles(case):
    """Oracles and budgets of a layer case from `mhsa_core.reference`.

    Returns {name: (oracle, budgets)} for "out" (the case's dtype), "out64"
    (float64 run) and "scores", keyed "out/{variant}".
    """
    ref_config = {k: case.config[k] for k in
                  ("num_heads", "key_dim", "activation", "position_encoding", "scale",
                   "scale_position_logits", "data_format") if k in case.config}
    out, out_b, out64_b, scores, scores_b = {}, {}, {}, {}, {}
    for v, variant in enumerate(case.variants):
        key = f"out/{v}"
        kwargs = dict(attention_mask=variant.get("attention_mask"),
                      return_attention_scores=True, **ref_config)
        out[key], scores[key] = reference.mhsa_forward(variant["x"], case.weights, **kwargs)
        out64_b[key] = reference.FLOAT64_RTOL * _scale([out[key]])
        if case.dtype == "float64":
            out_b[key] = out64_b[key]
            scores_b[key] = reference.FLOAT64_RTOL * _scale([scores[key]])
        else:  # as reference.error_budget, for the output and the scores at once
            out32, scores32 = reference.rounded_forward(
                variant["x"], case.weights, case.dtype, **kwargs)
            out_b[key] = 2 * _max_abs(out32, out[key]) + FLOOR * _scale([out[key]])
            scores_b[key] = 2 * _max_abs(scores32, scores[key]) + FLOOR * _scale([scores[key]])
    return {"out": (out, out_b), "out64": (out, out64_b), "scores": (scores, scores_b)}


def _evaluate_case(case, runs, backends, rtol):
    rows = []
    name = case.name
    fwd = _results(runs, name, "forward")
    fwd64 = _results(runs, name, "forward64")
    out_keys = [f"out/{v}" for v in range(len(case.variants))]

    # Forward: the NumPy reference (layer cases) or the backends' median.
    if case.config is not None:
        ref = _reference_oracles(case)
        forward_oracle = ref["out"]
        rows.append(_row(name, "forward", fwd, *ref["out"], out_keys, backends))
        if case.dtype != "float64":
            rows.append(_row(name, "forward float64", fwd64, *ref["out64"], out_keys,
                             backends))
        rows.append(_row(name, "attention scores", _results(runs, name, "scores"),
                         *ref["scores"], out_keys, backends))
    else:
        oracle = None if rtol is not None or not fwd64 else _float64_oracle(fwd64, out_keys)
        if oracle is not None:
            forward_oracle = (oracle, _peer_budgets(fwd, fwd64, oracle, out_keys))
            rows.append(_row(name, "forward", fwd, *forward_oracle, out_keys, backends))
            rows.append(_lenient_float64_row(name, "forward float64", fwd64, oracle,
                                             forward_oracle[1], out_keys, backends))
        else:
            # No float64 run: the median float32 result and an explicit rtol.
            oracle = _median_oracle(fwd, out_keys) or {}
            forward_oracle = (oracle, _peer_budgets(fwd, None, oracle, out_keys, rtol=rtol))
            rows.append(_row(name, "forward", fwd, *forward_oracle, out_keys, backends))
    rows.append(_row(name, "jit forward", _results(runs, name, "jit"), *forward_oracle,
                     out_keys, backends))
    rows.append(_repeatable_row(name, fwd, backends))

    # Gradients and optimizer steps, of every input variant: the float64 runs'
    # oracle (TensorFlow's), budgets per variant.
    grads = _results(runs, name, "grads")
    grads64 = _results(runs, name, "grads64")
    variants = len(case.variants)
    grad_keys = _array_keys(grads64 or grads, ("input/", "weight/"))
    g_oracle = _float64_oracle(grads64, grad_keys) if grads64 and rtol is None else None
    if g_oracle is not None:
        g_budgets = _variant_budgets(grads, grads64, g_oracle, grad_keys)
        rows.append(_missing_variants_row(name, "gradients", grads, variants, grad_keys,
                                          backends)
                    or _row(name, "gradients", grads, g_oracle, g_budgets, grad_keys, backends))
        if case.config is not None:  # our block: float64 everywhere, strictly
            rows.append(_missing_variants_row(name, "gradients float64", grads64, variants,
                                              grad_keys, backends)
                        or _row(name, "gradients float64", grads64, g_oracle,
                                _variant_float64_budgets(g_oracle, grad_keys), grad_keys,
                                backends))
        else:
            rows.append(_lenient_float64_row(name, "gradients float64", grads64, g_oracle,
                                             g_budgets, grad_keys, backends))
        optim = _results(runs, name, "optimizers")
        for check, prefix in (("SGD step", "sgd"), ("Adam step", "adam")):
            if optim:
                rows.append(Row(name, check, {b: _judge_step(res, prefix, variants)
                                              for b, res in optim.items() if b in backends}))
    elif grads:
        oracle = _median_oracle(grads, grad_keys) or {}
        rows.append(_row(name, "gradients", grads, oracle,
                         _variant_budgets(grads, None, oracle, grad_keys, rtol=rtol),
                         grad_keys, backends))

    # .keras portability: saved under one backend, loaded under each other.
    for saver in backends:
        if saver not in runs or "save" not in runs[saver].results.get(name, {}):
            continue
        cells = {}
        for b in backends:
            if b == saver or b not in runs:
                continue
            load = runs[b].loads.get((saver, name))
            if load is None:
                if runs[b].errors.get(name, {}).get(f"load:{saver}"):
                    cells[b] = Cell(passed=False, note="load failed")
                continue
            oracle, budgets = forward_oracle
            cell = _judge(load, oracle, out_keys, budgets)
            if not all(bool(load[k]) for k in load if k.startswith("identical/")):
                cell = dataclasses.replace(cell, passed=False, note="weights differ")
            cells[b] = cell
        rows.append(Row(name, f".keras saved by {saver}", cells))
    return rows


def _task_error_rows(cases, runs, backends):
    """A row per case for tasks that raised (so they show as failures)."""
    rows = []
    for case in cases:
        cells = {}
        for b in backends:
            errs = runs[b].errors.get(case.name, {}) if b in runs else {}
            if errs:
                first = next(iter(errs.values())).strip().splitlines()[-1]
                cells[b] = Cell(passed=False, note=f"{', '.join(errs)}: {first}"[:200])
        if cells:
            rows.append(Row(case.name, "errors", cells))
    return rows


def evaluate(cases, runs, backends, rtol=None):
    rows = []
    for case in cases:
        rows.extend(_evaluate_case(case, runs, backends, rtol))
    rows.extend(_task_error_rows(cases, runs, backends))
    worker_errors = {b: r.error for b, r in runs.items()
                     if r.error and r.error != "some tasks failed"}
    return Report(list(backends), rows, worker_errors, runs)


def run_matrix(cases, backends, *, rtol=None, safe_mode=True, on_event=None,
               timeout=1800.0, imports=()):
    """Runs `cases` under `backends` and judges every check; returns a `Report`."""
    runs = run_backends(cases, backends, on_event=on_event, safe_mode=safe_mode,
                        timeout=timeout, imports=imports)
    return evaluate(cases, runs, backends, rtol=rtol)


def expected_cells(case, backends, rtol=None):
    """The (check, backend) cells a complete run of `case` produces.

    Keras's numpy backend runs inference only, and not in float64.

    A report that lacks one of them lost a result somewhere; the tests use
    this to make sure that nothing is silently missing.
    """
    backends = case_backends(case.dtype, backends)
    trainers = [b for b in backends if b in TRAINING_BACKENDS]
    cells = [("forward", b) for b in backends]
    exact = rtol is None
    if case.config is not None:
        if case.dtype != "float64":
            cells += [("forward float64", b) for b in trainers]
        cells += [("attention scores", b) for b in backends]
    elif exact:
        cells += [("forward float64", b) for b in trainers]
    cells += [("jit forward", b) for b in trainers]
    cells += [("forward repeatable", b) for b in backends]
    cells += [("gradients", b) for b in trainers]
    if exact:
        for check in ("gradients float64", "SGD step", "Adam step"):
            cells += [(check, b) for b in trainers]
    for saver in trainers:
        cells += [(f".keras saved by {saver}", b) for b in backends if b != saver]
    return cells
