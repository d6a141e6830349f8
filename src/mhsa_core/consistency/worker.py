"""Worker of the cross-backend runner:
`python -m mhsa_core.consistency.worker JOB_DIR OUT_DIR`.

Runs under the backend of this process (KERAS_BACKEND), the only part of the
consistency tool that imports Keras. Reads phase names on stdin, one per
line ("compute", "load"), and prints `done PHASE` after each; exits at end of
input. See `runner` for the exchange and `protocol` for every file and key.

Files written to OUT_DIR, per case i of JOB_DIR/job.json:
- `result_file(i, task)`, by task:
  FORWARD / FORWARD64 / JIT / SCORES: `out_key(v)` per input variant v
  (`output_key(v, o)` per output o of a multi-output model)
  (FORWARD also AGAIN_KEY: variant 0 once more, to check repeatability);
  GRADS / GRADS64, per input variant v: `loss_key(v)`, `input_grad_key(v, k)`
  (float inputs), `weight_grad_key(v, j)` in the order of
  `model.trainable_variables`; and `start_key(j)` (the weights);
  OPTIMIZERS, per input variant v and optimizer of OPTIMIZER_SETTINGS:
  `step_key(optimizer, v, j)` (the weights after one step from the same start
  `start_key(j)`, with that variant's gradients `step_grad_key(v, j)`);
  SAVE: `saved_weight_key(j)` (all `model.get_weights()`), beside
  `model_file(i)`;
  LOCATE / LOCATE64 (opt-in, `--locate`): `layer_out_key(v, i, t)` of every
  layer call i, with LAYER_NAMES_KEY and LAYER_CLASSES_KEY (`locate`);
  DRIFT (opt-in): `drift_loss_key(run, s)`, `drift_weight_key(run, s, j)`
  of K optimizer steps in the model's dtype and in float64 (`drift.train`);
- `inputs_file(i)`: the inputs made here from the loaded model (a model case
  given none);
- `load_file(saver, i)` (phase LOAD): `output_key(v, o)` of the model the backend
  `saver` saved, and `identical_key(j)` per weight (1 = bit-identical);
- `phase_file(phase)`: versions, timings, and `errors[case][task]`.
A task that raises is recorded there and the worker goes on.
"""

import importlib
import json
import os
import re
import sys
import time
import traceback
from pathlib import Path

import numpy as np

from mhsa_core._subprocess import tail
from mhsa_core.consistency import protocol
from mhsa_core.consistency.arrays import portable
from mhsa_core.consistency.float64 import float64_clone
from mhsa_core.consistency.protocol import (
    AGAIN_KEY,
    COMPUTE,
    FORWARD_SECONDS,
    LOAD,
    SAVE,
    SETUP_ERROR,
    case_backends,
    out_key,
)

_TIMED_REPEATS = 3
_FLOAT_KINDS = "f"


def _xla_cannot_compile(error):
    """Whether a TensorFlow error is XLA lacking a kernel for some op."""
    text = str(error)
    return type(error).__name__ in ("InvalidArgumentError", "UnimplementedError") and (
        "XLA" in text or "not compilable" in text or "No registered" in text
    )


class _ModelInputs:
    """The inputs a loaded model takes, read from the model itself: names,
    shapes, dtypes, and the structure it is called with (one tensor, a list,
    or a dict keyed by input name).

    Args:
        keras: the imported keras module.
        model: a loaded `keras.Model`.
    """

    def __init__(self, keras, model):
        try:
            struct = model.input
        except (AttributeError, ValueError):  # e.g. a Sequential never called
            struct = None
        if isinstance(struct, dict):
            self.kind = "dict"
            self.names = sorted(struct)  # keras.tree.flatten's order
            tensors = [struct[k] for k in self.names]
        else:
            try:
                tensors = list(model.inputs or [])
            except (AttributeError, ValueError):
                tensors = []
            self.kind = (
                "list"
                if isinstance(struct, (list, tuple)) or len(tensors) > 1
                else "single"
            )
            self.names = [t.name for t in tensors]
        self.shapes = [tuple(t.shape) for t in tensors]
        self.dtypes = [keras.backend.standardize_dtype(t.dtype) for t in tensors]

    @property
    def known(self):
        return bool(self.names)

    def structure(self, xs):
        """The call argument for input arrays `xs` (in `names` order)."""
        if self.kind == "dict":
            return dict(zip(self.names, xs))
        if self.kind == "list":
            return list(xs)
        return xs[0] if len(xs) == 1 else list(xs)

    def generate(self, seed=0):
        """Deterministic input variants (`cases.generate_inputs`), as lists."""
        from mhsa_core.consistency import cases

        if not self.known:
            raise ValueError(
                "Cannot tell the model's inputs (it has no `inputs`: a subclassed "
                "model?); pass inputs (--inputs)."
            )
        specs = list(zip(self.names, self.shapes, self.dtypes))
        return [
            [variant[n] for n in self.names]
            for variant in cases.generate_inputs(specs, seed)
        ]

    def match(self, given, variants):
        """Given input variants (lists, in the order of the names `given`)
        reordered to the model's inputs: by name when `given` are the model's
        input names, else by order; ValueError (one line) if they do not fit."""
        if not self.known:
            return variants
        if sorted(given) == sorted(self.names):
            order = [given.index(n) for n in self.names]
        elif len(given) == len(self.names):
            order = list(range(len(given)))
        else:
            raise ValueError(
                f"The inputs do not fit the model: {len(given)} array(s) {given}, the "
                f"model takes {len(self.names)} input(s) {self.names}."
            )
        matched = [[xs[k] for k in order] for xs in variants]
        for xs in matched:
            for k, (x, name, shape) in enumerate(zip(xs, self.names, self.shapes)):
                if len(x.shape) != len(shape) or any(
                    d is not None and d != e for d, e in zip(shape, x.shape)
                ):
                    raise ValueError(
                        "The inputs do not fit the model: array "
                        f"{given[order[k]]!r} has shape {tuple(x.shape)}, the "
                        f"model's input {name!r} expects {shape} (None: any size)."
                    )
        return matched


class _CaseRunner:
    """One case in this worker: its model, inputs and tasks (`task_<name>`).

    Args:
        keras: the imported keras module.
        case: the case's entry of job.json.
        arrays: the case's arrays (`protocol.job_input_key`, `job_weight_key`).
        safe_mode: Keras safe mode for loading `.keras` files.
        out_dir: this worker's output directory (tasks that write files).
        index: the case's index in the job (file names of `protocol`).
        options: the job's options (job.json "options").
    """

    def __init__(
        self, keras, case, arrays, safe_mode, out_dir=None, index=0, options=None
    ):
        self.keras = keras
        self.case = case
        self.safe_mode = safe_mode
        self.out_dir = None if out_dir is None else Path(out_dir)
        self.index = index
        self.options = options or {}
        n = case["variants"]
        names = case["input_names"]
        self.variants = [
            [arrays[protocol.job_input_key(v, k)] for k in names] for v in range(n)
        ]
        prefix = protocol.JOB_WEIGHT_PREFIX
        self.weights = {
            k[len(prefix) :]: a for k, a in arrays.items() if k.startswith(prefix)
        }
        self.input_spec = None  # a model case: what the loaded model takes
        self.model, self.layer = self._build(case["dtype"])
        if case["kind"] == "model":
            self._model_variants()

    def _model_variants(self):
        """A model case's inputs, from the loaded model: the given ones matched
        to its inputs, or made here (and saved for the parent)."""
        self.input_spec = _ModelInputs(self.keras, self.model)
        if self.variants:
            self.variants = self.input_spec.match(
                list(self.case["input_names"]), self.variants
            )
            return
        self.variants = self.input_spec.generate(seed=0)
        if self.out_dir is not None:
            np.savez(
                self.out_dir / protocol.inputs_file(self.index),
                **{
                    protocol.job_input_key(v, name): x
                    for v, xs in enumerate(self.variants)
                    for name, x in zip(self.input_spec.names, xs)
                },
            )

    # -------------------------------------------------------------- models
    def _build(self, dtype):
        keras = self.keras
        case = self.case
        if case["kind"] == "model":
            model = keras.saving.load_model(
                case["model_path"], safe_mode=self.safe_mode
            )
            if dtype == "float64":
                model = float64_clone(model)
            return model, None
        from mhsa_core import MultiHeadSelfAttention2D

        layer = MultiHeadSelfAttention2D(**case["config"], dtype=dtype)
        x = self.variants[0][0]
        spatial = (None, None)
        if layer.data_format == "channels_last":
            x_shape = spatial + (x.shape[-1],)
        else:
            x_shape = (x.shape[1],) + spatial
        input_dtype = "float64" if dtype == "float64" else "float32"
        inputs = [keras.Input(x_shape, dtype=input_dtype, name="x")]
        if "attention_mask" in case["input_names"]:
            inputs.append(keras.Input(spatial, dtype="bool", name="attention_mask"))
            outputs = layer(inputs[0], attention_mask=inputs[1])
        else:
            outputs = layer(inputs[0])
        model = keras.Model(inputs, outputs, name=f"mhsa_{case['name']}")
        layer.set_weight_dict(self.weights)
        return model, layer

    def model64(self):
        if self.case["kind"] == "model":
            return float64_clone(self.model)
        return _CaseRunner._build(self, "float64")[0]

    def _call_inputs(self, xs):
        """The call argument for one variant's arrays: the structure the model
        takes (a dict for dict inputs, a list for several)."""
        if self.input_spec is not None:
            return self.input_spec.structure(xs)
        return xs[0] if len(xs) == 1 else list(xs)

    @staticmethod
    def _as_float64(xs):
        return [x.astype(np.float64) if x.dtype.kind in _FLOAT_KINDS else x for x in xs]

    def _forward(self, model, xs):
        """The model's (first) output as NumPy; every output: `_outputs`."""
        return self._outputs(model, xs)[0]

    def _outputs(self, model, xs):
        """Every output of the model (flattened: list, tuple or dict), as NumPy."""
        out = model(self._call_inputs(xs), training=False)
        return [
            portable(self.keras.ops.convert_to_numpy(o))
            for o in self.keras.tree.flatten(out)
        ]

    def _output_results(self, model, variants):
        """{`protocol.output_key(v, o)`: output o of variant v} of `model`."""
        return {
            protocol.output_key(v, o): out
            for v, xs in enumerate(variants)
            for o, out in enumerate(self._outputs(model, xs))
        }

    # --------------------------------------------------------------- tasks
    def task_forward(self, timings):
        results = self._output_results(self.model, self.variants)
        # Inference must be repeatable: a model that draws random numbers in
        # call() gives another output each time (and on each backend).
        results[AGAIN_KEY] = self._forward(self.model, self.variants[0])
        # Timing on variant 0: best of a few calls after the warm-up above.
        xs = self.variants[0]
        seconds = []
        for _ in range(_TIMED_REPEATS):
            start = time.perf_counter()
            self._forward(self.model, xs)
            seconds.append(time.perf_counter() - start)
        timings[FORWARD_SECONDS] = min(seconds)
        return results

    def task_forward64(self, timings):
        model = self.model64()
        return self._output_results(
            model, [self._as_float64(xs) for xs in self.variants]
        )

    def task_scores(self, timings):
        if self.layer is None:
            raise ValueError("attention scores exist for layer cases only")
        results = {}
        for v, xs in enumerate(self.variants):
            kwargs = {"attention_mask": xs[1]} if len(xs) > 1 else {}
            _, scores = self.layer(xs[0], return_attention_scores=True, **kwargs)
            results[out_key(v)] = portable(self.keras.ops.convert_to_numpy(scores))
        return results

    def _grads(self, model, variants):
        """Loss and gradients of every input variant (e.g. every spatial size:
        a position table is resized, and differentiated, differently at each)."""
        from mhsa_core.consistency import gradients

        results = {
            protocol.start_key(j): portable(self.keras.ops.convert_to_numpy(w))
            for j, w in enumerate(model.trainable_variables)
        }
        for v, xs in enumerate(variants):
            outs = self._outputs(model, xs)  # the loss covers every output
            loss_weights = (
                gradients.loss_weights(outs[0].shape)
                if len(outs) == 1
                else [
                    gradients.loss_weights(o.shape, seed=k) for k, o in enumerate(outs)
                ]
            )
            loss, input_grads, weight_grads = gradients.value_and_grad(
                model, self._call_inputs(xs), loss_weights
            )
            results[protocol.loss_key(v)] = np.asarray(loss)
            for k, g in enumerate(input_grads):
                if g is not None:
                    results[protocol.input_grad_key(v, k)] = portable(g)
            for j, g in enumerate(weight_grads):
                results[protocol.weight_grad_key(v, j)] = portable(g)
        return results

    def task_grads(self, timings):
        return self._grads(self.model, self.variants)

    def task_grads64(self, timings):
        return self._grads(
            self.model64(), [self._as_float64(xs) for xs in self.variants]
        )

    def task_optimizers(self, timings):
        """One step of each optimizer of `protocol.OPTIMIZER_SETTINGS` per input
        variant, each from the same start (fresh optimizers every time: Adam's
        first step) with that variant's gradients."""
        from mhsa_core.consistency import gradients

        keras = self.keras
        model = self.model
        start = [keras.ops.convert_to_numpy(v) for v in model.trainable_variables]
        grads = self._grads(model, self.variants)
        results = {protocol.start_key(j): portable(w) for j, w in enumerate(start)}
        for v in range(len(self.variants)):
            g = [grads[protocol.weight_grad_key(v, j)] for j in range(len(start))]
            results.update({protocol.step_grad_key(v, j): gj for j, gj in enumerate(g)})
            for name, (class_name, arguments) in protocol.OPTIMIZER_SETTINGS.items():
                optimizer = getattr(keras.optimizers, class_name)(**arguments)
                new = gradients.apply_optimizer_step(model, g, optimizer)
                for j, w in enumerate(new):
                    results[protocol.step_key(name, v, j)] = portable(w)
                for var, w in zip(
                    model.trainable_variables, start
                ):  # back to the start
                    var.assign(w)
        return results

    def task_jit(self, timings):
        """The forward pass compiled by the backend's own compiler.

        XLA via `tf.function(jit_compile=True)` on TensorFlow, `jax.jit` of
        `stateless_call` on JAX, `torch.compile` on torch. Not `model.predict`:
        its data adapter casts float64 inputs to float32.

        A second input variant of another shape is compiled as Keras's own
        compiled functions would: TensorFlow with `reduce_retracing=True` (as
        Keras's TF trainer) retraces it with unknown dimensions (None) and
        torch.compile with dynamic (symbolic) ones, so the layer's dynamic-size
        paths run compiled too.
        """
        keras = self.keras
        model = self.model
        backend = keras.backend.backend()
        if backend == "tensorflow":
            import tensorflow as tf

            compiled = tf.function(
                lambda xs: model(xs, training=False),
                jit_compile=True,
                reduce_retracing=True,
            )

            def run(xs):
                return compiled(xs)
        elif backend == "jax":
            import jax

            def pure(trainable, non_trainable, xs):
                return model.stateless_call(
                    trainable, non_trainable, xs, training=False
                )[0]

            compiled = jax.jit(pure)

            def run(xs):
                return compiled(
                    [v.value for v in model.trainable_variables],
                    [v.value for v in model.non_trainable_variables],
                    xs,
                )
        elif backend == "torch":
            import torch

            # Dynamo caches compiled code per code object, across models, and
            # past `recompile_limit` (8) compilations of one code object it
            # silently runs it eagerly: with a dozen cases, the later cases'
            # "jit" would not be compiled at all. A clean cache per case, and
            # an error instead of the silent fallback.
            torch._dynamo.reset()
            if not torch._dynamo.config.suppress_errors:  # the two are exclusive
                torch._dynamo.config.fail_on_recompile_limit_hit = True
            compiled = torch.compile(lambda xs: model(xs, training=False))

            def run(xs):
                with torch.no_grad():
                    return compiled(xs)
        else:
            raise ValueError(f"no compiler for the {backend} backend")
        results = {}
        for v, xs in enumerate(self.variants):
            tensors = [keras.ops.convert_to_tensor(x, dtype=str(x.dtype)) for x in xs]
            try:
                out = run(self._call_inputs(tensors))
            except Exception as e:  # noqa: BLE001 -- only XLA's "no kernel" is a note
                if backend != "tensorflow" or not _xla_cannot_compile(e):
                    raise
                # Some TF ops have no XLA kernel (e.g. ResizeBicubic: bicubic
                # UpSampling2D). A model XLA cannot compile is not a
                # disagreement of the backends: the cell says so, unjudged.
                ops = re.search(r"on XLA_\w+: ([\w, ]+)", str(e))
                what = (
                    ops.group(1).strip()
                    if ops
                    else str(e).strip().splitlines()[0][:120]
                )
                return {
                    protocol.NOTE_KEY: np.array(
                        f"not judged: XLA cannot compile {what}"
                    )
                }
            for o, each in enumerate(keras.tree.flatten(out)):
                results[protocol.output_key(v, o)] = portable(
                    keras.ops.convert_to_numpy(each)
                )
        return results

    def task_drift(self, timings):
        """K optimizer steps of the model and of its float64 clone (`drift.train`)."""
        from mhsa_core.consistency import drift

        return drift.train(
            self,
            self.options[protocol.DRIFT_STEPS],
            self.options[protocol.DRIFT_OPTIMIZER],
        )

    def task_save(self, timings):
        path = self.out_dir / protocol.model_file(self.index)
        tmp = path.with_suffix(".tmp.keras")
        self.model.save(tmp)
        os.replace(tmp, path)
        return {
            protocol.saved_weight_key(j): portable(w)
            for j, w in enumerate(self.model.get_weights())
        }

    def task_export(self, timings):
        """`model.export` in each of the case's `exports`, each artifact run in
        its own runtime (`consistency.export`, `consistency.runtime`)."""
        from mhsa_core.consistency import export

        return export.export_task(self, self.case.get("exports", []), timings)

    def task_locate(self, timings):
        """Every layer call's output (`locate.layer_outputs`), as the model computes."""
        return self._locate(lambda: self.model, self.variants)

    def task_locate64(self, timings):
        """Every layer call's output of the float64 clone (`model64`)."""
        return self._locate(
            self.model64, [self._as_float64(xs) for xs in self.variants]
        )

    def _locate(self, make_model, variants):
        # A diagnosis, not a check: what cannot run layer by layer is
        # reported in the result (LOCATE_ERROR_KEY), never as a failed task.
        from mhsa_core.consistency import locate

        try:
            return locate.layer_outputs(
                self.keras, make_model(), variants, self._call_inputs
            )
        except Exception:  # noqa: BLE001
            return locate.error_result(traceback.format_exc())


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
_VARIANTS = {}


def run_compute(keras, job, job_dir, out_dir):
    info = {"versions": _versions(keras), "timings": {}, "errors": {}}
    me = keras.backend.backend()
    safe_mode = job["options"].get("safe_mode", True)
    for i, case in enumerate(job["cases"]):
        if me not in case_backends(case["dtype"], [me]):
            continue
        errors = {}
        timings = {}
        try:
            with np.load(job_dir / case["file"]) as data:
                arrays = {k: data[k] for k in data.files}
            runner = _CaseRunner(
                keras, case, arrays, safe_mode, out_dir, i, job["options"]
            )
            _VARIANTS[i] = runner.variants  # the load phase runs the same inputs
        except Exception:  # noqa: BLE001 -- reported per case, the run goes on
            errors[SETUP_ERROR] = tail(traceback.format_exc())
            info["errors"][case["name"]] = errors
            continue
        # e.g. the numpy backend: no gradients, jit or saving
        for task in protocol.backend_tasks(me, case["tasks"]):
            try:
                results = getattr(runner, f"task_{task}")(timings)
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
                spec = _ModelInputs(keras, model) if case["kind"] == "model" else None
                for v, xs in enumerate(variants):
                    call = (
                        spec.structure(xs)
                        if spec
                        else (xs[0] if len(xs) == 1 else list(xs))
                    )
                    out = model(call, training=False)
                    for o, each in enumerate(keras.tree.flatten(out)):
                        results[protocol.output_key(v, o)] = portable(
                            keras.ops.convert_to_numpy(each)
                        )
                np.savez(out_dir / protocol.load_file(saver, i), **results)
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
