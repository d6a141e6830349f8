"""`mhsa-core matrix` on users' models, and `assert_backends_agree`.

Each test that runs workers costs one worker start-up per backend; the models
are tiny.
"""

import json
import re
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest

from mhsa_core import cli, mhsa_block
from mhsa_core.consistency import matrix
from mhsa_core.testing import assert_backends_agree

import custom_layers

HERE = Path(__file__).parent
THREE = "tensorflow,torch,jax"


def _save(model, tmp_path, name):
    path = tmp_path / f"{name}.keras"
    model.save(path)
    return path


def _dense_model(extra=None):
    inputs = keras.Input((6,))
    x = keras.layers.Dense(5, activation="tanh")(inputs)
    if extra is not None:
        x = extra(x)
    return keras.Model(inputs, keras.layers.Dense(3)(x))


def _run(*args):
    return subprocess.run(
        [sys.executable, "-m", "mhsa_core.cli", "matrix", *args],
        capture_output=True,
        text=True,
        timeout=1200,
        cwd=HERE,
    )


@pytest.mark.slow
def test_stacked_block_model_agrees(tmp_path):
    """A user model made of the block (4x, any size) through the CLI, with --json."""
    inputs = keras.Input((None, None, 16))
    x = inputs
    for _ in range(4):
        x = mhsa_block(x, 16, num_heads=4, scale=None)
    path = _save(keras.Model(inputs, x), tmp_path, "stacked")
    report_path = tmp_path / "report.json"
    proc = _run(
        "--model",
        str(path),
        "--backends",
        "tensorflow,torch,jax,numpy",
        "--json",
        str(report_path),
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "verdict: all" in proc.stdout
    report = json.loads(report_path.read_text())
    assert report["verdict"] == "agree"
    checks = {row["check"] for row in report["rows"]}
    assert {
        "forward",
        "forward float64",
        "gradients",
        "gradients float64",
        "SGD step",
        "Adam step",
        "jit forward",
        ".keras saved by jax",
    } <= checks
    # Inputs from the spec: None dims -> 2 (batch) and 8.
    forward = next(r for r in report["rows"] if r["check"] == "forward")
    assert set(forward["cells"]) == {"tensorflow", "torch", "jax", "numpy"}


@pytest.mark.slow
def test_rng_layer_disagrees_and_exits_1(tmp_path):
    path = _save(_dense_model(custom_layers.BackendNoise(seed=3)), tmp_path, "noisy")
    report_path = tmp_path / "r.json"
    proc = _run(
        "--model",
        str(path),
        "--backends",
        THREE,
        "--import",
        "custom_layers",
        "--json",
        str(report_path),
    )
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "DISAGREE" in proc.stdout
    report = json.loads(report_path.read_text())
    repeat = next(r for r in report["rows"] if r["check"] == "forward repeatable")
    assert {b: c["passed"] for b, c in repeat["cells"].items()} == {
        "tensorflow": False,
        "torch": False,
        "jax": False,
    }
    # And the backends differ from TensorFlow's float64 run beyond float32 level.
    forward64 = next(r for r in report["rows"] if r["check"] == "forward float64")
    assert forward64["cells"]["tensorflow"]["passed"]


@pytest.fixture(scope="module")
def jax_bug_run():
    """`assert_backends_agree` on a model with a JAX-only bug (x1.001 on JAX
    alone), its inputs made by the workers: (the AssertionError's message,
    the report its `run_matrix` returned). One real run (three workers) that
    two tests judge: the helper's failure, and the exact cells the bug marks
    (they once ran it twice, as a factor 1.01 with given inputs and as
    1.001 through `run_matrix` directly: the same path, the same checks)."""
    reports = []
    real_run_matrix = matrix.run_matrix

    def keep(*args, **kwargs):
        reports.append(real_run_matrix(*args, **kwargs))
        return reports[-1]

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(matrix, "run_matrix", keep)
        with pytest.raises(AssertionError) as raised:
            assert_backends_agree(_dense_model(custom_layers.ScaledOnJax(1.001)))
    (report,) = reports
    return str(raised.value), report


def test_jax_only_bug_marks_exactly_the_jax_cells(jax_bug_run):
    _, report = jax_bug_run
    (case,) = {row.case for row in report.rows}  # the file's name: "model"
    assert not report.agree
    for check in ("forward", "gradients", "jit forward"):
        cells = {
            b: report.cell(case, check, b).passed
            for b in ("tensorflow", "torch", "jax")
        }
        assert cells == {"tensorflow": True, "torch": True, "jax": False}, (
            check,
            cells,
        )
    # float64: TensorFlow is the oracle; torch's Dense computes float64 in
    # float32 in keras 3.15 (reported, not failed: passed is None); jax fails.
    cells = {
        b: report.cell(case, "forward float64", b)
        for b in ("tensorflow", "torch", "jax")
    }
    assert cells["tensorflow"].passed and cells["torch"].passed is not False
    assert cells["jax"].passed is False
    assert report.cell(case, "forward repeatable", "jax").passed
    # A file saved under jax and loaded elsewhere computes the right thing
    # (the bug is in jax's execution, not in the file), and vice versa.
    loaded = report.cell(case, ".keras saved by tensorflow", "jax")
    assert loaded.passed is False
    assert report.cell(case, ".keras saved by jax", "torch").passed


@pytest.mark.slow
def test_assert_backends_agree_passes_and_fails(jax_bug_run):
    inputs = np.random.default_rng(0).standard_normal((3, 6)).astype("float32")
    report = assert_backends_agree(_dense_model(), inputs=inputs)
    assert report.agree
    # The bug's run (the fixture's): the helper raised, naming jax.
    message, _ = jax_bug_run
    assert re.search(r"(?s)jax.*DISAGREE", message), message


@pytest.mark.slow
def test_lambda_refused_in_safe_mode(tmp_path):
    lambda_layer = keras.layers.Lambda(lambda t: t * 2.0, output_shape=(5,))
    path = _save(_dense_model(lambda_layer), tmp_path, "lam")
    proc = _run("--model", str(path), "--backends", "torch")
    assert proc.returncode == 2
    assert "Lambda" in proc.stderr and "--unsafe" in proc.stderr
    assert "Traceback" not in proc.stderr
    # Two backends: one alone is not agreement (exit 1, NOT COMPARED).
    proc = _run(
        "--model", str(path), "--backends", "tensorflow,torch", "--unsafe", "--quiet"
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("content", [b"", b"not a zip file", b"PK\x03\x04broken"])
def test_corrupt_keras_file_exits_2(tmp_path, content):
    path = tmp_path / "bad.keras"
    path.write_bytes(content)
    proc = _run("--model", str(path))
    assert proc.returncode == 2
    assert (
        "Not a readable .keras file" in proc.stderr and "Traceback" not in proc.stderr
    )


def test_usage_errors_exit_2(tmp_path, capsys):
    assert cli.main(["matrix", "--model", str(tmp_path / "missing.keras")]) == 2
    assert "No such file" in capsys.readouterr().err
    assert cli.main(["matrix", "--rtol", "1e-3"]) == 2
    assert cli.main(["matrix", "--backends", "tensorflow,mxnet"]) == 2
    assert cli.main(["matrix", "--rtol", "-1"]) == 2
    good = _save(_dense_model(), tmp_path, "good")
    (tmp_path / "inputs.npz").write_bytes(b"garbage")
    assert (
        cli.main(
            ["matrix", "--model", str(good), "--inputs", str(tmp_path / "inputs.npz")]
        )
        == 2
    )
    assert "cannot read --inputs" in capsys.readouterr().err


@pytest.mark.slow
def test_missing_backend_is_reported_and_skipped(tmp_path, monkeypatch, capsys):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "jax" else real(name, *a),
    )
    path = _save(_dense_model(), tmp_path, "small")
    status = cli.main(
        ["matrix", "--model", str(path), "--backends", "torch,jax", "--quiet"]
    )
    out = capsys.readouterr().out
    # torch alone ran: nothing was compared (exit 1), and jax says why it is missing.
    assert status == 1, out
    assert "not installed, skipped: jax (needs jax)" in out
    assert "NOT COMPARED: only torch ran" in out
