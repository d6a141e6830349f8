"""The interface of a position encoding of `MultiHeadSelfAttention2D`."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

from mhsa_core._typing import DType, Tensor
from mhsa_core.layers.projection import Projection
from mhsa_core.layers.weights import WeightFactory
from mhsa_core.reference import schema


class PositionEncoding:
    """One position encoding: its weights, and the terms it adds.

    The layer asks its encoding, it never branches on the encoding's name:
    `build` creates the encoding's weights through the `WeightFactory` the
    layer hands it (`mhsa_core.layers.weights`: the layer's own variables,
    with its settings, under the canonical names and in the canonical order
    of `mhsa_core.reference.schema.weight_shapes`), `tokens` may add a term to
    the tokens before the projections, `rotate` may rotate every head's q and
    k before the attention (a "qk" stage: "rope", "rope_mixed"), and
    `logits_bias` may return a term for the attention logits. The defaults
    do nothing. An encoding never sees the layer: what it needs of it comes
    through the factory, and its own settings through `from_arguments`.

    A logits term is given three ways, one per attention path
    (`mhsa_core.layers.attention`): `logits_bias` whole, (B, heads, N, N), for
    the full path; `key_term`, when the term is q_i . e_j, as the (N, kd) e_j
    that the chunked and fused paths add to the keys; else `row_tables` and
    `row_bias`, the term of a chunk of queries, for the chunked path. A term
    of no query (`bias_term`: a learned bias per head and offset) is also the
    fused kernels' additive bias, `logits_bias` whole.

    With windows (the layer's `window_size`), height and width are the
    window's, and the batch axis holds the windows.

    A new encoding is a subclass in a file of its own, registered in
    `mhsa_core.layers.position.ENCODINGS`, with its `spec` (and reference
    entry) in `mhsa_core.reference`.

    Attributes:
        spec: the encoding's `schema.Encoding` (stage, tables, constraints).
    """

    spec: ClassVar[schema.Encoding] = schema.ENCODINGS["none"]
    # Whether the logits term is q_i . e_j (`key_term`), so every path,
    # the fused kernels included, can take it in the keys.
    folds_into_keys: ClassVar[bool] = False
    # Whether the logits term is a bias that does not depend on q (per head:
    # `logits_bias` gives (1, heads, N, N)), which the fused kernels take as
    # their additive bias.
    bias_term: ClassVar[bool] = False
    # Whether every `row_tables` tensor has a leading heads axis: the chunked
    # path then hands `row_bias` the tables of the chunk's head(s) only.
    row_tables_per_head: ClassVar[bool] = False

    @property
    def name(self) -> str:
        return self.spec.name

    @classmethod
    def from_arguments(cls, arguments: Mapping[str, Any]) -> PositionEncoding:
        """The encoding for the layer's checked arguments (name -> value,
        the names of `mhsa_core.reference.arguments`); it reads its own
        settings among them (the rotary encodings: the `rope_*` ones). No
        settings by default."""
        return cls()

    def build(self, weights: WeightFactory, channels: int, key_dim: int) -> None:
        """Creates this encoding's weights with `weights` (none by default).

        Args:
            weights: the layer's `WeightFactory` (its `projection`, `table`,
                `position_size` and `variable_dtype`).
            channels: C of the tokens.
            key_dim: channels per head of q and k.
        """

    def projections(self) -> tuple[Projection, ...]:
        """This encoding's dense maps (quantized and given LoRA with the
        layer's): none by default."""
        return ()

    def tokens(
        self, tokens: Tensor, height: int | Tensor, width: int | Tensor
    ) -> Tensor:
        """Tokens (B, N, C) -> tokens with this encoding's term (unchanged by
        default)."""
        return tokens

    def rotate(
        self,
        query: Tensor,
        key: Tensor,
        height: int | Tensor,
        width: int | Tensor,
        key_height: int | Tensor | None = None,
        key_width: int | Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        """q (B, heads, N, kd) and k (B, heads, Nk, kd) as the attention
        takes them (unchanged by default).

        The layer calls it once per call, after the projections (and any
        normalization of q and k), before every attention path: the full,
        chunked and fused paths take what it returns, and the chunked path
        never rotates inside its loop. An encoding that rotates returns q
        and k in the logits dtype (float32 under mixed precision).

        `key_height`, `key_width`: the grid of the keys' map when it is not
        the queries' (a context, a reduced map; None: the query grid). A
        rotary encoding places key cell (y', x') of an H' x W' map at
        (y' * H / H', x' * W / W') of the query grid (the key map spans the
        query map), then as a query there (`position_size` scales both).
        """
        return query, key

    def logits_bias(
        self, q: Tensor, height: int | Tensor, width: int | Tensor
    ) -> Tensor | None:
        """The unscaled position term of the logits for queries q (B, heads,
        N, kd) in the logits dtype, (B, heads, N, N) or broadcastable; None
        by default."""
        return None

    def key_term(
        self, height: int | Tensor, width: int | Tensor, dtype: DType
    ) -> Tensor | None:
        """(N, kd) e_j such that the logits term is q_i . e_j, or None.

        An encoding that has one lets every attention path fold its term into
        the keys (k_j + e_j), so the fused kernels can take it. None by
        default (no term, or a term that depends on the query's position).
        """
        return None

    def row_tables(
        self, height: int | Tensor, width: int | Tensor, dtype: DType
    ) -> tuple[Tensor, ...]:
        """The tensors `row_bias` needs at this size, a tuple (empty: no term).

        Computed once per call, outside the chunk loop, and passed to
        `row_bias` as explicit arguments: the chunk body runs under
        `keras.remat`, whose TensorFlow form differentiates only its
        arguments.
        """
        return ()

    @staticmethod
    def row_bias(q_rows: Tensor, rows: Tensor, tables: tuple[Tensor, ...]) -> Tensor:
        """The logits term of a chunk of queries, (c, N).

        Args:
            q_rows: (c, kd) queries of one head (or (..., c, kd) of several).
            rows: (c,) int32, their token indices (row-major, in [0, N)).
            tables: `row_tables(...)` (already times the position scale);
                with `row_tables_per_head`, each one's slice for the head(s)
                of `q_rows` (its heads axis dropped for one head).

        Sizes come from the tensors' shapes, never from Python numbers closed
        over (torch.compile with checkpointing cannot take those).
        """
        raise NotImplementedError
