"""What a result file (.npz) can hold: `portable`, used by every worker task."""

import numpy as np

__all__ = ["portable"]


def portable(array):
    """`array` as NumPy that .npz can hold: bfloat16 (an ml_dtypes type, which
    .npz cannot store) becomes float32, exactly; everything else as it is."""
    array = np.asarray(array)
    if array.dtype.name == "bfloat16":
        array = array.astype(np.float32)
    return array
