"""What one bench run measures: the rows, one worker process each.

A row is (backend, config, path, mode, direction):

- path: the layer's `attention_implementation` ("full", "chunked", "fused",
  "auto"), or a reference: "native" (the backend's own fused attention of the
  same block, `natives`) or "keras_mha" (`keras.layers.MultiHeadAttention`
  with `attention_axes=(1, 2)`, what a Keras user would reach for);
- mode: how the backend runs it (`MODE_MEANINGS`); a backend without a mode
  (torch and JAX have no "graph") gets no row for it, nor a native outside
  its `NATIVE_MODES`;
- direction: "forward", or "forward+backward" (the gradients of a scalar
  loss wrt the inputs and every weight).
"""

from __future__ import annotations

import dataclasses

from mhsa_core.bench.flops import DIRECTIONS

BENCH_BACKENDS = ("tensorflow", "torch", "jax")

FULL, CHUNKED, FUSED, AUTO = "full", "chunked", "fused", "auto"
LAYER_PATHS = (FULL, CHUNKED, FUSED, AUTO)
NATIVE = "native"
KERAS_MHA = "keras_mha"
PATHS = LAYER_PATHS + (NATIVE, KERAS_MHA)

COMPILED, GRAPH, EAGER = "compiled", "graph", "eager"
MODES = (COMPILED, GRAPH, EAGER)
MODE_MEANINGS = {
    "tensorflow": {
        "compiled": "tf.function(jit_compile=True) (XLA)",
        "graph": "tf.function (graph, no XLA)",
        "eager": "eager",
    },
    "torch": {"compiled": "torch.compile", "eager": "eager"},
    "jax": {"compiled": "jax.jit of the stateless call", "eager": "op by op, no jit"},
}

# What "native" is on each backend, and the modes it runs in: the way a user
# of the framework runs it (TensorFlow's einsum + softmax is the native only
# under XLA, which fuses it; jax.nn.dot_product_attention under jit; torch's
# SDPA is a fused kernel eagerly, and under torch.compile too).
NATIVE_MEANINGS = {
    "tensorflow": "the block in tf ops (einsum, softmax) under XLA",
    "torch": "F.scaled_dot_product_attention",
    "jax": "jax.nn.dot_product_attention under jax.jit",
}
NATIVE_MODES = {
    "tensorflow": ("compiled",),
    "torch": ("compiled", "eager"),
    "jax": ("compiled",),
}


def backend_modes(backend: str, path: str | None = None) -> tuple[str, ...]:
    """The modes `backend` runs `path` in (every mode it has but for the
    native), in `MODES` order."""
    modes = NATIVE_MODES[backend] if path == NATIVE else MODE_MEANINGS[backend]
    return tuple(m for m in MODES if m in modes)


@dataclasses.dataclass(frozen=True)
class Measurement:
    """One row of the bench: measured in a worker process of its own."""

    backend: str
    config: str
    path: str
    mode: str
    direction: str

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


def plan(backends, configs, paths=PATHS, modes=MODES, directions=DIRECTIONS):
    """The measurements of a run, grouped by backend then config (one import
    per worker either way; grouping keeps a config's rows close in time).

    Args:
        backends, configs, paths, modes, directions: names (validated by the caller).

    Returns:
        A list of `Measurement`, paths in `PATHS` order, modes in `MODES` order.
    """
    rows = []
    for backend in backends:
        for config in configs:
            for path in (p for p in PATHS if p in paths):
                for mode in (m for m in backend_modes(backend, path) if m in modes):
                    for direction in (d for d in DIRECTIONS if d in directions):
                        rows.append(Measurement(backend, config, path, mode, direction))
    return rows
