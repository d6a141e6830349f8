"""How far a correct backend's int8-quantized float32 run strays from its
float64 twin: the evidence for `consistency.budgets.INT8_STEP`
(docs/tolerances.md).

    python tools/quant_spread.py [--seeds 200] [--backends tensorflow,torch,jax]

For each seed, the matrix's built-in "int8" layer (the legacy block's
position conv, q/k/v and the output projection, 32 channels, 2 heads) gets
random weights, is quantized with `model.quantize("int8")` and run at 2x4x5
in float32, and its float64 twin (`consistency.float64.float64_clone`: the
same integers and scales) on the same input. Prints per backend (each in a
process of its own) the error relative to max|twin|: its median, 99th
percentile and maximum; the draws above 1e-5 (a rounding flip of the
activation quantizer: float32 rounding alone stays near 1e-7) and the
largest of them in units of the slack (INT8_STEP x max|twin|); and, for
scale, how far the float (unquantized) layer is from the twin (what
quantization itself changes).
"""

import argparse
import json
import os
import subprocess
import sys

import numpy as np

_WORKER = r"""
import json, sys
import numpy as np
import keras
from mhsa_core import MultiHeadSelfAttention2D
from mhsa_core.consistency.float64 import float64_clone

seeds = int(sys.argv[1])
rows = []
for seed in range(seeds):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((2, 4, 5, 32)).astype("float32")
    inputs = keras.Input((None, None, 32))
    layer = MultiHeadSelfAttention2D(
        num_heads=2, position_encoding="conv", output_dense=True, seed=seed
    )
    model = keras.Model(inputs, layer(inputs))
    layer.set_weight_dict(
        {
            k: (rng.standard_normal(v.shape) / np.sqrt(v.shape[0])).astype("float32")
            for k, v in layer.get_weight_dict().items()
        }
    )
    float_out = keras.ops.convert_to_numpy(model(x)).astype(np.float64)
    layer.quantize("int8")
    out32 = keras.ops.convert_to_numpy(model(x)).astype(np.float64)
    out64 = keras.ops.convert_to_numpy(float64_clone(model)(x.astype(np.float64)))
    size = float(np.max(np.abs(out64)))
    rows.append(
        [
            float(np.max(np.abs(out32 - out64))) / size,
            float(np.max(np.abs(float_out - out64))) / size,
        ]
    )
print("ROWS" + json.dumps(rows))
"""


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=200)
    parser.add_argument("--backends", default="tensorflow,torch,jax")
    args = parser.parse_args()
    from mhsa_core.consistency.budgets import INT8_STEP

    for backend in args.backends.split(","):
        env = {**os.environ, "KERAS_BACKEND": backend, "JAX_ENABLE_X64": "1"}
        done = subprocess.run(
            [sys.executable, "-c", _WORKER, str(args.seeds)],
            env=env,
            capture_output=True,
            text=True,
            check=True,
        )
        line = next(s for s in done.stdout.splitlines() if s.startswith("ROWS"))
        rows = np.array(json.loads(line[4:]))
        error, effect = rows[:, 0], rows[:, 1]
        flips = error[error > 1e-5]
        largest = (
            f", largest {flips.max() / INT8_STEP:.2f} x INT8_STEP" if len(flips) else ""
        )
        print(
            f"{backend:10s} float32 vs twin: median {np.median(error):.2g}, "
            f"p99 {np.quantile(error, 0.99):.2g}, max {error.max():.2g}; "
            f"flips {len(flips)}/{len(error)}"
            + largest
            + f"; quantization itself: median {np.median(effect):.2g}, "
            f"min {effect.min():.2g} ({effect.min() / INT8_STEP:.2f} x INT8_STEP)"
        )


if __name__ == "__main__":
    main()
