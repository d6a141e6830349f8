"""What a bench row measures, built in the worker: the layer at one attention
path, the backend's native fused reference, timm's module of the same block
(torch, `timm_peer`), or Keras's MultiHeadAttention.

A `Subject` is in the backend's idiom (`engines`): `call(x) -> out` and the
list of its variables on TensorFlow and torch, a pure `apply(params, x)` and
its params on JAX (Keras objects through `stateless_call`).
"""

from __future__ import annotations

import dataclasses
import inspect

from mhsa_core import natives
from mhsa_core.bench import timm_peer
from mhsa_core.bench.configs import BenchConfig
from mhsa_core.bench.plan import FULL, KERAS_MHA, LAYER_PATHS, NATIVE, TIMM

# The layer argument that selects the path (issue 10).
PATH_ARGUMENT = "attention_implementation"


class Unsupported(Exception):
    """The measured thing cannot be built here (e.g. a layer without the path)."""


class Skipped(Exception):
    """What the measured thing needs is not installed (e.g. timm)."""


@dataclasses.dataclass
class Subject:
    call: object  # TF/torch: call(x) -> out; JAX: apply(params, x) -> out
    params: object  # TF/torch: list of variables; JAX: a pytree of arrays
    # The same block as the reference (its output can be checked against it).
    same_block: bool = True
    chosen_path: str | None = None  # the path the layer runs, when it says
    chunk_size: int | None = None  # queries per chunk, when that path is chunked
    note: str = ""


def _keras_subject(backend, obj, call_args, x):
    """A Keras layer as a subject: `obj(*call_args(x))`, built on `x` first."""
    obj(*call_args(x))  # builds the weights
    if backend == "jax":
        params = [v.value for v in obj.trainable_variables]
        fixed = [v.value for v in obj.non_trainable_variables]

        def apply(params, x):
            return obj.stateless_call(params, fixed, *call_args(x))[0]

        return apply, params
    return (lambda x: obj(*call_args(x))), [v.value for v in obj.trainable_variables]


def _layer_choice(layer, config: BenchConfig):
    """(path, chunk size) the layer runs at `config` in float32 without scores
    or dropout, by its own rule (`mhsa_core.layers.attention.choice`); None
    for what the layer does not say (a layer that predates the rule)."""
    try:
        from mhsa_core.layers.attention import choice
    except ImportError:
        return None, None
    # With windows the attention runs per window: its N is the window's.
    n = config.keys
    path = choice.resolve(
        layer.attention_implementation,
        n=n,
        dtype="float32",
        query_dim=layer.head_key_dim,
        value_dim=config.head_dim,
        position=layer.position,
        scores=False,
        dropout=False,
        bias=getattr(layer.position, "bias_term", False) or bool(config.shift_size),
    )
    chunk = None
    if path == choice.CHUNKED:
        # min: the chunked path never makes a chunk longer than N
        chunk = min(layer.chunk_size or choice.default_chunk_size(n), n)
    return path, chunk


def layer_subject(backend, config: BenchConfig, path, weights, x):
    """The layer `MultiHeadSelfAttention2D(..., attention_implementation=path)`.

    A layer that predates the argument runs "full" (its only path, today's
    arithmetic) and raises `Unsupported` for the others.
    """
    from mhsa_core.layers.mhsa2d import MultiHeadSelfAttention2D

    kwargs = dict(config.layer_config)
    note = ""
    accepts = (
        PATH_ARGUMENT in inspect.signature(MultiHeadSelfAttention2D.__init__).parameters
    )
    if accepts:
        kwargs[PATH_ARGUMENT] = path
    elif path == FULL:
        note = f"the layer has no `{PATH_ARGUMENT}`: its one path, today's (full)"
    else:
        raise Unsupported(f"the layer has no `{PATH_ARGUMENT}` argument")
    try:
        layer = MultiHeadSelfAttention2D(**kwargs)
    except ValueError as e:
        if PATH_ARGUMENT in str(e):
            raise Unsupported(str(e).splitlines()[0]) from None
        raise
    layer.build(config.input_shape)
    layer.set_weight_dict(weights)
    call, params = _keras_subject(backend, layer, lambda x: (x,), x)
    chosen, chunk = _layer_choice(layer, config) if accepts else (FULL, None)
    return Subject(call, params, chosen_path=chosen, chunk_size=chunk, note=note)


def keras_mha_subject(backend, config: BenchConfig, x):
    """`keras.layers.MultiHeadAttention(num_heads, key_dim=C // heads,
    attention_axes=(1, 2))` as self-attention, mha(x, x), its own (Glorot,
    unseeded) weights: its time does not depend on their values. It has an output
    projection the block has not, so it is not the same block."""
    import keras

    mha = keras.layers.MultiHeadAttention(
        config.num_heads, key_dim=config.head_dim, attention_axes=(1, 2)
    )
    call, params = _keras_subject(backend, mha, lambda x: (x, x), x)
    note = ""
    if config.position_encoding != "none":
        note = f"no position term (the block's is {config.position_encoding!r})"
    return Subject(call, params, same_block=False, note=note)


def timm_subject(backend, config: BenchConfig, weights) -> Subject:
    """timm's module of `config`'s block (`timm_peer`), torch only, with the
    row's weights: the same block, checked like the native."""
    if backend != "torch":
        raise Unsupported(f"timm is torch; received: backend={backend!r}")
    if timm_peer.peer_of(config) is None:
        raise Unsupported(f"timm has no peer of the config {config.name!r}")
    reason = timm_peer.unavailable_reason()
    if reason:
        raise Skipped(reason)
    call, params, note = timm_peer.build(config, weights)
    return Subject(call, params, note=note)


def build(backend, config: BenchConfig, path, weights, x) -> Subject:
    """The subject of `path` ("full" ... "auto", "native", "timm", "keras_mha")
    on `backend`.

    `x`: the input as the backend's tensor (Keras objects are built on it).
    """
    if path in LAYER_PATHS:
        return layer_subject(backend, config, path, weights, x)
    if path == NATIVE:
        call, params = natives.BUILDERS[backend](config, weights)
        return Subject(call, params)
    if path == TIMM:
        return timm_subject(backend, config, weights)
    if path == KERAS_MHA:
        return keras_mha_subject(backend, config, x)
    raise ValueError(f"Unknown path. Received: path={path!r}")
