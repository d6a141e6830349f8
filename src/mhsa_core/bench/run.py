"""A bench run: one worker process per measurement, a watchdog on each, the
rows collected and the ratios between them derived.

The parent imports no framework. Each worker (`python -m mhsa_core.bench.worker`)
runs under its backend's environment (`_subprocess.worker_env`, without
JAX's 64-bit mode: the bench is float32). The parent polls the worker's
resident set and its time: over `max_memory_gb` or `timeout` seconds it kills
the worker's process group (the worker and what it started, e.g.
torch.compile's compile workers) and records the row as "out of memory" /
"timeout". A worker that dies or prints no result is a "failed" row with the
last line of its stderr. Nothing a worker does stops the run.
"""

from __future__ import annotations

import json
import signal
import statistics
import time
from pathlib import Path
from typing import cast

from mhsa_core import _subprocess
from mhsa_core._subprocess import unavailable_reason
from mhsa_core._text import last_line
from mhsa_core.bench import timm_peer
from mhsa_core.bench import worker as worker_protocol
from mhsa_core.bench.configs import BenchConfig
from mhsa_core.bench.flops import flops
from mhsa_core.bench.plan import NATIVE, TIMM, Measurement

POLL_SECONDS = 0.05
GB = 1e9


def default_max_memory_gb() -> float:
    """Half of the memory available now (MemAvailable), or 8 GB if unknown."""
    try:
        text = Path("/proc/meminfo").read_text()
        kb = int(text.split("MemAvailable:")[1].split()[0])
        return round(kb * 1024 / GB / 2, 1)
    except (OSError, IndexError, ValueError):
        return 8.0


def _watch(process, start, limit, timeout, max_memory_gb):
    """Wait for the worker; kill its group over the memory limit or the time.
    Returns None, or the status and reason of the kill."""
    peak = 0
    while process.running:
        peak = max(peak, process.rss_bytes())
        elapsed = time.perf_counter() - start
        killed = None
        if peak > limit:
            killed = {
                "status": worker_protocol.OUT_OF_MEMORY,
                "reason": f"killed at {peak / GB:.1f} GB resident "
                f"(over --max-memory {max_memory_gb:g} GB)",
            }
        elif elapsed > timeout:
            killed = {
                "status": worker_protocol.TIMEOUT,
                "reason": (
                    f"killed after {elapsed:.0f} s (over --timeout {timeout:g} s)"
                ),
            }
        if killed:
            process.kill()
            return killed
        time.sleep(POLL_SECONDS)
    return None


def run_worker(
    measurement: Measurement,
    config: BenchConfig,
    repeats: int,
    timeout: float,
    max_memory_gb: float,
) -> dict:
    """One measurement in a fresh worker process; its result dict (never raises
    for what the worker does)."""
    spec = json.dumps(
        {
            "measurement": measurement.to_json(),
            "config": config.to_json(),
            "repeats": repeats,
        }
    )
    limit = max_memory_gb * GB
    start = time.perf_counter()
    # float32 throughout: no JAX 64-bit mode. A session of its own: the
    # watchdog kills the worker with what it started (torch.compile's workers).
    process = _subprocess.Process(
        worker_protocol.__name__,
        [spec],
        env=_subprocess.worker_env(measurement.backend),
        own_group=True,
    )
    try:
        try:
            killed = _watch(process, start, limit, timeout, max_memory_gb)
        except BaseException:  # Ctrl-C: the worker is in a session of its own
            process.kill()
            raise
        process.wait()
        seconds = time.perf_counter() - start
        lines = [line for line in process.stdout_lines() if line.startswith("{")]
        err_text = process.stderr_tail()
    finally:
        process.close()
    if killed:
        return {**killed, "seconds": seconds}
    if lines:
        try:
            return {**json.loads(lines[-1]), "seconds": seconds}
        except json.JSONDecodeError:
            pass
    code = cast(int, process.returncode)  # not None: it ended (`wait` above)
    how = (
        f"killed by signal {-code}"
        + (" (out of memory?)" if code == -signal.SIGKILL else "")
        if code < 0
        else f"exited with status {code}"
    )
    status = worker_protocol.FAILED
    if code == -signal.SIGKILL:
        status = worker_protocol.OUT_OF_MEMORY
    return {
        "status": status,
        "reason": f"worker {how}: {last_line(err_text, 'no output')}",
        "seconds": seconds,
    }


def derive(rows, configs):
    """Fill each row's GF/s, % of its own ceiling and ratio to the fastest
    native of its (backend, config, direction), in place."""
    fastest: dict[tuple[str, str, str], float] = {}
    for row in rows:
        if row["path"] == NATIVE and row["status"] == worker_protocol.OK:
            key = (row["backend"], row["config"], row["direction"])
            fastest[key] = min(fastest.get(key, float("inf")), row["ms"])
    for row in rows:
        row.update(gflops=None, ceiling_pct=None, native_ratio=None)
        if row["status"] != worker_protocol.OK:
            continue
        work = flops(configs[row["config"]], row["direction"])
        row["gflops"] = work / (row["ms"] / 1e3) / 1e9
        if row.get("ceiling_gflops"):
            row["ceiling_pct"] = 100.0 * row["gflops"] / row["ceiling_gflops"]
        native = fastest.get((row["backend"], row["config"], row["direction"]))
        if native:
            row["native_ratio"] = row["ms"] / native
    return rows


def skipped_backends(backends):
    """{backend: why it is skipped} of the backends not installed here."""
    reasons = {b: unavailable_reason(b) for b in dict.fromkeys(backends)}
    return {b: reason for b, reason in reasons.items() if reason}


def skipped_row_reason(measurement: Measurement) -> str | None:
    """Why a row cannot run here, known without a worker (timm not
    installed: a "skipped" row), or None."""
    return timm_peer.unavailable_reason() if measurement.path == TIMM else None


def run(measurements, configs, *, repeats, timeout, max_memory_gb, on_row=None):
    """Every measurement in its own worker, in order; a backend that is not
    installed gets no worker and no row; a row whose module is not installed
    (`skipped_row_reason`) gets no worker, and a "skipped" row with the reason.

    Args:
        measurements: `plan.Measurement`s.
        configs: {name: BenchConfig} for their configs.
        on_row: called with (index, total, row) after each row (progress).

    Returns:
        (rows, skipped): the row dicts (measurement fields + the worker's
        result + `derive`'s), and {backend: reason} of the backends skipped.
    """
    skipped = skipped_backends(m.backend for m in measurements)
    todo = [m for m in measurements if m.backend not in skipped]
    rows = []
    for i, m in enumerate(todo):
        reason = skipped_row_reason(m)
        if reason:
            result = {"status": worker_protocol.SKIPPED, "reason": reason}
        else:
            result = run_worker(m, configs[m.config], repeats, timeout, max_memory_gb)
        row = {**m.to_json(), "reason": None, **result}
        rows.append(row)
        if on_row is not None:
            on_row(i, len(todo), row)
    return derive(rows, configs), skipped


def median_ceiling(rows, backend, config):
    """The median of the ceilings the workers of (backend, config) measured, or None."""
    values = [
        r["ceiling_gflops"]
        for r in rows
        if r["backend"] == backend and r["config"] == config and r.get("ceiling_gflops")
    ]
    return statistics.median(values) if values else None
