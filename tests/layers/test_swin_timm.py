"""Our Swin pieces against timm's own (`timm==1.0.31`, the torch lane only):
the relative position index, the table resize, the shifted-window mask and
the window attention itself.

What is compared: timm's `SwinTransformerBlock._attn` (roll, pad, partition,
`WindowAttention` with its bias table and shift mask, merge, crop, roll back)
with its output projection `attn.proj` set to the identity (A's branch adds
our output projection; until it is merged we compare the attention's output
before any projection), against our layer with `relative_bias`, the window,
the shift and timm's convention `scale_position_logits=False`, on the same
tokens, weights mapped by hand: timm's fused `qkv.weight` rows [0:C) are q,
[C:2C) k, [2C:3C) v (ours = those rows transposed), its
`relative_position_bias_table` ((2Wh-1)(2Ww-1), heads) is ours reshaped to
(2Wh - 1, 2Ww - 1, heads). Both are judged by our float64 reference within
the float32 budget (`reference.error_budget`): at the size timm's block was
built for (divisible by the window), and at another window size timm gets by
`set_input_size` (its table resized by its rule; ours is resized in the
graph from the same trained table). At a size not divisible by the window
our output differs from timm's by design in the windows that hold padding
(timm does not mask padded keys), and only there.

timm's package __init__ imports torchvision, which does not work here:
`timm_loader.swin()` reads the module files it needs.
"""

import keras
import numpy as np
import pytest
import timm_loader

from mhsa_core import MultiHeadSelfAttention2D, reference

from harness import assert_float32_within_budget, to_numpy

BACKEND = keras.backend.backend()
pytestmark = [
    pytest.mark.skipif(BACKEND != "torch", reason="timm: the torch lane"),
    # timm's own interpolator (its resize): torch's notes on its inputs.
    pytest.mark.filterwarnings("ignore:torch.searchsorted.*non-contiguous"),
    pytest.mark.filterwarnings("ignore:Using a non-tuple sequence"),
]


@pytest.fixture(scope="module")
def timm():
    if not timm_loader.available():
        pytest.skip("timm is not installed (backends/requirements-peers.txt)")
    return timm_loader.swin()


# --------------------------------------------------------------- the pieces
@pytest.mark.parametrize("window", [(2, 2), (3, 4), (7, 7)], ids=str)
def test_relative_position_index_is_timms(timm, window):
    """Our bias of a window, with the table holding its own flat index, is
    timm's relative_position_index (query minus key, row-major offsets)."""
    rows = tuple(2 * w - 1 for w in window)
    table = np.arange(rows[0] * rows[1], dtype=float).reshape(*rows, 1)
    ours = reference.position_bias(
        {"relative_bias_table": table}, "relative_bias", *window
    )
    np.testing.assert_array_equal(
        ours[0], timm.get_relative_position_index(*window).numpy()
    )
    # The layer's gather: the same index.
    from mhsa_core.layers.position.relative_bias import bias_rows

    rows_index = keras.ops.arange(window[0] * window[1], dtype="int32")
    layer = to_numpy(bias_rows(keras.ops.convert_to_tensor(table[..., 0]), rows_index))
    np.testing.assert_array_equal(layer, ours[0])


# (source table rows, new window): Swin's 7 -> 12 (its 384 models), shrinking,
# growing from 3, a non-square new window, 1x1.
RESIZES = [
    ((13, 13), (12, 12)),
    ((13, 13), (5, 5)),
    ((5, 5), (7, 7)),
    ((13, 13), (7, 14)),
    ((1, 1), (3, 3)),
]


@pytest.mark.parametrize("flat", [True, False], ids=["flat", "heads-first"])
@pytest.mark.parametrize("source, window", RESIZES, ids=str)
def test_resize_is_timms_rule(timm, source, window, flat):
    """timm's resize_rel_pos_bias_table (its flat (L, heads) tables and
    (heads, H, W) ones), computed in float32 by timm, against our float64
    rule within the float32 budget; and the layer's resize, float32."""
    import torch

    from mhsa_core.layers.position._bias_resize import resize_bias_table

    heads = 3
    table = np.random.default_rng(0).standard_normal((*source, heads)).astype("float32")
    rows = tuple(2 * w - 1 for w in window)
    if flat:
        given = torch.from_numpy(table.reshape(-1, heads))
        got = timm.resize_rel_pos_bias_table(given, window, (rows[0] * rows[1], heads))
        got = got.numpy().reshape(*rows, heads)
    else:
        given = torch.from_numpy(np.ascontiguousarray(table.transpose(2, 0, 1)))
        got = timm.resize_rel_pos_bias_table(given, window, (heads, *rows))
        got = got.numpy().transpose(1, 2, 0)
    ours64 = reference.resize_bias_table(table, *rows)
    ours32 = reference.resize_bias_table(table, *rows, np.float32)
    budget = reference.float32_budget(ours32, ours64)
    assert reference.max_abs(got, ours64) <= budget
    layer = to_numpy(resize_bias_table(keras.ops.convert_to_tensor(table), *rows))
    assert reference.max_abs(layer, ours64) <= budget
    if source != (1, 1):
        # The rule is not torch's bicubic (timm's `_simple` variant).
        bicubic = (
            torch.nn.functional.interpolate(
                torch.from_numpy(np.ascontiguousarray(table.transpose(2, 0, 1)))[None],
                size=rows,
                mode="bicubic",
                align_corners=False,
            )[0]
            .numpy()
            .transpose(1, 2, 0)
        )
        assert reference.max_abs(bicubic, ours64) > 100 * budget


def _block(timm, size, window, shift, channels=16, heads=2, seed=0):
    """timm's Swin block built for `size`, its output projection the identity."""
    import torch

    torch.manual_seed(seed)
    block = timm.SwinTransformerBlock(
        channels,
        input_resolution=size,
        num_heads=heads,
        window_size=window,
        shift_size=shift,
    ).eval()
    with torch.no_grad():
        block.attn.proj.weight.copy_(torch.eye(channels))
        block.attn.proj.bias.zero_()
        # Trained-looking tables: several units (timm's init is 0.02).
        block.attn.relative_position_bias_table.normal_(0.0, 1.0)
        block.attn.qkv.bias.normal_(0.0, 0.1)
    return block


def _weights(block):
    """Our canonical weights of timm's block (qkv rows: q, k, v)."""
    channels = block.dim
    qkv_w = block.attn.qkv.weight.detach().numpy().astype(np.float64)
    qkv_b = block.attn.qkv.bias.detach().numpy().astype(np.float64)
    weights = {}
    for i, name in enumerate(("query", "key", "value")):
        weights[f"{name}_kernel"] = qkv_w[i * channels : (i + 1) * channels].T
        weights[f"{name}_bias"] = qkv_b[i * channels : (i + 1) * channels]
    wh, ww = block.attn.window_size
    table = block.attn.relative_position_bias_table.detach().numpy()
    weights["relative_bias_table"] = table.astype(np.float64).reshape(
        2 * wh - 1, 2 * ww - 1, -1
    )
    return weights


def _ours(weights, window, shift, heads=2, position_size=None):
    config = {
        "num_heads": heads,
        "position_encoding": "relative_bias",
        "scale_position_logits": False,
        "window_size": window,
        "shift_size": shift,
        "position_size": position_size or window,
    }
    layer = MultiHeadSelfAttention2D(**config)
    layer.build((None, None, None, weights["query_kernel"].shape[0]))
    layer.set_weight_dict(weights)
    return layer, config


def _timm_attn(block, x):
    import torch

    with torch.no_grad():
        return block._attn(torch.from_numpy(x)).numpy()


def test_shift_mask_is_timms_at_a_divisible_size(timm):
    """timm's -100 mask of an 8x8 map, window 4, shift 2, and ours: the same
    pairs of tokens are apart in every window."""
    block = _block(timm, (8, 8), 4, 2)
    theirs = block.attn_mask.numpy()  # (nW, 16, 16)
    _, _, regions = reference.window_layout(8, 8, 4, 2)
    ours = np.array([[[a != b for b in r] for a in r] for r in regions])
    np.testing.assert_array_equal(theirs != 0, ours)
    assert set(np.unique(theirs)) == {0.0, -100.0}


@pytest.mark.parametrize(
    "size, window, shift", [((8, 8), 4, 2), ((14, 7), 7, 3)], ids=str
)
def test_window_attention_is_timms(timm, size, window, shift):
    """At the size the block was built for (divisible), ours and timm's
    within the float32 budget of our float64 reference."""
    block = _block(timm, size, window, shift)
    weights = _weights(block)
    layer, config = _ours(weights, block.window_size, block.shift_size)
    x = np.random.default_rng(1).standard_normal((2, *size, 16)).astype("float32")
    theirs = _timm_attn(block, x)
    ours = to_numpy(layer(x))
    for who, out in (("timm", theirs), ("ours", ours)):
        assert_float32_within_budget(out, x, weights, config, what=who)


def test_another_window_size_resizes_as_timm(timm):
    """timm's block moved to a 12x12 map with windows of 6 (set_input_size
    resizes its 7x7 table by its rule) against our layer with windows of 6
    and the table of 4 (position_size), resized in the graph."""
    block = _block(timm, (8, 8), 4, 2)
    trained = _weights(block)
    block.set_input_size((12, 12), (6, 6))
    assert block.window_size == (6, 6) and block.shift_size == (3, 3)
    resized = _weights(block)  # timm's table after its resize
    layer, config = _ours(trained, (6, 6), (3, 3), position_size=(4, 4))
    x = np.random.default_rng(2).standard_normal((2, 12, 12, 16)).astype("float32")
    theirs = _timm_attn(block, x)
    # Our float64 oracle with the trained table at the window of 6 (it
    # resizes it by the rule) judges both.
    ours = to_numpy(layer(x))
    assert_float32_within_budget(ours, x, trained, config, what="ours")
    assert_float32_within_budget(theirs, x, trained, config, what="timm")
    # timm's own resized table is the rule's, to float32.
    rule = reference.resize_bias_table(trained["relative_bias_table"], 11, 11)
    assert reference.max_abs(resized["relative_bias_table"], rule) <= (
        reference.float32_budget(rule.astype("float32"), rule)
        + 1e-6 * np.abs(rule).max()
    )


def test_non_divisible_size_differs_where_timm_attends_padding_or_wraps(timm):
    """10x9 map, windows of 4, shift 2: padded to 12x12. Two differences from
    timm, both by design, both only at sizes not divisible by the window:

    - timm gives its zero padding tokens weight (their k and v are the qkv
      biases); ours masks them;
    - timm labels the shift's regions on the padded grid, so that along W
      (9 = 2 * 4 + 1, 3 padding columns) the wrapped column x = 0 lands in
      the region of x = 6..8 in a window without padding and attends them;
      ours labels each token by where it came from (x < shift), as at
      divisible sizes, where both masks are the same (tested above).

    Where neither applies (windows without padding and with timm's regions),
    ours and timm's agree within budget; elsewhere they differ."""
    size = (10, 9)
    block = _block(timm, size, 4, 2)
    weights = _weights(block)
    layer, config = _ours(weights, (4, 4), (2, 2))
    x = np.random.default_rng(3).standard_normal((1, *size, 16)).astype("float32")
    theirs = _timm_attn(block, x).reshape(1, -1, 16)
    ours = to_numpy(layer(x))
    assert_float32_within_budget(ours, x, weights, config)
    ref64, budget, _ = reference.error_budget(
        x, weights, **reference.reference_config(config)
    )
    _, windows, regions = reference.window_layout(*size, 4, 2)
    timm_apart = block.attn_mask.numpy() != 0  # (nW, 16, 16), padded grid
    same, padding, wrapped = [], [], []
    for slots, labels, apart in zip(windows, regions, timm_apart):
        tokens = [t for t in slots if t >= 0]
        ours_apart = np.not_equal.outer(labels, labels)
        if min(slots) < 0:
            padding += tokens
        elif not np.array_equal(apart, ours_apart):
            wrapped += tokens
        else:
            same += tokens
    assert same and padding and wrapped  # all three kinds at this size
    ref_flat = ref64.reshape(1, -1, 16)
    assert reference.max_abs(theirs[:, same], ref_flat[:, same]) <= budget
    for kind in (padding, wrapped):
        assert reference.max_abs(theirs[:, kind], ref_flat[:, kind]) > 100 * budget
