"""position_encoding="none": no position term."""

from mhsa_core.layers.position.base import PositionEncoding
from mhsa_core.reference import schema


class NoPosition(PositionEncoding):
    """Attention over a set of tokens: permuting the positions permutes the output."""

    spec = schema.ENCODINGS["none"]
