"""Worker of the cross-backend runner:
`python -m mhsa_core.consistency.worker JOB_DIR OUT_DIR`.

Runs under the backend of this process (KERAS_BACKEND), the only part of the
consistency tool that imports Keras. Reads phase names on stdin, one per
line ("compute", "load"), and prints `done PHASE` after each; exits at end of
input. See `runner` for the exchange and `protocol` for every file and key.

Phase "compute", per case i of JOB_DIR/job.json: one `TaskContext` (the
case's model and inputs, `task_context`), then each of the case's tasks that
this backend runs, looked up in two tables: the matrix's own (`tasks.TASKS`)
and the opt-in features' (`features.tasks()`, each given the case's options of
its feature). Files written to OUT_DIR:
- `result_file(i, task)`: the task's results (`tasks`, and each feature's
  module, name their keys);
- `inputs_file(i)`: the inputs made here from the loaded model (a model case
  given none);
- `model_file(i)` (task SAVE), and what tasks write besides (`work_file`);
- `phase_file(phase)`: versions, timings, and `errors[case][task]`.
A task that raises is recorded there and the worker goes on.

Phase "load": `load_file(saver, i)`: `output_key(v, o)` of the model the
backend `saver` saved, and `identical_key(j)` per weight (1 = bit-identical).
"""

import importlib
import json
import os
import sys
import traceback
from pathlib import Path

import numpy as np

from mhsa_core._subprocess import tail
from mhsa_core.consistency import features, protocol, tasks
from mhsa_core.consistency.arrays import portable
from mhsa_core.consistency.protocol import (
    COMPUTE,
    LOAD,
    SAVE,
    SETUP_ERROR,
    case_backends,
)
from mhsa_core.consistency.task_context import (
    ModelInputs,
    TaskContext,
    call_structure,
)


def run_task(task, ctx, case, timings):
    """Runs `task` of job.json's `case` on its `ctx`: the matrix's own
    (`tasks.TASKS`) or a feature's (`features.tasks()`), which also gets the
    case's options of its feature (the feature's defaults if it has none)."""
    if task in tasks.TASKS:
        return tasks.TASKS[task](ctx, timings)
    feature = features.tasks()[task]
    options = feature.options_from_json(case.get("features", {}).get(feature.name))
    return feature.tasks[task](ctx, options, timings)


def _versions(keras):
    backend = keras.backend.backend()
    try:
        framework = __import__(backend).__version__
    except (ImportError, AttributeError):
        framework = None
    return {
        "backend": backend,
        "keras_version": keras.__version__,
        "framework_version": framework,
    }


def _write_json(path, data):
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)


# case index -> its input variants (in the model's input order), kept from the
# compute phase for the load phase (one worker process runs both).
_VARIANTS: dict[int, list] = {}


def run_compute(keras, job, job_dir, out_dir):
    info = {"versions": _versions(keras), "timings": {}, "errors": {}}
    me = keras.backend.backend()
    safe_mode = job["options"].get("safe_mode", True)
    for i, case in enumerate(job["cases"]):
        if me not in case_backends(case["dtype"], [me]):
            continue
        errors = {}
        timings: dict[str, float] = {}
        try:
            with np.load(job_dir / case["file"]) as data:
                arrays = {k: data[k] for k in data.files}
            ctx = TaskContext(
                keras, case, arrays, safe_mode=safe_mode, out_dir=out_dir, index=i
            )
            _VARIANTS[i] = ctx.variants  # the load phase runs the same inputs
        except Exception:  # noqa: BLE001 -- reported per case, the run goes on
            errors[SETUP_ERROR] = tail(traceback.format_exc())
            info["errors"][case["name"]] = errors
            continue
        # e.g. the numpy backend: no gradients, jit or saving
        inference = features.inference_tasks()
        for task in protocol.backend_tasks(me, case["tasks"], inference):
            try:
                results = run_task(task, ctx, case, timings)
                np.savez(out_dir / protocol.result_file(i, task), **results)
            except Exception:  # noqa: BLE001
                errors[task] = tail(traceback.format_exc())
        info["timings"][case["name"]] = timings
        if errors:
            info["errors"][case["name"]] = errors
    _write_json(out_dir / protocol.phase_file(COMPUTE), info)


def run_load(keras, job, job_dir, out_dir):
    """Loads every `.keras` file the other backends saved, and runs it here."""
    info = {"versions": _versions(keras), "errors": {}}
    me = keras.backend.backend()
    safe_mode = job["options"].get("safe_mode", True)
    for i, case in enumerate(job["cases"]):
        if SAVE not in case["tasks"] or me not in case_backends(case["dtype"], [me]):
            continue
        variants = _VARIANTS.get(i)
        if (
            variants is None
        ):  # the case's setup failed in phase compute (an error there)
            continue
        for saver in job["options"]["backends"]:
            path = job_dir / saver / protocol.model_file(i)
            if saver == me or not path.exists():
                continue
            try:
                model = keras.saving.load_model(path, safe_mode=safe_mode)
                with np.load(job_dir / saver / protocol.result_file(i, SAVE)) as data:
                    saved = [
                        data[protocol.saved_weight_key(j)]
                        for j in range(len(data.files))
                    ]
                loaded = [portable(w) for w in model.get_weights()]
                if len(loaded) != len(saved):
                    raise ValueError(
                        f"{len(loaded)} weights loaded, {len(saved)} saved"
                    )
                results = {
                    protocol.identical_key(j): np.asarray(
                        a.shape == b.shape
                        and a.dtype == b.dtype
                        and np.array_equal(a, b)
                    )
                    for j, (a, b) in enumerate(zip(loaded, saved))
                }
                spec = ModelInputs(keras, model) if case["kind"] == "model" else None
                for v, xs in enumerate(variants):
                    out = model(call_structure(spec, xs), training=False)
                    for o, each in enumerate(keras.tree.flatten(out)):
                        results[protocol.output_key(v, o)] = portable(
                            keras.ops.convert_to_numpy(each)
                        )
                # numpy's stub: a ** dict might name savez's allow_pickle; these
                # keys are result keys ("out/0/..."), never that.
                file = out_dir / protocol.load_file(saver, i)
                np.savez(file, **results)  # type: ignore[arg-type]
            except Exception:  # noqa: BLE001
                info["errors"].setdefault(case["name"], {})[
                    protocol.load_error_key(saver)
                ] = tail(traceback.format_exc())
    _write_json(out_dir / protocol.phase_file(LOAD), info)


_PHASES = {COMPUTE: run_compute, LOAD: run_load}


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    job_dir, out_dir = Path(argv[0]), Path(argv[1])
    import keras

    job = json.loads((job_dir / protocol.JOB_FILE).read_text())
    if not job["options"].get("safe_mode", True):
        # Also for the float64 clone's from_config (Lambda layers), not only
        # for load_model(safe_mode=False).
        keras.config.enable_unsafe_deserialization()
    for module in job["options"].get("imports", []):
        importlib.import_module(module)  # registers a user's custom objects
    for line in sys.stdin:
        phase = line.strip()
        if not phase:
            continue
        _PHASES[phase](keras, job, job_dir, out_dir)
        print(protocol.done_line(phase), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
