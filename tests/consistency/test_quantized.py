"""Quantized models in the matrix (issue 21).

- which models are quantized (`cases.quantization_of`, from the config alone);
- the int8 step slack (`budgets.quantization_steps`): per input variant, only
  where an int8 activation quantizer runs;
- a planted bug (`quantizer_bug`: torch's int8 activation quantizer truncates
  instead of rounding) is caught by the float64 row, on torch only;
- a user's saved model with our layer and a Keras Dense, quantized int8 by
  `model.quantize`, judged by `mhsa-core matrix --model` on every backend:
  quantized, against its float64 twins, all agree.
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


@pytest.mark.slow
def test_quantized_user_model(tmp_path):
    """A user's model (our layer, then a Keras Dense), quantized int8 by
    `model.quantize` under torch and saved: every backend loads it and agrees
    with its float64 twins (the same integers), the scores check absent."""
    path = tmp_path / "int8.keras"
    env = {"KERAS_BACKEND": "torch"}
    subprocess.run(
        [sys.executable, "-c", _SAVE_QUANTIZED, str(path)],
        check=True,
        env={**os.environ, **env},
        capture_output=True,
    )
    case = cases.model_case(path)
    assert case.quantization == "int8"
    report = matrix.run_matrix([case], list(protocol.BACKENDS))
    assert report.worker_errors == {}
    failed = [
        (row.case, row.check, b)
        for row in report.rows
        for b, cell in row.cells.items()
        if cell.passed is False
    ]
    assert not failed, failed
    assert report.cell("model", "forward float64", "torch").passed


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


@pytest.mark.slow
def test_lora_user_model(tmp_path):
    """A model with LoRA adapters, trained a little under JAX and saved:
    every backend loads it (the adapters as they are) and agrees, every
    backend's own save loads on the others, and its gradients reach the
    adapters only."""
    path = tmp_path / "lora.keras"
    subprocess.run(
        [sys.executable, "-c", _SAVE_LORA, str(path)],
        check=True,
        env={**os.environ, "KERAS_BACKEND": "jax"},
        capture_output=True,
    )
    case = cases.model_case(path)
    assert case.quantization is None
    report = matrix.run_matrix([case], list(protocol.BACKENDS))
    assert report.worker_errors == {}
    failed = [
        (row.case, row.check, b)
        for row in report.rows
        for b, cell in row.cells.items()
        if cell.passed is False
    ]
    assert not failed, failed
    grads = report.runs["torch"].results["model"][protocol.GRADS]
    # Trainable: the 8 adapters (A and B of q, k, v, output), per variant.
    assert protocol.count_keys(grads, "weight/0/") == 8
