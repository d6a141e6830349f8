"""Worker of the cross-backend runner: `python -m mhsa_core.worker JOB_DIR OUT_DIR`.

Runs under the backend of this process (KERAS_BACKEND). Reads phase names on
stdin, one per line ("compute", "load"), and prints `done PHASE` after each;
exits at end of input. See `mhsa_core.runner` for the protocol.

Files written to OUT_DIR, per case i of JOB_DIR/job.json:
- `case{i}-{task}.npz`, by task:
  forward / forward64 / jit / scores: `out/{v}` per input variant v
  (forward also `again/0`: variant 0 once more, to check repeatability);
  grads / grads64, per input variant v: `loss/{v}`, `input/{v}/{k}` (float
  inputs), `weight/{v}/{j}` in the order of `model.trainable_variables`; and
  `start/{j}` (the weights);
  optimizers, per input variant v: `sgd/{v}/{j}`, `adam/{v}/{j}` (weights after
  one step of each from the same start `start/{j}`, lr SGD_LR / ADAM_LR, with
  that variant's gradients `grad/{v}/{j}`);
  save: `weight/{j}` (all `model.get_weights()`), beside `case{i}.keras`;
- `load-{saver}-case{i}.npz` (phase "load"): `out/{v}` of the model the
  backend `saver` saved, and `identical/{j}` per weight (1 = bit-identical);
- `phase-{phase}.json`: versions, timings, and `errors[case][task]`.
A task that raises is recorded there and the worker goes on.
"""

import importlib
import json
import os
import sys
import time
import traceback
from pathlib import Path

import numpy as np

SGD_LR = 0.01
ADAM_LR = 1e-3
_TIMED_REPEATS = 3
_FLOAT_KINDS = "f"


def _portable(array):
    """An array .npz can hold: bfloat16 (an ml_dtypes type) becomes float32, exactly."""
    array = np.asarray(array)
    if array.dtype.name == "bfloat16":
        array = array.astype(np.float32)
    return array


def _to_float64_config(obj):
    """A model config with every float dtype policy replaced by float64."""
    if isinstance(obj, dict):
        obj = {k: _to_float64_config(v) for k, v in obj.items()}
        if obj.get("class_name") in ("DTypePolicy", "FloatDTypePolicy") and isinstance(
            obj.get("config"), dict
        ):
            obj["config"] = {**obj["config"], "name": "float64"}
        if isinstance(obj.get("dtype"), str) and obj["dtype"] in (
            "float16", "bfloat16", "float32", "mixed_float16", "mixed_bfloat16",
        ):
            obj["dtype"] = "float64"
        return obj
    if isinstance(obj, list):
        return [_to_float64_config(v) for v in obj]
    return obj


class _CaseRunner:
    def __init__(self, keras, case, arrays, safe_mode):
        self.keras = keras
        self.case = case
        self.safe_mode = safe_mode
        n = case["variants"]
        names = case["input_names"]
        self.variants = [[arrays[f"input/{v}/{k}"] for k in names] for v in range(n)]
        self.weights = {k[len("weight/"):]: a for k, a in arrays.items()
                        if k.startswith("weight/")}
        self.model, self.layer = self._build(case["dtype"])

    # -------------------------------------------------------------- models
    def _build(self, dtype):
        keras = self.keras
        case = self.case
        if case["kind"] == "model":
            model = keras.saving.load_model(case["model_path"], safe_mode=self.safe_mode)
            if dtype == "float64":
                model = self._float64_clone(model)
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

    def _float64_clone(self, model):
        keras = self.keras
        config = _to_float64_config(model.get_config())
        clone = model.__class__.from_config(config)
        weights = [w.astype(np.float64) if w.dtype.kind in _FLOAT_KINDS else w
                   for w in model.get_weights()]
        clone.set_weights(weights)
        for v in clone.weights:
            if keras.backend.is_float_dtype(v.dtype) and v.dtype != "float64":
                raise ValueError(f"weight {v.path} stayed {v.dtype} in the float64 clone")
        return clone

    def model64(self):
        if self.case["kind"] == "model":
            return self._float64_clone(self.model)
        return _CaseRunner._build(self, "float64")[0]

    @staticmethod
    def _call_inputs(xs):
        return xs[0] if len(xs) == 1 else list(xs)

    @staticmethod
    def _as_float64(xs):
        return [x.astype(np.float64) if x.dtype.kind in _FLOAT_KINDS else x for x in xs]

    def _forward(self, model, xs):
        out = model(self._call_inputs(xs), training=False)
        if isinstance(out, (list, tuple)):
            out = out[0]
        return _portable(self.keras.ops.convert_to_numpy(out))

    # --------------------------------------------------------------- tasks
    def task_forward(self, timings):
        results = {}
        for v, xs in enumerate(self.variants):
            results[f"out/{v}"] = self._forward(self.model, xs)
        # Inference must be repeatable: a model that draws random numbers in
        # call() gives another output each time (and on each backend).
        results["again/0"] = self._forward(self.model, self.variants[0])
        # Timing on variant 0: best of a few calls after the warm-up above.
        xs = self.variants[0]
        seconds = []
        for _ in range(_TIMED_REPEATS):
            start = time.perf_counter()
            self._forward(self.model, xs)
            seconds.append(time.perf_counter() - start)
        timings["forward_seconds"] = min(seconds)
        return results

    def task_forward64(self, timings):
        model = self.model64()
        return {f"out/{v}": self._forward(model, self._as_float64(xs))
                for v, xs in enumerate(self.variants)}

    def task_scores(self, timings):
        if self.layer is None:
            raise ValueError("attention scores exist for layer cases only")
        results = {}
        for v, xs in enumerate(self.variants):
            kwargs = {"attention_mask": xs[1]} if len(xs) > 1 else {}
            _, scores = self.layer(xs[0], return_attention_scores=True, **kwargs)
            results[f"out/{v}"] = _portable(self.keras.ops.convert_to_numpy(scores))
        return results

    def _grads(self, model, variants):
        """Loss and gradients of every input variant (e.g. every spatial size:
        a position table is resized, and differentiated, differently at each)."""
        from mhsa_core import gradients

        results = {f"start/{j}": _portable(self.keras.ops.convert_to_numpy(w))
                   for j, w in enumerate(model.trainable_variables)}
        for v, xs in enumerate(variants):
            out = self._forward(model, xs)
            loss_weights = gradients.loss_weights(out.shape)
            loss, input_grads, weight_grads = gradients.value_and_grad(
                model, self._call_inputs(xs), loss_weights
            )
            results[f"loss/{v}"] = np.asarray(loss)
            for k, g in enumerate(input_grads):
                if g is not None:
                    results[f"input/{v}/{k}"] = _portable(g)
            for j, g in enumerate(weight_grads):
                results[f"weight/{v}/{j}"] = _portable(g)
        return results

    def task_grads(self, timings):
        return self._grads(self.model, self.variants)

    def task_grads64(self, timings):
        return self._grads(self.model64(), [self._as_float64(xs) for xs in self.variants])

    def task_optimizers(self, timings):
        """One SGD and one Adam step per input variant, each from the same start
        (fresh optimizers every time: Adam's first step) with that variant's
        gradients."""
        from mhsa_core import gradients

        keras = self.keras
        model = self.model
        start = [keras.ops.convert_to_numpy(v) for v in model.trainable_variables]
        grads = self._grads(model, self.variants)
        results = {f"start/{j}": _portable(w) for j, w in enumerate(start)}
        for v in range(len(self.variants)):
            g = [grads[f"weight/{v}/{j}"] for j in range(len(start))]
            results.update({f"grad/{v}/{j}": gj for j, gj in enumerate(g)})
            for name, optimizer in (("sgd", keras.optimizers.SGD(SGD_LR)),
                                    ("adam", keras.optimizers.Adam(ADAM_LR))):
                new = gradients.apply_optimizer_step(model, g, optimizer)
                for j, w in enumerate(new):
                    results[f"{name}/{v}/{j}"] = _portable(w)
                for var, w in zip(model.trainable_variables, start):  # back to the start
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

            compiled = tf.function(lambda xs: model(xs, training=False), jit_compile=True,
                                   reduce_retracing=True)

            def run(xs):
                return compiled(xs)
        elif backend == "jax":
            import jax

            def pure(trainable, non_trainable, xs):
                return model.stateless_call(trainable, non_trainable, xs, training=False)[0]

            compiled = jax.jit(pure)

            def run(xs):
                return compiled([v.value for v in model.trainable_variables],
                                [v.value for v in model.non_trainable_variables], xs)
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
            out = run(self._call_inputs(tensors))
            if isinstance(out, (list, tuple)):
                out = out[0]
            results[f"out/{v}"] = _portable(keras.ops.convert_to_numpy(out))
        return results

    def task_save(self, timings, out_dir, index):
        path = out_dir / f"case{index}.keras"
        tmp = out_dir / f"case{index}.tmp.keras"
        self.model.save(tmp)
        os.replace(tmp, path)
        return {f"weight/{j}": _portable(w) for j, w in enumerate(self.model.get_weights())}


def _versions(keras):
    backend = keras.backend.backend()
    try:
        framework = __import__(backend).__version__
    except (ImportError, AttributeError):
        framework = None
    return {"backend": backend, "keras_version": keras.__version__,
            "framework_version": framework}


def _write_json(path, data):
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)


def run_compute(keras, job, job_dir, out_dir):
    from mhsa_core.runner import INFERENCE_TASKS, TRAINING_BACKENDS, case_backends

    info = {"versions": _versions(keras), "timings": {}, "errors": {}}
    me = keras.backend.backend()
    inference_only = me not in TRAINING_BACKENDS
    safe_mode = job["options"].get("safe_mode", True)
    for i, case in enumerate(job["cases"]):
        if me not in case_backends(case["dtype"], [me]):
            continue
        errors = {}
        timings = {}
        try:
            with np.load(job_dir / case["file"]) as data:
                arrays = {k: data[k] for k in data.files}
            runner = _CaseRunner(keras, case, arrays, safe_mode)
        except Exception:  # noqa: BLE001 -- reported per case, the run goes on
            errors["setup"] = traceback.format_exc()[-3000:]
            info["errors"][case["name"]] = errors
            continue
        for task in case["tasks"]:
            if inference_only and task not in INFERENCE_TASKS:
                continue  # e.g. the numpy backend: no gradients, jit or saving
            try:
                if task == "save":
                    results = runner.task_save(timings, out_dir, i)
                else:
                    results = getattr(runner, f"task_{task}")(timings)
                np.savez(out_dir / f"case{i}-{task}.npz", **results)
            except Exception:  # noqa: BLE001
                errors[task] = traceback.format_exc()[-3000:]
        info["timings"][case["name"]] = timings
        if errors:
            info["errors"][case["name"]] = errors
    _write_json(out_dir / "phase-compute.json", info)


def run_load(keras, job, job_dir, out_dir):
    """Loads every `.keras` file the other backends saved, and runs it here."""
    info = {"versions": _versions(keras), "errors": {}}
    me = keras.backend.backend()
    safe_mode = job["options"].get("safe_mode", True)
    from mhsa_core.runner import case_backends

    for i, case in enumerate(job["cases"]):
        if "save" not in case["tasks"] or me not in case_backends(case["dtype"], [me]):
            continue
        with np.load(job_dir / case["file"]) as data:
            arrays = {k: data[k] for k in data.files}
        names = case["input_names"]
        variants = [[arrays[f"input/{v}/{k}"] for k in names]
                    for v in range(case["variants"])]
        for saver in job["options"]["backends"]:
            path = job_dir / saver / f"case{i}.keras"
            if saver == me or not path.exists():
                continue
            try:
                model = keras.saving.load_model(path, safe_mode=safe_mode)
                with np.load(job_dir / saver / f"case{i}-save.npz") as data:
                    saved = [data[f"weight/{j}"] for j in range(len(data.files))]
                loaded = [_portable(w) for w in model.get_weights()]
                if len(loaded) != len(saved):
                    raise ValueError(
                        f"{len(loaded)} weights loaded, {len(saved)} saved"
                    )
                results = {
                    f"identical/{j}": np.asarray(
                        a.shape == b.shape and a.dtype == b.dtype and np.array_equal(a, b)
                    )
                    for j, (a, b) in enumerate(zip(loaded, saved))
                }
                for v, xs in enumerate(variants):
                    out = model(xs[0] if len(xs) == 1 else list(xs), training=False)
                    if isinstance(out, (list, tuple)):
                        out = out[0]
                    results[f"out/{v}"] = _portable(keras.ops.convert_to_numpy(out))
                np.savez(out_dir / f"load-{saver}-case{i}.npz", **results)
            except Exception:  # noqa: BLE001
                info["errors"].setdefault(case["name"], {})[f"load:{saver}"] = (
                    traceback.format_exc()[-3000:]
                )
    _write_json(out_dir / "phase-load.json", info)


_PHASES = {"compute": run_compute, "load": run_load}


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    job_dir, out_dir = Path(argv[0]), Path(argv[1])
    import keras

    job = json.loads((job_dir / "job.json").read_text())
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
        print(f"done {phase}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
