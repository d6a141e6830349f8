"""The reference's position helpers: the sinusoidal embedding and the
linear resize of the learned tables, against values computed by hand and
np.interp."""

import math

import numpy as np
import pytest

from mhsa_core import reference

pytestmark = pytest.mark.machine_sensitive


def test_golden_sinusoidal_embedding():
    # C = 4: one frequency (w_0 = 1): [sin y, cos y, sin x, cos x].
    p = reference.sinusoidal_embedding(2, 3, 4)
    y, x = 1, 2  # token 5, row-major
    # NumPy's sin/cos (SIMD kernels chosen by the CPU) and libm's (math.sin)
    # are two implementations, each within a few ulp of the true value, not
    # bit-identical to each other on every machine: compare to 4 ulp.
    np.testing.assert_allclose(
        p[5],
        [math.sin(y), math.cos(y), math.sin(x), math.cos(x)],
        rtol=4 * np.finfo(np.float64).eps,
        atol=0,
    )
    # C = 8: frequencies 1 and 10000^(-1/2) = 0.01.
    p = reference.sinusoidal_embedding(1, 2, 8)
    np.testing.assert_allclose(
        p[1],
        [0, 0, 1, 1, math.sin(1), math.sin(0.01), math.cos(1), math.cos(0.01)],
        rtol=1e-15,
        atol=0,
    )
    with pytest.raises(ValueError, match="divisible by 4"):
        reference.sinusoidal_embedding(2, 2, 6)


def test_golden_resize_table():
    # Upsizing 3 -> 5 rows: s = (t + 0.5) * 3/5 - 0.5 = -0.2, 0.4, 1, 1.6, 2.2,
    # clamped to [0, 2].
    table = np.array([[0.0], [1.0], [4.0]])
    np.testing.assert_allclose(
        reference.resize_table(table, 5)[:, 0],
        [0.0, 0.4, 1.0, 1.0 + 0.6 * 3, 4.0],
        rtol=1e-15,
    )
    # Downsizing 4 -> 2 rows: s = 0.5 and 2.5, the midpoints.
    table = np.array([[0.0], [2.0], [4.0], [8.0]])
    np.testing.assert_allclose(reference.resize_table(table, 2)[:, 0], [1.0, 6.0])
    # To one row: the center of the table.
    np.testing.assert_allclose(reference.resize_table(table, 1)[:, 0], [3.0])


@pytest.mark.parametrize(
    "rows,length", [(9, 9), (9, 15), (9, 5), (9, 1), (7, 13), (1, 5), (4, 11)]
)
def test_resize_table_is_np_interp_at_half_pixel_centers(rows, length):
    table = np.random.default_rng(rows * length).standard_normal((rows, 3))
    out = reference.resize_table(table, length)
    # np.interp clamps at the ends by itself, as the rule does.
    s = (np.arange(length) + 0.5) * rows / length - 0.5
    expected = np.stack(
        [np.interp(s, np.arange(rows), table[:, c]) for c in range(3)], -1
    )
    np.testing.assert_allclose(out, expected, rtol=0, atol=1e-14)
    if rows == length:
        np.testing.assert_array_equal(out, table)  # bit for bit at the same size


@pytest.mark.parametrize(
    "ref_size,size", [(5, 5), (5, 8), (5, 3), (5, 1), (1, 4), (2, 7)]
)
def test_resized_relative_table_keeps_offset_zero_in_the_middle(ref_size, size):
    """Offset 0 (the center row) maps to offset 0 at any size: the table's
    center row survives resizing exactly."""
    table = np.random.default_rng(0).standard_normal((2 * ref_size - 1, 4))
    resized = reference.resize_table(table, 2 * size - 1)
    np.testing.assert_array_equal(resized[size - 1], table[ref_size - 1])
