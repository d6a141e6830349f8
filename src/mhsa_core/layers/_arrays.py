"""Array checks of the layer's weight I/O (NumPy only: the converters use them too)."""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike, DTypeLike


def as_float_array(
    array: ArrayLike, what: str, dtype: DTypeLike = "float64"
) -> np.ndarray:
    """`array` cast to a float dtype, or a ValueError naming `what`."""
    values = np.asarray(array)
    if values.dtype.kind not in "biuf" and values.dtype.name != "bfloat16":
        raise ValueError(f"{what} must hold numbers. Received: dtype={values.dtype}")
    return values.astype(dtype)
