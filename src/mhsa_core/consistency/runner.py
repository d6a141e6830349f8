"""Cross-backend runner: the same cases under each Keras backend, one worker process
each.

Keras fixes its backend at import, and importing TensorFlow and torch in one
process can crash, so every backend gets its own worker process
(`python -m mhsa_core.consistency.worker JOB_DIR OUT_DIR`, KERAS_BACKEND
set). One worker handles all the cases of a run (start-up costs seconds) and
lives through both phases of it:

1. "compute": every case's tasks (forward, gradients, optimizer steps, ...),
   and the case's model saved as `.keras`;
2. "load": the `.keras` files the *other* backends saved, loaded and run here.

The parent sends each phase's name on the worker's stdin and waits for the
worker to print `done PHASE`. Data goes only through files (`protocol` names
them): `job.json` and one `.npz` per case in, one `.npz` per case and task
out, `phase-PHASE.json` with timings and errors. A worker that crashes or
exceeds its timeout is that backend's failure, with the tail of its stderr;
the other backends' results still come back.

The parent never runs a framework; workers import only their own.
"""

import dataclasses
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from mhsa_core import _subprocess
from mhsa_core._subprocess import (
    NOT_INSTALLED,
    backend_available,
    missing_modules,
    unavailable_reason,
)
from mhsa_core.consistency import features, protocol, worker

__all__ = [
    "BackendRun",
    "run_backends",
    "worker_env",
    "backend_available",
    "missing_modules",
    "unavailable_reason",
    "NOT_INSTALLED",
    "SOME_TASKS_FAILED",
]

# A run's error when its worker ran to the end but some tasks raised (their
# tracebacks are in `BackendRun.errors`): not a crash of the worker.
SOME_TASKS_FAILED = "some tasks failed"


@dataclasses.dataclass
class BackendRun:
    """What one backend's worker returned.

    `results[case][task]` maps result keys to arrays (`protocol`);
    `errors[case][task]` holds the traceback of a task that raised;
    `loads[(saver, case)]` the results of loading the file `saver` saved.
    """

    backend: str
    ok: bool = True
    error: str | None = None  # why the worker failed or was skipped
    seconds: float = 0.0
    results: dict = dataclasses.field(default_factory=dict)
    errors: dict = dataclasses.field(default_factory=dict)
    loads: dict = dataclasses.field(default_factory=dict)
    info: dict = dataclasses.field(default_factory=dict)
    # inputs[case]: the input variants ([{name: array}]) the worker made
    # from the model (a model case given no inputs)
    inputs: dict = dataclasses.field(default_factory=dict)


def _write_job(job_dir, cases, options):
    names = [case.name for case in cases]
    if len(set(names)) != len(names):
        raise ValueError(f"Case names must be unique. Received: names={names}")
    job = {"options": options, "cases": []}
    for i, case in enumerate(cases):
        arrays = {}
        for v, variant in enumerate(case.variants):
            arrays.update(
                {
                    protocol.job_input_key(v, k): np.asarray(a)
                    for k, a in variant.items()
                }
            )
        for k, a in (case.weights or {}).items():
            arrays[protocol.job_weight_key(k)] = np.asarray(a)
        # numpy's stub: a ** dict might name savez's allow_pickle; these keys
        # are job keys ("input/0/x", "weight/..."), never that.
        np.savez(job_dir / protocol.case_file(i), **arrays)  # type: ignore[arg-type]
        unknown = set(case.tasks) - set(features.known_tasks())
        if unknown:
            raise ValueError(f"Unknown tasks {sorted(unknown)} in case {case.name!r}")
        job["cases"].append(
            {
                "name": case.name,
                "file": protocol.case_file(i),
                "kind": case.kind,
                "config": case.config,
                "model_path": None if case.model_path is None else str(case.model_path),
                "variants": len(case.variants),
                # none: the workers make the inputs from the loaded model
                "input_names": list(case.variants[0]) if case.variants else [],
                "tasks": list(case.tasks),
                "dtype": case.dtype,
                "quantization": case.quantization,
                # {feature name: its options}: what its tasks read (`worker`)
                "features": {
                    name: dataclasses.asdict(options)
                    for name, options in case.features.items()
                },
            }
        )
    (job_dir / protocol.JOB_FILE).write_text(json.dumps(job, indent=1))
    return job


def worker_env(backend):
    """The environment of a matrix worker for `backend`: JAX in 64-bit mode
    (`_subprocess.worker_env`), as the float64 tasks need."""
    return _subprocess.worker_env(backend, jax_x64=True)


class _Worker:
    """A worker process (`python -m mhsa_core.consistency.worker`) through
    the phases of a run."""

    def __init__(self, backend, job_dir, out_dir):
        self.backend = backend
        self.process = _subprocess.Process(
            worker.__name__,
            [job_dir, out_dir],
            env=worker_env(backend),
            stdin=True,
            stderr_path=out_dir / protocol.STDERR_FILE,
        )

    def run_phase(self, phase, deadline):
        """Sends `phase` and waits for `done PHASE`; returns an error or None."""
        if not self.process.send(phase):
            return self._failure("worker exited before phase " + phase)
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self.process.kill()
                return self._failure(f"timed out in phase {phase!r}")
            try:
                line = self.process.next_line(remaining)
            except TimeoutError:
                continue
            if line is None:
                self.process.wait()
                return self._failure(
                    f"worker exited with status {self.process.returncode} "
                    f"in phase {phase!r}"
                )
            if line == protocol.done_line(phase):
                return None

    def _failure(self, what):
        return f"{what}\n{self.process.stderr_tail()}".rstrip()

    def close(self):
        self.process.close()


def run_backends(
    cases,
    backends,
    *,
    timeout=1800.0,
    on_event=None,
    job_dir=None,
    safe_mode=True,
    portability=True,
    imports=(),
):
    """Runs `cases` under each backend; returns {backend: BackendRun}.

    Backends run one after another within a phase, so that each worker's
    timings are taken on an otherwise idle machine.

    Args:
        cases: a list of `cases.Case`.
        backends: names from `BACKENDS`. Unavailable ones come back with
            `ok=False` and `error="not installed ..."`.
        timeout: seconds one worker may take over both phases.
        on_event: optional callable(backend, event, detail) for progress
            display; events "start", "done", "failed", "skipped".
        job_dir: where to write the exchange files (default: a temporary
            directory, removed afterwards).
        safe_mode: Keras safe mode when loading `.keras` files.
        portability: run the "load" phase (each backend loads the others' files).
        imports: modules each worker imports first (e.g. where a user model's
            custom layers are registered).
    """
    for backend in backends:
        backend_available(backend)  # validates the name
    notify = on_event or (lambda backend, event, detail=None: None)
    with tempfile.TemporaryDirectory(prefix="mhsa-core-") as tmp:
        root = Path(job_dir) if job_dir is not None else Path(tmp)
        root.mkdir(parents=True, exist_ok=True)
        options = {
            "safe_mode": bool(safe_mode),
            "backends": list(backends),
            "imports": list(imports),
        }
        job = _write_job(root, cases, options)
        runs, workers = {}, {}
        for backend in backends:
            reason = unavailable_reason(backend)
            if reason is not None:
                runs[backend] = BackendRun(backend, ok=False, error=reason)
                notify(backend, "skipped", runs[backend].error)
                continue
            out_dir = root / backend
            out_dir.mkdir(exist_ok=True)
            runs[backend] = BackendRun(backend)
        deadline = {}
        phases = [protocol.COMPUTE] + ([protocol.LOAD] if portability else [])
        try:
            for phase in phases:
                for backend, run in runs.items():
                    if not run.ok and run.error:
                        continue
                    if backend not in workers:
                        workers[backend] = _Worker(backend, root, root / backend)
                        deadline[backend] = time.monotonic() + timeout
                    notify(backend, "start", phase)
                    start = time.perf_counter()
                    error = workers[backend].run_phase(phase, deadline[backend])
                    run.seconds += time.perf_counter() - start
                    if error:
                        run.ok, run.error = False, error
                        notify(backend, "failed", phase)
                    else:
                        notify(backend, "done", phase)
        finally:
            for worker in workers.values():
                worker.close()
        for backend, run in runs.items():
            if backend in workers:
                _collect(run, root / backend, job)
        return runs


def _load_npz(path):
    with np.load(path) as data:
        return {k: data[k] for k in data.files}


def _collect(run, out_dir, job):
    """Reads what a worker wrote (also after it failed midway)."""
    for phase in protocol.PHASES:
        path = out_dir / protocol.phase_file(phase)
        if path.exists():
            info = json.loads(path.read_text())
            run.info.setdefault("timings", {}).update(info.get("timings", {}))
            run.info.update(info.get("versions", {}))
            for case, tasks in info.get("errors", {}).items():
                run.errors.setdefault(case, {}).update(tasks)
    for i, case in enumerate(job["cases"]):
        path = out_dir / protocol.inputs_file(i)
        if path.exists():
            arrays = _load_npz(path)
            count = 1 + max((protocol.variant_of(k) for k in arrays), default=-1)
            variants: list[dict[str, np.ndarray]] = [{} for _ in range(count)]
            for k, a in arrays.items():  # "input/{v}/{name}"
                variants[protocol.variant_of(k)][k.split("/", 2)[2]] = a
            run.inputs[case["name"]] = variants
        for task in case["tasks"]:
            path = out_dir / protocol.result_file(i, task)
            if path.exists():
                run.results.setdefault(case["name"], {})[task] = _load_npz(path)
        for saver in job["options"]["backends"]:
            path = out_dir / protocol.load_file(saver, i)
            if path.exists():
                run.loads[(saver, case["name"])] = _load_npz(path)
    if run.ok and any(run.errors.values()):
        run.ok = False
        run.error = SOME_TASKS_FAILED
