"""Writes tests/data/v0_1_0/*.keras (saved by mhsa_core 0.1.0 = main at e68d6ef)
and, per backend, the outputs that version computes on fixed inputs.

Run with 0.1.0 on the path, once per backend, tensorflow first (it saves):
    PYTHONPATH=<0.1.0 checkout>/src KERAS_BACKEND=... JAX_ENABLE_X64=1 \
        python make_fixtures.py DIR

0.1.0 called the Keras 2 YOLOv4-MHSA block "the seed": the files it wrote as
seed_defaults.keras and seed_float64.keras (and their keys in the .npz files)
were renamed yolov4_mhsa_defaults / yolov4_mhsa_float64 afterwards; the
model names inside the files are the original ones.
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
    # name: (layer config, spatial shape of the saved model's input, dtype)
    "seed_defaults": ({}, (None, None, C), "float32"),
    "multihead_channels_first": (
        {
            "num_heads": 4,
            "key_dim": 3,
            "data_format": "channels_first",
            "activation": "gelu",
        },
        (C, None, None),
        "float32",
    ),
    "none": (
        {
            "num_heads": 2,
            "position_encoding": "none",
            "scale": None,
            "activation": None,
        },
        (None, None, C),
        "float32",
    ),
    "relative": (
        {
            "num_heads": 2,
            "position_encoding": "relative",
            "position_size": (5, 4),
            "scale": None,
        },
        (None, None, C),
        "float32",
    ),
    "absolute": (
        {
            "num_heads": 2,
            "key_dim": 6,
            "position_encoding": "absolute",
            "position_size": (4, 5),
            "scale_position_logits": False,
            "scale": 0.5,
        },
        (None, None, C),
        "float32",
    ),
    "sinusoidal": (
        {"num_heads": 2, "position_encoding": "sinusoidal", "scale": None},
        (None, None, C),
        "float32",
    ),
    "botnet": ("botnet", (None, None, C), "float32"),
    "seed_float64": ({"num_heads": 2}, (None, None, C), "float64"),
}
SIZES = [(5, 4), (3, 7)]  # the reference size of the tables, and another


def build(name):
    config, shape, dtype = FIXTURES[name]
    if config == "botnet":
        layer = MultiHeadSelfAttention2D.botnet(
            num_heads=4, position_size=(5, 4), dtype=dtype, name="mhsa"
        )
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
