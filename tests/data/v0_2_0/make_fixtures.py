"""Writes tests/data/v0_2_0/*.keras (saved by mhsa_core 0.2.0 = main at
0a48886, the last commit before issue 19's options) and, per backend, the
outputs that version computes on fixed inputs.

Run with 0.2.0 on the path, once per backend, tensorflow first (it saves):
    PYTHONPATH=<0.2.0 checkout>/src KERAS_BACKEND=... JAX_ENABLE_X64=1 \
        python make_fixtures.py DIR

0.2.0's defaults are standard scaled dot-product attention; these files
cover them, the preset of the Keras 2 block, and what 0.2.0 added after
0.1.0's files: the attention paths as stored settings (chunked with a chunk
size, fused), the "conv" encoding, and a float64 file of the new defaults.
"""

import sys
import zlib
from pathlib import Path

import keras
import numpy as np

from mhsa_core import MultiHeadSelfAttention2D

OUT = Path(sys.argv[1])
OUT.mkdir(parents=True, exist_ok=True)
backend = keras.backend.backend()
C = 16
FIXTURES = {
    # name: (layer config or preset name, the saved model's input shape, dtype)
    "defaults": ({}, (None, None, C), "float32"),
    "yolov4_mhsa": ("yolov4_mhsa", (None, None, C), "float32"),
    "relative_chunked": (
        {
            "num_heads": 2,
            "position_encoding": "relative",
            "position_size": (5, 4),
            "attention_implementation": "chunked",
            "chunk_size": 7,
        },
        (None, None, C),
        "float32",
    ),
    "absolute_fused_channels_first": (
        {
            "num_heads": 4,
            "position_encoding": "absolute",
            "position_size": (5, 4),
            "attention_implementation": "fused",
            "data_format": "channels_first",
        },
        (C, None, None),
        "float32",
    ),
    "sinusoidal_gelu": (
        {"num_heads": 2, "position_encoding": "sinusoidal", "activation": "gelu"},
        (None, None, C),
        "float32",
    ),
    "botnet": ("botnet", (None, None, C), "float32"),
    "defaults_float64": ({"num_heads": 2}, (None, None, C), "float64"),
}
SIZES = [(5, 4), (3, 7)]  # the reference size of the tables, and another


def build(name):
    config, shape, dtype = FIXTURES[name]
    if config == "botnet":
        layer = MultiHeadSelfAttention2D.botnet(
            num_heads=4, position_size=(5, 4), dtype=dtype, name="mhsa"
        )
    elif config == "yolov4_mhsa":
        layer = MultiHeadSelfAttention2D.yolov4_mhsa(dtype=dtype, name="mhsa")
    else:
        layer = MultiHeadSelfAttention2D(**config, dtype=dtype, name="mhsa")
    inp = keras.Input(shape, dtype=dtype)
    model = keras.Model(inp, layer(inp), name=name)
    return model, layer


def inputs(name):
    config, shape, dtype = FIXTURES[name]
    rng = np.random.default_rng(123)
    xs = []
    for h, w in SIZES:
        s = (2, C, h, w) if shape[0] == C else (2, h, w, C)
        xs.append(rng.standard_normal(s).astype(dtype))
    return xs


results = {}
for name in FIXTURES:
    path = OUT / f"{name}.keras"
    if backend == "tensorflow" and not path.exists():
        keras.utils.set_random_seed(7)
        model, layer = build(name)
        # Weights from NumPy, so the fixture does not depend on a backend's RNG.
        rng = np.random.default_rng(zlib.crc32(name.encode()))
        for v in layer.weights:
            v.assign((rng.standard_normal(v.shape) * 0.3).astype(v.dtype))
        model.save(path)
    model = keras.saving.load_model(path)
    for i, x in enumerate(inputs(name)):
        results[f"{name}/x/{i}"] = x
        results[f"{name}/out/{i}"] = np.asarray(keras.ops.convert_to_numpy(model(x)))
    for j, w in enumerate(model.get_weights()):
        results[f"{name}/weight/{j}"] = w
np.savez(OUT / f"outputs-{backend}.npz", **results)
print(backend, "ok", len(results))
