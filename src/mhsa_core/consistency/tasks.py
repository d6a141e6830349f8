"""The matrix's own worker tasks (`protocol.ALL_TASKS`), one function each, in
one table (`TASKS`).

A task is `task(ctx, timings) -> {result key: array}`: `ctx` the case's
`task_context.TaskContext`, `timings` a dict it may add seconds to; the keys
are `protocol`'s. Every case runs the ones its checks read
(`matrix.needed_tasks`); the opt-in features' tasks are theirs
(`features.tasks()`).

Results, per input variant v:
- FORWARD / FORWARD64 / JIT / SCORES: `out_key(v)` (`output_key(v, o)` per
  output o of a multi-output model); FORWARD also AGAIN_KEY (variant 0 once
  more, to check repeatability) and the timing FORWARD_SECONDS;
- GRADS / GRADS64: `loss_key(v)`, `input_grad_key(v, k)` (float inputs),
  `weight_grad_key(v, j)` in the order of `model.trainable_variables`; and
  `start_key(j)` (the weights);
- OPTIMIZERS, per optimizer of OPTIMIZER_SETTINGS: `step_key(optimizer, v, j)`
  (the weights after one step from the same start `start_key(j)`, with that
  variant's gradients `step_grad_key(v, j)`);
- SAVE: `saved_weight_key(j)` (all `model.get_weights()`), beside the
  `.keras` file (`TaskContext.model_file`).

Runs in a worker only (Keras comes with `ctx`).
"""

import os
import re
import time

import numpy as np

from mhsa_core.consistency import protocol
from mhsa_core.consistency.arrays import portable
from mhsa_core.consistency.protocol import (
    AGAIN_KEY,
    FORWARD,
    FORWARD64,
    FORWARD_SECONDS,
    GRADS,
    GRADS64,
    JIT,
    OPTIMIZERS,
    SAVE,
    SCORES,
    out_key,
)

__all__ = ["TASKS"]

_TIMED_REPEATS = 3


def forward(ctx, timings):
    results = ctx.output_results(ctx.model, ctx.variants)
    # Inference must be repeatable: a model that draws random numbers in
    # call() gives another output each time (and on each backend).
    results[AGAIN_KEY] = ctx.forward(ctx.model, ctx.variants[0])
    # Timing on variant 0: best of a few calls after the warm-up above.
    xs = ctx.variants[0]
    seconds = []
    for _ in range(_TIMED_REPEATS):
        start = time.perf_counter()
        ctx.forward(ctx.model, xs)
        seconds.append(time.perf_counter() - start)
    timings[FORWARD_SECONDS] = min(seconds)
    return results


def forward64(ctx, timings):
    return ctx.output_results(ctx.model64(), ctx.variants64)


def scores(ctx, timings):
    if ctx.layer is None:
        raise ValueError("attention scores exist for layer cases only")
    results = {}
    for v, xs in enumerate(ctx.variants):
        # The scores come last: (outputs, scores), or with prefix tokens
        # (outputs, prefix_outputs, scores).
        probs = ctx.layer_call(ctx.layer, xs, return_attention_scores=True)[-1]
        results[out_key(v)] = portable(ctx.keras.ops.convert_to_numpy(probs))
    return results


def _grads(ctx, model, variants):
    """Loss and gradients of every input variant (e.g. every spatial size:
    a position table is resized, and differentiated, differently at each)."""
    from mhsa_core.consistency import gradients

    results = {
        protocol.start_key(j): portable(ctx.keras.ops.convert_to_numpy(w))
        for j, w in enumerate(model.trainable_variables)
    }
    for v, xs in enumerate(variants):
        outs = ctx.outputs(model, xs)  # the loss covers every output
        loss_weights = (
            gradients.loss_weights(outs[0].shape)
            if len(outs) == 1
            else [gradients.loss_weights(o.shape, seed=k) for k, o in enumerate(outs)]
        )
        loss, input_grads, weight_grads = gradients.value_and_grad(
            model, ctx.call_inputs(xs), loss_weights
        )
        results[protocol.loss_key(v)] = np.asarray(loss)
        for k, g in enumerate(input_grads):
            if g is not None:
                results[protocol.input_grad_key(v, k)] = portable(g)
        for j, g in enumerate(weight_grads):
            results[protocol.weight_grad_key(v, j)] = portable(g)
    return results


def _model_grads(ctx):
    """`_grads` of the case's model (in its dtype) at its input variants,
    computed once per case: task GRADS returns them and task OPTIMIZERS
    applies them (it once computed them again, the same arrays: the same
    model, weights and inputs, as OPTIMIZERS puts the weights back after
    each step). Kept on `ctx`, which lives for one case."""
    cached = getattr(ctx, "_model_grads", None)
    if cached is None:
        cached = _grads(ctx, ctx.model, ctx.variants)
        ctx._model_grads = cached
    return cached


def grads(ctx, timings):
    return dict(_model_grads(ctx))


def grads64(ctx, timings):
    return _grads(ctx, ctx.model64(), ctx.variants64)


def optimizers(ctx, timings):
    """One step of each optimizer of `protocol.OPTIMIZER_SETTINGS` per input
    variant, each from the same start (fresh optimizers every time: Adam's
    first step) with that variant's gradients."""
    from mhsa_core.consistency import gradients

    keras = ctx.keras
    model = ctx.model
    start = [keras.ops.convert_to_numpy(v) for v in model.trainable_variables]
    grads = _model_grads(ctx)
    results = {protocol.start_key(j): portable(w) for j, w in enumerate(start)}
    for v in range(len(ctx.variants)):
        g = [grads[protocol.weight_grad_key(v, j)] for j in range(len(start))]
        results.update({protocol.step_grad_key(v, j): gj for j, gj in enumerate(g)})
        for name, (class_name, arguments) in protocol.OPTIMIZER_SETTINGS.items():
            optimizer = getattr(keras.optimizers, class_name)(**arguments)
            new = gradients.apply_optimizer_step(model, g, optimizer)
            for j, w in enumerate(new):
                results[protocol.step_key(name, v, j)] = portable(w)
            for var, w in zip(model.trainable_variables, start):  # back to the start
                var.assign(w)
    return results


def _xla_cannot_compile(error):
    """Whether a TensorFlow error is XLA lacking a kernel for some op."""
    text = str(error)
    return type(error).__name__ in ("InvalidArgumentError", "UnimplementedError") and (
        "XLA" in text or "not compilable" in text or "No registered" in text
    )


def jit(ctx, timings):
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
    keras = ctx.keras
    model = ctx.model
    backend = ctx.backend
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
            return model.stateless_call(trainable, non_trainable, xs, training=False)[0]

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
    for v, xs in enumerate(ctx.variants):
        tensors = [keras.ops.convert_to_tensor(x, dtype=str(x.dtype)) for x in xs]
        try:
            out = run(ctx.call_inputs(tensors))
        except Exception as e:  # noqa: BLE001 -- only XLA's "no kernel" is a note
            if backend != "tensorflow" or not _xla_cannot_compile(e):
                raise
            # Some TF ops have no XLA kernel (e.g. ResizeBicubic: bicubic
            # UpSampling2D). A model XLA cannot compile is not a
            # disagreement of the backends: the cell says so, unjudged.
            ops = re.search(r"on XLA_\w+: ([\w, ]+)", str(e))
            what = ops.group(1).strip() if ops else str(e).strip().splitlines()[0][:120]
            note = f"not judged: XLA cannot compile {what}"
            return {protocol.NOTE_KEY: np.array(note)}
        for o, each in enumerate(keras.tree.flatten(out)):
            results[protocol.output_key(v, o)] = portable(
                keras.ops.convert_to_numpy(each)
            )
    return results


def save(ctx, timings):
    path = ctx.model_file
    tmp = path.with_suffix(".tmp.keras")
    ctx.model.save(tmp)
    os.replace(tmp, path)
    return {
        protocol.saved_weight_key(j): portable(w)
        for j, w in enumerate(ctx.model.get_weights())
    }


# task name -> its function: what the worker runs for a case's task.
TASKS = {
    FORWARD: forward,
    FORWARD64: forward64,
    SCORES: scores,
    GRADS: grads,
    GRADS64: grads64,
    OPTIMIZERS: optimizers,
    JIT: jit,
    SAVE: save,
}
