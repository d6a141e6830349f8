"""Loss value and gradients of a Keras layer or model, on the current backend.

The cross-backend matrix compares gradients of the same layer under TensorFlow,
PyTorch and JAX. Keras 3 has no public, backend-agnostic "gradient of this
function" API: every backend's trainer (`train_step`) computes gradients with
its own framework (`tf.GradientTape`, torch autograd, `jax.value_and_grad` over
`stateless_call`). This module holds the three equivalents for an arbitrary
built layer or model, and nothing else backend-specific. Each branch imports
its framework lazily, only for the backend of `keras.backend.backend()`, so a
process never imports two frameworks (TensorFlow and torch in one process can
segfault). Only the public Keras API is used.

The loss is the fixed linear functional

    loss = sum(output * L)

with `L = loss_weights(output.shape, seed)`, a float64 array of independent
standard-normal entries. Its gradient with respect to the output is exactly L,
so the gradients are the vector-Jacobian product of the model with a random
direction: every output entry matters, with a random sign and weight, and no
structure of the output (e.g. that attention probabilities sum to 1) can hide
an error, as `sum(output)` could. L is cast to the dtype the loss is computed
in: the output's dtype, or float32 for a 16-bit output (mixed precision), as
Keras losses do.

Dtypes: nothing is cast to a default dtype. Floating inputs keep their own
dtype, the model computes in its own (dtype policy), weight gradients come back
in each variable's dtype and input gradients in each input's dtype. A float64
model fed float64 inputs therefore gives float64 gradients; under JAX this
needs 64-bit mode (JAX_ENABLE_X64=1 before JAX is imported), and a float64
model or input without it raises ValueError instead of silently computing in
float32.

Under JAX the gradient is not jit-compiled: it runs op by op, as an eager
layer call does (the first call with new shapes compiles each op once, later
calls reuse them).

The numpy backend of Keras has no automatic differentiation: `value_and_grad`
raises ValueError there.
"""

import inspect

import keras
import numpy as np
from keras import ops

from mhsa_core.consistency.protocol import TRAINING_BACKENDS
from mhsa_core.reference import schema

__all__ = ["loss_weights", "value_and_grad", "apply_optimizer_step"]

# Keras's numpy backend has no automatic differentiation.
_GRADIENT_BACKENDS = TRAINING_BACKENDS


def loss_weights(shape, seed=0):
    """The fixed weights L of the scalar loss `sum(output * L)`.

    Args:
        shape: the shape of the model's output (fully known).
        seed: integer seed.

    Returns:
        float64 array of `shape`: `np.random.default_rng(seed).standard_normal(shape)`.
        Deterministic from `shape` and `seed`, and the same on every backend and
        machine (NumPy's PCG64 generator), so all backends differentiate the
        same loss.
    """
    shape = tuple(shape)
    if any(d is None or int(d) != d or d < 0 for d in shape):
        raise ValueError(
            "`shape` must be fully known non-negative integers. "
            f"Received: shape={shape}"
        )
    return np.random.default_rng(seed).standard_normal(tuple(int(d) for d in shape))


def _check_backend(what):
    backend = keras.backend.backend()
    if backend not in _GRADIENT_BACKENDS:
        raise ValueError(
            f"{what} needs automatic differentiation, which the Keras "
            f"{backend!r} backend does not have (Keras' numpy backend computes "
            f"no gradients). Use one of {_GRADIENT_BACKENDS}. "
            f"Received: keras.backend.backend()={backend!r}"
        )
    return backend


def _is_float(dtype):
    return keras.backend.is_float_dtype(keras.backend.standardize_dtype(dtype))


def _prepare_inputs(inputs):
    """(tensors, is_float) for one array or a list/tuple of positional inputs."""
    if not isinstance(inputs, (list, tuple)):
        inputs = [inputs]
    tensors, is_float = [], []
    for i, value in enumerate(inputs):
        if value is None:
            raise ValueError(f"Input {i} is None; pass arrays only.")
        dtype = getattr(value, "dtype", None)
        if dtype is None:
            value = np.asarray(value)
            dtype = value.dtype
        dtype = keras.backend.standardize_dtype(dtype)
        # The input's own dtype, explicitly: never a default float dtype.
        tensors.append(ops.convert_to_tensor(value, dtype=dtype))
        is_float.append(_is_float(dtype))
    return tensors, is_float


def _takes_inputs_as_one_structure(model, count):
    """Whether `count` inputs go to `model` as one list rather than positionally.

    A functional `keras.Model` (and any call like `call(self, inputs, training=None)`)
    takes all its inputs as its first argument; `MultiHeadSelfAttention2D`
    takes them as `call(inputs, attention_mask, ...)`. The list is passed as
    one argument when the call has fewer positional parameters (other than
    `training` and `mask`) than there are inputs, and no `*args`.
    """
    if count < 2:
        return False
    try:
        parameters = inspect.signature(model.call).parameters.values()
    except (TypeError, ValueError):
        return False
    positional = 0
    for p in parameters:
        if p.kind is p.VAR_POSITIONAL:
            return False
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.name not in (
            "training",
            "mask",
        ):
            positional += 1
    return positional < count


def _select_output(outputs):
    """The tensor the loss is taken of: the output, or the first of a tuple/list."""
    if isinstance(outputs, (list, tuple)):
        if not outputs:
            raise ValueError("The model returned an empty list/tuple of outputs.")
        outputs = outputs[0]
    if isinstance(outputs, dict):
        raise ValueError(
            "value_and_grad needs a model that returns a tensor or a tuple/list "
            "of tensors (the first is used). "
            f"Received a dict with keys {sorted(outputs)}"
        )
    return outputs


def _loss(outputs, weights):
    """sum(output * L), in the output's dtype (float32 for 16-bit outputs); with
    a list of weights, the sum of that over every output (flattened)."""
    if isinstance(weights, list):
        flat = keras.tree.flatten(outputs)
        if len(flat) != len(weights):
            raise ValueError(
                f"`loss_weights` must have one array per output ({len(flat)}). "
                f"Received: {len(weights)} arrays"
            )
        return sum(_loss(o, w) for o, w in zip(flat, weights))
    outputs = _select_output(outputs)
    shape = tuple(outputs.shape)
    if shape != weights.shape:
        raise ValueError(
            "`loss_weights` must have the shape of the model's output "
            f"{shape}. Received: loss_weights.shape={weights.shape}"
        )
    # At least float32, as the logits (16-bit sums lose every digit).
    dtype = schema.logits_dtype(keras.backend.standardize_dtype(outputs.dtype))
    outputs = ops.cast(outputs, dtype)
    return ops.sum(outputs * ops.convert_to_tensor(weights, dtype=dtype))


def _check_dtypes(grads, expected, what):
    for i, (grad, dtype) in enumerate(zip(grads, expected)):
        if grad is None:
            continue
        got = keras.backend.standardize_dtype(grad.dtype)
        if got != dtype:
            raise ValueError(
                f"The gradient of {what} {i} was computed in {got}, not in its "
                f"dtype {dtype}."
            )


def value_and_grad(model, inputs, loss_weights, *, training=False):
    """Loss `sum(output * loss_weights)` and its gradients, as NumPy.

    Args:
        model: a built `keras.layers.Layer` or `keras.Model`.
        inputs: one array, a dict {input name: array} (a model with dict
            inputs; gradients in the dict's order), or a list of arrays: the
            positional arguments of the
            model's call (e.g. `[x, attention_mask]` for the layer), or the
            inputs of a multi-input functional model, as a list. A list goes to
            the call as one argument when the call cannot take its entries
            positionally (fewer positional parameters besides `training` and
            `mask` than entries, as `Functional.call(inputs, training, mask)`),
            else as positional arguments.
        loss_weights: array of the output's shape (see `loss_weights()`), or a
            list of them, one per output of a multi-output model (outputs
            flattened as `keras.tree.flatten`): the loss sums over them all.
        training: passed to the call (dropout, batch statistics, ...). As a
            model call does on TensorFlow and torch, a call with state updates
            (a dropout seed generator, moving statistics) also updates the
            model's non-trainable variables under JAX.

    The output used is the model's output or, if the model returns a tuple or
    list (e.g. `(outputs, scores)`), its first element.

    Returns:
        `(loss, input_grads, weight_grads)`: the loss as a Python float; one
        entry per input, the gradient (in the input's dtype) for floating
        inputs and None for others (e.g. a bool mask); the gradients of
        `model.trainable_variables`, in that order, each in its variable's
        dtype (zeros for a variable the loss does not depend on).

    Raises:
        ValueError: under a backend without gradients (numpy), for an unbuilt
            model, a `loss_weights` of the wrong shape, or float64 on JAX
            without 64-bit mode.
    """
    backend = _check_backend("value_and_grad")
    if not model.built:
        raise ValueError(
            "value_and_grad needs a built model: call it on an input (or "
            "`build(input_shape)`) first."
        )
    weights = (
        [np.asarray(w) for w in loss_weights]
        if isinstance(loss_weights, list)
        else np.asarray(loss_weights)
    )
    names = list(inputs) if isinstance(inputs, dict) else None
    tensors, is_float = _prepare_inputs(list(inputs.values()) if names else inputs)
    if names is not None:

        def pack(values):  # model({name: x, ...}): a model with dict inputs
            return (dict(zip(names, values)),)
    elif _takes_inputs_as_one_structure(model, len(tensors)):

        def pack(values):  # model([x1, x2, ...])
            return (list(values),)
    else:

        def pack(values):  # model(x1, x2, ...)
            return tuple(values)

    variables = list(model.trainable_variables)
    if backend == "tensorflow":
        loss, input_grads, weight_grads = _tensorflow(
            model, pack, tensors, is_float, variables, weights, training
        )
    elif backend == "torch":
        loss, input_grads, weight_grads = _torch(
            model, pack, tensors, is_float, variables, weights, training
        )
    else:
        loss, input_grads, weight_grads = _jax(
            model, pack, tensors, is_float, variables, weights, training
        )
    _check_dtypes(weight_grads, [v.dtype for v in variables], "trainable variable")
    _check_dtypes(
        input_grads,
        [keras.backend.standardize_dtype(t.dtype) for t in tensors],
        "input",
    )
    return float(loss), input_grads, weight_grads


def _tensorflow(model, pack, tensors, is_float, variables, weights, training):
    import tensorflow as tf

    sources = [t for t, f in zip(tensors, is_float) if f]
    with tf.GradientTape() as tape:
        for t in sources:
            tape.watch(t)
        loss = _loss(model(*pack(tensors), training=training), weights)
    grads = tape.gradient(
        loss,
        sources + [v.value for v in variables],
        unconnected_gradients=tf.UnconnectedGradients.ZERO,
    )
    # IndexedSlices (e.g. from an embedding lookup) -> dense.
    grads = [tf.convert_to_tensor(g).numpy() for g in grads]
    return (
        loss.numpy(),
        _scatter(grads[: len(sources)], is_float),
        grads[len(sources) :],
    )


def _torch(model, pack, tensors, is_float, variables, weights, training):
    import torch

    # Fresh leaves: autograd.grad returns their gradients without touching
    # any `.grad` attribute (of the inputs or of the variables).
    tensors = [
        t.detach().requires_grad_(True) if f else t for t, f in zip(tensors, is_float)
    ]
    sources = [t for t, f in zip(tensors, is_float) if f]
    params = [v.value for v in variables]  # torch Parameters
    with torch.enable_grad():
        loss = _loss(model(*pack(tensors), training=training), weights)
        grads = torch.autograd.grad(loss, sources + params, allow_unused=True)
    grads = [
        torch.zeros_like(p) if g is None else g for g, p in zip(grads, sources + params)
    ]
    grads = [g.detach().cpu().numpy() for g in grads]
    loss = loss.detach().cpu().numpy()
    return loss, _scatter(grads[: len(sources)], is_float), grads[len(sources) :]


def _jax(model, pack, tensors, is_float, variables, weights, training):
    import jax

    wanted64 = [v.dtype for v in variables] + [
        keras.backend.standardize_dtype(t.dtype) for t in tensors
    ]
    if "float64" in wanted64 and not jax.config.read("jax_enable_x64"):
        raise ValueError(
            "float64 gradients under JAX need 64-bit mode: set JAX_ENABLE_X64=1 "
            "before JAX is imported (otherwise JAX computes in float32)."
        )
    # Variable objects are stateful; differentiate the pure stateless_call.
    trainable = [v.value for v in model.trainable_variables]
    non_trainable = [v.value for v in model.non_trainable_variables]
    sources = [t for t, f in zip(tensors, is_float) if f]

    def loss_fn(trainable_values, source_values):
        args = list(tensors)
        source_iter = iter(source_values)
        for i, f in enumerate(is_float):
            if f:
                args[i] = next(source_iter)
        outputs, new_non_trainable = model.stateless_call(
            trainable_values, non_trainable, *pack(args), training=training
        )
        return _loss(outputs, weights), new_non_trainable

    (loss, new_non_trainable), (weight_grads, input_grads) = jax.value_and_grad(
        loss_fn, argnums=(0, 1), has_aux=True
    )(trainable, sources)
    for variable, value in zip(model.non_trainable_variables, new_non_trainable):
        variable.assign(value)
    input_grads = [np.asarray(g) for g in input_grads]
    weight_grads = [np.asarray(g) for g in weight_grads]
    return np.asarray(loss), _scatter(input_grads, is_float), weight_grads


def _scatter(float_grads, is_float):
    """Gradients of the floating inputs -> one entry per input, None for the rest."""
    float_grads = iter(float_grads)
    return [next(float_grads) if f else None for f in is_float]


def apply_optimizer_step(model, weight_grads, optimizer):
    """One step of a Keras optimizer with the given gradients; the new weights.

    Args:
        model: a built layer or model.
        weight_grads: NumPy gradients in the order of `model.trainable_variables`
            (as `value_and_grad` returns them).
        optimizer: a Keras optimizer, e.g. `keras.optimizers.SGD(0.01)`; it is
            built on `model.trainable_variables` at its first step.

    Returns:
        The trainable variables after the step, as NumPy arrays in their dtypes.

    This needs no automatic differentiation: it runs under every Keras
    backend, numpy included; but Keras' numpy backend updates float64
    variables with float32 accuracy (measured with keras 3.15: an SGD step
    1e-5 off, relative to the step).

    Precision notes (keras 3.15): Keras keeps the learning rate in a variable of
    dtype `keras.config.floatx()` (float32), so a float64 model is stepped with
    the learning rate rounded to float32 (e.g. SGD(0.01) steps with
    float32(0.01)), on every backend (canary "learning-rate-float32"). On
    TensorFlow, Adam-style optimizers also
    compute their bias corrections from `ops.cast(beta, "float64")`, which
    rounds the Python float beta through float32: the first float64 Adam(1e-3)
    step is then about 7e-6 (relative) off the exact formula. Hyperparameters
    exactly representable in float32 (0.875, 2**-10, ...) avoid both.
    """
    variables = list(model.trainable_variables)
    weight_grads = list(weight_grads)
    if len(weight_grads) != len(variables):
        raise ValueError(
            f"Expected {len(variables)} gradients (one per trainable variable). "
            f"Received: {len(weight_grads)}"
        )
    grads = []
    for variable, grad in zip(variables, weight_grads):
        grad = np.asarray(grad)
        if grad.shape != tuple(variable.shape):
            raise ValueError(
                f"The gradient of {variable.path} must have shape "
                f"{tuple(variable.shape)}. Received: shape={grad.shape}"
            )
        grads.append(ops.convert_to_tensor(grad, dtype=variable.dtype))
    if keras.backend.backend() == "torch":
        import torch

        # In-place updates of Parameters that require grad: as Keras' torch
        # trainer does, outside autograd.
        with torch.no_grad():
            optimizer.apply(grads, variables)
    else:
        optimizer.apply(grads, variables)
    return [np.array(ops.convert_to_numpy(v)) for v in variables]
