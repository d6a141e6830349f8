"""One bench measurement in a fresh process, printed as one JSON line.

    KERAS_BACKEND=torch python -m mhsa_core.bench.worker SPEC_JSON

SPEC_JSON: {"measurement": Measurement fields, "config": BenchConfig fields,
"repeats": R}. In this order, in this one process:

1. the backend's own float32 matmul rate at the block's projection shape,
   (B*N, C) @ (C, C) (`engines`): the ceiling the row is a percentage of;
2. the peak-memory mark (`memory.PeakMemory.start`), then the inputs, the
   subject (`subjects`) and its step in the row's mode and direction;
3. the first call (compiles, timed apart as `first_ms`), then R timed
   calls: the row's time is their median;
4. the peak resident-set growth since 2.;
5. where B * heads * N * K <= `CHECK_MAX_LOGITS` (K keys per query: N, or
   the window's) and the subject is the block
   itself (the layer, the native, timm's peer; not Keras's
   MultiHeadAttention), the forward output of the last
   call against the float64 NumPy reference, by the reference's own budget
   rule (`mhsa_core.reference.error_budget`): error <= budget.

The JSON line is written to the process's original stdout; everything the
frameworks print goes to stderr. A step that raises is a result too
("failed", "unsupported", "skipped" (a module it needs is not installed)
or "out of memory" with the exception's line).
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
import traceback

import numpy as np

from mhsa_core.bench.configs import BenchConfig
from mhsa_core.bench.memory import PeakMemory
from mhsa_core.bench.plan import Measurement

CHECK_MAX_LOGITS = (
    4_000_000  # the legacy config's 781k is checked; N = 4096's 268M is not
)
# Calls between the first (compiling, timed apart) and the timed ones: none;
# the median of the repeats absorbs a slow second call.
WARMUP_CALLS = 0

OK, FAILED, UNSUPPORTED, OUT_OF_MEMORY, TIMEOUT, SKIPPED = (
    "ok",
    "failed",
    "unsupported",
    "out of memory",
    "timeout",
    "skipped",
)
STATUSES = (OK, FAILED, UNSUPPORTED, OUT_OF_MEMORY, TIMEOUT, SKIPPED)

# How the frameworks spell running out of memory (TF, XLA, torch).
_OOM_TEXTS = (
    "ResourceExhausted",
    "RESOURCE_EXHAUSTED",
    "OOM when allocating",
    "out of memory",
    "Out of memory",
    "can't allocate memory",
    "not enough memory",
    "std::bad_alloc",
)


def inputs(config: BenchConfig):
    """(x, cotangent, weights): NumPy float32, the same in every worker."""
    from mhsa_core.reference import schema

    rng = np.random.default_rng(0)
    x = rng.standard_normal(config.input_shape).astype(np.float32)
    cotangent = rng.standard_normal(config.input_shape).astype(np.float32)
    position_size = None
    if schema.encoding(config.position_encoding).learned_tables:
        position_size = config.position_size
    weights = schema.random_weights(
        config.channels,
        config.num_heads,
        None,
        config.position_encoding,
        True,
        seed=1,
        dtype=np.float32,
        position_size=position_size,
        kv_reduction=config.kv_reduction or None,
    )
    return x, cotangent, weights


def _check(config, x, weights, out):
    """The forward output against the float64 reference: {error, budget, passed}."""
    from mhsa_core import reference

    ref64, budget, _ = reference.error_budget(x, weights, **config.layer_config)
    error = reference.max_abs(out, ref64)
    return {"error": error, "budget": budget, "passed": bool(error <= budget)}


def measure(measurement: Measurement, config: BenchConfig, repeats: int) -> dict:
    """The row's result (module docstring); raises what the subject raises."""
    import keras  # noqa: F401  (the backend is KERAS_BACKEND, fixed now)

    from mhsa_core.bench import subjects
    from mhsa_core.bench.engines import ENGINES

    engine = ENGINES[measurement.backend]()
    result = {"framework_version": engine.version(), "ceiling_op": engine.ceiling_op}
    rows = config.batch * config.tokens
    result["ceiling_gflops"] = engine.ceiling_gflops(rows, config.channels)

    x, cotangent, weights = inputs(config)
    memory = PeakMemory()
    memory.start()
    engine.set_inputs(x, cotangent)
    subject = subjects.build(
        measurement.backend, config, measurement.path, weights, engine.x
    )
    step = engine.step(subject, measurement.mode, measurement.direction)
    start = time.perf_counter()
    out = step()
    result["first_ms"] = (time.perf_counter() - start) * 1e3
    for _ in range(WARMUP_CALLS):
        out = step()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = step()
        times.append((time.perf_counter() - start) * 1e3)
    result.update(
        status=OK,
        ms=statistics.median(times),
        times_ms=times,
        peak_gb=memory.growth_gb(),
        memory_exact=memory.exact,
        chosen_path=subject.chosen_path,
        chunk_size=subject.chunk_size,
        note=subject.note,
    )
    logits = config.batch * config.num_heads * config.tokens * config.keys
    result["check"] = None
    if subject.same_block and logits <= CHECK_MAX_LOGITS:
        result["check"] = _check(config, x, weights, engine.to_numpy(out))
    return result


def classify(error: BaseException) -> tuple[str, str]:
    """(status, one-line reason) of an exception raised by a measurement."""
    from mhsa_core.bench.subjects import Skipped, Unsupported

    line = f"{type(error).__name__}: {error}".strip().splitlines()[0][:300]
    if isinstance(error, Unsupported):
        return UNSUPPORTED, str(error).splitlines()[0][:300]
    if isinstance(error, Skipped):
        return SKIPPED, str(error).splitlines()[0][:300]
    text = f"{type(error).__name__} {error}"
    if isinstance(error, MemoryError) or any(t in text for t in _OOM_TEXTS):
        return OUT_OF_MEMORY, line
    return FAILED, line


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    # The JSON line goes to the original stdout; whatever the frameworks print
    # (to fd 1 too) goes to stderr.
    result_fd = os.dup(1)
    os.dup2(2, 1)
    try:
        spec = json.loads(argv[0])
        measurement = Measurement(**spec["measurement"])
        config = BenchConfig.from_json(spec["config"])
        result = measure(measurement, config, int(spec["repeats"]))
    except BaseException as e:  # noqa: BLE001  (every failure is a row)
        traceback.print_exc()
        status, reason = classify(e)
        result = {"status": status, "reason": reason}
    sys.stdout.flush()
    os.write(result_fd, (json.dumps(result, allow_nan=False) + "\n").encode())
    os.close(result_fd)
    return 0


if __name__ == "__main__":
    sys.exit(main())
