"""The float64 twin of a Keras model or layer: the oracle's computation.

Every float64 oracle of the matrix (and of `within_budget`) is the user's own
model computed in float64: the same config with every float dtype policy set
to "float64", and the same weights cast exactly (float32 -> float64 is exact).
A quantized layer ("int8_from_float32") becomes "int8_from_float64": its
integers as they are, its scales cast exactly, its quantized arithmetic
(activation quantizer, integer product, de-scaling) computed in float64.
Runs on the current backend; imports Keras only when called.
"""

import numpy as np

__all__ = ["to_float64_config", "float64_clone"]

_FLOAT_KINDS = "f"
# Keras's quantized dtype policies: "<mode>_from_<float policy>".
_QUANTIZED = ("QuantizedDTypePolicy", "Int4DTypePolicy")
_LOW_PRECISION = ("float16", "bfloat16", "float32", "mixed_float16", "mixed_bfloat16")


def to_float64_config(obj):
    """A model or layer config with every float dtype policy replaced by float64."""
    if isinstance(obj, dict):
        obj = {k: to_float64_config(v) for k, v in obj.items()}
        if obj.get("class_name") in ("DTypePolicy", "FloatDTypePolicy") and isinstance(
            obj.get("config"), dict
        ):
            obj["config"] = {**obj["config"], "name": "float64"}
        if obj.get("class_name") in _QUANTIZED and isinstance(obj.get("config"), dict):
            # "int8_from_float32" -> "int8_from_float64": the same integers and
            # scales (copied, exact), the quantized arithmetic in float64.
            obj["config"] = {**obj["config"], "source_name": "float64"}
        if isinstance(obj.get("dtype"), str) and obj["dtype"] in _LOW_PRECISION:
            obj["dtype"] = "float64"
        return obj
    if isinstance(obj, list):
        return [to_float64_config(v) for v in obj]
    return obj


def float64_clone(model):
    """`model` (a built Keras model or layer) rebuilt in float64 with its weights.

    Raises:
        ValueError: a weight stayed in a lower precision (a layer that ignores
            its dtype policy): the clone would not be a float64 computation.
    """
    import keras

    config = to_float64_config(model.get_config())
    clone = model.__class__.from_config(config)
    weights = [np.asarray(w) for w in model.get_weights()]
    if not clone.built and not isinstance(clone, keras.Model):
        # A bare layer: build it with the shapes of the original.
        clone.build(*_build_shapes(model))
    clone.set_weights(
        [w.astype(np.float64) if w.dtype.kind in _FLOAT_KINDS else w for w in weights]
    )
    for v in clone.weights:
        if keras.backend.is_float_dtype(v.dtype) and v.dtype != "float64":
            raise ValueError(f"weight {v.path} stayed {v.dtype} in the float64 clone")
    return clone


def _build_shapes(layer):
    build_config = layer.get_build_config() or {}
    if "input_shape" in build_config:
        return (build_config["input_shape"],)
    if "shapes_dict" in build_config:
        return tuple(build_config["shapes_dict"].values())
    raise ValueError(
        f"Cannot rebuild layer {layer.name!r} in float64: it has no build config. "
        "Call it once (or build it) before."
    )
