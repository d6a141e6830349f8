"""The native per-framework references (`mhsa_core.natives`) against the NumPy
oracle.

One pytest process runs per Keras backend (KERAS_BACKEND = tensorflow, torch or
jax) and tests only the native reference of that framework, so that no process
imports two of them (TF and torch in one process can segfault). Under the numpy
backend there is no native reference and this file collects no test.

Checks:
- float64 forward equals `reference.mhsa_forward` to `reference.FLOAT64_RTOL`
  (max abs error / max |ref|), over a set of configs: the defaults (standard
  attention), the Keras 2 YOLOv4-MHSA block and variations of it, every
  activation of the reference;
- float32 forward within `reference.float32_budget` of the NumPy reference
  run in float32 (NumPy's BLAS accumulation: a tighter budget than the
  layer's, which starts from sequential accumulation);
- a batch item whose keys are all masked gives exactly zero (and zero gradient);
- float64 gradients of loss = sum(out * L) match central finite differences of
  the reference, on a tiny case, for every input and weight entry (the learned
  position tables included, also at a map size other than their reference
  size);
- timm's and EVA's options (q/k norms, the output norm and projection, no
  key bias, the norms' epsilon), alone and with the encodings and masks;
- the position encodings ("relative", "absolute", "sinusoidal", "rope",
  "rope_mixed", "relative_bias") at the reference size of the learned tables
  and at other map sizes (larger, smaller and non-square, 1xN, Nx1), the
  rotary ones in both layouts, both grid orders, with and without a reference
  grid, in pixels; the rotary frequencies' gradient; Swin's windows
  (shifted, padded, larger than the map) at those sizes too; the native's
  table resize against
  `reference.resize_table` (bit-identical at the reference size) and, on
  TensorFlow, against `tf.image.resize`; its sine-cosine embedding against
  `reference.sinusoidal_embedding`;
- the defaults of the natives' signatures are the reference's;
- mismatched weight dicts (the tables included) and invalid configs raise
  ValueError, with the layer's own message for the arguments they share;
- the fused forms the bench measures (`fused_block`), within the float32
  budget of the reference.

jax float64 needs JAX_ENABLE_X64=1 in the environment (tests/conftest.py sets
it); the native's NumPy helpers also switch 64-bit mode on, scoped, by themselves.
"""

import ast
import dataclasses
import inspect
import re
import sys

import keras
import numpy as np
import pytest

from mhsa_core import MultiHeadSelfAttention2D, natives, reference
from mhsa_core.reference import LAYER_ARGUMENTS, schema
from mhsa_core.reference.forward import ACTIVATIONS

from cases import yolov4_mhsa
from harness import assert_float64_close, magnitude, padded_mask, random_mask

BACKEND = keras.backend.backend()
# Import only the current backend's native: each one imports its framework.
NATIVE = natives.module(BACKEND) if BACKEND in natives.BACKENDS else None


# name -> config. "mask" selects an attention mask (`MASKS`); "use_bias",
# "position_size" and the weight-shape arguments go to `random_weights`; the
# rest is the block's config, passed to both the reference and the native.
# The cases written for the YOLOv4-MHSA block (the defaults of mhsa_core 0.1)
# say so with `yolov4_mhsa(...)`; the others have the defaults, standard attention.
CASES = {
    "default": {},
    "default_heads4_padded": {"num_heads": 4, "key_dim": 6, "mask": "padded"},
    "yolov4_mhsa": yolov4_mhsa(),
    "heads2": yolov4_mhsa(num_heads=2),
    "heads8": yolov4_mhsa(num_heads=8),
    "key_dim": yolov4_mhsa(num_heads=4, key_dim=5),
    "linear_scale_none": yolov4_mhsa(num_heads=2, activation=None, scale=None),
    "position_none": yolov4_mhsa(num_heads=2, position_encoding="none"),
    "no_bias": yolov4_mhsa(num_heads=2, use_bias=False),
    "channels_first": yolov4_mhsa(num_heads=2, data_format="channels_first"),
    "mask_one_item_full": yolov4_mhsa(num_heads=2, mask="one_item_full"),
    "mask_partial": yolov4_mhsa(num_heads=2, mask="partial"),
    "mask_padded": yolov4_mhsa(num_heads=2, mask="padded"),
    "combined": yolov4_mhsa(
        num_heads=4,
        key_dim=3,
        scale=None,
        use_bias=False,
        data_format="channels_first",
        mask="one_item_full",
    ),
    # Every activation of the reference, on the default block.
    **{
        f"activation_{name}": {"num_heads": 2, "activation": name}
        for name in ACTIVATIONS
    },
    # Position encodings. key_dim != C / heads = 32 / heads throughout; the
    # cases without scale_position_logits use a scale != 1 (with scale 1 the
    # two conventions coincide).
    "relative": yolov4_mhsa(num_heads=4, key_dim=6, position_encoding="relative"),
    "relative_unscaled_cf_masked": yolov4_mhsa(
        num_heads=2,
        key_dim=5,
        position_encoding="relative",
        scale=None,
        scale_position_logits=False,
        data_format="channels_first",
        mask="one_item_full",
    ),
    "relative_linear_partial": yolov4_mhsa(
        num_heads=8,
        key_dim=3,
        position_encoding="relative",
        activation=None,
        scale=0.3,
        use_bias=False,
        mask="partial",
    ),
    "relative_default": {"num_heads": 4, "key_dim": 6, "position_encoding": "relative"},
    "absolute": yolov4_mhsa(
        num_heads=2, key_dim=12, position_encoding="absolute", scale=None
    ),
    "absolute_unscaled_partial": yolov4_mhsa(
        num_heads=4,
        key_dim=3,
        position_encoding="absolute",
        scale=0.5,
        scale_position_logits=False,
        use_bias=False,
        mask="partial",
    ),
    "absolute_cf_masked": yolov4_mhsa(
        num_heads=4,
        key_dim=10,
        position_encoding="absolute",
        scale=None,
        data_format="channels_first",
        mask="one_item_full",
    ),
    "sinusoidal": yolov4_mhsa(num_heads=2, key_dim=4, position_encoding="sinusoidal"),
    "sinusoidal_cf_partial": yolov4_mhsa(
        num_heads=4,
        key_dim=5,
        position_encoding="sinusoidal",
        scale=None,
        activation="gelu",
        data_format="channels_first",
        mask="partial",
    ),
    # timm's and EVA's options.
    "qk_layer_output_dense_masked": {
        "num_heads": 4,
        "qk_norm": "layer",
        "output_dense": True,
        "mask": "one_item_full",
    },
    "eva_key_dim6": {
        "num_heads": 4,
        "key_dim": 6,
        "use_key_bias": False,
        "qk_norm": "rms",
        "output_norm": "layer",
        "output_dense": True,
        "norm_epsilon": 1e-5,
    },
    "options_relative_cf_no_bias": yolov4_mhsa(
        num_heads=2,
        position_encoding="relative",
        use_bias=False,
        qk_norm="layer",
        output_norm="layer",
        output_dense=True,
        data_format="channels_first",
        mask="partial",
    ),
    # The rotary encodings: no position_size (no reference grid) unless the
    # case gives one; key_dim a multiple of 4, != C / heads where it can be.
    "rope": {"num_heads": 2, "key_dim": 8, "position_encoding": "rope"},
    "rope_ref_half_xy_offset_cf_masked": {
        "num_heads": 4,
        "key_dim": 12,
        "position_encoding": "rope",
        "position_size": (4, 6),
        "rope_layout": "half",
        "rope_grid_indexing": "xy",
        "rope_grid_offset": 1.0,
        "rope_temperature": 100.0,
        "data_format": "channels_first",
        "mask": "one_item_full",
    },
    "rope_in_pixels_gelu_partial": {
        "num_heads": 2,
        "position_encoding": "rope",
        "position_size": (5, 7),
        "rope_in_pixels": True,
        "rope_max_resolution": 64,
        "activation": "gelu",
        "mask": "partial",
    },
    "rope_mixed": {"num_heads": 2, "key_dim": 8, "position_encoding": "rope_mixed"},
    "rope_mixed_ij_half_cf_padded": {
        "num_heads": 4,
        "position_encoding": "rope_mixed",
        "rope_layout": "half",
        "rope_grid_indexing": "ij",
        "scale": 0.3,
        "data_format": "channels_first",
        "mask": "padded",
    },
    # Swin's per-head bias (tables of the (5, 7) map, resized at the others),
    # then windows: shifted, padded at most sizes, the shift dropped where the
    # map fits one window; the tables of the window, or of another size.
    "relative_bias": {"num_heads": 4, "position_encoding": "relative_bias"},
    "relative_bias_unscaled_cf_masked": {
        "num_heads": 2,
        "key_dim": 5,
        "position_encoding": "relative_bias",
        "scale_position_logits": False,
        "data_format": "channels_first",
        "mask": "one_item_full",
    },
    "swin_window3_shift1_partial": {
        "num_heads": 4,
        "position_encoding": "relative_bias",
        "position_size": (3, 3),
        "window_size": 3,
        "shift_size": 1,
        "scale_position_logits": False,
        "mask": "partial",
    },
    "swin_window2x4_table3x2_cf": {
        "num_heads": 2,
        "position_encoding": "relative_bias",
        "position_size": (3, 2),
        "window_size": (2, 4),
        "shift_size": (1, 3),
        "data_format": "channels_first",
    },
    "relative_window3_shift2": yolov4_mhsa(
        num_heads=2,
        position_encoding="relative",
        position_size=(3, 3),
        window_size=3,
        shift_size=2,
        mask="padded",
    ),
    "rope_window3_shift1_partial": {
        "num_heads": 2,
        "key_dim": 8,
        "position_encoding": "rope",
        "position_size": (4, 6),
        "window_size": 3,
        "shift_size": 1,
        "mask": "partial",
    },
    "none_window4_shift2_masked": {
        "num_heads": 2,
        "window_size": 4,
        "shift_size": 2,
        "mask": "one_item_full",
    },
}

# mask kind -> bool (B, H, W), True = the key may be attended to.
MASKS = {
    "partial": lambda b, h, w, seed: random_mask(b, h, w, seed=seed),
    "one_item_full": lambda b, h, w, seed: random_mask(
        b, h, w, seed=seed, fully_masked_item=True
    ),
    "padded": lambda b, h, w, seed: padded_mask(b, h, w),
}

# B=2, a 5x7 map, C=32 channels.
SHAPE = (2, 5, 7, 32)  # (B, H, W, C)
# Map sizes (H, W) of the position-encoding cases. The learned tables always
# have the reference size (5, 7) of SHAPE's map; the other sizes make the
# natives resize them (up, down, to 1 row / 1 column; (8, 9) is 8/5 and 9/7
# larger, (3, 2) 3/5 and 2/7 smaller).
POSITION_SIZE = SHAPE[1:3]
MAP_SIZES = {
    "ref": POSITION_SIZE,
    "larger": (8, 9),
    "smaller": (3, 2),
    "row": (1, 6),
    "column": (6, 1),
    "single": (1, 1),
}
# The encodings whose result depends on the map size, and windows.
SIZED_ENCODINGS = (
    "relative",
    "absolute",
    "sinusoidal",
    "rope",
    "rope_mixed",
    "relative_bias",
)
_POSITION_CASES = [
    name
    for name, case in CASES.items()
    if case.get("position_encoding") in SIZED_ENCODINGS or "window_size" in case
]
# (case, map size): every case at the reference size, position cases at all.
FORWARD_PARAMS = [
    pytest.param(name, "ref", id=name) for name in CASES if name not in _POSITION_CASES
] + [
    pytest.param(name, size, id=f"{name}-{size}")
    for name in _POSITION_CASES
    for size in MAP_SIZES
]
# The gradient check: B=2 (one item fully masked when masked), 2x3 map, C=4.
TINY_SHAPE = (2, 2, 3, 4)
GRAD_CASES = {
    "default": {"num_heads": 2},
    "yolov4_mhsa": yolov4_mhsa(num_heads=2),
    "key_dim_linear": yolov4_mhsa(
        num_heads=2,
        key_dim=3,
        activation=None,
        scale=None,
        data_format="channels_first",
    ),
    "masked_no_position": yolov4_mhsa(
        num_heads=2, position_encoding="none", use_bias=False, mask="one_item_full"
    ),
    "masked": yolov4_mhsa(num_heads=2, mask="partial"),
    # Learned tables at a reference size other than the 2x3 map: (3, 2)
    # resizes the height tables down and the width tables up; at (2, 3) they
    # are used as they are.
    "relative_resized": yolov4_mhsa(
        num_heads=2,
        position_encoding="relative",
        scale=None,
        position_size=(3, 2),
        mask="partial",
    ),
    "relative_unscaled": yolov4_mhsa(
        num_heads=2,
        key_dim=3,
        position_encoding="relative",
        scale=0.5,
        scale_position_logits=False,
        data_format="channels_first",
        mask="one_item_full",
    ),
    "absolute_resized": yolov4_mhsa(
        num_heads=2,
        key_dim=3,
        position_encoding="absolute",
        scale=0.5,
        scale_position_logits=False,
        position_size=(3, 2),
        activation=None,
    ),
    "absolute": yolov4_mhsa(
        num_heads=2, position_encoding="absolute", use_bias=False, mask="partial"
    ),
    "sinusoidal": yolov4_mhsa(
        num_heads=2, key_dim=3, position_encoding="sinusoidal", scale=None
    ),
    "options_masked": {
        "num_heads": 1,
        "qk_norm": "layer",
        "use_key_bias": False,
        "output_norm": "layer",
        "output_dense": True,
        "mask": "one_item_full",
    },
    "rms_key_dim3_output_dense": {
        "num_heads": 2,
        "key_dim": 3,
        "qk_norm": "rms",
        "output_dense": True,
        "norm_epsilon": 1e-3,
    },
    # Rotary: "rope" with a reference grid of another size; "rope_mixed"'s
    # learned frequencies get their gradient checked too.
    "rope_half_reference_grid": {
        "num_heads": 1,
        "position_encoding": "rope",
        "position_size": (3, 4),
        "rope_layout": "half",
        "mask": "partial",
    },
    "rope_mixed": {
        "num_heads": 2,
        "key_dim": 4,
        "position_encoding": "rope_mixed",
        "activation": "relu",
        "mask": "one_item_full",
    },
    "rope_mixed_ij_half": {
        "num_heads": 1,
        "position_encoding": "rope_mixed",
        "rope_grid_indexing": "ij",
        "rope_layout": "half",
        "data_format": "channels_first",
    },
    # The per-head table resized (3x2 -> 2x3), and 2x2 windows of the 2x3
    # map (shifted along W only, W padded to 4), masked.
    "relative_bias_resized": {
        "num_heads": 2,
        "position_encoding": "relative_bias",
        "position_size": (3, 2),
        "mask": "partial",
    },
    "swin_window2_shift1_masked": {
        "num_heads": 2,
        "position_encoding": "relative_bias",
        "position_size": (2, 2),
        "window_size": 2,
        "shift_size": 1,
        "mask": "one_item_full",
    },
}


def _setup(case, shape, seed=0, position_size=None):
    """(x, weights, mask, config) for a case; x in the case's data_format.

    The learned position tables get the reference size `position_size`, or the
    case's "position_size", or by default the map size of `shape`. A
    reference grid ("rope") is the case's "position_size", if it has one.
    """
    case = dict(case)
    case.pop("kernel_initializer", None)  # a native takes weights, not initializers
    mask_kind = case.pop("mask", None)
    use_bias = case.pop("use_bias", True)
    batch, height, width, channels = shape
    grid = schema.encoding(case.get("position_encoding", "none")).reference_grid
    if grid and "position_size" in case:
        position_size = case["position_size"]
    else:
        position_size = case.pop("position_size", position_size or (height, width))
    x = np.random.default_rng(seed).standard_normal(shape)
    if case.get("data_format") == "channels_first":
        x = np.ascontiguousarray(x.transpose(0, 3, 1, 2))
    # The weight-shape arguments the case gives (but the position_size
    # resolved above); the others keep the defaults.
    shape_args = schema.weight_arguments(
        {k: v for k, v in case.items() if k != "position_size"}
    )
    weights = reference.random_weights(
        channels,
        **shape_args,
        use_bias=use_bias,
        seed=seed + 1,
        position_size=position_size,
    )
    mask = (
        None if mask_kind is None else MASKS[mask_kind](batch, height, width, seed + 2)
    )
    return x, weights, mask, case


def _output_ops(config):
    """Whether an output norm or projection follows the heads (a fully
    masked item then gives their bias terms, not zeros)."""
    return bool(config.get("output_norm") or config.get("output_dense"))


def _sized(size):
    """SHAPE with the map size MAP_SIZES[size]."""
    height, width = MAP_SIZES[size]
    return (SHAPE[0], height, width, SHAPE[3])


def _without(weights, name):
    return {k: v for k, v in weights.items() if k != name}


# id -> (edit of a well-formed YOLOv4-MHSA weight dict, extra call arguments)
MISMATCHED_WEIGHTS = {
    "use_bias_false_with_biases": (lambda w: w, {"use_bias": False}),
    "missing_key_bias": (lambda w: _without(w, "key_bias"), {}),
    "narrow_query_kernel": (
        lambda w: {**w, "query_kernel": w["query_kernel"][:, :2]},
        {},
    ),
    "use_key_bias_false_with_key_bias": (lambda w: w, {"use_key_bias": False}),
    "qk_norm_without_its_weights": (lambda w: w, {"qk_norm": "layer"}),
    "output_dense_without_bias": (
        lambda w: {**w, "output_kernel": np.zeros((4, 4))},
        {"output_dense": True},
    ),
    "rms_with_a_norm_bias": (
        lambda w: {
            **w,
            **{n: np.ones(2) for n in ("query_norm_scale", "key_norm_scale")},
            "query_norm_bias": np.zeros(2),
        },
        {"qk_norm": "rms"},
    ),
}


# Missing, unexpected or wrongly shaped position tables.
# id -> (case, edit of its well-formed weight dict, extra call arguments)
RELATIVE_TINY = yolov4_mhsa(
    num_heads=2, position_encoding="relative", position_size=(3, 2)
)
ABSOLUTE_TINY = yolov4_mhsa(num_heads=2, position_encoding="absolute")
BIAS_TINY = {
    "num_heads": 2,
    "position_encoding": "relative_bias",
    "position_size": (3, 2),
}
MISMATCHED_TABLES = {
    "relative_missing_table": (
        RELATIVE_TINY,
        lambda w: _without(w, "relative_width"),
        {},
    ),
    "relative_extra_absolute_table": (
        RELATIVE_TINY,
        lambda w: {**w, "absolute_height": w["relative_height"]},
        {},
    ),
    "relative_wrong_key_dim": (
        RELATIVE_TINY,
        lambda w: {**w, "relative_height": w["relative_height"][:, :1]},
        {},
    ),
    "relative_even_rows": (
        RELATIVE_TINY,
        lambda w: {**w, "relative_width": w["relative_width"][:2]},
        {},
    ),
    # An explicit position_size must agree with the tables.
    "relative_position_size_disagrees": (
        RELATIVE_TINY,
        lambda w: w,
        {"position_size": (2, 3)},
    ),
    # Tables where the encoding has none.
    "conv_with_relative_tables": (
        yolov4_mhsa(num_heads=2),
        lambda w: {
            **w,
            **{
                name: np.zeros(shape)
                for name, shape in schema.table_shapes(
                    "relative", (3, 2), TINY_SHAPE[-1] // 2
                ).items()
            },
        },
        {},
    ),
    "absolute_wrong_key_dim": (
        ABSOLUTE_TINY,
        lambda w: {**w, "absolute_width": w["absolute_width"][:, :1]},
        {},
    ),
    "absolute_missing_table": (
        ABSOLUTE_TINY,
        lambda w: _without(w, "absolute_height"),
        {},
    ),
    "relative_bias_missing_table": (
        BIAS_TINY,
        lambda w: _without(w, "relative_bias_table"),
        {},
    ),
    "relative_bias_wrong_heads": (
        BIAS_TINY,
        lambda w: {**w, "relative_bias_table": w["relative_bias_table"][..., :1]},
        {},
    ),
    "relative_bias_even_rows": (
        BIAS_TINY,
        lambda w: {**w, "relative_bias_table": w["relative_bias_table"][:2]},
        {},
    ),
    "relative_bias_flat_table": (
        BIAS_TINY,
        lambda w: {**w, "relative_bias_table": w["relative_bias_table"][:, 0]},
        {},
    ),
    "relative_bias_position_size_disagrees": (
        BIAS_TINY,
        lambda w: w,
        {"position_size": (2, 3)},
    ),
}


# id -> (config change of the default block on TINY_SHAPE (C=4), text the
# error names)
INVALID_CONFIGS = {
    "num_heads_not_dividing": ({"num_heads": 3}, "num_heads=3"),
    "num_heads_zero": ({"num_heads": 0}, "num_heads=0"),
    "activation": ({"activation": "softplus"}, "activation='softplus'"),
    "data_format": (
        {"data_format": "channels_middle"},
        "data_format='channels_middle'",
    ),
    "position_encoding": (
        {"position_encoding": "rotary"},
        "position_encoding='rotary'",
    ),
    "position_size_one_axis": (
        {"position_encoding": "absolute", "position_size": (2,)},
        "position_size=(2,)",
    ),
    "position_size_zero": (
        {"position_encoding": "absolute", "position_size": (0, 3)},
        "position_size=(0, 3)",
    ),
    # C=4 in 2 heads: key_dim 2, not a multiple of 4.
    "rope_key_dim": ({"num_heads": 2, "position_encoding": "rope"}, "key_dim=None"),
    "rope_layout": (
        {"position_encoding": "rope", "rope_layout": "diagonal"},
        "rope_layout='diagonal'",
    ),
    "rope_offset_with_pixels": (
        {"position_encoding": "rope", "rope_in_pixels": True, "rope_grid_offset": 1},
        "rope_grid_offset=1",
    ),
    "window_size_zero": ({"window_size": 0}, "window_size=0"),
    "shift_size_not_below_window": (
        {"window_size": 2, "shift_size": 2},
        "shift_size=2",
    ),
    "shift_size_without_window": ({"shift_size": 1}, "shift_size=1"),
    "absolute_in_windows": (
        {"position_encoding": "absolute", "window_size": 2},
        "position_encoding='absolute'",
    ),
}

# The arguments the natives share with the layer, a bad value each: a native's
# message is the layer's, word for word (one table: `reference.arguments`).
SHARED_BAD_ARGUMENTS = {
    "num_heads": 0,
    "key_dim": 1.5,
    "position_encoding": "rotary",
    "position_size": (0, 3),
    "scale_position_logits": "yes",
    "scale": -1.0,
    "data_format": "channels_middle",
    "use_key_bias": "no",
    "qk_norm": "batch",
    "output_norm": "rms",
    "output_dense": None,
    "norm_epsilon": 0.0,
    "rope_temperature": 0.0,
    "rope_layout": "diagonal",
    "rope_grid_indexing": "yx",
    "rope_grid_offset": float("nan"),
    "rope_in_pixels": "yes",
    "rope_max_resolution": -224,
    "window_size": (2, 0),
    "shift_size": -1,
}


class TestNative:
    # No native reference under the numpy backend: collect nothing (not skips).
    __test__ = NATIVE is not None

    def test_imports_its_framework_only(self):
        """A native module imports its own framework, NumPy, the standard
        library and `mhsa_core.reference` / `mhsa_core.natives`: never Keras,
        the layer or another framework. Read from its source, not from
        `sys.modules`: importing TensorFlow imports Keras (and JAX) by itself."""
        imported = set()
        for node in ast.walk(ast.parse(inspect.getsource(NATIVE))):
            if isinstance(node, ast.Import):
                imported |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom):
                imported.add(node.module)
        allowed = {BACKEND, "numpy", *sys.stdlib_module_names}
        ours = ("mhsa_core.reference", "mhsa_core.natives")
        foreign = sorted(
            m for m in imported if m.split(".")[0] not in allowed and m not in ours
        )
        assert not foreign, foreign
        assert BACKEND in {m.split(".")[0] for m in imported}

    def test_cases_cover_every_encoding(self):
        """A new encoding in the schema needs a case here."""
        covered = {case.get("position_encoding", "none") for case in CASES.values()}
        assert covered == set(schema.POSITION_ENCODINGS)
        assert set(SIZED_ENCODINGS) <= covered

    @pytest.mark.parametrize("name, size", FORWARD_PARAMS)
    def test_forward_float64(self, name, size):
        x, weights, mask, config = _setup(
            CASES[name], _sized(size), position_size=POSITION_SIZE
        )
        ref = reference.mhsa_forward(x, weights, attention_mask=mask, **config)
        out = NATIVE.forward(x, weights, attention_mask=mask, dtype="float64", **config)
        assert out.shape == ref.shape
        assert_float64_close(
            out, ref, rtol=reference.FLOAT64_RTOL, what=f"{BACKEND} native float64"
        )
        if mask is not None and not mask[0].any() and not _output_ops(config):
            assert np.all(out[0] == 0), "fully masked item must give exact zeros"

    @pytest.mark.parametrize("name, size", FORWARD_PARAMS)
    def test_forward_float32(self, name, size):
        x, weights, mask, config = _setup(
            CASES[name], _sized(size), position_size=POSITION_SIZE
        )
        ref64 = reference.mhsa_forward(x, weights, attention_mask=mask, **config)
        ref32 = reference.mhsa_forward(
            x, weights, attention_mask=mask, dtype=np.float32, **config
        )
        ref32_err = magnitude(ref32.astype(np.float64) - ref64)
        budget = reference.float32_budget(ref32, ref64)
        out = NATIVE.forward(x, weights, attention_mask=mask, dtype="float32", **config)
        assert out.dtype == np.float32
        err = magnitude(out.astype(np.float64) - ref64)
        assert err <= budget, (
            f"{BACKEND} native float32: error {err:.3e}, numpy float32 reference "
            f"error {ref32_err:.3e} (ratio {err / max(ref32_err, 1e-300):.2f}), "
            f"budget {budget:.3e}"
        )
        if mask is not None and not mask[0].any() and not _output_ops(config):
            assert np.all(out[0] == 0), "fully masked item must give exact zeros"

    @pytest.mark.parametrize("name", list(GRAD_CASES))
    def test_value_and_grad_float64(self, name):
        x, weights, mask, config = _setup(GRAD_CASES[name], TINY_SHAPE, seed=3)
        out_shape = reference.mhsa_forward(
            x, weights, attention_mask=mask, **config
        ).shape
        loss_weights = np.cos(np.arange(int(np.prod(out_shape)))).reshape(out_shape)

        def ref_loss(x_, weights_):
            out = reference.mhsa_forward(x_, weights_, attention_mask=mask, **config)
            return float(np.sum(out * loss_weights))

        loss, grad_x, grad_w = NATIVE.value_and_grad(
            x, weights, loss_weights, attention_mask=mask, dtype="float64", **config
        )
        ref = ref_loss(x, weights)
        assert np.asarray(loss).dtype == np.float64
        assert abs(float(loss) - ref) <= 1e-12 * max(1.0, abs(ref)), (float(loss), ref)
        assert set(grad_w) == set(weights)

        def central_difference(array, rebuild):
            """d loss / d array, entry by entry, with step 1e-6."""
            step = 1e-6
            grad = np.zeros_like(array)
            for index in np.ndindex(array.shape):
                plus, minus = array.copy(), array.copy()
                plus[index] += step
                minus[index] -= step
                grad[index] = (ref_loss(*rebuild(plus)) - ref_loss(*rebuild(minus))) / (
                    2 * step
                )
            return grad

        checks = {"x": (grad_x, central_difference(x, lambda a: (a, weights)))}
        for key, value in weights.items():
            checks[key] = (
                grad_w[key],
                central_difference(value, lambda a, key=key: (x, {**weights, key: a})),
            )
        # The finite-difference error is about the same for every entry (loss
        # rounding / step), whatever the entry's size, so the tolerance is
        # relative to the largest gradient entry overall, not per array: some
        # exact gradients are 0 (see below) and their FD is pure rounding noise.
        scale = max(magnitude(fd) for _, fd in checks.values())
        for key, (grad, fd) in checks.items():
            assert grad.shape == fd.shape and grad.dtype == np.float64, key
            assert np.all(np.isfinite(grad)), key
            err = magnitude(grad - fd)
            assert err <= 1e-6 * scale, (
                f"{BACKEND} d loss / d {key}: max error {err:.3e}, "
                f"max |fd| {magnitude(fd):.3e}, largest gradient entry {scale:.3e}"
            )

        rotated = schema.encoding(config.get("position_encoding", "none")).stage
        if (
            config.get("activation") is None
            and config.get("qk_norm") is None
            and "key_bias" in weights
            and rotated != "qk"
        ):
            # With linear k, the key bias adds q . b_k to a whole row of logits:
            # the softmax ignores it, its exact gradient is zero. (Not under a
            # k norm, which is not linear, nor with a rotation: key j's bias is
            # turned by j's angles, q_i . R_j b_k.)
            assert magnitude(grad_w["key_bias"]) <= 1e-12 * scale

        if mask is not None and not mask[0].any():
            assert np.all(grad_x[0] == 0), "fully masked item must get zero gradient"

    def test_defaults_follow_the_reference(self):
        """The natives' signatures default to the reference's config (the layer's)."""
        entry = NATIVE.apply if BACKEND == "jax" else NATIVE.NativeMHSA2D
        native = inspect.signature(entry).parameters
        ours = inspect.signature(reference.mhsa_forward).parameters
        shared = set(LAYER_ARGUMENTS)
        assert shared <= set(native)
        for name in shared:
            assert native[name].default == ours[name].default, name

    @pytest.mark.parametrize(
        "edit, extra", MISMATCHED_WEIGHTS.values(), ids=MISMATCHED_WEIGHTS.keys()
    )
    def test_rejects_mismatched_weights(self, edit, extra):
        x, weights, _, config = _setup(yolov4_mhsa(num_heads=2), TINY_SHAPE)
        NATIVE.forward(x, weights, **config)  # the well-formed dict runs
        with pytest.raises(ValueError):
            NATIVE.forward(x, edit(weights), **config, **extra)

    @pytest.mark.parametrize(
        "case, edit, extra", MISMATCHED_TABLES.values(), ids=MISMATCHED_TABLES.keys()
    )
    def test_rejects_mismatched_tables(self, case, edit, extra):
        x, weights, _, config = _setup(case, TINY_SHAPE)
        NATIVE.forward(x, weights, **config)  # the well-formed dict runs
        with pytest.raises(ValueError):
            NATIVE.forward(x, edit(weights), **config, **extra)

    @pytest.mark.parametrize(
        "change, message", INVALID_CONFIGS.values(), ids=INVALID_CONFIGS.keys()
    )
    def test_rejects_invalid_config(self, change, message):
        x, weights, _, _ = _setup({"position_encoding": "absolute"}, TINY_SHAPE)
        if change.get("position_encoding") != "absolute":
            weights = {
                k: v
                for k, v in weights.items()
                if k not in schema.table_names("absolute")
            }
        with pytest.raises(ValueError, match=re.escape(message)):
            NATIVE.forward(x, weights, **change)

    @pytest.mark.parametrize(
        "argument, value",
        SHARED_BAD_ARGUMENTS.items(),
        ids=[f"{k}={v!r}" for k, v in SHARED_BAD_ARGUMENTS.items()],
    )
    def test_invalid_argument_gets_the_layers_message(self, argument, value):
        with pytest.raises(ValueError) as layer_error:
            MultiHeadSelfAttention2D(**{argument: value})
        x, weights, _, _ = _setup({}, TINY_SHAPE)
        with pytest.raises(ValueError) as native_error:
            NATIVE.forward(x, weights, **{argument: value})
        assert str(native_error.value) == str(layer_error.value)
        assert f"Received: {argument}={value!r}" in str(native_error.value)

    def test_channels_not_divisible_by_heads_gets_the_layers_message(self):
        with pytest.raises(ValueError) as layer_error:
            MultiHeadSelfAttention2D(num_heads=3).build(TINY_SHAPE)
        x, weights, _, _ = _setup({}, TINY_SHAPE)
        with pytest.raises(ValueError) as native_error:
            NATIVE.forward(x, weights, num_heads=3)
        assert str(native_error.value) == str(layer_error.value)

    def test_rejects_sinusoidal_channels(self):
        """The sine-cosine embedding needs C % 4 == 0, as the reference."""
        x, weights, _, config = _setup(
            {"num_heads": 2, "position_encoding": "sinusoidal"}, (2, 2, 3, 6)
        )
        with pytest.raises(ValueError):
            reference.mhsa_forward(x, weights, **config)
        with pytest.raises(ValueError):
            NATIVE.forward(x, weights, **config)
        with pytest.raises(ValueError):
            NATIVE.sinusoidal_embedding(2, 3, 6)


# Table resizes of the position tests: rows of the reference table -> rows at
# the map size, both directions, to and from 1 row.
_TABLE_ROWS = (1, 2, 3, 5, 9, 13, 17)
RESIZES = [
    pytest.param(rows, length, id=f"{rows}to{length}")
    for rows in _TABLE_ROWS
    for length in (1, 2, 3, 4, 5, 7, 9, 13, 15, 17, 25, 33)
]


class TestNativePositionPieces:
    """The natives' table resize and sine-cosine embedding on their own."""

    __test__ = NATIVE is not None

    @pytest.mark.parametrize("dtype", ["float64", "float32"])
    @pytest.mark.parametrize("rows", _TABLE_ROWS)
    def test_resize_identity_at_reference_size(self, rows, dtype):
        """At the reference size the tables come back bit-identical."""
        table = np.random.default_rng(rows).standard_normal((rows, 6)).astype(dtype)
        out = NATIVE.resize_table(table, rows, dtype)
        assert out.dtype == np.dtype(dtype)
        assert np.array_equal(out, table), f"{BACKEND} resize {rows} -> {rows} rows"

    @pytest.mark.parametrize("rows, length", RESIZES)
    def test_resize_float64(self, rows, length):
        """The half-pixel rule of `reference.resize_table`, to float64 rounding.

        Measured: at most 1.3e-15 relative on every backend; any other rule
        (align_corners, antialiasing when shrinking) misses by 1e-2 or more.
        """
        table = np.random.default_rng((1, rows, length)).standard_normal((rows, 6))
        ref = reference.resize_table(table, length)
        out = NATIVE.resize_table(table, length, "float64")
        assert out.dtype == np.float64 and out.shape == (length, 6)
        err = magnitude(out - ref) / magnitude(table)
        assert err <= 1e-13, (
            f"{BACKEND} resize {rows} -> {length}: rel. error {err:.2e}"
        )

    @pytest.mark.parametrize("rows, length", RESIZES)
    def test_resize_float32(self, rows, length):
        """float32 resize within the forward's budget rule: 2x the error of the
        reference run in float32, plus 1e-6 of the table's scale."""
        table = np.random.default_rng((2, rows, length)).standard_normal((rows, 6))
        ref64 = reference.resize_table(table, length)
        ref32 = reference.resize_table(table, length, np.float32)
        budget = 2 * magnitude(ref32 - ref64) + 1e-6 * magnitude(table)
        out = NATIVE.resize_table(table, length, "float32")
        assert out.dtype == np.float32
        err = magnitude(out.astype(np.float64) - ref64)
        assert err <= budget, (
            f"{BACKEND} resize {rows} -> {length}: error {err:.2e}, budget {budget:.2e}"
        )

    if BACKEND == "tensorflow":  # (torch and JAX resize with that op itself)

        @pytest.mark.parametrize("rows, length", RESIZES)
        def test_resize_matches_tf_image_resize(self, rows, length):
            """The TF native resizes by its own interpolation matrix, in the run's
            dtype, because `tf.image.resize` always returns float32 (and computes
            its source positions and weights in float32). That op,
            `method="bilinear", antialias=False` on the table seen as an (L, 1)
            image of d channels, follows the same half-pixel rule: it is within
            the float32 budget of `reference.resize_table` (measured: at most
            1.1e-6 relative; align_corners, the legacy non-half-pixel rule or
            antialiasing when shrinking miss by 4e-2 or more, except where they
            coincide) and bit-identical at the reference size."""
            import tensorflow as tf

            table = np.random.default_rng((3, rows, length)).standard_normal((rows, 6))
            image = tf.image.resize(
                tf.constant(table, tf.float64)[:, None, :],
                (length, 1),
                method="bilinear",
                antialias=False,
            )
            assert image.dtype == tf.float32  # whatever the input's dtype
            resized = image[:, 0, :].numpy()
            ref64 = reference.resize_table(table, length)
            ref32 = reference.resize_table(table, length, np.float32)
            budget = 2 * magnitude(ref32 - ref64) + 1e-6 * magnitude(table)
            err = magnitude(resized.astype(np.float64) - ref64)
            assert err <= budget, (
                f"tf.image.resize {rows} -> {length}: error "
                f"{err:.2e}, budget {budget:.2e}"
            )
            # The native's float32 resize against the op: within the same budget.
            native = NATIVE.resize_table(table, length, "float32")
            assert magnitude(native.astype(np.float64) - resized) <= budget
            if rows == length:
                assert np.array_equal(resized, table.astype(np.float32))

    @pytest.mark.parametrize("channels", [4, 32, 12])
    @pytest.mark.parametrize(
        "height, width",
        [*MAP_SIZES.values(), (1, 1), (3, 40)],
        ids=[*MAP_SIZES, "one", "wide"],
    )
    def test_sinusoidal_embedding(self, height, width, channels):
        ref64 = reference.sinusoidal_embedding(height, width, channels)
        ref32 = reference.sinusoidal_embedding(height, width, channels, np.float32)
        out64 = NATIVE.sinusoidal_embedding(height, width, channels, "float64")
        out32 = NATIVE.sinusoidal_embedding(height, width, channels, "float32")
        assert out64.dtype == np.float64 and out32.dtype == np.float32
        assert out64.shape == out32.shape == ref64.shape
        assert magnitude(out64 - ref64) <= 1e-14 * max(height, width)
        assert magnitude(out32.astype(np.float64) - ref64) <= reference.float32_budget(
            ref32, ref64
        )


@dataclasses.dataclass(frozen=True)
class _BenchShape:
    """What `fused_block` reads of a bench config (`BenchConfig`'s attributes)."""

    height: int
    width: int
    channels: int
    num_heads: int
    position_encoding: str
    window_size: int = 0
    shift_size: int = 0

    @property
    def tokens(self):
        return self.height * self.width

    @property
    def head_dim(self):
        return self.channels // self.num_heads


# The fused forms carry the bench's encodings only ("none", "relative",
# "rope", "relative_bias" in shifted windows that divide the map), at the
# tables' reference size; 4x5 and 6x9 are not square, so a swapped axis shows.
FUSED_SHAPES = {
    **{name: _BenchShape(4, 5, 16, 2, name) for name in ("none", "relative", "rope")},
    "relative_bias": _BenchShape(6, 9, 16, 2, "relative_bias", 3, 1),
}


def _run_fused(shape, weights, x):
    """`fused_block`'s output on NumPy `x`, as NumPy, in the backend's idiom."""
    call, params = NATIVE.fused_block(shape, weights)
    if BACKEND == "jax":
        return np.asarray(call(params, x))
    if BACKEND == "torch":
        import torch

        with torch.no_grad():
            return call(torch.from_numpy(x)).numpy()
    return call(x).numpy()


class TestFusedBlock:
    """The fused form the bench measures (`natives.<backend>.fused_block`)
    against the float64 reference, within the float32 budget the bench's own
    check applies (`reference.error_budget`)."""

    __test__ = NATIVE is not None

    def test_shapes_cover_the_fused_encodings(self):
        assert set(FUSED_SHAPES) == set(natives._common.FUSED_ENCODINGS)

    @pytest.mark.parametrize("name", list(FUSED_SHAPES))
    def test_fused_block_within_the_float32_budget(self, name):
        shape = FUSED_SHAPES[name]
        size = (shape.height, shape.width)
        window = (shape.window_size,) * 2
        weights = reference.random_weights(
            shape.channels,
            shape.num_heads,
            position_encoding=name,
            seed=4,
            dtype=np.float32,
            position_size={"relative": size, "relative_bias": window}.get(name),
        )
        x = np.random.default_rng(5).standard_normal((2, *size, shape.channels))
        x = x.astype(np.float32)
        config = {"num_heads": shape.num_heads, "position_encoding": name}
        if shape.window_size:  # timm's Swin: the bias is not scaled
            config.update(
                window_size=shape.window_size,
                shift_size=shape.shift_size,
                scale_position_logits=False,
            )
        ref64, budget, _ = reference.error_budget(x, weights, **config)
        out = _run_fused(shape, weights, x)
        assert out.dtype == np.float32 and out.shape == x.shape
        error = magnitude(out.astype(np.float64) - ref64)
        assert error <= budget, f"{BACKEND} fused {name}: {error:.2e} > {budget:.2e}"

    def test_fused_block_rejects_other_encodings(self):
        with pytest.raises(ValueError, match="position_encoding='absolute'"):
            NATIVE.fused_block(_BenchShape(4, 5, 16, 2, "absolute"), {})
        with pytest.raises(ValueError, match="window_size=0"):
            NATIVE.fused_block(_BenchShape(4, 5, 16, 2, "relative_bias"), {})
        with pytest.raises(ValueError, match="window_size=3"):
            NATIVE.fused_block(_BenchShape(4, 5, 16, 2, "relative_bias", 3), {})


# name -> config of the prefix-token cases (`_setup`'s form), each with T
# prefix tokens: the rotary encodings skip them, the tokens encodings add
# their term to the map only, the options act on them too; a fully masked
# item still attends to them.
PREFIX_CASES = {
    "none-masked": {"num_heads": 4, "mask": "one_item_full"},
    "rope-qk_norm-masked": {
        "num_heads": 4,
        "position_encoding": "rope",
        "qk_norm": "layer",
        "mask": "padded",
    },
    "rope_mixed-half": {
        "num_heads": 2,
        "position_encoding": "rope_mixed",
        "rope_layout": "half",
    },
    "sinusoidal-eva-channels_first": {
        "num_heads": 4,
        "position_encoding": "sinusoidal",
        "use_key_bias": False,
        "output_norm": "layer",
        "output_dense": True,
        "data_format": "channels_first",
        "mask": "one_item_full",
    },
    "conv": {"num_heads": 1, "position_encoding": "conv"},
}
PREFIX_T = 3


class TestNativePrefixTokens:
    __test__ = NATIVE is not None

    @pytest.mark.parametrize("dtype", ["float64", "float32"])
    @pytest.mark.parametrize("name", list(PREFIX_CASES))
    def test_forward(self, name, dtype):
        """(out, prefix_out) against the reference: float64 to FLOAT64_RTOL,
        float32 within the budget of the reference's own float32 run."""
        x, weights, mask, config = _setup(PREFIX_CASES[name], SHAPE)
        prefix = np.random.default_rng(9).standard_normal(
            (SHAPE[0], PREFIX_T, SHAPE[3])
        )
        kwargs = dict(attention_mask=mask, prefix_tokens=prefix, **config)
        ref64 = np.concatenate(
            [r.ravel() for r in reference.mhsa_forward(x, weights, **kwargs)]
        )
        out = NATIVE.forward(x, weights, dtype=dtype, **kwargs)
        assert out[1].shape == (SHAPE[0], PREFIX_T, SHAPE[3])
        got = np.concatenate([o.astype(np.float64).ravel() for o in out])
        if dtype == "float64":
            assert_float64_close(got, ref64, rtol=reference.FLOAT64_RTOL)
        else:
            ref32 = reference.mhsa_forward(x, weights, dtype=np.float32, **kwargs)
            ref32 = np.concatenate([r.ravel() for r in ref32])
            budget = reference.float32_budget(ref32, ref64)
            assert reference.max_abs(got, ref64) <= budget

    @pytest.mark.parametrize(
        "config, parts",
        [
            ({"position_encoding": "relative"}, ["prefix_tokens", "'relative'"]),
            ({"window_size": 2}, ["prefix_tokens", "window_size"]),
        ],
        ids=["relative", "windows"],
    )
    def test_refusals_are_the_layers(self, config, parts):
        x, weights, _, config = _setup(config, SHAPE)
        prefix = np.zeros((SHAPE[0], 1, SHAPE[3]))
        with pytest.raises(ValueError, match="(?s)" + ".*".join(map(re.escape, parts))):
            NATIVE.forward(x, weights, prefix_tokens=prefix, **config)


# Keys and values from another map than the queries': kv_reduction and a
# context. id -> (config, input shape, context shape or None, key mask).
KV_CASES = {
    "r2": ({"kv_reduction": 2}, (2, 4, 5, 16), None, False),
    "r3_rope_ref_grid": (
        {"kv_reduction": 3, "position_encoding": "rope", "position_size": (8, 8)},
        (2, 7, 6, 16),
        None,
        False,
    ),
    "pool3_7x9": (
        {"kv_reduction": "pool", "kv_pool_size": 3},
        (2, 7, 9, 16),
        None,
        False,
    ),
    "cross_rope_mixed_masked": (
        {"position_encoding": "rope_mixed"},
        (2, 4, 5, 16),
        (2, 3, 2, 8),
        True,
    ),
    "cross_rope_in_pixels": (
        {"position_encoding": "rope", "rope_in_pixels": True},
        (2, 4, 5, 16),
        (2, 6, 3, 8),
        False,
    ),
    "cross_pool_channels_first": (
        {
            "kv_reduction": "pool",
            "kv_pool_size": (2, 3),
            "data_format": "channels_first",
        },
        (2, 16, 4, 5),
        (2, 8, 7, 9),
        False,
    ),
    "cross_relative_same_grid": (
        {"position_encoding": "relative", "position_size": (4, 5)},
        (2, 4, 5, 16),
        (2, 4, 5, 8),
        True,
    ),
}


class TestNativeKeysOfAnotherMap:
    __test__ = NATIVE is not None

    @pytest.mark.parametrize("dtype", ["float64", "float32"])
    @pytest.mark.parametrize("name", list(KV_CASES))
    def test_matches_reference(self, name, dtype):
        """The native's reduction (its framework's conv, pool and LayerNorm) and
        cross-attention against the reference: float64 to FLOAT64_RTOL, float32
        within the budget."""
        config, shape, context_shape, masked = KV_CASES[name]
        config = {**config, "num_heads": 2}
        rng = np.random.default_rng(0)
        x = rng.standard_normal(shape)
        context = mask = None
        first = config.get("data_format") == "channels_first"
        if context_shape is not None:
            context = rng.standard_normal(context_shape)
            config["context_channels"] = context_shape[1 if first else -1]
            if masked:
                grid = context_shape[2:] if first else context_shape[1:3]
                mask = rng.random((shape[0], *grid)) < 0.6
                mask[:, 0, 0] = True
                mask[0] = False
        channels = shape[1 if first else -1]
        weights = reference.random_weights(
            channels, **schema.weight_arguments(config), seed=1
        )
        kwargs = {k: v for k, v in config.items() if k != "context_channels"}
        expected = reference.mhsa_forward(
            x, weights, context=context, attention_mask=mask, **kwargs
        )
        if dtype == "float64":
            out = NATIVE.forward(
                x,
                weights,
                attention_mask=mask,
                dtype="float64",
                context=context,
                **kwargs,
            )
            assert_float64_close(out, expected, rtol=reference.FLOAT64_RTOL)
            return
        x32 = x.astype(np.float32)
        c32 = None if context is None else context.astype(np.float32)
        w32 = {k: v.astype(np.float32) for k, v in weights.items()}
        out = NATIVE.forward(
            x32, w32, attention_mask=mask, dtype="float32", context=c32, **kwargs
        )
        ref64, budget, _ = reference.error_budget(
            x32, w32, context=c32, attention_mask=mask, **kwargs
        )
        assert magnitude(out.astype(np.float64) - ref64) <= budget

    @pytest.mark.parametrize(
        "name", ["r2", "pool3_7x9", "cross_rope_mixed_masked"], ids=str
    )
    def test_gradients_match_finite_differences(self, name):
        """float64 gradients (x and every weight, the reduction's included)
        against central differences of the reference, a few entries each."""
        config, shape, context_shape, masked = KV_CASES[name]
        config = {**config, "num_heads": 2}
        rng = np.random.default_rng(0)
        x = rng.standard_normal(shape)
        context = mask = None
        if context_shape is not None:
            context = rng.standard_normal(context_shape)
            config["context_channels"] = context_shape[-1]
            if masked:
                mask = rng.random((shape[0], *context_shape[1:3])) < 0.6
                mask[:, 0, 0] = True
        weights = reference.random_weights(
            shape[-1], **schema.weight_arguments(config), seed=1
        )
        kwargs = {k: v for k, v in config.items() if k != "context_channels"}
        loss_weights = rng.standard_normal(shape)

        def loss(x_, w_):
            out = reference.mhsa_forward(
                x_, w_, context=context, attention_mask=mask, **kwargs
            )
            return float(np.sum(out * loss_weights))

        _, grad_x, grad_w = NATIVE.value_and_grad(
            x,
            weights,
            loss_weights,
            attention_mask=mask,
            dtype="float64",
            context=context,
            **kwargs,
        )
        assert set(grad_w) == set(weights)
        eps = 1e-6
        picks = np.random.default_rng(1)
        for what, array, grad in [("x", x, grad_x)] + [
            (n, weights[n], grad_w[n]) for n in weights
        ]:
            for index in picks.integers(0, array.size, size=2):
                plus, minus = array.copy().reshape(-1), array.copy().reshape(-1)
                plus[index] += eps
                minus[index] -= eps
                plus, minus = plus.reshape(array.shape), minus.reshape(array.shape)
                if what == "x":
                    numeric = (loss(plus, weights) - loss(minus, weights)) / (2 * eps)
                else:
                    numeric = (
                        loss(x, {**weights, what: plus})
                        - loss(x, {**weights, what: minus})
                    ) / (2 * eps)
                analytic = np.asarray(grad).reshape(-1)[index]
                assert abs(analytic - numeric) <= 1e-5 * max(1.0, abs(numeric)), what
