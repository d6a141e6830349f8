"""How the layer's weights are made and applied: `WeightFactory` and `dense`.

`MultiHeadSelfAttention2D.build` makes one `WeightFactory` and creates its
q/k/v projections and its position encoding's weights through it, so every
weight gets the layer's settings (initializers, regularizers, constraints,
`use_bias`, dtype policy) in one place, and an encoding never sees the layer.
The factory creates variables under the names it is given (the canonical names
of `mhsa_core.reference.schema.weight_shapes`); the layer's variable paths are
"<layer path>/<name>", as `add_weight` makes them, and the order of creation
is the order of the calls (the canonical order, which `.keras` files and the
layer's weight dict rely on).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import keras
from keras import ops

from mhsa_core._typing import Tensor
from mhsa_core.layers.projection import Projection
from mhsa_core.reference import schema

__all__ = ["WeightFactory", "dense"]


def dense(
    tokens: Tensor,
    kernel: Tensor,
    bias: Tensor | None,
    activation: Callable[[Tensor], Tensor] | None = None,
) -> Tensor:
    """activation(tokens @ kernel + bias), tokens (B, N, C_in) -> (B, N, C_out).

    `bias` may be None (`use_bias=False`), `activation` None (linear).
    """
    # einsum, not matmul: keras 3.15's torch `ops.matmul` computes float64
    # inputs in float32 (its result_type maps 64-bit to 32-bit; canary
    # "matmul-float64" in tests/canaries).
    y = ops.einsum("bnc,cd->bnd", tokens, kernel)
    if bias is not None:
        y = y + bias
    return y if activation is None else activation(y)


class WeightFactory:
    """Creates a layer's weights with its settings.

    Args:
        owner: the layer: its `add_weight` makes the variables (the layer's
            own: tracked, saved and loaded with it).
        use_bias: whether projections get a bias.
        kernel_initializer, bias_initializer, kernel_regularizer,
            bias_regularizer, kernel_constraint, bias_constraint: the
            projections' settings (Keras objects).
        position_initializer: the tables' initializer, or None: normal with
            stddev `schema.table_stddev(key_dim)` (BoTNet's and timm's).
        position_size: (Hr, Wr), the reference size of learned tables, or None.
        num_heads: the layer's heads (per-head position weights).
        variable_dtype: the layer's variable dtype (float32 under mixed
            precision), for weights computed rather than learned.
        num_heads: the layer's heads (a per-head table has one column each).
    """

    def __init__(
        self,
        owner: keras.layers.Layer,
        *,
        use_bias: bool,
        kernel_initializer: keras.initializers.Initializer,
        bias_initializer: keras.initializers.Initializer,
        kernel_regularizer: keras.regularizers.Regularizer | None,
        bias_regularizer: keras.regularizers.Regularizer | None,
        kernel_constraint: keras.constraints.Constraint | None,
        bias_constraint: keras.constraints.Constraint | None,
        position_initializer: keras.initializers.Initializer | None,
        position_size: tuple[int, ...] | None,
        variable_dtype: str,
        num_heads: int = 1,
    ) -> None:
        self._owner = owner
        self._add_weight = owner.add_weight
        self._use_bias = use_bias
        self._kernel = {
            "initializer": kernel_initializer,
            "regularizer": kernel_regularizer,
            "constraint": kernel_constraint,
        }
        self._bias = {
            "initializer": bias_initializer,
            "regularizer": bias_regularizer,
            "constraint": bias_constraint,
        }
        self._position_initializer = position_initializer
        self._default_table_initializers: dict[float, Any] = {}
        self.position_size = position_size
        self.variable_dtype = variable_dtype
        self.num_heads = num_heads

    def projection(
        self,
        names: tuple[str, str],
        in_width: int,
        out_width: int,
        *,
        use_bias: bool | None = None,
    ) -> Projection:
        """A 1x1 projection: kernel (in, out), bias (out,) or None, as the
        `Projection` that applies them (and quantizes them, adds LoRA).

        `names`: (kernel name, bias name), e.g. ("query_kernel", "query_bias").
        `use_bias`: whether this one has a bias; None: the factory's setting
        (EVA's key projection has none while q and v have one).
        """
        kernel_name, bias_name = names
        kernel = self._add_weight(
            name=kernel_name, shape=(in_width, out_width), **self._kernel
        )
        bias = None
        if self._use_bias if use_bias is None else use_bias:
            bias = self._add_weight(name=bias_name, shape=(out_width,), **self._bias)
        return Projection(self._owner, kernel_name, kernel, bias)

    def conv(
        self, names: tuple[str, str], shape: tuple[int, ...]
    ) -> tuple[Tensor, Tensor | None]:
        """(kernel `shape`, bias (shape[-1],) or None) of a convolution
        (`kv_reduction`'s: (R, R, C, C) HWIO, or (C, C) for a 1x1 conv), with
        the projections' settings."""
        kernel_name, bias_name = names
        kernel = self._add_weight(name=kernel_name, shape=shape, **self._kernel)
        bias = None
        if self._use_bias:
            bias = self._add_weight(name=bias_name, shape=(shape[-1],), **self._bias)
        return kernel, bias

    def norm(self, names: tuple[str, ...], width: int) -> tuple[Tensor, Tensor | None]:
        """(scale (width,), bias (width,) or None) of a norm, initialized to 1
        and 0 as Keras's LayerNormalization and timm's norms.

        `names`: (scale name,) or (scale name, bias name)
        (`schema.norm_weight_names`). Not autocast: float32 under mixed
        precision, the dtype the norm computes in (`layers/norms.py`). No
        regularizer or constraint: those of the layer are the projections'.
        """
        scale = self._add_weight(
            name=names[0], shape=(width,), initializer="ones", autocast=False
        )
        bias = None
        if len(names) > 1:
            bias = self._add_weight(
                name=names[1], shape=(width,), initializer="zeros", autocast=False
            )
        return scale, bias

    def table(
        self, name: str, shape: tuple[int, ...], stddev: float | None = None
    ) -> Tensor:
        """A learned position table: (rows, key_dim), or a per-head table.

        Initialized by `position_initializer`, else normal with `stddev`
        (default `schema.table_stddev(shape[1])`, 1 / sqrt(key_dim)). Not
        autocast: float32 under mixed precision, like the logits it feeds.
        """
        if stddev is None:
            stddev = schema.table_stddev(shape[1])
        return self._add_weight(
            name=name,
            shape=shape,
            initializer=self._table_initializer(stddev),
            autocast=False,
        )

    def position_weight(
        self,
        name: str,
        shape: tuple[int, ...],
        initializer: keras.initializers.Initializer,
    ) -> Tensor:
        """A learned position weight other than a table (RoPE-Mixed's
        frequencies): `position_initializer` if the layer has one, else the
        encoding's own `initializer`. Not autocast (float32 under mixed
        precision), like the tables."""
        return self._add_weight(
            name=name,
            shape=shape,
            initializer=self._position_initializer or initializer,
            autocast=False,
        )

    def _table_initializer(self, stddev: float) -> keras.initializers.Initializer:
        if self._position_initializer is not None:
            return self._position_initializer
        # One default initializer per factory (per build) and spread, shared
        # by the tables, as the layer always made it: an unseeded Keras
        # initializer draws its seed once, when it is made, so a second one
        # would change the tables that `keras.utils.set_random_seed` gives.
        if stddev not in self._default_table_initializers:
            self._default_table_initializers[stddev] = keras.initializers.RandomNormal(
                stddev=stddev
            )
        return self._default_table_initializers[stddev]
