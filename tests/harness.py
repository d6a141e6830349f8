"""Test helpers of our own (keras.src.testing is not public API)."""

import re

import keras
import numpy as np
from keras import ops

from mhsa_core import MultiHeadSelfAttention2D, reference
from mhsa_core.reference import reference_config as reference_config
from mhsa_core.reference import schema
from mhsa_core.reference.arguments import pair
from mhsa_core.reference.schema import ENCODINGS

LEARNED_ENCODINGS = tuple(name for name, e in ENCODINGS.items() if e.learned_tables)


def channels_of(shape, data_format):
    return shape[1] if data_format == "channels_first" else shape[-1]


def spatial_of(shape, data_format):
    return tuple(shape[2:4]) if data_format == "channels_first" else tuple(shape[1:3])


def make_case(config, shape, *, seed=0, dtype="float32", x_scale=1.0):
    """A built layer with NumPy weights injected, its input, and the weights.

    Weights are drawn in NumPy and injected: the same Keras seed gives
    different initial values on each backend. A learned position encoding
    without `position_size` in `config` gets the window (with `window_size`,
    as the layer's default) or the input's spatial size.
    """
    config = dict(config)
    data_format = config.get("data_format", "channels_last")
    channels = channels_of(shape, data_format)
    if config.get("position_encoding") in LEARNED_ENCODINGS:
        window = config.get("window_size")
        config.setdefault(
            "position_size",
            spatial_of(shape, data_format) if window is None else pair(window),
        )
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal(shape) * x_scale).astype(dtype)
    weights = reference.random_weights(
        channels,
        **schema.weight_arguments(config),
        seed=seed + 1,
        dtype=np.float64,
    )
    layer = MultiHeadSelfAttention2D(**config, dtype=dtype)
    layer.build(shape)
    layer.set_weight_dict(weights)
    return layer, x, weights


def magnitude(a):
    """max |a| in float64 (0 for an empty array)."""
    a = np.asarray(a, np.float64)
    return float(np.max(np.abs(a))) if a.size else 0.0


def padded_mask(batch, height, width):
    """bool (B, H, W): item 0 fully masked (no query has a key: zeros, never
    NaN), item 1 padded at the right border and the bottom row, the rest all
    True."""
    mask = np.ones((batch, height, width), dtype=bool)
    mask[0] = False
    if batch > 1:
        mask[1, :, -2:] = False  # padded right border
        mask[1, -1, :] = False  # padded bottom row
    return mask


def random_mask(batch, height, width, *, seed=10, fully_masked_item=False):
    """bool (B, H, W), ~60% True, position (0, 0) always True; with
    `fully_masked_item` item 0 entirely False."""
    mask = np.random.default_rng(seed).random((batch, height, width)) < 0.6
    mask[:, 0, 0] = True
    if fully_masked_item:
        mask[0] = False
    return mask


def random_input(shape, dtype="float32", seed=0):
    """Standard normal NumPy input."""
    return np.random.default_rng(seed).standard_normal(shape).astype(dtype)


def to_numpy(t):
    return np.asarray(ops.convert_to_numpy(t))


def built_layer(channels=8, **config):
    """MultiHeadSelfAttention2D(**config) built for (None, 5, 5, channels)."""
    layer = MultiHeadSelfAttention2D(**config)
    layer.build((None, 5, 5, channels))
    return layer


def yolov4_mhsa_arrays(channels=16, seed=0, squeeze=False):
    """Eight random arrays of a Keras 2 YOLOv4-MHSA block: (kernel, bias) of
    the position, query, key and value convs; kernels (1, 1, C, C), or (C, C)
    with `squeeze`."""
    rng = np.random.default_rng(seed)
    arrays = []
    for _ in range(4):
        kernel = rng.standard_normal((1, 1, channels, channels)).astype("float32")
        arrays += [
            kernel[0, 0] if squeeze else kernel,
            rng.standard_normal(channels).astype("float32"),
        ]
    return arrays


def match_all(*parts):
    """A regex that matches when every literal part occurs, in any order.

    Error tests match the argument name AND the received value, so a backend
    traceback (a shape error deep in an einsum) never passes for a good message.
    """
    return "(?s)" + "".join(f"(?=.*{re.escape(str(p))})" for p in parts)


def snapshot(layer):
    """Copies of every weight of `layer` (to prove a failed load changed nothing)."""
    return [to_numpy(w).copy() for w in layer.weights]


def assert_unchanged(layer, before):
    after = snapshot(layer)
    assert len(after) == len(before)
    for variable, b, a in zip(layer.weights, before, after):
        assert np.array_equal(b, a), f"{variable.name} was changed by a failed load"


def assert_float32_within_budget(
    actual, x, weights, config, attention_mask=None, what="output"
):
    """float32 result vs the float64 reference, within the float32 budget.

    Budget: 2x the error of the reference itself run in float32 (sequential
    accumulation) on the same data, plus 1e-6 * max|ref|. Both numbers are in
    the failure message.
    """
    ref64, budget, ref32_error = reference.error_budget(
        x, weights, attention_mask=attention_mask, **reference_config(config)
    )
    actual = np.asarray(actual, dtype=np.float64)
    assert actual.shape == ref64.shape, (actual.shape, ref64.shape)
    assert np.all(np.isfinite(actual)), f"{what}: non-finite values"
    error = reference.max_abs(actual, ref64)
    assert error <= budget, (
        f"{what}: float32 error {error:.3g} exceeds budget {budget:.3g} "
        f"(reference float32 error {ref32_error:.3g}, ratio "
        f"{error / max(ref32_error, 1e-300):.2f}, max|ref| {np.max(np.abs(ref64)):.3g})"
    )
    return error, ref32_error


def assert_float64_close(actual, expected, rtol=1e-10, what="output"):
    """Relative to the largest magnitude: max|a - e| <= rtol * max|e|."""
    actual = np.asarray(actual)
    assert actual.dtype == np.float64, f"{what}: dtype {actual.dtype}, expected float64"
    scale = max(magnitude(expected), 1e-300)
    error = reference.max_abs(actual, expected)
    assert error <= rtol * scale, (
        f"{what}: float64 relative error {error / scale:.3g} > {rtol:g}"
    )


def run_layer_test(
    init_kwargs,
    input_shape,
    *,
    expected_num_trainable_weights,
    expected_num_non_trainable_weights=0,
    expected_num_losses=0,
    run_training=True,
):
    """A Keras-style conformance check of MultiHeadSelfAttention2D.

    Config round trip, eager and symbolic calls with the right shapes and
    dtypes, weight counts, compute_output_shape, and one `fit` step that changes
    every trainable weight.
    """
    layer = MultiHeadSelfAttention2D(**init_kwargs)
    config = layer.get_config()
    clone = MultiHeadSelfAttention2D.from_config(config)
    assert clone.get_config() == config, "config round trip is not exact"
    # Serialization through the registered name, as .keras files do it.
    serialized = keras.saving.serialize_keras_object(layer)
    assert serialized["registered_name"] == "mhsa_core>MultiHeadSelfAttention2D"
    revived = keras.saving.deserialize_keras_object(serialized)
    assert revived.get_config() == config

    # Symbolic call, with unknown batch.
    symbolic_in = keras.Input(input_shape[1:], batch_size=None)
    symbolic_out = layer(symbolic_in)
    assert tuple(symbolic_out.shape) == (None,) + tuple(input_shape[1:])
    assert tuple(layer.compute_output_shape(input_shape)) == tuple(input_shape)
    assert len(layer.trainable_weights) == expected_num_trainable_weights
    assert len(layer.non_trainable_weights) == expected_num_non_trainable_weights

    # Eager call on a fresh instance.
    eager = MultiHeadSelfAttention2D(**init_kwargs)
    x = np.random.default_rng(0).standard_normal(input_shape).astype("float32")
    y = eager(x)
    assert tuple(y.shape) == tuple(input_shape)
    assert keras.backend.standardize_dtype(y.dtype) == eager.compute_dtype
    assert len(eager.losses) == expected_num_losses

    if run_training:
        model = keras.Sequential([keras.Input(input_shape[1:]), eager])
        model.compile(optimizer=keras.optimizers.SGD(0.01), loss="mse")
        before = [to_numpy(w).copy() for w in eager.trainable_weights]
        target = np.random.default_rng(1).standard_normal(input_shape).astype("float32")
        history = model.fit(x, target, batch_size=input_shape[0], epochs=1, verbose=0)
        assert np.isfinite(history.history["loss"][0])
        after = [to_numpy(w) for w in eager.trainable_weights]
        for w, b, a in zip(eager.trainable_weights, before, after):
            assert not np.array_equal(b, a), f"{w.name} did not change in fit"
    return layer
