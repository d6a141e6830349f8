"""The export task of a backend worker: `model.export` in each requested
format, each artifact run in its own runtime (`runtime`, a fresh process).

What becomes of a format exported from a backend (`protocol.EXPORT_STATUSES`,
the reason in one line):
- "n/a": Keras 3.15 cannot export this format from this backend for any
  model (`NOT_SUPPORTED`, or an exporter error `KNOWN_LIMITS` recognises):
  not applicable, not a failure of the model;
- "skipped": a module the exporter or the runtime needs is not installed
  (`EXPORTER_MODULES`, `runtime.RUNTIME_MODULES`);
- "failed": the export raised otherwise (the model does not export where
  Keras supports the format), or the runtime could not load or run the
  artifact at some input variant: a failure;
- "ok": the artifact's outputs, judged by the matrix like the backends' own
  (the float64 oracle and its budgets).

Attention paths: where a format cannot take a path of our layer from a
backend (`PATH_FALLBACKS`, measured: the chunked path's loop), the model is
exported within `choice.fallback`, so that every call of the layer that
would take that path takes the full path; the cell says so when a call did.
Everywhere else the artifact keeps the layer's own path.

Dynamic sizes: the exporters that trace (Keras 3.15 with torch: ONNX,
OpenVINO, LiteRT) replace every None dimension by 1 and record Python-level
shape decisions at that size, so one artifact cannot serve every size. Those
are exported once per input variant with a static input signature of that
variant's shapes (`STATIC_EXPORTS`), and their cells say so. Every other
exporter gets the model's own signature (None dimensions stay dynamic) and
its one artifact runs at every variant.
"""

import contextlib
import importlib.util
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from mhsa_core import _subprocess
from mhsa_core._text import last_line
from mhsa_core.consistency import protocol, runtime
from mhsa_core.consistency.runtime import RUNTIME_MODULES

__all__ = [
    "EXTENSIONS",
    "NOT_SUPPORTED",
    "KNOWN_LIMITS",
    "EXPORTER_MODULES",
    "STATIC_EXPORTS",
    "PATH_FALLBACKS",
    "export_task",
]

EXTENSIONS = {
    "tf_saved_model": "",
    "onnx": ".onnx",
    "openvino": ".xml",
    "litert": ".tflite",
}

# (format, backend) -> why Keras 3.15 cannot export it, for any model.
NOT_SUPPORTED = {
    ("litert", "jax"): "Keras 3.15 exports LiteRT from tensorflow and torch only",
}
# (format, backend, text of the exporter's error) -> why, for any model:
# checked with a one-Dense model, which fails the same way.
KNOWN_LIMITS = [
    (
        "openvino",
        "jax",
        "XlaCallModule",
        "OpenVINO cannot convert jax2tf's XlaCallModule (Keras 3.15, any model)",
    ),
]
# (format, backend) -> the modules Keras's exporter imports.
EXPORTER_MODULES = {
    ("tf_saved_model", "tensorflow"): ("tensorflow",),
    ("tf_saved_model", "jax"): ("tensorflow",),
    ("tf_saved_model", "torch"): ("tensorflow", "torch_xla"),
    ("onnx", "tensorflow"): ("tf2onnx", "onnx"),
    ("onnx", "jax"): ("jax2onnx",),
    ("onnx", "torch"): ("onnx", "onnxscript"),
    ("openvino", "tensorflow"): ("openvino",),
    ("openvino", "jax"): ("openvino", "tensorflow"),
    ("openvino", "torch"): ("openvino",),
    ("litert", "tensorflow"): ("tensorflow",),
    ("litert", "torch"): ("litert_torch",),
}
# (format, backend) -> why it is exported once per input size.
STATIC_EXPORTS = {
    ("onnx", "torch"): "Keras 3.15 traces torch ONNX exports at fixed input shapes",
    (
        "openvino",
        "torch",
    ): "Keras 3.15 traces torch OpenVINO exports at fixed input shapes",
    ("litert", "torch"): "Keras 3.15 exports LiteRT from torch at fixed input shapes",
}
# The attention paths as `mhsa_core.layers.attention.choice` names them (that
# module imports Keras, which the parent process must not).
CHUNKED, BY_SIZE = "chunked", "full or chunked by size"
_TORCH_TRACE = (
    "torch's trace of the chunked path does not convert or run "
    "(int32/int64 shape values, aten::ravel)"
)
_SYMBOLIC = "jax2tf traces symbolic sizes, which the chunked path's loop cannot take"
# (format, backend) -> (the paths of our layer the exporter cannot take, why):
# the model is exported within `choice.fallback(*paths)` (those calls take
# the full path). Measured (Keras 3.15.1, TF 2.21, JAX 0.10.2, tf2onnx 1.17,
# OpenVINO 2026.4, ai-edge-litert 2.3): every other (format, backend) takes
# every path (tf2onnx converts the loop; LiteRT from torch traces it unrolled
# at fixed sizes; OpenVINO converts TensorFlow's by-size choice, whose loop
# sits in a cond branch, but not the chunked path alone). From torch, ONNX
# and OpenVINO trace the chunked path's loop unrolled too, but what they make
# of it does not run: ONNX Runtime rejects a Concat of int64 and int32 shape
# values (and a Squeeze of the relative term's gather); OpenVINO has no
# conversion rule for aten::ravel (Keras's torch `take`, in that gather).
PATH_FALLBACKS = {
    ("openvino", "tensorflow"): (
        (CHUNKED,),
        "OpenVINO cannot convert the chunked path's loop (TensorList ops)",
    ),
    ("litert", "tensorflow"): (
        (CHUNKED, BY_SIZE),
        "LiteRT runs the chunked path's loop only with the Flex delegate "
        "(TensorList ops)",
    ),
    ("tf_saved_model", "jax"): ((CHUNKED,), _SYMBOLIC),
    ("openvino", "jax"): ((CHUNKED,), _SYMBOLIC),
    ("onnx", "torch"): ((CHUNKED,), _TORCH_TRACE),
    ("openvino", "torch"): ((CHUNKED,), _TORCH_TRACE),
}
RUNTIME_TIMEOUT = 600.0  # seconds one artifact may take to load and run


def _missing(modules):
    return [m for m in modules if importlib.util.find_spec(m) is None]


def one_line(text, limit=240):
    """The most telling line of an error: its first non-empty line, or the
    line naming an unconverted op, shortened to `limit` characters."""
    lines = [line.strip() for line in str(text).splitlines() if line.strip()]
    if not lines:
        return ""
    for line in lines:
        if "No conversion rule" in line:
            return line[:limit]
    return lines[0][:limit]


def _signature(keras, xs, names):
    """A static input signature of one variant's arrays (`model.export`)."""
    specs = [
        keras.InputSpec(shape=x.shape, dtype=str(x.dtype), name=n)
        for x, n in zip(xs, names)
    ]
    return specs if len(specs) == 1 else [specs]


def _run_runtime(fmt, plan, names, work):
    """Runs every artifact of `plan` ([(path, signature, {v: arrays})]) in one
    fresh process of the format's runtime; {out_key(v): output}, or raises
    RuntimeError with the runtime's own last error line."""
    argv, outputs = [], []
    for path, _, runs in plan:
        inputs = work / f"{Path(path).name}-inputs.npz"
        out = work / f"{Path(path).name}-outputs.npz"
        np.savez(
            inputs,
            **{
                runtime.input_key(v, n): x
                for v, xs in runs.items()
                for n, x in zip(names, xs)
            },
        )
        argv += [str(path), str(inputs), str(out)]
        outputs.append(out)
    env = dict(os.environ)
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    process = _subprocess.Process(runtime.__name__, [fmt, *argv], env=env)
    try:
        if not process.wait(RUNTIME_TIMEOUT):
            process.kill()
            raise RuntimeError(f"the {fmt} runtime took over {RUNTIME_TIMEOUT:.0f} s")
        code, stderr = process.returncode, process.stderr_tail()
    finally:
        process.close()
    if code != 0 or not all(out.exists() for out in outputs):
        why = last_line(stderr, f"exit {code}")
        raise RuntimeError(f"runtime: {why}"[:240])
    results = {}
    for out in outputs:
        with np.load(out) as data:
            results.update({k: data[k] for k in data.files})
    return results


def _path_fallback(paths):
    """`choice.fallback(*paths)`, or a scope that changes nothing (None)."""
    if not paths:
        return contextlib.nullcontext(None)
    from mhsa_core.layers.attention import choice  # imports Keras: worker only

    return choice.fallback(*paths)


def _sizes(variants):
    return ", ".join("x".join(str(d) for d in xs[0].shape) for xs in variants.values())


def _export_format(runner, fmt, work, timings):
    """(status, scope, {export_key(fmt, v): output}) of one format."""
    keras = runner.keras
    me = keras.backend.backend()
    if (fmt, me) in NOT_SUPPORTED:
        return f"{protocol.EXPORT_NA}: {NOT_SUPPORTED[(fmt, me)]}", "", {}
    missing = _missing(EXPORTER_MODULES.get((fmt, me), ()) + (RUNTIME_MODULES[fmt],))
    if missing:
        return f"{protocol.EXPORT_SKIPPED}: needs {', '.join(missing)}", "", {}
    # The variants are in the model's input order: its input names for a model
    # case (given or made from the loaded model), the case's for a layer case.
    spec = runner.input_spec
    names = (
        list(spec.names)
        if spec is not None and spec.known
        else list(runner.case["input_names"])
    )
    variants = dict(enumerate(runner.variants))
    # [(artifact path, input signature or None: the model's own, the variants it runs)]
    if (fmt, me) in STATIC_EXPORTS:
        plan = [
            (
                work / f"case{runner.index}-{fmt}-v{v}{EXTENSIONS[fmt]}",
                _signature(keras, xs, names),
                {v: xs},
            )
            for v, xs in variants.items()
        ]
        scope = f"static export per size: {_sizes(variants)}"
    else:
        plan = [(work / f"case{runner.index}-{fmt}{EXTENSIONS[fmt]}", None, variants)]
        scope = ""
    start = time.perf_counter()
    paths, fallback_why = PATH_FALLBACKS.get((fmt, me), ((), ""))
    with _path_fallback(paths) as fallback:
        for path, signature, _ in plan:
            try:
                runner.model.export(
                    str(path), format=fmt, verbose=False, input_signature=signature
                )
            except Exception as e:  # noqa: BLE001 -- the exporter's own error, one line
                for limit_fmt, limit_backend, text, why in KNOWN_LIMITS:
                    if (fmt, me) == (limit_fmt, limit_backend) and text in str(e):
                        return f"{protocol.EXPORT_NA}: {why}", "", {}
                message = f"{type(e).__name__}: {one_line(e)}"
                return f"{protocol.EXPORT_FAILED}: export: {message}"[:300], scope, {}
    if fallback is not None and fallback.taken:
        scope = "; ".join(
            filter(None, [scope, f"exported on the full path: {fallback_why}"])
        )
    timings[f"{protocol.EXPORT}_{fmt}_seconds"] = time.perf_counter() - start
    start = time.perf_counter()
    try:
        outs = _run_runtime(fmt, plan, names, work)
    except RuntimeError as e:
        return f"{protocol.EXPORT_FAILED}: {e}", scope, {}
    timings[f"{protocol.EXPORT}_{fmt}_runtime_seconds"] = time.perf_counter() - start
    results = {
        protocol.export_key(fmt, v): outs[protocol.out_key(v)]
        for v in variants
        if protocol.out_key(v) in outs
    }
    return protocol.EXPORT_OK, scope, results


def export_task(runner, formats, timings=None):
    """The EXPORT task's results of one case (`worker._CaseRunner`) for
    `formats`: per format `export_status_key`, `export_note_key` (string
    arrays) and `export_key(fmt, v)` per variant that ran."""
    results = {}
    timings = {} if timings is None else timings
    work = runner.out_dir if runner.out_dir is not None else Path(tempfile.mkdtemp())
    for fmt in formats:
        status, scope, outputs = _export_format(runner, fmt, work, timings)
        results[protocol.export_status_key(fmt)] = np.asarray(status)
        results[protocol.export_note_key(fmt)] = np.asarray(scope)
        results.update(outputs)
    return results
