"""The `mhsa-core` command.

    mhsa-core demo [--backends tensorflow,torch,jax] [--size 25] [--batch 2]
                   [--channels 512] [--dtype float32]

`demo` runs the seed block (one head, 512 channels) on a 2x25x25x512 map under
each installed backend, each in its own process, and prints per backend the
output shape, the forward time, and the error against the float64 NumPy
reference with its ratio to the error of the NumPy reference run with the same
roundings (the budget's base, see the README's tolerance policy).

Exit status: 0 every backend within budget; 1 a backend failed or disagreed;
2 bad usage.
"""

import argparse
import sys
import time

import numpy as np

from mhsa_core import reference
from mhsa_core.runner import BACKENDS, Case, backend_available, run_backends

DEFAULT_BACKENDS = ("tensorflow", "torch", "jax")


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


def _format_table(header, rows):
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(header, widths)).rstrip()]
    lines.append("  ".join("-" * w for w in widths))
    for row in rows:
        lines.append("  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip())
    return "\n".join(lines)


def demo(args, out=sys.stdout):
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

    def progress(backend, event):
        if event == "start":
            print(f"  running {backend} ...", file=out, flush=True)

    runs = run_backends([case], args.backends, on_event=progress)
    header = ("backend", "version", "output shape", "forward ms", "vs NumPy f32",
              "max |err|", "err / NumPy err", "verdict")
    rows, failed = [], False
    for backend in args.backends:
        run = runs[backend]
        if not backend_available(backend):
            rows.append((backend, "-", "-", "-", "-", "-", "-", "skipped: not installed"))
            continue
        if "seed" not in run.results:
            failed = True
            reason = (run.case_errors.get("seed") or run.error or "").strip()
            rows.append((backend, "-", "-", "-", "-", "-", "-", "FAILED"))
            print(f"\n{backend} failed:\n{reason}", file=out)
            continue
        output = run.results["seed"]["output"].astype(np.float64)  # any float dtype
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
    return parser


def main(argv=None):
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse exits 2 on bad usage, 0 on --help
        return int(e.code or 0)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
