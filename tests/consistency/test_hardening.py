"""Wrong answers and tracebacks a new user found (issue 9, points 1-6): one
backend taken for agreement, a backend counted as installed without what it
imports, tracebacks on users' inputs, a parent that imports a framework, JSON
that is not JSON, no --version.

One module-scoped worker run (torch, on a tiny model) serves several tests;
the others judge hand-made reports and run no worker.
"""

import contextlib
import importlib.util
import io
import json
import re
import subprocess
import sys
from importlib.metadata import version

import keras
import numpy as np
import pytest

import mhsa_core
from mhsa_core import cli
from mhsa_core.consistency import (
    cases,
    matrix,
    protocol,
    runner,
    task_context,
    testing,
)
from mhsa_core.consistency.cases import Case
from mhsa_core.consistency.report import (
    NOT_JUDGED_LEGEND,
    TABLE_WIDTH,
    Cell,
    Report,
    Row,
    cell_of,
    cell_text,
    headline,
    render,
    verdict,
)
from mhsa_core.consistency.runner import BackendRun

import custom_layers

FRAMEWORKS = ("keras", "tensorflow", "torch", "jax")


def _without(modules):
    """A `find_spec` that does not find `modules` (top-level names)."""
    real = importlib.util.find_spec

    def find_spec(name, *args, **kwargs):
        if name.split(".")[0] in modules:
            return None
        return real(name, *args, **kwargs)

    return find_spec


def _dense_model():
    inputs = keras.Input((6,))
    x = keras.layers.Dense(5, activation="tanh")(inputs)
    return keras.Model(inputs, keras.layers.Dense(3)(x))


# ------------------------------------------------ 2. what a backend needs
@pytest.mark.parametrize(
    "missing, backend, reason",
    [
        (("scipy",), "numpy", "not installed: needs scipy"),
        (("scipy",), "jax", "not installed: needs scipy"),
        (("scipy",), "torch", None),
        (("jaxlib",), "numpy", "not installed: needs jaxlib"),
        (("jax", "jaxlib"), "jax", "not installed: needs jax, jaxlib"),
        (("torch",), "torch", "not installed: needs torch"),
        (("keras",), "tensorflow", "not installed: needs keras"),
        ((), "numpy", None),
    ],
    ids=[
        "numpy-needs-scipy",
        "jax-needs-scipy",
        "torch-without-scipy",
        "numpy-needs-jaxlib",
        "jax-needs-jax-jaxlib",
        "torch-missing",
        "no-keras",
        "all-installed",
    ],
)
def test_unavailable_reason(monkeypatch, missing, backend, reason):
    monkeypatch.setattr(importlib.util, "find_spec", _without(missing))
    assert runner.unavailable_reason(backend) == reason
    assert runner.backend_available(backend) is (reason is None)


def test_unknown_backend_is_a_value_error():
    with pytest.raises(ValueError, match="Received: backend='theano'"):
        runner.backend_available("theano")


# -------------------------------- 1, 2, 5: one real run, torch alone ran
@pytest.fixture(scope="module")
def torch_alone(tmp_path_factory):
    """`mhsa-core matrix --model M --backends torch,numpy --json -` on an
    install without scipy (numpy skipped): (status, stdout, stderr, report)."""
    path = tmp_path_factory.mktemp("torch_alone") / "small.keras"
    _dense_model().save(path)
    reports = []
    real_run_matrix = matrix.run_matrix

    def keep(*args, **kwargs):
        reports.append(real_run_matrix(*args, **kwargs))
        return reports[-1]

    stdout, stderr = io.StringIO(), io.StringIO()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(importlib.util, "find_spec", _without(("scipy",)))
        mp.setattr(matrix, "run_matrix", keep)
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            status = cli.main(
                [
                    "matrix",
                    "--model",
                    str(path),
                    "--backends",
                    "torch,numpy",
                    "--json",
                    "-",
                ]
            )
    return status, stdout.getvalue(), stderr.getvalue(), reports[0]


def test_one_backend_is_not_agreement(torch_alone):
    status, _, stderr, report = torch_alone
    assert status == 1, stderr
    assert "verdict: NOT COMPARED: only torch ran: nothing was compared" in stderr
    assert "numpy (needs scipy)" in stderr
    assert report.ran == ["torch"] and not report.compared and not report.agree
    # Its cells against the oracle stay visible, and passed.
    assert report.cell("small", "forward", "torch").passed
    assert "forward repeatable" in stderr and " ok" in stderr


def test_json_to_stdout_is_strict_and_alone(torch_alone):
    _, stdout, stderr, _ = torch_alone
    data = json.loads(stdout)  # stdout holds the JSON and nothing else
    assert data["schema_version"] == 1 and data["tool_version"] == mhsa_core.__version__
    assert data["verdict"] == "not_compared" and data["compared"] == ["torch"]
    assert data["backend_runs"]["numpy"] == {
        "status": "skipped",
        "reason": "not installed: needs scipy",
        "keras_version": None,
        "framework_version": None,
        "seconds": 0.0,
    }
    torch_run = data["backend_runs"]["torch"]
    assert torch_run["status"] == "ran" and torch_run["reason"] is None
    assert torch_run["keras_version"] == keras.__version__
    assert (
        torch_run["framework_version"].split("+")[0] == version("torch").split("+")[0]
    )
    assert data["worker_errors"] == {}
    assert "verdict:" in stderr  # the table and verdict went to stderr


def test_assert_backends_agree_fails_or_skips_on_one_backend(torch_alone, monkeypatch):
    report = torch_alone[3]
    monkeypatch.setattr(testing.matrix, "run_matrix", lambda *a, **k: report)
    path = _dense_model()
    with pytest.raises(AssertionError, match="only torch ran: nothing was compared"):
        testing.assert_backends_agree(path, backends=("torch", "numpy"))
    with pytest.raises(pytest.skip.Exception, match="only torch ran"):
        testing.assert_backends_agree(
            path, backends=("torch", "numpy"), skip_if_not_compared=True
        )


# ---------------------------------------------- 1. verdicts, hand-made
def _report(cells_by_backend, missing=(), crashed=()):
    backends = list(cells_by_backend) + list(missing) + list(crashed)
    rows = [Row("m", "forward", dict(cells_by_backend))]
    errors = {b: "not installed: needs scipy" for b in missing}
    errors.update({b: "worker exited with status 1" for b in crashed})
    return Report(backends, rows, errors)


OK, OVER = cell_of(1.0, 2.0), cell_of(3.0, 2.0)
RAISED = Cell(passed=False, note="grads: ValueError: bad")


@pytest.mark.parametrize(
    "cells, missing, crashed, status, text",
    [
        ({"torch": OK}, (), (), "not_compared", "NOT COMPARED: only torch ran"),
        ({"torch": OK}, ("numpy",), (), "not_compared", "NOT COMPARED: only torch ran"),
        (
            {"torch": OK, "jax": OK},
            (),
            (),
            "agree",
            "all 2 cells agree across torch, jax",
        ),
        ({"torch": OK, "jax": OVER}, (), (), "disagree", "DISAGREE: 1 of 2 cells"),
        ({"torch": OK}, (), ("jax",), "failed", "FAIL: worker(s) failed: jax"),
        ({}, ("numpy",), (), "not_compared", "nothing was checked"),
        (
            {"torch": OK, "jax": RAISED},
            (),
            (),
            "failed",
            "FAIL: 1 cells not computed (a task raised, or no oracle): m/forward/jax",
        ),
        (
            {"torch": OVER, "jax": RAISED},
            (),
            (),
            "disagree",
            "DISAGREE: 1 of 2 cells beyond tolerance: m/forward/torch; "
            "1 cells not computed",
        ),
    ],
    ids=[
        "one-backend",
        "one-ran-one-missing",
        "two-agree",
        "two-disagree",
        "crash",
        "none-ran",
        "task-raised",
        "beyond-and-raised",
    ],
)
def test_verdict(cells, missing, crashed, status, text):
    report = _report(cells, missing, crashed)
    assert report.status == status
    assert report.agree is (status == "agree")
    assert text in verdict(report)


# ------------------------------------------- 1. what was compared, in words
def _model_runs(backends, float64=True):
    a = np.linspace(-1.0, 1.0, 6).reshape(2, 3)
    runs = {}
    for i, b in enumerate(backends):
        res = {
            protocol.FORWARD: {
                protocol.out_key(0): (a + 1e-7 * i).astype("float32"),
                protocol.AGAIN_KEY: (a + 1e-7 * i).astype("float32"),
            }
        }
        if float64:
            res[protocol.FORWARD64] = {protocol.out_key(0): a + 1e-15 * i}
        runs[b] = BackendRun(b, results={"m": res})
    return runs


@pytest.mark.parametrize(
    "backends, float64, expected",
    [
        (
            ["torch", "jax"],
            True,
            "forward, jit and .keras loads: the midpoint of torch and jax "
            "(float64): a disagreement between them cannot be attributed to one of "
            "them",
        ),
        (["tensorflow", "torch"], True, "TensorFlow's float64 run"),
        (
            ["tensorflow", "torch", "jax"],
            False,
            "the median of the float32 runs of tensorflow, torch, jax",
        ),
        (["torch"], True, "torch's own float64 run only (nothing to compare it with)"),
    ],
    ids=["two-midpoint", "tensorflow-float64", "three-median-float32", "one"],
)
def test_report_says_what_was_compared(backends, float64, expected):
    case = Case(
        "m",
        None,
        [{"input_0": np.zeros((2, 6), "float32")}],
        model_path="m.keras",
        tasks=(protocol.FORWARD, protocol.FORWARD64),
    )
    report = matrix.evaluate(
        [case], _model_runs(backends, float64), backends, rtol=None if float64 else 1e-3
    )
    assert len(report.notes) == 1 and expected in report.notes[0], report.notes
    text = io.StringIO()
    render(report, text, "title")
    assert "oracles:" in text.getvalue() and expected in text.getvalue()


def test_unjudged_cell_says_so_under_its_title():
    """A lenient float64 cell (far over 1, not failed) says it was not
    judged, and the legend under the table says why."""
    cell = Cell(
        passed=None,
        ratio=895.75,
        error=1e-4,
        budget=1.1e-7,
        note="float32-level (Keras)",
    )
    assert cell_text(cell)[0] == "895.75 not judged"
    report = Report(
        ["tensorflow", "torch"],
        [
            Row(
                "m",
                "forward float64",
                {"tensorflow": cell_of(1e-9, 1e-7), "torch": cell},
            )
        ],
        {},
    )
    text = io.StringIO()
    render(report, text, "m (error / budget; <= 1 passes)")
    assert NOT_JUDGED_LEGEND.split(":")[0] in text.getvalue()
    assert report.agree  # reported, not failed


# ------------------------------------------------------- 5. strict JSON
@pytest.mark.parametrize(
    "cell, nulls",
    [
        (cell_of(1.0, 0.0), {"ratio": "inf"}),
        (cell_of(float("nan"), 1.0), {"error": "nan", "ratio": "nan"}),
        (cell_of(float("inf"), 1.0), {"error": "inf", "ratio": "inf"}),
        (cell_of(0.5, 1.0), {}),
    ],
    ids=["zero-budget", "nan-error", "inf-error", "finite"],
)
def test_json_is_strict(cell, nulls):
    report = Report(
        ["torch", "jax", "numpy"],
        [Row("m", "forward", {"torch": cell, "jax": OK})],
        {"numpy": "not installed: needs scipy"},
    )
    data = report.to_json()
    text = json.dumps(data, allow_nan=False)  # raises on NaN / Infinity
    got = json.loads(text)["rows"][0]["cells"]["torch"]
    assert got.get("non_finite", {}) == nulls
    assert all(got[k] is None for k in nulls)
    assert data["backend_runs"]["numpy"]["status"] == "skipped"
    assert data["worker_errors"] == {}


# ------------------------------------- 4, 6. no framework for --help, --version
_BLOCKER = """
import importlib.abc, sys
class Blocker(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {frameworks!r}:
            raise ImportError(f"blocked for this test: {{name}}")
        return None
sys.meta_path.insert(0, Blocker())
from mhsa_core import cli
sys.exit(cli.main({args!r}))
"""


@pytest.mark.parametrize(
    "args, expected",
    [
        (["--help"], "usage: mhsa-core"),
        (["matrix", "--help"], "exit status:"),
        (["demo", "--help"], "usage: mhsa-core demo"),
        (["--version"], f"mhsa-core {mhsa_core.__version__}"),
    ],
    ids=["help", "matrix-help", "demo-help", "version"],
)
def test_help_and_version_import_no_framework(args, expected):
    """A fresh interpreter where importing keras or a framework raises (a
    torch-only install where keras would default to TensorFlow)."""
    code = _BLOCKER.format(frameworks=FRAMEWORKS, args=args)
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    assert expected in proc.stdout
    assert "Traceback" not in proc.stderr


def test_matrix_help_has_description_examples_and_exit_codes(capsys):
    assert cli.main(["matrix", "--help"]) == 0
    text = capsys.readouterr().out
    for part in (
        "judges every result",
        "examples:",
        "mhsa-core matrix --model",
        "--json -",
        "exit status:",
        "  0  ",
        "  1  ",
        "  2  ",
    ):
        assert part in text, part


# --------------------- 3. inputs from the loaded model: dict, several, None dims
def _dict_two_output_model():
    """Dict inputs, a None non-batch dimension, two outputs; the second output
    is off under JAX only (so a cell that judged only output 0 would pass)."""
    a = keras.Input((None, 4), name="a")
    b = keras.Input((3,), name="b")
    first = keras.layers.Dense(2)(a)
    second = custom_layers.ScaledOnJax(1.001)(keras.layers.Dense(2)(b))
    return keras.Model({"a": a, "b": b}, [first, second])


@pytest.fixture(scope="module")
def dict_model_run(tmp_path_factory):
    """One matrix run (TensorFlow: the float64 oracle; JAX) of that model with
    the inputs the workers make: (report, runs)."""
    path = tmp_path_factory.mktemp("dict_model") / "dict2.keras"
    _dict_two_output_model().save(path)
    report = matrix.run_matrix(
        [cases.model_case(path, name="dict2")],
        ["tensorflow", "jax"],
        imports=["custom_layers"],
    )
    return report, report.runs


def test_workers_make_the_same_inputs_at_two_sizes(dict_model_run):
    _, runs = dict_model_run
    made = {b: run.inputs["dict2"] for b, run in runs.items()}
    assert [sorted(v) for v in made["tensorflow"]] == [["a", "b"], ["a", "b"]]
    assert [v["a"].shape for v in made["tensorflow"]] == [(2, 8, 4), (2, 6, 4)]
    assert [v["b"].shape for v in made["tensorflow"]] == [(2, 3), (2, 3)]
    for tf_variant, jax_variant in zip(made["tensorflow"], made["jax"]):
        for name in ("a", "b"):
            np.testing.assert_array_equal(tf_variant[name], jax_variant[name])


def test_every_output_of_every_variant_is_judged(dict_model_run):
    report, runs = dict_model_run
    keys = {"out/0", "out/1", "out/0/1", "out/1/1"}
    for backend, run in runs.items():
        assert keys <= set(run.results["dict2"][protocol.FORWARD]), backend
    assert runs["jax"].loads[("tensorflow", "dict2")].keys() >= keys
    forward = report.cell("dict2", "forward", "jax")
    assert forward.passed is False and forward.note in ("out/0/1", "out/1/1"), forward
    for check in ("forward", "jit forward", "gradients"):
        assert report.cell("dict2", check, "tensorflow").passed, check
    assert (
        report.cell("dict2", "gradients", "jax").passed is False
    )  # the loss sees output 1
    assert not report.agree and report.status == "disagree"


@pytest.mark.parametrize(
    "given, shapes, expected",
    [
        (["b", "a"], [(2, 3), (2, 5, 4)], [(2, 5, 4), (2, 3)]),
        (["x", "y"], [(2, 5, 4), (2, 3)], [(2, 5, 4), (2, 3)]),
        (["x"], [(2, 5, 4)], "1 array(s) ['x'], the model takes 2 input(s) ['a', 'b']"),
        (
            ["a", "b"],
            [(2, 5, 4), (2, 4)],
            "array 'b' has shape (2, 4), the model's input 'b' expects (None, 3)",
        ),
        (["a", "b"], [(2, 4), (2, 3)], "array 'a' has shape (2, 4)"),
    ],
    ids=["by-name", "by-order", "wrong-count", "wrong-shape", "wrong-rank"],
)
def test_given_inputs_are_matched_to_the_model(given, shapes, expected):
    spec = task_context.ModelInputs(keras, _dict_two_output_model())
    assert spec.names == ["a", "b"] and spec.kind == "dict"
    variants = [[np.zeros(s, "float32") for s in shapes]]
    if isinstance(expected, str):
        with pytest.raises(ValueError, match=re.escape(expected)):
            spec.match(given, variants)
    else:
        assert [x.shape for x in spec.match(given, variants)[0]] == expected


@pytest.mark.parametrize(
    "specs, shapes",
    [
        ([("x", (None, 6), "float32")], [[(2, 6)]]),
        ([("x", (None, None, None, 3), "float32")], [[(2, 8, 8, 3)], [(2, 6, 6, 3)]]),
        (
            [("x", (4, None), "float32"), ("m", (4, 5), "bool")],
            [[(4, 8), (4, 5)], [(4, 6), (4, 5)]],
        ),
    ],
    ids=["fixed", "none-spatial", "fixed-batch-and-mask"],
)
def test_generate_inputs(specs, shapes):
    variants = cases.generate_inputs(specs)
    assert [[v[n].shape for n, _, _ in specs] for v in variants] == shapes
    again = cases.generate_inputs(specs)  # deterministic: every worker makes these
    for v, w in zip(variants, again):
        for name in v:
            np.testing.assert_array_equal(v[name], w[name])


@pytest.mark.slow
def test_bad_inputs_exit_2_with_the_workers_error(tmp_path, capsys):
    path = tmp_path / "small.keras"
    _dense_model().save(path)
    np.savez(tmp_path / "bad.npz", x=np.zeros((3, 5), "float32"))
    status = cli.main(
        [
            "matrix",
            "--model",
            str(path),
            "--inputs",
            str(tmp_path / "bad.npz"),
            "--backends",
            "jax",
            "--quiet",
            "--json",
            str(tmp_path / "r.json"),
        ]
    )
    err = capsys.readouterr().err
    assert status == 2, err
    assert err.strip().splitlines()[-1] == (
        "mhsa-core: error: the model could not run on any backend: ValueError: The "
        "inputs do not fit the model: array 'x' has shape (3, 5), the model's input "
        "'input_layer' expects (None, 6) (None: any size)."
    )
    assert "Traceback" not in err
    assert not (tmp_path / "r.json").exists()  # nothing half-written


# ------------------------------------------- 6. a title that claims no more
@pytest.mark.parametrize(
    "cells, missing, crashed, expected",
    [
        ({"torch": OK}, ("numpy",), (), "not compared across backends"),
        ({"torch": OK, "jax": OVER}, (), (), "backends disagree"),
        ({"torch": OK}, (), ("jax",), "a backend's worker failed"),
        ({"torch": OK, "jax": RAISED}, (), (), "checks not computed"),
        ({"torch": OK, "jax": OK}, (), (), "backends agree"),
    ],
    ids=["one-backend", "beyond-tolerance", "worker-failed", "task-raised", "agree"],
)
def test_headline_claims_no_more_than_the_verdict(cells, missing, crashed, expected):
    """The title of `assert_backends_agree`'s message: "backends disagree"
    only when a cell is beyond tolerance (a torch-only install said so above
    a NOT COMPARED verdict)."""
    title = headline(_report(cells, missing, crashed), "m.keras")
    assert title.startswith(expected) and "m.keras" in title
    assert ("disagree" in title) is (expected == "backends disagree")


def test_table_keeps_its_row_names_at_80_columns():
    """Long export notes (a CI log, no terminal): every row still names its
    case and check in full, no line is wider than the table's width, and a
    cut cell ends with an ellipsis (whole in the notes below)."""
    long = Cell(
        passed=None, note="n/a: " + "OpenVINO cannot convert XlaCallModule " * 3
    )
    scoped = Cell(
        passed=True, ratio=0.22, error=1e-7, budget=5e-7, scope="static export per size"
    )
    backends = ["tensorflow", "torch", "jax"]
    rows = [
        Row("eva_cls", "openvino export", dict(zip(backends, [scoped, scoped, long]))),
        Row("eva_cls", "forward", {b: cell_of(1e-8, 1e-7) for b in backends}),
        Row("cross", "tf_saved_model export", {b: long for b in backends}),
    ]
    text = io.StringIO()
    render(Report(backends, rows, {}), text, "a title")
    lines = text.getvalue().splitlines()
    assert max(len(line) for line in lines) <= TABLE_WIDTH
    table = "\n".join(lines)
    for name in ("eva_cls", "cross", "openvino export", "tf_saved_model export"):
        assert name in table, name
    assert "…" in table
