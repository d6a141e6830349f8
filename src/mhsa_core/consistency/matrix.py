"""The cross-backend consistency matrix: run cases under every backend, judge
every check.

Every check of every case yields one cell per backend: the error of that
backend against the check's oracle, the budget it is allowed, and their
`ratio` = error / budget (a cell passes when ratio <= 1). What runs, what
is judged and which cells a complete report has all derive from the checks
(`all_checks`: the matrix's own, `checks.CHECKS`, and the opt-in features',
`features.FEATURES`).

Imports no framework: the workers (`runner`) do.
"""

import dataclasses

from mhsa_core.consistency import checks, features, protocol
from mhsa_core.consistency.report import Report
from mhsa_core.consistency.runner import SOME_TASKS_FAILED, run_backends

__all__ = [
    "run_matrix",
    "evaluate",
    "all_checks",
    "expected_cells",
    "needed_tasks",
    "with_worker_inputs",
]


def all_checks():
    """Every check, in report order: the matrix's own (`checks.CHECKS`), each
    feature's (`Feature.checks`, in `features.FEATURES` order), then the row
    of tasks that raised (`checks.ERRORS_CHECK`)."""
    return [
        *checks.CHECKS,
        *(check for feature in features.FEATURES for check in feature.checks),
        checks.ERRORS_CHECK,
    ]


def needed_tasks(case, rtol=None):
    """The tasks of `case` that its checks read (and the features it asks for
    read themselves, `Feature.reads`), in `features.known_tasks()` order."""
    needed = {
        t for check in all_checks() if check.applies(case, rtol) for t in check.tasks
    }
    for feature in features.FEATURES:
        if feature.name in case.features:
            needed.update(feature.reads(case))
    return tuple(t for t in features.known_tasks() if t in needed and t in case.tasks)


def evaluate(cases, runs, backends, rtol=None):
    """Judges every check of every case on the workers' `runs`; a `Report`,
    with the sections of the features that have one (`Feature.section`)."""
    rows, notes = [], []
    for case in cases:
        ctx = checks.CaseContext(case, runs, backends, rtol)
        for check in all_checks():
            rows.extend(check.rows(ctx))
        if any(ctx.results(task) for task in (protocol.FORWARD, protocol.FORWARD64)):
            notes.append(ctx.oracle_note())
    worker_errors = {
        b: r.error for b, r in runs.items() if r.error and r.error != SOME_TASKS_FAILED
    }
    report = Report(list(backends), rows, worker_errors, runs, notes=notes)
    for feature in features.FEATURES:
        section = feature.section(report, cases, rtol)
        if section:
            report.sections[feature.name] = section
    return report


def run_matrix(
    cases,
    backends,
    *,
    rtol=None,
    safe_mode=True,
    on_event=None,
    timeout=1800.0,
    imports=(),
    **feature_options,
):
    """Runs `cases` under `backends` and judges every check; returns a `Report`.

    Each case runs the tasks among its `tasks` that its checks read
    (`needed_tasks`).

    Args:
        cases: `cases.Case` objects.
        backends: names from `protocol.BACKENDS`; missing ones are reported.
        rtol: tolerance relative to max|oracle| for models that cannot run in
            float64 (or to override the float64-derived peer budgets).
        safe_mode: Keras safe mode when the workers load `.keras` files.
        on_event: progress callback, see `runner.run_backends`.
        timeout: seconds per backend worker.
        imports: modules every worker imports first (custom layers).
        **feature_options: the keywords of the opt-in features
            (`features.FEATURES`: `export=` formats, `locate=True`, `steps=K`
            and `optimizer=`; each feature's module says what it does), each
            feature applied to every case it fits (`Feature.apply`).

    Raises:
        TypeError: a keyword of no feature.
        ValueError: a bad option (before any worker starts).
    """
    options = features.options(rtol=rtol, **feature_options)
    for feature in features.FEATURES:
        if feature.enabled(options[feature.name]):
            cases = [feature.apply(case, options[feature.name]) for case in cases]
    cases = [
        dataclasses.replace(case, tasks=needed_tasks(case, rtol)) for case in cases
    ]
    runs = run_backends(
        cases,
        backends,
        on_event=on_event,
        safe_mode=safe_mode,
        timeout=timeout,
        imports=imports,
    )
    return evaluate(
        [with_worker_inputs(case, runs) for case in cases], runs, backends, rtol=rtol
    )


def with_worker_inputs(case, runs):
    """`case` with the input variants its workers made from the model (a model
    case given no inputs), else `case` itself. Every worker makes the same
    (seeded NumPy, `cases.generate_inputs`); the first backend's are taken."""
    if case.variants:
        return case
    for run in runs.values():
        if run.inputs.get(case.name):
            return dataclasses.replace(case, inputs=run.inputs[case.name])
    return case


def expected_cells(case, backends, rtol=None):
    """The (check, backend) cells a complete run of `case` produces, in report
    order: those of every check (`all_checks`, `Check.expected_cells`).

    A report that lacks one of them lost a result somewhere; the tests use
    this to make sure that nothing is silently missing.
    """
    return [
        cell
        for check in all_checks()
        for cell in check.expected_cells(case, backends, rtol)
    ]
