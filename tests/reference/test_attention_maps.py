"""The attention-map helper on a hand-computed 2x3 case, its errors, and the PNG.

No framework computes anything here: the scores are NumPy (one test passes
them as a tensor of the lane's backend, which only converts)."""

import numpy as np
import pytest

from mhsa_core.attention_maps import attention_maps, plot_attention_maps

H, W = 2, 3  # N = 6 tokens, token = y * W + x


def _scores():
    # scores[b, h, i, j] = 1000 b + 100 h + 10 i + j: every entry names its
    # own (item, head, query token, key token).
    b, h, i, j = np.meshgrid(
        np.arange(2), np.arange(2), np.arange(6), np.arange(6), indexing="ij"
    )
    return (1000 * b + 100 * h + 10 * i + j).astype(np.float32)


def test_golden_maps():
    maps = attention_maps(_scores(), H, W, queries=[(1, 2), (0, 1)], heads=[1])
    assert maps.shape == (2, 1, 2, H, W)
    assert maps.dtype == np.float32
    # Query (1, 2) is token 1*3 + 2 = 5; its row, keys laid out as the 2x3 map.
    np.testing.assert_array_equal(maps[0, 0, 0], [[150, 151, 152], [153, 154, 155]])
    # Query (0, 1) is token 1.
    np.testing.assert_array_equal(maps[0, 0, 1], [[110, 111, 112], [113, 114, 115]])
    # Batch item 1, same query and head.
    np.testing.assert_array_equal(
        maps[1, 0, 0], [[1150, 1151, 1152], [1153, 1154, 1155]]
    )


def test_defaults_are_every_query_and_head():
    maps = attention_maps(_scores(), H, W)
    assert maps.shape == (2, 2, 6, H, W)
    # Query q is (q // W, q % W): row-major; query (1, 0) is token 3.
    np.testing.assert_array_equal(maps[0, 1, 3], [[130, 131, 132], [133, 134, 135]])


def test_backend_tensor():
    import keras

    maps = attention_maps(
        keras.ops.convert_to_tensor(_scores()), H, W, queries=[(1, 2)], heads=[0]
    )
    assert isinstance(maps, np.ndarray)
    np.testing.assert_array_equal(
        maps[1, 0, 0], [[1050, 1051, 1052], [1053, 1054, 1055]]
    )


ERRORS = [
    pytest.param(
        dict(scores=np.zeros((2, 6, 6))), "Received: scores.shape=", id="rank-3"
    ),
    pytest.param(
        dict(scores=np.zeros((1, 2, 6, 5))), "Received: scores.shape=", id="not-square"
    ),
    pytest.param(dict(height=3), "Received: height=3, width=3", id="n-mismatch"),
    pytest.param(dict(height=0), "Received: height=0", id="height-zero"),
    pytest.param(dict(width=3.0), "Received: height=2, width=3.0", id="width-float"),
    pytest.param(
        dict(queries=[(2, 0)]), r"Received: queries=\[\(2, 0\)\]", id="query-y-out"
    ),
    pytest.param(
        dict(queries=[(0, -1)]),
        r"Received: queries=\[\(0, -1\)\]",
        id="query-x-negative",
    ),
    pytest.param(
        dict(queries=[(0,)]), r"Received: queries=\[\(0,\)\]", id="query-not-pair"
    ),
    pytest.param(dict(queries=[]), r"Received: queries=\[\]", id="no-query"),
    pytest.param(dict(heads=[2]), r"Received: heads=\[2\]", id="head-out"),
    pytest.param(dict(heads=[True]), r"Received: heads=\[True\]", id="head-bool"),
]


@pytest.mark.parametrize("change,message", ERRORS)
def test_errors(change, message):
    args = dict(scores=_scores(), height=H, width=W, queries=None, heads=None) | change
    with pytest.raises(ValueError, match=message):
        attention_maps(
            args.pop("scores"), args.pop("height"), args.pop("width"), **args
        )


@pytest.fixture(scope="module")
def png(tmp_path_factory):
    pytest.importorskip("matplotlib")
    path = tmp_path_factory.mktemp("maps") / "maps.png"
    image = np.linspace(0, 1, 8 * 12).reshape(8, 12)  # 4x the 2x3 map
    out = plot_attention_maps(
        image, _scores() / 6000, H, W, queries=[(1, 2), (0, 0)], heads=[0, 1], path=path
    )
    return path, out


def test_plot_writes_png(png):
    path, out = png
    assert out == str(path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    from matplotlib.image import imread

    h, w = imread(path).shape[:2]
    assert h > 100 and w > 100  # 2 x 2 panels at 2.4 inches, 100 dpi


PLOT_ERRORS = [
    pytest.param(dict(path="maps.jpg"), "Received: path='maps.jpg'", id="not-png"),
    pytest.param(
        dict(path="no/such/folder/m.png"),
        "Received: path='no/such/folder/m.png'",
        id="no-folder",
    ),
    pytest.param(
        dict(image=np.zeros((8, 12, 2))),
        r"Received: image.shape=\(8, 12, 2\)",
        id="image-channels",
    ),
    pytest.param(dict(item=2), "Received: item=2", id="item-out"),
    pytest.param(
        dict(queries=[(5, 5)]), r"Received: queries=\[\(5, 5\)\]", id="query-out"
    ),
    pytest.param(dict(queries=[]), r"Received: queries=\[\]", id="no-query"),
    pytest.param(dict(heads=[3]), r"Received: heads=\[3\]", id="head-out"),
]


@pytest.mark.parametrize("change,message", PLOT_ERRORS)
def test_plot_errors_write_nothing(change, message, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = (
        dict(
            image=np.zeros((8, 12)),
            scores=_scores(),
            height=H,
            width=W,
            queries=[(0, 0)],
            heads=None,
            item=0,
            path="maps.png",
        )
        | change
    )
    with pytest.raises(ValueError, match=message):
        plot_attention_maps(
            args.pop("image"),
            args.pop("scores"),
            args.pop("height"),
            args.pop("width"),
            **args,
        )
    assert list(tmp_path.iterdir()) == []
