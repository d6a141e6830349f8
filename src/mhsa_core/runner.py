"""Cross-backend runner: the same cases under each Keras backend, one subprocess each.

Keras fixes its backend at import, and importing TensorFlow and torch in one
process can crash, so every backend gets its own worker process
(`python -m mhsa_core.worker JOB_DIR`, with KERAS_BACKEND set). One worker
handles all the cases of a run: start-up costs seconds. Parent and workers
exchange only files: `job.json` and one `.npz` per case in, a `.npz` per case
and `result.json` per backend out. A worker that crashes or exceeds its
timeout is that backend's failure, with the tail of its stderr; the other
backends' results still come back.

The parent process never runs a framework; workers import only their own.
"""

import dataclasses
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

BACKENDS = ("tensorflow", "torch", "jax", "numpy")
_STDERR_TAIL_CHARS = 3000


def backend_available(backend):
    """Whether the framework of a Keras backend is importable here."""
    if backend not in BACKENDS:
        raise ValueError(
            f"Unknown backend. Expected one of {BACKENDS}. Received: backend={backend!r}"
        )
    return importlib.util.find_spec(backend) is not None


@dataclasses.dataclass
class Case:
    """One thing to run on every backend.

    Attributes:
        name: Unique, short (used in file names and reports).
        config: `MultiHeadSelfAttention2D` arguments.
        inputs: {"x": array, optionally "attention_mask": array}.
        weights: the canonical weight dict (see `mhsa_core.reference`).
        tasks: what the worker computes, e.g. ("forward",).
        dtype: the layer's dtype policy.
    """

    name: str
    config: dict
    inputs: dict
    weights: dict
    tasks: tuple = ("forward",)
    dtype: str = "float32"


@dataclasses.dataclass
class BackendRun:
    """What one backend's worker returned."""

    backend: str
    ok: bool
    seconds: float
    error: str | None = None  # why the worker failed or was skipped
    results: dict = dataclasses.field(default_factory=dict)  # case -> {key: array}
    case_errors: dict = dataclasses.field(default_factory=dict)  # case -> traceback
    info: dict = dataclasses.field(default_factory=dict)  # versions, timings


def _write_job(job_dir, cases):
    names = [case.name for case in cases]
    if len(set(names)) != len(names):
        raise ValueError(f"Case names must be unique. Received: names={names}")
    job = {"cases": []}
    for i, case in enumerate(cases):
        arrays = {f"input:{k}": np.asarray(v) for k, v in case.inputs.items()}
        arrays.update({f"weight:{k}": np.asarray(v) for k, v in case.weights.items()})
        np.savez(job_dir / f"case{i}.npz", **arrays)
        job["cases"].append(
            {
                "name": case.name,
                "file": f"case{i}.npz",
                "config": case.config,
                "tasks": list(case.tasks),
                "dtype": case.dtype,
            }
        )
    (job_dir / "job.json").write_text(json.dumps(job, indent=1))


def _worker_env(backend):
    env = dict(os.environ)
    env["KERAS_BACKEND"] = backend
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if backend == "jax":
        # float64 cases must really be float64 (JAX computes them in float32
        # otherwise); float32 arrays are unaffected.
        env["JAX_ENABLE_X64"] = "1"
    # Make the worker import this very copy of mhsa_core.
    src = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (src, env.get("PYTHONPATH", "")) if p
    )
    return env


def _read_results(out_dir, job):
    info = json.loads((out_dir / "result.json").read_text())
    results = {}
    for i, case in enumerate(job["cases"]):
        path = out_dir / f"result{i}.npz"
        if path.exists():
            with np.load(path) as data:
                results[case["name"]] = {k: data[k] for k in data.files}
    return info, results


def run_backends(cases, backends, *, timeout=900.0, on_event=None, job_dir=None):
    """Runs `cases` under each backend; returns {backend: BackendRun}.

    Backends run one after another, so that each worker's timings are taken on
    an otherwise idle machine.

    Args:
        cases: a list of `Case`.
        backends: names from `BACKENDS`.
        timeout: seconds one worker may take in all.
        on_event: optional callable(backend, event) for progress display,
            event in {"start", "done", "failed", "skipped"}.
        job_dir: where to write the exchange files (default: a temporary
            directory, removed afterwards).
    """
    for backend in backends:
        backend_available(backend)  # validates the name
    notify = on_event or (lambda backend, event: None)
    with tempfile.TemporaryDirectory(prefix="mhsa-core-") as tmp:
        root = Path(job_dir) if job_dir is not None else Path(tmp)
        root.mkdir(parents=True, exist_ok=True)
        _write_job(root, cases)
        job = json.loads((root / "job.json").read_text())
        runs = {}
        for backend in backends:
            if not backend_available(backend):
                runs[backend] = BackendRun(
                    backend, ok=False, seconds=0.0,
                    error=f"not installed (no module named {backend!r})",
                )
                notify(backend, "skipped")
                continue
            notify(backend, "start")
            runs[backend] = _run_one(root, job, backend, timeout)
            notify(backend, "done" if runs[backend].ok else "failed")
        return runs


def _run_one(root, job, backend, timeout):
    out_dir = root / backend
    out_dir.mkdir(exist_ok=True)
    start = time.perf_counter()
    stderr_path = out_dir / "stderr.txt"
    with open(stderr_path, "wb") as stderr:
        try:
            proc = subprocess.run(
                [sys.executable, "-m", "mhsa_core.worker", str(root), str(out_dir)],
                env=_worker_env(backend),
                stdout=subprocess.DEVNULL,
                stderr=stderr,
                timeout=timeout,
                check=False,
            )
            returncode = proc.returncode
        except subprocess.TimeoutExpired:
            returncode = None
    seconds = time.perf_counter() - start
    tail = stderr_path.read_text(errors="replace")[-_STDERR_TAIL_CHARS:]
    if returncode is None:
        return BackendRun(backend, ok=False, seconds=seconds,
                          error=f"timed out after {timeout:g} s\n{tail}")
    if returncode != 0 or not (out_dir / "result.json").exists():
        return BackendRun(backend, ok=False, seconds=seconds,
                          error=f"worker exited with status {returncode}\n{tail}")
    info, results = _read_results(out_dir, job)
    case_errors = info.pop("case_errors", {})
    return BackendRun(backend, ok=not case_errors, seconds=seconds, results=results,
                      case_errors=case_errors, info=info,
                      error=None if not case_errors else "some cases failed")
