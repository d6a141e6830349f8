"""The layer against the Keras 2 seed block it replaces, run by tf_keras itself.

The seed `mhsa_block(input_layer, input_channel)` (TensorFlow-only Keras 2
code) is reproduced verbatim in `_SEED_SCRIPT` and run by tf_keras in a
subprocess, once per test session, whatever KERAS_BACKEND this pytest process
uses: the subprocess imports only tensorflow/tf_keras, the pytest process never
imports TensorFlow for the seed (TF and torch in one process can segfault). The
subprocess saves to an .npz: the input, the seed's output, each conv's weights
picked BY LAYER NAME (conv2d, conv2d_1, conv2d_2, conv2d_3 = position, query,
key, value, the creation order `load_seed_weights` expects), and
`model.get_weights()` in its native (topological) order.

Both the seed's and the layer's outputs are float32; each must be within the
float32 error budget (`reference.error_budget`) of the float64 NumPy reference
run with the same weights. Loading `model.get_weights()` as-is (topological
order: position, key, query, value) must give a clearly wrong output: that is
the trap the README warns about.
"""

import importlib.util
import os
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest

from harness import assert_float32_within_budget, to_numpy
from mhsa_core import MultiHeadSelfAttention2D, mhsa_block, reference

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("tf_keras") is None
    or importlib.util.find_spec("tensorflow") is None,
    reason="the seed oracle needs tensorflow and tf_keras (run in a subprocess)",
)

# Seed model 1: one block on a (2, 7, 5, 16) input (H != W: catches a swapped
# flattening). Seed model 2: two stacked blocks on (2, 4, 4, 8), as the seed
# stacks them.
SHAPE_1 = (2, 7, 5, 16)
SHAPE_2 = (2, 4, 4, 8)
ROLES = ("position", "query", "key", "value")  # the seed's creation order

_SEED_SCRIPT = textwrap.dedent('''
    """Runs the Keras 2 seed block with tf_keras and saves inputs, outputs and weights."""
    import os
    import sys

    os.environ.pop("KERAS_BACKEND", None)
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
    os.environ["CUDA_VISIBLE_DEVICES"] = ""

    import numpy as np
    import tensorflow as tf
    import tf_keras
    from tf_keras.layers import Add, Conv2D, Dot, Permute, Reshape, Softmax


    # ---- the seed, verbatim ----
    def mhsa_block(input_layer, input_channel):
        W, H = int(input_layer.shape[1]), int(input_layer.shape[2])
        conv = Reshape((1, W*H, input_channel))(input_layer)
        pos_encoding = Conv2D(input_channel, 1, activation='relu', padding='same', kernel_initializer='he_normal')(conv)
        conv = Add()([conv, pos_encoding])
        conv_q = Conv2D(input_channel, 1, activation='relu', padding='same', kernel_initializer='he_normal')(conv)
        conv_k = Conv2D(input_channel, 1, activation='relu', padding='same', kernel_initializer='he_normal')(conv)
        conv_v = Conv2D(input_channel, 1, activation='relu', padding='same', kernel_initializer='he_normal')(conv)
        conv_k = Permute(dims=(1, 3, 2))(conv_k)
        conv = Dot(axes=(3,2))([conv_q, conv_k])
        conv = Reshape((1, W*H, W*H))(conv)
        conv = Softmax()(conv)
        conv = Dot(axes=(3,2))([conv, conv_v])
        conv = Reshape((W, H, input_channel))(conv)
        return conv
    # ----------------------------


    def conv_name(i):
        return "conv2d" if i == 0 else f"conv2d_{i}"


    def run(tag, shape, blocks, seed, out):
        tf_keras.backend.clear_session()  # layer names restart at conv2d
        tf_keras.utils.set_random_seed(seed)
        inp = tf_keras.Input(shape[1:])
        y = inp
        for _ in range(blocks):
            y = mhsa_block(y, shape[-1])
        model = tf_keras.Model(inp, y)
        rng = np.random.default_rng(seed)
        # The seed's biases start at zero; random ones check the bias order too.
        for i in range(4 * blocks):
            layer = model.get_layer(conv_name(i))
            kernel, bias = layer.get_weights()
            layer.set_weights([kernel, (0.1 * rng.standard_normal(bias.shape)).astype("float32")])
        x = rng.standard_normal(shape).astype("float32")
        out[f"{tag}/x"] = x
        out[f"{tag}/y"] = model(x, training=False).numpy()
        # Picked by layer name: conv2d_{4b + i}, i = position, query, key, value.
        for i in range(4 * blocks):
            kernel, bias = model.get_layer(conv_name(i)).get_weights()
            out[f"{tag}/{conv_name(i)}/kernel"] = kernel
            out[f"{tag}/{conv_name(i)}/bias"] = bias
        native = model.get_weights()
        out[f"{tag}/native_count"] = np.array(len(native))
        for j, w in enumerate(native):
            out[f"{tag}/native/{j}"] = w
        out[f"{tag}/conv_order"] = np.array(
            [l.name for l in model.layers if isinstance(l, Conv2D)])


    out = {}
    run("one", %(shape_1)r, 1, 1, out)
    run("two", %(shape_2)r, 2, 2, out)
    np.savez(sys.argv[1], **out)
''') % {"shape_1": SHAPE_1, "shape_2": SHAPE_2}


@pytest.fixture(scope="session")
def seed(tmp_path_factory):
    """The seed's data, produced by tf_keras in a subprocess (once per session)."""
    directory = tmp_path_factory.mktemp("seed")
    script = directory / "seed_block.py"
    script.write_text(_SEED_SCRIPT)
    path = directory / "seed.npz"
    env = {k: v for k, v in os.environ.items() if k not in ("KERAS_BACKEND", "JAX_ENABLE_X64")}
    result = subprocess.run(
        [sys.executable, str(script), str(path)],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, (
        f"seed subprocess failed ({result.returncode}):\n{result.stderr[-4000:]}")
    with np.load(path) as data:
        return {key: data[key] for key in data.files}


def _conv_name(i):
    return "conv2d" if i == 0 else f"conv2d_{i}"


def _creation_order(seed, tag, block=0, squeeze=False):
    """The 8 arrays of one block, picked by layer name, in creation order."""
    arrays = []
    for i in range(4):
        name = _conv_name(4 * block + i)
        kernel = seed[f"{tag}/{name}/kernel"]
        assert kernel.shape[:2] == (1, 1)
        arrays += [kernel[0, 0] if squeeze else kernel, seed[f"{tag}/{name}/bias"]]
    return arrays


def _weight_dict(arrays):
    """Creation-order seed arrays -> the canonical dict, float64 (exact values)."""
    out = {}
    for i, role in enumerate(ROLES):
        kernel = np.asarray(arrays[2 * i], dtype=np.float64)
        out[f"{role}_kernel"] = kernel.reshape(kernel.shape[-2:])
        out[f"{role}_bias"] = np.asarray(arrays[2 * i + 1], dtype=np.float64)
    return out


def _chain_budget(x, weight_dicts):
    """float64 reference of stacked seed blocks and the float32 budget.

    As `reference.error_budget`, for a chain: 2x the error of the chained
    float32 (sequential accumulation) reference, plus 1e-6 * max|ref64|.
    """
    ref64 = np.asarray(x, np.float64)
    ref32 = np.asarray(x, np.float32)
    for weights in weight_dicts:
        ref64 = reference.mhsa_forward(ref64, weights, dtype=np.float64)
        ref32 = reference.mhsa_forward(ref32, weights, dtype=np.float32,
                                       accumulation="sequential")
    ref32_error = float(np.max(np.abs(ref32.astype(np.float64) - ref64)))
    return ref64, 2.0 * ref32_error + 1e-6 * float(np.max(np.abs(ref64)))


def _assert_chain_within_budget(actual, ref64, budget, what):
    actual = np.asarray(actual, np.float64)
    assert actual.shape == ref64.shape, (what, actual.shape, ref64.shape)
    error = float(np.max(np.abs(actual - ref64)))
    assert error <= budget, f"{what}: float32 error {error:.3g} > budget {budget:.3g}"
    return error


# ---------------------------------------------------------------- premise
def test_seed_model_lists_convs_in_topological_order(seed):
    """The premise of the README's warning: get_weights() is not creation order."""
    assert list(seed["one/conv_order"]) == ["conv2d", "conv2d_2", "conv2d_1", "conv2d_3"]
    assert int(seed["one/native_count"]) == 8
    native = [seed[f"one/native/{j}"] for j in range(8)]
    by_name = _creation_order(seed, "one")
    # native = position, KEY, QUERY, value.
    for j, k in enumerate([0, 1, 4, 5, 2, 3, 6, 7]):
        np.testing.assert_array_equal(native[j], by_name[k])
    assert not np.array_equal(native[2], by_name[2])


# ------------------------------------------------------------- one block
@pytest.mark.parametrize("squeeze", [False, True], ids=["kernels_1x1xCxC", "kernels_CxC"])
def test_layer_matches_seed_block(seed, squeeze):
    x, seed_y = seed["one/x"], seed["one/y"]
    arrays = _creation_order(seed, "one", squeeze=squeeze)
    weights = _weight_dict(arrays)
    layer = MultiHeadSelfAttention2D()
    layer.build(SHAPE_1)
    layer.load_seed_weights(arrays)
    loaded = layer.get_weight_dict()
    for name, value in weights.items():
        np.testing.assert_array_equal(loaded[name], value.astype(np.float32), err_msg=name)
    y = to_numpy(layer(x))
    assert y.dtype == np.float32 and seed_y.dtype == np.float32
    assert_float32_within_budget(y, x, weights, {}, what="layer")
    assert_float32_within_budget(seed_y, x, weights, {}, what="tf_keras seed")


def test_topological_weight_order_is_a_trap(seed):
    """Loading model.get_weights() as-is swaps query and key: clearly wrong."""
    x = seed["one/x"]
    native = [seed[f"one/native/{j}"] for j in range(8)]
    weights = _weight_dict(_creation_order(seed, "one"))
    ref64, budget, _ = reference.error_budget(x, weights)
    layer = MultiHeadSelfAttention2D()
    layer.load_seed_weights(native)  # accepted: every shape is (1, 1, C, C) / (C,)
    error = float(np.max(np.abs(to_numpy(layer(x)).astype(np.float64) - ref64)))
    assert error > 100 * budget, (
        f"topological-order weights give error {error:.3g}, not > 100x budget {budget:.3g}")
    seed_error = float(np.max(np.abs(seed["one/y"].astype(np.float64) - ref64)))
    assert error > 100 * seed_error


def test_unbuilt_default_layer_is_built_by_load_seed_weights(seed):
    x, seed_y = seed["one/x"], seed["one/y"]
    arrays = _creation_order(seed, "one")
    weights = _weight_dict(arrays)
    layer = MultiHeadSelfAttention2D()
    assert not layer.built
    layer.load_seed_weights(arrays)
    assert layer.built and layer.channels == SHAPE_1[-1]
    assert len(layer.trainable_weights) == 8
    y = to_numpy(layer(x))
    assert_float32_within_budget(y, x, weights, {}, what="layer built by load_seed_weights")
    # And from the squeezed (C, C) kernels, on a channels_first layer.
    first = MultiHeadSelfAttention2D(data_format="channels_first")
    first.load_seed_weights(_creation_order(seed, "one", squeeze=True))
    y_first = to_numpy(first(np.transpose(x, (0, 3, 1, 2))))
    np.testing.assert_allclose(np.transpose(y_first, (0, 2, 3, 1)), y, rtol=0, atol=1e-5 * np.abs(y).max())
    assert_float32_within_budget(seed_y, x, weights, {}, what="tf_keras seed")


# ------------------------------------------------------ two stacked blocks
def test_two_stacked_layers_match_two_stacked_seed_blocks(seed):
    x, seed_y = seed["two/x"], seed["two/y"]
    assert list(seed["two/conv_order"])[:4] == ["conv2d", "conv2d_2", "conv2d_1", "conv2d_3"]
    inp = keras.Input(SHAPE_2[1:])
    layers = [MultiHeadSelfAttention2D(), MultiHeadSelfAttention2D()]
    model = keras.Model(inp, layers[1](layers[0](inp)))
    dicts = []
    for block, layer in enumerate(layers):
        arrays = _creation_order(seed, "two", block=block)
        layer.load_seed_weights(arrays)
        dicts.append(_weight_dict(arrays))
    ref64, budget = _chain_budget(x, dicts)
    y = to_numpy(model(x))
    _assert_chain_within_budget(y, ref64, budget, "two stacked layers")
    _assert_chain_within_budget(seed_y, ref64, budget, "two stacked tf_keras seed blocks")


# ---------------------------------------------------------------- mhsa_block
def test_mhsa_block_four_stacked_on_unknown_spatial_size():
    inp = keras.Input((None, None, 16))
    y = inp
    for _ in range(4):
        y = mhsa_block(y, 16)  # the seed's call signature
    assert tuple(y.shape) == (None, None, None, 16)
    model = keras.Model(inp, y)
    blocks = [l for l in model.layers if isinstance(l, MultiHeadSelfAttention2D)]
    assert len(blocks) == 4
    dicts = []
    for i, layer in enumerate(blocks):
        weights = reference.random_weights(16, seed=10 + i)
        # Tame weights: four unscaled ReLU blocks in a row otherwise give
        # near one-hot softmaxes, whose float32 error is all luck.
        weights = {k: v * (0.5 if k.endswith("kernel") else 1.0) for k, v in weights.items()}
        layer.set_weight_dict(weights)
        dicts.append(weights)
    rng = np.random.default_rng(5)
    for shape in [(2, 5, 7, 16), (1, 3, 4, 16)]:
        x = (0.5 * rng.standard_normal(shape)).astype("float32")
        out = to_numpy(model(x))
        assert out.shape == shape
        ref64, budget = _chain_budget(x, dicts)
        _assert_chain_within_budget(out, ref64, budget, f"4 x mhsa_block on {shape}")
        predicted = model.predict(x, verbose=0, batch_size=shape[0])
        _assert_chain_within_budget(predicted, ref64, budget, f"predict on {shape}")
