"""How `MultiHeadSelfAttention2D` is sharded by `keras.distribution` (JAX).

    import keras
    from mhsa_core.distribution import layout_map

    mesh = keras.distribution.DeviceMesh((2, 4), ("batch", "model"),
                                         keras.distribution.list_devices())
    distribution = keras.distribution.ModelParallel(
        layout_map=layout_map(mesh), batch_dim_name="batch")
    with distribution.scope():        # build AND compile under the scope
        model = build_model()
        model.compile(...)
    model.fit(...)

The rules, one regex per group of the layer's variables (their paths are
"<layer path>/<weight name>", the names of `mhsa_core.reference.schema`):

- q/k/v kernels (C, heads * d) and biases (heads * d,): columns split across
  the model axis. Head h owns columns [h*d, (h+1)*d), so with num_heads
  divisible by the axis size each device holds whole heads, and the
  attention of a head needs no other device's q, k or v;
- the output projection (`output_dense`) kernel (C, C): rows split across
  the model axis. Its rows are the merged heads' channels, head h's values
  in rows [h*dv, (h+1)*dv), so each device multiplies the heads it holds
  and the partial products are summed across the axis (one all-reduce, as
  Megatron's row-parallel output projection); its bias is replicated (added
  once, after the sum);
- the "conv" encoding's kernel and bias (the Keras 2 YOLOv4-MHSA block's
  position conv), the learned position tables ("relative", "absolute") and
  the norms' scales and biases (`qk_norm`, shared by the heads;
  `output_norm`, over all C channels): replicated. Every head reads all of
  them; they are small;
- `kv_reduction`'s weights (the keys' and values' map reduced before the
  projections): replicated. Its bias and norm weights by a rule; its
  kernel ((R, R, C, C) for an int R, (C, C) for "pool": one regex cannot
  give both ranks) by no rule, which `ModelParallel` replicates. Every
  device reduces the whole map, then projects its own heads.

A variable that no rule matches is replicated by `ModelParallel`, so the rules
can be added to a user's own LayoutMap (`layout_map(mesh, layout_map=theirs)`)
as long as none of theirs also matches our paths (Keras then raises
"matches multiple layout specification keys").

The divisibility of num_heads cannot be a regex: the layer checks it when it
builds (`check_head_sharding`), against whatever layout the active
distribution gives its projections, ours or a user's. Only the JAX backend
implements `keras.distribution` in Keras 3.15; TensorFlow users take
`tf.distribute`, PyTorch users DistributedDataParallel (docs/distribution.md;
canary "distribution-jax-only" in tests/canaries).

Keras is imported inside the functions: `import mhsa_core` stays light.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

from mhsa_core.reference import schema

if TYPE_CHECKING:  # imported inside the functions: `import mhsa_core` stays light
    import keras

__all__ = ["layout_rules", "layout_map", "check_head_sharding"]

# Weights split by columns (= by heads): the q/k/v projections.
_SPLIT_KERNELS = tuple(f"{p}_kernel" for p in schema.PROJECTIONS)
_SPLIT_BIASES = tuple(f"{p}_bias" for p in schema.PROJECTIONS)
# Split by rows (= by heads): the output projection's kernel.
_ROW_SPLIT_KERNELS = schema.OUTPUT_PROJECTION[:1]
# Weights every device holds whole: the "tokens" encodings' conv, the tables.
_REPLICATED_MATRICES = tuple(
    name
    for e in schema.ENCODINGS.values()
    for name in (
        e.token_weights[:1]
        + (
            schema.table_names(e.name)
            if e.learned_tables and not e.per_head_table
            else ()
        )
    )
)
# Swin's per-head bias tables (rows, rows, heads) and RoPE-Mixed's per-head
# frequencies (2, heads, kd / 2): small, replicated too.
_REPLICATED_TENSORS = tuple(
    name
    for e in schema.ENCODINGS.values()
    if e.per_head_table
    for name in schema.table_names(e.name)
) + tuple(e.frequencies for e in schema.ENCODINGS.values() if e.frequencies)
_REPLICATED_VECTORS = (
    tuple(name for e in schema.ENCODINGS.values() for name in e.token_weights[1:])
    + schema.OUTPUT_PROJECTION[1:]
    + tuple(
        name
        for prefix in ("query", "key", "output", "reduction")
        for name in schema.norm_weight_names(prefix, "layer")
    )
    + schema.REDUCTION_CONV[1:]
)


def _any_of(names: Iterable[str]) -> str:
    return "(?:" + "|".join(names) + ")"


def _check_axis_name(value: object, argument: str) -> None:
    if not isinstance(value, str) or not value:
        raise ValueError(
            f"Received an invalid value for argument `{argument}`, expected a "
            f"non-empty string. Received: {argument}={value!r}"
        )


def layout_rules(
    *, model_axis: str = "model", layer_path: str = ".+"
) -> dict[str, tuple[str | None, ...]]:
    """The sharding rules of `MultiHeadSelfAttention2D`: {path regex: axes}.

    Plain data (no Keras), for a LayoutMap or for reading: each key is a
    regular expression `re.fullmatch`ed against a variable's path, each value
    the mesh axis (or None) of each of the variable's dimensions.

    Args:
        model_axis: Name of the mesh axis the heads are split across.
        layer_path: Regular expression of the paths of the layers the rules
            cover (a variable's path is "<layer path>/<weight name>"). The
            default, ".+", covers every layer with our weight names; narrow it
            (e.g. "encoder/attn_.*") when another layer of the model has a
            variable of the same name.

    Returns:
        {regex: axes tuple}: q/k/v kernels `(None, model_axis)`, biases
        `(model_axis,)`, the output kernel `(model_axis, None)`; the position
        conv and tables, RoPE-Mixed's frequencies, the norms and the output bias
        replicated.
    """
    _check_axis_name(model_axis, "model_axis")
    _check_axis_name(layer_path, "layer_path")
    prefix = f"(?:{layer_path})/"
    return {
        prefix + _any_of(_SPLIT_KERNELS): (None, model_axis),
        prefix + _any_of(_SPLIT_BIASES): (model_axis,),
        prefix + _any_of(_ROW_SPLIT_KERNELS): (model_axis, None),
        prefix + _any_of(_REPLICATED_MATRICES): (None, None),
        prefix + _any_of(_REPLICATED_VECTORS): (None,),
        prefix + _any_of(_REPLICATED_TENSORS): (None, None, None),
    }


def layout_map(
    device_mesh: keras.distribution.DeviceMesh,
    *,
    model_axis: str = "model",
    layer_path: str = ".+",
    layout_map: keras.distribution.LayoutMap | None = None,
) -> keras.distribution.LayoutMap:
    """A `keras.distribution.LayoutMap` with the rules of `MultiHeadSelfAttention2D`.

    Args:
        device_mesh: The `keras.distribution.DeviceMesh`; it must have an
            axis named `model_axis`.
        model_axis: Name of the mesh axis the heads are split across.
        layer_path: Regular expression of the layer paths the rules cover
            (see `layout_rules`).
        layout_map: Optional LayoutMap of the user's (on `device_mesh`) to
            add the rules to, for the model's other layers; default: a new
            one.

    Returns:
        The LayoutMap (the one given, with the rules added), ready for
        `keras.distribution.ModelParallel(layout_map=..., batch_dim_name=...)`.

    Raises:
        ValueError: `model_axis` is not an axis of `device_mesh`, or
            `layout_map` is on another mesh.
    """
    import keras

    _check_axis_name(model_axis, "model_axis")
    if model_axis not in device_mesh.axis_names:
        raise ValueError(
            f"`model_axis` must be one of the device mesh's axes "
            f"{tuple(device_mesh.axis_names)}. Received: model_axis={model_axis!r}"
        )
    if layout_map is None:
        layout_map = keras.distribution.LayoutMap(device_mesh)
    elif layout_map.device_mesh is not device_mesh:
        raise ValueError(
            "`layout_map` must be on the same `device_mesh` as the rules. "
            f"Received: layout_map.device_mesh={layout_map.device_mesh}, "
            f"device_mesh={device_mesh}"
        )
    for pattern, axes in layout_rules(
        model_axis=model_axis, layer_path=layer_path
    ).items():
        layout_map[pattern] = axes  # a duplicate key: LayoutMap's own ValueError
    return layout_map


def check_head_sharding(layer: keras.layers.Layer) -> None:
    """ValueError unless the active distribution splits `layer`'s q/k/v
    projections (by columns) and output projection (by rows) into whole
    heads.

    Called by `MultiHeadSelfAttention2D.build` before it creates the
    projections, so a bad layout fails there, with the numbers, rather than
    in XLA (columns not divisible) or silently (columns divisible, heads cut
    in two: correct results, but every head's attention then needs two
    devices). Nothing to check without a distribution or when the
    distribution gives no layout by path (`DataParallel`: all replicated).
    """
    import keras

    distribution = keras.distribution.distribution()
    if distribution is None:
        return
    mesh = distribution.device_mesh
    # name -> its axis that holds the heads: the last, the output kernel's rows.
    head_axes = {name: -1 for name in _SPLIT_KERNELS + _SPLIT_BIASES}
    head_axes.update({name: 0 for name in _ROW_SPLIT_KERNELS})
    for name, head_axis in head_axes.items():
        try:
            layout = distribution.get_tensor_layout(f"{layer.path}/{name}")
        except NotImplementedError:  # a Distribution that lays out no paths
            return
        axis = None if layout is None or not layout.axes else layout.axes[head_axis]
        if axis is None:
            continue
        size = mesh.shape[list(mesh.axis_names).index(axis)]
        if layer.num_heads % size:
            raise ValueError(
                f"{layer.__class__.__name__} {layer.name!r}: the layout splits "
                f"the {'rows' if head_axis == 0 else 'columns'} of {name} across "
                f"mesh axis {axis!r}, so num_heads "
                "must be divisible by that axis's size (each device holds whole "
                "heads; to replicate this layer instead, leave it out of the "
                "rules, e.g. with `layout_map(..., layer_path=...)`). "
                f"Received: num_heads={layer.num_heads}, model axis size={size}"
            )
