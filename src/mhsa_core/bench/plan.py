"""What one bench run measures: the rows, one worker process each.

A row is (backend, config, path, mode, direction):

- path: the layer's `attention_implementation` ("full", "chunked", "fused",
  "auto"), or a reference: "native" (the backend's own fused attention of the
  same block, `natives`), "timm" (timm's own module of the same block, torch
  only, `timm_peer`) or "keras_mha" (`keras.layers.MultiHeadAttention` with
  `attention_axes=(1, 2)`, what a Keras user would reach for);
- mode: how the backend runs it (`MODE_MEANINGS`); a backend without a mode
  (torch and JAX have no "graph") gets no row for it, nor a reference
  outside its `REFERENCE_MODES` (timm: torch's compiled and eager only);
- config: a "timm" row only for a config with a timm peer
  (`timm_peer.peer_of`: Swin's windows, "rope", "relative", pvt_v2's reduced
  keys); the others get none, by plan, not as an error; nor "native" and
  "keras_mha" rows for reduced keys (`has_row`);
- direction: "forward", or "forward+backward" (the gradients of a scalar
  loss wrt the inputs and every weight).
"""

from __future__ import annotations

import dataclasses

from mhsa_core.bench import timm_peer
from mhsa_core.bench.configs import CONFIGS
from mhsa_core.bench.flops import DIRECTIONS

BENCH_BACKENDS = ("tensorflow", "torch", "jax")

FULL, CHUNKED, FUSED, AUTO = "full", "chunked", "fused", "auto"
LAYER_PATHS = (FULL, CHUNKED, FUSED, AUTO)
NATIVE = "native"
TIMM = "timm"
KERAS_MHA = "keras_mha"
PATHS = LAYER_PATHS + (NATIVE, TIMM, KERAS_MHA)

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
# timm is torch: its modules run as the native's do (eager, torch.compile).
TIMM_MODES = {"torch": NATIVE_MODES["torch"]}
# The references that do not run in every mode of every backend.
REFERENCE_MODES = {NATIVE: NATIVE_MODES, TIMM: TIMM_MODES}


def backend_modes(backend: str, path: str | None = None) -> tuple[str, ...]:
    """The modes `backend` runs `path` in (every mode it has but for the
    references of `REFERENCE_MODES`), in `MODES` order; () for none."""
    if path in REFERENCE_MODES:
        modes = REFERENCE_MODES[path].get(backend, ())
    else:
        modes = tuple(MODE_MEANINGS[backend])
    return tuple(m for m in MODES if m in modes)


def has_row(config: str, path: str) -> bool:
    """Whether `config` (a name of `CONFIGS`) gets rows of `path`: every
    config but for "timm", which needs a peer, and a config with reduced
    keys and values (`kv_reduction`), which has no "native" (the fused
    natives carry no reduction: timm's pvt_v2 is its peer) nor "keras_mha"
    (Keras's MultiHeadAttention attends every token: another block)."""
    if CONFIGS[config].kv_reduction and path in (NATIVE, KERAS_MHA):
        return False
    return path != TIMM or timm_peer.peer_of(CONFIGS[config]) is not None


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
            for path in (p for p in PATHS if p in paths and has_row(config, p)):
                for mode in (m for m in backend_modes(backend, path) if m in modes):
                    for direction in (d for d in DIRECTIONS if d in directions):
                        rows.append(Measurement(backend, config, path, mode, direction))
    return rows
