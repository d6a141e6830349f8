"""`load_yolov4_mhsa_weights` and the preset against the Keras 2 YOLOv4-MHSA
block they port, run by tf_keras itself.

The block `mhsa_block(input_layer, input_channel)` (TensorFlow-only Keras 2
code) is reproduced verbatim in `_KERAS2_SCRIPT` and run by tf_keras in a
subprocess, once per test session, whatever KERAS_BACKEND this pytest process
uses: the subprocess imports only tensorflow/tf_keras, the pytest process never
imports TensorFlow for it (TF and torch in one process can segfault). The
subprocess saves to an .npz: the input, the block's output, each conv's weights
picked BY LAYER NAME (conv2d, conv2d_1, conv2d_2, conv2d_3 = position, query,
key, value, the creation order `load_yolov4_mhsa_weights` expects), and
`model.get_weights()` in its native (topological) order.

Both the Keras 2 block's and the layer's outputs are float32; each must be
within the float32 error budget (`reference.error_budget`) of the float64
NumPy reference run with the same weights. Loading `model.get_weights()` as-is
(topological order: position, key, query, value) must give a clearly wrong
output: that is the trap docs/presets.md warns about.
"""

import importlib.util
import os
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest

from mhsa_core import MultiHeadSelfAttention2D, mhsa_block, reference

from cases import YOLOV4_MHSA
from harness import (
    assert_float32_within_budget,
    reference_config,
    to_numpy,
    yolov4_mhsa_arrays,
)

needs_tf_keras = pytest.mark.skipif(
    importlib.util.find_spec("tf_keras") is None
    or importlib.util.find_spec("tensorflow") is None,
    reason="the Keras 2 oracle needs tensorflow and tf_keras (run in a subprocess)",
)

# Keras 2 model 1: one block on a (2, 7, 5, 16) input (H != W: catches a
# swapped flattening). Model 2: two stacked blocks on (2, 4, 4, 8), as
# YOLOv4-MHSA stacks them.
SHAPE_1 = (2, 7, 5, 16)
SHAPE_2 = (2, 4, 4, 8)
ROLES = ("position", "query", "key", "value")  # the block's creation order
# The reference's arguments for the block.
BLOCK = reference_config(YOLOV4_MHSA)

_KERAS2_SCRIPT = textwrap.dedent('''
    """Runs the Keras 2 YOLOv4-MHSA block with tf_keras and saves inputs, outputs
    and weights."""
    import os
    import sys

    os.environ.pop("KERAS_BACKEND", None)
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
    os.environ["CUDA_VISIBLE_DEVICES"] = ""

    import numpy as np
    import tensorflow as tf
    import tf_keras
    from tf_keras.layers import Add, Conv2D, Dot, Permute, Reshape, Softmax


    # ---- the Keras 2 YOLOv4-MHSA block, verbatim ----
    def mhsa_block(input_layer, input_channel):
        W, H = int(input_layer.shape[1]), int(input_layer.shape[2])
        conv = Reshape((1, W*H, input_channel))(input_layer)
        pos_encoding = Conv2D(input_channel, 1, activation='relu', padding='same',
                              kernel_initializer='he_normal')(conv)
        conv = Add()([conv, pos_encoding])
        conv_q = Conv2D(input_channel, 1, activation='relu', padding='same',
                        kernel_initializer='he_normal')(conv)
        conv_k = Conv2D(input_channel, 1, activation='relu', padding='same',
                        kernel_initializer='he_normal')(conv)
        conv_v = Conv2D(input_channel, 1, activation='relu', padding='same',
                        kernel_initializer='he_normal')(conv)
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
        # The block's biases start at zero; random ones check the bias order too.
        for i in range(4 * blocks):
            layer = model.get_layer(conv_name(i))
            kernel, bias = layer.get_weights()
            layer.set_weights(
                [kernel, (0.1 * rng.standard_normal(bias.shape)).astype("float32")]
            )
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
def keras2(tmp_path_factory):
    """The Keras 2 block's data, produced by tf_keras in a subprocess (once per
    session)."""
    directory = tmp_path_factory.mktemp("yolov4_mhsa")
    script = directory / "keras2_block.py"
    script.write_text(_KERAS2_SCRIPT)
    path = directory / "keras2_block.npz"
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("KERAS_BACKEND", "JAX_ENABLE_X64")
    }
    result = subprocess.run(
        [sys.executable, str(script), str(path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, (
        f"tf_keras subprocess failed ({result.returncode}):\n{result.stderr[-4000:]}"
    )
    with np.load(path) as data:
        return {key: data[key] for key in data.files}


def _conv_name(i):
    return "conv2d" if i == 0 else f"conv2d_{i}"


def _creation_order(keras2, tag, block=0, squeeze=False):
    """The 8 arrays of one block, picked by layer name, in creation order."""
    arrays = []
    for i in range(4):
        name = _conv_name(4 * block + i)
        kernel = keras2[f"{tag}/{name}/kernel"]
        assert kernel.shape[:2] == (1, 1)
        arrays += [kernel[0, 0] if squeeze else kernel, keras2[f"{tag}/{name}/bias"]]
    return arrays


def _weight_dict(arrays):
    """Creation-order block arrays -> the canonical dict, float64 (exact values)."""
    out = {}
    for i, role in enumerate(ROLES):
        kernel = np.asarray(arrays[2 * i], dtype=np.float64)
        out[f"{role}_kernel"] = kernel.reshape(kernel.shape[-2:])
        out[f"{role}_bias"] = np.asarray(arrays[2 * i + 1], dtype=np.float64)
    return out


def _chain_budget(x, weight_dicts):
    """float64 reference of stacked YOLOv4-MHSA blocks and the float32 budget.

    As `reference.error_budget`, for a chain: 2x the error of the chained
    float32 (sequential accumulation) reference, plus 1e-6 * max|ref64|.
    """
    ref64 = np.asarray(x, np.float64)
    ref32 = np.asarray(x, np.float32)
    for weights in weight_dicts:
        ref64 = reference.mhsa_forward(ref64, weights, dtype=np.float64, **BLOCK)
        ref32 = reference.mhsa_forward(
            ref32, weights, dtype=np.float32, accumulation="sequential", **BLOCK
        )
    return ref64, reference.float32_budget(ref32, ref64)


def _assert_chain_within_budget(actual, ref64, budget, what):
    actual = np.asarray(actual, np.float64)
    assert actual.shape == ref64.shape, (what, actual.shape, ref64.shape)
    error = reference.max_abs(actual, ref64)
    assert error <= budget, f"{what}: float32 error {error:.3g} > budget {budget:.3g}"
    return error


# ---------------------------------------------------------------- premise
@pytest.mark.slow
@needs_tf_keras
def test_keras2_model_lists_convs_in_topological_order(keras2):
    """The premise of docs/presets.md's warning: get_weights() is not creation order."""
    assert list(keras2["one/conv_order"]) == [
        "conv2d",
        "conv2d_2",
        "conv2d_1",
        "conv2d_3",
    ]
    assert int(keras2["one/native_count"]) == 8
    native = [keras2[f"one/native/{j}"] for j in range(8)]
    by_name = _creation_order(keras2, "one")
    # native = position, KEY, QUERY, value.
    for j, k in enumerate([0, 1, 4, 5, 2, 3, 6, 7]):
        np.testing.assert_array_equal(native[j], by_name[k])
    assert not np.array_equal(native[2], by_name[2])


# ------------------------------------------------------------- one block
@needs_tf_keras
@pytest.mark.parametrize(
    "squeeze", [False, True], ids=["kernels_1x1xCxC", "kernels_CxC"]
)
@pytest.mark.slow
def test_layer_matches_keras2_block(keras2, squeeze):
    x, keras2_y = keras2["one/x"], keras2["one/y"]
    arrays = _creation_order(keras2, "one", squeeze=squeeze)
    weights = _weight_dict(arrays)
    layer = MultiHeadSelfAttention2D.yolov4_mhsa()
    layer.build(SHAPE_1)
    layer.load_yolov4_mhsa_weights(arrays)
    loaded = layer.get_weight_dict()
    for name, value in weights.items():
        np.testing.assert_array_equal(
            loaded[name], value.astype(np.float32), err_msg=name
        )
    y = to_numpy(layer(x))
    assert y.dtype == np.float32 and keras2_y.dtype == np.float32
    assert_float32_within_budget(y, x, weights, YOLOV4_MHSA, what="layer")
    assert_float32_within_budget(
        keras2_y, x, weights, YOLOV4_MHSA, what="tf_keras block"
    )


@pytest.mark.slow
@needs_tf_keras
def test_topological_weight_order_is_a_trap(keras2):
    """Loading model.get_weights() as-is swaps query and key: clearly wrong."""
    x = keras2["one/x"]
    native = [keras2[f"one/native/{j}"] for j in range(8)]
    weights = _weight_dict(_creation_order(keras2, "one"))
    ref64, budget, _ = reference.error_budget(x, weights, **BLOCK)
    layer = MultiHeadSelfAttention2D.yolov4_mhsa()
    layer.load_yolov4_mhsa_weights(
        native
    )  # accepted: every shape is (1, 1, C, C) / (C,)
    error = float(np.max(np.abs(to_numpy(layer(x)).astype(np.float64) - ref64)))
    assert error > 100 * budget, (
        f"topological-order weights give error {error:.3g}, "
        f"not > 100x budget {budget:.3g}"
    )
    keras2_error = reference.max_abs(keras2["one/y"].astype(np.float64), ref64)
    assert error > 100 * keras2_error


@pytest.mark.slow
@needs_tf_keras
def test_unbuilt_preset_layer_is_built_by_the_load(keras2):
    x, keras2_y = keras2["one/x"], keras2["one/y"]
    arrays = _creation_order(keras2, "one")
    weights = _weight_dict(arrays)
    layer = MultiHeadSelfAttention2D.yolov4_mhsa()
    assert not layer.built
    layer.load_yolov4_mhsa_weights(arrays)
    assert layer.built and layer.channels == SHAPE_1[-1]
    assert len(layer.trainable_weights) == 8
    y = to_numpy(layer(x))
    assert_float32_within_budget(
        y, x, weights, YOLOV4_MHSA, what="layer built by load_yolov4_mhsa_weights"
    )
    # And from the squeezed (C, C) kernels, on a channels_first layer.
    first = MultiHeadSelfAttention2D.yolov4_mhsa(data_format="channels_first")
    first.load_yolov4_mhsa_weights(_creation_order(keras2, "one", squeeze=True))
    y_first = to_numpy(first(np.transpose(x, (0, 3, 1, 2))))
    np.testing.assert_allclose(
        np.transpose(y_first, (0, 2, 3, 1)), y, rtol=0, atol=1e-5 * np.abs(y).max()
    )
    assert_float32_within_budget(
        keras2_y, x, weights, YOLOV4_MHSA, what="tf_keras block"
    )


# ------------------------------------------------------ two stacked blocks
@pytest.mark.slow
@needs_tf_keras
def test_two_stacked_layers_match_two_stacked_keras2_blocks(keras2):
    x, keras2_y = keras2["two/x"], keras2["two/y"]
    assert list(keras2["two/conv_order"])[:4] == [
        "conv2d",
        "conv2d_2",
        "conv2d_1",
        "conv2d_3",
    ]
    inp = keras.Input(SHAPE_2[1:])
    layers = [
        MultiHeadSelfAttention2D.yolov4_mhsa(),
        MultiHeadSelfAttention2D.yolov4_mhsa(),
    ]
    model = keras.Model(inp, layers[1](layers[0](inp)))
    dicts = []
    for block, layer in enumerate(layers):
        arrays = _creation_order(keras2, "two", block=block)
        layer.load_yolov4_mhsa_weights(arrays)
        dicts.append(_weight_dict(arrays))
    ref64, budget = _chain_budget(x, dicts)
    y = to_numpy(model(x))
    _assert_chain_within_budget(y, ref64, budget, "two stacked layers")
    _assert_chain_within_budget(keras2_y, ref64, budget, "two stacked tf_keras blocks")


# ---------------------------------------------------------------- mhsa_block
@pytest.mark.slow
def test_mhsa_block_four_stacked_on_unknown_spatial_size():
    inp = keras.Input((None, None, 16))
    y = inp
    for _ in range(4):
        y = mhsa_block(y, 16)  # the Keras 2 block's call signature
    assert tuple(y.shape) == (None, None, None, 16)
    model = keras.Model(inp, y)
    blocks = [
        layer for layer in model.layers if isinstance(layer, MultiHeadSelfAttention2D)
    ]
    assert len(blocks) == 4
    dicts = []
    for i, layer in enumerate(blocks):
        weights = reference.random_weights(16, position_encoding="conv", seed=10 + i)
        # Tame weights: four unscaled ReLU blocks in a row otherwise give
        # near one-hot softmaxes, whose float32 error is all luck.
        weights = {
            k: v * (0.5 if k.endswith("kernel") else 1.0) for k, v in weights.items()
        }
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


# ------------------------------------------------------ the deprecated name
def test_load_seed_weights_is_a_deprecated_alias():
    """The 0.1.0 name still loads the same weights, with a DeprecationWarning
    that names the new method."""
    arrays = yolov4_mhsa_arrays(8)
    new = MultiHeadSelfAttention2D.yolov4_mhsa()
    new.load_yolov4_mhsa_weights(arrays)
    old = MultiHeadSelfAttention2D.yolov4_mhsa()
    with pytest.warns(DeprecationWarning, match="load_yolov4_mhsa_weights"):
        old.load_seed_weights(arrays)
    expected = new.get_weight_dict()
    loaded = old.get_weight_dict()
    assert list(loaded) == list(expected)
    for name in expected:
        np.testing.assert_array_equal(loaded[name], expected[name], err_msg=name)
