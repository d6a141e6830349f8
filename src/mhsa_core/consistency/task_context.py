"""What a worker task works on: one case's model and inputs on this worker's
backend (`TaskContext`), and the inputs a loaded model takes (`ModelInputs`).

The worker (`worker`) builds one `TaskContext` per case and hands it to every
task, the matrix's own (`tasks.TASKS`) and the opt-in features'
(`features.tasks()`): the model built or loaded in the case's dtype, its float64
twin, the input variants in the model's input order and the call structure
the model takes, its outputs as NumPy, and where a task writes its files.
Tasks use nothing else of the worker.

Runs in a worker only: Keras comes in as the module the worker imported.
"""

from pathlib import Path

import numpy as np

from mhsa_core.consistency import protocol
from mhsa_core.consistency.arrays import portable
from mhsa_core.consistency.float64 import float64_clone

__all__ = ["TaskContext", "ModelInputs"]

_FLOAT_KINDS = "f"


class ModelInputs:
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


def call_structure(spec, xs):
    """What a model is called with for input arrays `xs`: `spec.structure`
    of its `ModelInputs`, or for our layer's model (spec None) one tensor or
    a list (x and the attention mask)."""
    if spec is not None:
        return spec.structure(xs)
    return xs[0] if len(xs) == 1 else list(xs)


class TaskContext:
    """One case in a worker: what every task reads, and where it writes.

    Args:
        keras: the imported keras module.
        case: the case's entry of job.json.
        arrays: the case's arrays (`protocol.job_input_key`, `job_weight_key`).
        safe_mode: Keras safe mode for loading `.keras` files.
        out_dir: this worker's output directory.
        index: the case's index in the job (its files' names, `protocol`).

    Attributes:
        keras: the imported keras module.
        name: the case's name.
        kind: "layer" (our layer, built from its config and weights) or
            "model" (a user's `.keras` file, loaded).
        model: the case's model, in the case's dtype.
        layer: our layer inside `model` (a layer case), else None.
        variants: [[input arrays] per input variant], in the model's input
            order (given, or made from the loaded model and saved for the
            parent).
        input_names: the inputs' names, in that order.
    """

    def __init__(self, keras, case, arrays, *, safe_mode, out_dir, index):
        self.keras = keras
        self.name = case["name"]
        self.kind = case["kind"]
        self._case = case
        self._safe_mode = safe_mode
        self._out_dir = Path(out_dir)
        self._index = index
        names = case["input_names"]
        self.variants = [
            [arrays[protocol.job_input_key(v, k)] for k in names]
            for v in range(case["variants"])
        ]
        prefix = protocol.JOB_WEIGHT_PREFIX
        self._weights = {
            k[len(prefix) :]: a for k, a in arrays.items() if k.startswith(prefix)
        }
        self.input_names = list(names)
        self._spec = None  # a model case: what the loaded model takes
        self.model, self.layer = self._build(case["dtype"])
        if self.kind == "model":
            self._model_variants()

    @property
    def backend(self):
        """This worker's Keras backend."""
        return self.keras.backend.backend()

    @property
    def model_file(self):
        """Where the case's model is saved as `.keras` (`protocol.model_file`),
        for the other backends to load."""
        return self._out_dir / protocol.model_file(self._index)

    def output_path(self, name):
        """A file of this case in the worker's output directory
        (`protocol.work_file`), e.g. an exported artifact."""
        return self._out_dir / protocol.work_file(self._index, name)

    def _model_variants(self):
        """A model case's inputs, from the loaded model: the given ones matched
        to its inputs, or made here (and saved for the parent)."""
        self._spec = ModelInputs(self.keras, self.model)
        if self._spec.known:
            self.input_names = list(self._spec.names)
        if self.variants:
            self.variants = self._spec.match(
                list(self._case["input_names"]), self.variants
            )
            return
        self.variants = self._spec.generate(seed=0)
        np.savez(
            self._out_dir / protocol.inputs_file(self._index),
            **{
                protocol.job_input_key(v, name): x
                for v, xs in enumerate(self.variants)
                for name, x in zip(self._spec.names, xs)
            },
        )

    # -------------------------------------------------------------- models
    def _build(self, dtype):
        """(model, our layer or None) of the case in `dtype`."""
        keras = self.keras
        case = self._case
        if self.kind == "model":
            model = keras.saving.load_model(
                case["model_path"], safe_mode=self._safe_mode
            )
            if dtype == "float64":
                model = float64_clone(model)
            return model, None
        from mhsa_core.layers.mhsa2d import MultiHeadSelfAttention2D

        layer = MultiHeadSelfAttention2D(**case["config"], dtype=dtype)
        names = case["input_names"]
        arrays = dict(zip(names, self.variants[0]))
        input_dtype = "float64" if dtype == "float64" else "float32"

        def map_input(name):
            """A keras.Input for a map of the case, its spatial size left
            free (one model serves every variant's size)."""
            channels = (
                arrays[name].shape[-1]
                if layer.data_format == "channels_last"
                else arrays[name].shape[1]
            )
            shape = (
                (None, None, channels)
                if layer.data_format == "channels_last"
                else (channels, None, None)
            )
            return keras.Input(shape, dtype=input_dtype, name=name)

        # One keras.Input per array of the case, in its input order; the
        # layer takes each by its call argument's name.
        inputs = []
        for name in names:
            if name in ("x", "context"):
                inputs.append(map_input(name))
            elif name == "attention_mask":
                inputs.append(keras.Input((None, None), dtype="bool", name=name))
            elif name == "prefix_tokens":
                channels = arrays[name].shape[-1]
                inputs.append(
                    keras.Input((None, channels), dtype=input_dtype, name=name)
                )
            else:
                raise ValueError(f"A layer case has no input {name!r}")
        outputs = self.layer_call(layer, inputs)
        model = keras.Model(inputs, outputs, name=f"mhsa_{case['name']}")
        layer.set_weight_dict(self._weights)
        if case.get("quantization"):
            layer.quantize(case["quantization"])  # (what model.quantize calls)
        return model, layer

    def layer_call(self, layer, xs, **kwargs):
        """`layer` called on one variant's inputs (arrays or keras.Inputs,
        in `input_names` order): x positionally, the others by the call
        argument they are (attention_mask, context, prefix_tokens)."""
        named = dict(zip(self.input_names, xs))
        x = named.pop("x")
        return layer(x, **named, **kwargs)

    def model64(self):
        """A fresh float64 twin of the model (the oracle's computation): the
        loaded model cloned in float64 (`float64.float64_clone`), or our layer
        built in float64 with the same weights (quantized: the clone of the
        quantized float32 model)."""
        if self.kind == "model":
            return float64_clone(self.model)
        if self._case.get("quantization"):
            # The twin of the quantized model: its integers and scales (a
            # layer quantized in float64 would round its kernels apart).
            return float64_clone(self._build("float32")[0])
        return self._build("float64")[0]

    @property
    def variants64(self):
        """`variants` with every float input in float64 (the twin's inputs)."""
        return [
            [x.astype(np.float64) if x.dtype.kind in _FLOAT_KINDS else x for x in xs]
            for xs in self.variants
        ]

    # ------------------------------------------------------------- calling
    def call_inputs(self, xs):
        """The call argument for one variant's arrays: the structure the model
        takes (a dict for dict inputs, a list for several)."""
        return call_structure(self._spec, xs)

    def outputs(self, model, xs):
        """Every output of `model` on one variant's arrays (flattened: list,
        tuple or dict), as NumPy, `training=False`."""
        out = model(self.call_inputs(xs), training=False)
        return [
            portable(self.keras.ops.convert_to_numpy(o))
            for o in self.keras.tree.flatten(out)
        ]

    def forward(self, model, xs):
        """The (first) output of `model` on one variant's arrays, as NumPy."""
        return self.outputs(model, xs)[0]

    def output_results(self, model, variants):
        """{`protocol.output_key(v, o)`: output o of variant v} of `model`."""
        return {
            protocol.output_key(v, o): out
            for v, xs in enumerate(variants)
            for o, out in enumerate(self.outputs(model, xs))
        }
