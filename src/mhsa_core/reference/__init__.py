"""The NumPy oracle: float64 forward pass, position encodings, budgets, schema,
and the layer's argument rules (`arguments`).

Imports nothing but NumPy (no framework), so tests, the CLI's parent process
and the native references can use it anywhere.
"""

from mhsa_core.reference import arguments as arguments
from mhsa_core.reference import schema as schema
from mhsa_core.reference.budget import FLOAT64_RTOL as FLOAT64_RTOL
from mhsa_core.reference.budget import FLOOR as FLOOR
from mhsa_core.reference.budget import error_budget as error_budget
from mhsa_core.reference.budget import float32_budget as float32_budget
from mhsa_core.reference.budget import float64_budget as float64_budget
from mhsa_core.reference.budget import max_abs as max_abs
from mhsa_core.reference.forward import LAYER_ARGUMENTS as LAYER_ARGUMENTS
from mhsa_core.reference.forward import mhsa_forward as mhsa_forward
from mhsa_core.reference.forward import reference_config as reference_config
from mhsa_core.reference.forward import rounded_forward as rounded_forward
from mhsa_core.reference.forward import window_layout as window_layout
from mhsa_core.reference.position import position_bias as position_bias
from mhsa_core.reference.position import position_logits as position_logits
from mhsa_core.reference.position import resize_bias_table as resize_bias_table
from mhsa_core.reference.position import resize_table as resize_table
from mhsa_core.reference.position import sinusoidal_embedding as sinusoidal_embedding
from mhsa_core.reference.schema import POSITION_ENCODINGS as POSITION_ENCODINGS
from mhsa_core.reference.schema import PRESETS as PRESETS
from mhsa_core.reference.schema import random_weights as random_weights
from mhsa_core.reference.schema import weight_shapes as weight_shapes

__all__ = [
    "mhsa_forward",
    "rounded_forward",
    "reference_config",
    "LAYER_ARGUMENTS",
    "error_budget",
    "float32_budget",
    "float64_budget",
    "max_abs",
    "FLOAT64_RTOL",
    "FLOOR",
    "random_weights",
    "weight_shapes",
    "resize_table",
    "sinusoidal_embedding",
    "position_logits",
    "position_bias",
    "resize_bias_table",
    "window_layout",
    "POSITION_ENCODINGS",
    "PRESETS",
    "schema",
    "arguments",
]
