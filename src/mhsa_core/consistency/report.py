"""The matrix's results: cells, rows, the report, its JSON, table and verdict.

A `Cell` is one check on one backend: the error against the check's oracle,
the budget it is allowed and their `ratio` (passes when <= 1). A `Row` is one
check of one case across backends. Every row comes from a check of the
matrix (`matrix.all_checks`); nothing here knows which checks exist. The
opt-in features add named sections (`Report.sections`), JSON-ready.
"""

import dataclasses
import math

from mhsa_core._subprocess import NOT_INSTALLED
from mhsa_core._text import format_table

__all__ = [
    "Cell",
    "Row",
    "Report",
    "cell_of",
    "json_cell",
    "cell_from_json",
    "cell_text",
    "render",
    "footer",
    "NOT_JUDGED_LEGEND",
    "TABLE_WIDTH",
    "headline",
    "verdict",
]


@dataclasses.dataclass
class Cell:
    """One check on one backend."""

    passed: bool | None  # None: not applicable on this backend, or reported only
    ratio: float | None = None  # error / budget; passes when <= 1
    error: float | None = None
    budget: float | None = None
    note: str = ""
    # What was checked when it is less than the row says (e.g. an export
    # checked one static size at a time); shown with the verdict, pass or fail.
    scope: str = ""


def cell_of(error, budget, note=""):
    """The Cell of `error` against `budget` (passes when error <= budget)."""
    error, budget = float(error), float(budget)
    ratio = error / budget if budget > 0 else (0.0 if error == 0 else math.inf)
    return Cell(
        passed=bool(error <= budget), ratio=ratio, error=error, budget=budget, note=note
    )


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
    # What each case's results were compared with, in words ("oracles" under
    # the table): e.g. with two backends and no TensorFlow float64 run, the
    # midpoint of the two, which cannot tell which one is off.
    notes: list = dataclasses.field(default_factory=list)
    # Named extra sections beside the rows, JSON-ready (e.g. "locate"): in
    # the JSON, never in the verdict.
    sections: dict = dataclasses.field(default_factory=dict)

    @property
    def ran(self):
        """The backends with at least one result compared with an oracle."""
        return [
            b
            for b in self.backends
            if any(b in r.cells and r.cells[b].ratio is not None for r in self.rows)
        ]

    @property
    def compared(self):
        """Whether at least two backends ran: one backend alone agrees with
        nothing (its cells only say it is within budget of the oracle)."""
        return len(self.ran) >= 2

    @property
    def failures(self):
        return [
            (r, b, c)
            for r in self.rows
            for b, c in r.cells.items()
            if c.passed is False
        ]

    @property
    def missing(self):
        """Backends that were asked for but are not installed."""
        return [b for b, e in self.worker_errors.items() if e.startswith(NOT_INSTALLED)]

    @property
    def agree(self):
        crashed = [b for b in self.worker_errors if b not in self.missing]
        return (
            not self.failures
            and not crashed
            and self.compared
            and any(c.passed for r in self.rows for c in r.cells.values())
        )

    def cell(self, case, check, backend):
        """The Cell of (case, check) on `backend` (None if that row has none);
        KeyError if the report has no such row."""
        for row in self.rows:
            if row.case == case and row.check == check:
                return row.cells.get(backend)
        raise KeyError((case, check))

    @property
    def status(self):
        """ "agree", "disagree" (cells beyond budget), "failed" (a worker
        crashed, or a task raised and nothing is beyond budget) or
        "not_compared" (fewer than two backends ran)."""
        if set(self.worker_errors) - set(self.missing):
            return "failed"
        if self.failures:
            beyond = any(c.ratio is not None for _, _, c in self.failures)
            return "disagree" if beyond else "failed"
        return "agree" if self.agree else "not_compared"

    def backend_entries(self):
        """{backend: {"status", "reason", versions, "seconds"}} (the JSON's
        "backend_runs"): "ran", "skipped" (not installed) or "failed"."""
        entries = {}
        for b in self.backends:
            run = self.runs.get(b)
            info = getattr(run, "info", {}) or {}
            error = self.worker_errors.get(b)
            status = "skipped" if b in self.missing else "failed" if error else "ran"
            entries[b] = {
                "status": status,
                "reason": error,
                "keras_version": info.get("keras_version"),
                "framework_version": info.get("framework_version"),
                "seconds": getattr(run, "seconds", None),
            }
        return entries

    def to_json(self):
        """The report as strict JSON data (`json.dumps(..., allow_nan=False)`
        succeeds): schema in docs/consistency.md, "The JSON report"."""
        from mhsa_core import __version__

        return {
            "schema_version": SCHEMA_VERSION,
            "tool": "mhsa-core",
            "tool_version": __version__,
            "verdict": self.status,
            "verdict_text": verdict(self).removeprefix("verdict: "),
            "backends": self.backends,
            "compared": self.ran,
            "backend_runs": self.backend_entries(),
            "worker_errors": {
                b: e for b, e in self.worker_errors.items() if b not in self.missing
            },
            "oracles": self.notes,
            "rows": [
                {
                    "case": r.case,
                    "check": r.check,
                    "cells": {b: json_cell(c) for b, c in r.cells.items()},
                }
                for r in self.rows
            ],
            **self.sections,
        }


SCHEMA_VERSION = 1


_NUMBERS = ("ratio", "error", "budget")


def json_cell(cell):
    """A cell as strict JSON, the one form of every cell in the report's JSON
    (rows and sections): a non-finite number (an error of NaN, a zero
    budget) becomes null, its value spelled in "non_finite" ({"ratio": "inf"})."""
    data = dataclasses.asdict(cell)
    data["judged"] = cell.passed is not None
    non_finite = {}
    for key in _NUMBERS:
        value = data[key]
        if value is not None and not math.isfinite(value):
            non_finite[key] = str(value)  # "inf", "-inf", "nan"
            data[key] = None
    if non_finite:
        data["non_finite"] = non_finite
    return data


def cell_from_json(data):
    """The `Cell` of `json_cell(cell)`, its non-finite numbers restored."""
    fields = {f.name for f in dataclasses.fields(Cell)}
    cell = {k: v for k, v in data.items() if k in fields}
    for key, text in data.get("non_finite", {}).items():
        cell[key] = float(text)
    return Cell(**cell)


# ------------------------------------------------------------------ text
def cell_text(cell):
    """(text, rich style) of a cell in the table."""
    if cell is None:
        return "-", "dim"
    if cell.passed is None:
        if cell.ratio is not None and math.isfinite(cell.ratio):
            # A ratio without ok/FAIL: reported, not judged (`NOT_JUDGED_LEGEND`).
            return f"{cell.ratio:.2f} not judged", "yellow"
        return cell.note or "-", "dim"
    if cell.ratio is None or not math.isfinite(cell.ratio):
        return f"FAIL {cell.note}".strip(), "bold red"
    text = f"{cell.ratio:.2f}"
    scope = f" ({cell.scope})" if cell.scope else ""
    if cell.passed:
        return text + " ok" + scope, "green"
    return f"{text} FAIL" + (f" ({cell.note})" if cell.note else "") + scope, "bold red"


NOT_JUDGED_LEGEND = (
    "'not judged': the ratio is reported, not judged by the '<= 1' rule: a float64 run "
    "that Keras computes partly in float32 on that backend (float32-level; Keras 3.15 "
    "maps float64 to float32 for some ops on torch and JAX). It is within the float32 "
    "budget; its ratio to the strict float64 budget is shown for information."
)


def not_judged(report):
    """Whether some cell shows a ratio without a verdict (the legend applies)."""
    return any(
        c.passed is None and c.ratio is not None
        for r in report.rows
        for c in r.cells.values()
    )


def footer(report):
    """The lines under the table: the legend of unjudged cells, and what each
    case was compared with."""
    lines = [NOT_JUDGED_LEGEND] if not_judged(report) else []
    if report.notes:
        lines += ["oracles:", *(f"  {note}" for note in report.notes)]
    return lines


# The table's width: a CI log's 80 columns where the cells fit (they are cut
# to fit), wider only when the case and check names need it.
TABLE_WIDTH = 80
MIN_CELL_WIDTH = 12  # "0.22 ok (st…", "1.5e+03 FAIL"


def render(report, out, title, header=("case", "check")):
    """The report as a table on `out`: with colours if rich is installed.

    `header`: the titles of the two first columns (the pytest plugin's rows
    are a test's recorded arrays, not cases)."""
    header = [*header, *report.backends]
    rows = []
    for row in report.rows:
        rows.append(
            [
                row.case,
                row.check,
                *(cell_text(row.cells.get(b)) for b in report.backends),
            ]
        )
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:  # rich is optional: a plain table
        plain = [[r[0], r[1], *(t for t, _ in r[2:])] for r in rows]
        print(title, file=out)
        print(format_table(header, plain), file=out)
        for line in footer(report):
            print(line, file=out)
        return
    # The case and check columns keep their width: they say which row is
    # which. A long cell (an export's reason) is cut with an ellipsis, whole
    # in the notes below the table. Width: `TABLE_WIDTH` (a CI log has no
    # terminal to ask).
    table = Table(title=title, title_justify="left")
    fixed = [max(len(str(r[i])) for r in [header, *rows]) for i in (0, 1)]
    # 3 characters of border and padding per column, and one more.
    room = TABLE_WIDTH - sum(fixed) - 3 * len(header) - 1
    cell_width = max(MIN_CELL_WIDTH, room // max(1, len(report.backends)))
    for i, name in enumerate(header):
        if i < 2:
            table.add_column(name, no_wrap=True, min_width=fixed[i])
        else:
            table.add_column(
                name, no_wrap=True, max_width=cell_width, overflow="ellipsis"
            )
    previous = None
    for r in rows:
        case = r[0] if r[0] != previous else ""
        previous = r[0]
        table.add_row(
            case,
            r[1],
            *(f"[{style}]{text}[/]" if style else text for text, style in r[2:]),
        )
    width = max(
        TABLE_WIDTH,
        sum(fixed) + 3 * len(header) + 1 + MIN_CELL_WIDTH * len(report.backends),
    )
    console = Console(file=out, width=width)
    console.print(table)
    for line in footer(report):
        console.print(line, markup=False, highlight=False, soft_wrap=True)


def headline(report, subject):
    """A title for the report on `subject` that claims no more than the
    verdict: "backends disagree" only when some cell is beyond tolerance."""
    crashed = set(report.worker_errors) - set(report.missing)
    if any(f[2].ratio is not None for f in report.failures):
        return f"backends disagree on {subject}"
    if crashed:
        return f"a backend's worker failed on {subject}"
    if report.failures:
        return f"checks not computed on {subject}"
    if not report.compared:
        return f"not compared across backends: {subject} (fewer than two ran)"
    return f"backends agree on {subject}"


def _where(failures):
    where = sorted({f"{r.case}/{r.check}/{b}" for r, b, _ in failures})
    return ", ".join(where[:8]) + (" ..." if len(where) > 8 else "")


def verdict(report):
    """The one-line verdict: agree, disagree (where), a worker failed, or
    nothing checked."""
    checked = sum(
        1 for r in report.rows for c in r.cells.values() if c.passed is not None
    )
    parts = []
    if report.missing:
        parts.append(
            "not installed, skipped: "
            + ", ".join(
                f"{b} ({report.worker_errors[b].split(': ', 1)[-1]})"
                for b in report.missing
            )
        )
    crashed = {b: e for b, e in report.worker_errors.items() if b not in report.missing}
    if crashed:
        return "verdict: FAIL: worker(s) failed: " + ", ".join(crashed)
    if report.failures:
        # A cell with no ratio was not compared (a task raised, no oracle):
        # it fails, but is no disagreement.
        beyond = [f for f in report.failures if f[2].ratio is not None]
        broken = [f for f in report.failures if f[2].ratio is None]
        text = []
        if beyond:
            text.append(
                f"DISAGREE: {len(beyond)} of {checked} cells beyond tolerance: "
                + _where(beyond)
            )
        if broken:
            text.append(
                f"{'' if beyond else 'FAIL: '}{len(broken)} cells not computed "
                f"(a task raised, or no oracle): " + _where(broken)
            )
        return "verdict: " + "; ".join(text)
    if not checked:
        return "verdict: nothing was checked" + (
            f" ({'; '.join(parts)})" if parts else ""
        )
    ran = report.ran
    if not report.compared:
        who = f"only {ran[0]} ran" if ran else "no backend produced a result"
        return (
            f"verdict: NOT COMPARED: {who}: nothing was compared across backends "
            f"(at least two must run; its {checked} cells above are against their "
            f"oracles only)" + (f" ({'; '.join(parts)})" if parts else "")
        )
    return f"verdict: all {checked} cells agree across {', '.join(ran)}" + (
        f" ({'; '.join(parts)})" if parts else ""
    )
