"""The reference's position helpers: the sinusoidal embedding, the linear
resize of the learned tables and the rotary angles and rotation, against
values computed by hand and np.interp."""

import math

import numpy as np
import pytest

from mhsa_core import reference
from mhsa_core.reference import forward as reference_forward
from mhsa_core.reference import position, schema
from mhsa_core.reference import position as reference_position

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


# ------------------------------------------------------ rotary encodings
def _rope(**arguments):
    position_size = arguments.pop("position_size", None)
    return schema.rope_settings("rope", position_size=position_size, **arguments)


@pytest.mark.parametrize(
    "arguments,expected",
    [
        # kd = 8: frequencies 1 and 100^(-1/2) = 0.1; offset 1: t_y = [1],
        # t_x = [1, 2]; token 1 = (y, x) = (0, 1): [1, 0.1 | 2, 0.2] ("ij").
        (
            {"rope_temperature": 100.0, "rope_grid_offset": 1.0},
            [[1, 0.1, 1, 0.1], [1, 0.1, 2, 0.2]],
        ),
        # "xy": the column's angles first.
        (
            {"rope_temperature": 100.0, "rope_grid_indexing": "xy"},
            [[0, 0, 0, 0], [1, 0.1, 0, 0]],
        ),
        # Reference grid (2, 4) at 1x2: t_y = 0 / 1 * 2 = [0], t_x = [0, 1] / 2 * 4.
        (
            {"rope_temperature": 100.0, "position_size": (2, 4)},
            [[0, 0, 0, 0], [0, 0, 2, 0.2]],
        ),
        # In pixels, max resolution 8: t = linspace(-1, 1) ([-1] for one cell),
        # frequencies pi * 2^[0, log2(8) - 1] = [pi, 4 pi].
        (
            {"rope_in_pixels": True, "rope_max_resolution": 8},
            np.pi * np.array([[-1, -4, -1, -4], [-1, -4, 1, 4]]),
        ),
    ],
    ids=["offset", "xy", "reference_grid", "in_pixels"],
)
def test_golden_rope_angles(arguments, expected):
    angles = position.rope_angles(1, 2, 8, _rope(**arguments))
    np.testing.assert_allclose(angles, expected, rtol=1e-15, atol=1e-15)


def test_golden_rope_mixed_angles():
    # One head, kd = 4: token (y, x) gets t_x F[0] + t_y F[1].
    f = np.array([[[1.0, 0.5]], [[0.0, 3.0]]])  # (2, 1, 2)
    xy = position.rope_mixed_angles(2, 2, f, "xy")[0]  # t_x = x, t_y = y
    ij = position.rope_mixed_angles(2, 2, f, "ij")[0]  # t_x = y, t_y = x
    # tokens (0, 0), (0, 1), (1, 0), (1, 1)
    np.testing.assert_allclose(xy, [[0, 0], [1, 0.5], [0, 3], [1, 3.5]])
    np.testing.assert_allclose(ij, [[0, 0], [0, 3], [1, 0.5], [1, 3.5]])


def test_golden_rotate():
    v = np.array([[1.0, 2.0, 3.0, 4.0]])
    a, b = 0.3, 1.1  # the two angles of the token
    c, s = math.cos, math.sin
    # Interleaved: pairs (0, 1) by a, (2, 3) by b.
    np.testing.assert_allclose(
        position.rotate(v, np.array([[a, b]]), "interleaved"),
        [
            [
                1 * c(a) - 2 * s(a),
                2 * c(a) + 1 * s(a),
                3 * c(b) - 4 * s(b),
                4 * c(b) + 3 * s(b),
            ]
        ],
        rtol=1e-15,
    )
    # Half: channel i with i + 2; tables [cos a, cos a, cos b, cos b] (timm's),
    # so channel 0 and 1 use a, 2 and 3 use b.
    np.testing.assert_allclose(
        position.rotate(v, np.array([[a, b]]), "half"),
        [
            [
                1 * c(a) - 3 * s(a),
                2 * c(a) - 4 * s(a),
                3 * c(b) + 1 * s(b),
                4 * c(b) + 2 * s(b),
            ]
        ],
        rtol=1e-15,
    )


# ------------------------------------------- Swin's per-head bias and windows
def test_golden_geometric_offsets():
    # 3 -> 5 rows: one offset each side (n = 1), whose sum 1 never exceeds
    # m = 2, so q bisects up to 1.5 and is not used: offsets stay -1, 0, 1.
    assert reference_position.geometric_offsets(3, 5) == [-1.0, 0.0, 1.0]
    # 5 -> 7 rows: 1 + q never reaches m = 3 in [1.01, 1.5]: q -> 1.5 (the
    # last bisection midpoint, 1.5 - 9.3e-7), offsets at +-1 and +-(1 + q).
    offsets = reference_position.geometric_offsets(5, 7)
    np.testing.assert_allclose(offsets, [-2.5, -1.0, 0.0, 1.0, 2.5], atol=2e-6)
    assert offsets[2] == 0.0 and offsets[3] == 1.0
    # 13 -> 23 rows (Swin's window 7 -> 12): sum_{k<6} q^k ~ m = 11.
    offsets = np.asarray(reference_position.geometric_offsets(13, 23))
    q = offsets[8] - offsets[7]
    np.testing.assert_allclose(sum(q**k for k in range(6)), 11.0, rtol=1e-5)
    np.testing.assert_array_equal(offsets, -offsets[::-1])  # symmetric


def test_golden_resize_bias_table():
    # 3x3 -> 5x5: offsets stay at -1, 0, 1 and the new outer offsets (+-2)
    # clamp to the table's ends: the table padded by its edge rows/columns.
    table = np.arange(9.0).reshape(3, 3, 1)
    out = reference_position.resize_bias_table(table, 5, 5)
    np.testing.assert_array_equal(out[..., 0], np.pad(table[..., 0], 1, mode="edge"))
    # 1x1 -> any size: one offset, a constant table.
    out = reference_position.resize_bias_table(np.full((1, 1, 2), 3.0), 3, 5)
    np.testing.assert_array_equal(out, np.full((3, 5, 2), 3.0))
    # 5 -> 7 rows along y (1 row along x, unchanged): target -2 sits 1/3 of
    # the way from -2.5 (row 0) to -1 (row 1); +2 likewise from +1 to +2.5.
    table = np.array([0.0, 3.0, 6.0, 9.0, 12.0]).reshape(5, 1, 1)
    out = reference_position.resize_bias_table(table, 7, 1)[:, 0, 0]
    np.testing.assert_allclose(out, [0.0, 1.0, 3.0, 6.0, 9.0, 11.0, 12.0], atol=1e-5)


@pytest.mark.parametrize("shape", [(13, 13, 3), (5, 9, 2), (1, 1, 1)])
def test_resize_bias_table_is_the_identity_at_its_size(shape):
    table = np.random.default_rng(0).standard_normal(shape)
    out = reference_position.resize_bias_table(table, *shape[:2])
    np.testing.assert_array_equal(out, table)


@pytest.mark.parametrize("size", [(13, 23), (13, 9), (5, 13), (3, 7)])
def test_resize_bias_table_keeps_offset_zero(size):
    """Offset 0 sits at 0 on both grids: the center entry survives exactly."""
    src, dst = size
    table = np.random.default_rng(src).standard_normal((src, src, 2))
    out = reference_position.resize_bias_table(table, dst, dst)
    np.testing.assert_array_equal(out[dst // 2, dst // 2], table[src // 2, src // 2])


def test_golden_relative_bias_index_of_a_2x2_window():
    """Entry (i, j) of the bias is table[y_i - y_j + 1, x_i - x_j + 1]: with
    the 3x3 table holding its own flat index, the bias is Swin's
    relative_position_index of a 2x2 window (query minus key)."""
    weights = {"relative_bias_table": np.arange(9.0).reshape(3, 3, 1)}
    bias = reference_position.position_bias(weights, "relative_bias", 2, 2)
    np.testing.assert_array_equal(
        bias[0],
        [[4, 3, 1, 0], [5, 4, 2, 1], [7, 6, 4, 3], [8, 7, 5, 4]],
    )


def test_golden_shift_layout_of_a_4x4_map():
    """Window 2, shift 1 on a 4x4 map: the map rolled by -1 along both axes
    and cut into four 2x2 windows; regions separate the wrapped row 0 and
    column 0 (now last) from the rest: Swin's shifted-window mask."""
    extent, windows, regions = reference_forward.window_layout(4, 4, 2, 1)
    assert extent == (2, 2)
    # Token y * 4 + x at shifted position (gy, gx) is ((gy+1) % 4, (gx+1) % 4).
    assert windows == [[5, 6, 9, 10], [7, 4, 11, 8], [13, 14, 1, 2], [15, 12, 3, 0]]
    # 2 * (y < 1) + (x < 1): which wrapped edge a token came from.
    assert regions == [[0, 0, 0, 0], [0, 1, 0, 1], [0, 0, 2, 2], [0, 1, 2, 3]]


def test_shift_is_dropped_where_the_map_fits_one_window():
    """As timm's Swin: along an axis where H <= window, no shift (and one
    window along it); the other axis keeps its shift."""
    extent, windows, regions = reference_forward.window_layout(2, 4, 2, 1)
    assert windows == [[1, 2, 5, 6], [3, 0, 7, 4]]
    assert regions == [[0, 0, 0, 0], [0, 1, 0, 1]]


def test_padding_slots():
    """3x3 map, window 2: padded to 4x4 at the bottom and right, -1 slots."""
    _, windows, regions = reference_forward.window_layout(3, 3, 2)
    assert windows == [[0, 1, 3, 4], [2, -1, 5, -1], [6, 7, -1, -1], [8, -1, -1, -1]]
    assert regions[3] == [0, -1, -1, -1]
