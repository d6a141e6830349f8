"""The layer's timm options against timm's own attention modules (torch lane).

timm 1.0.31's `Attention(dim, num_heads, qkv_bias=True, qk_norm=True,
norm_layer=...)` with its LayerNorm (eps 1e-6), its RmsNorm and torch's
nn.LayerNorm (eps 1e-5), with and without `scale_norm`, and `EvaAttention`
(q and v biases, no k bias; `scale_norm`; fused and separate qkv) are run on
the tokens of a (B, H, W, C) map in row-major order, with random parameters
(norm scales around 1, every bias nonzero). Their parameters are mapped by
hand to the canonical weight dict: the fused qkv weight (3C, C) gives q, k,
v from its rows [0, C), [C, 2C), [2C, 3C), transposed to (in, out); q_norm,
k_norm, norm and proj are the query/key/output norms and the output
projection. Then:

- timm in float64 equals the NumPy reference (`mhsa_forward` with
  qk_norm / output_norm / output_dense / use_key_bias / norm_epsilon) to
  1e-10: the same function;
- timm and our layer (torch backend) in float32 are both within the float32
  budget of that float64 reference (`reference.error_budget`).

timm is loaded by `timm_loader` (its package `__init__` imports torchvision,
which is not installed); without timm installed the tests skip.
"""

import functools

import keras
import numpy as np
import pytest

from mhsa_core import MultiHeadSelfAttention2D, reference

from harness import assert_float64_close, to_numpy

BACKEND = keras.backend.backend()
pytestmark = pytest.mark.skipif(
    BACKEND != "torch", reason="timm is torch: the torch lane compares with it"
)

SHAPE = (2, 5, 6, 32)  # B, H, W, C
HEADS = 4


def _timm():
    import timm_loader

    # Not importorskip("timm"): importing it runs the __init__ the loader skips.
    if not timm_loader.available():
        pytest.skip("timm is not installed (backends/requirements-peers.txt)")
    return timm_loader


# name -> (module factory, our layer's options). A factory takes timm_loader.
CASES = {
    "qk_norm-layer": (
        lambda t: t.module("timm.layers.attention").Attention(
            32,
            HEADS,
            qkv_bias=True,
            qk_norm=True,
            norm_layer=t.module("timm.layers.norm").LayerNorm,
        ),
        {"qk_norm": "layer", "output_dense": True},
    ),
    "qk_norm-rms": (
        lambda t: t.module("timm.layers.attention").Attention(
            32,
            HEADS,
            qkv_bias=True,
            qk_norm=True,
            norm_layer=t.module("timm.layers.norm").RmsNorm,
        ),
        {"qk_norm": "rms", "output_dense": True},
    ),
    "qk_norm-scale_norm-torch_layernorm-eps1e-5": (
        lambda t: t.module("timm.layers.attention").Attention(
            32,
            HEADS,
            qkv_bias=True,
            qk_norm=True,
            scale_norm=True,
            norm_layer=__import__("torch").nn.LayerNorm,
        ),
        {
            "qk_norm": "layer",
            "output_norm": "layer",
            "output_dense": True,
            "norm_epsilon": 1e-5,
        },
    ),
    "eva-fused_qkv-scale_norm": (
        lambda t: t.eva_attention()(
            32,
            HEADS,
            qkv_bias=True,
            qkv_fused=True,
            norm_layer=t.module("timm.layers.norm").LayerNorm,
            scale_norm=True,
        ),
        {"use_key_bias": False, "output_norm": "layer", "output_dense": True},
    ),
    "eva-separate_qkv-qk_norm": (
        lambda t: t.eva_attention()(
            32,
            HEADS,
            qkv_bias=True,
            qkv_fused=False,
            norm_layer=t.module("timm.layers.norm").LayerNorm,
            qk_norm=True,
            scale_norm=False,
        ),
        {"use_key_bias": False, "qk_norm": "layer", "output_dense": True},
    ),
}


def _randomize(module, seed):
    """Every parameter random: norm weights 1 + N(0, 0.2^2), the rest
    N(0, 1/fan-in) for matrices and N(0, 0.1^2) for vectors."""
    import torch

    rng = np.random.default_rng(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            shape = tuple(p.shape)
            if "norm" in name and name.endswith("weight"):
                value = 1 + 0.2 * rng.standard_normal(shape)
            elif len(shape) == 2:
                value = rng.standard_normal(shape) / np.sqrt(shape[1])
            else:
                value = 0.1 * rng.standard_normal(shape)
            p.copy_(torch.from_numpy(value.astype(np.float32)))
    return module.eval()


def _canonical(module, options):
    """The module's parameters as our canonical weight dict (float64 of the
    float32 values), mapped by hand."""

    def array(t):
        return t.detach().double().numpy()

    weights = {}
    channels = SHAPE[-1]
    if getattr(module, "qkv", None) is not None:
        w = array(module.qkv.weight)  # (3C, C): q rows, then k, then v
        kernels = [w[i * channels : (i + 1) * channels].T for i in range(3)]
        if getattr(module, "q_bias", None) is not None:  # EVA: q, (zero k), v
            biases = [array(module.q_bias), None, array(module.v_bias)]
        else:
            b = array(module.qkv.bias)
            biases = [b[i * channels : (i + 1) * channels] for i in range(3)]
    else:  # EVA's separate projections; k_proj has no bias
        projections = (module.q_proj, module.k_proj, module.v_proj)
        kernels = [array(p.weight).T for p in projections]
        biases = [None if p.bias is None else array(p.bias) for p in projections]
    for name, kernel, bias in zip(("query", "key", "value"), kernels, biases):
        weights[f"{name}_kernel"] = kernel
        if bias is not None:
            weights[f"{name}_bias"] = bias
    if options.get("qk_norm"):
        for ours, theirs in (("query", module.q_norm), ("key", module.k_norm)):
            weights[f"{ours}_norm_scale"] = array(theirs.weight)
            if options["qk_norm"] == "layer":
                weights[f"{ours}_norm_bias"] = array(theirs.bias)
    if options.get("output_norm"):
        weights["output_norm_scale"] = array(module.norm.weight)
        weights["output_norm_bias"] = array(module.norm.bias)
    weights["output_kernel"] = array(module.proj.weight).T
    weights["output_bias"] = array(module.proj.bias)
    return weights


def _timm_forward(module, x, dtype):
    """timm's module on the map's tokens (row-major), back to (B, H, W, C)."""
    import torch

    batch, height, width, channels = x.shape
    tokens = torch.from_numpy(x.reshape(batch, height * width, channels))
    module = module.to(getattr(torch, dtype))
    with torch.no_grad():
        out = module(tokens.to(getattr(torch, dtype)))
    module.float()
    return out.numpy().reshape(x.shape)


@functools.cache
def _case(name):
    """(timm module, our options, canonical weights, x float32, x float64)."""
    factory, options = CASES[name]
    module = _randomize(factory(_timm()), seed=1)
    x = np.random.default_rng(0).standard_normal(SHAPE)
    return module, options, _canonical(module, options), x


@pytest.mark.parametrize("name", list(CASES))
def test_timm_float64_is_the_reference(name):
    module, options, weights, x = _case(name)
    out = _timm_forward(module, x, "float64")
    config = {"num_heads": HEADS, **options}
    expected = reference.mhsa_forward(x, weights, **reference.reference_config(config))
    assert_float64_close(out, expected, what=f"timm {name}")


@pytest.mark.parametrize("name", list(CASES))
def test_layer_and_timm_float32_within_budget(name):
    module, options, weights, x = _case(name)
    config = {"num_heads": HEADS, **options}
    x32 = x.astype(np.float32)
    layer = MultiHeadSelfAttention2D(**config)
    layer.build(SHAPE)
    assert set(weights) == {w.name for w in layer.trainable_weights}
    layer.set_weight_dict(weights)
    ours = to_numpy(layer(x32))
    theirs = _timm_forward(module, x32, "float32")
    ref64, budget, ref32_error = reference.error_budget(
        x32, weights, **reference.reference_config(config)
    )
    errors = {
        "layer": reference.max_abs(ours, ref64),
        "timm": reference.max_abs(theirs, ref64),
    }
    report = ", ".join(
        f"{k} {v:.3g} ({v / budget:.2f} of it)" for k, v in errors.items()
    )
    assert max(errors.values()) <= budget, (
        f"{name}: budget {budget:.3g} (reference float32 error {ref32_error:.3g}); "
        + report
    )
