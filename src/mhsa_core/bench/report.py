"""The bench's report: one JSON document, a table per config (plain text or
Markdown), and a plot of time and memory against N.

The JSON (`build`) holds everything the table and the plot show, and more:

    {"tool": "mhsa-core bench", "version", "seconds", "complete": bool,
     "machine": {"cpus", "platform", "python", "load_average_start",
                 "load_average_end"},
     "options": {"repeats", "timeout", "max_memory_gb"},
     "flops": FORMULA, "modes": {backend: {mode: meaning}},
     "natives": {backend: meaning},
     "timm": {config: timm's module of its "timm" rows} (configs with a peer),
     "backends": {backend: {"version": str | None, "skipped": reason | None}},
     "configs": {name: {BenchConfig fields, "tokens", "forward_gflop",
                        "forward_backward_gflop"}},
     "runs": [...]  (only in a `merge` of several: each run's machine, seconds,
              completeness and options),
     "rows": [{"backend", "config", "path", "mode", "direction",
               "status": one of worker.STATUSES, "reason": str | None,
               "ms", "times_ms", "first_ms", "gflops", "ceiling_gflops",
               "ceiling_op", "ceiling_pct", "native_ratio", "peak_gb",
               "memory_exact", "chosen_path" (what the layer runs, by its own
               rule), "chunk_size", "check": {"error", "budget",
               "passed"} | None, "note", "framework_version", "seconds"}]}

A row that did not run "ok" has its status and reason, and no numbers.
"""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path

import mhsa_core
from mhsa_core._text import format_table
from mhsa_core.bench import timm_peer
from mhsa_core.bench.configs import BenchConfig
from mhsa_core.bench.flops import (
    DIRECTIONS,
    FORMULA,
    FORWARD,
    FORWARD_BACKWARD,
    flops,
)
from mhsa_core.bench.plan import (
    AUTO,
    COMPILED,
    MODE_MEANINGS,
    MODES,
    NATIVE_MEANINGS,
    PATHS,
    TIMM,
)
from mhsa_core.bench.run import derive, median_ceiling
from mhsa_core.bench.worker import OK, UNSUPPORTED

SHORT_DIRECTIONS = {FORWARD: "fwd", FORWARD_BACKWARD: "fwd+bwd"}
LEGEND = (
    "cell: median time of the repeats; % of the backend's own float32 matmul rate "
    "measured in the same process; time / the backend's fastest native; peak "
    "resident-memory growth of the measurement (inputs, compile and steps)"
)


def build(
    rows,
    skipped,
    configs,
    *,
    backends,
    options,
    seconds,
    complete=True,
    load_start=None,
):
    """The report document (module docstring) of a run's rows.

    `complete` False: a run still going (the rows so far); `load_start`: the
    1-minute load average when the run began (the machine's, all users')."""
    versions: dict[str, str] = {}
    for row in rows:
        if row.get("framework_version"):
            versions.setdefault(row["backend"], row["framework_version"])
    used = dict.fromkeys(row["config"] for row in rows) or dict.fromkeys(configs)
    return {
        "tool": "mhsa-core bench",
        "version": mhsa_core.__version__,
        "seconds": seconds,
        "complete": complete,
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "load_average_start": load_start,
            "load_average_end": load_average(),
        },
        "options": options,
        "flops": FORMULA,
        "modes": {b: MODE_MEANINGS[b] for b in backends},
        "natives": {b: NATIVE_MEANINGS[b] for b in backends},
        "timm": _timm_modules(configs[name] for name in used),
        "backends": {
            b: {"version": versions.get(b), "skipped": skipped.get(b)} for b in backends
        },
        "configs": {
            name: {
                **configs[name].to_json(),
                "forward_gflop": flops(configs[name], FORWARD) / 1e9,
                "forward_backward_gflop": flops(configs[name], FORWARD_BACKWARD) / 1e9,
            }
            for name in used
        },
        "rows": rows,
    }


def _timm_modules(configs):
    """{config: timm's module} of the configs with a timm peer."""
    peers = {c.name: timm_peer.peer_of(c) for c in configs}
    return {name: peer.module for name, peer in peers.items() if peer is not None}


def load_average():
    """The 1-minute load average now, or None where there is none."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def merge(reports):
    """One report of the rows of several (runs in parts): a later report's row
    replaces the same (backend, config, path, mode, direction) of an earlier
    one; the ratios are derived again over the merged rows. "machine" is the
    first report's; "runs" keeps each one's machine, seconds and completeness."""

    def key(row):
        return (
            row["backend"],
            row["config"],
            row["path"],
            row["mode"],
            row["direction"],
        )

    rows: dict[tuple[str, ...], dict] = {}
    configs: dict[str, dict] = {}
    backends: dict[str, dict] = {}
    for report in reports:
        configs.update(report["configs"])
        for name, entry in report["backends"].items():
            if name not in backends or backends[name]["skipped"]:
                backends[name] = entry
        rows.update({key(r): dict(r) for r in report["rows"]})
    merged = dict(reports[0])
    by_name = {name: BenchConfig.from_json(c) for name, c in configs.items()}
    merged.update(
        configs=configs,
        backends=backends,
        modes={k: v for r in reports for k, v in r.get("modes", {}).items()},
        natives={k: v for r in reports for k, v in r.get("natives", {}).items()},
        timm={k: v for r in reports for k, v in r.get("timm", {}).items()},
        rows=derive(list(rows.values()), by_name),
        seconds=sum(r.get("seconds") or 0 for r in reports),
        complete=all(r.get("complete", True) for r in reports),
        runs=[
            {
                "machine": r.get("machine"),
                "seconds": r.get("seconds"),
                "complete": r.get("complete", True),
                "options": r.get("options"),
            }
            for r in reports
        ],
    )
    return merged


def write_json(report, path):
    """The report as strict JSON to `path` ("-": stdout), a file whole or not at all."""
    text = json.dumps(report, indent=1, allow_nan=False) + "\n"
    if path == "-":
        import sys

        sys.stdout.write(text)
        sys.stdout.flush()
        return
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_text(text)
        tmp.replace(path)
    except OSError:
        tmp.unlink(missing_ok=True)
        raise


def cell(row):
    """'412 ms, 63%, 1.05x, 0.21 GB' for an ok row, else its status."""
    if row is None:
        return ""
    if row["status"] != OK:
        return row["status"]
    ms = row["ms"]
    parts = [
        f"{ms:.0f} ms" if ms >= 100 else f"{ms:.1f} ms" if ms >= 10 else f"{ms:.2f} ms"
    ]
    if row.get("ceiling_pct") is not None:
        parts.append(f"{row['ceiling_pct']:.0f}%")
    if row.get("native_ratio") is not None:
        parts.append(f"{row['native_ratio']:.2f}x")
    parts.append(f"{row['peak_gb']:.2f} GB")
    text = ", ".join(parts)
    if row.get("check") and not row["check"]["passed"]:
        text += " (OVER BUDGET)"
    return text


def _config_title(report, name):
    c = report["configs"][name]
    config = BenchConfig.from_json(c)
    return (
        f"{name}: {config.describe()} (N={config.tokens}; "
        f"{c['forward_gflop']:.3g} GFLOP forward, "
        f"{c['forward_backward_gflop']:.3g} forward+backward)"
    )


def _ceiling_line(report, name, backends):
    c = BenchConfig.from_json(report["configs"][name])
    rows = c.batch * c.tokens
    values = []
    for b in backends:
        value = median_ceiling(report["rows"], b, name)
        values.append(f"{b} {value:.3g}" if value else f"{b} -")
    return (
        f"matmul ceiling GF/s, ({rows}, {c.channels}) @ ({c.channels}, {c.channels}), "
        f"median over the workers: " + ", ".join(values)
    )


def _paths_line(report, name, backends):
    """What the layer ran for "auto" (and the chunk size of chunked runs),
    by the layer's own rule, per backend."""
    runs: dict[str, dict[str, set[str]]] = {}  # path -> backend -> chosen paths
    for row in report["rows"]:
        if row["config"] != name or row["status"] != OK or not row.get("chosen_path"):
            continue
        chosen = row["chosen_path"] + (
            f" ({row['chunk_size']} queries/chunk)" if row.get("chunk_size") else ""
        )
        if (
            row["path"] == AUTO
            or row["path"] != row["chosen_path"]
            or row.get("chunk_size")
        ):
            runs.setdefault(row["path"], {}).setdefault(row["backend"], set()).add(
                chosen
            )
    if not runs:
        return None
    return "layer paths run: " + "; ".join(
        f"{path} -> "
        + ", ".join(f"{b} {'/'.join(sorted(by[b]))}" for b in backends if b in by)
        for path, by in runs.items()
    )


def config_table(report, name, markdown=False):
    """The table of config `name`: a line per (path, mode, direction), a column
    per backend."""
    backends = [b for b in report["backends"] if not report["backends"][b]["skipped"]]
    index = {
        (r["backend"], r["path"], r["mode"], r["direction"]): r
        for r in report["rows"]
        if r["config"] == name
    }
    header = ("path", "mode", "direction", *backends)
    lines = []
    for path in PATHS:
        for mode in MODES:
            for direction in DIRECTIONS:
                found = [index.get((b, path, mode, direction)) for b in backends]
                if any(found):
                    lines.append(
                        (
                            path,
                            mode,
                            SHORT_DIRECTIONS[direction],
                            *[cell(r) for r in found],
                        )
                    )
    table = format_table(header, lines, markdown=markdown)
    extra = [_ceiling_line(report, name, backends), _paths_line(report, name, backends)]
    return "\n".join(
        [_config_title(report, name), "", table, "", *[e for e in extra if e]]
    )


def summary_table(report, markdown=False, mode=COMPILED):
    """One table of every config in one mode (default "compiled", each
    backend's usual way): a line per (config, path, direction)."""
    backends = [b for b in report["backends"] if not report["backends"][b]["skipped"]]
    index = {
        (r["backend"], r["config"], r["path"], r["direction"]): r
        for r in report["rows"]
        if r["mode"] == mode
    }
    header = ("config", "path", "direction", *backends)
    lines = []
    for name in report["configs"]:
        for path in PATHS:
            for direction in DIRECTIONS:
                found = [index.get((b, name, path, direction)) for b in backends]
                if any(found):
                    lines.append(
                        (
                            name,
                            path,
                            SHORT_DIRECTIONS[direction],
                            *[cell(r) for r in found],
                        )
                    )
    title = f"mode: {mode}; " + "; ".join(
        _config_title(report, name).replace(f"{name}: ", f"{name} = ", 1)
        for name in report["configs"]
    )
    table = format_table(header, lines, markdown=markdown)
    return title + "\n\n" + table


def notes(report):
    """Why rows did not run: one line per distinct (status, reason), with its rows."""
    groups: dict[tuple[str, str], list[dict]] = {}  # (status, reason) -> rows
    for row in report["rows"]:
        if row["status"] == OK:
            if row.get("check") and not row["check"]["passed"]:
                groups.setdefault(
                    (
                        "over budget",
                        "forward output vs the float64 reference: "
                        f"error {row['check']['error']:.3g} > budget "
                        f"{row['check']['budget']:.3g}",
                    ),
                    [],
                ).append(row)
            continue
        groups.setdefault((row["status"], row.get("reason") or ""), []).append(row)
    lines = []
    for (status, reason), rows in groups.items():
        if status == UNSUPPORTED or len(rows) > 3:
            where = f"{len(rows)} rows"
        else:
            where = "; ".join(
                f"{r['backend']} {r['config']} {r['path']} {r['mode']} "
                f"{SHORT_DIRECTIONS[r['direction']]}"
                for r in rows
            )
        lines.append(f"- {status} ({where}): {reason}")
    return lines


def checks_line(report):
    checked = [r for r in report["rows"] if r["status"] == OK and r.get("check")]
    if not checked:
        return (
            "forward outputs checked against the float64 reference: none (N too large)"
        )
    passed = sum(r["check"]["passed"] for r in checked)
    configs = sorted({r["config"] for r in checked})
    return (
        "forward outputs checked against the float64 NumPy reference "
        "(its budget rule): "
        f"{passed} of {len(checked)} within budget (configs {', '.join(configs)}; "
        f"Keras MultiHeadAttention is a different block, not checked)"
    )


def render(report, markdown=False, summary=False):
    """The whole text report: the tables (a table per config, or with
    `summary` one table of the compiled mode), the legend, the notes."""
    parts = []
    skipped = {b: v["skipped"] for b, v in report["backends"].items() if v["skipped"]}
    for backend, reason in skipped.items():
        parts.append(f"{backend}: skipped ({reason})")
    if summary:
        parts.append(summary_table(report, markdown))
    for name in report["configs"] if not summary else ():
        if any(r["config"] == name for r in report["rows"]):
            parts.append(config_table(report, name, markdown))
    machine = report["machine"]
    if machine.get("load_average_start") is not None:
        parts.append(
            f"machine: {machine['cpus']} CPUs; 1-minute load average "
            f"{machine['load_average_start']:.1f} at the start, "
            f"{machine['load_average_end']:.1f} at the end (a load above the "
            "CPU count slows and scatters every time; torch's most)."
        )
    peers = {
        name: module
        for name, module in report.get("timm", {}).items()
        if any(r["path"] == TIMM and r["config"] == name for r in report["rows"])
    }
    if peers:
        parts.append(
            "timm rows: timm's own module of the block, the same weights: "
            + "; ".join(f"{name} {module}" for name, module in peers.items())
            + "."
        )
    parts.append(LEGEND + ".")
    parts.append(f"GF/s counts {report['flops']}.")
    parts.append(checks_line(report) + ".")
    lines = notes(report)
    if lines:
        parts.append("rows that did not run:\n" + "\n".join(lines))
    return "\n\n".join(parts)


def plot(report, path):
    """A PNG of time and memory against N: a column per backend, lines per
    (path, direction) in the mode that ran fastest at each config; the
    relative-encoding configs as separate points.

    Returns:
        The number of lines drawn (0: nothing written).
    """
    import matplotlib

    matplotlib.use("Agg")  # no display: a file only
    from matplotlib import pyplot as plt

    backends = [b for b in report["backends"] if not report["backends"][b]["skipped"]]
    # (backend, attention path, direction, encoding) -> {N: row}
    best: dict[tuple[str, str, str, str], dict[int, dict]] = {}
    for row in report["rows"]:
        if row["status"] != OK:
            continue
        config = report["configs"][row["config"]]
        key = (
            row["backend"],
            row["path"],
            row["direction"],
            config["position_encoding"],
        )
        points = best.setdefault(key, {})
        n = config["tokens"]
        if n not in points or row["ms"] < points[n]["ms"]:
            points[n] = row
    if not best:
        return 0
    figure, axes = plt.subplots(
        2, len(backends), figsize=(5.5 * len(backends), 8.5), squeeze=False
    )
    colours = dict(zip(PATHS, plt.rcParams["axes.prop_cycle"].by_key()["color"]))
    drawn = 0
    for col, backend in enumerate(backends):
        for (b, attention, direction, encoding), points in sorted(best.items()):
            if b != backend:
                continue
            ns = sorted(points)
            style = "-" if direction == FORWARD else "--"
            marker = "o" if encoding == "none" else "x"
            label = f"{attention} {SHORT_DIRECTIONS[direction]}" + (
                "" if encoding == "none" else f" ({encoding})"
            )
            for r, stat in enumerate(("ms", "peak_gb")):
                axes[r][col].plot(
                    ns,
                    [points[n][stat] for n in ns],
                    style,
                    marker=marker,
                    color=colours.get(attention),
                    label=label,
                )
            drawn += 1
        for r, what in enumerate(("median time, ms", "peak memory growth, GB")):
            ax = axes[r][col]
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlabel("N = H * W")
            ax.set_ylabel(what)
            ax.set_title(f"{backend}: {what.split(',')[0]}")
            ax.grid(True, which="both", alpha=0.3)
        axes[0][col].legend(fontsize=7)
    figure.suptitle(
        "mhsa-core bench (the fastest mode at each point)\n"
        "solid: forward, dashed: forward+backward, x: relative encoding",
        fontsize=10,
    )
    figure.tight_layout()
    target = Path(path)
    tmp = target.with_name(target.name + ".tmp.png")
    try:
        figure.savefig(tmp, dpi=110)
        tmp.replace(target)
    finally:
        plt.close(figure)
        tmp.unlink(missing_ok=True)
    return drawn
