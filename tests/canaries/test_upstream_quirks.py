"""Canaries: each workaround for a Keras or framework behaviour has a probe of
that behaviour here, which fails when upstream changes it.

Each workaround's comment in src/ names its canary (`canary "<name>"`).
A failing canary is good news: the behaviour it probes is gone (fixed
upstream, or changed), and the message names the workaround to remove or
revisit. Each probe runs only on the backends where the behaviour was found
(docs/keras-quirks.md; keras 3.15.1, tensorflow-cpu 2.21.0, torch 2.13.0,
jax 0.10.2); a probe of Keras's numpy backend or of a process's imports runs
in a subprocess, from the tensorflow lane.
"""

from __future__ import annotations

import importlib.util
import math
import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass

import keras
import numpy as np
import pytest
from keras import ops

BACKEND = keras.backend.backend()
X = np.random.default_rng(0).standard_normal((4, 4))  # float64


def _dtype(tensor) -> str:
    return keras.backend.standardize_dtype(tensor.dtype)


def _in_subprocess(backend: str, code: str) -> str:
    """stdout of `code` in a fresh process under `backend`."""
    env = {**os.environ, "KERAS_BACKEND": backend, "TF_CPP_MIN_LOG_LEVEL": "3"}
    proc = subprocess.run(
        [sys.executable, "-c", code],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout.strip()


# ------------------------------------------------------------------ probes
# Each returns True while the upstream behaviour is still there.


def matmul_float64_in_float32():
    out = ops.matmul(X, X)
    return (
        _dtype(out) != "float64"
        or float(np.max(np.abs(ops.convert_to_numpy(out) - X @ X))) > 1e-12
    )


def tanh_float64_in_float32():
    return _dtype(ops.tanh(X)) != "float64"


def floor_float64_in_float32():
    return _dtype(ops.floor(X)) != "float64"


def cumsum_float64_in_float32():
    return _dtype(ops.cumsum(X)) != "float64"


def maximum_float64_in_float32():
    return _dtype(ops.maximum(X, X)) != "float64"


def sin_cos_float64_in_float32():
    return _dtype(ops.sin(X)) != "float64" or _dtype(ops.cos(X)) != "float64"


def _float64_inexact(got, want):
    return _dtype(got) != "float64" or (
        float(np.max(np.abs(ops.convert_to_numpy(got) - want))) > 1e-12
    )


def mean_float64_in_float32():
    # Returns float64, computed in float32 (measured: 3e-8 off on torch).
    return _float64_inexact(ops.mean(X * 3 + 1, axis=-1), (X * 3 + 1).mean(-1))


def var_float64_in_float32():
    return _float64_inexact(ops.var(X * 3 + 1, axis=-1), (X * 3 + 1).var(-1))


def layer_normalization_float64_in_float32():
    want = (X - X.mean(-1, keepdims=True)) / np.sqrt(X.var(-1, keepdims=True) + 1e-6)
    return _float64_inexact(ops.layer_normalization(X, epsilon=1e-6), want)


def cast_python_float_through_float32():
    return float(ops.convert_to_numpy(ops.cast(0.1, "float64"))) != 0.1


def gelu_float64_inexact():
    got = ops.convert_to_numpy(
        keras.activations.gelu(ops.convert_to_tensor(X), approximate=False)
    )
    want = X * 0.5 * (1 + np.vectorize(math.erf)(X / math.sqrt(2)))
    return float(np.max(np.abs(got - want))) > 1e-12


def predict_rounds_float64_inputs():
    inputs = keras.Input((4,), dtype="float64")
    model = keras.Model(inputs, keras.layers.Dense(2, dtype="float64")(inputs))
    predicted = model.predict(X, verbose=0)
    return float(np.max(np.abs(predicted - ops.convert_to_numpy(model(X))))) > 1e-12


def learning_rate_float32_for_float64_weights():
    optimizer = keras.optimizers.SGD(0.1)
    optimizer.build([keras.Variable(np.zeros(3), dtype="float64")])
    return _dtype(optimizer.learning_rate) != "float64"


def distribution_list_devices_fails():
    try:
        keras.distribution.list_devices()
    except AttributeError:
        return True
    return False


def tf_image_resize_float32():
    import tensorflow as tf

    image = tf.constant(np.ones((1, 3, 3, 1)), dtype=tf.float64)
    return tf.image.resize(image, (5, 5)).dtype != tf.float64


def numpy_backend_einsum_float32():
    code = (
        "import numpy as np, keras; x = np.ones((2, 2)); "
        "print(keras.backend.standardize_dtype("
        "keras.ops.einsum('ij,jk->ik', x, x).dtype))"
    )
    return _in_subprocess("numpy", code) != "float64"


def keras_import_loads_jax():
    # Measured with keras 3.15.1: `import keras` under the numpy backend
    # imports JAX (not TensorFlow, nor torch).
    code = "import sys, keras; print('jax' in sys.modules)"
    return _in_subprocess("numpy", code) == "True"


def litert_export_from_jax_refused(tmp_path):
    inputs = keras.Input((4,))
    model = keras.Model(inputs, keras.layers.Dense(2)(inputs))
    try:
        model.export(str(tmp_path / "m.tflite"), format="litert")
    except Exception:  # noqa: BLE001 -- any refusal is the behaviour
        return True
    return False


def openvino_from_jax_fails_on_xla_call_module(tmp_path):
    # In its own process: OpenVINO forks, which JAX warns about (an error
    # under this suite's warnings-as-errors). Even importing it here did, now
    # and then (the JAX lane failed once on JAX's "os.fork() was called"
    # from this test): look for it without importing it.
    if importlib.util.find_spec("openvino") is None:
        pytest.skip("openvino is not installed")
    code = (
        "import keras\n"
        "inputs = keras.Input((4,))\n"
        "model = keras.Model(inputs, keras.layers.Dense(2)(inputs))\n"
        "try:\n"
        f"    model.export({str(tmp_path / 'm.xml')!r}, format='openvino')\n"
        "    print('exported')\n"
        "except Exception as error:\n"
        "    print('XlaCallModule' in str(error))\n"
    )
    return _in_subprocess("jax", code).splitlines()[-1] == "True"


@dataclass(frozen=True)
class Quirk:
    probe: Callable
    backends: tuple[str, ...]
    workaround: str


QUIRKS = {
    "matmul-float64": Quirk(
        matmul_float64_in_float32,
        ("torch",),
        "the projections and position terms use ops.einsum, not ops.matmul "
        "(layers/mhsa2d.py `_dense`, layers/position/relative.py, "
        "layers/attention/chunked.py)",
    ),
    "tanh-float64": Quirk(
        tanh_float64_in_float32,
        ("jax",),
        "the float64 tanh stand-in in layers/activations.py (`_tanh_expm1`)",
    ),
    "floor-float64": Quirk(
        floor_float64_in_float32,
        ("torch", "jax"),
        "floor as an int cast in layers/position/_grid.py (`resize`)",
    ),
    "cumsum-float64": Quirk(
        cumsum_float64_in_float32,
        ("torch",),
        "the offsets of the dynamic bias-table resize summed in a Python loop "
        "(layers/position/_bias_resize.py `_dynamic_matrix`)",
    ),
    "maximum-float64": Quirk(
        maximum_float64_in_float32,
        ("torch",),
        "ops.where instead of ops.maximum in layers/position/_bias_resize.py "
        "(`_dynamic_matrix`)",
    ),
    "sin-cos-float64": Quirk(
        sin_cos_float64_in_float32,
        ("jax",),
        "the NumPy float64 sinusoidal and rope tables in layers/position/"
        "sinusoidal.py and rope.py, and the float64 sin_cos of "
        "layers/position/_trig.py (rope_mixed, dynamic sizes)",
    ),
    "mean-float64": Quirk(
        mean_float64_in_float32,
        ("torch", "jax"),
        "the norms' means as ops.sum / n in layers/norms.py (`_mean_last`)",
    ),
    "var-float64": Quirk(
        var_float64_in_float32,
        ("torch", "jax"),
        "the LayerNorm's variance as a mean of squares in layers/norms.py",
    ),
    "layer-normalization-float64": Quirk(
        layer_normalization_float64_in_float32,
        ("torch", "jax"),
        "the norms of layers/norms.py written out instead of "
        "ops.layer_normalization / ops.rms_normalization",
    ),
    "cast-python-float": Quirk(
        cast_python_float_through_float32,
        ("tensorflow",),
        "constants made with ops.convert_to_tensor(value, dtype=...) "
        "(layers/attention, layers/activations.py)",
    ),
    "gelu-float64": Quirk(
        gelu_float64_inexact,
        ("tensorflow",),
        "the float64 GELU stand-in in layers/activations.py (`_gelu_erf`)",
    ),
    "predict-float64": Quirk(
        predict_rounds_float64_inputs,
        ("tensorflow", "jax"),
        "the matrix's jit check compiles with each backend's own compiler "
        "instead of model.predict (consistency/worker.py)",
    ),
    "learning-rate-float32": Quirk(
        learning_rate_float32_for_float64_weights,
        ("tensorflow", "torch", "jax"),
        "the optimizer-step check's float32-resolution budget "
        "(consistency/gradients.py, docs/tolerances.md 'Optimizer steps')",
    ),
    "distribution-jax-only": Quirk(
        distribution_list_devices_fails,
        ("torch",),
        "the tf.distribute and DDP recipes instead of keras.distribution "
        "(docs/distribution.md, mhsa_core/distribution.py)",
    ),
    "tf-resize-float32": Quirk(
        tf_image_resize_float32,
        ("tensorflow",),
        "the interpolation-matrix resize of the native TensorFlow reference",
    ),
    "numpy-backend-float32": Quirk(
        numpy_backend_einsum_float32,
        ("tensorflow",),
        "the consistency tool runs Keras's numpy backend in float32 only",
    ),
    "keras-imports-frameworks": Quirk(
        keras_import_loads_jax,
        ("tensorflow",),
        "mhsa_core's lazy (PEP 562) imports, and KERAS_BACKEND=numpy for the "
        "CLI's parent (mhsa_core/__init__.py, Makefile demo)",
    ),
    "litert-from-jax": Quirk(
        litert_export_from_jax_refused,
        ("jax",),
        "the ('litert', 'jax') n/a cell of consistency/features/export.py",
    ),
    "openvino-from-jax": Quirk(
        openvino_from_jax_fails_on_xla_call_module,
        ("jax",),
        "the ('openvino', 'jax') known limit of consistency/features/export.py",
    ),
}

# Probes that write files take pytest's tmp_path.
NEEDS_TMP_PATH = {
    litert_export_from_jax_refused,
    openvino_from_jax_fails_on_xla_call_module,
}


# Probes in a process of their own (seconds each).
IN_SUBPROCESS = {
    "numpy-backend-float32",
    "keras-imports-frameworks",
    "openvino-from-jax",
}


@pytest.mark.parametrize(
    "name",
    [
        pytest.param(name, marks=pytest.mark.slow) if name in IN_SUBPROCESS else name
        for name in sorted(QUIRKS)
    ],
)
def test_quirk_is_still_there(name, tmp_path):
    quirk = QUIRKS[name]
    if BACKEND not in quirk.backends:
        pytest.skip(f"{name} was found on {', '.join(quirk.backends)}")
    args = (tmp_path,) if quirk.probe in NEEDS_TMP_PATH else ()
    assert quirk.probe(*args), (
        f"upstream changed: {name} ({quirk.probe.__name__}) no longer shows on "
        f"{BACKEND}. Remove or revisit the workaround: {quirk.workaround}; and "
        f"update docs/keras-quirks.md"
    )
