"""position_encoding="conv": the Keras 2 YOLOv4-MHSA block's "position" conv."""

from __future__ import annotations

import keras

from mhsa_core._typing import Tensor
from mhsa_core.layers.position.base import PositionEncoding
from mhsa_core.layers.projection import Projection
from mhsa_core.layers.weights import WeightFactory
from mhsa_core.reference import schema


class ConvPosition(PositionEncoding):
    """t <- t + relu(t @ Wp + bp): a ReLU 1x1 conv of each token, added back.

    The legacy block calls it a position encoding; it sees only each token's
    own features and carries no position. Kept exact for its trained weights.
    """

    spec = schema.ENCODINGS["conv"]

    def build(self, weights: WeightFactory, channels: int, key_dim: int) -> None:
        kernel, bias = self.spec.token_weights
        self.dense = weights.projection((kernel, bias), channels, channels)

    def projections(self) -> tuple[Projection, ...]:
        return (self.dense,)

    def tokens(
        self, tokens: Tensor, height: int | Tensor, width: int | Tensor
    ) -> Tensor:
        return tokens + self.dense(tokens, keras.activations.relu)
