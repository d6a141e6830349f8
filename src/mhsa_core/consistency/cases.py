"""What the matrix runs: cases of our layer and of users' saved models.

A `Case` is one model (our layer with a config and injected weights, or a
`.keras` file) with one or more input variants (e.g. two spatial sizes through
one model) and the worker tasks to run on it.

Layer configs are spelled out in full (`EXPLICIT_KEYS`): the layer's defaults
changed once (standard attention since 0.2; the Keras 2 YOLOv4-MHSA block is
now `schema.PRESETS["yolov4_mhsa"]`), and a case must not silently change
meaning with them.

Imports NumPy and `mhsa_core.reference` only (no framework).
"""

import dataclasses
import json
import zipfile

import numpy as np

from mhsa_core.consistency import protocol
from mhsa_core.reference import schema

__all__ = [
    "Case",
    "EXPLICIT_KEYS",
    "layer_case",
    "default_cases",
    "extended_cases",
    "ModelFileError",
    "read_model_config",
    "check_safe",
    "generate_inputs",
    "model_case",
    "quantization_of",
    "DEFAULT_SIZE",
    "VARIABLE_SIZES",
    "DEFAULT_BATCH",
]

# A layer case's config must state these: the arguments whose defaults
# changed, and those that decide the weights.
EXPLICIT_KEYS = (
    "num_heads",
    "activation",
    "position_encoding",
    "scale",
    "use_bias",
    "kernel_initializer",
)
# The layer's defaults (standard scaled dot-product attention) with two
# heads, every `EXPLICIT_KEYS` argument spelled out.
STANDARD = {
    "num_heads": 2,
    "key_dim": None,
    "activation": None,
    "position_encoding": "none",
    "scale": None,
    "use_bias": True,
    "kernel_initializer": "glorot_uniform",
}
DEFAULT_SIZE = 8  # a None spatial/feature dimension of a user model's input
DEFAULT_BATCH = 2  # a None batch dimension


@dataclasses.dataclass
class Case:
    """One thing to run on every backend.

    Attributes:
        name: Unique, short (used in file names and reports).
        config: `MultiHeadSelfAttention2D` arguments (a layer case), or None
            for a model case.
        inputs: one dict of NumPy arrays, or a list of them (variants, e.g.
            two spatial sizes through one model). Layer cases: {"x": ...,
            optionally "context", "prefix_tokens", "attention_mask": ...}
            (the layer's call arguments). Model cases: {input name or
            "input_k": array}, or [] for inputs the workers make from the
            loaded model (`model_case`).
        weights: the canonical weight dict (layer cases only).
        model_path: a `.keras` file (model cases only).
        tasks: worker tasks: of `protocol.ALL_TASKS`, and of the opt-in
            features the case asks for.
        dtype: the layer's dtype policy (layer cases).
        features: {name: options} of the opt-in features the case asks for
            (`features.FEATURES`, each adds its tasks with `Feature.apply`);
            the worker gets the options with the case.
        quantization: the Keras quantization modes in the model ("int8",
            "int4", "int4+int8", ...; `quantization_of`), or None. A layer
            case is quantized in the workers after its weights are set (the
            same integers on every backend: the kernels are quantized in
            NumPy). Judged against the float64 twins (the same integers and
            scales, the quantized arithmetic in float64), not the NumPy
            reference, with one activation step of slack where an int8
            activation quantizer runs (`budgets.quantization_steps`).
    """

    name: str
    config: dict | None
    inputs: dict | list
    weights: dict | None = None
    model_path: str | None = None
    tasks: tuple = (protocol.FORWARD,)
    dtype: str = "float32"
    features: dict = dataclasses.field(default_factory=dict)
    quantization: str | None = None

    @property
    def variants(self):
        return self.inputs if isinstance(self.inputs, list) else [self.inputs]

    @property
    def kind(self):
        """ "layer" (our layer, a NumPy oracle exists) or "model" (a user's file)."""
        return "layer" if self.config is not None else "model"


def _check_explicit(name, config):
    missing = [k for k in EXPLICIT_KEYS if k not in config]
    if missing:
        raise ValueError(
            f"A layer case states every argument whose default matters; case {name!r} "
            f"lacks {missing} (start from `schema.preset(...)`). "
            f"Received: config={config}"
        )


def layer_case(
    name,
    config,
    shapes,
    *,
    seed,
    tasks=protocol.ALL_TASKS,
    dtype="float32",
    mask=False,
    context=None,
    prefix_tokens=0,
    quantize=None,
):
    """A case of `MultiHeadSelfAttention2D(**config)` with NumPy-drawn weights.

    Args:
        name: the case's name.
        config: every `EXPLICIT_KEYS` argument, and `position_size` for a
            learned encoding.
        shapes: one input shape per variant, in the config's data format.
        seed: inputs from `seed`, weights from `seed + 1`.
        tasks: the worker tasks (`protocol.ALL_TASKS`: what the checks need).
        dtype: the layer's dtype policy; the inputs are float64 for "float64",
            float32 otherwise.
        mask: also pass an attention mask on the keys' map (the context's
            with `context`): item 0 fully masked (zeros, never NaN), item 1
            padded on the right.
        context: None, or one context map shape per variant (cross-attention,
            in the config's data format): keys and values from it.
        prefix_tokens: T > 0: T class/register tokens (B, T, C) per variant.
        quantize: None, or a mode of `model.quantize` ("int8", "int4"): the
            workers quantize the layer after setting its weights.

    Returns:
        A `Case` whose weights are float32-representable (stored as float64),
        so that its float32 and float64 runs start from equal weights.
    """
    _check_explicit(name, config)
    data_format = config.get("data_format", "channels_last")
    rng = np.random.default_rng(seed)
    float_dtype = np.float64 if dtype == "float64" else np.float32

    def spatial(shape):  # (B, H, W) of a map shape
        if data_format == "channels_first":
            return shape[0], shape[2], shape[3]
        return tuple(shape[:3])

    def channels_of(shape):
        return shape[1] if data_format == "channels_first" else shape[-1]

    variants = []
    for v, shape in enumerate(shapes):
        variant = {"x": rng.standard_normal(shape).astype(float_dtype)}
        keys_shape = shape
        if context is not None:
            keys_shape = context[v]
            variant["context"] = rng.standard_normal(keys_shape).astype(float_dtype)
        if prefix_tokens:
            variant["prefix_tokens"] = rng.standard_normal(
                (shape[0], prefix_tokens, channels_of(shape))
            ).astype(float_dtype)
        if mask:
            b, h, w = spatial(keys_shape)
            m = np.ones((b, h, w), dtype=bool)
            m[0] = False  # an item with every key masked: zeros, never NaN
            if b > 1:
                m[1, :, -2:] = False  # padding on the right
            variant["attention_mask"] = m
        variants.append(variant)
    weight_arguments = schema.weight_arguments(config)
    if context is not None and config.get("context_channels") is None:
        weight_arguments["context_channels"] = channels_of(context[0])
    weights = schema.random_weights(
        channels_of(shapes[0]), **weight_arguments, seed=seed + 1, dtype=np.float32
    )
    weights = {k: v.astype(np.float64) for k, v in weights.items()}
    if quantize is not None and dtype == "float64":
        raise ValueError(
            "A quantized case runs in float32 (its float64 run is the twin of "
            f"the quantized model). Received: quantize={quantize!r}, dtype={dtype!r}"
        )
    return Case(
        name,
        dict(config),
        variants,
        weights=weights,
        tasks=tuple(tasks),
        dtype=dtype,
        quantization=quantize,
    )


def default_cases():
    """The cases `mhsa-core matrix` runs with no arguments."""
    yolov4_mhsa = schema.preset("yolov4_mhsa")
    return [
        layer_case("yolov4_mhsa", yolov4_mhsa, [(2, 25, 25, 512)], seed=0),
        layer_case(
            "multihead",
            {**yolov4_mhsa, "num_heads": 8, "data_format": "channels_first"},
            [(2, 64, 7, 5)],
            seed=10,
        ),
        layer_case(
            "masked",
            {**yolov4_mhsa, "num_heads": 2},
            [(2, 6, 7, 32)],
            seed=20,
            mask=True,
        ),
        # MultiHeadSelfAttention2D.botnet(num_heads=4, position_size=(6, 6)): relative
        # tables learned for 6x6, run at 6x6 and at 4x9 (resized in the graph).
        layer_case(
            "botnet",
            schema.preset("botnet", num_heads=4, position_size=(6, 6)),
            [(2, 6, 6, 32), (1, 4, 9, 32)],
            seed=70,
        ),
    ] + [
        *_path_cases(),
        *_option_cases(),
        *(c for c in _position_layer_cases() if c.name in DEMO_POSITION_CASES),
        *_beyond_one_map_cases(),
        *_quantized_cases(("int8",)),
    ]


def _beyond_one_map_cases():
    """Issue 20's shapes of attention, small: PVT v2's reduced keys and
    values (sr_ratio 2, timm's LayerNorm epsilon, at a divisible and a
    non-divisible size), EVA with a class token and two register tokens
    (rope on the patches only), and cross-attention to a context map of
    another grid and channel count, masked (item 0 fully: zeros)."""
    standard = {**STANDARD, "output_dense": True}
    return [
        layer_case(
            "pvt_v2",
            {**standard, "kv_reduction": 2, "norm_epsilon": 1e-5},
            [(2, 6, 8, 16), (1, 5, 7, 16)],
            seed=150,
        ),
        layer_case(
            "eva_cls",
            {
                **standard,
                "position_encoding": "rope",
                "position_size": (4, 5),
                "use_key_bias": False,
            },
            [(2, 4, 5, 16), (1, 3, 6, 16)],
            seed=160,
            prefix_tokens=3,
        ),
        layer_case(
            "cross",
            standard,
            [(2, 4, 5, 16), (1, 5, 3, 16)],
            seed=170,
            context=[(2, 3, 7, 8), (1, 6, 2, 8)],
            mask=True,
        ),
    ]


def _quantized_cases(modes):
    """Issue 21's: the block with an output projection and the legacy
    block's position conv (every dense map it quantizes), quantized by Keras's
    `model.quantize(mode)` in each worker, at two sizes."""
    config = {**STANDARD, "position_encoding": "conv", "output_dense": True}
    return [
        layer_case(
            mode,
            config,
            [(2, 4, 5, 32), (1, 3, 6, 32)],
            seed=180 + 10 * i,
            quantize=mode,
        )
        for i, mode in enumerate(modes)
    ]


# The position cases of issue 19 that `make demo` shows (the others run in
# the test suite's extended cases): rope at two sizes, Swin's shifted
# windows at a padded size.
DEMO_POSITION_CASES = ("rope", "swin")


def _position_layer_cases():
    """`_position_cases` as layer cases, each with its seed (its place in
    that list)."""
    return [
        layer_case(name, config, shapes, seed=80 + 10 * i, **options)
        for i, (name, config, shapes, options) in enumerate(_position_cases())
    ]


def _path_cases():
    """The chunked and fused attention paths (`attention_implementation`),
    judged by the same checks and budgets as the full path, on masked
    batches (item 0 fully masked, item 1 padded). Their attention scores row
    checks the full path (the only one that returns scores); "fused" in
    float64 runs the chunked path (`choice.resolve`).

    Small: each case costs compiles on every backend (torch.compile traces
    the chunked path's loops unrolled; JAX compiles every new shape eagerly).
    """
    return [
        # Relative rows per chunk, at the tables' size and resized (the jit
        # row then also compiles the loops with dynamic sizes); chunks of 10
        # leave a ragged last chunk at both sizes (16 tokens = 10 + 6,
        # 18 = 10 + 8). Two chunks: torch.compile traces every (head, chunk)
        # body unrolled.
        layer_case(
            "botnet-chunked",
            {
                **schema.preset("botnet", num_heads=2, position_size=(4, 4)),
                "attention_implementation": "chunked",
                "chunk_size": 10,
            },
            [(2, 4, 4, 16), (2, 3, 6, 16)],
            seed=130,
            mask=True,
        ),
        # The "masked" case on the backends' fused kernels (its shapes, so
        # that JAX reuses the compiled projections).
        layer_case(
            "masked-fused",
            {
                **schema.preset("yolov4_mhsa", num_heads=2),
                "attention_implementation": "fused",
            },
            [(2, 6, 7, 32)],
            seed=20,
            mask=True,
        ),
    ]


def _option_cases():
    """timm's attention options (issue 19): q/k LayerNorms and the output
    projection, on standard attention, 4 heads of 4 channels, a masked batch
    (item 0's zeros become the projection's bias). Small: a 4x5 map."""
    return [
        layer_case(
            "qknorm_proj",
            {**STANDARD, "num_heads": 4, "qk_norm": "layer", "output_dense": True},
            [(2, 4, 5, 16)],
            seed=140,
            mask=True,
        ),
    ]


def _position_cases():
    """Every position encoding: each learned one at its reference size
    (position_size) and at another size (its tables resized, down along one
    axis and up along the other; "swin": its windows at a padded size);
    every check, gradients and optimizer steps included, runs at both sizes.
    "botnet" (in the default cases) is the third learned case. They keep the
    YOLOv4-MHSA block's ReLU projections with biases and change the encoding
    and the scale; "swin" is Swin's linear block. The rotary cases and then
    "swin" come last (the others keep their seeds)."""
    yolov4_mhsa = schema.preset("yolov4_mhsa")
    return [
        # Non-square reference size, channels_first; the other size comes first.
        (
            "relative",
            {
                **yolov4_mhsa,
                "num_heads": 2,
                "position_encoding": "relative",
                "position_size": (5, 7),
                "scale": None,
                "data_format": "channels_first",
            },
            [(2, 16, 8, 6), (1, 16, 5, 7)],
            {},
        ),
        # scale multiplies q.k only; a masked batch; key_dim != C / heads.
        (
            "absolute",
            {
                **yolov4_mhsa,
                "num_heads": 2,
                "key_dim": 6,
                "position_encoding": "absolute",
                "position_size": (6, 5),
                "scale": None,
                "scale_position_logits": False,
            },
            [(2, 6, 5, 16), (2, 8, 9, 16)],
            {"mask": True},
        ),
        # Fixed, no weights: any size is its own embedding.
        (
            "sinusoidal",
            {
                **yolov4_mhsa,
                "num_heads": 2,
                "position_encoding": "sinusoidal",
                "scale": None,
            },
            [(2, 5, 6, 16), (1, 8, 9, 16)],
            {},
        ),
        (
            "none",
            {**yolov4_mhsa, "num_heads": 2, "position_encoding": "none"},
            [(2, 4, 5, 16)],
            {},
        ),
        # Rotary (q and k rotated before the attention): EVA-02's settings
        # with a reference grid, at it and at another size (the grid
        # rescaled); RoPE-Mixed's learned frequencies (rope-vit's defaults).
        (
            "rope",
            {
                **yolov4_mhsa,
                "num_heads": 2,
                "position_encoding": "rope",
                "position_size": (4, 5),
                "scale": None,
            },
            [(2, 4, 5, 16), (1, 6, 3, 16)],
            {},
        ),
        (
            "rope_mixed",
            {
                **yolov4_mhsa,
                "num_heads": 2,
                "position_encoding": "rope_mixed",
                "scale": None,
            },
            [(2, 3, 5, 16), (1, 5, 4, 16)],
            {"mask": True},
        ),
        # Swin's shifted windows (3x3, shift 1) with its per-head bias, timm's
        # convention: at 7x5, not divisible by the window (padded to 9x6, the
        # padding masked), masked batch; and at the window's own size (one
        # window: no shift; the table's reference size).
        (
            "swin",
            {
                "num_heads": 2,
                "key_dim": None,
                "activation": None,
                "position_encoding": "relative_bias",
                "scale": None,
                "scale_position_logits": False,
                "use_bias": True,
                "kernel_initializer": "glorot_uniform",
                "window_size": (3, 3),
                "shift_size": (1, 1),
                "position_size": (3, 3),
            },
            [(2, 7, 5, 16), (2, 3, 3, 16)],
            {"mask": True},
        ),
    ]


def extended_cases():
    """`default_cases` plus the configurations the test suite adds."""
    yolov4_mhsa = schema.preset("yolov4_mhsa")
    standard = STANDARD
    return (
        default_cases()
        + [
            layer_case(
                "heads4-key_dim6",
                {**yolov4_mhsa, "num_heads": 4, "key_dim": 6},
                [(2, 5, 6, 32)],
                seed=30,
            ),
            layer_case(
                "conv-linear-scaled",
                {**yolov4_mhsa, "activation": None, "scale": None, "num_heads": 2},
                [(2, 4, 9, 32)],
                seed=40,
            ),
            layer_case(
                "float64",
                {**yolov4_mhsa, "num_heads": 2},
                [(2, 5, 4, 16)],
                seed=50,
                dtype="float64",
            ),
            layer_case(
                "dynamic",
                {**yolov4_mhsa, "num_heads": 2},
                [(2, 5, 7, 16), (1, 9, 4, 16)],
                seed=60,
            ),
        ]
        + [c for c in _position_layer_cases() if c.name not in DEMO_POSITION_CASES]
        + [
            layer_case("standard", standard, [(2, 4, 9, 32)], seed=120),
        ]
        # int4 (Keras's default: groups of 128 with zero points; weights
        # only), after the default cases' int8.
        + _quantized_cases(("int8", "int4"))[1:]
    )


# --------------------------------------------------------- user models
class ModelFileError(ValueError):
    """A `.keras` file that cannot be used (unreadable, refused in safe mode)."""


def read_model_config(path):
    """The config.json of a `.keras` file, read without any framework."""
    try:
        with zipfile.ZipFile(path) as archive:
            return json.loads(archive.read("config.json"))
    except FileNotFoundError:
        raise ModelFileError(f"No such file: {path}") from None
    except (zipfile.BadZipFile, KeyError, json.JSONDecodeError, OSError) as e:
        raise ModelFileError(
            f"Not a readable .keras file: {path} ({type(e).__name__}: {e})"
        ) from None


def _walk(obj):
    if isinstance(obj, dict):
        yield obj
        for v in obj.values():
            yield from _walk(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from _walk(v)


def check_safe(config, path):
    """Refuses (ModelFileError) a model that Keras safe mode would refuse."""
    lambdas = [
        d.get("config", {}).get("name", "?")
        for d in _walk(config)
        if d.get("class_name") == "Lambda"
    ]
    if lambdas:
        raise ModelFileError(
            f"{path} contains Lambda layer(s) {lambdas}: loading them runs arbitrary "
            "Python code, which Keras safe mode refuses. Pass --unsafe if you trust "
            "the file."
        )


# None dimensions of a user model's inputs, when the workers make the inputs:
# DEFAULT_BATCH for the batch; every other None dimension runs at two sizes
# (two input variants), so that every check also covers a second size.
VARIABLE_SIZES = (DEFAULT_SIZE, 6)


def _dtype_name(dtype):
    if isinstance(dtype, dict):  # a serialized DTypePolicy
        dtype = dtype.get("config", {}).get("name", "float32")
    return str(dtype or "float32")


def generate_inputs(specs, seed=0):
    """Deterministic inputs for a model, from its input specs (NumPy only: every
    backend's worker makes the same arrays from the same specs).

    Args:
        specs: [(name, shape, dtype)] of the model's inputs, as the loaded
            model states them (`shape` with None for unknown dimensions).
        seed: the NumPy seed.

    Returns:
        A list of input variants, each {name: array}: one variant, or two
        when a non-batch dimension is None (`VARIABLE_SIZES`). None batch
        dimensions become DEFAULT_BATCH. Floats are standard normal, ints
        uniform in [0, 10), bools fair coins.
    """
    variable = any(d is None for _, shape, _ in specs for d in tuple(shape)[1:])
    sizes = VARIABLE_SIZES if variable else VARIABLE_SIZES[:1]
    rng = np.random.default_rng(seed)
    variants = []
    for size in sizes:
        variant = {}
        for name, shape, dtype in specs:
            shape = [
                DEFAULT_BATCH if (i == 0 and d is None) else (size if d is None else d)
                for i, d in enumerate(shape)
            ]
            dtype = _dtype_name(dtype)
            if dtype == "bool":
                array = rng.random(shape) < 0.5
            elif "int" in dtype:
                array = rng.integers(0, 10, size=shape).astype(dtype)
            else:
                array = rng.standard_normal(shape).astype(
                    "float64" if dtype == "float64" else "float32"
                )
            variant[name] = array
        variants.append(variant)
    return variants


def model_case(path, inputs=None, *, name="model", tasks=protocol.ALL_TASKS):
    """A case of the saved model at `path`.

    Args:
        path: a `.keras` file.
        inputs: an array, a list of arrays (in the model's input order) or a
            dict {input name: array} (matched to the model's inputs by name
            when its keys are the input names, else by order); default
            (None): each worker makes them from the loaded model's inputs
            (`generate_inputs`: two input variants when a non-batch
            dimension is None), and the parent reads them back.
        name: the case's name.
        tasks: the worker tasks; `matrix.run_matrix` runs those its checks
            need for a model case.

    Raises:
        ModelFileError: the file is not a readable `.keras` file.
    """
    read_model_config(path)  # readable, or a one-line error now
    if inputs is None:
        variants = []  # made by the workers
    elif isinstance(inputs, dict):
        variants = [{str(k): np.asarray(a) for k, a in inputs.items()}]
    else:
        variants = [
            {
                f"input_{k}": np.asarray(a)
                for k, a in enumerate(
                    inputs if isinstance(inputs, (list, tuple)) else [inputs]
                )
            }
        ]
    return Case(
        name,
        None,
        variants,
        model_path=str(path),
        tasks=tuple(tasks),
        quantization=quantization_of(read_model_config(path)),
    )


# Keras's quantized dtype policies (config "mode": "int8", "int4/128", ...).
_QUANTIZED_POLICIES = (
    "QuantizedDTypePolicy",
    "Int4DTypePolicy",
    "QuantizedFloat8DTypePolicy",
    "GPTQDTypePolicy",
    "AWQDTypePolicy",
)


def quantization_of(config):
    """The quantization modes of a model config ("int8", "int4+int8", ...),
    sorted, or None: a float model."""
    modes = set()

    def walk(obj):
        if isinstance(obj, dict):
            if obj.get("class_name") in _QUANTIZED_POLICIES:
                mode = str((obj.get("config") or {}).get("mode", "?"))
                modes.add(mode.split("/")[0])
            for value in obj.values():
                walk(value)
        elif isinstance(obj, list):
            for value in obj:
                walk(value)

    walk(config)
    return "+".join(sorted(modes)) or None
