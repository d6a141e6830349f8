"""The `mhsa-core` command and the cross-backend runner behind it."""

import subprocess
import sys

import numpy as np
import pytest
from conftest import BACKEND

from mhsa_core import cli, reference
from mhsa_core.consistency import protocol, runner
from mhsa_core.consistency.cases import Case
from mhsa_core.consistency.runner import run_backends

FRAMEWORKS = ("keras", "tensorflow", "torch", "jax")


def _mhsa_core(*args):
    return subprocess.run(
        [sys.executable, "-m", "mhsa_core.cli", *args],
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.mark.parametrize(
    "args",
    [["--help"], ["matrix", "--help"], ["demo", "--help"]],
    ids=["help", "matrix-help", "demo-help"],
)
def test_parent_imports_no_framework(args):
    """The parent process of `mhsa-core` never imports a framework, not even
    Keras: the backends run in workers. (A fresh interpreter: this test
    process has Keras already.)"""
    code = (
        "import sys\n"
        "from mhsa_core import cli\n"
        "from mhsa_core.consistency import cases, checks, matrix, report, runner\n"
        f"status = cli.main({args!r})\n"
        "cases.default_cases(); cases.extended_cases()\n"
        f"print(status, sorted(m for m in {FRAMEWORKS!r} if m in sys.modules))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[-1] == "0 []", proc.stdout[-500:]


# The parent runs no framework: every backend is tested from this one process.
@pytest.mark.slow
@pytest.mark.parametrize("backend", protocol.BACKENDS)
def test_demo_runs_on_each_backend(backend):
    proc = _mhsa_core("demo", "--backends", backend, "--size", "5", "--channels", "16")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    row = [line for line in proc.stdout.splitlines() if line.startswith(backend)]
    assert len(row) == 1 and row[0].rstrip().endswith("ok"), proc.stdout
    assert "(2, 5, 5, 16)" in row[0]
    assert "verdict: all 1 backends within budget" in proc.stdout
    assert "the Keras 2 YOLOv4-MHSA block" in proc.stdout


@pytest.mark.parametrize(
    "args", [["demo", "--backends", "theano"], ["demo", "--size", "0"], ["nope"], []]
)
def test_bad_usage_exits_2(args, capsys):
    assert cli.main(args) == 2
    assert "error" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.parametrize("backend", protocol.BACKENDS)
def test_runner_reports_a_failing_case_and_keeps_the_others(backend):
    # The layer's defaults (standard attention) and the reference's are the same.
    x = np.random.default_rng(0).standard_normal((1, 3, 4, 8)).astype("float32")
    good = Case(
        "good", {"num_heads": 2}, {"x": x}, reference.random_weights(8, 2, seed=1)
    )
    # Weights for 2 heads but 16 channels: set_weight_dict raises in the worker.
    bad = Case(
        "bad", {"num_heads": 2}, {"x": x}, reference.random_weights(16, 2, seed=1)
    )
    runs = run_backends([good, bad], [backend], portability=False)
    run = runs[backend]
    assert not run.ok
    assert "ValueError" in run.errors["bad"][protocol.SETUP_ERROR]
    assert "good" not in run.errors
    ref64, budget, _ = reference.error_budget(x, good.weights, num_heads=2)
    out = run.results["good"][protocol.FORWARD][protocol.out_key(0)]
    assert reference.max_abs(out, ref64) <= budget


def test_runner_reports_a_crashed_worker(monkeypatch):
    # A worker that dies (here: keras cannot import its backend) is that
    # backend's failure, with its stderr tail; the parent does not raise.
    real_env = runner.worker_env

    def broken_env(backend):
        env = real_env(backend)
        env["KERAS_BACKEND"] = "no_such_backend"
        return env

    monkeypatch.setattr(runner, "worker_env", broken_env)
    x = np.zeros((1, 2, 2, 4), "float32")
    case = Case("c", {}, {"x": x}, reference.random_weights(4, seed=0))
    run = run_backends([case], [BACKEND])[BACKEND]
    assert not run.ok and "worker exited with status 1" in run.error
    assert "no_such_backend" in run.error
    assert run.results == {}


def test_runner_reports_a_hung_worker():
    # A worker over its time limit is killed and reported; nothing raises.
    x = np.zeros((1, 2, 2, 4), "float32")
    case = Case("c", {}, {"x": x}, reference.random_weights(4, seed=0))
    run = run_backends([case], [BACKEND], timeout=0.5)[BACKEND]
    assert not run.ok and "timed out in phase 'compute'" in run.error
    assert run.results == {}
