"""`convert.layer_from_timm` against timm's own modules, on every backend.

Each case builds a timm 1.0.31 attention module with random parameters
(seeded torch), runs it in torch float32 on the tokens of a (B, H, W, C) map
in row-major order, converts it, and runs the converted layer on the map.
Both outputs are judged by our float64 NumPy reference (`mhsa_forward` with
the converted layer's `get_weight_dict()` and config) within the float32
budget of `reference.error_budget` (2x the reference's own float32 error +
floor): timm's output being within it is what says the conversion (weights,
settings, layout) is right; ours being within it, that the layer computes
it. Two map sizes each: for EVA's rope with `ref_feat_shape`, the reference
size and another; for Swin, sizes divisible by the window (timm pads
without masking and we mask the padding, so they differ, by design, only
at other sizes), shifted and not; BoTNet's module is fixed to its
`feat_size`, so one module per size.

The teeth: a converted layer with one weight perturbed, the wrong shift, or
the naive mapping of timm 1.0.31's rotate-half rope must fail the same
check. Then the errors: every refusal names its argument (or the module's
setting) and the value received.

timm is torch: the module is built and run in torch on every lane (the
layer runs on the lane's backend); timm is loaded by `timm_loader` (its
package `__init__` imports torchvision); the tests skip without timm.
"""

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from mhsa_core import convert, reference

from harness import match_all, to_numpy

torch = pytest.importorskip("torch")
import timm_loader  # noqa: E402  (tests/, beside harness)

if not timm_loader.available():
    pytest.skip(
        "timm is not installed (backends/requirements-peers.txt)",
        allow_module_level=True,
    )

C, HEADS = 32, 4  # heads of 8 channels: rope needs a multiple of 4
BATCH = 2
REF = (6, 5)  # EVA's ref_feat_shape in the rope cases


def _layers(name):
    return timm_loader.module(f"timm.layers.{name}")


def _swin():
    return timm_loader.model_definitions(
        "swin_transformer",
        [
            "_int_or_tuple_2_t",
            "window_partition",
            "window_reverse",
            "get_relative_position_index",
            "WindowAttention",
            "SwinTransformerBlock",
        ],
    )


def _randomize(module, seed):
    """Every parameter random, trained-looking: norm weights 1 + N(0, 0.2^2),
    Swin's bias table N(0, 1), other matrices N(0, 1/fan-in), vectors
    N(0, 0.1^2). RotaryEmbeddingMixed's freqs keep timm's (seeded) init."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=generator, dtype=p.dtype)
            if name.endswith("freqs"):
                continue
            if "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.2 * noise)
            elif name.endswith("bias_table"):
                p.copy_(noise)
            elif p.ndim >= 2:
                p.copy_(noise / np.sqrt(np.prod(p.shape[1:])))
            else:
                p.copy_(0.1 * noise)
    return module.eval()


# ------------------------------------------------------------------ the cases
@dataclasses.dataclass(frozen=True)
class Built:
    """A timm module at one size, what to pass the converter, and its run on
    an input in the layer's layout."""

    module: Any
    kwargs: dict
    run: Callable[[np.ndarray], np.ndarray]


def _tokens_run(module, rope=None, block=None):
    """The module on (B, H*W, C) tokens, back to (B, H, W, C)."""

    def run(x):
        batch, height, width, channels = x.shape
        tokens = torch.from_numpy(x.reshape(batch, height * width, channels))
        with torch.no_grad():
            if rope is None:
                out = module(tokens)
            else:
                embedding = rope.get_embed((height, width))
                if block is not None:  # RotaryEmbeddingMixed: (depth, heads, N, 2d)
                    embedding = embedding[block]
                out = module(tokens, rope=embedding)
        return out.numpy().reshape(x.shape)

    return run


def _token_case(make_module, make_rope=None, block=None):
    def build(size):
        torch.manual_seed(0)
        module = _randomize(make_module(), seed=1)
        rope = None if make_rope is None else make_rope()
        kwargs = {} if rope is None else {"rope": rope}
        if block is not None:
            kwargs["block_index"] = block
        return Built(module, kwargs, _tokens_run(module, rope, block))

    return build


def _vit(**options):
    return lambda: _layers("attention").Attention(C, HEADS, **options)


def _eva(**options):
    def make():
        return timm_loader.eva_attention()(
            C,
            HEADS,
            norm_layer=_layers("norm").LayerNorm,
            **{"scale_norm": False, "num_prefix_tokens": 0, **options},
        )

    return make


def _attention_rope(**options):
    return lambda: _layers("attention").AttentionRope(
        C, HEADS, **{"num_prefix_tokens": 0, **options}
    )


def _cat(**options):
    return lambda: _layers("pos_embed_sincos").RotaryEmbeddingCat(
        dim=C // HEADS, **{"in_pixels": False, **options}
    )


def _mixed(**options):
    return lambda: _layers("pos_embed_sincos").RotaryEmbeddingMixed(
        C, num_heads=HEADS, **options
    )


def _botnet(**options):
    def build(size):
        torch.manual_seed(0)
        module = _layers("bottleneck_attn").BottleneckAttn(
            C, feat_size=size, num_heads=HEADS, **options
        )
        module = _randomize(module, seed=1)

        def run(x):  # channels_first, as the module
            with torch.no_grad():
                return module(torch.from_numpy(x)).numpy()

        return Built(module, {"data_format": "channels_first"}, run)

    return build


def _pvt_v2(**options):
    """pvt_v2's Attention (its forward takes the tokens and feat_size)."""

    def build(size):
        torch.manual_seed(0)
        attention = timm_loader.model_definitions("pvt_v2", ["Attention"]).Attention
        module = _randomize(attention(C, HEADS, **options), seed=1)

        def run(x):
            batch, height, width, channels = x.shape
            tokens = torch.from_numpy(x.reshape(batch, height * width, channels))
            with torch.no_grad():
                return module(tokens, (height, width)).numpy().reshape(x.shape)

        return Built(module, {}, run)

    return build


def _swin_case(window, shift):
    def build(size):
        torch.manual_seed(0)
        block = _swin().SwinTransformerBlock(
            C,
            input_resolution=size,
            num_heads=HEADS,
            window_size=window,
            shift_size=shift,
        )
        block.attn = _randomize(block.attn, seed=1)
        block.eval()

        def run(x):  # the block's _attn: roll, pad, windows, attention, back
            with torch.no_grad():
                return block._attn(torch.from_numpy(x)).numpy()

        return Built(block.attn, {"shift_size": block.shift_size}, run)

    return build


def _norm(name):
    """timm's norm class `name` as a norm_layer, looked up when called: the
    case table loads nothing of timm at collection, where the loaders of
    the older timm tests (tests/layers/test_rope_timm.py,
    test_swin_timm.py) register their own stand-in packages."""

    def norm_layer(*args, **kwargs):
        return _layers("norm").__dict__[name](*args, **kwargs)

    return norm_layer


# name -> (build(size) -> Built, the two sizes)
CASES = {
    "vit-qkv_bias-qk_norm-LayerNorm": (
        _token_case(_vit(qkv_bias=True, qk_norm=True, norm_layer=_norm("LayerNorm"))),
        [(5, 6), (3, 7)],
    ),
    "vit-qk_norm-RmsNorm": (
        _token_case(_vit(qkv_bias=True, qk_norm=True, norm_layer=_norm("RmsNorm"))),
        [(5, 6), (3, 7)],
    ),
    "vit-nn.LayerNorm-eps1e-5-qk_norm-scale_norm": (
        _token_case(
            _vit(
                qkv_bias=True,
                qk_norm=True,
                scale_norm=True,
                norm_layer=torch.nn.LayerNorm,
            )
        ),
        [(5, 6), (3, 7)],
    ),
    "vit-no_qkv_bias": (_token_case(_vit()), [(5, 6), (3, 7)]),
    "botnet": (_botnet(), [(5, 3), (4, 4)]),
    "botnet-scale_pos_embed-qkv_bias-qk_ratio0.5": (
        _botnet(scale_pos_embed=True, qkv_bias=True, qk_ratio=0.5),
        [(5, 3), (4, 4)],
    ),
    "eva02-cat-scale_norm": (
        _token_case(_eva(scale_norm=True), _cat(ref_feat_shape=REF)),
        [REF, (9, 4)],
    ),
    "eva-cat-rotate_half-separate_qkv-qk_norm": (
        _token_case(
            _eva(rotate_half=True, qkv_fused=False, qk_norm=True),
            _cat(ref_feat_shape=REF, rotate_half=True),
        ),
        [REF, (9, 4)],
    ),
    "eva-cat-rotate_half-interleaved_tables": (
        _token_case(_eva(rotate_half=True), _cat(ref_feat_shape=REF)),
        [REF, (9, 4)],
    ),
    "pe-cat-xy-offset1": (
        _token_case(_eva(), _cat(grid_indexing="xy", grid_offset=1.0)),
        [REF, (9, 4)],
    ),
    "eva-cat-in_pixels-max_res64": (
        _token_case(_eva(), _cat(in_pixels=True, max_res=64, ref_feat_shape=REF)),
        [REF, (9, 4)],
    ),
    "eva-mixed-depth3-block1": (
        _token_case(_eva(), _mixed(depth=3), block=1),
        [REF, (9, 4)],
    ),
    "attention_rope-mixed-ij-rotate_half": (
        _token_case(
            _attention_rope(rotate_half=True), _mixed(depth=1, grid_indexing="ij")
        ),
        [REF, (9, 4)],
    ),
    "attention_rope-cat-gqa-qk_norm-RmsNorm": (
        _token_case(
            _attention_rope(
                qkv_fused=False,
                num_kv_heads=2,
                qk_norm=True,
                norm_layer=_norm("RmsNorm"),
            ),
            _cat(),
        ),
        [REF, (9, 4)],
    ),
    # 7 x 9 and 5 x 6 by a stride-2 conv: timm's conv floors, as the layer.
    "pvt_v2-sr_ratio2": (_pvt_v2(sr_ratio=2), [(7, 9), (6, 8)]),
    "pvt_v2-sr_ratio4-no_qkv_bias": (
        _pvt_v2(sr_ratio=4, qkv_bias=False),
        [(8, 8), (9, 5)],
    ),
    # AdaptiveAvgPool2d(7): overlapping bins at 9 x 8, repeated cells at 5 x 6.
    "pvt_v2-linear": (_pvt_v2(linear_attn=True), [(9, 8), (5, 6)]),
    "swin-window4": (_swin_case(4, 0), [(8, 8), (8, 12)]),
    "swin-window4-shift2": (_swin_case(4, 2), [(8, 8), (8, 12)]),
    "swin-window3x4-shift1x2": (_swin_case((3, 4), (1, 2)), [(6, 8), (9, 12)]),
}
PARAMS = [
    pytest.param(name, size, id=f"{name}-{size[0]}x{size[1]}")
    for name, (_, sizes) in CASES.items()
    for size in sizes
]


def _input(built, size, seed=0):
    shape = (BATCH, *size, C)
    if built.kwargs.get("data_format") == "channels_first":
        shape = (BATCH, C, *size)
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def _judge(layer, x, out):
    """(error of `out`, budget) against the float64 reference of `layer`'s
    weights and config on x."""
    weights = {k: np.asarray(v, np.float64) for k, v in layer.get_weight_dict().items()}
    ref64, budget, _ = reference.error_budget(
        x.astype(np.float64), weights, **reference.reference_config(layer.get_config())
    )
    return reference.max_abs(out, ref64), budget


def _converted(name, size):
    built = CASES[name][0](size)
    layer = convert.layer_from_timm(built.module, **built.kwargs)
    x = _input(built, size)
    return built, layer, x


@pytest.mark.parametrize("name, size", PARAMS)
def test_timm_and_layer_within_budget_of_reference(name, size):
    built, layer, x = _converted(name, size)
    theirs = built.run(x)
    ours = to_numpy(layer(x))
    for who, out in (("timm", theirs), ("layer", ours)):
        error, budget = _judge(layer, x, out)
        assert error <= budget, (
            f"{who}: error {error:.3g} > budget {budget:.3g} ({error / budget:.1f}x)"
        )


# ---------------------------------------------------------------------- teeth
# name -> (case, weight, what the perturbation breaks)
PERTURBED = {
    "vit-query_norm_scale": ("vit-qkv_bias-qk_norm-LayerNorm", "query_norm_scale"),
    "vit-output_bias": ("vit-no_qkv_bias", "output_bias"),
    "botnet-relative_width": ("botnet", "relative_width"),
    "eva-rope_frequencies": ("eva-mixed-depth3-block1", "rope_frequencies"),
    "eva-value_bias": ("eva02-cat-scale_norm", "value_bias"),
    "swin-relative_bias_table": ("swin-window4-shift2", "relative_bias_table"),
    "pvt_v2-reduction_kernel": ("pvt_v2-sr_ratio2", "reduction_kernel"),
    "pvt_v2-reduction_norm_bias": ("pvt_v2-linear", "reduction_norm_bias"),
}


@pytest.mark.parametrize("case, weight", PERTURBED.values(), ids=list(PERTURBED))
def test_a_perturbed_weight_fails_the_check(case, weight):
    size = CASES[case][1][0]
    built, layer, x = _converted(case, size)
    weights = layer.get_weight_dict()
    flat = weights[weight].reshape(-1)
    flat[flat.size // 2] += 0.5
    layer.set_weight_dict(weights)
    error, budget = _judge(layer, x, built.run(x))
    assert error > 10 * budget, f"{weight}: {error:.3g} vs budget {budget:.3g}"


@pytest.mark.parametrize("shift", [0, 1, (2, 1)], ids=str)
def test_the_wrong_shift_fails_the_check(shift):
    built = CASES["swin-window4-shift2"][0]((8, 8))
    layer = convert.layer_from_timm(built.module, shift_size=shift)
    x = _input(built, (8, 8))
    error, budget = _judge(layer, x, built.run(x))
    assert error > 10 * budget


def test_rotate_half_rope_is_not_the_layers_half_layout():
    """timm 1.0.31's EVA with rope_rotate_half=True (half-layout tables,
    rope_rotate_half) is not `rope_layout="half"` with the weights as they
    are (that is rope_rotate_half on interleaved tables): the converter's
    reordering of q and k channels is needed."""
    built = CASES["eva-cat-rotate_half-separate_qkv-qk_norm"][0](REF)
    x = _input(built, REF)
    theirs = built.run(x)
    rope = built.kwargs["rope"]
    rope.rotate_half = False  # read as interleaved tables: the naive mapping
    naive = convert.layer_from_timm(built.module, rope=rope)
    assert naive.rope_layout == "half"
    error, budget = _judge(naive, x, theirs)
    assert error > 10 * budget


# -------------------------------------------------------------- prefix tokens
# name -> (module, rope or None, T, the two sizes): EVA-02 with a class token
# and 4 registers (timm's `Eva(num_reg_tokens=4)`: num_prefix_tokens=5, the
# rope skips them), AttentionRope with a class token and RoPE-Mixed, and
# ViT's `Attention` with a class token (no position term in the attention).
PREFIX_CASES = {
    "eva02-cat-scale_norm-cls-reg4": (
        _eva(scale_norm=True, num_prefix_tokens=5),
        _cat(ref_feat_shape=REF),
        5,
        [REF, (9, 4)],
    ),
    "attention_rope-mixed-cls": (
        _attention_rope(num_prefix_tokens=1),
        _mixed(depth=1),
        1,
        [REF, (9, 4)],
    ),
    "vit-qkv_bias-qk_norm-cls": (
        _vit(qkv_bias=True, qk_norm=True, norm_layer=_norm("LayerNorm")),
        None,
        1,
        [(5, 6), (3, 7)],
    ),
}
PREFIX_PARAMS = [
    pytest.param(name, size, id=f"{name}-{size[0]}x{size[1]}")
    for name, (*_, sizes) in PREFIX_CASES.items()
    for size in sizes
]


def _prefix_run(name, size):
    """(layer, x, prefix tokens, timm's (map, prefix) outputs, ours)."""
    make_module, make_rope, count, _ = PREFIX_CASES[name]
    torch.manual_seed(0)
    module = _randomize(make_module(), seed=1)
    rope = None if make_rope is None else make_rope()
    layer = convert.layer_from_timm(module, **({} if rope is None else {"rope": rope}))
    assert layer.num_prefix_tokens == (None if rope is None else count)
    rng = np.random.default_rng(2)
    x = rng.standard_normal((BATCH, *size, C)).astype(np.float32)
    prefix = rng.standard_normal((BATCH, count, C)).astype(np.float32)
    tokens = np.concatenate([prefix, x.reshape(BATCH, -1, C)], axis=1)
    with torch.no_grad():
        if rope is None:
            out = module(torch.from_numpy(tokens))
        else:
            embedding = rope.get_embed(size)
            if embedding.ndim == 4:  # RotaryEmbeddingMixed: (depth, heads, N, 2d)
                embedding = embedding[0]
            out = module(torch.from_numpy(tokens), rope=embedding)
    out = out.numpy()
    theirs = (out[:, count:].reshape(x.shape), out[:, :count])
    ours = tuple(to_numpy(t) for t in layer(x, prefix_tokens=prefix))
    return layer, x, prefix, theirs, ours


@pytest.mark.parametrize("name, size", PREFIX_PARAMS)
def test_prefix_tokens_within_budget_of_reference(name, size):
    """timm's module on concat(prefix tokens, map tokens) and the converted
    layer on (map, prefix_tokens): both within the float32 budget of the
    float64 reference (map and prefix outputs judged together)."""
    layer, x, prefix, theirs, ours = _prefix_run(name, size)
    weights = {k: np.asarray(v, np.float64) for k, v in layer.get_weight_dict().items()}
    kwargs = dict(
        prefix_tokens=prefix.astype(np.float64),
        **reference.reference_config(layer.get_config()),
    )
    flat = lambda results: np.concatenate([np.ravel(r) for r in results])  # noqa: E731
    ref64 = flat(reference.mhsa_forward(x.astype(np.float64), weights, **kwargs))
    rounded = flat(reference.rounded_forward(x, weights, **kwargs))
    budget = reference.float32_budget(rounded, ref64)
    for who, out in (("timm", theirs), ("layer", ours)):
        error = reference.max_abs(flat(out), ref64)
        assert error <= budget, f"{who}: error {error:.3g} > budget {budget:.3g}"


def test_prefix_tokens_rotated_fail_the_check():
    """Teeth: timm's EVA told it has no prefix tokens (its rope then rotates
    the class and register tokens as map tokens, shifted) is far from the
    layer's."""
    name = "eva02-cat-scale_norm-cls-reg4"
    layer, x, prefix, theirs, ours = _prefix_run(name, REF)
    make_module, make_rope, count, _ = PREFIX_CASES[name]
    torch.manual_seed(0)
    module = _randomize(make_module(), seed=1)
    module.num_prefix_tokens = 0
    tokens = np.concatenate([prefix, x.reshape(BATCH, -1, C)], axis=1)
    rope = make_rope()
    # A grid of T + N tokens: rows of REF[1], the prefix tokens first.
    embedding = rope.get_embed((REF[0] + 1, REF[1]))[: tokens.shape[1]]
    with torch.no_grad():
        wrong = module(torch.from_numpy(tokens), rope=embedding).numpy()
    assert np.max(np.abs(wrong[:, count:].reshape(x.shape) - ours[0])) > 1e-2


# --------------------------------------------------------------------- errors
def _eva_module(**options):
    return _eva(**options)()


def _sincos(name, **options):
    return _layers("pos_embed_sincos").__dict__[name](**options)


def _attention(**options):
    return _layers("attention").Attention(C, HEADS, **options)


# name -> (() -> (module, converter kwargs), the parts the message must name)
ERRORS = {
    "not-timm": (
        lambda: (torch.nn.Linear(4, 4), {}),
        ["module=Linear", "EvaAttention"],
    ),
    "swin-v2": (
        lambda: (
            timm_loader.model_definitions(
                "swin_transformer_v2", ["WindowAttention"]
            ).WindowAttention(C, (4, 4), HEADS),
            {},
        ),
        ["Swin v2", "cosine", "cpb_mlp"],
    ),
    "eva-rope-missing": (lambda: (_eva_module(), {}), ["`rope`", "rope=None"]),
    "rope-unsupported": (
        lambda: (_eva_module(), {"rope": _sincos("RotaryEmbedding", dim=C // HEADS)}),
        ["`rope`", "<RotaryEmbedding>", "RotaryEmbeddingCat"],
    ),
    "rope-tensor": (
        lambda: (_eva_module(), {"rope": _cat()().get_embed((2, 3))}),
        ["`rope`", "Tensor of shape (6, 16)"],
    ),
    "rope-other-dim": (
        lambda: (
            _eva_module(),
            {"rope": _sincos("RotaryEmbeddingCat", dim=16, in_pixels=False)},
        ),
        ["`rope`", "dim=16", "head_dim (8)"],
    ),
    "rope-half-tables-interleaved-attention": (
        lambda: (_eva_module(), {"rope": _cat(rotate_half=True)()}),
        ["`rope`", "rotate_half=True"],
    ),
    "rope-for-vit": (
        lambda: (_attention(), {"rope": _cat()()}),
        ["`rope`", "RotaryEmbeddingCat", "Attention applies no rope"],
    ),
    "mixed-without-block_index": (
        lambda: (_eva_module(), {"rope": _mixed(depth=3)()}),
        ["`block_index`", "block_index=None", "3 blocks"],
    ),
    "mixed-block_index-out-of-range": (
        lambda: (_eva_module(), {"rope": _mixed(depth=3)(), "block_index": 3}),
        ["`block_index`", "block_index=3", "[0, 3)"],
    ),
    "block_index-with-cat": (
        lambda: (_eva_module(), {"rope": _cat()(), "block_index": 0}),
        ["`block_index`", "block_index=0"],
    ),
    "shift-not-smaller-than-window": (
        lambda: (_swin().WindowAttention(C, HEADS, window_size=4), {"shift_size": 4}),
        ["`shift_size`", "shift_size=4", "window_size=(4, 4)"],
    ),
    "shift-for-vit": (
        lambda: (_attention(), {"shift_size": 2}),
        ["`shift_size`", "shift_size=2"],
    ),
    "gated": (
        lambda: (_attention(gated=True), {}),
        ["gated=True", "module.gate=Linear"],
    ),
    "dim_out": (lambda: (_attention(dim_out=16), {}), ["dim_out=16"]),
    "botnet-stride2": (
        lambda: (
            _layers("bottleneck_attn").BottleneckAttn(
                C, feat_size=(4, 4), num_heads=HEADS, stride=2
            ),
            {},
        ),
        ["stride=2", "module.pool=AvgPool2d"],
    ),
    "scale_norm-RmsNorm": (
        lambda: (_attention(scale_norm=True, norm_layer=_norm("RmsNorm")), {}),
        ["module.norm=RmsNorm", "'layer'"],
    ),
    "qk_norm-SimpleNorm": (
        lambda: (_attention(qk_norm=True, norm_layer=_norm("SimpleNorm")), {}),
        ["module.q_norm=SimpleNorm"],
    ),
    "setting-read-from-module": (
        lambda: (_attention(), {"num_heads": 2}),
        ["num_heads", "read from the module", "num_heads=2"],
    ),
}


@pytest.mark.parametrize("make, parts", ERRORS.values(), ids=list(ERRORS))
def test_refusals_name_the_argument_and_value(make, parts):
    module, kwargs = make()
    with pytest.raises(ValueError, match=match_all(*parts)):
        convert.layer_from_timm(module, **kwargs)


def test_the_converter_imports_no_framework():
    """It reads tensors through their own methods: no import of torch,
    TensorFlow, JAX or timm anywhere in the module (the issue's rule)."""
    import ast

    from mhsa_core.convert import timm as converter

    tree = ast.parse(Path(converter.__file__).read_text(encoding="utf-8"))
    imported = {
        (alias.name if isinstance(node, ast.Import) else node.module or "").split(".")[
            0
        ]
        for node in ast.walk(tree)
        if isinstance(node, (ast.Import, ast.ImportFrom))
        for alias in node.names
    }
    assert not imported & {"torch", "tensorflow", "jax", "timm", "keras"}, imported
