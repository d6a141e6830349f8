"""Another machine on this one: environment settings that force the CPU
kernels of each framework (and of NumPy's BLAS) onto other code paths.

Float results are not bit-reproducible across CPU models: BLAS, oneDNN, XLA
and NumPy pick their kernels, and with them the summation order, by the
instruction set and the cache sizes. `make test` runs the tests marked
`machine_sensitive` again under each setting here, one pytest process per
(setting, backend), as a user's machine with other kernels would run them;
`tests/layers/test_other_kernels.py` checks that each backend's bits really
move under at least one setting (else the lane proves nothing).

Only knobs measured to change bits on the project's machine are used
(`tools/kernel_paths.py` measures them; the table is in docs/tolerances.md).
Two settings, because a knob can move a machine onto another machine's path
as well as off it (torch with ATEN_CPU_CAPABILITY=avx2 reproduced the 0.1.0
fixtures' bits on one machine), so no single setting is "other" everywhere.

    python tests/kernels.py SETTING -- COMMAND...   runs COMMAND under SETTING
    python tests/kernels.py --outputs OUT.npz       (worker) the compat outputs
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

# The environment variable the lane sets to the setting's name, so that a
# test can tell it runs on forced kernels.
ACTIVE = "MHSA_CORE_KERNELS"

SETTINGS = {
    # AVX2-era kernels: torch's AVX2 ATen kernels and MKL's AVX2 path, oneDNN
    # capped at AVX2 (torch's convs), TensorFlow on Eigen instead of oneDNN.
    "avx2": {
        "ATEN_CPU_CAPABILITY": "avx2",
        "MKL_CBWR": "AVX2",
        "ONEDNN_MAX_CPU_ISA": "AVX2",
        "TF_ENABLE_ONEDNN_OPTS": "0",
    },
    # AVX-era and older kernels: torch's unvectorised ATen kernels and MKL's
    # compatible path, XLA's generated code at AVX, NumPy's OpenBLAS on
    # Sandybridge kernels (the float64 oracle's own bits move). TensorFlow
    # keeps its native oneDNN here: capping oneDNN below AVX512_CORE crashes
    # TensorFlow 2.21's bfloat16 matmul (a segfault, measured), and
    # AVX512_CORE changed no bits; XLA at SSE4_2 cannot compile float16
    # conversions (missing __truncsfhf2).
    "avx": {
        "ATEN_CPU_CAPABILITY": "default",
        "MKL_CBWR": "COMPATIBLE",
        "XLA_FLAGS": "--xla_cpu_max_isa=AVX",
        "OPENBLAS_CORETYPE": "Sandybridge",
    },
}


def environment(setting: str, base: dict | None = None) -> dict:
    """`base` (os.environ by default) with `setting`'s variables; XLA_FLAGS
    are appended to, not replaced."""
    if setting not in SETTINGS:
        raise ValueError(
            f"Unknown kernel setting. Expected one of {sorted(SETTINGS)}. "
            f"Received: setting={setting!r}"
        )
    env = dict(os.environ if base is None else base)
    for key, value in SETTINGS[setting].items():
        if key == "XLA_FLAGS" and env.get(key):
            value = f"{env[key]} {value}"
        env[key] = value
    env[ACTIVE] = setting
    return env


def compat_outputs() -> dict:
    """The outputs of the 0.1.0 compat files (tests/data/v0_1_0) at both sizes,
    computed by this process's backend."""
    import keras
    import numpy as np

    import mhsa_core  # noqa: F401 -- registers the layer for load_model

    data = Path(__file__).resolve().parent / "data" / "v0_1_0"
    with np.load(data / f"outputs-{keras.backend.backend()}.npz") as stored:
        xs = {k: stored[k] for k in stored.files if "/x/" in k}
    outputs = {}
    for path in sorted(data.glob("*.keras")):
        model = keras.saving.load_model(path)
        for i in range(2):
            out = model(xs[f"{path.stem}/x/{i}"])
            outputs[f"{path.stem}/{i}"] = np.asarray(keras.ops.convert_to_numpy(out))
    return outputs


def _main(argv: list[str]) -> int:
    if argv[:1] == ["--outputs"] and len(argv) == 2:
        if os.environ.get("KERAS_BACKEND") == "jax":
            os.environ.setdefault("JAX_ENABLE_X64", "1")
        import numpy as np

        np.savez(argv[1], **compat_outputs())
        return 0
    if len(argv) >= 3 and argv[1] == "--":
        try:
            env = environment(argv[0])
        except ValueError as error:
            print(f"kernels.py: {error}", file=sys.stderr)
            return 2
        os.execvpe(argv[2], argv[2:], env)
    print(
        "usage: python tests/kernels.py SETTING -- COMMAND... | --outputs OUT.npz",
        file=sys.stderr,
    )
    return 2


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
