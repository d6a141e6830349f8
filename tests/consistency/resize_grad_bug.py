"""A planted bug for the matrix's own tests: imported by the workers only.

Under JAX, a position table resized to another size carries no gradient
(`stop_gradient`); at its reference size, and on the other backends, nothing
changes, and the forward pass is the same everywhere. Only the gradients of
the tables at a size other than `position_size` are wrong, on JAX.

Never import this in the test process: it patches the `resize_table` that
the learned tables (`mhsa_core.layers.position.tables`) call.
"""

import keras
from keras import ops

from mhsa_core.layers.position import tables

_resize_table = tables.resize_table


def _resize_table_without_gradient_on_jax(table, length):
    out = _resize_table(table, length)
    if keras.backend.backend() == "jax" and out is not table:
        return ops.stop_gradient(out)
    return out


tables.resize_table = _resize_table_without_gradient_on_jax
