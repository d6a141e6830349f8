"""The matrix's results: cells, rows, the report, its JSON, table and verdict.

A `Cell` is one check on one backend: the error against the check's oracle,
the budget it is allowed and their `ratio` (passes when <= 1). A `Row` is one
check of one case across backends. Every row comes from a check of
`checks.CHECKS`; nothing here knows which checks exist.
"""

import dataclasses
import math

__all__ = ["Cell", "Row", "Report", "cell_of", "format_table", "cell_text", "render",
           "verdict"]


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
    return Cell(passed=bool(error <= budget), ratio=ratio, error=error, budget=budget,
                note=note)


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
        """The Cell of (case, check) on `backend` (None if that row has none);
        KeyError if the report has no such row."""
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


# ------------------------------------------------------------------ text
def format_table(header, rows):
    """A plain-text table, columns padded to their widest entry."""
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(header, widths)).rstrip()]
    lines.append("  ".join("-" * w for w in widths))
    for row in rows:
        lines.append("  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip())
    return "\n".join(lines)


def cell_text(cell):
    """(text, rich style) of a cell in the table."""
    if cell is None:
        return "-", "dim"
    if cell.passed is None:
        if cell.ratio is not None and math.isfinite(cell.ratio):
            return f"{cell.ratio:.2f} {cell.note}".strip(), "yellow"
        return cell.note or "-", "dim"
    if cell.ratio is None or not math.isfinite(cell.ratio):
        return f"FAIL {cell.note}".strip(), "bold red"
    text = f"{cell.ratio:.2f}"
    scope = f" ({cell.scope})" if cell.scope else ""
    if cell.passed:
        return text + " ok" + scope, "green"
    return f"{text} FAIL" + (f" ({cell.note})" if cell.note else "") + scope, "bold red"


def render(report, out, title):
    """The report as a table on `out`: with colours if rich is installed."""
    header = ["case", "check", *report.backends]
    rows = []
    for row in report.rows:
        rows.append([row.case, row.check, *(cell_text(row.cells.get(b)) for b in report.backends)])
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:  # rich is optional: a plain table
        plain = [[r[0], r[1], *(t for t, _ in r[2:])] for r in rows]
        print(title, file=out)
        print(format_table(header, plain), file=out)
        return
    table = Table(title=title, title_justify="left")
    for name in header:
        table.add_column(name, no_wrap=True)
    previous = None
    for r in rows:
        case = r[0] if r[0] != previous else ""
        previous = r[0]
        table.add_row(case, r[1], *(f"[{style}]{text}[/]" if style else text
                                    for text, style in r[2:]))
    Console(file=out, width=max(100, 30 + 22 * len(report.backends))).print(table)


def verdict(report):
    """The one-line verdict: agree, disagree (where), a worker failed, or
    nothing checked."""
    checked = sum(1 for r in report.rows for c in r.cells.values() if c.passed is not None)
    parts = []
    if report.missing:
        parts.append("not installed, skipped: " + ", ".join(report.missing))
    crashed = {b: e for b, e in report.worker_errors.items() if b not in report.missing}
    if crashed:
        return "verdict: FAIL: worker(s) failed: " + ", ".join(crashed)
    if report.failures:
        where = sorted({f"{r.case}/{r.check}/{b}" for r, b, _ in report.failures})
        return (f"verdict: DISAGREE: {len(report.failures)} of {checked} cells beyond "
                f"tolerance: " + ", ".join(where[:8]) + (" ..." if len(where) > 8 else ""))
    if not checked:
        return "verdict: nothing was checked" + (f" ({'; '.join(parts)})" if parts else "")
    ran = [b for b in report.backends if b not in report.missing]
    return (f"verdict: all {checked} cells agree across {', '.join(ran)}"
            + (f" ({'; '.join(parts)})" if parts else ""))
