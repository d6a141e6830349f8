"""The cross-backend consistency matrix: run cases under every backend, judge
every check of `checks.CHECKS`.

Every check of every case yields one cell per backend: the error of that
backend against the check's oracle, the budget it is allowed, and their
`ratio` = error / budget (a cell passes when ratio <= 1). What runs, what
is judged and which cells a complete report has all derive from
`checks.CHECKS`.

Imports no framework: the workers (`runner`) do.
"""

import dataclasses

from mhsa_core.consistency import checks, drift, protocol
from mhsa_core.consistency.locate import SECTION, locate_cases
from mhsa_core.consistency.report import Report
from mhsa_core.consistency.runner import SOME_TASKS_FAILED, run_backends

__all__ = [
    "run_matrix",
    "evaluate",
    "expected_cells",
    "needed_tasks",
    "with_worker_inputs",
]


def needed_tasks(case, rtol=None):
    """The tasks of `case` that its checks read, in `protocol.KNOWN_TASKS` order."""
    needed = {
        t for check in checks.CHECKS if check.applies(case, rtol) for t in check.tasks
    }
    return tuple(t for t in protocol.KNOWN_TASKS if t in needed and t in case.tasks)


def evaluate(cases, runs, backends, rtol=None):
    """Judges every check of every case on the workers' `runs`; a `Report`
    (with the section `locate.SECTION` when cases ran the locate tasks)."""
    rows, notes = [], []
    for case in cases:
        ctx = checks.CaseContext(case, runs, backends, rtol)
        for check in checks.CHECKS:
            rows.extend(check.rows(ctx))
        if any(ctx.results(task) for task in (protocol.FORWARD, protocol.FORWARD64)):
            notes.append(ctx.oracle_note())
    worker_errors = {
        b: r.error for b, r in runs.items() if r.error and r.error != SOME_TASKS_FAILED
    }
    report = Report(list(backends), rows, worker_errors, runs, notes=notes)
    located = locate_cases(cases, runs, backends, rtol)
    if located:
        report.sections[SECTION] = located
    trained = drift.report_series(report)
    if trained:
        report.sections[drift.SECTION] = [drift.series_json(s) for s in trained]
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
    locate=False,
    steps=None,
    optimizer=None,
    export=(),
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
        locate: also run every model case layer by layer, and name the first
            layer whose output leaves its budget (`locate`; the report's
            section `locate.SECTION`).
        steps: train this many optimizer steps on each training backend, in
            the case's dtype and in float64, and judge the drift (`drift`);
            needs the float64 runs, so not with `rtol`.
        optimizer: the optimizer of those steps, a key of
            `protocol.OPTIMIZER_SETTINGS` (default "adam"); only with `steps`.
        export: formats of `protocol.EXPORT_FORMATS`: export every case's
            model in each from each backend, run the artifacts in their
            runtimes, judge them like the backends (rows "{format} export").
    """
    steps, optimizer = drift.check_options(steps, optimizer, rtol)
    export = validate_formats(export)
    cases = [drift.with_drift(case, steps) for case in cases]
    if export:
        cases = [
            dataclasses.replace(
                case, exports=export, tasks=tuple(case.tasks) + (protocol.EXPORT,)
            )
            for case in cases
        ]
    cases = [
        dataclasses.replace(
            case,
            tasks=needed_tasks(case, rtol)
            + (protocol.LOCATE_TASKS if locate and case.kind == "model" else ()),
        )
        for case in cases
    ]
    runs = run_backends(
        cases,
        backends,
        on_event=on_event,
        safe_mode=safe_mode,
        timeout=timeout,
        imports=imports,
        drift_steps=steps,
        drift_optimizer=optimizer,
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


def validate_formats(formats):
    """`formats` (a list, or a comma-separated string) as a tuple of
    `protocol.EXPORT_FORMATS`; ValueError naming an unknown one."""
    if isinstance(formats, str):
        formats = [f.strip() for f in formats.split(",") if f.strip()]
    formats = tuple(dict.fromkeys(formats or ()))
    unknown = [f for f in formats if f not in protocol.EXPORT_FORMATS]
    if unknown:
        raise ValueError(
            f"Received an invalid value for argument `export`, expected a subset of "
            f"{','.join(protocol.EXPORT_FORMATS)}. "
            f"Received: export={','.join(unknown)!r}"
        )
    return formats


def expected_cells(case, backends, rtol=None):
    """The (check, backend) cells a complete run of `case` produces, in report
    order: those of every check of `checks.CHECKS` (`Check.expected_cells`).

    A report that lacks one of them lost a result somewhere; the tests use
    this to make sure that nothing is silently missing.
    """
    return [
        cell
        for check in checks.CHECKS
        for cell in check.expected_cells(case, backends, rtol)
    ]
