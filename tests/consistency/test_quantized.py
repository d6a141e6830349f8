"""Quantized models in the matrix (issue 21).

- which models are quantized (`cases.quantization_of`, from the config alone);
- the int8 step slack (`budgets.quantization_steps`): per input variant, only
  where an int8 activation quantizer runs;
- a planted bug (`quantizer_bug`: torch's int8 activation quantizer truncates
  instead of rounding) is caught by the float64 row, on torch only;
- users' saved models in one matrix run: our layer and a Keras Dense,
  quantized int8 by `model.quantize` (found quantized, judged against its
  float64 twins), and our layer with trained LoRA adapters; every backend
  loads and agrees.
The built-in "int8" and "int4" cases run in test_matrix.py with every check.
"""

import dataclasses
import os
import subprocess
import sys

import numpy as np
import pytest

from mhsa_core.consistency import budgets, cases, matrix, protocol


def _policy(mode):
    class_name = (
        "Int4DTypePolicy" if mode.startswith("int4") else "QuantizedDTypePolicy"
    )
    return {
        "module": "keras.dtype_policies",
        "class_name": class_name,
        "config": {"mode": mode, "source_name": "float32"},
    }


FLOAT = {"module": "keras", "class_name": "DTypePolicy", "config": {"name": "float32"}}


@pytest.mark.parametrize(
    "config, expected",
    [
        ({"layers": [{"config": {"dtype": FLOAT}}]}, None),
        ({"layers": [{"config": {"dtype": _policy("int8")}}]}, "int8"),
        (
            {
                "layers": [
                    {"config": {"dtype": _policy("int4/128")}},
                    {"config": {"dtype": _policy("int8")}},
                    {"config": {"dtype": _policy("int8")}},
                ]
            },
            "int4+int8",
        ),
    ],
    ids=["float", "int8", "int4-and-int8"],
)
def test_quantization_of(config, expected):
    assert cases.quantization_of(config) == expected


@pytest.mark.parametrize(
    "quantization, slack",
    [(None, False), ("int4", False), ("int8", True), ("int4+int8", True)],
    ids=["float", "int4", "int8", "int4-and-int8"],
)
def test_quantization_steps(quantization, slack):
    keys = [protocol.out_key(0), protocol.out_key(1)]
    oracle = {keys[0]: np.array([1.0, -127.0]), keys[1]: np.array([0.5, 2.0])}
    by_key = {keys[0]: 1e-6, keys[1]: 2e-6}
    out = budgets.quantization_steps(by_key, oracle, keys, quantization)
    if not slack:
        assert out == by_key
    else:
        # One step of each variant's own scale: 127 / 127, and 2 / 127.
        assert out[keys[0]] == pytest.approx(1e-6 + 1.0)
        assert out[keys[1]] == pytest.approx(2e-6 + 2.0 / 127)


@pytest.mark.slow
def test_truncating_quantizer_on_torch_is_caught():
    """torch rounds its int8 activations toward zero (`quantizer_bug`): the
    float64 row fails on torch, whose twin runs the same wrong arithmetic,
    and only there; TensorFlow's passes."""
    (case,) = cases._quantized_cases(("int8",))
    case = dataclasses.replace(case, tasks=(protocol.FORWARD, protocol.FORWARD64))
    report = matrix.run_matrix(
        [case], ["tensorflow", "torch"], imports=["quantizer_bug"]
    )
    assert report.worker_errors == {}
    assert report.cell("int8", "forward float64", "tensorflow").passed
    cell = report.cell("int8", "forward float64", "torch")
    assert cell.passed is False and cell.ratio > 1e6, cell


_SAVE_QUANTIZED = """
import sys, keras
from mhsa_core import MultiHeadSelfAttention2D
keras.utils.set_random_seed(0)
inputs = keras.Input((None, None, 16))
x = MultiHeadSelfAttention2D(num_heads=2, output_dense=True)(inputs)
outputs = keras.layers.Dense(8)(x)
model = keras.Model(inputs, outputs)
model.quantize("int8")
model.save(sys.argv[1])
"""


_SAVE_LORA = """
import sys, keras, numpy as np
from mhsa_core import MultiHeadSelfAttention2D
keras.utils.set_random_seed(0)
inputs = keras.Input((None, None, 16))
layer = MultiHeadSelfAttention2D(num_heads=2, output_dense=True)
model = keras.Model(inputs, layer(inputs))
layer.enable_lora(2)
x = np.random.default_rng(0).standard_normal((2, 4, 4, 16)).astype("float32")
model.compile(keras.optimizers.SGD(0.1), "mse")
model.fit(x, 0.5 * x, epochs=2, verbose=0)  # B is no longer zero
model.save(sys.argv[1])
"""


def _save(script, path, backend):
    subprocess.run(
        [sys.executable, "-c", script, str(path)],
        check=True,
        env={**os.environ, "KERAS_BACKEND": backend},
        capture_output=True,
    )


@pytest.fixture(scope="module")
def user_models(tmp_path_factory):
    """One matrix run (a worker per backend) of two users' saved models: our
    layer then a Keras Dense, quantized int8 by `model.quantize` under torch;
    our layer with LoRA adapters trained a little under JAX."""
    directory = tmp_path_factory.mktemp("user_models")
    _save(_SAVE_QUANTIZED, directory / "int8.keras", "torch")
    _save(_SAVE_LORA, directory / "lora.keras", "jax")
    quantized = cases.model_case(directory / "int8.keras", name="int8")
    lora = cases.model_case(directory / "lora.keras", name="lora")
    report = matrix.run_matrix([quantized, lora], list(protocol.BACKENDS))
    return quantized, lora, report


@pytest.mark.slow
@pytest.mark.parametrize("name", ["int8", "lora"])
def test_user_model_agrees_everywhere(user_models, name):
    """Every backend loads each file and agrees with the float64 twins; every
    backend's own save loads on the others."""
    report = user_models[2]
    assert report.worker_errors == {}
    failed = [
        (row.check, b)
        for row in report.rows
        if row.case == name
        for b, cell in row.cells.items()
        if cell.passed is False
    ]
    assert not failed, failed
    assert report.cell(name, "forward float64", "torch").passed


@pytest.mark.slow
def test_quantized_user_model_is_found_and_judged_as_such(user_models):
    quantized, lora, report = user_models
    assert (quantized.quantization, lora.quantization) == ("int8", None)
    # No NumPy oracle of attention scores for a user model either way; the
    # quantized rule shows in the oracle note.
    assert any("quantized (int8)" in n for n in report.notes)


@pytest.mark.slow
def test_lora_user_model_trains_only_the_adapters(user_models):
    grads = user_models[2].runs["torch"].results["lora"][protocol.GRADS]
    # Trainable: the 8 adapters (A and B of q, k, v, output), per variant.
    assert protocol.count_keys(grads, "weight/0/") == 8
