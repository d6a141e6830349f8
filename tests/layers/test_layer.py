"""Keras conformance of MultiHeadSelfAttention2D: config, shapes, training,
dynamic sizes, jit, dropout, scores, mixed precision and .keras round trips."""

import keras
import numpy as np
import pytest

from mhsa_core import MultiHeadSelfAttention2D, mhsa_block, reference

from cases import BOTNET, ENCODING_CONFIGS, STANDARD, YOLOV4_MHSA, yolov4_mhsa
from harness import (
    assert_float32_within_budget,
    make_case,
    run_layer_test,
    to_numpy,
)

# name -> (layer arguments, input shape, trainable weights): config round trip,
# shapes, and a fit step that changes every weight (position tables included).
CONFORMANCE = {
    "yolov4_mhsa": (YOLOV4_MHSA, (2, 5, 7, 16), 8),
    "standard": (STANDARD, (2, 5, 7, 16), 6),
    "yolov4_mhsa-heads4-key_dim3": (
        yolov4_mhsa(num_heads=4, key_dim=3),
        (2, 4, 6, 16),
        8,
    ),
    "no-position-no-bias": ({"use_bias": False}, (2, 3, 3, 8), 3),
    "channels_first": (
        {"data_format": "channels_first", "num_heads": 2},
        (2, 8, 3, 5),
        6,
    ),
    "dropout": ({"dropout": 0.1, "seed": 3}, (2, 3, 4, 8), 6),
    "gelu": ({"activation": "gelu"}, (2, 3, 4, 8), 6),
    "relative": (ENCODING_CONFIGS["relative"], (2, 5, 7, 16), 8),
    "absolute-no-bias": (
        {**ENCODING_CONFIGS["absolute"], "use_bias": False},
        (2, 4, 3, 16),
        5,
    ),
    "sinusoidal": (ENCODING_CONFIGS["sinusoidal"], (2, 4, 3, 16), 6),
    "relative-channels_first": (
        {
            **ENCODING_CONFIGS["relative"],
            "position_size": (3, 3),
            "data_format": "channels_first",
        },
        (2, 8, 5, 4),
        8,
    ),
    "botnet": ({**BOTNET, "num_heads": 2}, (2, 4, 5, 8), 5),
    # timm's options: 6 projections + 4 q/k norm + 2 output norm + 2 output.
    "qk_norm-output_norm-output_dense": (
        {
            "num_heads": 2,
            "qk_norm": "layer",
            "output_norm": "layer",
            "output_dense": True,
        },
        (2, 4, 5, 16),
        14,
    ),
    # EVA without the k bias: 5 projections + 2 RMS scales + 2 output.
    "rms-no_key_bias-output_dense-channels_first": (
        {
            "num_heads": 2,
            "qk_norm": "rms",
            "use_key_bias": False,
            "output_dense": True,
            "data_format": "channels_first",
        },
        (2, 8, 3, 5),
        9,
    ),
    "rope": (ENCODING_CONFIGS["rope"], (2, 4, 6, 16), 6),
    # fit must move the frequencies too.
    "rope_mixed-channels_first": (
        {**ENCODING_CONFIGS["rope_mixed"], "data_format": "channels_first"},
        (2, 16, 3, 5),
        7,
    ),
}


@pytest.mark.parametrize("name", list(CONFORMANCE))
def test_layer_conformance(name):
    init_kwargs, input_shape, n_trainable = CONFORMANCE[name]
    run_layer_test(init_kwargs, input_shape, expected_num_trainable_weights=n_trainable)


# name -> (layer arguments, reference.weight_shapes arguments after C=16).
WEIGHT_ORDER = {
    "standard": ({"num_heads": 4, "key_dim": 5}, (4, 5, "none")),
    "yolov4_mhsa": (yolov4_mhsa(num_heads=4, key_dim=5), (4, 5, "conv")),
    "relative": (
        {
            "num_heads": 4,
            "key_dim": 5,
            "position_encoding": "relative",
            "position_size": (6, 3),
        },
        (4, 5, "relative", True, (6, 3)),
    ),
    "absolute-no-bias": (
        {
            "num_heads": 2,
            "position_encoding": "absolute",
            "use_bias": False,
            "position_size": (4, 7),
        },
        (2, None, "absolute", False, (4, 7)),
    ),
    # The frequencies after the projections (the contract's step 3).
    "rope_mixed": (
        {"num_heads": 4, "key_dim": 8, "position_encoding": "rope_mixed"},
        (4, 8, "rope_mixed"),
    ),
}


@pytest.mark.parametrize("name", list(WEIGHT_ORDER))
def test_weight_shapes_and_creation_order(name):
    """The layer creates the canonical weight dict, in its order."""
    config, args = WEIGHT_ORDER[name]
    layer = MultiHeadSelfAttention2D(**config)
    layer.build((None, None, None, 16))
    shapes = {w.name: tuple(w.shape) for w in layer.trainable_weights}
    assert list(shapes.items()) == list(reference.weight_shapes(16, *args).items())
    qk = args[0] * (args[1] or 16 // args[0])
    assert shapes["query_kernel"] == (16, qk) and shapes["value_kernel"] == (16, 16)


@pytest.mark.parametrize("use_bias", [True, False], ids=["bias", "no-bias"])
def test_projections_are_named_attributes(use_bias):
    """layer.query_kernel etc. are the variables named so (biases None without
    use_bias), whatever the encoding adds before or after them."""
    layer = MultiHeadSelfAttention2D.yolov4_mhsa(num_heads=2, use_bias=use_bias)
    layer.build((None, None, None, 8))
    by_name = {w.name: w for w in layer.trainable_weights}
    for projection in ("query", "key", "value"):
        kernel = getattr(layer, f"{projection}_kernel")
        assert kernel is by_name[f"{projection}_kernel"]
        bias = getattr(layer, f"{projection}_bias")
        if use_bias:
            assert bias is by_name[f"{projection}_bias"]
        else:
            assert bias is None and f"{projection}_bias" not in by_name
    assert tuple(layer.query_kernel.shape) == (8, 8)


def test_config_has_every_argument():
    layer = MultiHeadSelfAttention2D(
        num_heads=2,
        key_dim=4,
        activation=None,
        position_encoding="none",
        scale=None,
        use_bias=False,
        dropout=0.25,
        data_format="channels_first",
        kernel_initializer="glorot_uniform",
        bias_initializer="ones",
        kernel_regularizer="l2",
        bias_regularizer="l1",
        kernel_constraint="max_norm",
        bias_constraint="non_neg",
        seed=7,
        name="attn",
    )
    config = layer.get_config()
    for key in (
        "num_heads",
        "key_dim",
        "position_encoding",
        "scale",
        "use_bias",
        "dropout",
        "data_format",
        "seed",
    ):
        assert config[key] == getattr(layer, key), key
    assert config["activation"] == "linear"
    clone = MultiHeadSelfAttention2D.from_config(config)
    assert clone.get_config() == config
    assert isinstance(clone.kernel_regularizer, keras.regularizers.L2)
    assert isinstance(clone.bias_constraint, keras.constraints.NonNeg)


def test_data_format_defaults_to_image_data_format():
    previous = keras.config.image_data_format()
    try:
        keras.config.set_image_data_format("channels_first")
        assert MultiHeadSelfAttention2D().data_format == "channels_first"
    finally:
        keras.config.set_image_data_format(previous)
    assert MultiHeadSelfAttention2D().data_format == previous


@pytest.mark.parametrize(
    "config,n_losses",
    [(STANDARD, 6), (YOLOV4_MHSA, 8)],  # one per kernel and bias
    ids=["standard", "yolov4_mhsa"],
)
def test_regularizers_add_losses(config, n_losses):
    layer = MultiHeadSelfAttention2D(
        **config, kernel_regularizer="l2", bias_regularizer="l2"
    )
    layer(np.ones((1, 2, 2, 4), "float32"))
    assert len(layer.losses) == n_losses


def test_symbolic_shapes_and_scores_spec():
    x = keras.Input((None, None, 16))
    mask = keras.Input((None, None), dtype="bool")
    layer = MultiHeadSelfAttention2D(num_heads=4)
    out, scores = layer(x, attention_mask=mask, return_attention_scores=True)
    assert tuple(out.shape) == (None, None, None, 16)
    assert tuple(scores.shape) == (None, 4, None, None)
    static = keras.Input((5, 7, 16), batch_size=3)
    out, scores = MultiHeadSelfAttention2D(num_heads=2)(
        static, return_attention_scores=True
    )
    assert tuple(scores.shape) == (3, 2, 35, 35)
    spec = layer.compute_output_spec(keras.KerasTensor((2, 3, 4, 16)))
    assert tuple(spec.shape) == (2, 3, 4, 16)


def test_dynamic_sizes_one_instance_eager():
    """One layer, several H x W in one process; each checked against the oracle."""
    layer, _, weights = make_case({"num_heads": 2}, (2, 5, 7, 16))
    for shape in [(2, 5, 7, 16), (1, 9, 3, 16), (3, 1, 8, 16), (2, 6, 1, 16)]:
        x = np.random.default_rng(shape[1]).standard_normal(shape).astype("float32")
        assert_float32_within_budget(to_numpy(layer(x)), x, weights, {"num_heads": 2})


# Keras's torch trainer reads .grad of non-leaf tensors while dynamo traces it
# (a warning from keras+torch internals, not from this layer).
@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:The .grad attribute of a Tensor that is not a leaf")
def test_dynamic_sizes_compiled():
    """A model on Input((None, None, C)) under jit_compile=True: XLA on TF and
    JAX, torch.compile on torch; two sizes through one compiled model, and a
    compiled training step."""
    inputs = keras.Input((None, None, 16))
    layer = MultiHeadSelfAttention2D(num_heads=2)
    model = keras.Model(inputs, layer(inputs))
    model.compile(jit_compile=True, optimizer="sgd", loss="mse")
    assert model.jit_compile
    _, _, weights = make_case({"num_heads": 2}, (1, 2, 2, 16))
    layer.set_weight_dict(weights)
    for shape in [(2, 5, 7, 16), (1, 4, 9, 16)]:
        x = np.random.default_rng(shape[1]).standard_normal(shape).astype("float32")
        y = model.predict(x, verbose=0)
        assert_float32_within_budget(
            y, x, weights, {"num_heads": 2}, what=f"jit {shape}"
        )
    loss = model.train_on_batch(x, np.zeros_like(x))
    assert np.isfinite(loss)


def test_dropout_only_in_training():
    layer, x, weights = make_case({"dropout": 0.5, "seed": 1}, (2, 4, 5, 8))
    # The seed generator's state is a (non-weight) variable of the layer, so
    # it is saved, and it advances under jit.
    assert any("seed_generator" in v.path for v in layer.non_trainable_variables)
    inference = to_numpy(layer(x))
    assert_float32_within_budget(inference, x, weights, {})
    np.testing.assert_array_equal(to_numpy(layer(x, training=False)), inference)
    _, probs = layer(x, return_attention_scores=True, training=True)
    trained = to_numpy(layer(x, training=True))
    assert not np.allclose(trained, inference)
    # Scores are the probabilities before dropout: rows still sum to one.
    np.testing.assert_allclose(to_numpy(probs).sum(-1), 1.0, rtol=1e-5)
    # Inverted dropout keeps the expectation: the mean over many draws of the
    # dropped output approaches the inference output.
    draws = np.mean([to_numpy(layer(x, training=True)) for _ in range(200)], axis=0)
    spread = np.abs(inference).max()
    assert np.abs(draws - inference).max() < 0.25 * spread


def test_keras_round_trip(tmp_path):
    """.keras save/load: weights bit-identical, outputs identical, config equal."""
    inputs = keras.Input((None, None, 16))
    mask = keras.Input((None, None), dtype="bool")
    layer = MultiHeadSelfAttention2D(num_heads=4, key_dim=3, scale=None)
    model = keras.Model([inputs, mask], layer(inputs, attention_mask=mask))
    _, x, weights = make_case({"num_heads": 4, "key_dim": 3}, (2, 5, 6, 16))
    layer.set_weight_dict(weights)
    m = np.ones((2, 5, 6), bool)
    m[1, :, 4:] = False
    path = tmp_path / "block.keras"
    model.save(path)
    loaded = keras.saving.load_model(path)  # safe mode: no custom_objects needed
    new_layer = [
        candidate
        for candidate in loaded.layers
        if isinstance(candidate, MultiHeadSelfAttention2D)
    ][0]
    assert new_layer.get_config() == layer.get_config()
    for a, b in zip(layer.weights, new_layer.weights):
        assert a.name == b.name
        np.testing.assert_array_equal(to_numpy(a), to_numpy(b))
    np.testing.assert_array_equal(to_numpy(model([x, m])), to_numpy(loaded([x, m])))
    # A second size through the loaded model.
    x2 = np.random.default_rng(9).standard_normal((1, 3, 8, 16)).astype("float32")
    m2 = np.ones((1, 3, 8), bool)
    assert_float32_within_budget(
        to_numpy(loaded([x2, m2])),
        x2,
        weights,
        {"num_heads": 4, "key_dim": 3, "scale": None},
    )


def test_keras_round_trip_float64(tmp_path):
    layer, x, weights = make_case({"num_heads": 2}, (1, 3, 4, 8), dtype="float64")
    model = keras.Sequential([keras.Input((3, 4, 8), dtype="float64"), layer])
    model.save(tmp_path / "f64.keras")
    loaded = keras.saving.load_model(tmp_path / "f64.keras")
    for a, b in zip(model.weights, loaded.weights):
        assert keras.backend.standardize_dtype(b.dtype) == "float64"
        np.testing.assert_array_equal(to_numpy(a), to_numpy(b))


def test_block_stacked_as_in_yolov4_mhsa():
    """The YOLOv4-MHSA use: the block 4x on a backbone feature map (there 512
    channels, here 16)."""
    inputs = keras.Input((None, None, 16))
    x = inputs
    for _ in range(4):
        x = mhsa_block(x, 16, num_heads=2)
    model = keras.Model(inputs, x)
    assert (
        sum(isinstance(layer, MultiHeadSelfAttention2D) for layer in model.layers) == 4
    )
    for shape in [(1, 5, 5, 16), (2, 3, 7, 16)]:
        y = model(np.random.default_rng(0).standard_normal(shape).astype("float32"))
        assert tuple(y.shape) == shape
