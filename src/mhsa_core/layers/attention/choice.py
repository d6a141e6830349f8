"""Which attention path runs: the one rule, and the chunk size.

`attention_implementation` (a layer argument, stored in its config):

- "full" always runs the full path.
- "chunked" runs the chunked path, "fused" the fused path, except where they
  cannot give what the call asks for: attention scores, or dropout in
  training, need the full path; "fused" also falls back to "chunked" where
  the fused kernels are not exact enough (float64: torch and JAX compute it
  in float32 there). Structural misfits of "fused" (a relative position
  term, query and value heads of different widths) are a ValueError when
  the layer is made or built, not a fallback. A rotation of q and k
  ("rope", "rope_mixed") is no misfit: the layer rotates them before any
  path runs (`PositionEncoding.rotate`), so every path, the fused kernels
  included, takes the rotated q and k. A bias of no query ("relative_bias")
  and Swin's shift mask are the fused kernels' additive bias (`fused.py`).
- "auto": the full path for maps of at most `FULL_MAX_TOKENS` tokens (it is
  near each backend's matmul ceiling there and the only one with scores;
  with keys from another map, a context or a reduced map, N queries and Nk
  keys: up to N * Nk <= FULL_MAX_TOKENS^2 logits, `full_fits`),
  else fused where it is supported, the backend's kernel is the fast one
  (`FUSED_FAST_BACKENDS`) and the call needs no additive bias (a
  (B, heads, N, N) bias is the memory the other paths avoid; SDPA's flash
  kernel takes none), else chunked. With windows N is the window's tokens
  (49 for Swin's 7x7): the full path, per window. When N is known only at run time
  (a TensorFlow graph with dynamic H and W), the choice between full and
  chunked is made then, by `ops.cond`; when N is symbolic on JAX
  (`jax.export`'s shape polymorphism, as in Keras's exports from JAX), the
  full path: a symbolic size can be neither compared nor looped over.
  "chunked" with a symbolic N on JAX is a ValueError naming `fallback`.

Exporters that cannot take a path (`fallback`, a scoped setting): within
`with choice.fallback("chunked"): model.export(...)` every call that would
take one of the named paths takes the full path instead, the one path that
every exporter takes (plain matmuls and a softmax), and the returned record
says whether any call did. `mhsa-core matrix --export` uses it where a format
cannot take the chunked path's loop (`consistency.features.export`'s path fallbacks) and
says so in the export cell.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from typing import TYPE_CHECKING

import keras

from mhsa_core._typing import Tensor

# The values of `attention_implementation` live with the layer's other argument
# rules (framework-free, so the rule has no copy).
from mhsa_core.reference.arguments import IMPLEMENTATIONS as IMPLEMENTATIONS

if TYPE_CHECKING:
    from mhsa_core.layers.position.base import PositionEncoding

FULL, CHUNKED, FUSED = "full", "chunked", "fused"
BY_SIZE = "full or chunked by size"

# Up to this many tokens the full path is used by "auto": (B, heads, N, N) is
# small (625 tokens, the legacy block's 25 x 25, is 1.5 MB per head).
FULL_MAX_TOKENS = 1024

# Backends whose `ops.dot_product_attention` is a fused kernel on CPU: torch's
# SDPA (flash kernel, O(N) backward). On TensorFlow and JAX CPU it is the
# plain computation with the (B, heads, N, N) logits, slower than chunks.
FUSED_FAST_BACKENDS = ("torch",)

# The chunked path's tile: c queries x N keys, about this many elements (4 MB
# in float32: it stays in the cache, which is what makes the path fast).
TILE_ELEMENTS = 1 << 20
MIN_CHUNK, MAX_CHUNK = 16, 1024


# The chunked path's tile per backend: one head's (c, N) (an ops.map over
# batch x heads, then chunks), or all heads' (B * heads, c, N) at once.
# Measured forward at N = 4096, 8 heads, c = 256, one process each: TF 2.5 s
# per head vs 3.8 s all heads (XLA: 1.7 vs 2.5); torch 31 s vs 8.7 s (256
# eager steps of Python and checkpoint overhead against 16); JAX per head
# (the prototype: 0.22 s vs 0.54 s for the attention core).
CHUNK_PER_HEAD = {"tensorflow": True, "jax": True, "torch": False}


def chunk_per_head() -> bool:
    return CHUNK_PER_HEAD.get(keras.backend.backend(), True)


def fused_misfit(
    position: PositionEncoding, query_dim: int | None, value_dim: int | None
) -> str | None:
    """Why the fused path cannot run this layer at all, or None.

    Only a logits term that depends on the query's position misfits: a
    "tokens" encoding acts before the projections, a "qk" encoding (rope)
    rotates q and k before the attention, a term q_i . e_j folds into the
    keys (`PositionEncoding.key_term`), and a bias of no query
    ("relative_bias") is the kernels' additive bias.
    """
    if (
        position.spec.stage == "logits"
        and not position.folds_into_keys
        and not position.bias_term
    ):
        return (
            f"position_encoding={position.name!r} adds a term that depends on "
            "the query's position, which the fused kernels cannot take"
        )
    if query_dim is not None and value_dim is not None and query_dim != value_dim:
        return (
            f"the fused kernels need query and value heads of one width "
            f"(key_dim={query_dim}, value head width={value_dim})"
        )
    return None


def full_fits(n: int | Tensor, key_count: int | Tensor | None = None) -> bool | Tensor:
    """Whether "auto" takes the full path at N queries and `key_count` keys
    (None: N): N * Nk <= FULL_MAX_TOKENS^2, i.e. N <= FULL_MAX_TOKENS for
    self-attention. Written N <= FULL_MAX_TOKENS^2 // Nk (exact for positive
    ints) so that int32 tensors never overflow."""
    if key_count is None:
        return n <= FULL_MAX_TOKENS
    return n <= (FULL_MAX_TOKENS * FULL_MAX_TOKENS) // key_count


def resolve(
    implementation: str,
    *,
    n: int | Tensor,
    key_count: int | Tensor | None = None,
    dtype: str,
    query_dim: int | None,
    value_dim: int | None,
    position: PositionEncoding,
    scores: bool,
    dropout: bool,
    bias: bool = False,
) -> str:
    """The path of one call: FULL, CHUNKED, FUSED or BY_SIZE (N dynamic),
    after any active `fallback`. `bias`: whether the call has an additive
    (heads, N, N) term (a bias encoding, Swin's shift mask). `key_count`: Nk
    of keys from another map (None: N)."""
    path = _fall_back(
        _rule(
            implementation,
            n=n,
            key_count=key_count,
            dtype=dtype,
            query_dim=query_dim,
            value_dim=value_dim,
            position=position,
            scores=scores,
            dropout=dropout,
            bias=bias,
        )
    )
    if path == CHUNKED and _symbolic_on_jax(n):
        raise ValueError(
            "The chunked attention path cannot be traced with symbolic sizes "
            "(jax.export's shape polymorphism, as in Keras's exports from JAX): its "
            "loop needs a concrete number of chunks. Export within "
            "`mhsa_core.layers.attention.choice.fallback('chunked')` (the full path), "
            "or with a static input signature. "
            f"Received: attention_implementation={implementation!r}, N={n}"
        )
    return path


def _symbolic_on_jax(n: object) -> bool:
    # jax.export's symbolic dimension: neither an int nor a tensor (a tensor N
    # is compared at run time, by `ops.cond`).
    return (
        keras.backend.backend() == "jax"
        and not isinstance(n, int)
        and not keras.ops.is_tensor(n)
    )


def _rule(
    implementation: str,
    *,
    n: int | Tensor,
    key_count: int | Tensor | None = None,
    dtype: str,
    query_dim: int | None,
    value_dim: int | None,
    position: PositionEncoding,
    scores: bool,
    dropout: bool,
    bias: bool = False,
) -> str:
    if scores or dropout or implementation == FULL:
        return FULL
    fused_ok = (
        dtype != "float64" and fused_misfit(position, query_dim, value_dim) is None
    )
    if implementation == FUSED:
        return FUSED if fused_ok else CHUNKED
    if implementation == CHUNKED:
        return CHUNKED
    if not isinstance(n, int) or not isinstance(key_count, (int, type(None))):
        symbolic = _symbolic_on_jax(n) or (
            key_count is not None and _symbolic_on_jax(key_count)
        )
        return FULL if symbolic else BY_SIZE
    if full_fits(n, key_count):
        return FULL
    if (
        fused_ok
        and not bias
        and dtype == "float32"
        and keras.backend.backend() in FUSED_FAST_BACKENDS
    ):
        return FUSED
    return CHUNKED


# ------------------------------------------------------------ fallback
FALLBACK_PATHS = (CHUNKED, FUSED, BY_SIZE)


@dataclasses.dataclass
class Fallback:
    """An active `fallback` scope.

    Attributes:
        paths: the paths that calls leave for the full path.
        taken: the paths that calls within the scope did leave (empty: every
            call took the path it would have taken anyway).
    """

    paths: frozenset[str]
    taken: set[str] = dataclasses.field(default_factory=set)


# Active scopes, innermost last. Process-wide, not per thread: an exporter
# may trace on a thread of its own.
_SCOPES: list[Fallback] = []


@contextlib.contextmanager
def fallback(*paths: str) -> Iterator[Fallback]:
    """Within the block, every call of the layer that would take one of
    `paths` takes the full path instead: for an exporter that cannot take a
    path (e.g. the chunked path's loop), while it traces the model.

    Args:
        *paths: any of "chunked", "fused" and `BY_SIZE` (the run-time choice
            between full and chunked of a TensorFlow graph with dynamic H and
            W, whose graph holds the chunked loop too). "chunked" alone
            leaves BY_SIZE as it is.

    Yields:
        A `Fallback` record; its `taken` lists the paths calls left.

    Example:

    ```python
    from mhsa_core.layers.attention import choice

    with choice.fallback("chunked", choice.BY_SIZE) as record:
        model.export("model.tflite", format="litert")
    if record.taken:
        print("exported on the full path instead of", sorted(record.taken))
    ```
    """
    unknown = [p for p in paths if p not in FALLBACK_PATHS]
    if unknown or not paths:
        raise ValueError(
            f"Received an invalid value for argument `paths`, expected one or more of "
            f"{FALLBACK_PATHS}. Received: paths={paths!r}"
        )
    scope = Fallback(frozenset(paths))
    _SCOPES.append(scope)
    try:
        yield scope
    finally:
        _SCOPES.remove(scope)


def _fall_back(path: str) -> str:
    if not _SCOPES or path == FULL:
        return path
    left = [scope for scope in _SCOPES if path in scope.paths]
    if not left:
        return path
    for scope in left:
        scope.taken.add(path)
    return FULL


def default_chunk_size(n: int | Tensor) -> int | Tensor:
    """Queries per chunk for N tokens: a (c, N) tile of about TILE_ELEMENTS,
    c in [MIN_CHUNK, MAX_CHUNK] (N may be a scalar tensor)."""
    if isinstance(n, int):
        return max(MIN_CHUNK, min(MAX_CHUNK, TILE_ELEMENTS // max(n, 1)))
    from keras import ops

    return ops.clip(TILE_ELEMENTS // ops.maximum(n, 1), MIN_CHUNK, MAX_CHUNK)
