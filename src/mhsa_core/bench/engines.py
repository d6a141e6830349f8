"""How each backend runs a measured function: its modes, its gradients, its
synchronisation, and its own float32 matmul rate (the ceiling).

A subject (what is measured, `subjects`) comes in the backend's idiom:
TensorFlow and torch get `call(x) -> out` closing over its variables and the
list `params` of those variables; JAX gets a pure `apply(params, x) -> out`
and the pytree `params`. `Engine.step(subject, mode, direction)` returns a
zero-argument function that runs one step to completion and returns the
forward output:

- "forward": the output alone (torch under `no_grad`, as inference runs);
- "forward+backward": the output and the gradients of sum(out * g), g a fixed
  random cotangent, wrt the input and every weight.

Imports its framework inside: a worker imports only its own.
"""

from __future__ import annotations

import statistics
import time
from typing import ClassVar

import numpy as np

from mhsa_core.bench.flops import FORWARD, matmul_flops
from mhsa_core.bench.plan import COMPILED, GRAPH

CEILING_WARMUP = 3
CEILING_REPEATS = 10


def _median_seconds(fn, warmup, repeats):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


class Engine:
    """One backend's way of running things (subclasses per backend)."""

    backend: ClassVar[str | None] = None  # each subclass's
    ceiling_op: ClassVar[str | None] = None

    def set_inputs(self, x, cotangent):
        """x, cotangent: NumPy float32 (B, H, W, C), made the backend's tensors
        `self.x`, `self.g` (after the ceiling: they count in the measurement's
        memory)."""
        raise NotImplementedError

    def version(self) -> str:
        raise NotImplementedError

    def ceiling_gflops(self, rows: int, channels: int) -> float:
        """GF/s of the backend's float32 (rows, C) @ (C, C), median of
        `CEILING_REPEATS`."""
        rng = np.random.default_rng(1)
        a = rng.standard_normal((rows, channels)).astype(np.float32)
        b = rng.standard_normal((channels, channels)).astype(np.float32)
        seconds = _median_seconds(self._matmul(a, b), CEILING_WARMUP, CEILING_REPEATS)
        return matmul_flops(rows, channels, channels) / seconds / 1e9

    def _matmul(self, a, b):
        """A zero-argument function computing a @ b to completion."""
        raise NotImplementedError

    def step(self, subject, mode, direction):
        raise NotImplementedError

    @staticmethod
    def to_numpy(out) -> np.ndarray:
        return np.asarray(out)


class TensorFlowEngine(Engine):
    backend = "tensorflow"
    ceiling_op = "tf.linalg.matmul, eager"

    def __init__(self):
        import tensorflow as tf

        self.tf = tf

    def set_inputs(self, x, cotangent):
        self.x, self.g = self.tf.constant(x), self.tf.constant(cotangent)

    def version(self):
        return self.tf.__version__

    def _matmul(self, a, b):
        tf = self.tf
        a, b = tf.constant(a), tf.constant(b)
        # TF runs eager ops synchronously on the CPU: the result is computed on return.
        return lambda: tf.linalg.matmul(a, b)

    def _wrap(self, fn, mode):
        if mode == COMPILED:
            return self.tf.function(fn, jit_compile=True)
        if mode == GRAPH:
            return self.tf.function(fn)
        return fn

    def step(self, subject, mode, direction):
        tf, call, params, g = self.tf, subject.call, subject.params, self.g
        if direction == FORWARD:
            fn = self._wrap(call, mode)
            return lambda: fn(self.x)

        def train(x):
            with tf.GradientTape() as tape:
                tape.watch(x)
                out = call(x)
                loss = tf.reduce_sum(out * g)
            return out, tape.gradient(loss, [x, *params])

        fn = self._wrap(train, mode)
        return lambda: fn(self.x)[0]

    @staticmethod
    def to_numpy(out):
        return out.numpy()


class TorchEngine(Engine):
    backend = "torch"
    ceiling_op = "torch.matmul, eager"

    def __init__(self):
        import torch

        self.torch = torch

    def set_inputs(self, x, cotangent):
        self.x, self.g = self.torch.as_tensor(x), self.torch.as_tensor(cotangent)

    def version(self):
        return self.torch.__version__

    def _matmul(self, a, b):
        a, b = self.torch.as_tensor(a), self.torch.as_tensor(b)
        return lambda: self.torch.matmul(a, b)  # CPU ops are synchronous

    def step(self, subject, mode, direction):
        torch, params = self.torch, subject.params
        fn = torch.compile(subject.call) if mode == COMPILED else subject.call
        if direction == FORWARD:

            def forward():
                with torch.no_grad():
                    return fn(self.x)

            return forward

        def train():
            x = self.x.detach().requires_grad_(True)
            out = fn(x)
            loss = (out * self.g).sum()
            torch.autograd.grad(loss, [x, *params])
            return out.detach()

        return train

    @staticmethod
    def to_numpy(out):
        return out.detach().cpu().numpy()


class JaxEngine(Engine):
    backend = "jax"
    ceiling_op = "jnp.matmul, eager (one compiled op)"

    def __init__(self):
        import jax
        import jax.numpy as jnp

        self.jax, self.jnp = jax, jnp

    def set_inputs(self, x, cotangent):
        self.x, self.g = self.jnp.asarray(x), self.jnp.asarray(cotangent)

    def version(self):
        return self.jax.__version__

    def _matmul(self, a, b):
        a, b = self.jnp.asarray(a), self.jnp.asarray(b)
        return lambda: self.jnp.matmul(a, b).block_until_ready()

    def step(self, subject, mode, direction):
        jax, jnp, apply, params, g = (
            self.jax,
            self.jnp,
            subject.call,
            subject.params,
            self.g,
        )
        if direction == FORWARD:
            fn = jax.jit(apply) if mode == COMPILED else apply
            return lambda: jax.block_until_ready(fn(params, self.x))

        def loss(params, x):
            out = apply(params, x)
            return jnp.sum(out * g), out

        grad = jax.grad(loss, argnums=(0, 1), has_aux=True)
        fn = jax.jit(grad) if mode == COMPILED else grad
        return lambda: jax.block_until_ready(fn(params, self.x))[1]


ENGINES = {e.backend: e for e in (TensorFlowEngine, TorchEngine, JaxEngine)}
