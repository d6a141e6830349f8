"""Position encodings of `MultiHeadSelfAttention2D`: one file each, one registry.

`ENCODINGS` maps each `position_encoding` name to its `PositionEncoding`
class. Every name of `mhsa_core.reference.schema.ENCODINGS` has one (a test
checks it).
"""

from mhsa_core.layers.position._grid import resize_table as resize_table
from mhsa_core.layers.position.absolute import AbsolutePosition
from mhsa_core.layers.position.base import PositionEncoding as PositionEncoding
from mhsa_core.layers.position.conv import ConvPosition
from mhsa_core.layers.position.none import NoPosition
from mhsa_core.layers.position.relative import RelativePosition
from mhsa_core.layers.position.relative_bias import RelativeBias
from mhsa_core.layers.position.rope import RopePosition
from mhsa_core.layers.position.rope_mixed import MixedRopePosition
from mhsa_core.layers.position.sinusoidal import SinusoidalPosition
from mhsa_core.layers.position.sinusoidal import (
    sinusoidal_embedding as sinusoidal_embedding,
)

ENCODINGS = {
    cls.spec.name: cls
    for cls in (
        NoPosition,
        ConvPosition,
        SinusoidalPosition,
        RelativePosition,
        AbsolutePosition,
        RopePosition,
        MixedRopePosition,
        RelativeBias,
    )
}

__all__ = ["ENCODINGS", "PositionEncoding", "resize_table", "sinusoidal_embedding"]
