"""Runs exported artifacts in their own runtime:
`python -m mhsa_core.consistency.runtime FORMAT ARTIFACT INPUTS OUTPUTS [...]`
(one or more ARTIFACT INPUTS OUTPUTS triples of one format).

A fresh process per artifact, started by the worker's export task
(`consistency.features.export`), which imports no Keras: the artifact runs as a
deployment would run it, without the framework that exported it (a torch
worker never imports TensorFlow; a SavedModel runs in TensorFlow alone).

INPUTS is an `.npz` with keys `input_key(v, name)`: input `name` of variant `v`,
the inputs of a variant in the model's input order. OUTPUTS gets
`protocol.out_key(v)` per variant: the artifact's first output. A runtime
that raises exits non-zero with the error on stderr (its last line is what
the matrix reports).

Runtimes (each optional: `RUNTIME_MODULES`):
- tf_saved_model: `tf.saved_model.load(path).serve(...)` (TensorFlow);
- onnx: an onnxruntime `InferenceSession` on the CPU provider;
- openvino: the OpenVINO runtime on the CPU in f32 inference precision (its
  CPU plugin may otherwise pick bf16 on CPUs that have it: that is a
  precision choice of the user's, not the exported model);
- litert: the LiteRT interpreter of `ai_edge_litert`, its inputs resized to
  each variant's shapes.
"""

import os
import re
import sys
from collections.abc import Callable
from typing import Any

import numpy as np

from mhsa_core.consistency import protocol

# The module each format's runtime needs (`importlib.util.find_spec`).
RUNTIME_MODULES = {
    "tf_saved_model": "tensorflow",
    "onnx": "onnxruntime",
    "openvino": "openvino",
    "litert": "ai_edge_litert",
}


def _first(outputs):
    if isinstance(outputs, dict):
        outputs = [outputs[k] for k in sorted(outputs)]
    if isinstance(outputs, (list, tuple)):
        outputs = outputs[0]
    return np.asarray(outputs)


def _plain(name):
    """An input's name without what exporters add: LiteRT's
    "serving_default_x:0" and TensorFlow's "x:0" are "x"."""
    return re.sub(r"^serving_default_|:\d+$", "", name)


def _by_name(declared, names, xs):
    """The inputs in the runtime's declared order: by name where every
    declared name is one of ours, else in our (the model's) order."""
    declared = [_plain(d) for d in declared]
    if sorted(declared) == sorted(names):
        return [xs[names.index(d)] for d in declared]
    return list(xs)


class _SavedModel:
    def __init__(self, path):
        import tensorflow as tf

        self.tf = tf
        self.model = tf.saved_model.load(path)

    def __call__(self, names, xs):
        tensors = [self.tf.constant(x) for x in xs]
        # The endpoint takes the inputs as the model was built: one tensor,
        # or a list (also of one tensor: `keras.Model([x], ...)`).
        args = self.model.serve.concrete_functions[0].structured_input_signature[0]
        single = len(tensors) == 1 and not isinstance(args[0], (list, tuple))
        out = self.model.serve(tensors[0] if single else tensors)
        return _first(
            out.numpy()
            if hasattr(out, "numpy")
            else self.tf.nest.map_structure(lambda t: t.numpy(), out)
        )


class _Onnx:
    def __init__(self, path):
        import onnxruntime

        self.session = onnxruntime.InferenceSession(
            path, providers=["CPUExecutionProvider"]
        )

    def __call__(self, names, xs):
        declared = [i.name for i in self.session.get_inputs()]
        feeds = dict(zip(declared, _by_name(declared, names, xs)))
        return _first(self.session.run(None, feeds))


class _OpenVino:
    def __init__(self, path):
        import openvino

        self.compiled = openvino.Core().compile_model(
            path, "CPU", {"INFERENCE_PRECISION_HINT": "f32"}
        )

    def __call__(self, names, xs):
        declared = [
            i.get_any_name() if i.get_names() else "" for i in self.compiled.inputs
        ]
        result = self.compiled(_by_name(declared, names, xs))
        return np.asarray(result[self.compiled.outputs[0]])


class _LiteRT:
    def __init__(self, path):
        from ai_edge_litert.interpreter import Interpreter

        self.interpreter = Interpreter(model_path=path)

    def __call__(self, names, xs):
        it = self.interpreter
        details = it.get_input_details()
        declared = [d["name"] for d in details]
        xs = _by_name(declared, names, xs)
        for d, x in zip(details, xs):
            it.resize_tensor_input(d["index"], x.shape, strict=False)
        it.allocate_tensors()
        for d, x in zip(details, xs):
            it.set_tensor(d["index"], x)
        it.invoke()
        return np.asarray(it.get_tensor(self._first_output(it)))

    @staticmethod
    def _first_output(it):
        """The tensor index of the model's first output, by its serving
        signature's order (output_0, output_1, ...): `get_output_details()`
        does not keep it (a two-output Keras model exported from TensorFlow
        lists its second output, "StatefulPartitionedCall:1", first)."""
        signatures = it.get_signature_list()
        if len(signatures) != 1:
            return it.get_output_details()[0]["index"]
        (key,) = signatures
        details = it.get_signature_runner(key).get_output_details()

        def natural(name):  # output_10 after output_9
            return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]

        return details[min(details, key=natural)]["index"]


# format -> its runtime's class: (artifact path) -> (names, arrays) -> outputs
_RUNTIMES: dict[str, Callable[[str], Callable[..., Any]]] = {
    "tf_saved_model": _SavedModel,
    "onnx": _Onnx,
    "openvino": _OpenVino,
    "litert": _LiteRT,
}


def run(fmt, artifact, inputs):
    """{out_key(v): output} of `artifact` on `inputs` ({v: (names, arrays)})."""
    runtime = _RUNTIMES[fmt](str(artifact))
    return {
        protocol.out_key(v): runtime(names, xs) for v, (names, xs) in inputs.items()
    }


def input_key(v, name):
    """INPUTS: input `name` of input variant `v`."""
    return f"{v}/{name}"


def read_inputs(path):
    """{v: (names, arrays)} of an INPUTS file, in the file's order."""
    variants: dict[int, tuple[list[str], list[np.ndarray]]] = {}
    with np.load(path) as data:
        for key in data.files:
            v, name = key.split("/", 1)  # `input_key`
            names, xs = variants.setdefault(int(v), ([], []))
            names.append(name)
            xs.append(data[key])
    return variants


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    fmt, triples = argv[0], argv[1:]
    for i in range(0, len(triples), 3):
        artifact, inputs, outputs = triples[i : i + 3]
        results = run(fmt, artifact, read_inputs(inputs))
        tmp = outputs + ".tmp.npz"
        np.savez(tmp, **results)
        os.replace(tmp, outputs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
