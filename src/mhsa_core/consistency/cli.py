"""The consistency tool's commands of `mhsa-core` (`mhsa_core.cli`):

    mhsa-core matrix [--backends tensorflow,torch,jax,numpy] [--json PATH] [--quiet]
    mhsa-core matrix --model PATH.keras [--inputs PATH.npz] [--rtol R] [--unsafe]
                     [--import MODULE] [--locate]
                     [--steps K [--optimizer adam|sgd] [--plot PNG]]
    mhsa-core demo [--backends ...] [--size 25] [--batch 2] [--channels 512]
                   [--dtype float32]

`matrix` runs cases under each backend in its own process and checks that the
backends agree (`matrix`, `checks`): with no arguments the default cases of
our layer (`cases.default_cases`), with `--model` any saved Keras model.
`demo` runs only the forward pass of the Keras 2 YOLOv4-MHSA block and prints
per backend the shape, the time and the error against the float64 NumPy
reference, judged by `reference.budget`'s rule.

The parent process imports no framework (not even Keras): each backend runs
in a worker process of its own (`runner`, `worker`).

Exit status of `matrix`: 0 all backends agree (at least two ran); 1 a
disagreement beyond tolerance, a backend crashed, or fewer than two backends
ran; 2 bad usage, an unreadable model file, or inputs the model does not
accept.
"""

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from mhsa_core import reference
from mhsa_core._subprocess import unavailable_reason
from mhsa_core._text import format_table, last_line
from mhsa_core.consistency import cases, features, matrix, protocol
from mhsa_core.consistency.cases import Case
from mhsa_core.consistency.checks import ERRORS
from mhsa_core.consistency.protocol import BACKENDS, TRAINING_BACKENDS
from mhsa_core.consistency.report import cell_of, render, verdict
from mhsa_core.consistency.runner import run_backends
from mhsa_core.reference import schema

DEMO_CASE = "yolov4_mhsa"

MATRIX_DESCRIPTION = """\
Runs a model under each Keras backend, each in its own worker process, and
judges every result (forward in float32 and float64, jit, gradients, an SGD
and an Adam step, .keras files saved under one backend and loaded under the
others) against a float64 oracle with a budget. Each cell of the table is
error / budget: <= 1 passes. At least two backends must run: one backend
alone is reported, but not agreement.

With no --model: the built-in cases of the MultiHeadSelfAttention2D layer,
judged against the NumPy float64 reference."""

_EXAMPLES = (
    "mhsa-core matrix",
    "mhsa-core matrix --model my_model.keras --backends tensorflow,torch,jax",
    "mhsa-core matrix --model my_model.keras --inputs batch.npz --import my_layers",
    "mhsa-core matrix --model my_model.keras --json report.json",
    "mhsa-core matrix --model my_model.keras --json - --quiet | jq .verdict",
    # then each opt-in feature's (`Feature.examples`)
)
_EXIT_STATUS = """\
exit status:
  0  the backends agree: at least two ran, every cell within its budget
  1  a disagreement beyond budget, a backend's worker failed, or fewer than
     two backends ran (nothing was compared)
  2  bad usage: a bad argument, an unreadable model file, inputs the model
     does not accept"""


def matrix_epilog():
    """`mhsa-core matrix --help`'s examples (the opt-in features' after the
    others) and exit statuses."""
    examples = _EXAMPLES + tuple(e for f in features.FEATURES for e in f.examples)
    return "examples:\n" + "".join(f"  {e}\n" for e in examples) + "\n" + _EXIT_STATUS


class UsageError(Exception):
    """Bad usage found after parsing: `mhsa-core` prints it in one line and
    exits with status 2."""


def _backend_list(text):
    names = [b.strip() for b in text.split(",") if b.strip()]
    unknown = [b for b in names if b not in BACKENDS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"expected a comma-separated subset of {','.join(BACKENDS)}; "
            f"received: {text!r}"
        )
    return names


def _positive_int(text):
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(
            f"expected a positive integer; received: {text!r}"
        )
    return value


def _positive_float(text):
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise argparse.ArgumentTypeError(
            f"expected a positive number; received: {text!r}"
        )
    return value


def demo(args, out=None):
    """The Keras 2 YOLOv4-MHSA block's forward pass under each backend, judged
    by `reference.budget`'s rule against the float64 NumPy reference."""
    out = out or sys.stdout
    config = schema.preset("yolov4_mhsa")
    ref_config = reference.reference_config(config)
    rng = np.random.default_rng(0)
    shape = (args.batch, args.size, args.size, args.channels)
    array_dtype = np.float64 if args.dtype == "float64" else np.float32
    x = rng.standard_normal(shape).astype(array_dtype)
    weights = schema.random_weights(
        args.channels,
        config["num_heads"],
        config["key_dim"],
        config["position_encoding"],
        config["use_bias"],
        seed=1,
        dtype=array_dtype,
    )
    case = Case(
        DEMO_CASE, config=config, inputs={"x": x}, weights=weights, dtype=args.dtype
    )

    print(
        "mhsa-core demo: the Keras 2 YOLOv4-MHSA block (1 head, ReLU projections, "
        f"conv position term, scale 1.0) on a {'x'.join(map(str, shape))} map, "
        f"dtype {args.dtype}",
        file=out,
    )
    ref64, budget, base_error = reference.error_budget(
        x, weights, policy=args.dtype, **ref_config
    )
    start = time.perf_counter()
    reference.mhsa_forward(x, weights, dtype=np.float32, **ref_config)
    numpy_seconds = time.perf_counter() - start
    if base_error is None:
        rule = f"budget {budget:.2e} ({reference.FLOAT64_RTOL:g} max|out|)"
    else:
        rule = (
            f"NumPy {args.dtype} error {base_error:.2e} -> budget {budget:.2e} "
            f"({reference.budget.FLOAT32_FACTOR:g}x that + "
            f"{reference.FLOOR:g} max|out|)"
        )
    print(
        f"oracle: float64 NumPy reference, max|out| {np.abs(ref64).max():.3g}; {rule}",
        file=out,
    )

    def progress(backend, event, detail=None):
        if event == "start":
            print(f"  running {backend} ...", file=out, flush=True)

    runs = run_backends([case], args.backends, on_event=progress, portability=False)
    header = (
        "backend",
        "version",
        "output shape",
        "forward ms",
        "vs NumPy f32",
        "max |err|",
        "err / NumPy err",
        "verdict",
    )
    rows, failed = [], False
    for backend in args.backends:
        run = runs[backend]
        reason = unavailable_reason(backend)
        if reason is not None:
            rows.append((backend, "-", "-", "-", "-", "-", "-", f"skipped: {reason}"))
            continue
        if protocol.FORWARD not in run.results.get(DEMO_CASE, {}):
            failed = True
            errors = run.errors.get(DEMO_CASE, {})
            reason = (next(iter(errors.values()), None) or run.error or "").strip()
            rows.append((backend, "-", "-", "-", "-", "-", "-", "FAILED"))
            print(f"\n{backend} failed:\n{reason}", file=out)
            continue
        output = run.results[DEMO_CASE][protocol.FORWARD][protocol.out_key(0)]
        seconds = run.info["timings"][DEMO_CASE][protocol.FORWARD_SECONDS]
        cell = cell_of(reference.max_abs(output, ref64), budget)
        failed |= not cell.passed
        rows.append(
            (
                backend,
                run.info.get("framework_version") or "?",
                str(tuple(output.shape)),
                f"{seconds * 1e3:.1f}",
                f"{seconds / numpy_seconds:.2f}x",
                f"{cell.error:.2e}",
                "-" if base_error is None else f"{cell.error / base_error:.2f}",
                "ok" if cell.passed else "FAIL: over budget",
            )
        )
    print("", file=out)
    print(format_table(header, rows), file=out)
    print(
        f"\n'vs NumPy f32': forward time / NumPy float32 BLAS forward "
        f"({numpy_seconds * 1e3:.1f} ms) in this run. Times are noisy on a shared "
        "machine.",
        file=out,
    )
    ran = [r for r in rows if not r[-1].startswith("skipped")]
    if not ran:
        print("verdict: no backend installed", file=out)
        return 1
    print(
        "verdict: " + ("FAIL" if failed else f"all {len(ran)} backends within budget"),
        file=out,
    )
    return 1 if failed else 0


def _load_inputs(path):
    """--inputs: {npz key: array}; the workers match them to the model's inputs
    by name when the keys are its input names, else by order."""
    try:
        with np.load(path) as data:
            if not data.files:
                raise UsageError(f"--inputs {path} holds no arrays")
            return {name: data[name] for name in data.files}
    except (OSError, ValueError, EOFError) as e:
        raise UsageError(f"cannot read --inputs {path}: {e}") from None


class _Progress:
    """What the workers are doing: a live status line on a terminal (rich),
    plain lines otherwise (CI logs), nothing with --quiet."""

    def __init__(self, stream, quiet):
        self.stream, self.quiet, self._status = stream, quiet, None
        if not quiet and stream.isatty():
            try:
                from rich.console import Console
            except ImportError:
                return
            self._status = Console(file=stream).status("starting the workers ...")

    def __enter__(self):
        if self._status is not None:
            self._status.__enter__()
        return self

    def __exit__(self, *exc):
        if self._status is not None:
            self._status.__exit__(*exc)

    def __call__(self, backend, event, detail=None):
        if self.quiet:
            return
        text = f"{backend}: {detail} ..." if event == "start" else None
        if event in ("failed", "skipped"):
            text = f"{backend}: {event} ({str(detail).splitlines()[0]})"
        if text is None:
            return
        if self._status is not None:
            self._status.update(text)
            if event != "start":
                self._status.console.print(text)
        else:
            print(f"  {text}", file=self.stream, flush=True)


def _write_json(report, path):
    """The report as strict JSON (no NaN/Infinity) to `path`, "-" for stdout;
    a file is written whole or not at all."""
    text = json.dumps(report.to_json(), indent=1, allow_nan=False)
    if path == "-":
        sys.stdout.write(text + "\n")
        sys.stdout.flush()
        return
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_text(text + "\n")
        tmp.replace(path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise UsageError(f"cannot write --json {path}: {e}") from None


def _model_error(report, name):
    """The last line of a worker's error when no backend produced any result
    for case `name` (bad inputs, a model that cannot be called), else None."""
    runs = report.runs.values()
    if any(run.results.get(name) for run in runs):
        return None
    for run in runs:
        for error in run.errors.get(name, {}).values():
            if last_line(error):
                return last_line(error)
    return None


def _feature_options(args):
    """{feature name: its options} of the parsed command line, checked before
    any worker starts (each feature reads its own arguments)."""
    options = {}
    for feature in features.FEATURES:
        try:
            options[feature.name] = feature.options_from_args(args)
        except ValueError as e:
            raise UsageError(str(e)) from None
    return options


def _needs_model(args, options):
    """The one line of arguments given without --model that need it, or None."""
    flags = ["--inputs", "--rtol"]
    given = args.inputs is not None or args.rtol is not None
    for feature in features.FEATURES:
        if feature.model_flag is not None:
            flags.append(feature.model_flag)
            given = given or feature.enabled(options[feature.name])
    if not given:
        return None
    return f"{', '.join(flags[:-1])} and {flags[-1]} need --model"


def run_matrix_command(args, out=None):
    out = out or sys.stdout
    safe_mode = not args.unsafe
    options = _feature_options(args)
    if args.model is None:
        needs_model = _needs_model(args, options)
        if needs_model:
            raise UsageError(needs_model)
        to_run = cases.default_cases()
        title = "mhsa-core matrix: default cases (error / budget; <= 1 passes)"
    else:
        try:
            config = cases.read_model_config(args.model)
            if safe_mode:
                cases.check_safe(config, args.model)
            inputs = _load_inputs(args.inputs) if args.inputs else None
            to_run = [cases.model_case(args.model, inputs, name=Path(args.model).stem)]
        except cases.ModelFileError as e:
            raise UsageError(str(e)) from None
        title = f"mhsa-core matrix: {args.model} (error / budget; <= 1 passes)"
    json_to_stdout = args.json == "-"
    if json_to_stdout:  # stdout is the JSON alone: the table and verdict go to stderr
        out = sys.stderr
    with _Progress(sys.stderr, args.quiet) as progress:
        report = matrix.run_matrix(
            to_run,
            args.backends,
            rtol=args.rtol,
            safe_mode=safe_mode,
            on_event=progress,
            timeout=args.timeout,
            imports=args.imports,
            **features.keywords(options),
        )
    for case in to_run if args.model is not None else []:
        unusable = _model_error(report, case.name)
        if unusable:
            raise UsageError(f"the model could not run on any backend: {unusable}")
    if args.json:
        _write_json(report, args.json)
    if not args.quiet:
        render(report, out, title)
        for feature in features.FEATURES:
            for text in feature.tables(report, options[feature.name]):
                print("\n" + text, file=out)
        for backend, error in report.worker_errors.items():
            print(f"\n{backend}: {error}", file=out)
        for row in report.rows:
            if row.check == ERRORS:
                for backend, cell in row.cells.items():
                    print(f"\n{row.case} on {backend}: {cell.note}", file=out)
        for feature in features.FEATURES:
            for text in feature.notes(report, options[feature.name]):
                print("\n" + text, file=out)
    for feature in features.FEATURES:  # files asked for: also with --quiet
        try:
            feature.write_outputs(report, args, out)
        except ValueError as e:
            raise UsageError(str(e)) from None
    print(verdict(report), file=out)
    if report.agree:
        return 0
    return 1


def add_commands(subparsers):
    """Adds `demo` and `matrix` to the `mhsa-core` command's subparsers
    (`mhsa_core.cli`); each sets `func(args)` -> exit status, and raises
    `UsageError` on bad usage found after parsing."""
    p = subparsers.add_parser(
        "demo", help="run the Keras 2 YOLOv4-MHSA block under each installed backend"
    )
    p.add_argument(
        "--backends",
        type=_backend_list,
        default=list(TRAINING_BACKENDS),
        help=f"comma-separated backends (default: {','.join(TRAINING_BACKENDS)})",
    )
    p.add_argument("--size", type=_positive_int, default=25, help="H = W (default 25)")
    p.add_argument(
        "--batch", type=_positive_int, default=2, help="batch size (default 2)"
    )
    p.add_argument(
        "--channels", type=_positive_int, default=512, help="channels (default 512)"
    )
    p.add_argument(
        "--dtype",
        default="float32",
        choices=["float32", "float64", "mixed_float16", "mixed_bfloat16"],
        help="the layer's dtype policy (default float32)",
    )
    p.set_defaults(func=demo)

    m = subparsers.add_parser(
        "matrix",
        help="check that the backends agree",
        description=MATRIX_DESCRIPTION,
        epilog=matrix_epilog(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    m.add_argument(
        "--backends",
        type=_backend_list,
        default=list(BACKENDS),
        help=f"comma-separated (default: {','.join(BACKENDS)}; backends other "
        f"than {','.join(TRAINING_BACKENDS)} run inference only)",
    )
    m.add_argument("--model", help="a .keras file (default: the built-in cases)")
    m.add_argument(
        "--inputs",
        metavar="NPZ",
        help=".npz of the model's inputs: matched by name when its keys are the "
        "model's input names, else by order (default: made from the loaded "
        f"model's inputs, None dims -> {cases.DEFAULT_BATCH} for the batch; "
        "other None dims run at two sizes, "
        f"{' and '.join(map(str, cases.VARIABLE_SIZES))})",
    )
    m.add_argument(
        "--rtol",
        type=_positive_float,
        help="tolerance relative to max|output| when no float64 run is "
        "possible (or to override it)",
    )
    m.add_argument(
        "--unsafe",
        action="store_true",
        help="load with Keras safe mode off (Lambda layers): only for trusted files",
    )
    m.add_argument(
        "--import",
        dest="imports",
        action="append",
        default=[],
        metavar="MODULE",
        help="a module the workers import first "
        "(where the model's custom layers are registered); repeatable",
    )
    for feature in features.FEATURES:  # each opt-in feature's own arguments
        feature.add_arguments(m)
    m.add_argument(
        "--json",
        metavar="PATH",
        help="also write the report as JSON to PATH; '-' for stdout (then the "
        "table and the verdict go to stderr)",
    )
    m.add_argument("--quiet", action="store_true", help="print only the verdict")
    m.add_argument(
        "--timeout",
        type=_positive_float,
        default=1800.0,
        help="seconds per backend worker (default 1800)",
    )
    m.set_defaults(func=run_matrix_command)
