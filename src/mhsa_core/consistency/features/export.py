"""Export parity: is the model still the same model where it is deployed?

An opt-in feature (`FEATURE`, `base.Feature`): `mhsa-core matrix --export
FORMATS` (`run_matrix(..., export=[...])`). Its worker half, task EXPORT:
`model.export` in each requested format, each artifact run in its own
runtime (`runtime`, a fresh process without Keras). Its parent half: a row
per format ("onnx export"), a cell per exporting backend, judged like the
backends' forward cells (`CaseContext.forward`: the same oracle and
budgets), and the cells' reasons and scopes in full after the errors.

What becomes of a format exported from a backend (`EXPORT_STATUSES`, the
reason in one line):
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
backend (`path_fallbacks`, measured: the chunked path's loop), the model is
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
import dataclasses
import importlib.util
import os
import time

import numpy as np

from mhsa_core import _subprocess
from mhsa_core._text import last_line
from mhsa_core.consistency import protocol, runtime
from mhsa_core.consistency.checks import Check, judge_quantized
from mhsa_core.consistency.features.base import Feature
from mhsa_core.consistency.protocol import FORWARD, FORWARD64
from mhsa_core.consistency.report import Cell
from mhsa_core.consistency.runtime import RUNTIME_MODULES

__all__ = [
    "FEATURE",
    "NAME",
    "ExportOptions",
    "EXPORT",
    "EXPORT_FORMATS",
    "EXPORT_STATUSES",
    "export_key",
    "export_status_key",
    "export_note_key",
    "validate_formats",
    "EXTENSIONS",
    "NOT_SUPPORTED",
    "KNOWN_LIMITS",
    "EXPORTER_MODULES",
    "STATIC_EXPORTS",
    "path_fallbacks",
    "export_task",
]

NAME = "export"  # the feature's name (its options' key in `Case.features`)

# ------------------------------------------------------------ tasks and keys
# `model.export` in each format of the case's options, each artifact run in
# its own runtime.
EXPORT = "export"
# The formats of `keras.Model.export` the matrix runs in their own runtimes.
EXPORT_FORMATS = ("tf_saved_model", "onnx", "openvino", "litert")
EXPORT_OK = "ok"
EXPORT_NA = "n/a"  # the exporter does not support this backend (any model)
EXPORT_SKIPPED = "skipped"  # a module it needs is not installed
EXPORT_FAILED = "failed"  # the export or the runtime raised
EXPORT_STATUSES = (EXPORT_OK, EXPORT_NA, EXPORT_SKIPPED, EXPORT_FAILED)


def export_key(fmt, v):
    """The output of variant v of the artifact of format `fmt`, run in that
    format's runtime."""
    return f"{fmt}/out/{v}"


def export_status_key(fmt):
    """A string array, what became of format `fmt` (`EXPORT_STATUSES`: "ok",
    or "n/a", "skipped", "failed" then ": " and the reason in one line)."""
    return f"{fmt}/status"


def export_note_key(fmt):
    """A string array, the scope of the check when it is less than one
    artifact run at every variant (e.g. one static export per size), else ""."""
    return f"{fmt}/note"


def validate_formats(formats):
    """`formats` (a list, or a comma-separated string) as a tuple of
    `EXPORT_FORMATS`; ValueError naming an unknown one."""
    if isinstance(formats, str):
        formats = [f.strip() for f in formats.split(",") if f.strip()]
    formats = tuple(dict.fromkeys(formats or ()))
    unknown = [f for f in formats if f not in EXPORT_FORMATS]
    if unknown:
        raise ValueError(
            f"Received an invalid value for argument `export`, expected a subset of "
            f"{','.join(EXPORT_FORMATS)}. "
            f"Received: export={','.join(unknown)!r}"
        )
    return formats


EXTENSIONS = {
    "tf_saved_model": "",
    "onnx": ".onnx",
    "openvino": ".xml",
    "litert": ".tflite",
}

# (format, backend) -> why Keras 3.15 cannot export it, for any model (canary
# "litert-from-jax" in tests/canaries).
NOT_SUPPORTED = {
    ("litert", "jax"): "Keras 3.15 exports LiteRT from tensorflow and torch only",
}
# (format, backend, text of the exporter's error) -> why, for any model:
# checked with a one-Dense model, which fails the same way (canary
# "openvino-from-jax").
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
_TORCH_TRACE = (
    "torch's trace of the chunked path does not convert or run "
    "(int32/int64 shape values, aten::ravel)"
)
_SYMBOLIC = "jax2tf traces symbolic sizes, which the chunked path's loop cannot take"


def path_fallbacks():
    """{(format, backend): (the paths of our layer the exporter cannot take,
    why)}: the model is exported within `choice.fallback(*paths)` (those
    calls take the full path).

    Measured (Keras 3.15.1, TF 2.21, JAX 0.10.2, tf2onnx 1.17, OpenVINO
    2026.4, ai-edge-litert 2.3): every other (format, backend) takes every
    path (tf2onnx converts the loop; LiteRT from torch traces it unrolled at
    fixed sizes; OpenVINO converts TensorFlow's by-size choice, whose loop
    sits in a cond branch, but not the chunked path alone). From torch, ONNX
    and OpenVINO trace the chunked path's loop unrolled too, but what they
    make of it does not run: ONNX Runtime rejects a Concat of int64 and
    int32 shape values (and a Squeeze of the relative term's gather);
    OpenVINO has no conversion rule for aten::ravel (Keras's torch `take`, in
    that gather).

    The paths are `mhsa_core.layers.attention.choice`'s names, read from it:
    that module imports Keras, so the table is made where Keras is (the
    worker, a test), never in the parent process.
    """
    from mhsa_core.layers.attention.choice import BY_SIZE, CHUNKED

    return {
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


def _run_runtime(fmt, plan, names):
    """Runs every artifact of `plan` ([(path, signature, {v: arrays})]) in one
    fresh process of the format's runtime; {out_key(v): output}, or raises
    RuntimeError with the runtime's own last error line."""
    argv, outputs = [], []
    for path, _, runs in plan:
        inputs = path.with_name(f"{path.name}-inputs.npz")
        out = path.with_name(f"{path.name}-outputs.npz")
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


def _export_format(ctx, fmt, timings):
    """(status, scope, {export_key(fmt, v): output}) of one format."""
    keras = ctx.keras
    me = ctx.backend
    if (fmt, me) in NOT_SUPPORTED:
        return f"{EXPORT_NA}: {NOT_SUPPORTED[(fmt, me)]}", "", {}
    missing = _missing(EXPORTER_MODULES.get((fmt, me), ()) + (RUNTIME_MODULES[fmt],))
    if missing:
        return f"{EXPORT_SKIPPED}: needs {', '.join(missing)}", "", {}
    names = ctx.input_names  # the variants' order: the model's inputs
    variants = dict(enumerate(ctx.variants))
    # [(artifact path, input signature or None: the model's own, the variants it runs)]
    if (fmt, me) in STATIC_EXPORTS:
        plan = [
            (
                ctx.output_path(f"{fmt}-v{v}{EXTENSIONS[fmt]}"),
                _signature(keras, xs, names),
                {v: xs},
            )
            for v, xs in variants.items()
        ]
        scope = f"static export per size: {_sizes(variants)}"
    else:
        plan = [(ctx.output_path(f"{fmt}{EXTENSIONS[fmt]}"), None, variants)]
        scope = ""
    start = time.perf_counter()
    paths, fallback_why = path_fallbacks().get((fmt, me), ((), ""))
    with _path_fallback(paths) as fallback:
        for path, signature, _ in plan:
            try:
                ctx.model.export(
                    str(path), format=fmt, verbose=False, input_signature=signature
                )
            except Exception as e:  # noqa: BLE001 -- the exporter's own error, one line
                for limit_fmt, limit_backend, text, why in KNOWN_LIMITS:
                    if (fmt, me) == (limit_fmt, limit_backend) and text in str(e):
                        return f"{EXPORT_NA}: {why}", "", {}
                message = f"{type(e).__name__}: {one_line(e)}"
                return f"{EXPORT_FAILED}: export: {message}"[:300], scope, {}
    if fallback is not None and fallback.taken:
        scope = "; ".join(
            filter(None, [scope, f"exported on the full path: {fallback_why}"])
        )
    timings[f"{EXPORT}_{fmt}_seconds"] = time.perf_counter() - start
    start = time.perf_counter()
    try:
        outs = _run_runtime(fmt, plan, names)
    except RuntimeError as e:
        return f"{EXPORT_FAILED}: {e}", scope, {}
    timings[f"{EXPORT}_{fmt}_runtime_seconds"] = time.perf_counter() - start
    results = {
        export_key(fmt, v): outs[protocol.out_key(v)]
        for v in variants
        if protocol.out_key(v) in outs
    }
    return EXPORT_OK, scope, results


def export_task(ctx, options, timings):
    """Task EXPORT of one case (its `task_context.TaskContext`) for the
    formats of `options`: per format `export_status_key`, `export_note_key`
    (string arrays) and `export_key(fmt, v)` per variant that ran."""
    results = {}
    for fmt in options.export:
        status, scope, outputs = _export_format(ctx, fmt, timings)
        results[export_status_key(fmt)] = np.asarray(status)
        results[export_note_key(fmt)] = np.asarray(scope)
        results.update(outputs)
    return results


# =================================================================== parent
def judge_export(ctx, fmt):
    """The artifact of format `fmt` exported by each backend, run in its own
    runtime, against the forward oracle (`ctx`: a `checks.CaseContext`)."""
    cells = {}
    forward = ctx.forward
    for b, res in ctx.results(EXPORT).items():
        status = str(res.get(export_status_key(fmt), "failed: no result"))
        note = str(res.get(export_note_key(fmt), ""))
        if status.startswith((EXPORT_NA, EXPORT_SKIPPED)):
            cells[b] = Cell(passed=None, note=status)
        elif status != EXPORT_OK:
            cells[b] = Cell(passed=False, note=status, scope=note)
        elif forward.values is None:
            cells[b] = Cell(passed=False, note="no oracle: the backends' shapes differ")
        else:
            outputs = {
                protocol.out_key(v): res[export_key(fmt, v)]
                for v in range(ctx.variants)
                if export_key(fmt, v) in res
            }
            # The runtimes return the artifact's first output (their output
            # order is their own): a multi-output model is judged on output 0,
            # and the cell says so.
            first = [protocol.out_key(v) for v in range(ctx.variants)]
            if len(ctx.out_keys) > len(first):
                note = "; ".join(t for t in (note, "first output only") if t)
            cell = judge_quantized(outputs, forward, first)
            cells[b] = dataclasses.replace(cell, scope=note)
    for b in ctx.backends:  # the export task raised: the errors row has why
        if (
            b not in cells
            and b in ctx.runs
            and EXPORT in ctx.runs[b].errors.get(ctx.name, {})
        ):
            cells[b] = Cell(passed=False, note="export task failed")
    return cells


def _formats(case):
    """The formats a case exports (its options of this feature), in order."""
    options = case.features.get(NAME)
    return tuple(options.export) if options is not None else ()


# A row per format of the case ("onnx export"), a cell per exporting backend
# (numpy exports nothing).
CHECK = Check(
    "{} export",
    (EXPORT, FORWARD, FORWARD64),
    judge_export,
    backends="training",
    each=_formats,
)


@dataclasses.dataclass(frozen=True)
class ExportOptions:
    """export: the formats (`EXPORT_FORMATS`) every case is exported in."""

    export: tuple = ()


class _Export(Feature):
    name = NAME
    Options = ExportOptions
    tasks = {EXPORT: export_task}
    checks = (CHECK,)
    examples = (
        "mhsa-core matrix --model my_model.keras --export "
        "tf_saved_model,onnx,openvino,litert",
    )

    # Its own keywords only (`features.options` passes no other): narrower
    # than the base's **keywords on purpose.
    def options(self, *, rtol=None, export=()):  # type: ignore[override]
        return ExportOptions(validate_formats(export))

    def add_arguments(self, parser):
        parser.add_argument(
            "--export",
            metavar="FORMATS",
            help="also export the model from each backend in these formats "
            "(comma-separated: tf_saved_model,onnx,openvino,litert), run each "
            "artifact in its runtime and judge it like the backends "
            "(needs the `export` extra)",
        )

    def options_from_args(self, args):
        try:
            return ExportOptions(validate_formats(args.export or ""))
        except ValueError as e:
            raise ValueError(f"--export: {e}") from None

    def notes(self, report, options):
        """The export cells' reasons and scopes in full (the table cuts long
        ones)."""
        titles = {CHECK.title(f) for f in EXPORT_FORMATS}
        lines = [
            f"  {row.case} {row.check} from {backend}: "
            + "; ".join(
                t
                for t in (cell.note if cell.passed is not True else "", cell.scope)
                if t
            )
            for row in report.rows
            if row.check in titles
            for backend, cell in row.cells.items()
            if cell.scope or (cell.passed is not True and cell.note)
        ]
        return ["\n".join(["exports:", *lines])] if lines else []


FEATURE = _Export()
