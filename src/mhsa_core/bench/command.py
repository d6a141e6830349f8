"""`mhsa-core bench`: its arguments, their checks, and the run.

The arguments are taken as text and checked here, so that a bad value is one
line naming the argument and the value (`BenchUsageError`, exit status 2 in
`mhsa_core.cli`), before any worker starts.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import time
from pathlib import Path

from mhsa_core.bench import plan as plan_module
from mhsa_core.bench import report as report_module
from mhsa_core.bench import run as run_module
from mhsa_core.bench.configs import CONFIGS, DEFAULT_CONFIGS
from mhsa_core.bench.flops import DIRECTIONS
from mhsa_core.bench.plan import BENCH_BACKENDS, MODES, PATHS
from mhsa_core.bench.worker import OK

DEFAULT_REPEATS = 3
DEFAULT_TIMEOUT = 900.0

DESCRIPTION = """\
Measures the MultiHeadSelfAttention2D layer's speed and memory on each backend
(TensorFlow, torch, JAX), each measurement in a fresh worker process: every
attention path (full, chunked, fused, auto), forward and forward+backward,
compiled and eager, next to the backend's native fused attention of the same
block, timm's module of it (torch) and
keras.layers.MultiHeadAttention(attention_axes=(1, 2)). Each row:
the median time of the repeats, GF/s (projections + attention), % of the
backend's own float32 matmul rate measured in the same process, time / the
backend's fastest native, and the peak resident-memory growth. A row that
times out, runs out of memory or raises says so; the run goes on."""

EPILOG = f"""\
configs:
{
    chr(10).join(
        f"  {c.name:15s} {c.describe()}" + (f"  ({c.note})" if c.note else "")
        for c in CONFIGS.values()
    )
}
  (default: {",".join(DEFAULT_CONFIGS)})

modes: compiled (tf.function(jit_compile=True) / torch.compile / jax.jit),
  graph (tf.function without XLA; TensorFlow only), eager.
paths: full, chunked, fused, auto (the layer's attention_implementation),
  native (torch F.scaled_dot_product_attention, compiled and eager;
  jax.nn.dot_product_attention under jit; TensorFlow's ops under XLA),
  timm (torch only, compiled and eager: timm's own module of the block, the
  same weights: swin SwinTransformerBlock._attn, rope_n4096 EvaAttention with
  RotaryEmbeddingCat, n4096_relative BottleneckAttn; no row for a config
  without a timm peer; "skipped" without timm installed),
  keras_mha (keras.layers.MultiHeadAttention, every mode).

examples:
  mhsa-core bench --json bench.json --plot docs/bench.png
  mhsa-core bench --backends torch --configs n4096 --paths chunked,native \
--modes compiled
  mhsa-core bench --configs tiny --repeats 1 --json - | jq '.rows[].ms'
  mhsa-core bench --from bench.json --summary --markdown
  mhsa-core bench --from tf.json --from torch.json --json bench.json \
  (runs made in parts)

exit status: 0 at least one row ran; 1 none did; 2 bad usage."""


class BenchUsageError(ValueError):
    """A bad argument value: one line, exit status 2."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The bench's arguments, as text (checked by `options`)."""
    parser.add_argument(
        "--backends",
        default=",".join(BENCH_BACKENDS),
        help=f"comma-separated subset of {','.join(BENCH_BACKENDS)} (default: "
        "all; one not installed is skipped with the reason)",
    )
    parser.add_argument(
        "--configs",
        default=",".join(DEFAULT_CONFIGS),
        help=f"comma-separated subset of {','.join(CONFIGS)} "
        f"(default: {','.join(DEFAULT_CONFIGS)})",
    )
    parser.add_argument(
        "--paths",
        default=",".join(PATHS),
        help=f"comma-separated subset of {','.join(PATHS)} (default: all)",
    )
    parser.add_argument(
        "--modes",
        default=",".join(MODES),
        help=f"comma-separated subset of {','.join(MODES)} (default: all; "
        "a backend runs the modes it has)",
    )
    parser.add_argument(
        "--directions",
        default=",".join(DIRECTIONS),
        help=f"comma-separated subset of {','.join(DIRECTIONS)} (default: both)",
    )
    parser.add_argument(
        "--repeats",
        default=str(DEFAULT_REPEATS),
        help=f"timed calls per row after the warm-up; the row's time is "
        f"their median (default {DEFAULT_REPEATS})",
    )
    parser.add_argument(
        "--timeout",
        default=str(DEFAULT_TIMEOUT),
        help=f"seconds per row's worker, compile included "
        f"(default {DEFAULT_TIMEOUT:g})",
    )
    parser.add_argument(
        "--max-memory",
        dest="max_memory",
        metavar="GB",
        help="resident memory at which a row's worker is killed and the row "
        "recorded as out of memory (default: half of the memory "
        "available at the start)",
    )
    parser.add_argument(
        "--json",
        metavar="PATH",
        help="also write the report as JSON; '-' for stdout (the table "
        "then goes to stderr). A file is rewritten after every row "
        '("complete": false until the run ends)',
    )
    parser.add_argument(
        "--plot",
        metavar="PATH.png",
        help="a PNG of time and memory against N per backend and path "
        "(needs matplotlib: mhsa-core[plot])",
    )
    parser.add_argument(
        "--markdown", action="store_true", help="print the tables as Markdown"
    )
    parser.add_argument(
        "--summary",
        action="store_true",
        help="print one table of the compiled mode (every config) instead "
        "of a table per config",
    )
    parser.add_argument(
        "--from",
        dest="from_json",
        metavar="PATH.json",
        action="append",
        help="run nothing: print (and --plot, --json) the report of an "
        "earlier --json; repeatable: the rows of runs made in parts, "
        "a later file's row replacing the same row of an earlier one",
    )
    parser.add_argument(
        "--quiet",
        action="store_true",
        help="no progress lines (a line per row on stderr otherwise)",
    )


def _names(argument, text, choices):
    names = [n.strip() for n in str(text).split(",") if n.strip()]
    if not names or any(n not in choices for n in names):
        raise BenchUsageError(
            f"--{argument}: expected a comma-separated subset of "
            f"{','.join(choices)}; received: {text!r}"
        )
    return list(dict.fromkeys(names))


def _positive(argument, text, kind):
    try:
        value = kind(text)
    except (TypeError, ValueError):
        value = None
    if value is None or not value > 0 or value != value or value == float("inf"):
        noun = "a positive integer" if kind is int else "a positive number"
        raise BenchUsageError(f"--{argument}: expected {noun}; received: {text!r}")
    return value


def _writable(argument, path):
    """A file can be written at `path` (its directory exists and is writable)."""
    path = Path(path)
    parent = path.parent if str(path.parent) else Path(".")
    if (
        path.is_dir()
        or not parent.is_dir()
        or not os.access(parent, os.W_OK)
        or (path.exists() and not os.access(path, os.W_OK))
    ):
        raise BenchUsageError(
            f"--{argument}: cannot write a file there; received: {str(path)!r}"
        )


def options(args) -> dict:
    """The checked options of parsed `args`; `BenchUsageError` on a bad value."""
    checked = {
        "backends": _names("backends", args.backends, BENCH_BACKENDS),
        "configs": _names("configs", args.configs, tuple(CONFIGS)),
        "paths": _names("paths", args.paths, PATHS),
        "modes": _names("modes", args.modes, MODES),
        "directions": _names("directions", args.directions, DIRECTIONS),
        "repeats": _positive("repeats", args.repeats, int),
        "timeout": _positive("timeout", args.timeout, float),
        "max_memory_gb": (
            run_module.default_max_memory_gb()
            if args.max_memory is None
            else _positive("max-memory", args.max_memory, float)
        ),
    }
    if args.json is not None and args.json != "-":
        _writable("json", args.json)
    if args.plot is not None:
        if importlib.util.find_spec("matplotlib") is None:
            raise BenchUsageError(
                "--plot: needs matplotlib (pip install 'mhsa-core[plot]'); "
                f"received: {args.plot!r}"
            )
        _writable("plot", args.plot)
    return checked


def _progress(stream):
    def on_row(i, total, row):
        what = (
            f"{row['backend']} {row['config']} {row['path']} {row['mode']} "
            f"{row['direction']}"
        )
        if row["status"] == OK:
            result = f"{row['ms']:.4g} ms, {row['peak_gb']:.2f} GB"
        else:
            result = f"{row['status']}: {row.get('reason') or ''}"[:160]
        print(
            f"  [{i + 1}/{total}] {what}: {result} ({row.get('seconds', 0):.0f} s)",
            file=stream,
            flush=True,
        )

    return on_row


def _read_report(path):
    try:
        report = json.loads(Path(path).read_text())
        if not isinstance(report.get("rows"), list):
            raise ValueError
    except (OSError, ValueError, AttributeError):
        raise BenchUsageError(
            f"--from: not a readable bench report (--json); received: {path!r}"
        ) from None
    return report


def _show(report, args, out):
    print(
        report_module.render(report, markdown=args.markdown, summary=args.summary),
        file=out,
    )
    if args.plot is not None:
        drawn = report_module.plot(report, args.plot)
        print(
            f"plot: {args.plot}" if drawn else "plot: nothing to plot (no row ran)",
            file=out,
        )
    return 0 if any(r["status"] == OK for r in report["rows"]) else 1


def main(args, out=None) -> int:
    """Run the bench of parsed `args`; returns the exit status (`EPILOG`)."""
    opts = options(args)
    out = out or (sys.stderr if args.json == "-" else sys.stdout)
    if args.from_json is not None:
        reports = [_read_report(path) for path in args.from_json]
        report = reports[0] if len(reports) == 1 else report_module.merge(reports)
        if args.json is not None:
            report_module.write_json(report, args.json)
        return _show(report, args, out)
    measurements = plan_module.plan(
        opts["backends"],
        opts["configs"],
        opts["paths"],
        opts["modes"],
        opts["directions"],
    )
    configs = {name: CONFIGS[name] for name in opts["configs"]}
    if not args.quiet:
        print(
            f"mhsa-core bench: {len(measurements)} rows, each in a fresh worker "
            f"(--max-memory {opts['max_memory_gb']:g} GB, "
            f"--timeout {opts['timeout']:g} s)",
            file=sys.stderr,
            flush=True,
        )
    start = time.perf_counter()
    load_start = report_module.load_average()
    to_file = args.json not in (None, "-")
    skipped = run_module.skipped_backends(opts["backends"])
    done = []
    progress = None if args.quiet else _progress(sys.stderr)

    def make_report(rows, complete):
        return report_module.build(
            rows,
            skipped,
            configs,
            backends=opts["backends"],
            options={k: opts[k] for k in ("repeats", "timeout", "max_memory_gb")},
            seconds=time.perf_counter() - start,
            complete=complete,
            load_start=load_start,
        )

    def on_row(i, total, row):
        if progress is not None:
            progress(i, total, row)
        done.append(row)
        if to_file:  # a long run's rows so far, should it be stopped
            partial = [dict(r) for r in done]
            report_module.write_json(
                make_report(run_module.derive(partial, configs), False), args.json
            )

    rows, skipped = run_module.run(
        measurements,
        configs,
        repeats=opts["repeats"],
        timeout=opts["timeout"],
        max_memory_gb=opts["max_memory_gb"],
        on_row=on_row,
    )
    report = make_report(rows, True)
    if args.json is not None:
        report_module.write_json(report, args.json)
    return _show(report, args, out)
