"""What a backward pass keeps from its forward pass, read from its structure.

`saved_for_backward(fn, *args)` lists the tensors that the backward pass of
the scalar `fn(*args)` holds on to, on the current Keras backend, without
running anything for its time or its memory:

- torch: every tensor autograd packs during the forward pass
  (`torch.autograd.graph.saved_tensors_hooks`). A `keras.remat` region
  (`torch.utils.checkpoint(use_reentrant=False)`) packs its own inputs through
  these hooks and hides its intermediates behind hooks of its own, so what it
  recomputes does not appear.
- jax: the residuals of `jax.vjp(fn, *args)` (the leaves of the VJP function),
  traced abstractly. A residual of a `lax.scan` (what `ops.map` lowers to) is
  stacked over the iterations; loop-invariant ones are hoisted out unstacked.
  A `jax.checkpoint` region (`keras.remat`) contributes only its inputs.
- tensorflow: the graph of `tf.function(loss and tf.GradientTape gradients)`:
  every forward tensor that a gradient op (name scope `gradient_tape/`)
  consumes, plus, for each while loop (`ops.map` is one), the accumulators
  the loop fills for its gradient (`EmptyTensorList`, one element pushed per
  iteration, found in the graph and in its function library). A
  `tf.recompute_grad` region (`keras.remat`) makes the loop accumulate only
  that region's inputs.

Each result is a `Saved(shape, dtype, steps)`: `steps` is the number of loop
iterations it is stacked over (its leading axis; 1 for a plain tensor; None
when a TF loop's trip count is not a graph constant), so `step_size` is what
one iteration (one chunk) keeps. A tensor saved by each iteration of a Python
loop (torch) appears once per iteration with `steps` 1.
"""

import math
from typing import NamedTuple

import keras
import numpy as np


class Saved(NamedTuple):
    """One tensor kept for the backward pass.

    `shape` is the whole tensor's: a residual stacked over `steps` loop
    iterations (nested loops multiply) leads with those axes; a TF loop
    accumulator whose trip count is not a graph constant has `steps` None
    and a leading None.
    """

    shape: tuple
    dtype: str
    steps: int | None = 1

    @property
    def step_size(self) -> int:
        """Elements kept per loop iteration (all of them for a plain tensor)."""
        dims = self.shape[1:] if self.steps is None else self.shape
        if any(d is None for d in dims):
            raise ValueError(
                f"A saved tensor's shape is not static. Received: shape={self.shape}"
            )
        return math.prod(dims) // (self.steps or 1)


def saved_for_backward(fn, *args) -> list[Saved]:
    """The tensors the backward pass of `fn(*args)` keeps, on this backend.

    Args:
        fn: a function of backend tensors (Keras ops) returning a scalar; it
            is differentiated with respect to every floating argument.
        *args: NumPy arrays; their shapes are the static shapes the forward
            pass is traced with (TF: `tf.function` with these shapes; JAX:
            `jax.make_jaxpr`; torch: one eager run).

    Returns:
        A list of `Saved`, largest per-iteration size first.
    """
    backend = keras.backend.backend()
    finders = {
        "tensorflow": _saved_tensorflow,
        "torch": _saved_torch,
        "jax": _saved_jax,
    }
    if backend not in finders:
        raise ValueError(
            "saved_for_backward needs a backend with gradients (tensorflow, "
            f"torch, jax). Received: backend={backend}"
        )
    saved = finders[backend](fn, *args)
    return sorted(saved, key=lambda s: s.step_size, reverse=True)


def layer_loss(layer, x, *, seed=0, **call_kwargs):
    """A pure scalar loss of `layer` and its explicit arguments.

    Returns `(fn, args)` with `args = (x, *trainable weight values)` as NumPy
    and `fn(x, *weights) = sum(layer(x, **call_kwargs) * L)` computed with
    `layer.stateless_call`, so every backend differentiates with respect to
    the input and every weight (JAX needs a pure function; closed-over
    variables would be constants there). `L` is a fixed random array, so no
    gradient is trivially constant.
    """
    weights = [keras.ops.convert_to_numpy(v.value) for v in layer.trainable_variables]
    non_trainable = [v.value for v in layer.non_trainable_variables]
    # The shape without running the layer (an eager run costs seconds on JAX).
    out_shape = layer.compute_output_shape(x.shape)
    cotangent = np.random.default_rng(seed).standard_normal(out_shape).astype(x.dtype)

    def fn(x, *weights):
        out, _ = layer.stateless_call(list(weights), non_trainable, x, **call_kwargs)
        return keras.ops.sum(keras.ops.multiply(out, cotangent))

    return fn, (x, *weights)


def _is_floating(a) -> bool:
    return "float" in keras.backend.standardize_dtype(a.dtype)


# torch -----------------------------------------------------------------------


def _saved_torch(fn, *args):
    import torch

    tensors = [
        torch.tensor(np.asarray(a)).requires_grad_(_is_floating(a)) for a in args
    ]
    saved = {}

    def pack(t):
        # One entry per distinct view: autograd saves the same tensor for
        # several ops (a key matrix for each chunk's matmul); each view is
        # counted once.
        key = (
            t.untyped_storage().data_ptr(),
            t.storage_offset(),
            tuple(t.shape),
            t.stride(),
        )
        saved.setdefault(
            key, Saved(tuple(t.shape), str(t.dtype).removeprefix("torch."))
        )
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = fn(*tensors)
    # The backward pass must run with what was saved: a structure that
    # cannot differentiate proves nothing.
    torch.autograd.grad(loss, [t for t in tensors if t.requires_grad])
    return list(saved.values())


# jax -------------------------------------------------------------------------


def _saved_jax(fn, *args):
    import jax

    def residuals(*args):
        _, vjp_fn = jax.vjp(fn, *args)
        return jax.tree_util.tree_leaves(vjp_fn)

    closed = jax.make_jaxpr(residuals)(*args)
    return [
        Saved(tuple(v.aval.shape), str(v.aval.dtype), _scan_steps(closed.jaxpr, v))
        for v in closed.jaxpr.outvars
    ]


def _scan_steps(jaxpr, var) -> int:
    """How many scan iterations `var` is stacked over (1 if none): follows it
    into the jit or scan that produced it (nested scans multiply)."""
    for eqn in jaxpr.eqns:
        for index, out in enumerate(eqn.outvars):
            if out is not var:
                continue
            inner = eqn.params.get("jaxpr")
            inner = getattr(inner, "jaxpr", inner)  # ClosedJaxpr -> Jaxpr
            if eqn.primitive.name == "scan":
                if index < eqn.params["num_carry"]:
                    return 1
                return eqn.params["length"] * _scan_steps(inner, inner.outvars[index])
            if inner is not None and len(getattr(inner, "outvars", ())) == len(
                eqn.outvars
            ):
                # jit (pjit) and other call-like primitives: look inside.
                return _scan_steps(inner, inner.outvars[index])
            return 1
    return 1  # an input or a constant


# tensorflow ------------------------------------------------------------------

# Gradient ops that a tf.GradientTape adds to a tf.function graph live under
# this name scope; everything else in the graph is the forward pass.
_TAPE_SCOPE = "gradient_tape/"


def _saved_tensorflow(fn, *args):
    import tensorflow as tf

    args = [tf.convert_to_tensor(np.asarray(a)) for a in args]
    floating = [a for a in args if _is_floating(a)]

    @tf.function
    def loss_and_grads(*args):
        with tf.GradientTape() as tape:
            for a in args:
                if _is_floating(a):
                    tape.watch(a)
            loss = fn(*args)
        return loss, tape.gradient(loss, [a for a in args if _is_floating(a)])

    specs = [tf.TensorSpec(a.shape, a.dtype) for a in args]
    concrete = loss_and_grads.get_concrete_function(*specs)
    graph = concrete.graph
    saved = {}
    for op in graph.get_operations():
        if not op.name.startswith(_TAPE_SCOPE):
            continue
        for t in op.inputs:
            if t.op.name.startswith(_TAPE_SCOPE) or t.dtype in (
                tf.variant,
                tf.resource,
            ):
                continue
            # Loop accumulators are variants, counted below from their
            # element shapes; everything else is a forward tensor kept alive
            # for this gradient op.
            saved.setdefault(t.name, Saved(tuple(t.shape.as_list()), t.dtype.name))
    result = list(saved.values())
    graph_def = graph.as_graph_def()
    result += _accumulators(graph_def.node)
    for function in graph_def.library.function:
        result += _accumulators(function.node_def)
    # The gradients must exist: a structure whose backward is broken proves
    # nothing (a closure under tf.recompute_grad can lose its gradient).
    _, grads = loss_and_grads(*args)
    missing = [i for i, g in enumerate(grads) if g is None]
    if missing:
        raise ValueError(
            "The backward pass gave no gradient for the floating arguments at "
            f"positions {missing} of {len(floating)}."
        )
    return result


def _accumulators(nodes):
    """`Saved` for every TensorList a while loop fills for its gradient."""
    import tensorflow as tf

    by_name = {n.name: n for n in nodes}

    def constant(input_name):
        node = by_name.get(input_name.lstrip("^").split(":")[0])
        if node is None or node.op != "Const":
            return None
        return tf.make_ndarray(node.attr["value"].tensor)

    found = []
    for node in nodes:
        if node.op != "EmptyTensorList":
            continue
        element_shape = constant(node.input[0])
        max_elements = constant(node.input[1])
        if element_shape is None:
            element = (None,)
        else:
            element = tuple(int(d) if d >= 0 else None for d in np.ravel(element_shape))
            if np.ndim(element_shape) == 0 and int(element_shape) == -1:
                element = (None,)  # unknown rank
        steps = None
        if max_elements is not None and int(max_elements) >= 0:
            steps = int(max_elements)
        dtype = tf.dtypes.as_dtype(node.attr["element_dtype"].type).name
        found.append(Saved((steps, *element), dtype, steps))
    return found
