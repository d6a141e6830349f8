"""The `mhsa-core` command.

    mhsa-core matrix [--backends tensorflow,torch,jax,numpy] [--json PATH] [--quiet]
    mhsa-core matrix --model PATH.keras [--inputs PATH.npz] [--rtol R] [--unsafe]
                     [--import MODULE]
    mhsa-core demo [--backends ...] [--size 25] [--batch 2] [--channels 512]
                   [--dtype float32]

`matrix` runs cases under each backend in its own process and checks that the
backends agree (see `mhsa_core.matrix`): with no arguments the default cases
of the seed block, with `--model` any saved Keras model. `demo` runs only the
seed block's forward pass and prints per backend the shape, the time and the
error against the float64 NumPy reference.

Exit status: 0 all backends agree; 1 a disagreement beyond tolerance (or a
backend crashed); 2 bad usage or an unreadable model file.
"""

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from mhsa_core import matrix, reference
from mhsa_core.runner import BACKENDS, Case, backend_available, run_backends

DEFAULT_BACKENDS = ("tensorflow", "torch", "jax")
MATRIX_BACKENDS = ("tensorflow", "torch", "jax", "numpy")


class UsageError(Exception):
    """Bad usage found after parsing (exit status 2)."""


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
        raise argparse.ArgumentTypeError(f"expected a positive integer; received: {text!r}")
    return value


def _positive_float(text):
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number; received: {text!r}")
    return value


def _format_table(header, rows):
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(header, widths)).rstrip()]
    lines.append("  ".join("-" * w for w in widths))
    for row in rows:
        lines.append("  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip())
    return "\n".join(lines)


def demo(args, out=None):
    out = out or sys.stdout
    rng = np.random.default_rng(0)
    shape = (args.batch, args.size, args.size, args.channels)
    array_dtype = np.float64 if args.dtype == "float64" else np.float32
    x = rng.standard_normal(shape).astype(array_dtype)
    weights = reference.random_weights(args.channels, seed=1, dtype=array_dtype)
    case = Case("seed", config={}, inputs={"x": x}, weights=weights, dtype=args.dtype)

    print(
        f"mhsa-core demo: the seed block (1 head, ReLU projections, conv position, "
        f"scale 1.0) on a {'x'.join(map(str, shape))} map, dtype {args.dtype}",
        file=out,
    )
    ref64, budget, base_error = reference.error_budget(x, weights, policy=args.dtype)
    start = time.perf_counter()
    reference.mhsa_forward(x, weights, dtype=np.float32)
    numpy_seconds = time.perf_counter() - start
    if base_error is None:
        rule = f"budget {budget:.2e} ({reference.FLOAT64_RTOL:g} max|out|)"
    else:
        rule = (f"NumPy {args.dtype} error {base_error:.2e} -> budget {budget:.2e} "
                "(2x that + 1e-6 max|out|)")
    print(f"oracle: float64 NumPy reference, max|out| {np.abs(ref64).max():.3g}; {rule}",
          file=out)

    def progress(backend, event, detail=None):
        if event == "start":
            print(f"  running {backend} ...", file=out, flush=True)

    runs = run_backends([case], args.backends, on_event=progress, portability=False)
    header = ("backend", "version", "output shape", "forward ms", "vs NumPy f32",
              "max |err|", "err / NumPy err", "verdict")
    rows, failed = [], False
    for backend in args.backends:
        run = runs[backend]
        if not backend_available(backend):
            rows.append((backend, "-", "-", "-", "-", "-", "-", "skipped: not installed"))
            continue
        if "forward" not in run.results.get("seed", {}):
            failed = True
            errors = run.errors.get("seed", {})
            reason = (next(iter(errors.values()), None) or run.error or "").strip()
            rows.append((backend, "-", "-", "-", "-", "-", "-", "FAILED"))
            print(f"\n{backend} failed:\n{reason}", file=out)
            continue
        output = run.results["seed"]["forward"]["out/0"].astype(np.float64)
        seconds = run.info["timings"]["seed"]["forward_seconds"]
        error = float(np.abs(output - ref64).max()) if output.shape == ref64.shape else float("inf")
        ok = error <= budget
        failed |= not ok
        rows.append((
            backend,
            run.info.get("framework_version") or "?",
            str(tuple(output.shape)),
            f"{seconds * 1e3:.1f}",
            f"{seconds / numpy_seconds:.2f}x",
            f"{error:.2e}",
            "-" if base_error is None else f"{error / base_error:.2f}",
            "ok" if ok else "FAIL: over budget",
        ))
    print("", file=out)
    print(_format_table(header, rows), file=out)
    print(
        f"\n'vs NumPy f32': forward time / NumPy float32 BLAS forward "
        f"({numpy_seconds * 1e3:.1f} ms) in this run. Times are noisy on a shared machine.",
        file=out,
    )
    ran = [r for r in rows if not r[-1].startswith("skipped")]
    if not ran:
        print("verdict: no backend installed", file=out)
        return 1
    print("verdict: " + ("FAIL" if failed else f"all {len(ran)} backends within budget"),
          file=out)
    return 1 if failed else 0


def _load_inputs(path):
    try:
        with np.load(path) as data:
            if not data.files:
                raise UsageError(f"--inputs {path} holds no arrays")
            return {f"input_{k}": data[name] for k, name in enumerate(data.files)}
    except (OSError, ValueError, EOFError) as e:
        raise UsageError(f"cannot read --inputs {path}: {e}") from None


def _cell_text(cell):
    if cell is None:
        return "-", "dim"
    if cell.passed is None:
        if cell.ratio is not None and np.isfinite(cell.ratio):
            return f"{cell.ratio:.2f} {cell.note}".strip(), "yellow"
        return cell.note or "-", "dim"
    if cell.ratio is None or not np.isfinite(cell.ratio):
        return f"FAIL {cell.note}".strip(), "bold red"
    text = f"{cell.ratio:.2f}"
    if cell.passed:
        return text + " ok", "green"
    return f"{text} FAIL" + (f" ({cell.note})" if cell.note else ""), "bold red"


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


def _render(report, out, title):
    header = ["case", "check", *report.backends]
    rows = []
    for row in report.rows:
        rows.append([row.case, row.check, *(_cell_text(row.cells.get(b)) for b in report.backends)])
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:  # rich is optional: a plain table
        plain = [[r[0], r[1], *(t for t, _ in r[2:])] for r in rows]
        print(title, file=out)
        print(_format_table(header, plain), file=out)
        return
    table = Table(title=title, title_justify="left")
    for name in header:
        table.add_column(name, no_wrap=True)
    previous = None
    for r in rows:
        case = r[0] if r[0] != previous else ""
        previous = r[0]
        table.add_row(case, r[1], *(f"[{style}]{text}[/]" if style else text
                                    for text, style in r[2:]))
    Console(file=out, width=max(100, 30 + 22 * len(report.backends))).print(table)


def _verdict(report):
    checked = sum(1 for r in report.rows for c in r.cells.values() if c.passed is not None)
    parts = []
    if report.missing:
        parts.append("not installed, skipped: " + ", ".join(report.missing))
    crashed = {b: e for b, e in report.worker_errors.items() if b not in report.missing}
    if crashed:
        return "verdict: FAIL: worker(s) failed: " + ", ".join(crashed)
    if report.failures:
        where = sorted({f"{r.case}/{r.check}/{b}" for r, b, _ in report.failures})
        return (f"verdict: DISAGREE: {len(report.failures)} of {checked} cells beyond "
                f"tolerance: " + ", ".join(where[:8]) + (" ..." if len(where) > 8 else ""))
    if not checked:
        return "verdict: nothing was checked" + (f" ({'; '.join(parts)})" if parts else "")
    ran = [b for b in report.backends if b not in report.missing]
    return (f"verdict: all {checked} cells agree across {', '.join(ran)}"
            + (f" ({'; '.join(parts)})" if parts else ""))


def run_matrix_command(args, out=None):
    out = out or sys.stdout
    safe_mode = not args.unsafe
    if args.model is None:
        if args.inputs is not None or args.rtol is not None:
            raise UsageError("--inputs and --rtol need --model")
        cases = matrix.default_cases()
        title = "mhsa-core matrix: default cases (error / budget; <= 1 passes)"
    else:
        try:
            config = matrix.read_model_config(args.model)
            if safe_mode:
                matrix.check_safe(config, args.model)
            inputs = _load_inputs(args.inputs) if args.inputs else None
            cases = [matrix.model_case(args.model, inputs, name=Path(args.model).stem)]
        except matrix.ModelFileError as e:
            raise UsageError(str(e)) from None
        title = f"mhsa-core matrix: {args.model} (error / budget; <= 1 passes)"
    with _Progress(sys.stderr, args.quiet) as progress:
        report = matrix.run_matrix(
            cases, args.backends, rtol=args.rtol, safe_mode=safe_mode,
            on_event=progress, timeout=args.timeout, imports=args.imports,
        )
    if args.json:
        Path(args.json).write_text(json.dumps(report.to_json(), indent=1))
    if not args.quiet:
        _render(report, out, title)
        for backend, error in report.worker_errors.items():
            print(f"\n{backend}: {error}", file=out)
        for row in report.rows:
            if row.check == "errors":
                for backend, cell in row.cells.items():
                    print(f"\n{row.case} on {backend}: {cell.note}", file=out)
    print(_verdict(report), file=out)
    if report.agree:
        return 0
    return 1


def build_parser():
    parser = argparse.ArgumentParser(
        prog="mhsa-core",
        description="2-D multi-head self-attention for Keras 3, checked across backends.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("demo", help="run the seed block under each installed backend")
    p.add_argument("--backends", type=_backend_list, default=list(DEFAULT_BACKENDS),
                   help="comma-separated backends (default: tensorflow,torch,jax)")
    p.add_argument("--size", type=_positive_int, default=25, help="H = W (default 25)")
    p.add_argument("--batch", type=_positive_int, default=2, help="batch size (default 2)")
    p.add_argument("--channels", type=_positive_int, default=512,
                   help="channels (default 512)")
    p.add_argument("--dtype", default="float32",
                   choices=["float32", "float64", "mixed_float16", "mixed_bfloat16"],
                   help="the layer's dtype policy (default float32)")
    p.set_defaults(func=demo)

    m = sub.add_parser("matrix", help="check that the backends agree")
    m.add_argument("--backends", type=_backend_list, default=list(MATRIX_BACKENDS),
                   help="comma-separated (default: tensorflow,torch,jax,numpy; numpy "
                        "runs inference only)")
    m.add_argument("--model", help="a .keras file (default: the built-in cases)")
    m.add_argument("--inputs", help=".npz of the model's inputs, in input order "
                   f"(default: made from the input spec, None dims -> "
                   f"{matrix.DEFAULT_BATCH} for the batch, {matrix.DEFAULT_SIZE} otherwise)")
    m.add_argument("--rtol", type=_positive_float,
                   help="tolerance relative to max|output| when no float64 run is "
                        "possible (or to override it)")
    m.add_argument("--unsafe", action="store_true",
                   help="load with Keras safe mode off (Lambda layers): only for trusted files")
    m.add_argument("--import", dest="imports", action="append", default=[],
                   metavar="MODULE", help="a module the workers import first "
                   "(where the model's custom layers are registered); repeatable")
    m.add_argument("--json", help="also write the report as JSON to this path")
    m.add_argument("--quiet", action="store_true", help="print only the verdict")
    m.add_argument("--timeout", type=_positive_float, default=1800.0,
                   help="seconds per backend worker (default 1800)")
    m.set_defaults(func=run_matrix_command)
    return parser


def main(argv=None):
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse exits 2 on bad usage, 0 on --help
        return int(e.code or 0)
    try:
        return args.func(args)
    except UsageError as e:
        print(f"mhsa-core: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
