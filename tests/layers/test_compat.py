"""`.keras` files saved by mhsa_core 0.1.0 load bit-exact after the 0.2.0 redesign.

tests/data/v0_1_0/ holds files saved by the last 0.1.0 main (every encoding,
BoTNet, channels_first with gelu, float64; `make_fixtures.py` there made
them) and, per backend, the weights and outputs 0.1.0 computed from them.
0.2.0 changed the class defaults (standard attention instead of the Keras 2
YOLOv4-MHSA block); the files carry explicit values, so they keep their
behaviour: the same weights and the same output bits, on each backend.
"""

from pathlib import Path

import keras
import numpy as np
import pytest

from mhsa_core import MultiHeadSelfAttention2D, reference

DATA = Path(__file__).resolve().parents[1] / "data" / "v0_1_0"
BACKEND = keras.backend.backend()
NAMES = sorted(p.stem for p in DATA.glob("*.keras"))
# What each file is: its 0.1.0 config values that 0.2.0 no longer has as defaults.
LEGACY_DEFAULTS = {"activation": "relu", "position_encoding": "conv", "scale": 1.0,
                   "kernel_initializer": "he_normal"}


@pytest.fixture(scope="module")
def expected():
    path = DATA / f"outputs-{BACKEND}.npz"
    if not path.exists():
        pytest.skip(f"0.1.0 computed no outputs under the {BACKEND} backend")
    with np.load(path) as data:
        return {k: data[k] for k in data.files}


def test_fixtures_are_all_there():
    assert NAMES == ["absolute", "botnet", "multihead_channels_first", "none", "relative",
                     "sinusoidal", "yolov4_mhsa_defaults", "yolov4_mhsa_float64"]


@pytest.mark.parametrize("name", NAMES)
def test_loads_bit_exact(name, expected):
    model = keras.saving.load_model(DATA / f"{name}.keras")
    weights = model.get_weights()
    saved = [expected[f"{name}/weight/{j}"] for j in range(len(weights))]
    assert f"{name}/weight/{len(weights)}" not in expected, "a weight was lost"
    for j, (w, e) in enumerate(zip(weights, saved)):
        assert w.dtype == e.dtype and w.shape == e.shape, (j, w.dtype, e.dtype)
        assert np.array_equal(w, e), f"weight {j} differs"
    for i in range(2):  # the tables' reference size, and another size
        x = expected[f"{name}/x/{i}"]
        out = np.asarray(keras.ops.convert_to_numpy(model(x)))
        want = expected[f"{name}/out/{i}"]
        assert out.dtype == want.dtype and out.shape == want.shape
        assert np.array_equal(out, want), (
            f"output {i} differs from 0.1.0 by {reference.max_abs(out, want):.3g}")


def test_old_default_config_keeps_the_legacy_block():
    """A file saved with 0.1.0's defaults is the YOLOv4-MHSA block, not 0.2.0's default."""
    model = keras.saving.load_model(DATA / "yolov4_mhsa_defaults.keras")
    layer = next(l for l in model.layers if isinstance(l, MultiHeadSelfAttention2D))
    config = layer.get_config()
    for key, value in LEGACY_DEFAULTS.items():
        assert config[key] == value or (key == "kernel_initializer"
                                        and config[key]["class_name"] == "HeNormal"), key
    fresh = MultiHeadSelfAttention2D().get_config()
    assert fresh["position_encoding"] == "none" and fresh["activation"] == "linear"
    assert fresh["scale"] is None
