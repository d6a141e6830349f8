"""Keras's quantization and LoRA on the layer, on the current backend.

- `model.quantize(mode)` for int8, int4 (grouped, Keras's default block size
  128) and int4 per channel: no warning about the layer, the integer
  variables in place of the float kernels, the dtype policy Keras's Dense
  gets; float8 / gptq / awq: Keras's NotImplementedError (a warning from
  `model.quantize`, the layer left float);
- the arithmetic is Keras's Dense's: each dense map against a quantized
  `keras.layers.Dense` holding the same kernel, and against a NumPy float64
  golden of the formula (the map run in float64);
- int4 is weights only: the layer equals the float64 reference run with its
  dequantized weights (`get_weight_dict`) within the float32 budget;
- the integers are the NumPy quantizer's, bit for bit; a `.keras` round trip
  gives the same outputs bit for bit (the loaded layer is rebuilt from its
  quantized dtype policy);
- LoRA: the function is unchanged at enable time, only the adapters train
  (every other weight bit-exact after a fit), a round trip keeps the
  adapters, the weight dict gives the merged kernels; bad calls raise
  ValueError naming the argument.
Across backends (a file quantized under one loads under the others): the
matrix's `int8` case (tests/consistency).
"""

import warnings

import keras
import numpy as np
import pytest
from keras import ops

from mhsa_core import MultiHeadSelfAttention2D
from mhsa_core.layers import projection as projection_module

from harness import assert_float32_within_budget, match_all, random_input, to_numpy

# (id, model.quantize arguments, dtype policy name, block size)
MODE_IDS = ["int8", "int4-grouped", "int4-per-channel"]
MODES = [
    ("int8", {"mode": "int8"}, "int8_from_float32", None),
    ("int4-grouped", {"mode": "int4"}, "int4/128_from_float32", 128),
    (
        "int4-per-channel",
        {"config": keras.quantizers.Int4QuantizationConfig(block_size=-1)},
        "int4/-1_from_float32",
        None,
    ),
]
# Layers with every dense map the layer has: the legacy block's position conv,
# q/k/v, the output projection. 160 channels: two int4 groups of 128 (the
# second one partial).
CONFIGS = [
    pytest.param(
        {"num_heads": 2, "position_encoding": "conv", "output_dense": True},
        id="conv-output",
    ),
    pytest.param(
        {"num_heads": 4, "qk_norm": "layer", "use_key_bias": False}, id="qknorm"
    ),
]
SHAPE = (2, 4, 5, 160)


def _model(config, shape=SHAPE, seed=3):
    inputs = keras.Input(shape[1:])
    layer = MultiHeadSelfAttention2D(**config, seed=seed)
    model = keras.Model(inputs, layer(inputs))
    return model, layer


def _quantize(model, arguments):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.quantize(**arguments)
    return [str(w.message) for w in caught]


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize(
    "name, arguments, policy, block", MODES, ids=[m[0] for m in MODES]
)
def test_model_quantize(config, name, arguments, policy, block):
    model, layer = _model(config)
    floats = {p.kernel_name: to_numpy(p.kernel) for p in layer._projections}
    messages = _quantize(model, arguments)
    assert not [m for m in messages if "MultiHeadSelfAttention2D" in m], messages
    assert layer.dtype_policy.name == policy
    mode = name.split("-")[0]
    for projection in layer._projections:
        kernel = to_numpy(projection.kernel)
        assert kernel.dtype == np.int8, projection.kernel_name
        # The float kernel left the layer: only the integer one has its name.
        names = [v.name for v in layer.weights]
        assert names.count(projection.kernel_name) == 1
        float_kernel = floats[projection.kernel_name]
        if mode == "int8" or block is None:
            values, scale = projection_module.quantize_kernel(float_kernel, mode)
            if mode == "int4":
                values = to_numpy(keras.quantizers.pack_int4(values, axis=-1)[0])
            np.testing.assert_array_equal(kernel, values)
            np.testing.assert_array_equal(to_numpy(projection.kernel_scale), scale)
        # Dequantized, each kernel is within one quantization step of the float one.
        step = np.max(np.abs(float_kernel)) / (7 if mode == "int4" else 127)
        assert np.max(np.abs(projection.float_kernel() - float_kernel)) <= step


@pytest.mark.parametrize(
    "name, arguments, policy, block", MODES, ids=[m[0] for m in MODES]
)
def test_dense_maps_are_keras_dense(name, arguments, policy, block):
    """Each quantized map gives what Keras's own quantized Dense gives with
    the same kernel and bias (the same arithmetic: equal up to the order of
    a float32 sum)."""
    config = {"num_heads": 2, "position_encoding": "conv", "output_dense": True}
    model, layer = _model(config)
    tokens = random_input((2, 20, SHAPE[-1]), seed=5)
    denses = []
    for projection in layer._projections:
        dense = keras.layers.Dense(projection.out_width)
        dense.build((None, None, projection.in_width))
        dense.set_weights([to_numpy(projection.kernel), to_numpy(projection.bias)])
        denses.append(dense)
    _quantize(model, arguments)
    for projection, dense in zip(layer._projections, denses):
        _quantize(
            keras.Sequential([keras.Input((20, projection.in_width)), dense]), arguments
        )
        ours = to_numpy(projection(ops.convert_to_tensor(tokens)))
        theirs = to_numpy(dense(tokens))
        np.testing.assert_allclose(
            ours, theirs, rtol=0, atol=1e-5 * np.max(np.abs(theirs))
        )


def _golden_int8(x, values, scale, bias):
    """Dense's int8 arithmetic in NumPy float64: per token abs-max, round
    half to even, clip; integer product; / (x_scale * w_scale)."""
    x_scale = 127.0 / (np.max(np.abs(x), axis=-1, keepdims=True) + 1e-7)
    x_q = np.clip(np.round(x * x_scale), -127, 127)
    return (x_q @ values.astype(np.float64)) / (x_scale * scale) + bias


def test_int8_float64_is_the_formula():
    """In float64 (the consistency tool's twin) the int8 map is the formula
    with the same integers, to float64 precision."""
    layer = MultiHeadSelfAttention2D(num_heads=2, dtype="float64")
    layer.build((None, 4, 5, 32))
    layer.quantize("int8")
    tokens = random_input((2, 20, 32), dtype="float64", seed=7)
    p = layer._query
    ours = to_numpy(p(ops.convert_to_tensor(tokens)))
    assert ours.dtype == np.float64
    golden = _golden_int8(
        tokens, to_numpy(p.kernel), to_numpy(p.kernel_scale), to_numpy(p.bias)
    )
    np.testing.assert_allclose(
        ours, golden, rtol=0, atol=1e-12 * np.max(np.abs(golden))
    )


@pytest.mark.parametrize(
    "name, arguments", [(m[0], m[1]) for m in MODES[1:]], ids=[m[0] for m in MODES[1:]]
)
def test_int4_is_weights_only(name, arguments):
    """Weights only: the layer is the reference run with its dequantized
    weights (the weight dict), within the float32 budget."""
    config = {"num_heads": 2, "position_encoding": "conv", "output_dense": True}
    model, layer = _model(config)
    _quantize(model, arguments)
    x = random_input(SHAPE, seed=11)
    assert_float32_within_budget(to_numpy(model(x)), x, layer.get_weight_dict(), config)


@pytest.mark.parametrize(
    "name, arguments, policy, block", MODES, ids=[m[0] for m in MODES]
)
def test_round_trip(name, arguments, policy, block, tmp_path):
    config = {"num_heads": 2, "position_encoding": "conv", "output_dense": True}
    model, layer = _model(config)
    _quantize(model, arguments)
    x = random_input(SHAPE, seed=2)
    path = str(tmp_path / "q.keras")
    model.save(path)
    loaded = keras.saving.load_model(path)
    assert loaded.layers[1].dtype_policy.name == policy
    np.testing.assert_array_equal(to_numpy(loaded(x)), to_numpy(model(x)))
    for a, b in zip(layer.weights, loaded.layers[1].weights):
        assert a.name == b.name
        np.testing.assert_array_equal(to_numpy(a), to_numpy(b))


def test_int8_trains():
    """Straight-through gradients: a fit moves the biases of a quantized
    layer and the integers stay as they are (not trainable)."""
    model, layer = _model({"num_heads": 2, "output_dense": True})
    _quantize(model, {"mode": "int8"})
    before = {v.name: to_numpy(v).copy() for v in layer.weights}
    x = random_input(SHAPE, seed=4)
    model.compile(keras.optimizers.SGD(0.1), "mse")
    model.fit(x, 0.5 * x, epochs=1, verbose=0)
    after = {v.name: to_numpy(v) for v in layer.weights}
    for name in before:
        changed = not np.array_equal(before[name], after[name])
        assert changed == name.endswith("_bias"), name


@pytest.mark.parametrize(
    "mode, error",
    [("float8", NotImplementedError), ("gptq", NotImplementedError)],
    ids=["float8", "gptq"],
)
def test_modes_not_implemented(mode, error):
    layer = MultiHeadSelfAttention2D(num_heads=2)
    layer.build((None, 4, 5, 16))
    with pytest.raises(error, match=match_all("mode=", repr(mode))):
        projection_module.check_quantization_mode(mode)


def test_model_quantize_float8_warns_and_leaves_the_layer():
    model, layer = _model({"num_heads": 2}, shape=(1, 4, 5, 16))
    x = random_input((1, 4, 5, 16))
    before = to_numpy(model(x))
    messages = _quantize(model, {"mode": "float8"})
    assert any("float8" in m and "MultiHeadSelfAttention2D" in m for m in messages)
    assert layer.quantization_mode is None
    np.testing.assert_array_equal(to_numpy(model(x)), before)


@pytest.mark.parametrize(
    "call, parts",
    [
        (
            lambda layer: layer.quantize(
                config=keras.quantizers.Int8QuantizationConfig(
                    weight_quantizer=keras.quantizers.AbsMaxQuantizer(axis=0),
                    activation_quantizer=keras.quantizers.AbsMaxQuantizer(axis=-1),
                )
            ),
            ["weight_quantizer="],
        ),
        (lambda layer: layer.enable_lora(0), ["rank=0"]),
        (lambda layer: layer.enable_lora(True), ["rank=True"]),
        (lambda layer: layer.enable_lora(None), ["rank=None"]),
        (
            lambda layer: (layer.enable_lora(2), layer.enable_lora(2)),
            ["already enabled", "rank=2"],
        ),
        (
            lambda layer: (
                layer.quantize("int8"),
                layer.set_weight_dict(layer.get_weight_dict()),
            ),
            ["set_weight_dict", "quantization_mode='int8'"],
        ),
    ],
    ids=[
        "custom-quantizer",
        "rank-0",
        "rank-bool",
        "rank-none",
        "lora-twice",
        "set-quantized",
    ],
)
def test_errors(call, parts):
    layer = MultiHeadSelfAttention2D(num_heads=2)
    layer.build((None, 4, 5, 16))
    with pytest.raises(ValueError, match=match_all(*parts)):
        call(layer)


def test_lora_needs_no_kernel_constraint():
    layer = MultiHeadSelfAttention2D(num_heads=2, kernel_constraint="max_norm")
    layer.build((None, 4, 5, 16))
    with pytest.raises(ValueError, match=match_all("kernel_constraint=")):
        layer.enable_lora(2)
    assert layer.lora_rank is None and len(layer.weights) == 6


@pytest.mark.parametrize("quantized", [False, True], ids=["float", "int8"])
def test_lora_trains_only_the_adapters(quantized, tmp_path):
    config = {"num_heads": 2, "position_encoding": "conv", "output_dense": True}
    model, layer = _model(config)
    x = random_input(SHAPE, seed=8)
    if quantized:
        _quantize(model, {"mode": "int8"})
    y0 = to_numpy(model(x))
    layer.enable_lora(4)
    # B starts at zero: the function is unchanged.
    np.testing.assert_array_equal(to_numpy(model(x)), y0)
    adapters = {f"{p.kernel_name}_lora_{s}" for p in layer._projections for s in "ab"}
    assert {v.name for v in layer.trainable_weights} == adapters
    before = {v.name: to_numpy(v).copy() for v in layer.weights}
    model.compile(keras.optimizers.SGD(0.05), "mse")
    model.fit(x, 0.5 * x, epochs=2, verbose=0)
    for v in layer.weights:
        same = np.array_equal(before[v.name], to_numpy(v))
        if v.name.endswith("_lora_b"):
            assert not same, v.name
        elif not v.name.endswith("_lora_a"):  # (A moves once B is not zero)
            assert same, v.name
    y1 = to_numpy(model(x))
    assert not np.allclose(y1, y0)
    # The weight dict: the merged kernels, what the reference runs.
    if not quantized:
        assert_float32_within_budget(y1, x, layer.get_weight_dict(), config)
    path = str(tmp_path / "lora.keras")
    model.save(path)
    loaded = keras.saving.load_model(path)
    np.testing.assert_array_equal(to_numpy(loaded(x)), y1)
    assert loaded.layers[1].lora_rank == 4
    assert {v.name for v in loaded.layers[1].trainable_weights} == adapters


def test_float_config_unchanged():
    """A float layer's config has no LoRA keys: it loads in 0.2.0."""
    layer = MultiHeadSelfAttention2D(num_heads=2)
    assert "lora_rank" not in layer.get_config()
    layer.build((None, 4, 5, 16))
    layer.enable_lora(2, lora_alpha=8)
    config = layer.get_config()
    assert (config["lora_rank"], config["lora_alpha"]) == (2, 8.0)
    assert MultiHeadSelfAttention2D.from_config(config).lora_rank == 2


def test_weight_dict_of_a_frozen_layer():
    """Every canonical weight, trainable or not (`trainable=False` once gave
    an empty dict: it read `trainable_weights`)."""
    layer = MultiHeadSelfAttention2D(num_heads=2, trainable=False)
    layer.build((None, 4, 5, 16))
    names = ["query_kernel", "query_bias", "key_kernel", "key_bias"]
    assert list(layer.get_weight_dict())[:4] == names
    layer.set_weight_dict(layer.get_weight_dict())


@pytest.mark.parametrize(
    "rank", [0, -1, 2.0, "2"], ids=["zero", "negative", "float", "str"]
)
def test_lora_rank_argument(rank):
    with pytest.raises(ValueError, match=match_all(f"lora_rank={rank!r}")):
        MultiHeadSelfAttention2D(num_heads=2, lora_rank=rank)
