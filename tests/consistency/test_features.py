"""The opt-in features' table (`features.FEATURES`): each feature is one
object, and adding one is its module and one entry in the table.

The built-in features are checked as declarations (no worker). A feature
made for the tests (`tally_feature`) is then added to the table and nothing
else, and must reach everything: the command line's help, arguments and
output, `run_matrix`'s keywords, the worker (through job.json: one worker run,
torch and JAX), the report's rows, JSON section and text, and
`assert_backends_agree`'s keywords and message.
"""

import dataclasses
import json

import keras
import pytest

from mhsa_core import cli
from mhsa_core.consistency import cases, features, matrix, protocol, testing
from mhsa_core.consistency.features import drift, export, locate

TWO = ["torch", "jax"]


# --------------------------------------------- the built-in features, declared
def test_the_table_holds_each_feature_once_in_its_order():
    assert [f.name for f in features.FEATURES] == ["export", "locate", "drift"]
    assert [f for f in features.FEATURES] == [
        export.FEATURE,
        locate.FEATURE,
        drift.FEATURE,
    ]


def test_keywords_and_tasks_are_each_one_features():
    """A keyword of run_matrix / a task name is owned by exactly one feature,
    and no feature takes one of the matrix's own tasks."""
    keywords = [k for f in features.FEATURES for k in f.keywords]
    assert len(set(keywords)) == len(keywords)
    assert set(keywords) == {"export", "locate", "steps", "optimizer"}
    tasks = [t for f in features.FEATURES for t in f.tasks]
    assert len(set(tasks)) == len(tasks)
    assert not set(tasks) & set(protocol.ALL_TASKS)
    assert features.known_tasks() == protocol.ALL_TASKS + (
        export.EXPORT,
        locate.LOCATE,
        locate.LOCATE64,
        drift.DRIFT,
    )
    assert set(features.inference_tasks()) == {
        protocol.FORWARD,
        protocol.SCORES,
        locate.LOCATE,
    }


@pytest.mark.parametrize("feature", features.FEATURES, ids=lambda f: f.name)
def test_defaults_are_off_and_options_survive_job_json(feature):
    assert not feature.enabled(feature.options())
    on = {
        "export": {"export": ["onnx", "litert"]},
        "locate": {"locate": True},
        "drift": {"steps": 3, "optimizer": "sgd"},
    }[feature.name]
    options = feature.options(**on)
    assert feature.enabled(options)
    data = json.loads(json.dumps(dataclasses.asdict(options)))  # as job.json has it
    assert feature.options_from_json(data) == options
    assert feature.options_from_json(None) == feature.options()


def test_an_unknown_keyword_is_a_type_error_before_any_worker(monkeypatch):
    def must_not_run(*args, **kwargs):
        raise AssertionError("a worker ran")

    monkeypatch.setattr(matrix, "run_backends", must_not_run)
    with pytest.raises(TypeError, match="Received: stepz"):
        matrix.run_matrix(cases.default_cases()[:1], TWO, stepz=3)


# ------------------------------------ a new feature: its module and one entry
def _dense(path):
    inputs = keras.Input((5,))
    x = keras.layers.Dense(4, activation="tanh")(inputs)
    keras.Model(inputs, keras.layers.Dense(2)(x)).save(path)


@pytest.fixture
def tally(monkeypatch):
    """`tally_feature` in the parent's table for one test (the workers add it
    to theirs when they import the module)."""
    original = features.FEATURES
    monkeypatch.setattr(features, "FEATURES", original)  # restored afterwards
    import tally_feature  # its import adds it: put it back as the test wants

    monkeypatch.setattr(features, "FEATURES", (*original, tally_feature.FEATURE))
    return tally_feature


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("tally") / "dense.keras"
    _dense(path)
    return path


def test_a_new_feature_reaches_the_worker_the_report_and_the_json(tally, model_path):
    case = cases.model_case(model_path, name="dense", tasks=())  # the feature alone
    report = matrix.run_matrix([case], TWO, times=3, imports=["tally_feature"])
    assert report.worker_errors == {}, report.worker_errors
    weights = (5 * 4 + 4) + (4 * 2 + 2)  # two Dense layers' kernels and biases
    for b in TWO:
        cell = report.cell("dense", tally.CHECK_NAME, b)
        assert cell.passed is True, cell
        # The worker ran the task with the options the parent gave the case.
        assert cell.note == f"{weights} weights, times=3"
    asked = tally.FEATURE.apply(case, tally.FEATURE.options(times=3))
    assert matrix.needed_tasks(asked) == (tally.TASK,)
    cells = matrix.expected_cells(asked, TWO)
    assert [c for c in cells if c[0] == tally.CHECK_NAME] == [
        (tally.CHECK_NAME, b) for b in TWO
    ]
    data = json.loads(json.dumps(report.to_json(), allow_nan=False))
    assert data[tally.NAME] == [
        {"case": "dense", "weights": dict.fromkeys(TWO, weights)}
    ]
    (row,) = [r for r in data["rows"] if r["check"] == tally.CHECK_NAME]
    assert set(row["cells"]) == set(TWO)
    # Not asked for: no task, no cell.
    assert matrix.needed_tasks(case) == ()
    assert tally.CHECK_NAME not in {c for c, _ in matrix.expected_cells(case, TWO)}


def test_a_new_feature_has_its_arguments_and_text_on_the_command_line(
    tally, model_path, monkeypatch, capsys
):
    assert cli.main(["matrix", "--help"]) == 0
    help_text = capsys.readouterr().out
    assert "--times TIMES" in help_text and "tally the weights" in help_text
    assert "mhsa-core matrix --model my_model.keras --times 3" in help_text
    assert cli.main(["matrix", "--model", str(model_path), "--times", "-1"]) == 2
    assert capsys.readouterr().err.strip() == (
        "mhsa-core: error: --times expects >= 0; received: -1"
    )

    calls = []
    case = cases.model_case(model_path, name="dense")
    empty = matrix.evaluate([case], {}, TWO)

    def run_matrix(to_run, backends, **kwargs):
        calls.append(kwargs)
        return empty

    monkeypatch.setattr(matrix, "run_matrix", run_matrix)
    cli.main(["matrix", "--model", str(model_path), "--times", "2"])
    out = capsys.readouterr().out
    assert calls[0]["times"] == 2  # its keyword, beside the other features'
    assert {"export", "locate", "steps", "optimizer"} <= set(calls[0])
    assert out.index("tally table: times=2") < out.index("tally note: 0 case(s)")
    assert out.index("tally note") < out.index("verdict:")


def test_a_new_feature_is_a_keyword_of_assert_backends_agree(
    tally, model_path, monkeypatch
):
    calls = []
    case = cases.model_case(model_path, name="dense")
    empty = matrix.evaluate([case], {}, TWO)

    def run_matrix(to_run, backends, **kwargs):
        calls.append(kwargs)
        return empty

    monkeypatch.setattr(testing.matrix, "run_matrix", run_matrix)
    with pytest.raises(AssertionError, match="tally table: times=4") as raised:
        testing.assert_backends_agree(model_path, backends=TWO, times=4)
    assert "tally note: 0 case(s)" in str(raised.value)
    assert calls[0]["times"] == 4
    with pytest.raises(ValueError, match="Received: times=-4"):
        testing.assert_backends_agree(model_path, backends=TWO, times=-4)
    assert len(calls) == 1  # refused before anything ran
