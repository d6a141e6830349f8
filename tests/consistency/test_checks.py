"""The consistency tool's declarations, without running any worker: cases,
checks, the cells they derive, and the oracles' budget rule."""

import numpy as np
import pytest

from mhsa_core import reference
from mhsa_core.consistency import cases, features, matrix, oracles, protocol
from mhsa_core.reference import schema

BACKENDS = list(protocol.BACKENDS)
CASES = cases.extended_cases()
CASES_BY_NAME = {c.name: c for c in CASES}


def test_case_names_are_unique():
    assert len(CASES_BY_NAME) == len(CASES)


@pytest.mark.parametrize(
    "name,config",
    [
        ("yolov4_mhsa", schema.preset("yolov4_mhsa")),
        ("botnet", schema.preset("botnet", num_heads=4, position_size=(6, 6))),
    ],
    ids=["yolov4_mhsa", "botnet"],
)
def test_preset_cases_are_the_presets(name, config):
    assert CASES_BY_NAME[name].config == config


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_every_case_states_its_config(case):
    """No case leans on the layer's defaults (they changed once already)."""
    assert set(cases.EXPLICIT_KEYS) <= set(case.config)
    if schema.encoding(case.config["position_encoding"]).learned_tables:
        assert case.config["position_size"] is not None


def test_the_layer_defaults_have_a_case():
    standard = CASES_BY_NAME["standard"]
    assert standard.config["position_encoding"] == "none"
    assert standard.config["activation"] is None and standard.config["scale"] is None


@pytest.mark.parametrize("missing", cases.EXPLICIT_KEYS)
def test_layer_case_refuses_an_implicit_config(missing):
    config = {k: v for k, v in schema.preset("yolov4_mhsa").items() if k != missing}
    with pytest.raises(ValueError, match=missing):
        cases.layer_case("implicit", config, [(1, 3, 3, 8)], seed=0)


def test_checks_read_known_tasks_and_have_unique_names():
    names = [c.name for c in matrix.all_checks()]
    assert len(set(names)) == len(names)
    for check in matrix.all_checks():
        assert set(check.tasks) <= set(features.known_tasks()), check.name
        assert check.backends in ("case", "training"), check.name


def _model_case():
    return cases.Case(
        "model",
        None,
        [{"input_0": np.zeros((2, 3), "float32")}],
        model_path="unused.keras",
        tasks=protocol.ALL_TASKS,
    )


def test_needed_tasks_follow_the_checks():
    """A model case has no attention scores; with rtol it has no float64
    gradient oracle and so no optimizer steps; a layer case runs every task."""
    layer = CASES_BY_NAME["masked"]
    assert matrix.needed_tasks(layer) == protocol.ALL_TASKS
    model = _model_case()
    assert protocol.SCORES not in matrix.needed_tasks(model)
    assert protocol.OPTIMIZERS not in matrix.needed_tasks(model, rtol=1e-3)


# (case, rtol) -> the checks with cells, in report order.
ROW_TABLE = [
    (
        "masked",
        None,
        [
            "forward",
            "forward float64",
            "attention scores",
            "jit forward",
            "forward repeatable",
            "gradients",
            "gradients float64",
            "SGD step",
            "Adam step",
            ".keras saved by tensorflow",
            ".keras saved by torch",
            ".keras saved by jax",
        ],
    ),
    (
        "float64",
        None,
        [
            "forward",
            "attention scores",
            "jit forward",
            "forward repeatable",
            "gradients",
            "gradients float64",
            "SGD step",
            "Adam step",
            ".keras saved by tensorflow",
            ".keras saved by torch",
            ".keras saved by jax",
        ],
    ),
    (
        "model",
        None,
        [
            "forward",
            "forward float64",
            "jit forward",
            "forward repeatable",
            "gradients",
            "gradients float64",
            "SGD step",
            "Adam step",
            ".keras saved by tensorflow",
            ".keras saved by torch",
            ".keras saved by jax",
        ],
    ),
    (
        "model",
        1e-3,
        [
            "forward",
            "jit forward",
            "forward repeatable",
            "gradients",
            ".keras saved by tensorflow",
            ".keras saved by torch",
            ".keras saved by jax",
        ],
    ),
]


@pytest.mark.parametrize(
    "name,rtol,rows", ROW_TABLE, ids=[f"{n}-rtol={r}" for n, r, _ in ROW_TABLE]
)
def test_expected_rows(name, rtol, rows):
    case = _model_case() if name == "model" else CASES_BY_NAME[name]
    got = list(
        dict.fromkeys(check for check, _ in matrix.expected_cells(case, BACKENDS, rtol))
    )
    assert got == rows


@pytest.mark.parametrize("name", ["masked", "float64"])
def test_expected_backends(name):
    """numpy runs inference only and nothing in float64."""
    case = CASES_BY_NAME[name]
    cells = matrix.expected_cells(case, BACKENDS)
    forward = [b for check, b in cells if check == "forward"]
    gradients = [b for check, b in cells if check == "gradients"]
    assert gradients == list(protocol.TRAINING_BACKENDS)
    assert forward == (
        BACKENDS if case.dtype != "float64" else list(protocol.TRAINING_BACKENDS)
    )
    # A file is never loaded by the backend that saved it.
    assert all(not check.endswith(f"by {b}") for check, b in cells)


@pytest.mark.parametrize("name", ["masked", "float64"])
def test_reference_budgets_are_the_reference_rule(name):
    """The layer cases' budgets are `reference.budget`'s, computed per variant."""
    case = CASES_BY_NAME[name]
    got = oracles.reference_oracles(case)
    config = reference.reference_config(case.config)
    for v, variant in enumerate(case.variants):
        key = protocol.out_key(v)
        ref64, budget, _ = reference.error_budget(
            variant["x"],
            case.weights,
            policy=case.dtype,
            attention_mask=variant.get("attention_mask"),
            **config,
        )
        np.testing.assert_array_equal(got["out"].values[key], ref64)
        assert got["out"].budgets[key] == budget
        assert got["out64"].budgets[key] == reference.float64_budget(ref64)


def test_step_oracle_matches_the_optimizer_formulas():
    """SGD: w - lr g; Adam's first step: w - lr sign(g) (up to epsilon)."""
    w, g = np.array([1.0, -2.0, 0.5]), np.array([0.5, -0.25, 1e-12])
    np.testing.assert_allclose(
        oracles.step_oracle("sgd", w, g), w - protocol.SGD_LR * g
    )
    adam = oracles.step_oracle("adam", w, g)
    # epsilon against sqrt(1 - beta_2) |g| moves the step by < 1e-4 (relative) here.
    np.testing.assert_allclose(
        adam[:2] - w[:2], -protocol.ADAM_LR * np.sign(g[:2]), rtol=1e-4
    )
    assert abs(adam[2] - w[2]) < protocol.ADAM_LR * 1e-4  # |g| << epsilon: ~no step


def test_a_model_xla_cannot_compile_is_a_note_not_a_failure():
    # TensorFlow's jit task returns only a note when XLA has no kernel for an
    # op of the model (bicubic UpSampling2D: ResizeBicubic); the cell is then
    # unjudged with that note, while the other backends are still judged.
    from mhsa_core.consistency.runner import BackendRun

    case = _model_case()
    out = np.ones((2, 3))
    runs = {
        "tensorflow": BackendRun(
            "tensorflow",
            results={
                "model": {
                    protocol.FORWARD: {protocol.out_key(0): out},
                    protocol.FORWARD64: {protocol.out_key(0): out},
                    protocol.JIT: {
                        protocol.NOTE_KEY: np.array(
                            "not judged: XLA cannot compile ResizeBicubic"
                        )
                    },
                }
            },
        ),
        "jax": BackendRun(
            "jax",
            results={
                "model": {
                    protocol.FORWARD: {protocol.out_key(0): out},
                    protocol.FORWARD64: {protocol.out_key(0): out},
                    protocol.JIT: {protocol.out_key(0): out + 1.0},
                }
            },
        ),
    }
    report = matrix.evaluate([case], runs, ["tensorflow", "jax"])
    tf_cell = report.cell("model", "jit forward", "tensorflow")
    assert tf_cell.passed is None and "ResizeBicubic" in tf_cell.note
    assert report.cell("model", "jit forward", "jax").passed is False
