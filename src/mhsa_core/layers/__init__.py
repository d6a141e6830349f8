"""The product: the layer, its attention arithmetic, its position encodings, the
block."""

from mhsa_core.layers.block import mhsa_block as mhsa_block
from mhsa_core.layers.mhsa2d import MultiHeadSelfAttention2D as MultiHeadSelfAttention2D

__all__ = ["MultiHeadSelfAttention2D", "mhsa_block"]
