"""`MultiHeadSelfAttention2D`: the 2-D multi-head self-attention block as one Keras 3 layer."""

import inspect
import math
import numbers

import keras
import numpy as np
from keras import ops

from mhsa_core import position
from mhsa_core.attention import dot_product_attention, logits_dtype

_POSITION_ENCODINGS = ("conv", "none", "relative", "absolute", "sinusoidal")
# Encodings with learned per-axis tables: the table name prefix and the rows of
# a table for a reference size of n along its axis.
_TABLES = {
    "relative": ("relative", lambda n: 2 * n - 1),
    "absolute": ("absolute", lambda n: n),
}
_DATA_FORMATS = ("channels_last", "channels_first")
# Keyword arguments that keras.layers.Layer itself accepts and may write into a config.
_BASE_LAYER_KEYS = ("name", "trainable", "dtype", "autocast", "activity_regularizer")
# load_seed_weights: the Keras 2 block's four Conv2D layers in creation order.
_SEED_CONVS = ("position", "query", "key", "value")


def _as_float_array(array, what, dtype="float64"):
    """`array` cast to a float dtype, or a ValueError naming `what`."""
    array = np.asarray(array)
    if array.dtype.kind not in "biuf" and array.dtype.name != "bfloat16":
        raise ValueError(
            f"{what} must hold numbers. Received: dtype={array.dtype}"
        )
    return array.astype(dtype)


def _is_int(value):
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _check_position_size(position_size):
    """`position_size` as a tuple of two positive ints (or None), else ValueError."""
    if position_size is None:
        return None
    ok = (
        isinstance(position_size, (tuple, list))
        and len(position_size) == 2
        and all(_is_int(v) and v >= 1 for v in position_size)
    )
    if not ok:
        raise ValueError(
            "Received an invalid value for argument `position_size`, expected None "
            "or two positive integers (height, width). "
            f"Received: position_size={position_size!r}"
        )
    return tuple(int(v) for v in position_size)


@keras.saving.register_keras_serializable(package="mhsa_core")
class MultiHeadSelfAttention2D(keras.layers.Layer):
    """Multi-head self-attention over the positions of a 2-D feature map.

    The map is flattened row-major into N = H * W tokens of C channels; every
    token attends to every other token; the result has the input's shape, so the
    layer drops into a convolutional backbone (YOLO-style detectors, U-Nets,
    BoTNet-style ResNets). With the defaults it computes exactly the Keras 2
    `mhsa_block` it generalizes (one head, ReLU 1x1 projections, a ReLU 1x1
    "position" conv added to the tokens, unscaled logits):

        t = tokens(x)                                  # (B, N, C)
        t = t + relu(t @ Wp + bp)                      # position_encoding="conv"
        q, k, v = act(t @ Wq + bq), act(t @ Wk + bk), act(t @ Wv + bv)
        head i: softmax(scale * q_i k_i^T) v_i         # channels [i*d, (i+1)*d)
        out = concat(heads) reshaped to x's layout

    Position encodings ((y, x) = a token's row and column, i a query, j a key):
    "relative" (BoTNet) adds q_i . (R_h[y_j - y_i + H - 1] + R_w[x_j - x_i + W - 1])
    to the logits, "absolute" adds q_i . (E_h[y_j] + E_w[x_j]) (both shared
    across heads; times `scale` too if `scale_position_logits`), and
    "sinusoidal" adds a fixed sine-cosine embedding of (y, x) to the tokens.
    The learned tables R, E belong to the size `position_size`; at any other
    size they are linearly resized (see `mhsa_core.position`), so one layer
    runs at any H x W. `MultiHeadSelfAttention2D.botnet(...)` builds BoTNet's
    configuration.

    The computation uses only `keras.ops`, so the same layer, and the same saved
    `.keras` file, runs under TensorFlow, PyTorch and JAX with the same numbers.

    Args:
        num_heads: Number of attention heads. C must be divisible by it.
        key_dim: Channels per head of query and key. Defaults to
            C // num_heads. Values always have C // num_heads per head.
        activation: Activation of the query, key and value projections.
            Default "relu" (the seed block); None for linear projections.
        position_encoding: "conv" (the seed's ReLU 1x1 conv of each token's own
            features, added to the tokens; it carries no position), "none",
            "relative" (BoTNet's 2-D relative logits), "absolute" (learned
            factorized embeddings of the key's row and column, in the logits)
            or "sinusoidal" (fixed 2-D sine-cosine embedding added to the
            tokens; C divisible by 4).
        position_size: (Hr, Wr), the reference size of the learned tables of
            "relative" (2*Hr - 1 and 2*Wr - 1 rows of key_dim) and "absolute"
            (Hr and Wr rows). Default: the spatial size seen at build, which
            must then be static. Ignored by the other encodings.
        scale_position_logits: Whether `scale` multiplies the position term
            of "relative"/"absolute" too (BoTNet's official code: True) or
            only q.k (timm's default: False).
        scale: Factor of the logits. Default 1.0 (the seed has no scaling);
            None means 1 / sqrt(key_dim).
        use_bias: Whether the projections have biases.
        dropout: Rate at which attention probabilities are dropped, in training
            only.
        data_format: "channels_last" (B, H, W, C) or "channels_first"
            (B, C, H, W). Default: `keras.config.image_data_format()`.
        kernel_initializer: Initializer of the projection kernels ("he_normal",
            as the seed's convs).
        position_initializer: Initializer of the position tables. Default
            None: normal with stddev 1 / sqrt(key_dim), as BoTNet and timm.
        bias_initializer: Initializer of the biases.
        kernel_regularizer: Regularizer of the kernels.
        bias_regularizer: Regularizer of the biases.
        kernel_constraint: Constraint of the kernels.
        bias_constraint: Constraint of the biases.
        seed: Integer seed of the dropout.
        **kwargs: Base layer arguments (`name`, `dtype`, `trainable`, ...).

    Call arguments:
        inputs: (B, H, W, C) for channels_last, (B, C, H, W) for
            channels_first. H and W may differ from call to call.
        attention_mask: Optional bool (B, H, W). True = this position may be
            attended to (e.g. the valid part of a padded image). A query whose
            keys are all masked gets a zero output.
        return_attention_scores: If True, also return the attention
            probabilities.
        training: Whether dropout is active.

    Returns:
        The output, same shape as `inputs` and in the compute dtype; with
        `return_attention_scores=True` the tuple `(outputs, scores)`, scores of
        shape (B, num_heads, H * W, H * W) (float32 under mixed precision: they
        are computed in float32).

    Example:

    >>> x = keras.Input((None, None, 64))
    >>> y = MultiHeadSelfAttention2D(num_heads=4)(x)
    >>> y.shape
    (None, None, None, 64)
    """

    def __init__(
        self,
        num_heads: int = 1,
        key_dim: int | None = None,
        activation="relu",
        position_encoding: str = "conv",
        position_size: tuple[int, int] | None = None,
        scale_position_logits: bool = True,
        scale: float | None = 1.0,
        use_bias: bool = True,
        dropout: float = 0.0,
        data_format: str | None = None,
        kernel_initializer="he_normal",
        bias_initializer="zeros",
        position_initializer=None,
        kernel_regularizer=None,
        bias_regularizer=None,
        kernel_constraint=None,
        bias_constraint=None,
        seed: int | None = None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if not _is_int(num_heads) or num_heads < 1:
            raise ValueError(
                "Received an invalid value for argument `num_heads`, expected a "
                f"positive integer. Received: num_heads={num_heads!r}"
            )
        if key_dim is not None and (not _is_int(key_dim) or key_dim < 1):
            raise ValueError(
                "Received an invalid value for argument `key_dim`, expected None "
                f"or a positive integer. Received: key_dim={key_dim!r}"
            )
        if position_encoding not in _POSITION_ENCODINGS:
            raise ValueError(
                "Received an invalid value for argument `position_encoding`, "
                f"expected one of {_POSITION_ENCODINGS}. "
                f"Received: position_encoding={position_encoding!r}"
            )
        position_size = _check_position_size(position_size)
        if not isinstance(scale_position_logits, (bool, np.bool_)):
            raise ValueError(
                "Received an invalid value for argument `scale_position_logits`, "
                "expected a boolean. "
                f"Received: scale_position_logits={scale_position_logits!r}"
            )
        if scale is not None and (
            isinstance(scale, bool)
            or not isinstance(scale, numbers.Real)
            or not math.isfinite(scale)
            or scale <= 0
        ):
            raise ValueError(
                "Received an invalid value for argument `scale`, expected None or "
                f"a positive finite number. Received: scale={scale!r}"
            )
        if (
            isinstance(dropout, bool)
            or not isinstance(dropout, numbers.Real)
            or not 0.0 <= dropout < 1.0
        ):
            raise ValueError(
                "Received an invalid value for argument `dropout`, expected a "
                f"number in [0, 1). Received: dropout={dropout!r}"
            )
        if data_format is None:
            data_format = keras.config.image_data_format()
        if data_format not in _DATA_FORMATS:
            raise ValueError(
                "Received an invalid value for argument `data_format`, expected "
                f"one of {_DATA_FORMATS}. Received: data_format={data_format!r}"
            )
        if seed is not None and not _is_int(seed):
            raise ValueError(
                "Received an invalid value for argument `seed`, expected None or "
                f"an integer. Received: seed={seed!r}"
            )
        try:
            self.activation = keras.activations.get(activation)
        except (ValueError, TypeError) as e:
            raise ValueError(
                "Received an invalid value for argument `activation`, expected "
                "None, the name of a Keras activation or a callable. "
                f"Received: activation={activation!r}"
            ) from e

        self.num_heads = int(num_heads)
        self.key_dim = None if key_dim is None else int(key_dim)
        self.position_encoding = position_encoding
        self.position_size = position_size
        self.scale_position_logits = bool(scale_position_logits)
        self.scale = None if scale is None else float(scale)
        self.use_bias = bool(use_bias)
        self.dropout = float(dropout)
        self.data_format = data_format
        self.kernel_initializer = keras.initializers.get(kernel_initializer)
        self.bias_initializer = keras.initializers.get(bias_initializer)
        try:
            self.position_initializer = (
                None if position_initializer is None
                else keras.initializers.get(position_initializer)
            )
        except (ValueError, TypeError) as e:
            raise ValueError(
                "Received an invalid value for argument `position_initializer`, "
                "expected None, the name of a Keras initializer or an initializer. "
                f"Received: position_initializer={position_initializer!r}"
            ) from e
        self.kernel_regularizer = keras.regularizers.get(kernel_regularizer)
        self.bias_regularizer = keras.regularizers.get(bias_regularizer)
        self.kernel_constraint = keras.constraints.get(kernel_constraint)
        self.bias_constraint = keras.constraints.get(bias_constraint)
        self.seed = None if seed is None else int(seed)
        self.seed_generator = (
            keras.random.SeedGenerator(self.seed) if self.dropout > 0 else None
        )
        self._channel_axis = -1 if data_format == "channels_last" else 1
        self.input_spec = keras.InputSpec(ndim=4)

    # ------------------------------------------------------------------ shapes
    def _spatial_and_channels(self, input_shape):
        """(H, W, C) of a static input shape, any of them None if unknown."""
        if self.data_format == "channels_last":
            return input_shape[1], input_shape[2], input_shape[3]
        return input_shape[2], input_shape[3], input_shape[1]

    def _check_input_shape(self, input_shape):
        input_shape = tuple(input_shape)
        if len(input_shape) != 4:
            raise ValueError(
                f"{self.__class__.__name__} expects a rank-4 input, (B, H, W, C) "
                "for channels_last or (B, C, H, W) for channels_first. "
                f"Received: inputs.shape={input_shape}"
            )
        channels = self._spatial_and_channels(input_shape)[2]
        if channels is None:
            raise ValueError(
                "The channel dimension of the inputs must be known "
                f"(data_format={self.data_format!r}). "
                f"Received: inputs.shape={input_shape}"
            )
        return input_shape

    def _check_mask_shape(self, input_shape, mask_shape):
        height, width, _ = self._spatial_and_channels(input_shape)
        expected = (input_shape[0], height, width)
        mask_shape = tuple(mask_shape)
        ok = len(mask_shape) == 3 and all(
            e is None or m is None or e == m for e, m in zip(expected, mask_shape)
        )
        if not ok:
            raise ValueError(
                f"`attention_mask` must have shape (B, H, W)={expected}. "
                f"Received: attention_mask.shape={mask_shape}"
            )

    @property
    def head_key_dim(self):
        """Channels per head of query and key (key_dim, or C // num_heads)."""
        return self._head_key_dim

    @property
    def scale_value(self):
        """The factor actually applied to the logits."""
        if self.scale is None:
            return 1.0 / math.sqrt(self._head_key_dim)
        return self.scale

    def _resolve_position_size(self, input_shape):
        """position_size, defaulting to the static spatial size of the input."""
        if self.position_size is not None:
            return self.position_size
        height, width, _ = self._spatial_and_channels(input_shape)
        if height is None or width is None:
            raise ValueError(
                f"position_encoding={self.position_encoding!r} learns tables for "
                "a reference size, and the spatial size of the input is unknown "
                "at build. Pass `position_size`, the (height, width) of the "
                "tables' reference grid. "
                f"Received: position_size=None, inputs.shape={tuple(input_shape)}"
            )
        return (int(height), int(width))

    def build(self, input_shape):
        input_shape = self._check_input_shape(input_shape)
        channels = self._spatial_and_channels(input_shape)[2]
        if channels % self.num_heads:
            raise ValueError(
                "The number of channels must be divisible by `num_heads`. "
                f"Received: channels={channels}, num_heads={self.num_heads}"
            )
        if self.position_encoding == "sinusoidal" and channels % 4:
            raise ValueError(
                "position_encoding='sinusoidal' needs channels divisible by 4 "
                "(sin and cos of the row and of the column). "
                f"Received: channels={channels}"
            )
        if self.position_encoding in _TABLES:
            self.position_size = self._resolve_position_size(input_shape)
        self.channels = channels
        self._head_key_dim = (
            self.key_dim if self.key_dim is not None else channels // self.num_heads
        )
        qk_width = self.num_heads * self._head_key_dim
        widths = {"query": qk_width, "key": qk_width, "value": channels}
        if self.position_encoding == "conv":
            widths = {"position": channels, **widths}
        # Creation order = the seed's conv order, and the canonical weight-dict order.
        for name, width in widths.items():
            kernel = self.add_weight(
                name=f"{name}_kernel",
                shape=(channels, width),
                initializer=self.kernel_initializer,
                regularizer=self.kernel_regularizer,
                constraint=self.kernel_constraint,
            )
            setattr(self, f"{name}_kernel", kernel)
            bias = None
            if self.use_bias:
                bias = self.add_weight(
                    name=f"{name}_bias",
                    shape=(width,),
                    initializer=self.bias_initializer,
                    regularizer=self.bias_regularizer,
                    constraint=self.bias_constraint,
                )
            setattr(self, f"{name}_bias", bias)
        if self.position_encoding in _TABLES:
            prefix, rows = _TABLES[self.position_encoding]
            initializer = self.position_initializer or keras.initializers.RandomNormal(
                stddev=position.default_table_stddev(self._head_key_dim)
            )
            for axis, size in zip(("height", "width"), self.position_size):
                # autocast=False: under mixed precision the tables stay float32,
                # like the logits they feed (see `call`).
                table = self.add_weight(
                    name=f"{prefix}_{axis}",
                    shape=(rows(size), self._head_key_dim),
                    initializer=initializer,
                    autocast=False,
                )
                setattr(self, f"{prefix}_{axis}", table)
        self.input_spec = keras.InputSpec(ndim=4, axes={self._channel_axis: channels})

    def compute_output_shape(self, input_shape):
        return tuple(self._check_input_shape(input_shape))

    def compute_output_spec(
        self, inputs, attention_mask=None, return_attention_scores=False, training=None
    ):
        shape = self._check_input_shape(inputs.shape)
        if attention_mask is not None:
            self._check_mask_shape(shape, attention_mask.shape)
        outputs = keras.KerasTensor(shape, dtype=self.compute_dtype)
        if not return_attention_scores:
            return outputs
        height, width, _ = self._spatial_and_channels(shape)
        n = None if height is None or width is None else height * width
        scores_dtype = self.compute_dtype
        if scores_dtype in ("float16", "bfloat16"):
            scores_dtype = "float32"
        scores = keras.KerasTensor(
            (shape[0], self.num_heads, n, n), dtype=scores_dtype
        )
        return outputs, scores

    # -------------------------------------------------------------------- call
    def _project(self, tokens, name, activation):
        # einsum, not matmul: keras 3.15's torch `ops.matmul` computes float64
        # inputs in float32 (its result_type maps 64-bit to 32-bit).
        y = ops.einsum("bnc,cd->bnd", tokens, getattr(self, f"{name}_kernel"))
        bias = getattr(self, f"{name}_bias")
        if bias is not None:
            y = y + bias
        return activation(y)

    def call(
        self, inputs, attention_mask=None, return_attention_scores=False, training=None
    ):
        x = inputs
        if self.data_format == "channels_first":
            # 1x1 projections act on tokens, so the layout is resolved once here.
            x = ops.transpose(x, (0, 2, 3, 1))  # (B, H, W, C)
        shape = ops.shape(x)  # entries may be dynamic (None at trace time)
        batch, height, width = shape[0], shape[1], shape[2]
        channels, heads, key_dim = self.channels, self.num_heads, self._head_key_dim
        n = height * width

        tokens = ops.reshape(x, (batch, n, channels))  # (B, N, C), row-major
        if self.position_encoding == "conv":
            tokens = tokens + self._project(tokens, "position", keras.activations.relu)
        elif self.position_encoding == "sinusoidal":
            # Computed in the variable dtype (float32 under mixed precision),
            # rounded once to the compute dtype.
            embedding = position.sinusoidal_embedding(
                height, width, channels, self.variable_dtype
            )  # (N, C)
            tokens = tokens + ops.cast(embedding, tokens.dtype)
        q = self._project(tokens, "query", self.activation)  # (B, N, heads*kd)
        k = self._project(tokens, "key", self.activation)  # (B, N, heads*kd)
        v = self._project(tokens, "value", self.activation)  # (B, N, C)

        def split_heads(t, dim):  # (B, N, heads*dim) -> (B, heads, N, dim)
            return ops.transpose(ops.reshape(t, (batch, n, heads, dim)), (0, 2, 1, 3))

        key_mask = None
        if attention_mask is not None:
            attention_mask = ops.convert_to_tensor(attention_mask)
            self._check_mask_shape(tuple(inputs.shape), tuple(attention_mask.shape))
            key_mask = ops.reshape(attention_mask, (batch, n))  # (B, N)

        q = split_heads(q, key_dim)  # (B, heads, N, kd)
        outputs, scores = dot_product_attention(
            q,
            split_heads(k, key_dim),
            split_heads(v, channels // heads),
            scale=self.scale_value,
            logits_bias=self._position_logits(q, height, width),
            key_mask=key_mask,
            dropout=self.dropout,
            training=training,
            seed_generator=self.seed_generator,
        )  # (B, heads, N, C // heads), (B, heads, N, N)
        outputs = ops.reshape(
            ops.transpose(outputs, (0, 2, 1, 3)), (batch, height, width, channels)
        )
        if self.data_format == "channels_first":
            outputs = ops.transpose(outputs, (0, 3, 1, 2))
        if return_attention_scores:
            return outputs, scores
        return outputs

    def _position_logits(self, q, height, width):
        """The position term of the logits, (B, heads, N, N), or None.

        Computed like the logits (in float32 under mixed precision, from the
        float32 tables), and pre-multiplied by the logit scale when
        `scale_position_logits`.
        """
        if self.position_encoding not in _TABLES:
            return None
        prefix = _TABLES[self.position_encoding][0]
        dtype = logits_dtype(q.dtype)
        q = ops.cast(q, dtype)
        tables = [ops.cast(getattr(self, f"{prefix}_{axis}"), dtype)
                  for axis in ("height", "width")]
        logits_of = (position.relative_logits if self.position_encoding == "relative"
                     else position.absolute_logits)
        bias = logits_of(q, *tables, height, width)
        if self.scale_position_logits and self.scale_value != 1.0:
            bias = bias * ops.convert_to_tensor(self.scale_value, dtype=dtype)
        return bias

    # ------------------------------------------------------------ weights I/O
    def get_weight_dict(self):
        """The weights as the canonical dict of NumPy arrays (see `mhsa_core.reference`)."""
        self._require_built("get_weight_dict")
        out = {}
        for variable in self.trainable_weights:
            out[variable.name] = keras.ops.convert_to_numpy(variable)
        return out

    def set_weight_dict(self, weights):
        """Assigns weights from the canonical dict of arrays (names as `get_weight_dict`).

        Every weight must be given, with its exact shape; arrays are cast to the
        variables' dtype.
        """
        self._require_built("set_weight_dict")
        expected = {v.name: v for v in self.trainable_weights}
        if set(weights) != set(expected):
            raise ValueError(
                "`weights` must have exactly the keys "
                f"{sorted(expected)}. Received: keys={sorted(weights)}"
            )
        arrays = {}
        for name, variable in expected.items():
            array = np.asarray(weights[name])
            if array.shape != tuple(variable.shape):
                raise ValueError(
                    f"Weight {name!r} must have shape {tuple(variable.shape)}. "
                    f"Received: shape={array.shape}"
                )
            arrays[name] = _as_float_array(array, f"weight {name!r}", variable.dtype)
        # Assign only after every check and cast passed: never half-loaded.
        for name, variable in expected.items():
            variable.assign(arrays[name])

    def load_seed_weights(self, weights):
        """Loads the eight arrays of a Keras 2 `mhsa_block`.

        Args:
            weights: the kernels and biases of the block's four 1x1 Conv2D
                layers in the order the block creates them: position, query,
                key, value; kernel then bias each. Kernels may be (1, 1, C, C)
                (as `Conv2D.get_weights()` returns them) or (C, C).

        Beware: `model.get_weights()` of a Keras 2 functional model lists the
        convs in topological order, which is not creation order (tf_keras 2.21
        gives position, key, query, value). Pick them by layer name instead;
        see the README.

        Afterwards the layer computes the seed block's outputs. The layer must
        have the seed's settings (the defaults: position_encoding="conv",
        use_bias=True, num_heads=1, key_dim=None, scale=1.0, activation="relu";
        data_format and dropout are free); it is built from the kernels' shape
        if needed. Nothing is built or assigned unless every array is valid.
        """
        weights = list(weights)
        if len(weights) != 2 * len(_SEED_CONVS):
            raise ValueError(
                "load_seed_weights expects 8 arrays (kernel and bias of the "
                "position, query, key and value convs). "
                f"Received: {len(weights)} arrays"
            )
        # The seed block's semantics, so that its weights mean the same here.
        self._require_settings(
            "load_seed_weights", "the seed block's settings",
            position_encoding="conv", use_bias=True, num_heads=1, key_dim=None,
            scale=1.0, activation="relu",
        )
        arrays = [np.asarray(w) for w in weights]
        kernel = arrays[0]
        if self.built:
            channels = self.channels
        elif kernel.ndim in (2, 4) and kernel.shape[-1] > 0:
            channels = kernel.shape[-1]
        else:
            raise ValueError(
                "Seed weight 0 (position kernel) must have shape (1, 1, C, C) or "
                f"(C, C). Received: shape={kernel.shape}"
            )
        # Everything is checked before anything is built or assigned.
        converted = {}
        for i, conv in enumerate(_SEED_CONVS):
            for j, part in enumerate(("kernel", "bias")):
                array = arrays[2 * i + j]
                expected = (channels, channels) if part == "kernel" else (channels,)
                if part == "kernel" and array.ndim == 4 and array.shape[:2] == (1, 1):
                    array = array[0, 0]  # (1, 1, C_in, C_out) -> (C_in, C_out)
                if array.shape != expected:
                    raise ValueError(
                        f"Seed weight {2 * i + j} ({conv} {part}) must have shape "
                        f"{expected}"
                        + (f" or {(1, 1) + expected}" if part == "kernel" else "")
                        + f". Received: shape={arrays[2 * i + j].shape}"
                    )
                converted[f"{conv}_{part}"] = _as_float_array(
                    array, f"seed weight {2 * i + j} ({conv} {part})"
                )
        if not self.built:
            shape = [None, None, None, None]
            shape[self._channel_axis] = channels
            self.build(tuple(shape))
        self.set_weight_dict(converted)

    # ------------------------------------------------------------ BoTNet
    @classmethod
    def botnet(cls, num_heads: int = 4, position_size=None, **kwargs):
        """BoTNet's multi-head self-attention (Srinivas et al. 2021).

        Linear, bias-free q/k/v projections (`activation=None`,
        `use_bias=False`), logits scaled by 1/sqrt(key_dim) (`scale=None`),
        2-D relative position logits (`position_encoding="relative"`,
        `scale_position_logits=True` as the official code; pass False for
        timm's default), no seed position conv, and kernels initialized
        "lecun_normal" (truncated normal, stddev 1/sqrt(C), as timm). Any
        other argument, or an override of these, goes in `kwargs`.

        Import trained BoTNet or timm weights with `load_botnet_weights`.
        """
        config = {
            "activation": None,
            "use_bias": False,
            "scale": None,
            "position_encoding": "relative",
            "kernel_initializer": "lecun_normal",
            **kwargs,
        }
        return cls(num_heads=num_heads, position_size=position_size, **config)

    def load_botnet_weights(self, q_kernel, k_kernel, v_kernel, rel_height, rel_width):
        """Loads the weights of a BoTNet (official or timm) attention layer.

        Args:
            q_kernel, k_kernel: (C, num_heads * key_dim), head h in columns
                [h * key_dim, (h + 1) * key_dim).
            v_kernel: (C, C), head h in columns [h * C/heads, (h + 1) * C/heads).
            rel_height: (2 * Hr - 1, key_dim); row Hr - 1 + d holds a key d
                rows below the query (key minus query), shared across heads.
            rel_width: (2 * Wr - 1, key_dim), likewise for columns.

        The README maps the official code's and timm's parameters to these.
        The layer needs BoTNet's structure (`position_encoding="relative"`,
        `use_bias=False`, `activation=None`, as `botnet()` makes it); it is
        built from the arrays' shapes if needed, (Hr, Wr) taken from the
        tables when `position_size` is None. Nothing is built or assigned
        unless every array is valid.
        """
        self._require_settings(
            "load_botnet_weights",
            "BoTNet's structure (see MultiHeadSelfAttention2D.botnet)",
            position_encoding="relative", use_bias=False, activation=None,
        )
        names = ("q_kernel", "k_kernel", "v_kernel", "rel_height", "rel_width")
        arrays = dict(zip(names, (np.asarray(a) for a in
                                  (q_kernel, k_kernel, v_kernel, rel_height, rel_width))))
        if self.built:
            channels = self.channels
        elif arrays["q_kernel"].ndim == 2 and arrays["q_kernel"].shape[0] > 0:
            channels = arrays["q_kernel"].shape[0]
        else:
            raise ValueError(
                "`q_kernel` must have shape (C, num_heads * key_dim). "
                f"Received: q_kernel.shape={arrays['q_kernel'].shape}"
            )
        if channels % self.num_heads:
            raise ValueError(
                "The number of channels must be divisible by `num_heads`. "
                f"Received: channels={channels} (q_kernel.shape[0]), "
                f"num_heads={self.num_heads}"
            )
        key_dim = self.key_dim if self.key_dim is not None else channels // self.num_heads
        size = self.position_size
        if size is None:  # from the tables: 2 * n - 1 rows
            rows = [arrays[n].shape[0] if arrays[n].ndim == 2 else 0
                    for n in ("rel_height", "rel_width")]
            size = tuple((r + 1) // 2 if r % 2 else None for r in rows)
        expected = {
            "q_kernel": (channels, self.num_heads * key_dim),
            "k_kernel": (channels, self.num_heads * key_dim),
            "v_kernel": (channels, channels),
            "rel_height": (None if size[0] is None else 2 * size[0] - 1, key_dim),
            "rel_width": (None if size[1] is None else 2 * size[1] - 1, key_dim),
        }
        for name, shape in expected.items():
            if arrays[name].shape != shape:
                shown = shape if None not in shape else f"(2 * n - 1, {key_dim}), odd rows"
                raise ValueError(
                    f"`{name}` must have shape {shown}. "
                    f"Received: {name}.shape={arrays[name].shape}"
                )
        converted = {
            "query_kernel": _as_float_array(arrays["q_kernel"], "q_kernel"),
            "key_kernel": _as_float_array(arrays["k_kernel"], "k_kernel"),
            "value_kernel": _as_float_array(arrays["v_kernel"], "v_kernel"),
            "relative_height": _as_float_array(arrays["rel_height"], "rel_height"),
            "relative_width": _as_float_array(arrays["rel_width"], "rel_width"),
        }
        if not self.built:
            self.position_size = size
            shape = [None, None, None, None]
            shape[self._channel_axis] = channels
            self.build(tuple(shape))
        self.set_weight_dict(converted)

    def _require_settings(self, what, description, **expected):
        """ValueError listing every setting of this layer that differs from
        `expected` (activations compared by their serialized names)."""

        def comparable(name, value):
            if name == "activation":
                return keras.activations.serialize(keras.activations.get(value))
            return value

        differing = {
            name: comparable(name, getattr(self, name))
            for name, value in expected.items()
            if comparable(name, getattr(self, name)) != comparable(name, value)
        }
        if differing:
            wanted = ", ".join(f"{k}={v!r}" for k, v in expected.items())
            raise ValueError(
                f"{what} needs a layer with {description} ({wanted}). Received: "
                + ", ".join(f"{k}={v!r}" for k, v in differing.items())
            )

    def _require_built(self, what):
        if not self.built:
            raise ValueError(
                f"{what} needs a built layer: call the layer on an input (or "
                "`build(input_shape)`) first."
            )

    # ------------------------------------------------------------------ config
    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "num_heads": self.num_heads,
                "key_dim": self.key_dim,
                "activation": keras.activations.serialize(self.activation),
                "position_encoding": self.position_encoding,
                "position_size": self.position_size,
                "scale_position_logits": self.scale_position_logits,
                "scale": self.scale,
                "use_bias": self.use_bias,
                "dropout": self.dropout,
                "data_format": self.data_format,
                "kernel_initializer": keras.initializers.serialize(
                    self.kernel_initializer
                ),
                "bias_initializer": keras.initializers.serialize(self.bias_initializer),
                "position_initializer": (
                    None if self.position_initializer is None
                    else keras.initializers.serialize(self.position_initializer)
                ),
                "kernel_regularizer": keras.regularizers.serialize(
                    self.kernel_regularizer
                ),
                "bias_regularizer": keras.regularizers.serialize(self.bias_regularizer),
                "kernel_constraint": keras.constraints.serialize(self.kernel_constraint),
                "bias_constraint": keras.constraints.serialize(self.bias_constraint),
                "seed": self.seed,
            }
        )
        return config

    @classmethod
    def from_config(cls, config):
        known = set(inspect.signature(cls.__init__).parameters) - {"self", "kwargs"}
        known |= set(_BASE_LAYER_KEYS)
        unknown = sorted(set(config) - known)
        if unknown:
            raise ValueError(
                f"Unknown key(s) in the config of {cls.__name__}: {unknown}. "
                f"Known keys: {sorted(known)}. Received: config={config!r}"
            )
        return cls(**config)
