"""A planted bug for the matrix's own tests: imported by the workers only.

Under torch, the layer's int8 activation quantizer truncates toward zero
(a cast to int8 without rounding: a classic bug) instead of rounding half to
even. The weights, their integers and every other backend are untouched.

Never import this in the test process: it patches the `abs_max_quantize`
that the int8 dense maps (`mhsa_core.layers.projection`) call.
"""

import keras
from keras import ops

from mhsa_core.layers import projection

_abs_max_quantize = projection.abs_max_quantize


def _truncating_on_torch(x, value_range, axis=-1):
    q, scale = _abs_max_quantize(x, value_range, axis)
    if keras.backend.backend() != "torch":
        return q, scale
    truncated = ops.clip(ops.trunc(x * scale), value_range[0], value_range[1])
    return ops.cast(truncated, "int8"), scale


projection.abs_max_quantize = _truncating_on_torch
