"""Exports with symbolic sizes, as Keras's `model.export` traces them.

- `torch.export` with dynamic H and W (the path of Keras's LiteRT export from
  torch and of `format="torch"`): the layer must not pin the spatial size it
  was traced at. `position.resize_table` used to cast the symbolic length to
  a number, which specialised H and W ("Constraints violated (H, W)").
- `jax.export` with shape polymorphism (the path of Keras's SavedModel and
  OpenVINO exports from JAX, via jax2tf): every input gets sizes of its own
  ("a", "c"), so the attention mask's shape check must not compare symbols;
  and a symbolic N can be neither compared nor looped over: "auto" takes the
  full path there (its by-size choice once raised InconclusiveDimension),
  "chunked" is a ValueError naming `choice.fallback`, under which it exports.
  Swin's windows too: the padded size must be nh * wh to JAX (a crop to H
  of it was min(nh * wh, H), which the roll back's gather refused).
"""

import keras
import pytest

from harness import (
    LEARNED_ENCODINGS,
    assert_float32_within_budget,
    make_case,
    padded_mask,
    random_input,
)

BACKEND = keras.backend.backend()

# (position encoding, reference size of its tables)
CASES = [
    ("none", None),
    ("sinusoidal", None),
    *[(name, (5, 5)) for name in LEARNED_ENCODINGS],
    # Rotary: the tables computed in the graph (a grid normalised against
    # the reference size; learned per-head frequencies).
    ("rope", (5, 5)),
    ("rope_mixed", None),
]


@pytest.mark.skipif(BACKEND != "torch", reason="torch.export: the torch backend only")
@pytest.mark.parametrize("encoding, position_size", CASES, ids=[c[0] for c in CASES])
def test_torch_export_keeps_height_and_width_dynamic(encoding, position_size):
    import torch

    config = {"num_heads": 2, "position_encoding": encoding}
    if position_size:
        config["position_size"] = position_size
    layer, x, weights = make_case(config, (2, 6, 6, 8))
    inputs = keras.Input((None, None, 8))
    model = keras.Model(inputs, layer(inputs))
    height, width = (
        torch.export.Dim("H", min=2, max=64),
        torch.export.Dim("W", min=2, max=64),
    )
    program = torch.export.export(
        model,
        (torch.from_numpy(x),),
        dynamic_shapes=(({1: height, 2: width},),),
        strict=False,
    )
    for seed, shape in enumerate(
        [(2, 5, 5, 8), (2, 7, 4, 8)]
    ):  # the tables' size, another
        x = random_input(shape, seed=seed)
        with torch.no_grad():
            out = program.module()(torch.from_numpy(x)).numpy()
        assert_float32_within_budget(
            out, x, weights, layer.get_config(), what=f"exported at {shape}"
        )


@pytest.mark.skipif(
    BACKEND != "torch", reason="ONNX from torch: the torch backend only"
)
def test_onnx_export_from_torch_without_a_signature(tmp_path):
    """`model.export(format="onnx")` with no input_signature traces the
    model at size 1 for each None dimension and keeps the sizes dynamic in
    the artifact. The full path branched on a size-1 key axis (a shortcut
    for the softmax), so the exported graph gave every key weight 1 at every
    size (max error 11.8 on this case); the artifact must compute the layer."""
    import warnings

    import torch

    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")

    config = {"num_heads": 2, "attention_implementation": "full"}
    layer, x, weights = make_case(config, (2, 5, 5, 8))
    inputs = keras.Input((None, None, 8))
    model = keras.Model(inputs, layer(inputs))
    model(x)  # Keras exports only a model that was called
    path = tmp_path / "model.onnx"
    with warnings.catch_warnings():
        # The legacy TorchScript tracer of Keras's torch ONNX export warns on
        # every Python value it records as a constant: expected, and what
        # this test is about (the artifact must compute the layer anyway).
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        model.export(str(path), format="onnx", verbose=False)
    session = ort.InferenceSession(str(path))
    name = session.get_inputs()[0].name
    for seed, shape in enumerate([(2, 5, 5, 8), (1, 4, 7, 8)]):
        x = random_input(shape, seed=seed)
        (out,) = session.run(None, {name: x})
        assert_float32_within_budget(
            out, x, weights, layer.get_config(), what=f"ONNX artifact at {shape}"
        )


@pytest.mark.skipif(BACKEND != "jax", reason="jax.export: the JAX backend only")
def test_jax_export_with_a_mask_of_its_own_symbolic_sizes():
    import jax
    import numpy as np

    config = {"num_heads": 2, "position_encoding": "sinusoidal"}
    layer, x, weights = make_case(config, (2, 5, 6, 8))
    b, h, w, h2, w2 = jax.export.symbolic_shape("b, h, w, h2, w2")
    exported = jax.export.export(jax.jit(lambda x, m: layer(x, attention_mask=m)))(
        jax.ShapeDtypeStruct((b, h, w, 8), np.float32),
        jax.ShapeDtypeStruct((b, h2, w2), np.bool_),
    )
    for seed, (batch, height, width) in enumerate([(2, 5, 6), (1, 7, 4)]):
        x = random_input((batch, height, width, 8), seed=seed)
        mask = padded_mask(batch, height, width)
        out = np.asarray(exported.call(x, mask))
        assert_float32_within_budget(
            out,
            x,
            weights,
            layer.get_config(),
            attention_mask=mask,
            what=f"exported, at {x.shape}",
        )


@pytest.mark.skipif(BACKEND != "jax", reason="jax.export: the JAX backend only")
def test_jax_export_of_the_chunked_path_falls_back_to_full_when_asked():
    """Symbolic sizes cannot be looped over: "chunked" is a ValueError that
    names `choice.fallback`; within it the artifact is the full path's and
    runs at any size ("auto" takes the full path by itself there)."""
    import jax
    import numpy as np

    from mhsa_core.layers.attention import choice

    config = {
        "num_heads": 2,
        "position_encoding": "relative",
        "position_size": (5, 5),
        "attention_implementation": "chunked",
        "chunk_size": 7,
    }
    layer, _, weights = make_case(config, (2, 5, 5, 8))
    b, h, w = jax.export.symbolic_shape("b, h, w")
    spec = jax.ShapeDtypeStruct((b, h, w, 8), np.float32)
    with pytest.raises(ValueError, match=r"choice\.fallback\('chunked'\)"):
        jax.export.export(jax.jit(layer))(spec)
    with choice.fallback("chunked") as record:
        exported = jax.export.export(jax.jit(layer))(spec)
    assert record.taken == {"chunked"}
    for seed, shape in enumerate([(2, 5, 5, 8), (1, 7, 4, 8)]):
        x = random_input(shape, seed=seed)
        assert_float32_within_budget(
            np.asarray(exported.call(x)),
            x,
            weights,
            layer.get_config(),
            what=f"exported, at {shape}",
        )


@pytest.mark.skipif(BACKEND != "jax", reason="jax.export: the JAX backend only")
def test_jax_export_of_shifted_windows_at_a_padded_and_a_whole_size():
    """Shifted 3x3 windows with Swin's bias, exported with symbolic sizes
    (the path of Keras's SavedModel export from JAX), run at a map padded
    to whole windows (7x5 -> 9x6) and at one window (no shift)."""
    import jax
    import numpy as np

    config = {
        "num_heads": 2,
        "position_encoding": "relative_bias",
        "window_size": (3, 3),
        "shift_size": (1, 1),
    }
    layer, _, weights = make_case(config, (2, 7, 5, 8))
    b, h, w = jax.export.symbolic_shape("b, h, w")
    exported = jax.export.export(jax.jit(lambda x, m: layer(x, attention_mask=m)))(
        jax.ShapeDtypeStruct((b, h, w, 8), np.float32),
        jax.ShapeDtypeStruct((b, h, w), np.bool_),
    )
    for seed, (batch, height, width) in enumerate([(2, 7, 5), (3, 3, 3)]):
        x = random_input((batch, height, width, 8), seed=seed)
        mask = padded_mask(batch, height, width)
        assert_float32_within_budget(
            np.asarray(exported.call(x, mask)),
            x,
            weights,
            layer.get_config(),
            attention_mask=mask,
            what=f"exported, at {x.shape}",
        )
