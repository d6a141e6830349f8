"""The pytest plugin: your test suite under several Keras backends, compared.

    pytest --keras-backends tensorflow,torch,jax    # or keras_backends = ... (ini)

Installed with mhsa-core (a `pytest11` entry point, "mhsa_core") and inert
unless asked: without the option (or the ini setting) it adds only the
`backend_outputs` fixture, which then records nothing.

With it, this process (the *parent*) collects and runs nothing itself. Keras
fixes the backend at import, so each backend gets a pytest process of its own
(a *worker*: `python -m pytest` with the same arguments minus the option,
KERAS_BACKEND set, `_subprocess.worker_env`), as xdist's controller does. At
most one worker per core runs at a time. Data goes only through files in a
temporary directory, one directory per backend:

- `reports.jsonl`: each test report, as pytest serializes it for xdist
  (`pytest_report_to_serializable`), so the parent shows the worker's own
  tracebacks;
- `done.json`: the worker's exit status and versions;
- `records/`: one `.npz` per test of the arrays it recorded
  (`records.save`).

The parent (`pytest_parent.Parent`: this module is the options, the
fixture and the worker's half) then reports each test once, under its own
node id: passed when
every backend passed and the recorded arrays agree (the matrix's rule and
table, `records.judge`), failed naming the backend(s) that failed or
disagree, with each backend's status in the verbose word, the user
properties and the "keras backends" summary table. One backend is no
agreement: a test that recorded on one backend only is "not compared", and
says why. The exit status is nonzero when a backend fails a test, an array
disagrees or a worker crashes.

The parent's own code imports no keras. The user's conftest files are
still imported there: before the first one, the plugin sets
KERAS_BACKEND=numpy (when that backend is installed), so that a conftest's
`import keras` loads the numpy backend (and JAX, which it imports), as `make
demo`'s parent, never TensorFlow or torch.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from mhsa_core import _subprocess
from mhsa_core.consistency.protocol import TRAINING_BACKENDS

if TYPE_CHECKING:
    from mhsa_core.consistency.records import BackendOutputs

__all__ = ["backend_outputs", "parse_backends", "worker_args"]

OPTION = "--keras-backends"
INI = "keras_backends"
JSON_OPTION = "--keras-backends-json"
WORKER_OPTION = "--keras-backends-worker"  # internal: a worker's directory
ALL = "all"  # the installed ones of protocol.TRAINING_BACKENDS
REPORTS_FILE = "reports.jsonl"
DONE_FILE = "done.json"
RECORDS_DIR = "records"
# The parent's own options: a worker runs the rest of the arguments.
_PARENT_OPTIONS = (OPTION, JSON_OPTION, WORKER_OPTION)

_WORKER_KEY = pytest.StashKey["_Worker"]()
_PARENT_ENV_KEY = pytest.StashKey["str | None"]()


# ------------------------------------------------------------------ options
def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("keras-backends", "Keras backends (mhsa_core)")
    group.addoption(
        OPTION,
        dest="keras_backends",
        default=None,
        metavar="LIST",
        help=(
            "run the selected tests once per Keras backend (a pytest process "
            "each) and compare the arrays they record with the backend_outputs "
            "fixture: a comma-separated list of tensorflow, torch, jax, numpy, "
            "or 'all' (the installed ones of tensorflow, torch, jax). "
            "Default: the keras_backends ini setting; none: the plugin does "
            "nothing."
        ),
    )
    group.addoption(
        JSON_OPTION,
        dest="keras_backends_json",
        default=None,
        metavar="PATH",
        help=(
            f"with {OPTION}: write each test's status per backend and its "
            "arrays' report (the matrix's JSON) to PATH"
        ),
    )
    group.addoption(
        WORKER_OPTION,
        dest="keras_backends_worker",
        default=None,
        help=argparse.SUPPRESS,  # the parent's, for its workers
    )
    parser.addini(
        INI,
        type="string",
        default="",
        help=f"default of {OPTION} (e.g. 'tensorflow,torch,jax'); empty: off",
    )


def _requested(config: pytest.Config) -> tuple[str | None, str]:
    """(the value asked for, where it came from), None when not asked."""
    value = config.known_args_namespace.keras_backends
    if value is not None:
        return value, OPTION
    ini = str(config.getini(INI) or "").strip()
    return (ini, f"{INI} (ini)") if ini else (None, "")


def parse_backends(value: str, source: str = OPTION) -> list[str]:
    """The backends of an option value, in its order, without repeats.

    Args:
        value: "tensorflow,torch,jax", or "all" (the installed training
            backends).
        source: where the value came from, for the message.

    Raises:
        pytest.UsageError: an empty list, an unknown name, or a backend that
            is not installed (pytest exits with status 4).
    """
    received = f"Received: {source}={value!r}"
    names = [n.strip() for n in value.split(",") if n.strip()]
    if not names:
        raise pytest.UsageError(
            f"{source} needs a comma-separated list of Keras backends. {received}"
        )
    if names == [ALL]:
        installed = [b for b in TRAINING_BACKENDS if _subprocess.backend_available(b)]
        if not installed:
            raise pytest.UsageError(
                f"{source}: none of {', '.join(TRAINING_BACKENDS)} is installed. "
                f"{received}"
            )
        return installed
    known = tuple(_subprocess.BACKEND_MODULES)
    unknown = [name for name in names if name not in known]
    if unknown:
        raise pytest.UsageError(
            f"{source}: unknown Keras backend {unknown[0]!r}; expected some of "
            f"{', '.join(known)}, or {ALL!r}. {received}"
        )
    for name in names:
        reason = _subprocess.unavailable_reason(name)
        if reason is not None:
            raise pytest.UsageError(f"{source}: {name} is {reason}. {received}")
    return list(dict.fromkeys(names))


@pytest.hookimpl(tryfirst=True)
def pytest_load_initial_conftests(early_config: pytest.Config) -> None:
    """Before the first conftest (which may import keras): the parent's keras
    is the numpy backend, so that the parent imports no framework."""
    if early_config.known_args_namespace.keras_backends_worker:
        return
    if _requested(early_config)[0] is None or "keras" in sys.modules:
        return
    if _subprocess.backend_available("numpy"):
        early_config.stash[_PARENT_ENV_KEY] = os.environ.get("KERAS_BACKEND")
        os.environ["KERAS_BACKEND"] = "numpy"


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config: pytest.Config) -> None:
    directory = config.getoption("keras_backends_worker")
    if directory:
        # Before junitxml's and tmp_path's own pytest_configure (tryfirst):
        # the parent writes the junit XML file, and each worker needs a
        # basetemp of its own (pytest empties it at the session's start).
        config.option.xmlpath = None
        if config.option.basetemp:
            base = Path(config.option.basetemp)
            base.mkdir(parents=True, exist_ok=True)
            config.option.basetemp = str(base / os.environ.get("KERAS_BACKEND", "w"))
        worker = _Worker(config, Path(directory))
        config.stash[_WORKER_KEY] = worker
        config.pluginmanager.register(worker, "keras-backends-worker")
        return
    value, source = _requested(config)
    if value is None:
        return
    backends = parse_backends(value, source)
    if config.option.collectonly:
        return  # collecting is the same under every backend: here, as usual
    from mhsa_core.consistency.pytest_parent import Parent

    config.pluginmanager.register(Parent(config, backends), "keras-backends-parent")


def pytest_unconfigure(config: pytest.Config) -> None:
    if _PARENT_ENV_KEY in config.stash:
        old = config.stash[_PARENT_ENV_KEY]
        if old is None:
            os.environ.pop("KERAS_BACKEND", None)
        else:
            os.environ["KERAS_BACKEND"] = old


# ------------------------------------------------------------------ fixture
@pytest.fixture
def backend_outputs(request: pytest.FixtureRequest) -> Iterator[BackendOutputs]:
    """Named arrays of this test, compared across Keras backends.

    `backend_outputs.record("logits", y)`, or `record("y", model=model,
    inputs=x)` for a model's output (its float64 twin then gives the oracle
    and budget, as in `mhsa-core matrix`). With `pytest --keras-backends
    tensorflow,torch,jax` each backend's records are compared at the end and
    the test fails when one disagrees, with the matrix's table. Without the
    option nothing is recorded. See docs/pytest-plugin.md.
    """
    from mhsa_core.consistency.records import BackendOutputs, save

    worker = request.config.stash.get(_WORKER_KEY, None)
    outputs = BackendOutputs(worker.backend if worker is not None else None)
    yield outputs
    if worker is not None:
        save(worker.directory / RECORDS_DIR, request.node.nodeid, outputs.records)


# ------------------------------------------------------------------- worker
class _Worker:
    """A worker's half: its reports and exit status to files."""

    def __init__(self, config: pytest.Config, directory: Path) -> None:
        self.config = config
        self.directory = directory
        self.backend = os.environ.get("KERAS_BACKEND", "")
        directory.mkdir(parents=True, exist_ok=True)
        self._reports = open(directory / REPORTS_FILE, "a", encoding="utf-8")  # noqa: SIM115

    def _write(self, report: pytest.TestReport | pytest.CollectReport) -> None:
        data = self.config.hook.pytest_report_to_serializable(
            config=self.config, report=report
        )
        # default=repr: a user property that is no JSON value still travels.
        self._reports.write(json.dumps(data, default=repr) + "\n")
        self._reports.flush()

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        self._write(report)

    def pytest_collectreport(self, report: pytest.CollectReport) -> None:
        if report.failed:
            self._write(report)

    def pytest_sessionfinish(self, exitstatus: int) -> None:
        versions = {
            name: str(getattr(sys.modules[name], "__version__", "?"))
            for name in ("keras", self.backend)
            if name in sys.modules
        }
        done = {"exitstatus": int(exitstatus), "versions": versions}
        (self.directory / DONE_FILE).write_text(json.dumps(done))
        self._reports.close()


def worker_args(args: Sequence[str], directory: Path) -> list[str]:
    """A worker's pytest arguments: the parent's, without the plugin's own
    options, and `--keras-backends-worker=directory`. (Its junit XML file
    and basetemp are settled in its `pytest_configure`, wherever they were
    given: arguments, PYTEST_ADDOPTS or the ini's addopts.)"""
    out: list[str] = []
    items = iter(args)
    for arg in items:
        name, eq, _ = arg.partition("=")
        if name in _PARENT_OPTIONS:
            if not eq:
                next(items, None)  # its value
            continue
        out.append(arg)
    return [*out, f"{WORKER_OPTION}={directory}"]
