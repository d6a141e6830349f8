"""The pytest plugin's parent process (`pytest --keras-backends ...`): one
pytest process per backend, then each test reported once.

`pytest_plugin` registers a `Parent` in the parent process. It collects and
runs nothing there (`pytest_collection` returns True, as xdist's
controller): `pytest_runtestloop` starts a worker per backend (at most one
per core at a time), reads what each left in its directory
(`pytest_plugin.REPORTS_FILE`, `DONE_FILE`, `RECORDS_DIR`), and reports each
test once through pytest's own hooks (`pytest_runtest_logreport`), so that
the terminal, `--junitxml`, the exit status and other plugins see one test:

- setup, call and teardown each over all backends: failed when it failed on
  some backend (each backend's own report under its name), skipped or
  xfailed when it was on all, else passed;
- the call also fails when the recorded arrays disagree (`records.judge`:
  the matrix's checks and table), and a backend whose process crashed before
  it ran the test fails it there;
- each backend's status rides on the report (`keras_backends`: the verbose
  status word, user properties for junit XML), and the summary table and
  `--keras-backends-json` list them all.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from mhsa_core import _subprocess
from mhsa_core._text import format_table, last_line
from mhsa_core.consistency.pytest_plugin import (
    DONE_FILE,
    OPTION,
    RECORDS_DIR,
    REPORTS_FILE,
    worker_args,
)

if TYPE_CHECKING:
    from mhsa_core.consistency.records import Judgement

__all__ = ["Parent"]

# Why a backend has no records of a test, by its status there.
_ABSENT = {
    "passed": "passed without recording it",
    "xpassed": "passed without recording it",
    "error": "errored",
}


@dataclasses.dataclass
class Run:
    """What one backend's worker left in its directory."""

    backend: str
    exitstatus: int | None
    seconds: float
    versions: dict[str, str]
    reports: list[Any]
    records: dict[str, Any]
    full_output: str  # its stdout and stderr

    @property
    def output(self) -> str:
        """The end of its stdout and stderr (`_subprocess.TAIL_CHARS`)."""
        return _subprocess.tail(self.full_output)

    @property
    def problem(self) -> str | None:
        """Why the worker did not run the tests to the end, or None."""
        if self.exitstatus is None:
            return "its pytest process ended without finishing the session"
        if self.exitstatus in (3, 4):  # internal error, usage error
            return f"its pytest process exited with status {self.exitstatus}"
        collect_errors = any(isinstance(r, pytest.CollectReport) for r in self.reports)
        if self.exitstatus == 2 and not collect_errors:
            return "its pytest process was interrupted (status 2)"
        return None


class Parent:
    """The parent's half: start the workers, then report each test once."""

    def __init__(self, config: pytest.Config, backends: list[str]) -> None:
        self.config = config
        self.backends = backends
        self.runs: dict[str, Run] = {}
        self.rows: list[tuple[str, dict[str, str], Judgement]] = []
        self.not_compared: list[str] = []

    def pytest_report_header(self) -> str:
        return (
            f"keras backends: {', '.join(self.backends)} (a pytest process each; "
            f"{OPTION}, mhsa_core)"
        )

    @pytest.hookimpl(tryfirst=True)
    def pytest_collection(self, session: pytest.Session) -> bool:
        session.items = []
        return True  # the workers collect, under their backends

    @pytest.hookimpl(tryfirst=True)
    def pytest_runtestloop(self, session: pytest.Session) -> bool:
        with tempfile.TemporaryDirectory(prefix="keras-backends-") as tmp:
            self.runs = self._run_workers(Path(tmp))
        self._report(session)
        return True

    # ---------------------------------------------------------- workers
    def _say(self, line: str) -> None:
        reporter = self.config.pluginmanager.get_plugin("terminalreporter")
        if reporter is not None:
            reporter.write_line(line)

    def _run_workers(self, tmp: Path) -> dict[str, Run]:
        args = list(self.config.invocation_params.args)
        jobs = max(1, min(len(self.backends), os.cpu_count() or 1))
        pending = list(self.backends)
        running: dict[str, tuple[_subprocess.Process, float, Path]] = {}
        runs = {}
        try:
            while pending or running:
                while pending and len(running) < jobs:
                    backend = pending.pop(0)
                    directory = tmp / backend
                    directory.mkdir()
                    env = _subprocess.worker_env(backend, jax_x64=True)
                    if "JAX_ENABLE_X64" in os.environ:  # the user's setting wins
                        env["JAX_ENABLE_X64"] = os.environ["JAX_ENABLE_X64"]
                    process = _subprocess.Process(
                        "pytest",
                        worker_args(args, directory),
                        env=env,
                        own_group=True,
                        stderr_path=directory / "stderr.txt",
                    )
                    running[backend] = (process, time.perf_counter(), directory)
                    self._say(f"keras backends: {backend} started (pid {process.pid})")
                for backend, (process, start, directory) in list(running.items()):
                    if process.wait(0.1):
                        del running[backend]
                        runs[backend] = self._collect(
                            backend, process, time.perf_counter() - start, directory
                        )
                        self._say(f"keras backends: {self._run_line(runs[backend])}")
                        if self.config.getoption("capture") == "no":
                            # -s: the tests' prints are in the worker's output.
                            self._say(f"{'-' * 20} {backend}'s output {'-' * 20}")
                            self._say(runs[backend].full_output)
        finally:
            for process, _, _ in running.values():
                process.kill()
                process.close()
        return {b: runs[b] for b in self.backends}

    def _collect(self, backend, process, seconds, directory) -> Run:
        from mhsa_core.consistency import records

        output = "\n".join(process.stdout_lines()) + "\n" + process.stderr_tail()
        process.close()
        done = {}
        if (directory / DONE_FILE).is_file():
            done = json.loads((directory / DONE_FILE).read_text())
        reports = []
        if (directory / REPORTS_FILE).is_file():
            for line in (directory / REPORTS_FILE).read_text().splitlines():
                reports.append(
                    self.config.hook.pytest_report_from_serializable(
                        config=self.config, data=json.loads(line)
                    )
                )
        return Run(
            backend,
            done.get("exitstatus"),
            seconds,
            done.get("versions", {}),
            reports,
            records.load_dir(directory / RECORDS_DIR),
            output.strip(),
        )

    def _run_line(self, run: Run) -> str:
        tests: dict[str, dict[str, Any]] = {}
        for rep in run.reports:
            if isinstance(rep, pytest.TestReport):
                tests.setdefault(rep.nodeid, {})[rep.when] = rep
        counts: dict[str, int] = {}
        for reports in tests.values():
            status = _status(reports)
            counts[status] = counts.get(status, 0) + 1
        tally = ", ".join(f"{n} {s}" for s, n in counts.items()) or "no tests ran"
        versions = ", ".join(f"{k} {v}" for k, v in run.versions.items())
        problem = f"; FAILED: {run.problem}" if run.problem else ""
        return (
            f"{run.backend}: {tally} in {run.seconds:.1f} s"
            + (f" ({versions})" if versions else "")
            + problem
        )

    # ---------------------------------------------------------- reports
    def _report(self, session: pytest.Session) -> None:
        from mhsa_core.consistency import records

        hook = self.config.hook
        by_test: dict[str, dict[str, dict[str, Any]]] = {}
        collect_errors: dict[str, dict[str, Any]] = {}
        for backend, run in self.runs.items():
            for rep in run.reports:
                if isinstance(rep, pytest.CollectReport):
                    collect_errors.setdefault(rep.nodeid, {})[backend] = rep
                else:
                    by_test.setdefault(rep.nodeid, {}).setdefault(backend, {})[
                        rep.when
                    ] = rep
        session.testscollected = len(by_test)
        for nodeid, reps in collect_errors.items():
            parts, message = _failures(
                reps, {b: _crash_message(r) for b, r in reps.items()}
            )
            hook.pytest_collectreport(
                report=pytest.CollectReport(
                    nodeid, "failed", _longrepr(parts, message), []
                )
            )
        for backend, run in self.runs.items():
            if run.problem:
                text = f"keras backend {backend}: {run.problem}\n{run.output}"
                hook.pytest_collectreport(
                    report=pytest.CollectReport(
                        f"[keras backend {backend}]",
                        "failed",
                        _longrepr([text], f"{backend}: {run.problem}"),
                        [],
                    )
                )
        for nodeid, reps in by_test.items():
            statuses = {b: _status(reps.get(b, {})) for b in self.backends}
            absent = {
                b: _ABSENT.get(s, s) if s != "not run" else self.runs[b].problem or s
                for b, s in statuses.items()
            }
            judgement = records.judge(
                self.backends,
                {b: self.runs[b].records.get(nodeid, {}) for b in self.backends},
                absent,
            )
            for report in self._test_reports(nodeid, reps, statuses, judgement):
                if report.when == "setup":
                    hook.pytest_runtest_logstart(
                        nodeid=nodeid, location=report.location
                    )
                hook.pytest_runtest_logreport(report=report)
            hook.pytest_runtest_logfinish(nodeid=nodeid, location=report.location)
            self.rows.append((nodeid, statuses, judgement))
            self.not_compared += [f"{nodeid}: {w}" for w in judgement.not_compared]
        path = self.config.getoption("keras_backends_json")
        if path:
            Path(path).write_text(json.dumps(self.to_json(), indent=1, allow_nan=False))

    def to_json(self) -> dict[str, Any]:
        """The run as strict JSON data (`--keras-backends-json`): each
        backend's run, and each test's status per backend with its arrays'
        report in the matrix's JSON form (`report.Report.to_json`)."""
        return {
            "backends": self.backends,
            "runs": {
                b: {
                    "exitstatus": run.exitstatus,
                    "problem": run.problem,
                    "seconds": run.seconds,
                    "versions": run.versions,
                }
                for b, run in self.runs.items()
            },
            "tests": [
                {
                    "nodeid": nodeid,
                    "statuses": statuses,
                    "arrays": judgement.status,
                    "not_compared": judgement.not_compared,
                    "report": judgement.report.to_json()
                    if judgement.report.rows
                    else None,
                }
                for nodeid, statuses, judgement in self.rows
            ],
        }

    def _test_reports(self, nodeid, reps, statuses, judgement):
        """The test's setup, call and teardown reports, over all backends."""
        first = next(r for b in self.backends for r in reps.get(b, {}).values())
        common = dict(
            nodeid=nodeid,
            location=first.location,
            keywords=dict(first.keywords),
            keras_backends=statuses,
            # The arrays' verdict in the status word ("agree" only when all
            # recorded arrays were compared).
            keras_compared=judgement.status
            if not (judgement.status == "agree" and judgement.not_compared)
            else "agree, some not compared",
        )
        properties = [(f"keras_backend.{b}", s) for b, s in statuses.items()]
        properties.append(("keras_backends.arrays", judgement.status))
        phase = {
            when: {b: r[when] for b, r in reps.items() if when in r}
            for when in ("setup", "call", "teardown")
        }

        def make(when, outcome, longrepr=None, **extra):
            sections = [
                (f"{title} [{b}]", content)
                for b, r in phase[when].items()
                for title, content in r.sections
            ]
            return pytest.TestReport(
                outcome=outcome,
                longrepr=longrepr,
                when=when,
                sections=sections,
                duration=sum(r.duration for r in phase[when].values()),
                user_properties=properties,
                **common,
                **extra,
            )

        out = []
        failed = {b: r for b, r in phase["setup"].items() if r.failed}
        setups = list(phase["setup"].values())
        if failed:
            setup = _combined(failed, statuses)
            out.append(make("setup", "failed", setup, keras_failed=list(failed)))
        elif setups and all(r.skipped for r in setups):
            skip = _skip(phase["setup"])
            out.append(make("setup", "skipped", skip, **_xfail(setups)))
        else:
            out.append(make("setup", "passed"))
            out.append(self._call(nodeid, phase["call"], statuses, judgement, make))
        failed = {b: r for b, r in phase["teardown"].items() if r.failed}
        out.append(
            make(
                "teardown",
                "failed",
                _combined(failed, statuses),
                keras_failed=list(failed),
            )
            if failed
            else make("teardown", "passed")
        )
        return out

    def _call(self, nodeid, calls, statuses, judgement, make):
        failed = {b: r for b, r in calls.items() if r.failed}
        crashed = {
            b: f"not run: {self.runs[b].problem}"
            for b, s in statuses.items()
            if s == "not run" and self.runs[b].problem
        }
        if failed or crashed or judgement.status == "disagree":
            messages = {b: _crash_message(r) for b, r in failed.items()} | crashed
            parts, message = _failures({**failed, **crashed}, messages, statuses)
            if judgement.status == "disagree":
                parts += [_rule("across backends"), judgement.text(nodeid)]
                message = "; ".join(m for m in (message, _disagreeing(judgement)) if m)
            named = [*failed, *crashed]
            return make("call", "failed", _longrepr(parts, message), keras_failed=named)
        notes = judgement.text("") if judgement.status == "not compared" else ""
        sections = [("keras backends", notes)] if notes else []
        results = list(calls.values())
        if results and all(r.skipped for r in results):
            return make("call", "skipped", _skip(calls), **_xfail(results))
        report = make("call", "passed", **_xfail(results))
        report.sections += sections
        return report

    # ---------------------------------------------------------- terminal
    @pytest.hookimpl(tryfirst=True)
    def pytest_report_teststatus(self, report: pytest.TestReport) -> Any:
        statuses = getattr(report, "keras_backends", None)
        if statuses is None or report.skipped:
            return None
        if report.when != "call":
            if report.failed:  # a fixture's setup or teardown
                where = ", ".join(getattr(report, "keras_failed", []))
                return "error", "E", (f"ERROR ({where})", {"red": True})
            return None
        if hasattr(report, "wasxfail"):
            return None  # XPASS / XFAIL as pytest words them
        bad = getattr(report, "keras_failed", [])
        compared = getattr(report, "keras_compared", None)
        if report.failed:
            what = ", ".join(bad) or ""
            if compared == "disagree":
                what = f"{what}; arrays disagree" if what else "arrays disagree"
            return "failed", "F", (f"FAILED ({what})", {"red": True})
        passed = [b for b, s in statuses.items() if s == "passed"]
        others = [f"{b} {s}" for b, s in statuses.items() if s != "passed"]
        detail = "; ".join([", ".join(passed), *others])
        if compared in ("agree", "agree, some not compared", "not compared"):
            detail += f"; {compared}"
        return "passed", ".", (f"PASSED ({detail})", {"green": True})

    def pytest_terminal_summary(self, terminalreporter: Any) -> None:
        if not self.runs:
            return
        tr = terminalreporter
        tr.write_sep("=", "keras backends")
        for run in self.runs.values():
            tr.write_line(self._run_line(run))
        if self.rows:
            header = ["test", *self.backends, "arrays"]
            rows = [
                [nodeid, *(statuses[b] for b in self.backends), _compared_cell(j)]
                for nodeid, statuses, j in self.rows
            ]
            tr.write_line("")
            for line in format_table(header, rows).splitlines():
                tr.write_line(line)
        if len(self.backends) == 1:
            # Every test alike: one line, not one per test.
            if self.not_compared:
                tr.write_line(
                    f"not compared: only {self.backends[0]} was selected ({OPTION}): "
                    "one backend is no agreement"
                )
            return
        for line in self.not_compared[:20]:
            tr.write_line(f"not compared: {line}")
        if len(self.not_compared) > 20:
            tr.write_line(f"... and {len(self.not_compared) - 20} more not compared")


# ------------------------------------------------------------------ helpers
class _Longrepr:
    """A failure as pytest prints it (`toterminal`): lines of text and the
    backends' own reports (their tracebacks as pytest renders them, colours
    and all), with the one line the short summary and junit XML show
    (`reprcrash.message`)."""

    def __init__(self, parts: Sequence[Any], message: str) -> None:
        self.parts = list(parts)
        self.reprcrash = _Crash(message)

    def toterminal(self, tw: Any) -> None:
        for part in self.parts:
            if isinstance(part, str):
                for line in part.splitlines():
                    tw.line(line)
            else:
                part.toterminal(tw)
                tw.line("")

    def __str__(self) -> str:
        return "\n".join(
            part if isinstance(part, str) else part.longreprtext for part in self.parts
        )


def _longrepr(parts: Sequence[Any], message: str) -> Any:
    """A `_Longrepr` of `parts` (text, and reports whose `toterminal` prints
    them) as pytest's reports take it (pytest types a longrepr as
    its private `TerminalRepr`; this one has the methods they call)."""
    return _Longrepr(parts, message)


@dataclasses.dataclass
class _Crash:
    message: str
    path: str = ""
    lineno: int = 0


def _status(reports: dict[str, Any]) -> str:
    """One backend's outcome of a test from its setup/call/teardown reports."""
    if not reports:
        return "not run"
    setup, call, teardown = (reports.get(w) for w in ("setup", "call", "teardown"))
    if call is not None and call.failed:
        return "failed"
    if any(r is not None and r.failed for r in (setup, teardown)):
        return "error"
    for r in (setup, call):
        if r is not None and r.skipped:
            return "xfailed" if hasattr(r, "wasxfail") else "skipped"
    if call is None:
        return "not run"
    return "xpassed" if hasattr(call, "wasxfail") else "passed"


def _crash_message(report: Any) -> str:
    crash = getattr(report.longrepr, "reprcrash", None)
    message = getattr(crash, "message", None)
    # A traceback's last line is pytest's "E   Error: ..." line.
    return (
        message or last_line(report.longreprtext, "failed").removeprefix("E ").strip()
    )


def _rule(title: str) -> str:
    return "_" * 20 + f" {title} " + "_" * 20


def _failures(
    failures: dict[str, Any],
    messages: dict[str, str],
    statuses: dict[str, str] | None = None,
) -> tuple[list[Any], str]:
    """(the failures on some backends, each under its backend's name: its
    report, or a line of text; the one-line message, "[torch] AssertionError:
    ...")."""
    if not failures:
        return [], ""
    parts: list[Any] = []
    if statuses is not None:
        others = [b for b, s in statuses.items() if b not in failures]
        rest = ", ".join(f"{b}: {statuses[b]}" for b in others)
        parts.append(
            f"failed on {', '.join(failures)}" + (f" ({rest})" if rest else "")
        )
    for backend, failure in failures.items():
        parts += [_rule(backend), failure]
    message = "; ".join(
        f"[{b}] {m.splitlines()[0] if m else 'failed'}" for b, m in messages.items()
    )
    return parts, message


def _combined(failed: dict[str, Any], statuses: dict[str, str]) -> Any:
    parts, message = _failures(
        failed, {b: _crash_message(r) for b, r in failed.items()}, statuses
    )
    return _longrepr(parts, message)


def _skip(reports: dict[str, Any]) -> tuple[str, int, str]:
    """A skipped report's longrepr (path, lineno, reason) over the backends."""
    reasons: dict[str, list[str]] = {}
    path, lineno = "", 0
    for backend, report in reports.items():
        if isinstance(report.longrepr, tuple):
            path, lineno, reason = report.longrepr
        else:
            reason = str(report.longrepr)
        reasons.setdefault(reason, []).append(backend)
    if len(reasons) == 1:
        return path, lineno, next(iter(reasons))
    text = "; ".join(f"{', '.join(bs)}: {r}" for r, bs in reasons.items())
    return path, lineno, text


def _xfail(reports: Sequence[Any]) -> dict[str, str]:
    """{"wasxfail": reason} when every backend's report was an xfail."""
    if reports and all(hasattr(r, "wasxfail") for r in reports):
        return {"wasxfail": "; ".join(dict.fromkeys(r.wasxfail for r in reports))}
    return {}


def _disagreeing(judgement: Judgement) -> str:
    """ "arrays disagree: logits (as recorded) on torch" """
    where = dict.fromkeys(
        f"{row.case} ({row.check}) on {backend}"
        for row, backend, _ in judgement.report.failures
    )
    return "arrays disagree: " + ", ".join(where)


def _compared_cell(judgement: Judgement) -> str:
    n = len({row.case for row in judgement.report.rows})
    if judgement.status == "disagree":
        return "DISAGREE"
    if judgement.status == "agree":
        partial = " (some not compared)" if judgement.not_compared else ""
        return f"agree ({n}){partial}"
    return "not compared" if judgement.status == "not compared" else "-"
