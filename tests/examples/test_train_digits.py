"""examples/train_digits.py's pieces on a tiny subset, under this lane's backend:
64 digits, one epoch (seconds). The full example (three backends, the matrix)
is `make example`; its figures are in docs/example.md."""

import importlib.util
from pathlib import Path

import numpy as np
import pytest

# Trains a model (seconds per test on every backend).
pytestmark = pytest.mark.slow

pytest.importorskip(
    "sklearn",
    reason="the example's data: pip install scikit-learn "
    "(backends/requirements-example.txt)",
)

SCRIPT = Path(__file__).resolve().parents[2] / "examples" / "train_digits.py"


@pytest.fixture(scope="module")
def example():
    spec = importlib.util.spec_from_file_location("train_digits", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def trained(example, tmp_path_factory):
    import keras

    keras.utils.set_random_seed(0)
    data = example.load_data(samples=64)
    model = example.build_model("botnet")
    history = example.train(model, data, epochs=1, verbose=0)
    path = tmp_path_factory.mktemp("digits") / "model.keras"
    model.save(path)
    return data, model, history, path


def test_resize_golden(example):
    # 2 -> 4 pixels, half-pixel centres: s = (t + 0.5) / 2 - 0.5 = -0.25,
    # 0.25, 0.75, 1.25, clamped to [0, 1].
    image = np.array([[[0.0, 1.0], [0.0, 1.0]]])
    np.testing.assert_allclose(example.resize(image, 4)[0, 0], [0.0, 0.25, 0.75, 1.0])


def test_data_split(example):
    data = example.load_data(samples=64)
    assert data["x_train"].shape == (51, 16, 16, 1) and data["y_train"].shape == (51,)
    assert data["x_test_16"].shape == (13, 16, 16, 1)
    assert data["x_test_24"].shape == (13, 24, 24, 1)
    assert data["x_train"].dtype == np.float32
    assert 0.0 <= data["x_train"].min() and data["x_train"].max() <= 1.0


def test_train_one_epoch(trained):
    _, _, history, _ = trained
    assert len(history.history["loss"]) == 1
    assert np.isfinite(history.history["loss"][0])


def test_reload_predicts_the_same_at_both_sizes(example, trained):
    import keras

    from mhsa_core.testing import assert_within_budget

    data, model, _, path = trained
    after = example.predict(keras.saving.load_model(path, compile=False), data)
    for size in (16, 24):
        x = data[f"x_test_{size}"]
        assert after[f"probs_{size}"].shape == (13, 10)
        # The reloaded model's output, judged against the trained model's
        # float64 twin with the matrix's budget (not a hand-picked atol).
        assert_within_budget(after[f"probs_{size}"], model, x)


def test_attention_maps_of_the_model(example, trained):
    from mhsa_core.attention_maps import attention_maps

    data, model, _, _ = trained
    scores = example.attention_scores(model, data["x_test_24"][:1])
    assert scores.shape == (1, example.NUM_HEADS, 144, 144)  # the 12x12 map
    maps = attention_maps(scores, 12, 12, queries=list(example.MAP_QUERIES))
    assert maps.shape == (1, example.NUM_HEADS, 3, 12, 12)
