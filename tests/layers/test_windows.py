"""Swin's window attention (`window_size`, `shift_size`) against the float64
NumPy reference, on the current backend: maps divisible by the window, padded,
smaller than the window along one axis (one window, no shift there) and 1x1,
float32 and float64, every attention path, masks inside windows and scores,
padded keys of zero weight, mixed precision, sizes unknown until run time
(compiled models, TensorFlow graphs), .keras files, and the arguments.
(The three paths' gradients: tests/layers/test_paths.py; against the
natives: tests/layers/test_gradients.py; against timm: test_swin_timm.py.)"""

import keras
import numpy as np
import pytest
from keras import ops

from mhsa_core import MultiHeadSelfAttention2D, reference

from cases import WINDOW_CONFIGS, WINDOW_SIZES
from harness import (
    assert_float32_within_budget,
    assert_float64_close,
    make_case,
    match_all,
    random_input,
    random_mask,
    reference_config,
    to_numpy,
)

BACKEND = keras.backend.backend()
CHANNELS = 16


def _shape(size, config, batch=2):
    if config.get("data_format") == "channels_first":
        return (batch, CHANNELS) + tuple(size)
    return (batch,) + tuple(size) + (CHANNELS,)


def _layer(name, dtype="float32", **overrides):
    """A window case's layer (built for any size) and its NumPy weights."""
    config = {**WINDOW_CONFIGS[name], **overrides}
    layer, _, weights = make_case(config, _shape((6, 6), config), dtype=dtype)
    return layer, weights, config


def _size_id(size):
    return f"{size[0]}x{size[1]}"


@pytest.mark.parametrize("size", WINDOW_SIZES, ids=_size_id)
@pytest.mark.parametrize("name", sorted(WINDOW_CONFIGS))
def test_float32_at_every_size(name, size):
    layer, weights, config = _layer(name)
    x = random_input(_shape(size, config), seed=sum(size))
    assert_float32_within_budget(
        to_numpy(layer(x)), x, weights, config, what=f"{name} at {size}"
    )


@pytest.mark.parametrize("size", WINDOW_SIZES, ids=_size_id)
@pytest.mark.parametrize("name", sorted(WINDOW_CONFIGS))
def test_float64_at_every_size(name, size):
    layer, weights, config = _layer(name, dtype="float64")
    x = random_input(_shape(size, config), "float64", seed=sum(size))
    expected = reference.mhsa_forward(x, weights, **reference_config(config))
    assert_float64_close(to_numpy(layer(x)), expected, what=f"{name} at {size}")


# Every attention path on a padded, shifted map with a mask (item 0: every
# key masked), float64 (fused runs chunked there) and float32; chunks of 4
# leave a ragged last chunk of the 9 tokens of a 3x3 window.
PATH_CONFIGS = ["swin-window3-shift1", "none-window4-shift2"]


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("path", ["full", "chunked", "fused"])
@pytest.mark.parametrize("name", PATH_CONFIGS)
def test_paths_with_a_mask_inside_windows(name, path, dtype):
    layer, weights, config = _layer(
        name, dtype=dtype, attention_implementation=path, chunk_size=4
    )
    x = random_input(_shape((7, 8), config), dtype, seed=3)
    mask = random_mask(2, 7, 8, fully_masked_item=True)
    out = to_numpy(layer(x, attention_mask=mask))
    assert np.all(out[0] == 0), "an item with every key masked gives zeros"
    if dtype == "float64":
        expected = reference.mhsa_forward(
            x, weights, attention_mask=mask, **reference_config(config)
        )
        assert_float64_close(out, expected, what=f"{path}")
    else:
        assert_float32_within_budget(out, x, weights, config, attention_mask=mask)


def test_a_window_whose_keys_are_all_masked_gives_zeros():
    """Only that window's queries: the other windows of the item attend."""
    layer, weights, config = _layer("swin-window3-shift1", dtype="float64")
    x = random_input(_shape((6, 6), config), "float64")
    mask = np.ones((2, 6, 6), dtype=bool)
    # With the shift (1, 1), the first window of the shifted map holds map
    # rows and columns 1..3.
    mask[1, 1:4, 1:4] = False
    out = to_numpy(layer(x, attention_mask=mask))
    assert np.all(out[1, 1:4, 1:4] == 0)
    assert np.all(np.abs(out[1, 4:, 4:]) > 0)
    expected = reference.mhsa_forward(
        x, weights, attention_mask=mask, **reference_config(config)
    )
    assert_float64_close(out, expected)


@pytest.mark.parametrize("size", [(7, 5), (2, 8)], ids=_size_id)
def test_scores_are_the_maps_and_padded_keys_get_zero_weight(size):
    """Scores (B, heads, N, N) over the map's tokens: each row sums to 1 over
    its window's real tokens (the padding has no column: it gets nothing),
    zero outside the window, the reference's."""
    layer, weights, config = _layer("swin-window3-shift1", dtype="float64")
    x = random_input(_shape(size, config), "float64", seed=5)
    out, scores = layer(x, return_attention_scores=True)
    expected, expected_scores = reference.mhsa_forward(
        x, weights, return_attention_scores=True, **reference_config(config)
    )
    scores = to_numpy(scores)
    assert scores.shape == (2, 2, size[0] * size[1], size[0] * size[1])
    assert_float64_close(to_numpy(out), expected, what="output")
    assert_float64_close(scores, expected_scores, what="scores")
    np.testing.assert_allclose(scores.sum(-1), 1.0, rtol=1e-12)
    # A query sees at most its window's 9 tokens.
    assert np.all((scores > 0).sum(-1) <= 9)


def test_padding_is_masked_unlike_timm():
    """A 2x2 map in one 3x3 window: the five padding slots are no keys, so the
    result is global attention over the map with the table's entries at the
    true offsets (its center 3x3 of 5x5). timm would let the padding (zero
    tokens, whose k and v are the projection biases) take weight."""
    layer, weights, config = _layer("swin-window3-shift1", dtype="float64")
    x = random_input(_shape((2, 2), config), "float64", seed=6)
    center = {**weights}
    center["relative_bias_table"] = weights["relative_bias_table"][1:4, 1:4]
    plain = {k: v for k, v in config.items() if k not in ("window_size", "shift_size")}
    expected = reference.mhsa_forward(x, center, **reference_config(plain))
    assert_float64_close(to_numpy(layer(x)), expected)


def test_shift_regions_are_separate():
    """The shifted windows differ from the unshifted ones (the shift is not
    ignored), and a wrapped token's window shares no weight with the map's
    opposite edge beyond exp(-100)."""
    layer, _, config = _layer("none-window4-shift2", dtype="float64")
    unshifted, _, _ = _layer("none-window4-shift2", dtype="float64", shift_size=0)
    unshifted.set_weight_dict(layer.get_weight_dict())
    x = random_input(_shape((8, 8), config), "float64", seed=7)
    assert np.abs(to_numpy(layer(x)) - to_numpy(unshifted(x))).max() > 1e-3
    _, scores = layer(x, return_attention_scores=True)
    scores = to_numpy(scores)
    # Token (7, 7) and token (0, 0) share the shifted map's last window.
    assert 0 < scores[0, 0, 63, 0] < 1e-30


@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"])
def test_mixed_precision(policy):
    """The table, the bias and the shift mask in float32 with the logits; the
    output within 2x the error of the reference with the same roundings."""
    _, weights, config = _layer("swin-window3-shift1")
    mixed = MultiHeadSelfAttention2D(**config, dtype=policy)
    mixed.build((None, None, None, CHANNELS))
    mixed.set_weight_dict(weights)
    table = mixed.trainable_weights[-1]
    assert keras.backend.standardize_dtype(table.dtype) == "float32"
    x = random_input(_shape((7, 8), config))
    out = mixed(x)
    assert keras.backend.standardize_dtype(out.dtype) == policy.split("_")[1]
    out = to_numpy(ops.cast(out, "float32")).astype(np.float64)
    ref64, budget, emulated = reference.error_budget(
        x, weights, policy=policy, **reference_config(config)
    )
    error = reference.max_abs(out, ref64)
    assert error <= budget, (
        f"{policy}: error {error:.3g} > budget {budget:.3g} (emulated {emulated:.3g})"
    )


# -------------------------------------------------- jit and dynamic sizes
@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:The .grad attribute of a Tensor that is not a leaf")
def test_compiled_model_at_two_sizes():
    """jit_compile=True: a divisible and a padded size through one compiled
    model, and a compiled training step that moves the table."""
    layer, weights, config = _layer("swin-window3-shift1")
    inputs = keras.Input((None, None, CHANNELS))
    model = keras.Model(inputs, layer(inputs))
    model.compile(jit_compile=True, optimizer="sgd", loss="mse")
    for size in ((6, 6), (7, 5)):
        x = random_input(_shape(size, config), seed=size[1])
        assert_float32_within_budget(
            model.predict(x, verbose=0), x, weights, config, what=f"jit {size}"
        )
    before = to_numpy(layer.trainable_weights[-1]).copy()
    assert np.isfinite(model.train_on_batch(x, np.zeros_like(x)))
    assert not np.array_equal(before, to_numpy(layer.trainable_weights[-1]))


@pytest.mark.slow
@pytest.mark.skipif(BACKEND != "tensorflow", reason="TensorFlow graphs only")
@pytest.mark.parametrize("jit_compile", [False, True])
def test_tensorflow_graph_with_unknown_size(jit_compile):
    """One tf.function traced once with H and W unknown: the padding, the
    shift (dropped where the map fits one window) and the regions are
    computed from the sizes in the graph."""
    import tensorflow as tf

    layer, weights, config = _layer("swin-window3-shift1")
    spec = tf.TensorSpec([None, None, None, CHANNELS], tf.float32)
    fn = tf.function(
        lambda x: layer(x), input_signature=[spec], jit_compile=jit_compile
    )
    for size in ((6, 6), (7, 5), (2, 8)):
        x = random_input(_shape(size, config), seed=size[0])
        assert_float32_within_budget(
            fn(x).numpy(), x, weights, config, what=f"graph {size}"
        )
    assert fn.experimental_get_tracing_count() == 1


@pytest.mark.parametrize(
    "name", ["swin-window3-table4x2-scaled-channels_first", "relative-window3-shift1"]
)
def test_keras_round_trip(tmp_path, name):
    """Saved, loaded (safe mode), run at a padded size: the config (window,
    shift) and weights come back, and the outputs equal the original's."""
    layer, weights, config = _layer(name)
    inputs = keras.Input(_shape((None, None), config)[1:])
    model = keras.Model(inputs, layer(inputs))
    path = tmp_path / "swin.keras"
    model.save(path)
    loaded = keras.saving.load_model(path)
    restored = loaded.layers[-1].get_config()
    assert tuple(restored["window_size"]) == layer.window_size
    assert tuple(restored["shift_size"]) == layer.shift_size
    for a, b in zip(model.weights, loaded.weights):
        assert a.name == b.name
        np.testing.assert_array_equal(to_numpy(a), to_numpy(b))
    x = random_input(_shape((7, 5), config))
    np.testing.assert_array_equal(to_numpy(model(x)), to_numpy(loaded(x)))
    assert_float32_within_budget(to_numpy(loaded(x)), x, weights, config)


# ------------------------------------------------------------ arguments
def test_config_round_trip_and_defaults():
    layer = MultiHeadSelfAttention2D(
        num_heads=2, position_encoding="relative_bias", window_size=[7, 5], shift_size=3
    )
    config = layer.get_config()
    assert config["window_size"] == (7, 5) and config["shift_size"] == (3, 3)
    assert MultiHeadSelfAttention2D.from_config(config).get_config() == config
    plain = MultiHeadSelfAttention2D().get_config()
    assert plain["window_size"] is None and plain["shift_size"] == (0, 0)


@pytest.mark.parametrize(
    "kwargs, parts",
    [
        ({"window_size": 0}, ["`window_size`", "Received: window_size=0"]),
        ({"window_size": (7, 0)}, ["`window_size`", "Received: window_size=(7, 0)"]),
        ({"window_size": 7.5}, ["`window_size`", "Received: window_size=7.5"]),
        ({"shift_size": -1}, ["`shift_size`", "Received: shift_size=-1"]),
        ({"shift_size": 3}, ["`shift_size`", "window_size=None", "shift_size=3"]),
        (
            {"window_size": 7, "shift_size": 7},
            ["`shift_size`", "window_size=7", "Received: shift_size=7"],
        ),
        (
            {"window_size": (4, 8), "shift_size": (1, 9)},
            ["`shift_size`", "Received: shift_size=(1, 9)"],
        ),
        (
            {"window_size": 7, "position_encoding": "absolute"},
            ["position_encoding='absolute'", "inside windows", "window_size=7"],
        ),
    ],
    ids=[
        "window0",
        "window-axis0",
        "window-float",
        "shift-negative",
        "shift-without-window",
        "shift-equal-window",
        "shift-over-window",
        "absolute-in-windows",
    ],
)
def test_bad_arguments(kwargs, parts):
    with pytest.raises(ValueError, match=match_all(*parts)):
        MultiHeadSelfAttention2D(**kwargs)


def test_relative_bias_with_fused_is_accepted():
    """A bias of no query is the fused kernels' additive bias: no refusal."""
    layer = MultiHeadSelfAttention2D(
        num_heads=2,
        position_encoding="relative_bias",
        window_size=3,
        attention_implementation="fused",
    )
    layer.build((None, 6, 6, 8))


def test_the_maps_scores_are_made_only_when_asked(monkeypatch):
    """(B, heads, N, N) scores of a windowed layer cost O(N^2): a call without
    `return_attention_scores` never makes them (it once did, 30x slower)."""
    from mhsa_core.layers.attention.windows import Windows

    layer, _, config = _layer("swin-window3-shift1")
    x = random_input(_shape((6, 6), config))
    made = []
    original = Windows.scores_to_map
    monkeypatch.setattr(
        Windows,
        "scores_to_map",
        lambda self, scores: made.append(1) or original(self, scores),
    )
    layer(x)
    assert not made
    layer(x, return_attention_scores=True)
    assert made
