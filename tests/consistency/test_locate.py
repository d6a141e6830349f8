"""`--locate`: the first layer whose output leaves its budget, on which backend.

One worker run per backend covers three small models (module fixture): a
bicubic UpSampling2D between ordinary layers (torch's bicubic kernel differs),
a planted bug in one layer under JAX only (`custom_layers.ScaledOnJax`, in a
Sequential model), and a clean functional model with a nested model and a
shared layer. The CLI and `assert_backends_agree` are tested on that run's
report (their wiring: flag, section, message), without starting workers again.
"""

import dataclasses
import json

import keras
import numpy as np
import pytest

from mhsa_core import MultiHeadSelfAttention2D, cli
from mhsa_core.consistency import budgets, cases, matrix, protocol, runner
from mhsa_core.consistency import testing as consistency_testing
from mhsa_core.consistency.features import locate
from mhsa_core.consistency.runner import BackendRun

import custom_layers

BACKENDS = ["tensorflow", "torch", "jax"]
# The forward checks (a failing cell) and the locate tasks: the rest of the
# matrix (gradients, jit, saved files) is not what these tests are about.
TASKS = (protocol.FORWARD, protocol.FORWARD64) + locate.LOCATE_TASKS


def _bicubic_model():
    inputs = keras.Input((8, 8, 2))
    x = keras.layers.Conv2D(3, 3, padding="same", name="conv_in")(inputs)
    x = keras.layers.UpSampling2D(interpolation="bicubic", name="up")(x)
    x = keras.layers.Conv2D(2, 3, name="conv_out")(x)
    x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    return keras.Model(inputs, keras.layers.Dense(2, name="head")(x))


def _planted_model():
    return keras.Sequential(
        [
            keras.Input((8, 8, 2)),
            keras.layers.Conv2D(3, 3, name="conv"),
            keras.layers.Flatten(name="flat"),
            keras.layers.Dense(4, activation="tanh", name="dense"),
            custom_layers.ScaledOnJax(1.001, name="planted"),
            keras.layers.Dense(2, name="head"),
        ]
    )


def _clean_model():
    inputs = keras.Input((8, 8, 2))
    x = keras.layers.Conv2D(3, 3, padding="same", name="conv")(inputs)
    # A call with two output tensors: our layer with its attention scores.
    x, _ = MultiHeadSelfAttention2D(num_heads=1, key_dim=4, name="mhsa")(
        x, return_attention_scores=True
    )
    inner_inputs = keras.Input((8, 8, 3))
    inner = keras.Model(
        inner_inputs,
        keras.layers.Dense(3, activation="relu", name="inner_dense")(inner_inputs),
        name="inner",
    )
    x = inner(x)
    shared = keras.layers.Dense(3, activation="tanh", name="shared")
    a = shared(x)
    b = shared(keras.layers.Activation("relu", name="act")(a))
    x = keras.layers.Add(name="add")([a, b])
    x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    return keras.Model(inputs, keras.layers.Dense(2, name="head")(x))


MODELS = {"bicubic": _bicubic_model, "planted": _planted_model, "clean": _clean_model}


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("locate")
    out = {}
    for name, build in MODELS.items():
        out[name] = tmp / f"{name}.keras"
        build().save(out[name])
    return out


@pytest.fixture(scope="module")
def report(paths):
    """The three models under three backends in one run, judged as
    `run_matrix(..., locate=True)` judges them (`matrix.evaluate`)."""
    to_run = [
        dataclasses.replace(cases.model_case(p, name=n), tasks=TASKS)
        for n, p in paths.items()
    ]
    runs = runner.run_backends(
        to_run, BACKENDS, imports=["custom_layers"], portability=False
    )
    return matrix.evaluate(to_run, runs, BACKENDS)


def _section(report, case):
    return next(s for s in report.sections[locate.NAME] if s["case"] == case)


def _located(report, case, backend, task):
    return report.runs[backend].results[case][task]


# case, the first divergent layer call (None: none), the backends off there
FIRST_DIVERGENCE = [
    pytest.param("bicubic", "up", {"torch"}, id="bicubic-upsampling-torch"),
    pytest.param("planted", "planted", {"jax"}, id="planted-bug-jax"),
    pytest.param("clean", None, set(), id="clean"),
]


@pytest.mark.parametrize("case, layer, off", FIRST_DIVERGENCE)
def test_first_divergence_is_named(report, case, layer, off):
    section = _section(report, case)
    assert section["notes"] == []
    assert section["backends"] == BACKENDS
    # The matrix's forward cell fails exactly where locate finds a divergence.
    forward = {b: report.cell(case, "forward", b).passed for b in BACKENDS}
    assert forward == {b: b not in off for b in BACKENDS}
    first = section["first_divergence"]
    if layer is None:
        assert first is None
        assert section["checked"] == section["total"] == len(section["layers"])
        return
    assert first["name"] == layer
    assert set(first["backends"]) == off
    assert all(r > 1 for r in first["backends"].values())
    # The table stops at the first divergent call; every call before it
    # passed on every backend, and it passed on the other backends.
    assert section["layers"][-1]["name"] == layer
    for entry in section["layers"][:-1]:
        assert all(c["passed"] for c in entry["cells"].values()), entry
    last = section["layers"][-1]["cells"]
    assert {b for b, c in last.items() if not c["passed"]} == off


@pytest.mark.parametrize("task", [locate.LOCATE, locate.LOCATE64])
def test_bicubic_upsampling_differs_on_torch(report, task):
    """The premise of the bicubic case, in float32 and in float64: torch's
    bicubic kernel is another one (not rounding: far above float32 level),
    JAX's agrees with TensorFlow's."""
    names = list(
        _located(report, "bicubic", "tensorflow", task)[locate.LAYER_NAMES_KEY]
    )
    key = locate.layer_out_key(0, names.index("up"))
    tf = _located(report, "bicubic", "tensorflow", task)[key]
    scale = budgets.scale([tf])
    assert (
        budgets.max_abs(_located(report, "bicubic", "torch", task)[key], tf)
        > 1e-2 * scale
    )
    assert budgets.max_abs(_located(report, "bicubic", "jax", task)[key], tf) <= (
        budgets.FLOOR * scale
    )


# case, its layer calls in execution order (name, class)
LAYER_CALLS = [
    pytest.param(
        "planted",
        [
            ("conv", "Conv2D"),
            ("flat", "Flatten"),
            ("dense", "Dense"),
            ("planted", "ScaledOnJax"),
            ("head", "Dense"),
        ],
        id="sequential",
    ),
    pytest.param(
        "clean",
        [
            ("conv", "Conv2D"),
            ("mhsa", "MultiHeadSelfAttention2D"),
            ("inner", "Functional"),
            ("shared (call 1)", "Dense"),
            ("act", "Activation"),
            ("shared (call 2)", "Dense"),
            ("add", "Add"),
            ("pool", "GlobalAveragePooling2D"),
            ("head", "Dense"),
        ],
        id="functional-nested-shared",
    ),
]


@pytest.mark.parametrize("case, calls", LAYER_CALLS)
def test_layer_calls_in_execution_order(report, case, calls):
    """A nested model is one call, a shared layer one call per use; the last
    call's output is the model's output (within the repeatability budget:
    the same weights through another model object)."""
    for backend in BACKENDS:
        result = _located(report, case, backend, locate.LOCATE)
        assert (
            list(zip(result[locate.LAYER_NAMES_KEY], result[locate.LAYER_CLASSES_KEY]))
            == calls
        )
        last = result[locate.layer_out_key(0, len(calls) - 1)]
        out = report.runs[backend].results[case][protocol.FORWARD][protocol.out_key(0)]
        assert budgets.max_abs(last, out) <= budgets.repeat_budget(out), backend


def test_shared_layer_calls_are_the_right_tensors(report):
    """add = shared (call 1) + shared (call 2): each call's output is its own
    (in float64, where the sum is exact to FLOAT64_RTOL)."""
    result = _located(report, "clean", "tensorflow", locate.LOCATE64)
    names = list(result[locate.LAYER_NAMES_KEY])
    a, b, add = (
        result[locate.layer_out_key(0, names.index(n))]
        for n in ("shared (call 1)", "shared (call 2)", "add")
    )
    assert budgets.max_abs(a, b) > 0
    assert budgets.max_abs(add, a + b) <= budgets.float64_budget(add)


def test_a_call_with_two_outputs_has_both(report):
    """The block's (output, attention scores): both judged, both kept."""
    result = _located(report, "clean", "torch", locate.LOCATE)
    i = list(result[locate.LAYER_NAMES_KEY]).index("mhsa")
    assert result[locate.layer_out_key(0, i, 0)].shape == (2, 8, 8, 3)
    assert result[locate.layer_out_key(0, i, 1)].shape == (2, 1, 64, 64)
    assert locate.layer_out_key(0, i, 2) not in result


def test_report_json_has_the_section(report):
    data = json.loads(json.dumps(report.to_json(), allow_nan=False))
    assert [s["case"] for s in data[locate.NAME]] == list(MODELS)
    assert "locate" not in {r["check"] for r in data["rows"]}


def test_cli_prints_the_section(report, paths, tmp_path, monkeypatch, capsys):
    calls = []

    def fake_run_matrix(to_run, backends, **kwargs):
        calls.append(kwargs)
        return report

    monkeypatch.setattr(matrix, "run_matrix", fake_run_matrix)
    json_path = tmp_path / "r.json"
    status = cli.main(
        [
            "matrix",
            "--model",
            str(paths["bicubic"]),
            "--locate",
            "--backends",
            ",".join(BACKENDS),
            "--import",
            "custom_layers",
            "--json",
            str(json_path),
            "--quiet",
        ]
    )
    assert status == 1
    assert calls[0]["locate"] is True
    assert json.loads(json_path.read_text())[locate.NAME][0]["case"] == "bicubic"
    capsys.readouterr()
    status = cli.main(
        [
            "matrix",
            "--model",
            str(paths["bicubic"]),
            "--locate",
            "--backends",
            ",".join(BACKENDS),
        ]
    )
    out = capsys.readouterr().out
    assert out.index("verdict:") > out.index("first divergence")
    assert (
        "first divergence: layer 'up' (UpSampling2D) on torch: " in out
        and "its budget; every layer call before it, so its inputs, was within budget"
        in out
    )
    assert "first divergence: layer 'planted' (ScaledOnJax) on jax: " in out
    assert "locate clean: no layer leaves its budget (9 layer calls" in out


def test_locate_needs_a_model(capsys):
    assert cli.main(["matrix", "--locate"]) == 2
    assert "--locate need --model" in capsys.readouterr().err


def test_assert_backends_agree_names_the_layer(report, paths, monkeypatch):
    calls = []

    def fake_run_matrix(to_run, backends, **kwargs):
        calls.append(kwargs)
        return report

    monkeypatch.setattr(consistency_testing.matrix, "run_matrix", fake_run_matrix)
    with pytest.raises(
        AssertionError,
        match=r"first divergence: layer 'planted' \(ScaledOnJax\) on jax",
    ):
        consistency_testing.assert_backends_agree(
            paths["planted"], backends=BACKENDS, imports=["custom_layers"], locate=True
        )
    assert calls[0]["locate"] is True


def test_run_matrix_adds_the_locate_tasks_to_model_cases_only(paths, monkeypatch):
    seen = []

    class Ran(Exception):
        pass

    def fake_run_backends(to_run, backends, **kwargs):
        seen.extend(to_run)
        raise Ran  # the tasks are decided; nothing to judge

    monkeypatch.setattr(matrix, "run_backends", fake_run_backends)
    layer_case = cases.default_cases()[0]
    model_case = cases.model_case(paths["clean"], name="clean")
    for flag in (True, False):
        seen.clear()
        with pytest.raises(Ran):
            matrix.run_matrix([layer_case, model_case], ["tensorflow"], locate=flag)
        tasks = {c.name: c.tasks for c in seen}
        assert not set(locate.LOCATE_TASKS) & set(tasks[layer_case.name])
        assert (set(locate.LOCATE_TASKS) <= set(tasks["clean"])) is flag


# ------------------------------------------------ parent only, no workers
def _fake_run(backend, case, locate_result, locate64_result=None):
    results = {locate.LOCATE: locate_result}
    if locate64_result is not None:
        results[locate.LOCATE64] = locate64_result
    return BackendRun(backend, results={case.name: results})


def _layers(*arrays):
    out = {locate.layer_out_key(0, i): a for i, a in enumerate(arrays)}
    out[locate.LAYER_NAMES_KEY] = np.array([f"l{i}" for i in range(len(arrays))])
    out[locate.LAYER_CLASSES_KEY] = np.array(["Dense"] * len(arrays))
    return out


def test_a_model_that_cannot_run_layer_by_layer_says_why():
    case = cases.Case(
        "sub", None, [{"input_0": np.zeros(2)}], model_path="m.keras", tasks=TASKS
    )
    reason = locate.error_result(
        "Traceback ...\nValueError: --locate runs functional and "
        "Sequential models layer by layer; MyModel is neither"
    )
    runs = {b: _fake_run(b, case, reason, reason) for b in BACKENDS}
    section = locate.locate_case(case, runs, BACKENDS)
    assert section["checked"] == 0 and section["first_divergence"] is None
    text = locate.format_section(section)
    assert text.startswith("locate sub: not located: ")
    assert "tensorflow (locate): ValueError: --locate runs functional" in text


def test_first_divergence_with_a_shape_mismatch_and_the_median_oracle():
    """Without float64 runs (rtol): the median oracle; a backend whose layer
    output has another shape: no oracle there, so that call is where every
    backend diverges."""
    case = cases.Case(
        "m", None, [{"input_0": np.zeros(2)}], model_path="m.keras", tasks=TASKS
    )
    ones, twos = np.ones((2, 3)), np.ones((2, 4))
    runs = {
        "tensorflow": _fake_run("tensorflow", case, _layers(ones, ones)),
        "torch": _fake_run("torch", case, _layers(ones, twos)),
        "jax": _fake_run("jax", case, _layers(ones, ones)),
    }
    section = locate.locate_case(case, runs, BACKENDS, rtol=1e-3)
    assert section["oracle"].startswith("the median float32 output")
    assert [layer["name"] for layer in section["layers"]] == ["l0", "l1"]
    assert section["first_divergence"]["name"] == "l1"
    assert set(section["first_divergence"]["backends"]) == set(BACKENDS)


def test_a_non_finite_layer_cell_is_encoded_as_every_cell_of_the_json():
    """One form for every cell of the report's JSON (docs/consistency.md, "The
    JSON report"): a non-finite number is null, spelled in "non_finite"."""
    case = cases.Case(
        "m", None, [{"input_0": np.zeros(2)}], model_path="m.keras", tasks=TASKS
    )
    ones, off = np.ones((2, 3)), np.full((2, 3), np.inf)
    runs = {
        "tensorflow": _fake_run("tensorflow", case, _layers(ones)),
        "torch": _fake_run("torch", case, _layers(off)),
        "jax": _fake_run("jax", case, _layers(ones)),
    }
    section = locate.locate_case(case, runs, BACKENDS, rtol=1e-3)
    cell = json.loads(json.dumps(section, allow_nan=False))["layers"][0]["cells"]
    assert cell["torch"]["ratio"] is None and cell["torch"]["passed"] is False
    assert cell["torch"]["non_finite"] == {"ratio": "inf", "error": "inf"}
    assert cell["jax"]["judged"] and "non_finite" not in cell["jax"]
    text = locate.format_section(section)
    assert "layer 'l0' (Dense) on torch: not finite its budget" in text
