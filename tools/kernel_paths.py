"""Which environment knobs move a backend onto other CPU kernels: the evidence
for the other-kernels test lane (`make test-other-kernels`, docs/tolerances.md).

    .venv/bin/python tools/kernel_paths.py [--backends tensorflow,torch,jax]

Each knob (a set of environment variables, `KNOBS`) runs in a fresh process
per backend, which computes the outputs of the 0.1.0 compat fixtures
(tests/data/v0_1_0, both input sizes) and a 1250x512 @ 512x512 float32
matmul, and the NumPy float64 reference of each fixture (the oracle the tests
judge by). The parent compares every array bit for bit with the same process
run without the knob, and prints, per backend and knob, how many arrays
changed bits and the largest difference. A knob that changes nothing on this
machine is not evidence of anything here (it may be this machine's own code
path, or ignored).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "tests" / "data" / "v0_1_0"

# name: (the backends it is meant for, or None for all, environment)
KNOBS = {
    "torch ATEN avx2": (["torch"], {"ATEN_CPU_CAPABILITY": "avx2"}),
    "torch ATEN default": (["torch"], {"ATEN_CPU_CAPABILITY": "default"}),
    "MKL AVX2": (["torch"], {"MKL_ENABLE_INSTRUCTIONS": "AVX2"}),
    "MKL_CBWR COMPATIBLE": (["torch"], {"MKL_CBWR": "COMPATIBLE"}),
    "MKL_CBWR AVX2": (["torch"], {"MKL_CBWR": "AVX2"}),
    "oneDNN AVX2": (["tensorflow", "torch"], {"ONEDNN_MAX_CPU_ISA": "AVX2"}),
    "oneDNN SSE41": (["tensorflow", "torch"], {"ONEDNN_MAX_CPU_ISA": "SSE41"}),
    "oneDNN AVX512_CORE": (
        ["tensorflow", "torch"],
        {"ONEDNN_MAX_CPU_ISA": "AVX512_CORE"},
    ),
    "TF oneDNN off": (["tensorflow"], {"TF_ENABLE_ONEDNN_OPTS": "0"}),
    "XLA AVX2": (["jax", "tensorflow"], {"XLA_FLAGS": "--xla_cpu_max_isa=AVX2"}),
    "XLA AVX": (["jax", "tensorflow"], {"XLA_FLAGS": "--xla_cpu_max_isa=AVX"}),
    "XLA SSE4_2": (["jax", "tensorflow"], {"XLA_FLAGS": "--xla_cpu_max_isa=SSE4_2"}),
    "OpenBLAS Haswell": (None, {"OPENBLAS_CORETYPE": "Haswell"}),
    "OpenBLAS Sandybridge": (None, {"OPENBLAS_CORETYPE": "Sandybridge"}),
    "NumPy no AVX512": (
        None,
        {
            "NPY_DISABLE_CPU_FEATURES": (
                "AVX512F AVX512CD AVX512_SKX AVX512_CLX AVX512_CNL "
                "AVX512_ICL AVX512_SPR"
            )
        },
    ),
    "NumPy no AVX2": (
        None,
        {
            "NPY_DISABLE_CPU_FEATURES": (
                "AVX2 FMA3 AVX512F AVX512CD AVX512_SKX AVX512_CLX "
                "AVX512_CNL AVX512_ICL AVX512_SPR"
            )
        },
    ),
}


def compute(out_path: str) -> None:
    """The worker: this process's arrays, saved to `out_path` (.npz)."""
    if os.environ.get("KERAS_BACKEND") == "jax":
        os.environ.setdefault("JAX_ENABLE_X64", "1")
    import keras

    from mhsa_core import MultiHeadSelfAttention2D, reference

    backend = keras.backend.backend()
    arrays = {}
    rng = np.random.default_rng(0)
    a = rng.standard_normal((1250, 512)).astype("float32")
    b = rng.standard_normal((512, 512)).astype("float32")
    arrays["matmul"] = np.asarray(keras.ops.convert_to_numpy(keras.ops.matmul(a, b)))
    arrays["numpy_matmul"] = a.astype(np.float64) @ b.astype(np.float64)
    arrays["numpy_exp"] = np.exp(a)
    with np.load(DATA / f"outputs-{backend}.npz") as data:
        stored = {k: data[k] for k in data.files}
    for path in sorted(DATA.glob("*.keras")):
        model = keras.saving.load_model(path)
        layer = next(
            candidate
            for candidate in model.layers
            if isinstance(candidate, MultiHeadSelfAttention2D)
        )
        config = reference.reference_config(layer.get_config())
        weights = layer.get_weight_dict()
        for i in range(2):
            x = stored[f"{path.stem}/x/{i}"]
            arrays[f"{path.stem}/{i}"] = np.asarray(
                keras.ops.convert_to_numpy(model(x))
            )
            arrays[f"{path.stem}/{i}/ref64"] = reference.mhsa_forward(
                x, weights, **config
            )
    np.savez(out_path, **arrays)


def _run(backend: str, env_extra: dict, out: Path) -> dict | str:
    env = {
        **os.environ,
        "KERAS_BACKEND": backend,
        "TF_CPP_MIN_LOG_LEVEL": "2",
        **env_extra,
    }
    proc = subprocess.run(
        [sys.executable, __file__, "--worker", str(out)],
        env=env,
        capture_output=True,
        text=True,
    )
    if proc.returncode:
        return proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "failed"
    with np.load(out) as data:
        return {k: data[k] for k in data.files}


def compare(base: dict, other: dict) -> dict:
    """Per group (the backend's outputs, the NumPy reference, the matmuls):
    arrays that changed bits, of how many, and the largest difference."""
    groups = {}
    for key, want in base.items():
        group = (
            "reference"
            if key.endswith("ref64") or key.startswith("numpy")
            else "matmul"
            if key == "matmul"
            else "layer"
        )
        got = other[key]
        changed = not np.array_equal(got, want)
        diff = float(np.max(np.abs(got.astype(np.float64) - want))) if changed else 0.0
        g = groups.setdefault(group, {"changed": 0, "of": 0, "max_diff": 0.0})
        g["of"] += 1
        g["changed"] += changed
        g["max_diff"] = max(g["max_diff"], diff)
    return groups


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backends", default="tensorflow,torch,jax")
    parser.add_argument("--knobs", help="comma-separated names of KNOBS (default: all)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args(argv)
    if args.worker:
        compute(args.worker)
        return 0
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for backend in args.backends.split(","):
            base = _run(backend, {}, Path(tmp) / f"{backend}-base.npz")
            if isinstance(base, str):
                print(f"{backend}: native run failed: {base}")
                return 1
            for name, (backends, env) in KNOBS.items():
                if backends is not None and backend not in backends:
                    continue
                if args.knobs and name not in args.knobs.split(","):
                    continue
                other = _run(backend, env, Path(tmp) / f"{backend}-knob.npz")
                row = other if isinstance(other, str) else compare(base, other)
                results.setdefault(backend, {})[name] = row
                if isinstance(row, str):
                    print(f"{backend:10} {name:22} failed: {row}", flush=True)
                    continue
                cells = "  ".join(
                    f"{g} {v['changed']}/{v['of']} (max {v['max_diff']:.2g})"
                    for g, v in sorted(row.items())
                )
                print(f"{backend:10} {name:22} {cells}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
