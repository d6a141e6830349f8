"""mhsa_core: 2-D multi-head self-attention for Keras 3, identical on TensorFlow, PyTorch and JAX."""

__version__ = "0.1.0"

from mhsa_core import reference as reference
from mhsa_core.block import mhsa_block as mhsa_block
from mhsa_core.layer import MultiHeadSelfAttention2D as MultiHeadSelfAttention2D

__all__ = ["MultiHeadSelfAttention2D", "mhsa_block", "reference", "__version__"]
