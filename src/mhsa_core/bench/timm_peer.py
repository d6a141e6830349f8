"""timm as the bench's peer on torch: the "timm" rows.

A config has a timm peer when timm has a module that computes the same block
(`PEERS`, matched on the config's encoding and windows, so the tests' reduced
configs have the peers of the real ones):

- "swin" (per-head bias in shifted windows): `SwinTransformerBlock._attn`,
  timm's attention part of its Swin block as timm runs it: the cyclic shift,
  `window_partition`, `WindowAttention` with its relative position bias
  table and the block's shift mask, `window_reverse`, the roll back (not the
  block's norms and MLP);
- "eva" ("rope", no windows): `EvaAttention` with the embedding of a
  `RotaryEmbeddingCat` built as EVA builds it (`in_pixels=False`, the map as
  `feat_shape`), computed once and passed as `rope=` (EVA's cached embed);
- "bottleneck" ("relative", no windows): BoTNet's `BottleneckAttn`, which
  is channels_first: the input is permuted to (B, C, H, W) and the output
  back, inside the measured call;
- "pvt_v2" (`kv_reduction`, no position term): timm's pvt_v2 `Attention`
  with `sr_ratio` R (its stride-R conv and LayerNorm on the key/value map),
  on the map's tokens with `feat_size` (H, W).

A config without a peer gets no "timm" row (`plan`). Each peer gets the
row's weights (`worker.inputs`), mapped onto timm's parameters as the peer
tests map them (tests/layers/test_swin_timm.py, test_rope_timm.py,
tests/backends/test_timm.py): timm's fused `qkv.weight` (3C, C) is
[Wq^T; Wk^T; Wv^T] (our kernels are (in, out)), its bias [bq; bk; bv]. timm's
output projection `proj` is replaced by `nn.Identity()`: the bench's block
has none (timm would otherwise pay for a C x C matmul the block has not).
Each peer is the same block as the layer, so its forward output is checked
against the float64 reference like the native's.

timm is optional (backends/requirements-peers.txt); its files are loaded by
`mhsa_core._timm` (its package `__init__` imports torchvision). Imports no
framework at module level: the parent process reads `PEERS`; the builders
import torch in the worker.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import numpy as np

from mhsa_core import _timm
from mhsa_core.bench.configs import BenchConfig

# What the bench's "timm" rows need, when they cannot run.
NOT_INSTALLED = "timm is not installed (backends/requirements-peers.txt)"


@dataclasses.dataclass(frozen=True)
class Peer:
    """A timm module that computes the block of the configs it `matches`."""

    name: str
    module: str  # what runs, in timm's names (reports, docs)
    matches: Callable[[BenchConfig], bool]
    # (config, weights) -> (call(x) -> out, [parameters], note); imports torch
    build: Callable[[BenchConfig, dict], tuple[Any, list, str]]


def _tensor(array):
    import torch

    return torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))


def _qkv(weights) -> tuple[np.ndarray, np.ndarray]:
    """timm's fused (3C, C) qkv weight and its (3C,) bias: q, k, v rows."""
    names = ("query", "key", "value")
    kernel = np.concatenate([weights[f"{n}_kernel"].T for n in names], axis=0)
    bias = np.concatenate([weights[f"{n}_bias"] for n in names])
    return kernel, bias


def _swin(config: BenchConfig, weights):
    import torch
    from torch import nn

    timm = _timm.swin()
    window, shift = config.window_size, config.shift_size
    block = timm.SwinTransformerBlock(
        config.channels,
        input_resolution=(config.height, config.width),
        num_heads=config.num_heads,
        window_size=window,
        shift_size=shift,
    ).eval()
    if block.window_size != (window, window) or block.shift_size != (shift, shift):
        # timm shrinks the window (and drops the shift) of a map no larger
        # than it: another block than the layer's.
        raise ValueError(
            f"timm's Swin block changed the window {window} / shift {shift} to "
            f"{block.window_size} / {block.shift_size} at "
            f"{config.height}x{config.width}"
        )
    attention = block.attn
    attention.proj = nn.Identity()
    kernel, bias = _qkv(weights)
    with torch.no_grad():
        attention.qkv.weight.copy_(_tensor(kernel))
        attention.qkv.bias.copy_(_tensor(bias))
        # ours (2Wh - 1, 2Ww - 1, heads), row-major: timm's ((2Wh-1)(2Ww-1), heads)
        attention.relative_position_bias_table.copy_(
            _tensor(weights["relative_bias_table"].reshape(-1, config.num_heads))
        )
    params = [
        attention.qkv.weight,
        attention.qkv.bias,
        attention.relative_position_bias_table,
    ]
    return block._attn, params, "timm's SwinTransformerBlock._attn, proj the identity"


def _eva(config: BenchConfig, weights):
    import torch
    from torch import nn

    from mhsa_core.reference import schema

    settings = schema.rope_settings(
        config.position_encoding,
        **{k: v for k, v in config.layer_config.items() if k.startswith("rope_")},
    )
    assert settings is not None  # "rope" is rotary (`PEERS` matched it)
    half = settings.layout == "half"
    attention = _timm.eva_attention()(
        config.channels,
        num_heads=config.num_heads,
        qkv_bias=True,
        qkv_fused=True,
        num_prefix_tokens=0,
        scale_norm=False,
        rotate_half=half,
    ).eval()
    attention.proj = nn.Identity()
    kernel, bias = _qkv(weights)
    q_bias, k_bias, v_bias = np.split(bias, 3)
    with torch.no_grad():
        attention.qkv.weight.copy_(_tensor(kernel))
        attention.q_bias.copy_(_tensor(q_bias))
        # EVA's k_bias is a zero buffer (EVA has no key bias, and does not
        # train it): here it holds the row's key bias, so that this is the
        # layer's block (with rope a key bias moves the logits); no gradient.
        attention.k_bias.copy_(_tensor(k_bias))
        attention.v_bias.copy_(_tensor(v_bias))
    rotary = _timm.module("timm.layers.pos_embed_sincos").RotaryEmbeddingCat(
        dim=config.head_dim,
        in_pixels=False,
        feat_shape=(config.height, config.width),
        ref_feat_shape=settings.reference_size,
        temperature=settings.temperature,
        grid_indexing=settings.grid_indexing,
        grid_offset=settings.grid_offset,
        rotate_half=half,
    )
    embedding = rotary.get_embed()  # (N, 2 * head_dim), EVA's cached one
    tokens = config.tokens

    def call(x):
        out = attention(x.reshape(x.shape[0], tokens, config.channels), rope=embedding)
        return out.reshape(x.shape)

    params = [attention.qkv.weight, attention.q_bias, attention.v_bias]
    return (
        call,
        params,
        (
            "timm's EvaAttention, RotaryEmbeddingCat's embedding passed as rope=; "
            "proj the identity; k_bias holds the key bias"
        ),
    )


def _bottleneck(config: BenchConfig, weights):
    import torch

    bottleneck = _timm.module("timm.layers.bottleneck_attn")
    attention = bottleneck.BottleneckAttn(
        config.channels,
        feat_size=(config.height, config.width),
        num_heads=config.num_heads,
        dim_head=config.head_dim,
        qkv_bias=True,
        # timm's scale_pos_embed is our scale_position_logits (convert/botnet.py)
        scale_pos_embed=config.layer_config.get("scale_position_logits", True),
    ).eval()
    kernel, bias = _qkv(weights)
    with torch.no_grad():
        attention.qkv.weight.copy_(_tensor(kernel)[:, :, None, None])  # 1x1 conv
        attention.qkv.bias.copy_(_tensor(bias))
        attention.pos_embed.height_rel.copy_(_tensor(weights["relative_height"]))
        attention.pos_embed.width_rel.copy_(_tensor(weights["relative_width"]))

    def call(x):  # timm's module is channels_first
        return attention(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)

    params = [
        attention.qkv.weight,
        attention.qkv.bias,
        attention.pos_embed.height_rel,
        attention.pos_embed.width_rel,
    ]
    return call, params, "timm's BottleneckAttn, on the input permuted to NCHW"


def _pvt_v2(config: BenchConfig, weights):
    import torch
    from torch import nn

    from mhsa_core.reference import schema

    # timm/models/pvt_v2.py's module imports what needs torchvision: its
    # Attention class alone, compiled from its own source.
    attention = (
        _timm.model_definitions("pvt_v2", ["Attention"])
        .Attention(
            config.channels,
            num_heads=config.num_heads,
            sr_ratio=config.kv_reduction,
            qkv_bias=True,
        )
        .eval()
    )
    attention.proj = nn.Identity()
    conv, conv_bias = schema.REDUCTION_CONV
    scale, shift = schema.norm_weight_names("reduction", "layer")
    kv = np.concatenate([weights["key_kernel"].T, weights["value_kernel"].T])
    with torch.no_grad():
        attention.q.weight.copy_(_tensor(weights["query_kernel"].T))
        attention.q.bias.copy_(_tensor(weights["query_bias"]))
        attention.kv.weight.copy_(_tensor(kv))
        attention.kv.bias.copy_(
            _tensor(np.concatenate([weights["key_bias"], weights["value_bias"]]))
        )
        # ours (R, R, C_in, C_out), Keras's HWIO: torch's (C_out, C_in, R, R)
        attention.sr.weight.copy_(_tensor(weights[conv].transpose(3, 2, 0, 1)))
        attention.sr.bias.copy_(_tensor(weights[conv_bias]))
        attention.norm.weight.copy_(_tensor(weights[scale]))
        attention.norm.bias.copy_(_tensor(weights[shift]))
    size = (config.height, config.width)
    tokens = config.tokens

    def call(x):
        out = attention(x.reshape(x.shape[0], tokens, config.channels), size)
        return out.reshape(x.shape)

    params = [
        attention.q.weight,
        attention.q.bias,
        attention.kv.weight,
        attention.kv.bias,
        attention.sr.weight,
        attention.sr.bias,
        attention.norm.weight,
        attention.norm.bias,
    ]
    return call, params, "timm's pvt_v2 Attention (sr_ratio), proj the identity"


PEERS = (
    Peer(
        "swin",
        "SwinTransformerBlock._attn (WindowAttention, shift mask)",
        lambda c: bool(c.window_size) and c.position_encoding == "relative_bias",
        _swin,
    ),
    Peer(
        "eva",
        "EvaAttention + RotaryEmbeddingCat",
        lambda c: not c.window_size and c.position_encoding == "rope",
        _eva,
    ),
    Peer(
        "pvt_v2",
        "pvt_v2 Attention (sr_ratio: strided conv + LayerNorm)",
        lambda c: (
            bool(c.kv_reduction) and not c.window_size and c.position_encoding == "none"
        ),
        _pvt_v2,
    ),
    Peer(
        "bottleneck",
        "BottleneckAttn",
        lambda c: not c.window_size and c.position_encoding == "relative",
        _bottleneck,
    ),
)


def peer_of(config: BenchConfig) -> Peer | None:
    """The timm peer of `config`, or None (no "timm" row)."""
    return next((p for p in PEERS if p.matches(config)), None)


def unavailable_reason() -> str | None:
    """Why the "timm" rows cannot run here, or None (nothing imported)."""
    return None if _timm.available() else NOT_INSTALLED


def build(config: BenchConfig, weights) -> tuple[Any, list, str]:
    """(call(x) -> out, [parameters], note) of `config`'s peer, in torch
    (x and out (B, H, W, C) float32). ValueError for a config without one."""
    peer = peer_of(config)
    if peer is None:
        raise ValueError(f"No timm peer for this config. Received: {config.name!r}")
    return peer.build(config, weights)
