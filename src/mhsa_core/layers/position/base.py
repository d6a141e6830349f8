"""The interface of a position encoding of `MultiHeadSelfAttention2D`."""

from __future__ import annotations

from typing import ClassVar

from mhsa_core.reference import schema


class PositionEncoding:
    """One position encoding: its weights, and the terms it adds.

    The layer asks its encoding, it never branches on the encoding's name:
    `build` creates the encoding's weights on the layer (so they are the
    layer's own variables, in the canonical order of
    `mhsa_core.reference.schema.weight_shapes`), `tokens` may add a term to
    the tokens before the projections, and `logits_bias` may return a term
    for the attention logits. The defaults do nothing.

    A new encoding is a subclass in a file of its own, registered in
    `mhsa_core.layers.position.ENCODINGS`, with its `spec` (and reference
    entry) in `mhsa_core.reference`.

    Attributes:
        spec: the encoding's `schema.Encoding` (stage, tables, constraints).
        layer: the `MultiHeadSelfAttention2D` it belongs to.
    """

    spec: ClassVar[schema.Encoding] = schema.ENCODINGS["none"]

    def __init__(self, layer):
        self.layer = layer

    @property
    def name(self) -> str:
        return self.spec.name

    def check_channels(self, channels: int) -> None:
        """ValueError unless this encoding can work with `channels`."""
        multiple = self.spec.channels_multiple
        if channels % multiple:
            raise ValueError(
                f"position_encoding={self.name!r} needs channels divisible by "
                f"{multiple}. Received: channels={channels}"
            )

    def build(self, channels: int, key_dim: int) -> None:
        """Creates this encoding's weights on the layer (none by default)."""

    def tokens(self, tokens, height, width):
        """Tokens (B, N, C) -> tokens with this encoding's term (unchanged by default)."""
        return tokens

    def logits_bias(self, q, height, width):
        """The unscaled position term of the logits for queries q (B, heads,
        N, kd) in the logits dtype, (B, heads, N, N) or broadcastable; None
        by default."""
        return None
