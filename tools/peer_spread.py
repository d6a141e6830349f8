"""How far apart correct backends' own float32 errors spread: the evidence for
`consistency.budgets.PEER_FACTOR` (docs/tolerances.md).

    KERAS_BACKEND=numpy python tools/peer_spread.py [--seeds 12]

Builds the YOLOv4-MHSA block stacked 4x (16 channels, 4 heads; ReLU and
linear projections) with `--seeds` random initialisations, runs the matrix's
gradient tasks (float32 and float64) on TensorFlow, torch and JAX at the two
input sizes a `--model` case gets (8x8 and 6x6), and prints for each draw
every backend's own float32-vs-float64 gradient error (max over all arrays,
as `budgets.peer_budgets` takes it) divided by the median over the backends:
the peer rule fails a correct backend when that ratio exceeds PEER_FACTOR.
"""

import argparse
import dataclasses
import tempfile
from pathlib import Path

import numpy as np

from mhsa_core.consistency import cases, protocol
from mhsa_core.consistency.budgets import PEER_FACTOR
from mhsa_core.consistency.runner import run_backends

BACKENDS = ["tensorflow", "torch", "jax"]


def _save_models(directory, seeds):
    import keras

    from mhsa_core import mhsa_block

    paths = {}
    for activation in ("relu", None):
        for seed in range(seeds):
            keras.utils.set_random_seed(seed)
            inputs = keras.Input((None, None, 16))
            x = inputs
            for _ in range(4):
                x = mhsa_block(x, 16, num_heads=4, scale=None, activation=activation)
            name = f"{activation or 'linear'}{seed}"
            paths[name] = Path(directory) / f"{name}.keras"
            keras.Model(inputs, x).save(paths[name])
    return paths


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=12)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        paths = _save_models(tmp, args.seeds)
        to_run = [
            dataclasses.replace(
                cases.model_case(p, name=n), tasks=(protocol.GRADS, protocol.GRADS64)
            )
            for n, p in paths.items()
        ]
        runs = run_backends(to_run, BACKENDS, portability=False)
    ratios = []
    for case in to_run:
        for v in range(2):
            own = {}
            for b in BACKENDS:
                g = runs[b].results[case.name][protocol.GRADS]
                g64 = runs[b].results[case.name][protocol.GRADS64]
                keys = [k for k in g if k.startswith((f"weight/{v}/", f"input/{v}/"))]
                own[b] = max(
                    float(np.max(np.abs(g[k].astype(np.float64) - g64[k])))
                    for k in keys
                )
            median = float(np.median(list(own.values())))
            draw = {b: e / median for b, e in own.items()}
            ratios.append(max(draw.values()))
            print(
                f"{case.name:10s} size {'8x8' if v == 0 else '6x6'}  "
                + "  ".join(f"{b} {r:5.2f}" for b, r in draw.items()),
                flush=True,
            )
    ratios = np.array(ratios)
    print(
        f"\n{len(ratios)} draws: largest own/median {ratios.max():.2f}; "
        f"draws above 4: {(ratios > 4).sum()}; above PEER_FACTOR={PEER_FACTOR:g}: "
        f"{(ratios > PEER_FACTOR).sum()}"
    )


if __name__ == "__main__":
    main()
