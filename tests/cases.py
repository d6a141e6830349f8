"""Named layer configurations and sizes shared by the tests: written once, imported.

A config is keyword arguments of `MultiHeadSelfAttention2D`; the reference
takes the subset `harness.reference_config` picks. Since 0.2.0 an empty config
is standard scaled dot-product attention (linear projections, 1/sqrt(key_dim),
no position term). The Keras 2 YOLOv4-MHSA block (the defaults of 0.1.0) is
`YOLOV4_MHSA`; a variation of it is `yolov4_mhsa(num_heads=2)`, never `{}`.
"""

from mhsa_core.reference import schema


def yolov4_mhsa(**overrides):
    """The Keras 2 YOLOv4-MHSA block's config, with `overrides`."""
    return schema.preset("yolov4_mhsa", **overrides)


YOLOV4_MHSA = yolov4_mhsa()
STANDARD = {}  # the layer's defaults
BOTNET = schema.preset("botnet")  # 4 heads, relative logits, no biases

# timm's and EVA's attention options (issue 19), alone and together: the
# per-head q/k norms, the norm of the merged heads, the output projection,
# EVA's q and v biases without a k bias, the norms' epsilon.
OPTION_CONFIGS = {
    "qk_layer-proj": {"num_heads": 4, "qk_norm": "layer", "output_dense": True},
    "qk_rms-key_dim6": {"num_heads": 4, "key_dim": 6, "qk_norm": "rms"},
    # EVA-02's attention: no k bias, scale_norm (output_norm) before proj.
    "eva": {
        "num_heads": 4,
        "use_key_bias": False,
        "output_norm": "layer",
        "output_dense": True,
    },
    "all-no_bias-eps1e-5-relu-channels_first": {
        "num_heads": 2,
        "activation": "relu",
        "use_bias": False,
        "qk_norm": "layer",
        "output_norm": "layer",
        "output_dense": True,
        "norm_epsilon": 1e-5,
        "data_format": "channels_first",
    },
    "qk_rms-relative-key_bias_only": {
        "num_heads": 2,
        "use_bias": False,
        "use_key_bias": True,
        "qk_norm": "rms",
        "position_encoding": "relative",
    },
}

# name -> (config, input shape): each named configuration at one size, H != W
# (a swapped flattening fails).
CASES = {
    "yolov4_mhsa": (YOLOV4_MHSA, (2, 7, 5, 32)),
    "standard": (STANDARD, (2, 7, 5, 32)),
    "multihead": ({"num_heads": 8}, (2, 5, 7, 64)),
    "key_dim": ({"num_heads": 4, "key_dim": 6}, (2, 6, 5, 32)),  # key_dim != C / heads
    "channels_first": (
        {"num_heads": 8, "data_format": "channels_first"},
        (2, 64, 7, 5),
    ),
    "botnet": (BOTNET, (2, 5, 6, 32)),  # position_size: the input's (make_case)
    "qk_layer-proj": (OPTION_CONFIGS["qk_layer-proj"], (2, 5, 7, 32)),
    "eva": (OPTION_CONFIGS["eva"], (2, 6, 5, 32)),
}

# name -> (config, input shape) of the cases run with `harness.padded_mask`:
# one fully masked item, one padded at the right border and bottom row.
MASKED = {
    "yolov4_mhsa-heads2": (yolov4_mhsa(num_heads=2), (2, 6, 7, 16)),
    "channels_first": (
        {"num_heads": 4, "data_format": "channels_first"},
        (2, 16, 6, 7),
    ),
    # No output projection: the fully masked item's output stays zero.
    "qk_rms-heads4": ({"num_heads": 4, "qk_norm": "rms"}, (2, 6, 7, 16)),
}

# Position encodings at their reference size and others. The learned tables
# belong to REF_SIZE; SIZES adds one larger, one smaller non-square, 1xN, Nx1.
REF_SIZE = (5, 7)
SIZES = [REF_SIZE, (8, 9), (3, 2), (1, 6), (6, 1)]
POSITION_CHANNELS = 32

# name -> config: every encoding other than the YOLOv4-MHSA block's "conv"
# (that is YOLOV4_MHSA), with the defaults and with other settings.
POSITION_CONFIGS = {
    "relative": {"num_heads": 2, "position_encoding": "relative"},
    "relative-relu-heads4-key_dim6-unscaled-pos": {
        "num_heads": 4,
        "key_dim": 6,
        "activation": "relu",
        "scale_position_logits": False,
        "position_encoding": "relative",
    },
    "relative-botnet-channels_first": {**BOTNET, "data_format": "channels_first"},
    "absolute": {"num_heads": 2, "position_encoding": "absolute"},
    "absolute-relu-scale0.5-unscaled-pos": {
        "num_heads": 2,
        "activation": "relu",
        "scale": 0.5,
        "scale_position_logits": False,
        "position_encoding": "absolute",
    },
    "sinusoidal": {"num_heads": 2, "position_encoding": "sinusoidal"},
    "sinusoidal-relu-unscaled-channels_first": {
        "num_heads": 4,
        "activation": "relu",
        "scale": 1.0,
        "data_format": "channels_first",
        "position_encoding": "sinusoidal",
    },
    # The rotary encodings. "rope" with its reference grid at REF_SIZE (EVA's
    # ref_feat_shape): every other size is a rescaled grid.
    "rope": {"num_heads": 2, "position_encoding": "rope", "position_size": REF_SIZE},
    "rope-no_reference_grid": {"num_heads": 4, "position_encoding": "rope"},
    "rope-half-xy-offset1-temperature100-key_dim12-channels_first": {
        "num_heads": 2,
        "key_dim": 12,
        "position_encoding": "rope",
        "position_size": REF_SIZE,
        "rope_layout": "half",
        "rope_grid_indexing": "xy",
        "rope_grid_offset": 1.0,
        "rope_temperature": 100.0,
        "data_format": "channels_first",
    },
    "rope-in_pixels-relu": {
        "num_heads": 2,
        "activation": "relu",
        "position_encoding": "rope",
        "position_size": REF_SIZE,
        "rope_in_pixels": True,
        "rope_max_resolution": 32,
    },
    "rope_mixed": {"num_heads": 2, "position_encoding": "rope_mixed"},
    "rope_mixed-ij-half-unscaled": {
        "num_heads": 4,
        "key_dim": 4,
        "scale": 1.0,
        "position_encoding": "rope_mixed",
        "rope_grid_indexing": "ij",
        "rope_layout": "half",
    },
    # Swin's per-head bias over the whole map (no windows), resized by timm's
    # rule at every other size; timm's convention (bias not scaled).
    "relative_bias": {"num_heads": 2, "position_encoding": "relative_bias"},
    "relative_bias-heads4-unscaled-pos-channels_first": {
        "num_heads": 4,
        "scale_position_logits": False,
        "data_format": "channels_first",
        "position_encoding": "relative_bias",
    },
}
# One config per encoding that has a position term of its own.
ENCODING_CONFIGS = {
    name: POSITION_CONFIGS[name]
    for name in (
        "relative",
        "absolute",
        "sinusoidal",
        "rope",
        "rope_mixed",
        "relative_bias",
    )
}

# Swin's windows: name -> config. Tables (where learned) belong to the window
# (the default position_size). The sizes of WINDOW_SIZES make them pad, shift
# or not (the map fits one window along an axis: no shift there).
SWIN = {
    "num_heads": 2,
    "position_encoding": "relative_bias",
    "scale_position_logits": False,
}
WINDOW_CONFIGS = {
    "swin-window3-shift1": {**SWIN, "window_size": 3, "shift_size": 1},
    "swin-window2x3-shift1x2-heads4": {
        **SWIN,
        "num_heads": 4,
        "window_size": (2, 3),
        "shift_size": (1, 2),
    },
    # Tables of another size than the window: resized to it (timm's rule).
    "swin-window3-table4x2-scaled-channels_first": {
        **SWIN,
        "window_size": 3,
        "shift_size": 2,
        "position_size": (4, 2),
        "scale_position_logits": True,
        "data_format": "channels_first",
    },
    "none-window4-shift2": {"num_heads": 2, "window_size": 4, "shift_size": 2},
    "relative-window3-shift1": {
        "num_heads": 2,
        "position_encoding": "relative",
        "window_size": 3,
        "shift_size": 1,
    },
    "sinusoidal-window3": {
        "num_heads": 2,
        "position_encoding": "sinusoidal",
        "window_size": 3,
    },
}
# Map sizes of the window cases: divisible by 3 (and by 2x3), not (padded),
# smaller than the window along one axis (one window, no shift there), 1x1.
WINDOW_SIZES = [(6, 6), (7, 5), (2, 8), (1, 1)]
