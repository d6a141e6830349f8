"""Array checks of the layer's weight I/O (NumPy only: the converters use them too)."""

import numpy as np


def as_float_array(array, what, dtype="float64"):
    """`array` cast to a float dtype, or a ValueError naming `what`."""
    array = np.asarray(array)
    if array.dtype.kind not in "biuf" and array.dtype.name != "bfloat16":
        raise ValueError(f"{what} must hold numbers. Received: dtype={array.dtype}")
    return array.astype(dtype)
