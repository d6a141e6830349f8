"""The checks of the matrix, each declared once in `CHECKS`.

A `Check` says which worker tasks it reads, which cases and backends it
applies to, and how it judges them (its `judge`). Everything that enumerates
checks is derived from the list of all checks (`matrix.all_checks`: `CHECKS`,
then each opt-in feature's `checks`, then `ERRORS_CHECK`): the tasks a case
runs (`matrix.run_matrix`), the cells a complete report has
(`matrix.expected_cells`), the report's rows and so its table and JSON
(`matrix.evaluate`). Adding a check is appending one `Check` to `CHECKS`
(and, if it needs a result no task computes yet, a task in `protocol` and
`tasks`), or, for work no default run should pay for, to a feature's
`checks` (`features`).

Oracles and budgets (`oracles`, `budgets`; the README's tolerance policy has
the reasoning):
- layer cases, forward, jit, scores and `.keras` loads: `mhsa_core.reference`
  in float64, with `reference.budget`'s rule;
- float64 results: FLOAT64_RTOL x max|oracle|;
- gradients, and every check of a user model: the float64 runs (TensorFlow's,
  else the median), peer budgets (`budgets.peer_budgets`); without a float64
  run (or with `rtol` given) the median float32 result and rtol x max|oracle|;
- SGD and Adam steps: the update formula applied in float64 to this backend's
  own start weights and float32 gradients (the gradients themselves are the
  "gradients" row).

Gradients and optimizer steps are taken for every input variant of a case (as
the forward pass: e.g. a position table differentiated at its reference size
and through its resizing to another), budgets per variant.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable

from mhsa_core._text import last_line
from mhsa_core.consistency import budgets, oracles, protocol
from mhsa_core.consistency.oracles import Oracle
from mhsa_core.consistency.protocol import (
    FORWARD,
    FORWARD64,
    GRADS,
    GRADS64,
    JIT,
    OPTIMIZERS,
    SAVE,
    SCORES,
)
from mhsa_core.consistency.report import Cell, Row, cell_of

__all__ = [
    "Check",
    "CHECKS",
    "ERRORS",
    "ERRORS_CHECK",
    "KINDS",
    "CaseContext",
    "SharedOracle",
    "judge",
    "judge_quantized",
    "judge_step",
]

KINDS = ("layer", "model")
# The row of tasks that raised (the CLI prints their tracebacks' last lines).
ERRORS = "errors"


# ------------------------------------------------------------ judging
def judge(result, oracle, keys, by_key):
    """The worst key of one backend's result as a Cell (a failing key first).

    Args:
        result: {key: array} of one backend.
        oracle: {key: array}.
        keys: the keys to compare; a key missing from `result` fails.
        by_key: {key: budget}.
    """
    cells = []
    for k in keys:
        error = budgets.max_abs(result[k], oracle[k]) if k in result else math.inf
        cells.append(cell_of(error, by_key[k], note=k if len(keys) > 1 else ""))
    if not cells:
        return Cell(passed=None, note="nothing to compare")
    failing = [c for c in cells if not c.passed]
    return max(failing or cells, key=lambda c: c.ratio)


def judge_step(result, optimizer, variants):
    """A backend's optimizer step against `oracles.step_oracle` applied to its
    own start weights and gradients, for each of `variants` input variants
    (one step each, from the same start)."""
    n = protocol.count_keys(result, protocol.START_PREFIX)
    keys, oracle, by_key = [], {}, {}
    for v in range(variants):
        group = [protocol.step_key(optimizer, v, j) for j in range(n)]
        if not all(protocol.step_grad_key(v, j) in result for j in range(n)):
            return Cell(passed=False, note=f"no {optimizer} step of input variant {v}")
        for j, key in enumerate(group):
            oracle[key] = oracles.step_oracle(
                optimizer,
                result[protocol.start_key(j)],
                result[protocol.step_grad_key(v, j)],
            )
        steps = [
            oracle[key] - result[protocol.start_key(j)] for j, key in enumerate(group)
        ]
        budget = budgets.step_budget([oracle[k] for k in group], steps)
        by_key.update({k: budget for k in group})
        keys += group
    return judge(result, oracle, keys, by_key)


def judge_quantized(result, oracle, keys):
    """`judge` against an oracle's float32 budgets first (its ratio is the
    informative one); a quantized case's step slack (`plain_budgets` set:
    `budgets.quantization_steps`) only where that fails, and said: a rounding
    flip of the activation quantizer."""
    plain = getattr(oracle, "plain_budgets", None) or oracle.budgets
    cell = judge(result, oracle.values, keys, plain)
    if not cell.passed and plain is not oracle.budgets:
        slack = judge(result, oracle.values, keys, oracle.budgets)
        if slack.passed:
            note = "within one int8 step (a rounding flip)"
            cell = dataclasses.replace(
                slack, note=f"{slack.note}: {note}" if slack.note else note
            )
    return cell


@dataclasses.dataclass(frozen=True)
class SharedOracle:
    """An oracle that several checks judge against.

    Attributes:
        values: {key: array}; None when the backends' shapes differ (no median).
        budgets: {key: budget}.
        keys: the keys judged.
        float64: taken from the backends' float64 runs (else the NumPy
            reference, or the median of float32 runs).
    """

    values: dict | None
    budgets: dict
    keys: list
    float64: bool = False
    plain_budgets: dict | None = None  # without a quantized case's step slack


class CaseContext:
    """What the checks of one case read: the case, every backend's results,
    and the oracles several checks share (computed once, on first use).

    Args:
        case: a `cases.Case`.
        runs: {backend: runner.BackendRun}.
        backends: the report's backends, in order.
        rtol: the user's tolerance, or None (oracles from float64 runs).
    """

    def __init__(self, case, runs, backends, rtol=None):
        self.case = case
        self.runs = runs
        self.backends = list(backends)
        self.rtol = rtol

    @property
    def name(self):
        return self.case.name

    @property
    def variants(self):
        return len(self.case.variants)

    @functools.cached_property
    def out_keys(self):
        """Every output of every input variant: `out_key(v)`, and for a
        multi-output model `output_key(v, o)` of each output any backend
        returned (a backend that lacks one fails it)."""
        keys = [protocol.out_key(v) for v in range(self.variants)]
        found = {
            **self.results(FORWARD),
            **{f"{b}64": r for b, r in self.results(FORWARD64).items()},
        }
        more = [
            k
            for k in protocol.keys_with(found, (protocol.OUT_PREFIX,))
            if k not in keys
        ]
        return keys + more

    def results(self, task):
        """{backend: result} of `task` on the backends that returned one."""
        return {
            b: r.results[self.name][task]
            for b, r in self.runs.items()
            if b in self.backends and task in r.results.get(self.name, {})
        }

    @property
    def uses_reference(self):
        """Whether the NumPy reference is this case's oracle: our layer, not
        quantized (the reference has no quantized arithmetic: a quantized
        case is judged as a model, against its float64 twins)."""
        return self.case.kind == "layer" and not self.case.quantization

    def _with_steps(self, oracle, budgets_by_key, keys):
        """`budgets.quantization_steps` of a quantized case, else as given."""
        return budgets.quantization_steps(
            budgets_by_key, oracle, keys, self.case.quantization
        )

    @functools.cached_property
    def reference(self) -> dict[str, oracles.Oracle]:
        """`oracles.reference_oracles` of a layer case."""
        return oracles.reference_oracles(self.case)

    @functools.cached_property
    def forward(self):
        """The oracle of every forward output (forward, jit, `.keras` loads)."""
        keys = self.out_keys
        if self.uses_reference:
            return SharedOracle(*self.reference["out"], keys)
        fwd, fwd64 = self.results(FORWARD), self.results(FORWARD64)
        oracle = (
            None
            if self.rtol is not None or not fwd64
            else oracles.float64_oracle(fwd64, keys)
        )
        if oracle is not None:
            plain = budgets.peer_budgets(fwd, fwd64, oracle, keys)
            return SharedOracle(
                oracle,
                self._with_steps(oracle, plain, keys),
                keys,
                float64=True,
                plain_budgets=plain,
            )
        # No float64 run: the median float32 result and an explicit rtol.
        oracle = oracles.median_oracle(fwd, keys)
        return SharedOracle(
            oracle,
            {}
            if oracle is None
            else budgets.peer_budgets(fwd, None, oracle, keys, rtol=self.rtol),
            keys,
        )

    @functools.cached_property
    def gradients(self):
        """The gradients' oracle (None: no gradients came back at all)."""
        grads, grads64 = self.results(GRADS), self.results(GRADS64)
        keys = protocol.keys_with(grads64 or grads, protocol.GRADIENT_PREFIXES)
        oracle = (
            oracles.float64_oracle(grads64, keys)
            if grads64 and self.rtol is None
            else None
        )
        if oracle is not None:
            plain = budgets.variant_budgets(grads, grads64, oracle, keys)
            return SharedOracle(
                oracle,
                self._with_steps(oracle, plain, keys),
                keys,
                float64=True,
                plain_budgets=plain,
            )
        if not grads:
            return None
        oracle = oracles.median_oracle(grads, keys)
        return SharedOracle(
            oracle,
            {}
            if oracle is None
            else budgets.variant_budgets(grads, None, oracle, keys, rtol=self.rtol),
            keys,
        )

    # ---------------------------------------------------------- cells
    def compare(self, task, oracle, keys):
        """{backend: Cell} of `task`'s results against `oracle` (`values` and
        `budgets`) on `keys`."""
        results = self.results(task)
        if oracle.values is None:
            return {
                b: Cell(passed=False, note="no oracle: the backends' shapes differ")
                for b in results
            }
        return {b: judge_quantized(res, oracle, keys) for b, res in results.items()}

    def lenient_float64(self, task, oracle, float32_budgets, keys):
        """float64 cells of a user model: a deviation that float32 arithmetic
        explains (within the float32 budget) is reported, not failed: it is
        Keras computing some float64 ops in float32 on that backend (see
        `oracles.float64_oracle`)."""
        strict = budgets.float64_budgets(oracle, keys)
        cells = {}
        for b, res in self.results(task).items():
            cell = judge(res, oracle, keys, strict)
            if not cell.passed and judge(res, oracle, keys, float32_budgets).passed:
                cell = dataclasses.replace(
                    cell, passed=None, note="float32-level (Keras)"
                )
            cells[b] = cell
        return cells

    def missing_variants(self, task, keys):
        """Failing cells when some input variant has no gradients on any
        backend (the oracle's keys come from the results: a lost variant
        would not show), else None."""
        present = {protocol.variant_of(k) for k in keys}
        missing = [v for v in range(self.variants) if v not in present]
        if not missing:
            return None
        return {
            b: Cell(passed=False, note=f"no gradients of input variant(s) {missing}")
            for b in self.results(task)
        }

    def oracle_note(self):
        """What this case's results were compared with, in words (a report note)."""
        parts = []
        if self.uses_reference:
            parts.append(
                "forward, scores, jit and .keras loads: the NumPy float64 "
                "reference (mhsa_core.reference)"
            )
        else:
            forward = self.forward
            parts.append(
                _describe_oracle(
                    "forward, jit and .keras loads",
                    self.results(FORWARD64)
                    if forward.float64
                    else self.results(FORWARD),
                    forward.float64,
                    self.backends,
                )
            )
        grads = self.gradients
        if grads is not None:
            parts.append(
                _describe_oracle(
                    "gradients",
                    self.results(GRADS64) if grads.float64 else self.results(GRADS),
                    grads.float64,
                    self.backends,
                )
            )
        if self.case.quantization:
            parts.append(
                f"quantized ({self.case.quantization}): the float64 runs are "
                "the quantized model's twins (its integers and scales)"
            )
        return f"{self.name}: " + "; ".join(parts)

    def saved(self, saver):
        """Whether `saver` saved this case's model."""
        run = self.runs.get(saver)
        return run is not None and SAVE in run.results.get(self.name, {})


def _describe_oracle(what, results, float64, backends):
    """`what`'s oracle in words: whose runs it is made of (`oracles`)."""
    kind = "float64" if float64 else "float32"
    names = [b for b in backends if b in results]
    if float64 and "tensorflow" in names:
        return f"{what}: TensorFlow's float64 run"
    if len(names) == 1:
        return f"{what}: {names[0]}'s own {kind} run only (nothing to compare it with)"
    if len(names) == 2:
        return (
            f"{what}: the midpoint of {names[0]} and {names[1]} ({kind}): a "
            f"disagreement between them cannot be attributed to one of them"
        )
    return (
        f"{what}: the median of the {kind} runs of {', '.join(names) or 'no backend'}"
    )


# -------------------------------------------------------------- checks
@dataclasses.dataclass(frozen=True)
class Check:
    """One check of the matrix: one report row per case it applies to (one
    per saving backend with `per_saver`).

    Attributes:
        name: the row's title; with `per_saver`, a format string with
            `{saver}`.
        tasks: the worker tasks whose results it reads.
        judge: `judge(ctx, item) -> {backend: Cell}` or None for no row;
            `ctx` a `CaseContext`, `item` the saving backend (`per_saver`),
            the row's item (`each`) or None.
        kinds: the case kinds it applies to ("layer": our layer, with its
            NumPy oracle; "model": a user's `.keras` file).
        float64_cases: whether it applies to cases computed in float64.
        quantized_cases: whether it applies to quantized cases (the attention
            scores have a NumPy oracle only for a float layer).
        exact_for: the case kinds for which it needs `rtol=None` (its oracle
            is a float64 run; a user's `rtol` means there is none).
        backends: "case": every backend that runs the case
            (`protocol.case_backends`); "training": those of them in
            `protocol.TRAINING_BACKENDS`.
        per_saver: one row per backend that saves the case's `.keras` file;
            its cells are the other backends (that load it).
        expected: False for a row that only appears when something went
            wrong (no cells of a complete run).
        each: one row per item of `each(case)` (e.g. the formats a case is
            exported in; no item, no row): `name` is a format string with
            `{}`, and `judge` gets the item as its second argument.
    """

    name: str
    tasks: tuple
    judge: Callable
    kinds: tuple = KINDS
    float64_cases: bool = True
    exact_for: tuple = ()
    backends: str = "case"
    quantized_cases: bool = True
    per_saver: bool = False
    expected: bool = True
    each: Callable | None = None

    def applies(self, case, rtol=None):
        """Whether `case` has this check (with the user's `rtol`)."""
        if case.kind not in self.kinds:
            return False
        if self.each is not None and not self.each(case):
            return False
        if case.dtype == "float64" and not self.float64_cases:
            return False
        if case.quantization and not self.quantized_cases:
            return False
        # A task not among the matrix's own is an opt-in feature's: it runs
        # only where it was asked for (`Feature.apply`).
        if any(t not in protocol.ALL_TASKS and t not in case.tasks for t in self.tasks):
            return False
        return not (rtol is not None and case.kind in self.exact_for)

    def title(self, item=None):
        """The row's title: `name`, with the saver (`per_saver`) or the item
        (`each`)."""
        if self.per_saver:
            return self.name.format(saver=item)
        if self.each is not None:
            return self.name.format(item)
        return self.name

    def cell_backends(self, case, backends):
        """The backends of its cells for `case` (the loaders with `per_saver`)."""
        runners = protocol.case_backends(case.dtype, backends)
        if self.backends == "training":
            return [b for b in runners if b in protocol.TRAINING_BACKENDS]
        return runners

    def savers(self, case, backends):
        """The backends whose saved files it judges (`per_saver`)."""
        return [
            b
            for b in protocol.case_backends(case.dtype, backends)
            if b in protocol.TRAINING_BACKENDS
        ]

    def expected_cells(self, case, backends, rtol=None):
        """[(row title, backend)] of a complete run of `case`."""
        if not self.expected or not self.applies(case, rtol):
            return []
        loaders = self.cell_backends(case, backends)
        if self.per_saver:
            return [
                (self.title(s), b)
                for s in self.savers(case, backends)
                for b in loaders
                if b != s
            ]
        if self.each is not None:
            return [(self.title(x), b) for x in self.each(case) for b in loaders]
        return [(self.name, b) for b in loaders]

    def rows(self, ctx):
        """Its report rows for the case of `ctx` (a `CaseContext`)."""
        if not self.applies(ctx.case, ctx.rtol):
            return []
        items = [s for s in ctx.backends if ctx.saved(s)] if self.per_saver else [None]
        if self.each is not None:
            items = list(self.each(ctx.case))
        rows = []
        for item in items:
            cells = self.judge(ctx, item)
            if cells is not None:
                rows.append(Row(ctx.name, self.title(item), cells))
        return rows


# ------------------------------------------------------------- judges
def _forward(ctx, saver):
    return ctx.compare(FORWARD, ctx.forward, ctx.out_keys)


def _forward64(ctx, saver):
    if ctx.uses_reference:  # our block: float64 everywhere, strictly
        return ctx.compare(FORWARD64, ctx.reference["out64"], ctx.out_keys)
    forward = ctx.forward
    if not forward.float64:
        return None
    if ctx.case.kind == "layer":
        # Our block quantized: its twins run the same integers in float64 on
        # every backend, strictly (a backend's own quantizer arithmetic, a
        # rounding mode, a scale, shows here at any size).
        strict = budgets.float64_budgets(forward.values, ctx.out_keys)
        return ctx.compare(FORWARD64, Oracle(forward.values, strict), ctx.out_keys)
    return ctx.lenient_float64(FORWARD64, forward.values, forward.budgets, ctx.out_keys)


def _scores(ctx, saver):
    # One array of scores per variant, whatever the outputs (with prefix
    # tokens the layer has two: the scores cover both).
    keys = [protocol.out_key(v) for v in range(ctx.variants)]
    return ctx.compare(SCORES, ctx.reference["scores"], keys)


def _jit(ctx, saver):
    cells = ctx.compare(JIT, ctx.forward, ctx.out_keys)
    for b, res in ctx.results(JIT).items():
        if protocol.NOTE_KEY in res:  # the compiler cannot take the model: not judged
            cells[b] = Cell(passed=None, note=str(res[protocol.NOTE_KEY]))
    return cells


def _repeatable(ctx, saver):
    """The same input twice through the same model (`budgets.repeat_budget`)."""
    cells = {}
    first, again = protocol.out_key(0), protocol.AGAIN_KEY
    for b, res in ctx.results(FORWARD).items():
        if again in res:
            cells[b] = judge(
                res,
                {again: res[first]},
                [again],
                {again: budgets.repeat_budget(res[first])},
            )
    return cells


def _gradients(ctx, saver):
    grads = ctx.gradients
    if grads is None:
        return None
    if grads.float64:
        missing = ctx.missing_variants(GRADS, grads.keys)
        if missing is not None:
            return missing
    return ctx.compare(GRADS, grads, grads.keys)


def _gradients64(ctx, saver):
    grads = ctx.gradients
    if grads is None or not grads.float64:
        return None
    if ctx.case.kind == "layer":  # our block: float64 everywhere, strictly
        missing = ctx.missing_variants(GRADS64, grads.keys)
        if missing is not None:
            return missing
        strict = budgets.variant_float64_budgets(grads.values, grads.keys)
        return ctx.compare(GRADS64, Oracle(grads.values, strict), grads.keys)
    return ctx.lenient_float64(GRADS64, grads.values, grads.budgets, grads.keys)


def _optimizer_step(optimizer):
    def judge_optimizer(ctx, saver):
        grads = ctx.gradients
        steps = ctx.results(OPTIMIZERS)
        if grads is None or not grads.float64 or not steps:
            return None
        return {b: judge_step(res, optimizer, ctx.variants) for b, res in steps.items()}

    return judge_optimizer


def _keras_file(ctx, saver):
    """`saver`'s `.keras` file, loaded by every other backend: the forward
    oracle, and the exact weights the saver had."""
    cells = {}
    for b in ctx.backends:
        if b == saver or b not in ctx.runs:
            continue
        load = ctx.runs[b].loads.get((saver, ctx.name))
        if load is None:
            if ctx.runs[b].errors.get(ctx.name, {}).get(protocol.load_error_key(saver)):
                cells[b] = Cell(passed=False, note="load failed")
            continue
        forward = ctx.forward
        if forward.values is None:
            cell = Cell(passed=False, note="no oracle: the backends' shapes differ")
        else:
            cell = judge_quantized(load, forward, ctx.out_keys)
        identical = [k for k in load if k.startswith(protocol.IDENTICAL_PREFIX)]
        if not all(bool(load[k]) for k in identical):
            cell = dataclasses.replace(cell, passed=False, note="weights differ")
        cells[b] = cell
    return cells


def _errors(ctx, saver):
    """Tasks that raised, so that they show as failures."""
    cells = {}
    for b in ctx.backends:
        errs = ctx.runs[b].errors.get(ctx.name, {}) if b in ctx.runs else {}
        if errs:
            first = last_line(next(iter(errs.values())))
            cells[b] = Cell(passed=False, note=f"{', '.join(errs)}: {first}"[:200])
    return cells or None


# The matrix's own checks, in report order (the features' come after them,
# then ERRORS_CHECK: `matrix.all_checks`). The forward oracle of a model case
# (forward, jit, .keras) comes from its FORWARD64 runs; the optimizer steps
# are judged where the gradients have a float64 oracle (GRADS64).
CHECKS = [
    Check("forward", (FORWARD, FORWARD64), _forward),
    # A layer case's float64 run against the reference; a model's against
    # the float64 oracle, float32-level deviations reported (Keras).
    Check(
        "forward float64",
        (FORWARD64,),
        _forward64,
        float64_cases=False,
        exact_for=("model",),
        backends="training",
    ),
    Check(
        "attention scores",
        (SCORES,),
        _scores,
        kinds=("layer",),
        quantized_cases=False,
    ),
    Check("jit forward", (JIT, FORWARD, FORWARD64), _jit, backends="training"),
    Check("forward repeatable", (FORWARD,), _repeatable),
    Check("gradients", (GRADS, GRADS64), _gradients, backends="training"),
    Check(
        "gradients float64",
        (GRADS, GRADS64),
        _gradients64,
        exact_for=KINDS,
        backends="training",
    ),
    Check(
        "SGD step",
        (OPTIMIZERS, GRADS, GRADS64),
        _optimizer_step("sgd"),
        exact_for=KINDS,
        backends="training",
    ),
    Check(
        "Adam step",
        (OPTIMIZERS, GRADS, GRADS64),
        _optimizer_step("adam"),
        exact_for=KINDS,
        backends="training",
    ),
    Check(
        ".keras saved by {saver}",
        (SAVE, FORWARD, FORWARD64),
        _keras_file,
        per_saver=True,
    ),
]
# The row of tasks that raised: last, after the features' rows.
ERRORS_CHECK = Check(ERRORS, (), _errors, expected=False)
