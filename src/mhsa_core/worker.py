"""Worker of the cross-backend runner: `python -m mhsa_core.worker JOB_DIR OUT_DIR`.

Runs every case of JOB_DIR/job.json under the backend of this process
(KERAS_BACKEND) and writes OUT_DIR/result{i}.npz per case and
OUT_DIR/result.json. A case that raises is recorded with its traceback and the
worker goes on with the next one. See `mhsa_core.runner`.
"""

import json
import os
import sys
import time
import traceback
from pathlib import Path

import numpy as np

_TIMED_REPEATS = 3


def _forward(layer, inputs, keras):
    """Output, and the best of a few timed calls after a warm-up call."""
    x = inputs["x"]
    kwargs = {}
    if "attention_mask" in inputs:
        kwargs["attention_mask"] = inputs["attention_mask"]
    out = layer(x, **kwargs)  # warm-up (and build)
    seconds = []
    for _ in range(_TIMED_REPEATS):
        start = time.perf_counter()
        out = keras.ops.convert_to_numpy(layer(x, **kwargs))
        seconds.append(time.perf_counter() - start)
    return {"output": _portable(out)}, {
        "forward_seconds": min(seconds),
        "output_dtype": str(out.dtype),
    }


def _portable(array):
    """An array .npz can hold: bfloat16 (an ml_dtypes type) becomes float32, exactly."""
    array = np.asarray(array)
    if array.dtype.name == "bfloat16":
        array = array.astype(np.float32)
    return array


_TASKS = {"forward": _forward}


def _run_case(case, arrays, keras):
    from mhsa_core import MultiHeadSelfAttention2D

    inputs = {k.split(":", 1)[1]: v for k, v in arrays.items() if k.startswith("input:")}
    weights = {k.split(":", 1)[1]: v for k, v in arrays.items() if k.startswith("weight:")}
    layer = MultiHeadSelfAttention2D(**case["config"], dtype=case["dtype"])
    layer.build(inputs["x"].shape)
    layer.set_weight_dict(weights)
    results, timings = {}, {}
    for task in case["tasks"]:
        out, info = _TASKS[task](layer, inputs, keras)
        results.update(out)
        timings.update(info)
    return results, timings


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    job_dir, out_dir = Path(argv[0]), Path(argv[1])
    import keras

    job = json.loads((job_dir / "job.json").read_text())
    info = {
        "backend": keras.backend.backend(),
        "keras_version": keras.__version__,
        "pid": os.getpid(),
        "timings": {},
        "case_errors": {},
    }
    framework = info["backend"]
    try:
        info["framework_version"] = __import__(framework).__version__
    except (ImportError, AttributeError):
        info["framework_version"] = None
    for i, case in enumerate(job["cases"]):
        try:
            with np.load(job_dir / case["file"]) as data:
                arrays = {k: data[k] for k in data.files}
            results, timings = _run_case(case, arrays, keras)
            np.savez(out_dir / f"result{i}.npz", **results)
            info["timings"][case["name"]] = timings
        except Exception:  # noqa: BLE001 -- reported per case, the run goes on
            info["case_errors"][case["name"]] = traceback.format_exc()[-3000:]
    # Written last and atomically: its presence means the worker finished.
    tmp = out_dir / "result.json.tmp"
    tmp.write_text(json.dumps(info, indent=1))
    os.replace(tmp, out_dir / "result.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
