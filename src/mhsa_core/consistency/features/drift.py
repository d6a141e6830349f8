"""Training drift: does a model trained under one backend train the same under another?

An opt-in feature (`FEATURE`, `base.Feature`): `mhsa-core matrix --steps K`
(and `assert_backends_agree(..., steps=K)`) trains K optimizer steps on each
training backend, twice, from the same weights and on the same data: the
model as it is (its dtype policy, float32 usually) and its float64 twin
(`TaskContext.model64`, whose weights are the model's, cast). Then it
measures, after every step s, how far each backend's float32 run has moved
from the float64 run of the oracle:

- weights: max over all trainable variables of |w_s - w64_s|, relative to
  max|w64_s| of the oracle;
- loss: |loss_s - loss64_s|, relative to the largest |loss64| of the
  oracle's run (the loss crosses zero as it falls, so its own value at a step
  is no scale).

The training (task DRIFT, run in the worker by `train`, on the case's
`task_context.TaskContext`):
- the loss of the gradient checks, `sum(output * L)` with a fixed random L
  (`gradients.loss_weights`), so that every output entry is trained, divided
  by the output's size (a mean: SGD's steps do not grow with the output);
  `training=False`: dropout and batch statistics would draw different random
  numbers on each backend;
- the case's input variants in turn (step s uses variant (s - 1) mod n): a
  case with one variant trains on the same batch at every step;
- a fresh optimizer of `protocol.OPTIMIZER_SETTINGS` per run (Adam by
  default), so the two runs and the backends step with the same settings.

The oracle is the float64 trajectory of TensorFlow if it ran, else the
elementwise median of the backends' float64 trajectories
(`oracles.float64_oracle`).

Judging. Float32 rounding differences are amplified by training, so the
drift grows with the steps and no fixed tolerance fits every model and step.
The peer rule of `budgets.peer_budgets` does: each backend's *own* drift (its
float32 run against its float64 run) measures how much rounding moves this
training run at this step; a backend whose drift from the float64 oracle
exceeds PEER_FACTOR x the median own drift + FLOOR x scale at any step is
flagged. A backend that trains differently (another gradient, another update)
moves away from the oracle while its own two runs stay together, which the
rule catches; a model whose training amplifies rounding a lot gets a budget
that grows with it, on every backend alike. The loss is judged as a whole,
the weights per trainable variable (each its own budget: one variable that
rounding moves a lot must not set the budget of all), except variables that
rounding moves about as much as the loss does (`ROUNDING_DRIVEN`: a key bias,
which softmax ignores), which are shown, not judged. Steps from the one at
which training diverges (float32's range left) are shown, not judged.
docs/consistency.md has the measurements.

The parent side (`series`, `judge_drift`: the "training drift" row;
`series_json`: the report's section `NAME`; `format_tables`: the table after
the main one; `plot`: `--plot`) imports no framework; `plot` imports
matplotlib (Agg), only when a plot is asked for.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import os
import tempfile
from pathlib import Path

import numpy as np

from mhsa_core._text import format_table
from mhsa_core.consistency import budgets, oracles, protocol
from mhsa_core.consistency.arrays import portable
from mhsa_core.consistency.checks import KINDS, Check
from mhsa_core.consistency.features.base import Feature
from mhsa_core.consistency.report import Cell, cell_of

__all__ = [
    "FEATURE",
    "NAME",
    "DriftOptions",
    "DRIFT",
    "CHECK_NAME",
    "ROUNDING_DRIVEN",
    "drift_loss_key",
    "drift_weight_key",
    "drift_recorded_steps",
    "drift_table_steps",
    "check_options",
    "train",
    "DriftSeries",
    "series",
    "judge_drift",
    "report_series",
    "format_tables",
    "check_plot_path",
    "plot",
]

NAME = "drift"  # the feature's name: its report section, its JSON key
CHECK_NAME = "training drift"

# ------------------------------------------------------------ task and keys
DRIFT = "drift"  # K optimizer steps in the case's dtype and in float64
DEFAULT_DRIFT_OPTIMIZER = "adam"  # a key of `protocol.OPTIMIZER_SETTINGS`
# The two training runs of task DRIFT: the model as it is (its dtype policy),
# and its float64 clone, from the same weights.
DRIFT_RUNS = ("train", "train64")
# Weights are kept at most at this many steps (a large model times many steps
# would not fit on disk); losses at every step.
DRIFT_MAX_RECORDED = 64


def drift_table_steps(steps):
    """The steps the drift table shows: 1, K/4, K/2 and K."""
    return sorted({1, max(1, steps // 4), max(1, steps // 2), steps})


def drift_recorded_steps(steps):
    """The steps after which task DRIFT keeps the weights: every step up to
    DRIFT_MAX_RECORDED steps, else that many evenly spaced, always with the
    table's steps."""
    if steps <= DRIFT_MAX_RECORDED:
        return list(range(1, steps + 1))
    spaced = {
        round(1 + i * (steps - 1) / (DRIFT_MAX_RECORDED - 1))
        for i in range(DRIFT_MAX_RECORDED)
    }
    return sorted(spaced | set(drift_table_steps(steps)))


def drift_loss_key(run, s):
    """The loss that step s (1..K) of `run` differentiated, i.e. at the
    weights after s - 1 steps (as `fit` logs a step's loss)."""
    return f"{run}/loss/{s}"


def drift_weight_key(run, s, j):
    """Trainable variable j of `run` after s steps (s of
    `drift_recorded_steps`)."""
    return f"{run}/weight/{s}/{j}"


# Result keys of task DRIFT besides the runs' losses and weights.
_STEPS_KEY = "steps"
_OPTIMIZER_KEY = "optimizer"
_NAMES_KEY = "names"  # the trainable variables' paths
# A trainable variable whose float32 and float64 runs differ (median over the
# backends) by more than this fraction of how far it moved is moved by
# rounding, not by the loss: e.g. a key bias, which softmax ignores (its
# gradient is rounding noise, which Adam scales up to steps of ~lr). Backends
# cannot agree on such a weight and the output does not depend on it; it is
# shown, not judged. Measured on the test model (docs/consistency.md): the two
# key biases are, and only they.
ROUNDING_DRIVEN = 1e-2
_RUN, _RUN64 = DRIFT_RUNS


# ----------------------------------------------------------- the options
def check_options(steps, optimizer, rtol=None):
    """Validated `(steps, optimizer)` of a run: `(None, None)` without steps.

    Raises:
        ValueError: steps not a positive integer, an unknown optimizer, an
            optimizer without steps, or steps with `rtol` (the drift is
            judged against float64 runs, which `rtol` says are impossible).
    """
    if steps is None:
        if optimizer is not None:
            raise ValueError(
                f"`optimizer` needs `steps`. Received: optimizer={optimizer!r}"
            )
        return None, None
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 1:
        raise ValueError(
            f"`steps` must be a positive integer. Received: steps={steps!r}"
        )
    optimizer = DEFAULT_DRIFT_OPTIMIZER if optimizer is None else optimizer
    if optimizer not in protocol.OPTIMIZER_SETTINGS:
        raise ValueError(
            f"`optimizer` must be one of {sorted(protocol.OPTIMIZER_SETTINGS)}. "
            f"Received: optimizer={optimizer!r}"
        )
    if rtol is not None:
        raise ValueError(
            "`steps` judges training against float64 runs; `rtol` is for models that "
            f"cannot run in float64. Received: steps={steps}, rtol={rtol}"
        )
    return int(steps), optimizer


# ---------------------------------------------------------- the worker
def train(ctx, options, timings):
    """Task DRIFT in a worker: K steps of the model and of its float64 twin.

    Args:
        ctx: the case's `task_context.TaskContext`.
        options: `DriftOptions`: the number of optimizer steps K, and the
            optimizer (a key of `protocol.OPTIMIZER_SETTINGS`).
        timings: unused.

    Returns:
        {key: array}: `drift_loss_key(run, s)` for s = 1..K and
        `drift_weight_key(run, s, j)` for the recorded steps s
        (`drift_recorded_steps`), for both runs of
        `DRIFT_RUNS`; the start weights (step 0 of the first run),
        the variables' paths, the steps and the optimizer's name. The model's
        weights are restored afterwards (the other tasks use it).
    """
    from mhsa_core.consistency import gradients  # imports Keras: worker only

    steps, optimizer_name = options.steps, options.optimizer
    keras = ctx.keras
    model = ctx.model
    # Before any step: the twin's weights are the model's, cast to float64.
    model64 = ctx.model64()
    start = [np.array(keras.ops.convert_to_numpy(v)) for v in model.trainable_variables]
    recorded = set(drift_recorded_steps(steps))
    class_name, arguments = protocol.OPTIMIZER_SETTINGS[optimizer_name]
    variants = {
        _RUN: ctx.variants,
        _RUN64: ctx.variants64,
    }
    loss_weights = {}  # per variant: the same L in both runs
    results = {
        _STEPS_KEY: np.asarray(steps),
        _OPTIMIZER_KEY: np.asarray(optimizer_name),
        _NAMES_KEY: np.asarray([v.path for v in model.trainable_variables], dtype=str),
    }
    for j, w in enumerate(start):
        results[drift_weight_key(_RUN, 0, j)] = portable(w)
    try:
        for run, trained in ((_RUN, model), (_RUN64, model64)):
            optimizer = getattr(keras.optimizers, class_name)(**arguments)
            for s in range(1, steps + 1):
                v = (s - 1) % len(variants[run])
                xs = variants[run][v]
                if v not in loss_weights:
                    shape = ctx.forward(trained, xs).shape
                    # The gradient checks' L, over the output's size: a mean,
                    # so that an SGD step does not grow with the output (with
                    # the sum, SGD(0.01) overflowed float32 within 12 steps
                    # on a 2x6x6x8 output). Adam nearly ignores the scale.
                    loss_weights[v] = gradients.loss_weights(shape) / max(
                        1, int(np.prod(shape))
                    )
                loss, _, grads = gradients.value_and_grad(
                    trained, ctx.call_inputs(xs), loss_weights[v]
                )
                results[drift_loss_key(run, s)] = np.asarray(loss, np.float64)
                new = gradients.apply_optimizer_step(trained, grads, optimizer)
                if s in recorded:
                    for j, w in enumerate(new):
                        results[drift_weight_key(run, s, j)] = portable(w)
    finally:
        for variable, w in zip(model.trainable_variables, start):
            variable.assign(w)
    return results


# ---------------------------------------------------------- the parent
@dataclasses.dataclass
class DriftSeries:
    """The drift of one case's training, per backend and step.

    Attributes:
        case: the case's name.
        steps: K.
        optimizer: the key of `protocol.OPTIMIZER_SETTINGS` it trained with.
        oracle: which float64 run is the oracle ("tensorflow float64" or
            "median float64").
        weight_steps: the steps with weights (`drift_recorded_steps`).
        weights, own_weights: {backend: [drift per weight step]}: max over all
            weights of |w - w64| / max|w64|, against the oracle and against the
            backend's own float64 run (what the table and plot show).
        weight_cells: {backend: [Cell per weight step]}: the worst trainable
            variable against its own peer budget (what is judged).
        loss, own_loss: {backend: [relative drift per step 1..K]}.
        loss_budgets: [relative budget per step 1..K].
        names: the trainable variables' paths.
        rounding_driven: [per weight step, the indices of the variables moved
            by rounding more than by the loss (`ROUNDING_DRIVEN`): not judged].
        diverges: the first step at which training diverges (the float64
            oracle leaves float32's range or is not finite, or most backends'
            own float32 runs are not finite), or None. Steps from there on are
            shown, not judged: the runs no longer compute the same thing.
    """

    case: str
    steps: int
    optimizer: str
    oracle: str
    weight_steps: list
    weights: dict = dataclasses.field(default_factory=dict)
    own_weights: dict = dataclasses.field(default_factory=dict)
    weight_cells: dict = dataclasses.field(default_factory=dict)
    loss: dict = dataclasses.field(default_factory=dict)
    own_loss: dict = dataclasses.field(default_factory=dict)
    loss_budgets: list = dataclasses.field(default_factory=list)
    diverges: int | None = None
    names: list = dataclasses.field(default_factory=list)
    rounding_driven: list = dataclasses.field(default_factory=list)

    @property
    def judged(self):
        """The last step judged."""
        return self.steps if self.diverges is None else self.diverges - 1

    @property
    def backends(self):
        return list(self.weights)

    def loss_cell(self, backend, s):
        """The loss of step s (1..K) against its budget."""
        return cell_of(
            self.loss[backend][s - 1], self.loss_budgets[s - 1], note=f"loss, step {s}"
        )

    def step_cell(self, backend, s):
        """The worst of the weights and the loss at a weight step s."""
        cells = [
            self.weight_cells[backend][self.weight_steps.index(s)],
            self.loss_cell(backend, s),
        ]
        return _worst(cells)

    def cell(self, backend):
        """The backend's worst step, weights or loss: the check's cell."""
        cells = [
            c
            for s, c in zip(self.weight_steps, self.weight_cells[backend])
            if s <= self.judged
        ]
        cells += [self.loss_cell(backend, s) for s in range(1, self.judged + 1)]
        if self.diverges is None:
            return _worst(cells)
        why = f"training diverges at step {self.diverges}, not judged from there"
        if not cells:
            return Cell(passed=None, note=why)
        worst = _worst(cells)
        return dataclasses.replace(worst, note=f"{worst.note}; {why}")


def _worst(cells):
    """The failing cell of the highest ratio, else the passing one (cells
    without a verdict only when there is nothing else)."""
    judged = [c for c in cells if c.passed is not None]
    if not judged:
        return cells[0] if cells else Cell(passed=None, note="nothing to compare")
    failing = [c for c in judged if c.passed is False]
    return max(failing or judged, key=lambda c: c.ratio)


def _relative(error, magnitude):
    if not math.isfinite(error):
        return math.inf
    if magnitude > 0:
        return error / magnitude
    return 0.0 if error == 0 else math.inf


def _max_abs(a, b):
    error = budgets.max_abs(a, b)
    return math.inf if math.isnan(error) else error


def _peer_median(drifts):
    """The median over the backends of their own drifts (`oracles.median`), a
    NaN counted as infinite: a backend whose own run broke is the farthest
    off, not a hole in the median."""
    return float(oracles.median([math.inf if math.isnan(d) else d for d in drifts]))


_FLOAT32_MAX = float(np.finfo(np.float32).max)


def _in_range(arrays):
    """Whether float32 can hold every value of `arrays` (finite, |x| <= max)."""
    return all(
        np.all(np.isfinite(a)) and np.max(np.abs(a), initial=0) <= _FLOAT32_MAX
        for a in arrays
    )


def series(name, results):
    """The `DriftSeries` of case `name` from {backend: its DRIFT result};
    None without any result.

    Raises:
        ValueError: no oracle (the backends' weights differ in shape or number).
    """
    results = {b: r for b, r in results.items() if _STEPS_KEY in r}
    if not results:
        return None
    first = next(iter(results.values()))
    steps, optimizer = int(first[_STEPS_KEY]), str(first[_OPTIMIZER_KEY])
    weight_steps = drift_recorded_steps(steps)
    n = sum(1 for k in first if k.startswith(f"{_RUN}/weight/{weight_steps[0]}/"))
    loss64 = [drift_loss_key(_RUN64, s) for s in range(1, steps + 1)]
    weights64 = [drift_weight_key(_RUN64, s, j) for s in weight_steps for j in range(n)]
    # A run that stopped midway writes nothing: every result has every key.
    wanted = (
        loss64 + weights64 + [k.replace(_RUN64, _RUN, 1) for k in loss64 + weights64]
    )
    wanted += [drift_weight_key(_RUN, 0, j) for j in range(n)]
    results = {b: r for b, r in results.items() if all(k in r for k in wanted)}
    oracle = oracles.float64_oracle(results, loss64 + weights64) if results else None
    if oracle is None:
        raise ValueError(
            "no float64 oracle: the backends' weights differ in shape or number"
        )
    tf = "tensorflow" in results
    out = DriftSeries(
        name,
        steps,
        optimizer,
        "tensorflow float64" if tf else "median float64",
        weight_steps,
    )
    names = first.get(_NAMES_KEY)
    out.names = (
        [str(x) for x in names]
        if names is not None and len(names) == n
        else [f"weight {j}" for j in range(n)]
    )
    diverges = []
    for s in weight_steps:
        if not _weight_step(out, results, oracle, s, n):
            diverges.append(s)
    in_range = [_in_range([oracle[k]]) for k in loss64]
    diverges += [s for s, ok in enumerate(in_range, start=1) if not ok]
    # The loss's scale: its largest value before training diverges.
    magnitude = max(
        (abs(float(oracle[k])) for k, ok in zip(loss64, in_range) if ok), default=0.0
    )
    for s, key64 in enumerate(loss64, start=1):
        for b, r in results.items():
            loss = float(r[drift_loss_key(_RUN, s)])
            out.loss.setdefault(b, []).append(
                _relative(abs(loss - float(oracle[key64])), magnitude)
            )
            out.own_loss.setdefault(b, []).append(
                _relative(abs(loss - float(r[key64])), magnitude)
            )
        own = _peer_median([out.own_loss[b][-1] for b in results])
        if not math.isfinite(own):
            diverges.append(s)
        out.loss_budgets.append(budgets.PEER_FACTOR * own + budgets.FLOOR)
    out.diverges = min(diverges, default=None)
    return out


def _weight_step(out, results, oracle, s, n):
    """The weights after step s: the drift shown (all weights at once) and the
    cells judged (each trainable variable against its own peer budget).
    Returns whether the runs still compute the same thing (False: the oracle
    out of float32's range, or most own float32 runs not finite)."""
    w64 = [oracle[drift_weight_key(_RUN64, s, j)] for j in range(n)]
    # The start is the same everywhere (the case's weights).
    start = [
        next(iter(results.values()))[drift_weight_key(_RUN, 0, j)] for j in range(n)
    ]
    # errors[b][j], own[b][j]: |w - w64| against the oracle and the backend's own.
    errors, own = {}, {}
    for b, r in results.items():
        w = [r[drift_weight_key(_RUN, s, j)] for j in range(n)]
        errors[b] = [_max_abs(a, o) for a, o in zip(w, w64)]
        own[b] = [
            _max_abs(a, r[drift_weight_key(_RUN64, s, j)]) for j, a in enumerate(w)
        ]
    magnitude = budgets.scale(w64)
    medians = [_peer_median([own[b][j] for b in results]) for j in range(n)]
    limits = [
        budgets.PEER_FACTOR * medians[j] + budgets.FLOOR * budgets.scale([w64[j]])
        for j in range(n)
    ]
    judged = [
        j
        for j in range(n)
        if not medians[j] > ROUNDING_DRIVEN * _max_abs(w64[j], start[j])
    ]
    out.rounding_driven.append([j for j in range(n) if j not in judged])
    for b in results:
        out.weights.setdefault(b, []).append(
            _relative(max(errors[b], default=0.0), magnitude)
        )
        out.own_weights.setdefault(b, []).append(
            _relative(max(own[b], default=0.0), magnitude)
        )
        cells = [
            cell_of(errors[b][j], limits[j], note=f"{out.names[j]}, step {s}")
            for j in judged
        ]
        out.weight_cells.setdefault(b, []).append(
            _worst(cells) if cells else Cell(passed=None, note="no weight judged")
        )
    return _in_range(w64) and all(math.isfinite(limit) for limit in limits)


def judge_drift(ctx, saver):
    """The check's cells: each training backend's worst step (`DriftSeries.cell`)."""
    results = ctx.results(DRIFT)
    try:
        drift = series(ctx.name, results)
    except ValueError as e:
        return {b: Cell(passed=False, note=str(e)) for b in results}
    if drift is None:
        return None
    if len(drift.backends) < 2:
        only = ", ".join(drift.backends)
        return {
            b: Cell(passed=None, note=f"only {only} trained: nothing was compared")
            for b in drift.backends
        }
    return {b: drift.cell(b) for b in drift.backends}


def _finite(values):
    """JSON-ready numbers: a non-finite one is null (strict JSON)."""
    return [float(v) if math.isfinite(v) else None for v in values]


def series_json(drift):
    """A `DriftSeries` as strict JSON: what the table and the plot show, at
    every recorded step (non-finite numbers are null)."""
    return {
        "case": drift.case,
        "steps": drift.steps,
        "optimizer": drift.optimizer,
        "oracle": drift.oracle,
        "diverges": drift.diverges,
        "judged_up_to": drift.judged,
        "weight_steps": list(drift.weight_steps),
        "weights": {b: _finite(v) for b, v in drift.weights.items()},
        "own_weights": {b: _finite(v) for b, v in drift.own_weights.items()},
        "loss": {b: _finite(v) for b, v in drift.loss.items()},
        "own_loss": {b: _finite(v) for b, v in drift.own_loss.items()},
        "loss_budgets": _finite(drift.loss_budgets),
        "ratios": {
            b: _finite(
                [
                    drift.step_cell(b, s).ratio
                    for s in drift.weight_steps
                    if s <= drift.judged
                ]
            )
            for b in drift.backends
        },
        "not_judged_weights": sorted(
            {drift.names[j] for step in drift.rounding_driven for j in step}
        ),
    }


def report_series(report):
    """[DriftSeries] of every case of `report` with a drift row, in report order."""
    out = []
    for row in report.rows:
        if row.check != CHECK_NAME:
            continue
        results = {
            b: run.results[row.case][DRIFT]
            for b, run in report.runs.items()
            if DRIFT in run.results.get(row.case, {})
        }
        try:
            drift = series(row.case, results)
        except ValueError:  # the row says why
            continue
        if drift is not None:
            out.append(drift)
    return out


def _number(value):
    return "inf" if not math.isfinite(value) else f"{value:.1e}"


def _ratio(cell):
    if cell.ratio is None:
        return "-"
    return "inf" if not math.isfinite(cell.ratio) else f"{cell.ratio:.2f}"


def _rounding_note(drift):
    """Which weights were not judged (moved by rounding), over all steps."""
    skipped = sorted({j for step in drift.rounding_driven for j in step})
    if not skipped:
        return ""
    return (
        "not judged, moved by rounding more than by the loss (float32 and float64 "
        f"differ by > {ROUNDING_DRIVEN:g} of their motion): "
        + ", ".join(drift.names[j] for j in skipped)
        + "\n"
    )


def format_tables(report):
    """The drift of every case at steps 1, K/4, K/2, K, as text ("" without any)."""
    parts = []
    for drift in report_series(report):
        backends = drift.backends
        header = [
            "step",
            *(f"{b} weights" for b in backends),
            "loss budget",
            *(f"{b} loss" for b in backends),
            *(f"{b} ratio" for b in backends),
        ]
        rows = []
        for s in drift_table_steps(drift.steps):
            i = drift.weight_steps.index(s)
            rows.append(
                [
                    s,
                    *(_number(drift.weights[b][i]) for b in backends),
                    _number(drift.loss_budgets[s - 1]),
                    *(_number(drift.loss[b][s - 1]) for b in backends),
                    *(
                        _ratio(drift.step_cell(b, s)) if s <= drift.judged else "-"
                        for b in backends
                    ),
                ]
            )
        parts.append(
            f"training drift of {drift.case}: {drift.steps} {drift.optimizer} "
            f"steps from the same weights and data, float32 against {drift.oracle}\n"
            + (
                ""
                if drift.diverges is None
                else f"training diverges at step {drift.diverges} (the float64 run "
                "leaves float32's range, or the float32 runs are not finite): judged "
                f"up to step {drift.judged}\n"
            )
            + "weights: max|w - w64| / max|w64| over all weights; loss: "
            "|loss - loss64| / max|loss64|; ratio: the worst of the loss and of each "
            "trainable variable, drift / budget (<= 1 passes); budget: "
            f"{budgets.PEER_FACTOR:g} x the median over backends of their own "
            f"float32-vs-float64 drift + {budgets.FLOOR:g} x scale\n"
            + _rounding_note(drift)
            + format_table(header, rows)
        )
    return "\n\n".join(parts)


def check_plot_path(path):
    """Raises ValueError (one line) unless a plot can be written at `path`;
    writes nothing."""
    path = Path(path)
    parent = path.parent if str(path.parent) else Path(".")
    if path.is_dir():
        raise ValueError(f"the plot path is a directory. Received: plot={str(path)!r}")
    if not parent.is_dir():
        raise ValueError(
            f"the plot's directory does not exist. Received: plot={str(path)!r}"
        )
    if not os.access(parent, os.W_OK) or (
        path.exists() and not os.access(path, os.W_OK)
    ):
        raise ValueError(f"the plot path is not writable. Received: plot={str(path)!r}")


def plot(report, path):
    """A PNG of the drift vs step of every case and backend, with the budgets.

    One column per case, log scales: the weights' drift, the loss's drift
    (its budget dashed), and each step's worst drift / budget (weights judged
    per trainable variable; 1 dashed). Written atomically (a temporary file renamed).

    Returns:
        The number of cases plotted (0: nothing written).
    """
    import matplotlib

    matplotlib.use("Agg")  # no display: a file only
    from matplotlib import pyplot as plt
    from matplotlib.ticker import MaxNLocator

    drifts = report_series(report)
    if not drifts:
        return 0
    columns = len(drifts)
    figure, axes = plt.subplots(3, columns, figsize=(5.5 * columns, 9.5), squeeze=False)
    tiny = budgets.FLOOR / 100  # log scale: an exact 0 drawn at the bottom
    for c, drift in enumerate(drifts):
        loss_steps = list(range(1, drift.steps + 1))
        panels = (
            (
                "weights: max|w - w64| / max|w64|",
                drift.weight_steps,
                drift.weights,
                None,
                None,
            ),
            (
                "loss: |loss - loss64| / max|loss64|",
                loss_steps,
                drift.loss,
                drift.loss_budgets,
                "budget",
            ),
            (
                "worst drift / budget (<= 1 passes)",
                drift.weight_steps,
                {
                    b: [drift.step_cell(b, s).ratio for s in drift.weight_steps]
                    for b in drift.backends
                },
                [1.0] * len(drift.weight_steps),
                "1 = budget",
            ),
        )
        for r, (what, steps, values, limits, label) in enumerate(panels):
            ax = axes[r][c]
            for b in drift.backends:
                ax.plot(steps, [max(v, tiny) for v in values[b]], marker=".", label=b)
            if limits is not None:
                ax.plot(steps, limits, "k--", label=label)
            ax.set_yscale("log")
            ax.set_xlabel("optimizer step")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.set_ylabel(what, fontsize=8)
            ax.grid(True, alpha=0.3)
            if r == 0:
                ax.set_title(
                    f"{drift.case}: {drift.optimizer}, vs {drift.oracle}", fontsize=9
                )
            ax.legend(fontsize=7)
    figure.tight_layout()
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=".drift-", suffix=".png", dir=path.parent or ".")
    try:
        with os.fdopen(fd, "wb") as f:
            figure.savefig(f, format="png", dpi=100)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
    finally:
        plt.close(figure)
    return len(drifts)


# ================================================================== feature
# Opt-in (`--steps K`): K optimizer steps in float32 and float64 on each
# training backend, judged by the peer rule at every step.
CHECK = Check(
    CHECK_NAME,
    (DRIFT,),
    judge_drift,
    float64_cases=False,
    exact_for=KINDS,
    backends="training",
)


@dataclasses.dataclass(frozen=True)
class DriftOptions:
    """steps: optimizer steps to train (None: no training); optimizer: a key
    of `protocol.OPTIMIZER_SETTINGS` (with steps; `DEFAULT_DRIFT_OPTIMIZER`)."""

    steps: int | None = None
    optimizer: str | None = None


class _Drift(Feature):
    name = NAME
    Options = DriftOptions
    tasks = {DRIFT: train}
    checks = (CHECK,)
    examples = ("mhsa-core matrix --model my_model.keras --steps 20 --plot drift.png",)

    # Its own keywords only (`features.options` passes no other): narrower
    # than the base's **keywords on purpose.
    def options(self, *, rtol=None, steps=None, optimizer=None):  # type: ignore[override]
        return DriftOptions(*check_options(steps, optimizer, rtol))

    def enabled(self, options):
        return options.steps is not None

    def add_arguments(self, parser):
        parser.add_argument(
            "--steps",
            metavar="K",
            help="also train K optimizer steps on each training backend, in float32 "
            "and float64 from the same weights and data, and judge how far "
            "each drifts from the float64 run (a 'training drift' row and a "
            "table of steps)",
        )
        parser.add_argument(
            "--optimizer",
            metavar="NAME",
            help=f"the optimizer of --steps: {'|'.join(protocol.OPTIMIZER_SETTINGS)} "
            f"(default {DEFAULT_DRIFT_OPTIMIZER})",
        )
        parser.add_argument(
            "--plot",
            metavar="PATH.png",
            help="with --steps: a PNG of the drift vs step per backend "
            "(needs matplotlib: mhsa-core[plot])",
        )

    def options_from_args(self, args):
        """`--steps/--optimizer/--plot`, checked before any worker starts."""
        if args.steps is None:
            if args.optimizer is not None or args.plot is not None:
                raise ValueError("--optimizer and --plot need --steps")
            return DriftOptions()
        try:
            steps = int(args.steps)
        except ValueError:
            steps = 0
        if steps < 1:
            raise ValueError(
                f"--steps expects a positive integer; received: {args.steps!r}"
            )
        optimizer = args.optimizer or DEFAULT_DRIFT_OPTIMIZER
        if optimizer not in protocol.OPTIMIZER_SETTINGS:
            raise ValueError(
                f"--optimizer expects one of {'|'.join(protocol.OPTIMIZER_SETTINGS)}; "
                f"received: {args.optimizer!r}"
            )
        if args.rtol is not None:
            raise ValueError(
                "--steps judges training against float64 runs, which --rtol "
                "(a model that cannot run in float64) rules out"
            )
        if args.plot is not None:
            if importlib.util.find_spec("matplotlib") is None:
                raise ValueError(
                    "--plot needs matplotlib: pip install 'mhsa-core[plot]'"
                )
            try:
                check_plot_path(args.plot)
            except ValueError as e:
                raise ValueError(f"--plot: {e}") from None
        return DriftOptions(steps, optimizer)

    def section(self, report, cases, rtol=None):
        return [series_json(s) for s in report_series(report)] or None

    def tables(self, report, options):
        if not self.enabled(options):
            return []
        return [format_tables(report) or "training drift: no results"]

    def write_outputs(self, report, args, out):
        if args.plot is None:
            return
        try:
            plotted = plot(report, args.plot)
        except OSError as e:
            raise ValueError(f"cannot write --plot {args.plot}: {e}") from None
        print(
            f"drift plot: {args.plot}" if plotted else "drift plot: nothing to plot",
            file=out,
        )


FEATURE = _Drift()
