"""The pytest plugin: `pytest --keras-backends ...` and the `backend_outputs` fixture.

A sample suite (a tiny model of our layer; a bug planted on torch only, a
failure planted on jax only, a test that records on two backends of three,
one skipped on torch) runs once under three backends, in a pytest process
of its own as a user would start it (`sample_run`, module-scoped: three
worker start-ups are most of this file's time); the tests below read its
verdicts from its JUnit XML, its terminal output and its exit status. The
cases that start one worker or none (the option absent, bad values, one
backend selected) use `pytester`.
"""

import json
import os
import subprocess
import sys
import xml.etree.ElementTree as ET

import numpy as np
import pytest

from mhsa_core import _subprocess
from mhsa_core.consistency import pytest_plugin, records
from mhsa_core.consistency.records import BackendOutputs, Record

pytest_plugins = ["pytester"]

THREE = "tensorflow,torch,jax"

SAMPLE = """
import os

import keras
import numpy as np
import pytest

import mhsa_core

X = np.random.default_rng(1).standard_normal((2, 4, 4, 8)).astype("float32")


def _model():
    inputs = keras.Input((4, 4, 8))
    layer = mhsa_core.MultiHeadSelfAttention2D(num_heads=2, name="mhsa")
    model = keras.Model(inputs, layer(inputs))
    rng = np.random.default_rng(0)
    model.set_weights(
        [0.3 * rng.standard_normal(w.shape).astype(w.dtype) for w in model.weights]
    )
    return model


def test_clean(backend_outputs):
    backend_outputs.record("y", model=_model(), inputs=X)


def test_planted_torch(backend_outputs):
    model = _model()
    logits = keras.ops.convert_to_numpy(model(X))
    if keras.backend.backend() == "torch":
        logits = logits + 1e-3  # a bug in torch's code path only
    backend_outputs.record("logits", logits, model=model, inputs=X)


def test_fails_on_jax():
    assert keras.backend.backend() != "jax", "planted: jax only"


def test_plain_array(backend_outputs):
    backend_outputs.record("pooled", keras.ops.mean(keras.ops.ones((3, 4)), axis=0))


def test_records_on_two(backend_outputs):
    if keras.backend.backend() != "jax":
        backend_outputs.record("y", model=_model(), inputs=X)


def test_skipped_on_torch():
    if keras.backend.backend() == "torch":
        pytest.skip("not on torch")


def test_records_nothing():
    assert keras.ops.sum(keras.ops.ones(3)) == 3


@pytest.fixture
def broken_on_tensorflow():
    if keras.backend.backend() == "tensorflow":
        raise RuntimeError("planted: a fixture broken on tensorflow")


def test_fixture_fails_on_tensorflow(broken_on_tensorflow):
    pass


def test_zz_crashes_torch():  # last: the torch process ends here
    if keras.backend.backend() == "torch":
        os._exit(3)
"""

# The sample's conftest imports keras, as many do (this project's does): in
# the parent it must get Keras's numpy backend, not TensorFlow or torch. It
# writes what the parent imported.
SAMPLE_CONFTEST = """
import json, sys

import keras

def pytest_sessionfinish(session):
    if not session.config.getoption("keras_backends_worker"):
        names = ("tensorflow", "torch", "jax")
        loaded = [m for m in names if m in sys.modules]
        with open("parent.json", "w") as f:
            json.dump({"backend": keras.backend.backend(), "loaded": loaded}, f)
"""


@pytest.fixture(scope="module")
def sample_run(tmp_path_factory):
    """The sample suite under tensorflow, torch and jax: (exit status, output,
    {test name: JUnit testcase}, what the parent imported, the
    --keras-backends-json data)."""
    missing = [b for b in THREE.split(",") if not _subprocess.backend_available(b)]
    if missing:
        pytest.skip(f"needs all three backends; not installed: {missing}")
    root = tmp_path_factory.mktemp("sample")
    (root / "test_sample.py").write_text(SAMPLE)
    (root / "conftest.py").write_text(SAMPLE_CONFTEST)
    # No KERAS_BACKEND: the plugin sets the parent's (keras's default would
    # be TensorFlow).
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("PYTEST_ADDOPTS", "KERAS_BACKEND")
    }
    proc = subprocess.run(
        [
            *(sys.executable, "-m", "pytest", "-v", "-p", "no:cacheprovider"),
            *(f"--keras-backends={THREE}", "--junitxml=junit.xml", "-rA"),
            "--keras-backends-json=keras-backends.json",
        ],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    cases = {
        case.get("name"): case
        for case in ET.parse(root / "junit.xml").getroot().iter("testcase")
    }
    parent = json.loads((root / "parent.json").read_text())
    data = json.loads((root / "keras-backends.json").read_text())
    return proc.returncode, proc.stdout + proc.stderr, cases, parent, data


def _properties(case):
    return {p.get("name"): p.get("value") for p in case.iter("property")}


def _outcome(case):
    for tag in ("failure", "error", "skipped"):
        if case.find(tag) is not None:
            return tag
    return "passed"


# test, outcome over the backends, per-backend statuses, arrays' verdict
OK = ("passed", "passed", "passed")
NONE = "nothing recorded"
EXPECTED = [
    ("test_clean", "passed", OK, "agree"),
    ("test_planted_torch", "failure", OK, "disagree"),
    ("test_fails_on_jax", "failure", ("passed", "passed", "failed"), NONE),
    ("test_plain_array", "passed", OK, "agree"),
    ("test_records_on_two", "passed", OK, "agree"),
    ("test_skipped_on_torch", "passed", ("passed", "skipped", "passed"), NONE),
    ("test_records_nothing", "passed", OK, NONE),
    ("test_fixture_fails_on_tensorflow", "error", ("error", "passed", "passed"), NONE),
    ("test_zz_crashes_torch", "failure", ("passed", "not run", "passed"), NONE),
]


@pytest.mark.slow
@pytest.mark.parametrize(
    "name, outcome, statuses, arrays", EXPECTED, ids=[e[0] for e in EXPECTED]
)
def test_each_backend_and_the_comparison_are_reported(
    sample_run, name, outcome, statuses, arrays
):
    """One JUnit test case per test, its verdict over the backends, and each
    backend's status and the arrays' verdict as its properties."""
    _, output, cases, _, _ = sample_run
    case = cases[name]
    assert _outcome(case) == outcome, output
    properties = _properties(case)
    assert [properties[f"keras_backend.{b}"] for b in THREE.split(",")] == list(
        statuses
    )
    assert properties["keras_backends.arrays"] == arrays


@pytest.mark.slow
def test_a_backend_only_bug_fails_naming_the_backend_and_the_array(sample_run):
    status, output, cases, _, _ = sample_run
    assert status == 1
    message = cases["test_planted_torch"].find("failure").get("message")
    assert message == "arrays disagree: logits (as recorded) on torch"
    assert (
        "verdict: DISAGREE: 1 of 6 cells beyond tolerance: logits/as recorded/torch"
        in output
    )
    assert "logits: TensorFlow's float64 run" in output  # the float64 twin's oracle
    # The matrix's table, within 80 columns.
    table = output[output.index("backends disagree on") :].split("oracles:")[0]
    assert "│ logits │ as recorded  │" in table
    assert max(len(line) for line in table.splitlines()) <= 80, table


@pytest.mark.slow
def test_the_same_verdicts_as_json(sample_run):
    """--keras-backends-json: each test's statuses, and its arrays' report in
    the matrix's JSON form."""
    *_, data = sample_run
    assert data["backends"] == THREE.split(",")
    assert data["runs"]["torch"]["problem"] == (
        "its pytest process ended without finishing the session"
    )
    tests = {t["nodeid"].split("::")[-1]: t for t in data["tests"]}
    planted = tests["test_planted_torch"]
    assert planted["arrays"] == "disagree"
    assert planted["report"]["verdict"] == "disagree"
    (row, twin) = planted["report"]["rows"]
    assert (row["case"], row["check"], twin["check"]) == (
        "logits",
        "as recorded",
        "float64 twin",
    )
    assert {b: c["passed"] for b, c in row["cells"].items()} == {
        "tensorflow": True,
        "torch": False,
        "jax": True,
    }
    assert tests["test_records_nothing"]["report"] is None


@pytest.mark.slow
def test_a_test_failing_on_one_backend_names_it(sample_run):
    _, output, cases, _, _ = sample_run
    failure = cases["test_fails_on_jax"].find("failure")
    assert failure.get("message").startswith("[jax] AssertionError: planted: jax only")
    assert "failed on jax (tensorflow: passed, torch: passed)" in failure.text
    assert "test_sample.py::test_fails_on_jax FAILED (jax)" in output


@pytest.mark.slow
def test_a_fixture_error_on_one_backend_names_it(sample_run):
    _, output, cases, _, _ = sample_run
    error = cases["test_fixture_fails_on_tensorflow"].find("error")
    assert error.get("message").startswith(
        'failed on setup with "[tensorflow] RuntimeError: planted'
    )
    assert "test_fixture_fails_on_tensorflow ERROR (tensorflow)" in output


@pytest.mark.slow
def test_a_crashed_backend_fails_the_run_naming_it(sample_run):
    """torch's process dies in the last test: that test fails on torch, and
    the run has an error naming the backend, with the end of its output."""
    _, output, cases, _, _ = sample_run
    failure = cases["test_zz_crashes_torch"].find("failure")
    assert failure.get("message") == (
        "[torch] not run: its pytest process ended without finishing the session"
    )
    assert "ERROR [keras backend torch] - torch: its pytest process ended" in output
    # The end of torch's own output: where it stopped.
    tail = output.split("keras backend torch: its pytest process ended")[1]
    assert "test_sample.py::test_zz_crashes_torch" in tail


@pytest.mark.slow
def test_what_was_not_compared_says_why(sample_run):
    """Recorded on two backends of three: compared on those two, and the third
    is named with why."""
    _, output, _, _, _ = sample_run
    assert (
        "not compared: test_sample.py::test_records_on_two: y: not compared on jax "
        "(jax passed without recording it)"
    ) in output
    assert (
        "test_records_on_two PASSED (tensorflow, torch, jax; agree, some not compared)"
    ) in output
    assert "test_skipped_on_torch PASSED (tensorflow, jax; torch skipped)" in output


@pytest.mark.slow
def test_the_parent_runs_no_framework(sample_run):
    """The conftest's `import keras` in the parent got the numpy backend (the
    plugin's own code imports no keras: tests/test_imports.py)."""
    _, _, _, parent, _ = sample_run
    assert parent == {"backend": "numpy", "loaded": ["jax"]}


# ------------------------------------------------------------ pytester
RECORDING = """
import numpy as np

def test_records(backend_outputs, tmp_path):
    backend_outputs.record("x", np.arange(3.0))
    assert backend_outputs.recording is {recording}
    assert tmp_path.is_dir()
"""


def test_without_the_option_the_plugin_does_nothing(pytester):
    """The test runs here, under this process's backend; no worker starts and
    the fixture keeps nothing."""
    pytester.makepyfile(RECORDING.format(recording=False))
    result = pytester.runpytest("-p", "no:cacheprovider")
    result.assert_outcomes(passed=1)
    assert "keras backends" not in result.stdout.str()


BAD_VALUES = [
    ("unknown", ["--keras-backends=jax,tourch"], "unknown Keras backend 'tourch'"),
    ("empty", ["--keras-backends="], "needs a comma-separated list"),
    ("not-installed", ["--keras-backends=jax"], "jax is not installed: needs no_such"),
    ("ini", ["-o", "keras_backends=tourch"], "keras_backends (ini): unknown Keras"),
]


@pytest.mark.parametrize(
    "args, message", [b[1:] for b in BAD_VALUES], ids=[b[0] for b in BAD_VALUES]
)
def test_bad_values_are_usage_errors(pytester, monkeypatch, args, message):
    """Exit status 4 and one line that names the option and the value."""
    monkeypatch.setitem(_subprocess.BACKEND_MODULES, "jax", ("keras", "jax", "no_such"))
    pytester.makepyfile(RECORDING.format(recording=False))
    result = pytester.runpytest(*args)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    errors = [line for line in result.errlines if line.startswith("ERROR:")]
    assert len(errors) == 1 and message in errors[0], result.errlines
    assert "Received: " in errors[0]


@pytest.mark.slow
@pytest.mark.parametrize("where", ["option", "ini"])
def test_one_backend_is_not_compared(pytester, where):
    """Selected alone, a backend's records are not compared: the test passes
    (its own assertions held there) and says so; exit status 0."""
    pytester.makepyfile(RECORDING.format(recording=True))
    args = ["-v", "-p", "no:cacheprovider"]
    if where == "ini":
        pytester.makeini("[pytest]\nkeras_backends = jax\n")
    else:
        args.append("--keras-backends=jax")
    result = pytester.runpytest(*args)
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(
        [
            "*test_records PASSED (jax; not compared)*",
            "not compared: only jax was selected (--keras-backends): "
            "one backend is no agreement",
        ]
    )
    assert result.ret == 0


SELECTIONS = [
    ("keyword", ["-k", "chosen"]),
    ("node-id", ["test_selection.py::test_chosen"]),
]


@pytest.mark.slow
@pytest.mark.parametrize(
    "selection", [s[1] for s in SELECTIONS], ids=[s[0] for s in SELECTIONS]
)
def test_the_backends_run_the_selected_tests(pytester, selection):
    """Each backend's process runs the parent's arguments: the same selection."""
    pytester.makepyfile(
        test_selection="def test_chosen():\n    pass\n\n"
        "def test_other():\n    raise AssertionError\n"
    )
    result = pytester.runpytest(
        "-p", "no:cacheprovider", "--keras-backends=jax", *selection
    )
    result.assert_outcomes(passed=1)


@pytest.mark.slow
def test_prints_show_with_s(pytester):
    """-s: each backend's output (the tests' prints) after it ends."""
    pytester.makepyfile(
        "import os\n\ndef test_prints():\n"
        "    print('printed under', os.environ['KERAS_BACKEND'])\n"
    )
    result = pytester.runpytest("-s", "-p", "no:cacheprovider", "--keras-backends=jax")
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(["*- jax's output -*", "*printed under jax"])


PARSED = [
    ("list", "tensorflow,jax", ["tensorflow", "jax"]),
    ("spaces-and-repeats", " jax, tensorflow ,jax", ["jax", "tensorflow"]),
    ("all-installed", "all", ["tensorflow", "jax"]),  # torch made missing below
    ("numpy", "numpy,jax", ["numpy", "jax"]),
]


@pytest.mark.parametrize(
    "value, backends", [p[1:] for p in PARSED], ids=[p[0] for p in PARSED]
)
def test_parse_backends(monkeypatch, value, backends):
    monkeypatch.setitem(_subprocess.BACKEND_MODULES, "torch", ("keras", "no_such"))
    assert pytest_plugin.parse_backends(value) == backends


WORKER_ARGS = [
    ("option", ["-x", "--keras-backends", "jax", "t.py"], ["-x", "t.py"]),
    ("option=", ["--keras-backends=jax", "-q"], ["-q"]),
    ("json", ["--keras-backends-json", "r.json", "-q"], ["-q"]),
    (
        "others-kept",
        ["--junitxml=j.xml", "--basetemp", "b"],
        ["--junitxml=j.xml", "--basetemp", "b"],
    ),
]


@pytest.mark.parametrize(
    "args, expected", [w[1:] for w in WORKER_ARGS], ids=[w[0] for w in WORKER_ARGS]
)
def test_worker_args(tmp_path, args, expected):
    """A worker runs the parent's arguments minus the plugin's own (its junit
    file and basetemp are settled in the worker: the sample run's junit XML
    is the parent's, and the pytester runs use tmp_path under a basetemp)."""
    assert pytest_plugin.worker_args(args, tmp_path) == [
        *expected,
        f"--keras-backends-worker={tmp_path}",
    ]


BAD_RECORDS = [
    ("empty-name", ("",), {}, "non-empty string"),
    ("no-value", ("y",), {}, "Give a `value`"),
    ("model-without-inputs", ("y", None), {"model": object()}, "go together"),
    ("rtol", ("y", [1.0]), {"rtol": 0}, "rtol=0"),
    ("strings", ("y", ["a"]), {}, "numeric arrays"),
]


@pytest.mark.parametrize(
    "args, kwargs, message",
    [b[1:] for b in BAD_RECORDS],
    ids=[b[0] for b in BAD_RECORDS],
)
def test_record_checks_its_arguments_also_when_not_recording(args, kwargs, message):
    """The same errors with or without --keras-backends, so a test that passes
    alone does not fail only under the plugin."""
    with pytest.raises(ValueError, match=message.replace("`", ".")):
        BackendOutputs(None).record(*args, **kwargs)


def test_a_name_is_recorded_once():
    outputs = BackendOutputs(None)
    outputs.record("y", [1.0])
    with pytest.raises(ValueError, match="recorded already"):
        outputs.record("y", [2.0])


# ------------------------------------------------- judging, without workers
def _records(offsets, *, shape=(4,), float64=True, rtol=None, quantization=None):
    """{backend: {"y": Record}}: y = base + offset on each backend, with the
    exact base as each backend's float64 twin."""
    base = np.linspace(-1.0, 1.0, int(np.prod(shape))).reshape(shape)
    return {
        b: {
            "y": Record(
                "y",
                [(base + offset).astype(np.float32)],
                [base] if float64 else None,
                rtol,
                quantization,
            )
        }
        for b, offset in offsets.items()
    }


JUDGED = [
    # id, {backend: offset}, options, status, failing backends
    ("twin-agree", {"tensorflow": 0, "torch": 1e-7, "jax": 0}, {}, "agree", []),
    (
        "twin-one-off",
        {"tensorflow": 0, "torch": 1e-3, "jax": 0},
        {},
        "disagree",
        ["torch"],
    ),
    (
        "peer-floor",
        {"torch": 0, "jax": 1e-4},
        {"float64": False},
        "disagree",
        ["torch", "jax"],
    ),
    (
        "peer-rtol",
        {"torch": 0, "jax": 1e-4},
        {"float64": False, "rtol": 1e-3},
        "agree",
        [],
    ),
    ("one-backend", {"jax": 0}, {}, "not compared", []),
    # A model quantized int8 (`quantization_of` its config at record time):
    # one activation step (1/127 of max|oracle| = 1) of slack, no more.
    (
        "int8-within-a-step",
        {"tensorflow": 0, "torch": 5e-3, "jax": 0},
        {"quantization": "int8"},
        "agree",
        [],
    ),
    (
        "int8-beyond-a-step",
        {"tensorflow": 0, "torch": 2e-2, "jax": 0},
        {"quantization": "int8"},
        "disagree",
        ["torch"],
    ),
]


@pytest.mark.parametrize(
    "offsets, options, status, failing",
    [j[1:] for j in JUDGED],
    ids=[j[0] for j in JUDGED],
)
def test_judge(offsets, options, status, failing):
    """The matrix's rules on recorded arrays: with a float64 twin, TensorFlow's
    run is the oracle and only the backend that is off fails; without one,
    two backends' midpoint cannot tell which is off (both fail) unless rtol
    covers their difference."""
    judgement = records.judge(list(offsets), _records(offsets, **options))
    assert judgement.status == status
    assert sorted({b for _, b, _ in judgement.report.failures}) == sorted(failing)


def test_judge_shapes_that_differ_have_no_oracle():
    arrays = _records({"torch": 0, "jax": 0}, float64=False)
    arrays["jax"]["y"].values = [np.zeros(5, np.float32)]
    judgement = records.judge(["torch", "jax"], arrays)
    assert judgement.status == "disagree"
    assert {c.note for _, _, c in judgement.report.failures} == {
        "no oracle: the backends' shapes differ"
    }


def test_judge_says_why_a_backend_was_not_compared():
    arrays = _records({"tensorflow": 0, "torch": 0})
    judgement = records.judge(
        ["tensorflow", "torch", "jax"], arrays, {"jax": "skipped"}
    )
    assert judgement.status == "agree"
    assert judgement.not_compared == ["y: not compared on jax (jax skipped)"]
