"""timm's attention modules as built `MultiHeadSelfAttention2D` layers.

`layer_from_timm(module, ...)` reads a timm attention module's settings and
parameters and returns a built layer whose output on a (B, H, W, C) map is
the module's output on the same tokens in row-major order, (B, H * W, C):

- `BottleneckAttn` (BoTNet, stride 1): "relative", `position_size` =
  `feat_size`, `scale_position_logits` = `scale_pos_embed`, key_dim =
  `dim_head_qk` (`convert.from_timm` for the kernels and tables);
- `Attention` (ViT): the biases, `qk_norm` (LayerNorm or RmsNorm, their
  eps), `scale_norm` -> `output_norm`, `proj` -> `output_dense`;
- `EvaAttention` and `AttentionRope` with the model's rope module (and
  their `num_prefix_tokens`, class and register tokens the rope skips: the
  layer's `prefix_tokens`, the returned layer's `num_prefix_tokens`):
  `RotaryEmbeddingCat` -> "rope" (temperature, `ref_feat_shape` ->
  `position_size`, grid offset and indexing, `in_pixels`, `max_res`, the
  rotation layout), `RotaryEmbeddingMixed` -> "rope_mixed" (one block's
  `freqs`); EVA's q and v biases without a k bias (`use_key_bias=False`);
  the norms and `proj` as `Attention`; grouped k/v heads repeated per head;
- pvt_v2's `Attention` (recognised by its `q` and `kv`): `sr_ratio` R > 1
  -> `kv_reduction=R` (`sr`'s (C, C, R, R) kernel as (R, R, C, C), `norm`),
  `linear_attn` -> `kv_reduction="pool"` (`pool`'s output size ->
  `kv_pool_size`, the 1x1 `sr`, `norm`, GELU), `kv` split into k and v,
  `proj`; `norm`'s eps -> `norm_epsilon` (torch's 1e-5);
- Swin's `WindowAttention` (v1): "relative_bias" (the flat
  `relative_position_bias_table` reshaped to (2Wh - 1, 2Ww - 1, heads)), the
  module's window and the block's shift, `scale_position_logits=False`,
  `proj`.

docs/usage.md ("Converting timm modules") has the table of settings.

Nothing of timm is imported: the module is recognised by its class name and
the attributes timm gives it, and its tensors are read with their own
methods (`.detach().cpu().numpy()`): no framework is imported here.
A module of another kind, or a setting the layer cannot compute (Swin v2's
cosine attention, a gate, an output width other than C, ...), is a
ValueError naming it.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import numpy as np

from mhsa_core.convert.botnet import from_timm as botnet_from_timm
from mhsa_core.layers.mhsa2d import MultiHeadSelfAttention2D
from mhsa_core.reference import schema
from mhsa_core.reference.arguments import invalid, pair

__all__ = ["layer_from_timm", "SUPPORTED_MODULES", "SUPPORTED_ROPES"]

# A torch.nn.Module or torch.Tensor (read through its own methods).
Module = Any

_LAYER_NORMS = ("LayerNorm", "LayerNormFp32")  # torch's nn.LayerNorm and timm's
_RMS_NORMS = ("RmsNorm", "RmsNormFp32", "RMSNorm")  # timm's, and torch's nn.RMSNorm


@dataclasses.dataclass
class _Request:
    """What the caller said beside the module."""

    rope: Any
    shift_size: Any
    block_index: int | None


@dataclasses.dataclass
class _Converted:
    """The layer's arguments, its canonical weight dict and its channels."""

    config: dict[str, Any]
    weights: dict[str, np.ndarray]
    channels: int
    # The prefix tokens the module expects before the map's tokens: its
    # `num_prefix_tokens` (EVA, AttentionRope), None where it does not say
    # (ViT's `Attention`: any), 0 for a map-only module.
    num_prefix_tokens: int | None = 0


# ------------------------------------------------------------------ tensors
def _array(tensor: Any) -> np.ndarray:
    """A parameter or buffer as NumPy (float32 / float64 kept; 16-bit floats
    widened to float32, which NumPy cannot hold as bfloat16)."""
    # The tensor's own methods: this module imports no framework.
    value = tensor.detach().cpu()
    if str(value.dtype) not in ("torch.float32", "torch.float64"):
        value = value.float()
    return np.asarray(value.numpy())


def _class(obj: Any) -> str:
    return type(obj).__name__


def _linear(layer: Module) -> tuple[np.ndarray, np.ndarray | None]:
    """(weight (out, in), bias (out,) or None) of an nn.Linear."""
    bias = getattr(layer, "bias", None)
    return _array(layer.weight), None if bias is None else _array(bias)


def _scale(value: float, key_dim: int) -> float | None:
    """The layer's `scale`: None when it is the default 1 / sqrt(key_dim)."""
    value = float(value)
    return None if math.isclose(value, key_dim**-0.5, rel_tol=1e-12) else value


# -------------------------------------------------------------------- norms
@dataclasses.dataclass(frozen=True)
class _Norm:
    kind: str  # "layer" or "rms"
    epsilon: float
    scale: np.ndarray
    bias: np.ndarray | None  # "layer" only


def _norm(norm: Module, size: int, where: str) -> _Norm | None:
    """A norm sublayer (`module.q_norm`, ...) as the layer's, None for
    nn.Identity (timm's "no norm")."""
    name = _class(norm)
    if name == "Identity":
        return None
    if name not in _LAYER_NORMS + _RMS_NORMS:
        raise ValueError(
            f"`module.{where}` is a {name}: the layer's norms are LayerNorm and "
            "RMSNorm (timm's LayerNorm / RmsNorm, torch's nn.LayerNorm / "
            f"nn.RMSNorm). Received: module.{where}={name}"
        )
    shape = tuple(int(n) for n in norm.normalized_shape)
    if shape != (size,):
        raise ValueError(
            f"`module.{where}` must normalise {size} channels. "
            f"Received: module.{where}.normalized_shape={shape}"
        )
    weight = getattr(norm, "weight", None)
    scale = np.ones(size) if weight is None else _array(weight)
    epsilon = norm.eps
    if epsilon is None:  # torch's nn.RMSNorm: the input's machine epsilon
        epsilon = float(np.finfo(scale.dtype).eps)
    if name in _RMS_NORMS:
        return _Norm("rms", float(epsilon), scale, None)
    bias = getattr(norm, "bias", None)
    return _Norm(
        "layer",
        float(epsilon),
        scale,
        np.zeros(size) if bias is None else _array(bias),
    )


def _norm_options(
    module: Module, head_dim: int, channels: int
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """`qk_norm`, `output_norm`, `norm_epsilon` and their weights."""
    query = _norm(getattr(module, "q_norm", None), head_dim, "q_norm")
    key = _norm(getattr(module, "k_norm", None), head_dim, "k_norm")
    output = _norm(getattr(module, "norm", None), channels, "norm")
    if (query is None) != (key is None) or (
        query is not None and key is not None and query.kind != key.kind
    ):
        raise ValueError(
            "`module.q_norm` and `module.k_norm` must be norms of one kind (the "
            "layer's qk_norm). Received: "
            f"q_norm={_class(module.q_norm)}, k_norm={_class(module.k_norm)}"
        )
    if output is not None and output.kind != "layer":
        raise ValueError(
            "`module.norm` (scale_norm) must be a LayerNorm: the layer's "
            f"output_norm is 'layer' only. Received: module.norm={_class(module.norm)}"
        )
    norms = {"q_norm": query, "k_norm": key, "norm": output}
    epsilons = {n.epsilon for n in norms.values() if n is not None}
    if len(epsilons) > 1:
        raise ValueError(
            "The module's norms must share one eps (the layer's norm_epsilon). "
            "Received: "
            + ", ".join(f"{k}.eps={n.epsilon}" for k, n in norms.items() if n)
        )
    config: dict[str, Any] = {
        "qk_norm": None if query is None else query.kind,
        "output_norm": None if output is None else "layer",
    }
    if epsilons:
        config["norm_epsilon"] = epsilons.pop()
    weights: dict[str, np.ndarray] = {}
    for ours, norm in (("query", query), ("key", key), ("output", output)):
        if norm is not None:
            weights[f"{ours}_norm_scale"] = norm.scale
            if norm.bias is not None:
                weights[f"{ours}_norm_bias"] = norm.bias
    return config, weights


# -------------------------------------------------------------- projections
@dataclasses.dataclass
class _Projections:
    """q, k, v as (C, heads * d) kernels (in, out) and their biases."""

    kernels: dict[str, np.ndarray]
    biases: dict[str, np.ndarray | None]
    channels: int


def _split_rows(
    weight: np.ndarray, bias: np.ndarray | None, sizes: tuple[int, ...]
) -> tuple[list[np.ndarray], list[np.ndarray | None]]:
    cuts = np.cumsum(sizes)[:-1]
    kernels = [w.T for w in np.split(weight, cuts, axis=0)]
    if bias is None:
        return kernels, [None] * len(sizes)
    return kernels, list(np.split(bias, cuts))


def _repeat_heads(
    kernel: np.ndarray, bias: np.ndarray | None, groups: int, head_dim: int
) -> tuple[np.ndarray, np.ndarray | None]:
    """Grouped-query k or v (C, kv_heads * d) -> (C, heads * d): head h uses
    kv head h // groups (timm's repeat_interleave)."""
    channels = kernel.shape[0]
    kernel = np.repeat(kernel.reshape(channels, -1, head_dim), groups, axis=1)
    if bias is not None:
        bias = np.repeat(bias.reshape(-1, head_dim), groups, axis=0).reshape(-1)
    return kernel.reshape(channels, -1), bias


def _projections(module: Module, head_dim: int) -> _Projections:
    """timm's fused `qkv` (rows q, k, v, each head-major) or separate
    `q_proj` / `k_proj` / `v_proj`; EVA's `q_bias` / `v_bias`."""
    heads = int(module.num_heads)
    fused = getattr(module, "qkv", None)
    if fused is not None:
        weight, bias = _linear(fused)
        if getattr(module, "q_bias", None) is not None:  # EVA: q, (no k), v
            zero = np.zeros_like(_array(module.q_bias))
            bias = np.concatenate([_array(module.q_bias), zero, _array(module.v_bias)])
        size = weight.shape[0] // 3
        kernels, biases = _split_rows(weight, bias, (size, size, size))
    else:
        parts = [_linear(getattr(module, f"{p}_proj")) for p in "qkv"]
        kernels = [w.T for w, _ in parts]
        biases = [b for _, b in parts]
        groups = heads * head_dim // kernels[1].shape[1]
        if groups > 1:  # AttentionRope's grouped-query k and v
            for i in (1, 2):
                kernels[i], biases[i] = _repeat_heads(
                    kernels[i], biases[i], groups, head_dim
                )
    return _Projections(
        dict(zip(schema.PROJECTIONS, kernels)),
        dict(zip(schema.PROJECTIONS, biases)),
        int(kernels[0].shape[0]),
    )


def _check_widths(module: Module, projections: _Projections, head_dim: int) -> None:
    """The layer's values and output have C channels: heads * d == C."""
    channels = projections.channels
    attn_dim = int(module.num_heads) * head_dim
    out = int(module.proj.weight.shape[0]) if hasattr(module, "proj") else channels
    if attn_dim != channels or out != channels:
        raise ValueError(
            f"The layer's values and output have the input's {channels} channels; "
            f"{_class(module)} has heads * head_dim = {attn_dim} and an output of "
            f"{out}. Received: num_heads={module.num_heads}, head_dim={head_dim}, "
            f"dim_out={out}"
        )


def _refuse_gate(module: Module) -> None:
    if getattr(module, "gate", None) is not None:
        raise ValueError(
            f"{_class(module)}(gated=True) multiplies its output by a sigmoid gate "
            "of the input, which the layer does not have. Received: module.gate="
            f"{_class(module.gate)}"
        )


def _dense_weights(
    projections: _Projections,
    output: tuple[np.ndarray, np.ndarray | None] | None,
    key_bias: bool,
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """`use_bias` / `use_key_bias` and the q, k, v (and output) weights.

    The layer has one `use_bias`: when the module has some biases and not
    others (timm's `Attention(qkv_bias=False)` keeps `proj`'s bias), the
    missing ones are zeros, which computes the same."""
    biases = dict(projections.biases)
    if not key_bias:
        biases.pop("key")
    if output is not None:
        biases["output"] = output[1]
    use_bias = any(b is not None for b in biases.values())
    config: dict[str, Any] = {"use_bias": use_bias}
    if not key_bias:
        config["use_key_bias"] = False
    weights = {f"{p}_kernel": k for p, k in projections.kernels.items()}
    if output is not None:
        config["output_dense"] = True
        weights["output_kernel"] = output[0].T
    if use_bias:
        for name, bias in biases.items():
            width = weights[f"{name}_kernel"].shape[1]
            weights[f"{name}_bias"] = np.zeros(width) if bias is None else bias
    return config, weights


# --------------------------------------------------------------------- rope
def _half_pairs(head_dim: int) -> np.ndarray:
    """The channel order that turns timm's rotate_half rope into the
    interleaved one: new channel 2m is old m, 2m + 1 is old m + d/2."""
    return np.arange(head_dim).reshape(2, head_dim // 2).T.reshape(-1)


def _permute_qk(
    weights: dict[str, np.ndarray], heads: int, head_dim: int
) -> dict[str, np.ndarray]:
    """q and k channels of every head in `_half_pairs` order (and their norms'
    weights, shared by the heads). q . k is unchanged: the same order on both."""
    order = _half_pairs(head_dim)
    columns = (np.arange(heads)[:, None] * head_dim + order).reshape(-1)
    out = dict(weights)
    for name in ("query_kernel", "key_kernel"):
        out[name] = weights[name][:, columns]
    for name in ("query_bias", "key_bias"):
        if name in weights:
            out[name] = weights[name][columns]
    for prefix in ("query", "key"):
        for name in schema.norm_weight_names(prefix, "layer"):
            if name in weights:
                out[name] = weights[name][order]
    return out


def _rope_cat(
    rope: Module, attention_half: bool, head_dim: int
) -> tuple[dict[str, Any], bool]:
    """EVA's `RotaryEmbeddingCat` as "rope" settings, and whether q and k
    channels need `_permute_qk`."""
    if int(rope.dim) != head_dim:
        raise invalid(
            "rope",
            f"RotaryEmbeddingCat(dim={rope.dim})",
            f"dim = head_dim ({head_dim})",
        )
    in_pixels = bool(rope.in_pixels)
    grid_type = getattr(rope, "grid_type", None) or ("pixel" if in_pixels else "index")
    if grid_type != ("pixel" if in_pixels else "index"):
        raise invalid(
            "rope",
            f"RotaryEmbeddingCat(grid_type={grid_type!r}, in_pixels={in_pixels})",
            "the integer grid (in_pixels=False) or the pixel one (in_pixels=True)",
        )
    if getattr(rope, "linear_bands", False):
        raise invalid(
            "rope",
            "RotaryEmbeddingCat(linear_bands=True)",
            "log-spaced pixel bands (the layer's rope_in_pixels)",
        )
    config: dict[str, Any] = {
        "position_encoding": "rope",
        "rope_grid_indexing": str(rope.grid_indexing),
    }
    if in_pixels:
        config["rope_in_pixels"] = True
        config["rope_max_resolution"] = float(rope.max_res)
    else:
        config["rope_temperature"] = float(rope.temperature)
        config["rope_grid_offset"] = float(rope.grid_offset)
    if rope.ref_feat_shape is not None:
        config["position_size"] = pair(tuple(rope.ref_feat_shape))
    # The attention applies rot (pairs 2m, 2m + 1) or rope_rotate_half (pairs
    # i, i + d/2) to tables laid out for one of them (timm 1.0.31's
    # RotaryEmbeddingCat(rotate_half=...); older releases: interleaved only).
    table_half = bool(getattr(rope, "rotate_half", False))
    if table_half and not attention_half:
        raise invalid(
            "rope",
            "RotaryEmbeddingCat(rotate_half=True) with an attention of "
            "rotate_half=False",
            "the rope's and the attention's rotate_half alike (as timm's Eva builds "
            "them), or interleaved tables",
        )
    if table_half:  # a true rotate-half rope: interleaved, channels paired anew
        return {**config, "rope_layout": "interleaved"}, True
    return {**config, "rope_layout": "half" if attention_half else "interleaved"}, False


def _rope_mixed(
    rope: Module, attention_half: bool, heads: int, head_dim: int, index: int | None
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """`RotaryEmbeddingMixed` (all blocks' freqs) as one block's "rope_mixed"."""
    freqs = _array(rope.freqs)  # (2, depth, heads, d / 2)
    if freqs.shape[2:] != (heads, head_dim // 2):
        raise invalid(
            "rope",
            f"RotaryEmbeddingMixed with freqs of shape {freqs.shape}",
            f"freqs (2, depth, {heads}, {head_dim // 2}) for {heads} heads of "
            f"{head_dim}",
        )
    depth = freqs.shape[1]
    if index is None and depth > 1:
        raise ValueError(
            f"`block_index` is needed: the RotaryEmbeddingMixed has frequencies for "
            f"{depth} blocks; pass the index of the block this attention belongs "
            "to. Received: block_index=None"
        )
    if index is None:
        index = 0
    if not isinstance(index, (int, np.integer)) or not 0 <= index < depth:
        raise invalid("block_index", index, f"an int in [0, {depth})")
    # get_mixed_freqs lays its tables out interleaved, whatever the attention.
    config = {
        "position_encoding": "rope_mixed",
        "rope_temperature": float(rope.temperature),
        "rope_grid_indexing": str(rope.grid_indexing),
        "rope_layout": "half" if attention_half else "interleaved",
    }
    return config, {"rope_frequencies": freqs[:, int(index)]}


SUPPORTED_ROPES = ("RotaryEmbeddingCat", "RotaryEmbeddingMixed")


def _rope(
    module: Module, request: _Request, heads: int, head_dim: int
) -> tuple[dict[str, Any], dict[str, np.ndarray], bool]:
    """The rotary settings, weights and whether to `_permute_qk`."""
    rope, name = request.rope, _class(request.rope)
    if rope is None:
        raise ValueError(
            f"`rope` is needed for {_class(module)}: pass the rope module the model "
            "gives its blocks (timm's Eva: `model.rope`), or rope=False for a model "
            "without rotary embedding. Received: rope=None"
        )
    if rope is False:
        if request.block_index is not None:
            raise invalid("block_index", request.block_index, "None without a rope")
        return {}, {}, False
    if name == "Tensor":
        raise invalid(
            "rope",
            f"a Tensor of shape {tuple(rope.shape)}",
            "the rope module (`model.rope`), not the embedding it computes",
        )
    attention_half = bool(getattr(module, "rotate_half", False))
    if name == "RotaryEmbeddingCat":
        if request.block_index is not None:
            raise invalid(
                "block_index",
                request.block_index,
                "None: a RotaryEmbeddingCat is the same in every block",
            )
        config, permute = _rope_cat(rope, attention_half, head_dim)
        return config, {}, permute
    if name == "RotaryEmbeddingMixed":
        config, weights = _rope_mixed(
            rope, attention_half, heads, head_dim, request.block_index
        )
        return config, weights, False
    raise invalid(
        "rope", f"<{name}>", f"one of timm's {', '.join(SUPPORTED_ROPES)}, or False"
    )


# ------------------------------------------------------------------ readers
def _token_attention(module: Module, request: _Request) -> _Converted:
    """timm's `Attention`, `EvaAttention` and `AttentionRope`. EVA's and
    AttentionRope's `num_prefix_tokens` (class and register tokens, which
    their rope skips) are the layer's `prefix_tokens`, which its rotary
    encodings skip too; ViT's `Attention` treats every token alike, so
    prefix tokens are the layer's `prefix_tokens` without a position term."""
    _refuse_gate(module)
    heads, head_dim = int(module.num_heads), int(module.head_dim)
    projections = _projections(module, head_dim)
    _check_widths(module, projections, head_dim)
    channels = projections.channels
    config: dict[str, Any] = {
        "num_heads": heads,
        "scale": _scale(module.scale, head_dim),
    }
    dense_config, weights = _dense_weights(
        projections,
        _linear(module.proj),
        key_bias=_class(module) != "EvaAttention",
    )
    norm_config, norm_weights = _norm_options(module, head_dim, channels)
    config.update(dense_config)
    config.update(norm_config)
    weights.update(norm_weights)
    if _class(module) != "Attention":
        rope_config, rope_weights, permute = _rope(module, request, heads, head_dim)
        config.update(rope_config)
        weights.update(rope_weights)
        if permute:
            weights = _permute_qk(weights, heads, head_dim)
    prefix = getattr(module, "num_prefix_tokens", None)
    return _Converted(
        config, weights, channels, None if prefix is None else int(prefix)
    )


def _bottleneck_attn(module: Module, request: _Request) -> _Converted:
    """timm's BoTNet attention (`convert.from_timm` for the kernels and tables)."""
    if _class(module.pool) != "Identity":
        raise ValueError(
            "BottleneckAttn(stride=2) average-pools its output, which the layer "
            "does not: convert a stride-1 module and pool after the layer. "
            f"Received: module.pool={_class(module.pool)}"
        )
    weight = _array(module.qkv.weight)  # (2 * h * dqk + dim_out, C, 1, 1)
    channels = int(weight.shape[1])
    if int(module.dim_out_v) != channels:
        raise ValueError(
            f"The layer's output has the input's {channels} channels. Received: "
            f"BottleneckAttn with dim={channels}, dim_out={module.dim_out_v}"
        )
    heads, key_dim = int(module.num_heads), int(module.dim_head_qk)
    pos = module.pos_embed
    arrays = botnet_from_timm(
        weight, _array(pos.height_rel), _array(pos.width_rel), heads
    )
    height, width = schema.table_names("relative")
    weights = {
        "query_kernel": arrays["q_kernel"],
        "key_kernel": arrays["k_kernel"],
        "value_kernel": arrays["v_kernel"],
        height: arrays["rel_height"],
        width: arrays["rel_width"],
    }
    bias = getattr(module.qkv, "bias", None)
    if bias is not None:
        qk = heads * key_dim
        for name, part in zip(schema.PROJECTIONS, np.split(_array(bias), [qk, 2 * qk])):
            weights[f"{name}_bias"] = part
    config = {
        "num_heads": heads,
        "key_dim": None if key_dim * heads == channels else key_dim,
        "position_encoding": "relative",
        "position_size": (int(pos.height), int(pos.width)),
        "scale_position_logits": bool(module.scale_pos_embed),
        "scale": _scale(module.scale, key_dim),
        "use_bias": bias is not None,
    }
    return _Converted(config, weights, channels)


def _swin_index(window: tuple[int, int]) -> np.ndarray:
    """Swin's relative_position_index of a window: row of the flat table of
    the (query minus key) offset, row-major over (2Wh - 1, 2Ww - 1)."""
    rows, cols = np.meshgrid(*(np.arange(n) for n in window), indexing="ij")
    dy = rows.reshape(-1, 1) - rows.reshape(1, -1) + window[0] - 1
    dx = cols.reshape(-1, 1) - cols.reshape(1, -1) + window[1] - 1
    return dy * (2 * window[1] - 1) + dx


def _window_attention(module: Module, request: _Request) -> _Converted:
    """Swin's `WindowAttention` (v1), with the block's shift."""
    if hasattr(module, "logit_scale") or hasattr(module, "cpb_mlp"):
        raise ValueError(
            "Swin v2's WindowAttention is not supported: its cosine attention "
            "(cos(q, k) times a learned per-head logit_scale) and its continuous "
            "position bias (an MLP of log-spaced offsets, cpb_mlp) are not the "
            "layer's scaled dot product and bias table. Received: module="
            "WindowAttention with logit_scale and cpb_mlp (swin_transformer_v2)"
        )
    window = pair(module.window_size)
    try:
        shift = pair(request.shift_size)
    except (TypeError, ValueError, IndexError):
        raise invalid(
            "shift_size", request.shift_size, "an int or a pair of ints"
        ) from None
    if any(not 0 <= s < w for s, w in zip(shift, window)):
        raise invalid(
            "shift_size",
            request.shift_size,
            f"values in [0, window) along each axis, the module's window_size={window}",
        )
    index = getattr(module, "relative_position_index", None)
    if index is not None and not np.array_equal(_array(index), _swin_index(window)):
        raise ValueError(
            "The module's relative_position_index is not Swin's (query minus key "
            "offsets, row-major) for its window, so its table cannot be read as "
            f"ours. Received: window_size={window}"
        )
    heads = int(module.num_heads)
    projections = _projections(module, int(module.qkv.weight.shape[0]) // 3 // heads)
    head_dim = projections.kernels["query"].shape[1] // heads
    _check_widths(module, projections, head_dim)
    table = _array(module.relative_position_bias_table)  # ((2Wh-1)(2Ww-1), heads)
    config: dict[str, Any] = {
        "num_heads": heads,
        "scale": _scale(module.scale, head_dim),
        "position_encoding": "relative_bias",
        "position_size": window,
        "scale_position_logits": False,
        "window_size": window,
        "shift_size": shift,
    }
    dense_config, weights = _dense_weights(
        projections, _linear(module.proj), key_bias=True
    )
    config.update(dense_config)
    (name,) = schema.table_names("relative_bias")
    weights[name] = table.reshape(2 * window[0] - 1, 2 * window[1] - 1, heads)
    return _Converted(config, weights, projections.channels)


def _pvt_v2_attention(module: Module, request: _Request) -> _Converted:
    """timm pvt_v2's `Attention`: q from the tokens, k and v from the map
    reduced by `sr` (+ `norm`), or pooled (+ `sr`, `norm`, GELU)."""
    heads, head_dim = int(module.num_heads), int(module.head_dim)
    q_weight, q_bias = _linear(module.q)
    kv_weight, kv_bias = _linear(module.kv)
    channels = int(q_weight.shape[1])
    (k_kernel, v_kernel), (k_bias, v_bias) = _split_rows(
        kv_weight, kv_bias, (channels, channels)
    )
    projections = _Projections(
        {"query": q_weight.T, "key": k_kernel, "value": v_kernel},
        {"query": q_bias, "key": k_bias, "value": v_bias},
        channels,
    )
    _check_widths(module, projections, head_dim)
    config: dict[str, Any] = {
        "num_heads": heads,
        "scale": _scale(module.scale, head_dim),
    }
    dense_config, weights = _dense_weights(
        projections, _linear(module.proj), key_bias=True
    )
    config.update(dense_config)
    sr = getattr(module, "sr", None)
    if sr is None:  # sr_ratio 1: plain attention over the map
        return _Converted(config, weights, channels)
    kernel = _array(sr.weight)  # (C, C, R, R): [out, in, dy, dx]
    size = tuple(int(n) for n in sr.kernel_size)
    stride = tuple(int(n) for n in sr.stride)
    padding = tuple(int(n) for n in getattr(sr, "padding", (0, 0)))
    pool = getattr(module, "pool", None)
    if pool is not None:
        if size != (1, 1):
            raise ValueError(
                "pvt_v2's linear attention pools, then applies a 1x1 conv. "
                f"Received: module.sr.kernel_size={size}"
            )
        act = getattr(module, "act", None)
        approximate = getattr(act, "approximate", "none")
        if _class(act) != "GELU" or approximate != "none":
            raise ValueError(
                "The pooled reduction's activation is the exact GELU. Received: "
                f"module.act={_class(act)}(approximate={approximate!r})"
            )
        config["kv_reduction"] = "pool"
        config["kv_pool_size"] = pair(pool.output_size)
        weights["reduction_kernel"] = kernel[:, :, 0, 0].T
    else:
        if size[0] != size[1] or stride != size or any(padding):
            raise ValueError(
                "pvt_v2's spatial reduction is a square R x R conv of stride R "
                "without padding (the layer's kv_reduction=R). Received: "
                f"module.sr.kernel_size={size}, stride={stride}, padding={padding}"
            )
        config["kv_reduction"] = size[0]
        weights["reduction_kernel"] = kernel.transpose(2, 3, 1, 0)
    bias = getattr(sr, "bias", None)
    if config["use_bias"]:
        weights["reduction_bias"] = np.zeros(channels) if bias is None else _array(bias)
    elif bias is not None:
        raise ValueError(
            "The layer's use_bias covers the reduction conv too: a module with no "
            "projection biases must have none in `sr`. Received: module.sr.bias "
            f"of shape {tuple(bias.shape)}"
        )
    norm = _norm(module.norm, channels, "norm")
    if norm is None or norm.kind != "layer" or norm.bias is None:
        raise ValueError(
            "pvt_v2's reduction is followed by a LayerNorm. Received: "
            f"module.norm={_class(module.norm)}"
        )
    config["norm_epsilon"] = norm.epsilon
    weights["reduction_norm_scale"] = norm.scale
    weights["reduction_norm_bias"] = norm.bias
    return _Converted(config, weights, channels)


def _attention(module: Module, request: _Request) -> _Converted:
    """timm's class `Attention`: ViT's (`qkv`) or pvt_v2's (`q`, `kv`)."""
    if hasattr(module, "kv") and hasattr(module, "q"):
        return _pvt_v2_attention(module, request)
    return _token_attention(module, request)


# class name -> (reader, the arguments beside the module that it reads)
_READERS: dict[str, tuple[Callable[[Module, _Request], _Converted], set[str]]] = {
    "BottleneckAttn": (_bottleneck_attn, set()),
    "Attention": (_attention, set()),
    "EvaAttention": (_token_attention, {"rope"}),
    "AttentionRope": (_token_attention, {"rope"}),
    "WindowAttention": (_window_attention, {"shift_size"}),
}
SUPPORTED_MODULES = tuple(_READERS)


def layer_from_timm(
    module: Module,
    *,
    rope: Module = None,
    shift_size: int | tuple[int, int] = 0,
    block_index: int | None = None,
    data_format: str | None = None,
    dtype: Any = None,
    **kwargs: Any,
) -> MultiHeadSelfAttention2D:
    """A built `MultiHeadSelfAttention2D` that computes what a timm attention
    module computes.

    The layer's output on a (B, H, W, C) map (or (B, C, H, W) with
    `data_format="channels_first"`) is the module's output on the same
    tokens in row-major order, (B, H * W, C); `BottleneckAttn` itself takes
    (B, C, H, W). The module's settings become the layer's arguments (the
    table in `mhsa_core.convert.timm`), its parameters the layer's weights.
    Nothing of the module is changed; no framework and no timm is imported
    (tensors are read with their own `.detach().cpu().numpy()`).

    What differs from the module, by design:
    - Swin at a size not divisible by the window: timm pads the map and lets
      the padding (zero tokens, whose k and v are the qkv biases) be
      attended; the layer masks it. At divisible sizes they agree;
    - any input size: the layer resizes BoTNet's and Swin's tables (and
      scales EVA's rope grid by `ref_feat_shape`) where timm's modules are
      fixed to one size or rebuilt for another;
    - biases: the layer has one `use_bias`, so a bias the module lacks while
      it has others (`Attention(qkv_bias=False)` with `proj`'s bias) is a
      zero weight; EVA's k has none (`use_key_bias=False`);
    - timm's `rotate_half=True` with a `RotaryEmbeddingCat(rotate_half=True)`
      (timm 1.0.31's EVA with `rope_rotate_half=True`) is a true rotate-half
      rope: the layer computes it as the interleaved one with every head's q
      and k channels reordered (m, m + d/2) -> (2m, 2m + 1), which leaves
      q . k as it is; with interleaved tables it is the layer's
      `rope_layout="half"`;
    - dropout rates and timm's train-time rope coordinate augmentation are
      not carried: the layer is for inference as converted (its `dropout`
      can be passed in `kwargs`).

    Args:
        module: a timm attention module instance: `BottleneckAttn`
            (timm/layers/bottleneck_attn.py, stride 1, dim_out = dim),
            `Attention` or `AttentionRope` (timm/layers/attention.py),
            `EvaAttention` (timm/models/eva.py), Swin's `WindowAttention`
            (timm/models/swin_transformer.py; not Swin v2's), or pvt_v2's
            `Attention` (timm/models/pvt_v2.py: `sr_ratio`, `linear_attn`;
            its forward takes (tokens, feat_size), the layer the map).
        rope: for `EvaAttention` and `AttentionRope` (required): the rope
            module exactly as timm's model holds it, `model.rope`: a
            `RotaryEmbeddingCat` ("rope") or a `RotaryEmbeddingMixed`
            ("rope_mixed"); or False for a model without rotary embedding.
            None (the default) for every other module.
        shift_size: Swin's shift of this block, `block.shift_size` (an int or
            (sh, sw), each smaller than the module's window); 0 for the other
            modules.
        block_index: with a `RotaryEmbeddingMixed` of several blocks, the
            index of this attention's block (its `freqs[:, block_index]`).
        data_format: the layer's; default `keras.config.image_data_format()`.
        dtype: the layer's dtype (policy); default the global policy.
        **kwargs: other layer arguments that do not come from the module
            (`name`, `attention_implementation`, `chunk_size`, `dropout`, ...).

    Returns:
        The layer, built for C channels (any H and W), its weights set.
        Its attribute `num_prefix_tokens` (not a layer argument, not saved)
        says how many prefix tokens (class and register tokens) the module
        expects before the map's tokens: `EvaAttention`'s and
        `AttentionRope`'s `num_prefix_tokens` (T: call the layer with
        `prefix_tokens` of shape (B, T, C); the module's output on
        concat(prefix, map tokens) is `(outputs, prefix_outputs)`); None
        for ViT's `Attention`, which treats every token alike (the model's
        `num_prefix_tokens`, e.g. ViT's class token, go in `prefix_tokens`
        too); 0 for `BottleneckAttn` and `WindowAttention` (map only).

    Raises:
        ValueError: the module is not one of these (its class named), has a
            setting the layer cannot compute (the setting named), or an
            argument does not fit it (the argument and its value named).

    Example (the module is timm's, e.g. `timm.layers.Attention(64, 4,
    qkv_bias=True)`):

        layer = layer_from_timm(module)
        y = layer(x)  # x: (B, H, W, 64); module(x.reshape(B, H * W, 64))

    With prefix tokens (EVA with a class token and 4 registers: timm's
    `Eva(num_reg_tokens=4)`, a block's `attn`, `layer.num_prefix_tokens`
    is 5):

        layer = layer_from_timm(model.blocks[0].attn, rope=model.rope)
        y, y_prefix = layer(x, prefix_tokens=p)  # p: (B, 5, C)
        # module(concat([p, x as tokens]), rope=...) = concat([y_prefix, y])
    """
    name = _class(module)
    if name not in _READERS:
        raise ValueError(
            "layer_from_timm converts timm's "
            f"{', '.join(SUPPORTED_MODULES)} (Swin v1). Received: module={name}"
        )
    reader, reads = _READERS[name]
    if "rope" not in reads and (rope is not None or block_index is not None):
        given = "rope" if rope is not None else "block_index"
        value = f"<{_class(rope)}>" if given == "rope" else block_index
        raise invalid(given, value, f"None: {name} applies no rope")
    if "shift_size" not in reads and shift_size != 0:
        raise invalid("shift_size", shift_size, f"0: {name} has no shifted windows")
    converted = reader(module, _Request(rope, shift_size, block_index))
    clash = sorted(set(kwargs) & set(converted.config))
    if clash:
        raise ValueError(
            f"{', '.join(clash)} {'is' if len(clash) == 1 else 'are'} read from "
            f"the module. Received: " + ", ".join(f"{k}={kwargs[k]!r}" for k in clash)
        )
    layer = MultiHeadSelfAttention2D(
        **converted.config, data_format=data_format, dtype=dtype, **kwargs
    )
    shape: list[int | None] = [None, None, None, None]
    shape[-1 if layer.data_format == "channels_last" else 1] = converted.channels
    layer.build(tuple(shape))
    layer.set_weight_dict(converted.weights)
    # Not a layer argument (the layer takes any number of prefix tokens per
    # call): what the module expects, for the caller.
    layer.num_prefix_tokens = converted.num_prefix_tokens
    return layer
