"""`.keras` files saved by mhsa_core 0.1.0 still load, with their meaning.

tests/data/v0_1_0/ holds files saved by the last 0.1.0 main (every encoding,
BoTNet, channels_first with gelu, float64; `make_fixtures.py` there made
them) and, per backend, the weights and outputs 0.1.0 computed from them on
the machine that made them. 0.2.0 changed the class defaults (standard
attention instead of the Keras 2 YOLOv4-MHSA block); the files carry explicit
values, so they keep their behaviour.

What is judged how, and why (docs/tolerances.md, "What is bit-exact across
machines"):

- **Weights: bit-exact.** Loading copies stored numbers; no arithmetic.
- **The load path: bit-exact, on this machine.** The loaded model's output is
  bit-identical to a fresh layer built by the current code from the file's
  stored layer config, given the stored weights, in this process: the same
  computation on the same machine, so any difference is the loader's.
- **The 0.1.0 outputs: within the budget.** They were computed in floating
  point on another CPU. BLAS, oneDNN, XLA and NumPy pick their kernels, and
  with them the summation order, by the machine's instruction set and cache
  sizes, so those bits are not reproducible elsewhere (a 2-core AMD EPYC
  differed by up to 2.5e-6 on TensorFlow). Both the output computed here and
  the stored one must be within the forward check's budget of the float64
  reference (`reference.error_budget`: 2x the reference's own float32 error
  with sequential accumulation, + 1e-6 x max|oracle|; float64 files:
  1e-10 x max|oracle|). If both are, they compute the same function to the
  precision float32 allows; a changed meaning (another default, a lost
  weight, a swapped axis) is orders of magnitude outside.

`make test` also runs these tests with the kernels forced onto other code
paths (tests/kernels.py: "another machine" on this one).
"""

import json
import zipfile
from pathlib import Path

import keras
import numpy as np
import pytest

from mhsa_core import MultiHeadSelfAttention2D, reference

DATA = Path(__file__).resolve().parents[1] / "data" / "v0_1_0"
BACKEND = keras.backend.backend()
NAMES = sorted(p.stem for p in DATA.glob("*.keras"))
SIZES = (0, 1)  # the tables' reference size, and another size
# What each file is: its 0.1.0 config values that 0.2.0 no longer has as defaults.
LEGACY_DEFAULTS = {
    "activation": "relu",
    "position_encoding": "conv",
    "scale": 1.0,
    "kernel_initializer": "he_normal",
}

pytestmark = pytest.mark.machine_sensitive


@pytest.fixture(scope="module")
def expected():
    path = DATA / f"outputs-{BACKEND}.npz"
    if not path.exists():
        pytest.skip(f"0.1.0 computed no outputs under the {BACKEND} backend")
    with np.load(path) as data:
        return {k: data[k] for k in data.files}


@pytest.fixture(scope="module")
def loaded():
    """name -> (the loaded model, its MultiHeadSelfAttention2D)."""
    models = {}
    for name in NAMES:
        model = keras.saving.load_model(DATA / f"{name}.keras")
        layer = next(
            candidate
            for candidate in model.layers
            if isinstance(candidate, MultiHeadSelfAttention2D)
        )
        models[name] = model, layer
    return models


def _stored_layer_config(name):
    """The layer's config as the file stores it (not as the loaded layer reports it)."""
    with zipfile.ZipFile(DATA / f"{name}.keras") as archive:
        model_config = json.loads(archive.read("config.json"))
    (layer,) = [
        entry
        for entry in model_config["config"]["layers"]
        if entry["class_name"] == "MultiHeadSelfAttention2D"
    ]
    return layer["config"]


def _stored_weights(name, expected):
    weights, j = [], 0
    while f"{name}/weight/{j}" in expected:
        weights.append(expected[f"{name}/weight/{j}"])
        j += 1
    return weights


def _numpy(t):
    return np.asarray(keras.ops.convert_to_numpy(t))


def test_fixtures_are_all_there():
    assert NAMES == [
        "absolute",
        "botnet",
        "multihead_channels_first",
        "none",
        "relative",
        "sinusoidal",
        "yolov4_mhsa_defaults",
        "yolov4_mhsa_float64",
    ]


@pytest.mark.parametrize("name", NAMES)
def test_weights_load_bit_exact(name, expected, loaded):
    """Weights are stored numbers: the same bits on every machine and backend."""
    model, _ = loaded[name]
    weights = model.get_weights()
    saved = _stored_weights(name, expected)
    assert len(weights) == len(saved), "a weight was lost or added"
    for j, (w, e) in enumerate(zip(weights, saved)):
        assert w.dtype == e.dtype and w.shape == e.shape, (j, w.dtype, e.dtype)
        assert np.array_equal(w, e), f"weight {j} differs"


@pytest.mark.parametrize("name", NAMES)
def test_loaded_model_is_the_current_layer_bit_exact(name, expected, loaded):
    """Same code, same machine, same process: the loader adds nothing.

    A fresh layer from the file's stored config (through `from_config`, as
    the current code reads it), given the stored weights, computes exactly
    the loaded model's output bits.
    """
    model, _ = loaded[name]
    fresh = MultiHeadSelfAttention2D.from_config(_stored_layer_config(name))
    for i in SIZES:
        x = expected[f"{name}/x/{i}"]
        if not fresh.built:
            fresh.build(x.shape)
            fresh.set_weights(_stored_weights(name, expected))
        out, want = _numpy(model(x)), _numpy(fresh(x))
        assert out.dtype == want.dtype and out.shape == want.shape
        assert np.array_equal(out, want), (
            f"input {i}: the loaded model differs from a fresh layer by "
            f"{reference.max_abs(out, want):.3g}"
        )


@pytest.mark.parametrize("i", SIZES, ids=["reference-size", "other-size"])
@pytest.mark.parametrize("name", NAMES)
def test_matches_0_1_0_within_the_budget(name, i, expected, loaded):
    """The output computed here and the one 0.1.0 computed (on another
    machine) are both within the forward budget of the float64 reference."""
    model, layer = loaded[name]
    x = expected[f"{name}/x/{i}"]
    stored = expected[f"{name}/out/{i}"]
    out = _numpy(model(x))
    assert out.dtype == stored.dtype and out.shape == stored.shape
    config = reference.reference_config(layer.get_config())
    policy = "float64" if stored.dtype == np.float64 else "float32"
    ref64, budget, base_error = reference.error_budget(
        x.astype(np.float64), layer.get_weight_dict(), policy=policy, **config
    )
    rule = (
        "1e-10 x max|ref|"
        if policy == "float64"
        else f"2 x the reference's float32 error {base_error:.3g} + 1e-6 x max|ref|"
    )
    for what, result in (
        ("this machine's output", out),
        ("0.1.0's stored output", stored),
    ):
        error = reference.max_abs(result, ref64)
        assert error <= budget, (
            f"{what}: error {error:.3g} exceeds the budget {budget:.3g} ({rule}); "
            f"this machine differs from 0.1.0 by {reference.max_abs(out, stored):.3g}"
        )


@pytest.mark.parametrize("change", ["key-kernel-x1.001", "scale-default"])
@pytest.mark.parametrize("name", NAMES)
def test_the_budget_sees_a_changed_meaning(name, change, expected, loaded):
    """The rule above has teeth: the stored output is outside the budget of a
    reference whose meaning moved slightly (one kernel 0.1% larger, or the
    0.2.0 default scale 1/sqrt(key_dim) instead of the stored one)."""
    _, layer = loaded[name]
    x, stored = expected[f"{name}/x/0"], expected[f"{name}/out/0"]
    config = reference.reference_config(layer.get_config())
    weights = layer.get_weight_dict()
    if change == "scale-default":
        if config["scale"] is None:
            config["scale"] = 1.0  # the file uses the default: move away from it
        else:
            config["scale"] = None
    else:
        weights["key_kernel"] = weights["key_kernel"] * 1.001
    policy = "float64" if stored.dtype == np.float64 else "float32"
    ref64, budget, _ = reference.error_budget(
        x.astype(np.float64), weights, policy=policy, **config
    )
    assert reference.max_abs(stored, ref64) > budget


def test_old_default_config_keeps_the_legacy_block(loaded):
    """A file saved with 0.1.0's defaults is the YOLOv4-MHSA block, not 0.2.0's
    default."""
    _, layer = loaded["yolov4_mhsa_defaults"]
    config = layer.get_config()
    for key, value in LEGACY_DEFAULTS.items():
        assert config[key] == value or (
            key == "kernel_initializer" and config[key]["class_name"] == "HeNormal"
        ), key
    fresh = MultiHeadSelfAttention2D().get_config()
    assert fresh["position_encoding"] == "none" and fresh["activation"] == "linear"
    assert fresh["scale"] is None


# The options added after 0.1.0 (timm's attention, issue 19) and the value
# that leaves the computation as it was.
LATER_OPTIONS = {
    "use_key_bias": None,
    "qk_norm": None,
    "output_norm": None,
    "output_dense": False,
}


@pytest.mark.parametrize("name", NAMES)
def test_later_options_are_off_in_old_files(name, loaded):
    """A 0.1.0 file has none of the later options in its config: the loaded
    layer has them off, and exactly the weights the file stores, by name."""
    assert not set(LATER_OPTIONS) & set(_stored_layer_config(name))
    _, layer = loaded[name]
    config = layer.get_config()
    for key, value in LATER_OPTIONS.items():
        assert config[key] == value, key
    for weight in layer.weights:
        assert "_norm_" not in weight.name and not weight.name.startswith("output_")
    assert layer.key_bias is not None or not layer.use_bias
