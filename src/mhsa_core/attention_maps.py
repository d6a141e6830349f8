"""Attention maps: what each query position of a 2-D map attends to.

    _, scores = layer(x, return_attention_scores=True)    # (B, heads, N, N)
    maps = attention_maps(scores, H, W, queries=[(0, 0), (3, 4)])
    maps.shape                                              # (B, heads, 2, H, W)
    plot_attention_maps(image, scores, H, W, queries=[(3, 4)], path="maps.png")

Tokens are the map's positions in row-major order (token = y * W + x), as the
layer flattens them in both data formats, so the scores row of query (y, x)
reshaped to (H, W) is that query's map. NumPy only at import; matplotlib (the
`plot` extra) only inside `plot_attention_maps`.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable, Sequence

import numpy as np
from numpy.typing import ArrayLike

from mhsa_core._typing import Tensor
from mhsa_core.reference.arguments import is_int as _is_int


def attention_maps(
    scores: Tensor | ArrayLike,
    height: int,
    width: int,
    *,
    queries: Sequence[tuple[int, int]] | None = None,
    heads: Sequence[int] | None = None,
) -> np.ndarray:
    """Per-query (H, W) attention maps from the layer's attention scores.

    Args:
        scores: Attention probabilities of shape (B, heads, N, N), N =
            height * width, as `call(..., return_attention_scores=True)`
            returns them: a NumPy array or any backend's tensor.
        height: H of the map the scores were computed on.
        width: W of that map.
        queries: Query positions as (y, x) pairs, 0 <= y < H, 0 <= x < W.
            None: every position, in row-major order.
        heads: Head indices to keep. None: every head.

    Returns:
        A NumPy array (B, len(heads), len(queries), H, W), in the scores'
        dtype: `maps[b, h, q]` is how much query `queries[q]` attends to each
        position, under head `heads[h]` (each map sums to 1 for unmasked rows).

    Raises:
        ValueError: scores not of rank 4 with N x N rows, N != height * width,
            a query outside the map, or a head index out of range.
    """
    scores = _to_numpy(scores)
    height, width = _check_size(height, width)
    if scores.ndim != 4 or scores.shape[2] != scores.shape[3]:
        raise ValueError(
            "`scores` must have shape (B, heads, N, N). "
            f"Received: scores.shape={scores.shape}"
        )
    if scores.shape[3] != height * width:
        raise ValueError(
            f"`scores` have N={scores.shape[3]} tokens, not height * width = "
            f"{height * width}. Received: height={height}, width={width}, "
            f"scores.shape={scores.shape}"
        )
    head_index = _check_heads(heads, scores.shape[1])
    query_pos = _check_queries(queries, height, width)
    rows = [y * width + x for y, x in query_pos]
    picked = scores[:, head_index][:, :, rows]  # (B, heads', queries', N)
    return picked.reshape(picked.shape[:3] + (height, width))


def plot_attention_maps(
    image: Tensor | ArrayLike,
    scores: Tensor | ArrayLike,
    height: int,
    width: int,
    *,
    queries: Sequence[tuple[int, int]],
    path: str | os.PathLike,
    heads: Sequence[int] | None = None,
    item: int = 0,
    alpha: float = 0.6,
    cmap: str = "inferno",
) -> str:
    """Writes a PNG of attention maps overlaid on the input image.

    One panel per (query, head): rows are the queries, columns the heads. Each
    map is upsampled to the image size (nearest: one token covers one cell of
    the image, the map's resolution is not smoothed over), drawn over the
    image with its own colour scale (0 to its maximum, shown in the title),
    and the query's cell is marked with a cross. Needs matplotlib
    (`pip install mhsa-core[plot]`); uses no pyplot state.

    Args:
        image: The input image of batch item `item`: (Hi, Wi) grey, or
            (Hi, Wi, 1) / (Hi, Wi, 3) channels_last. Any size; typically the
            network input, while (height, width) is the attention layer's map.
        scores: (B, heads, N, N) attention probabilities (see `attention_maps`).
        height: H of the attention layer's map.
        width: W of the attention layer's map.
        queries: Query positions (y, x) on the (height, width) map.
        path: Where to write the PNG (must end in ".png"; its folder must
            exist). Written whole or not at all.
        heads: Head indices to show. None: every head.
        item: The batch item of `scores` that `image` is.
        alpha: Opacity of the maps over the image.
        cmap: Matplotlib colour map of the maps.

    Returns:
        `path`, as a string.

    Raises:
        ValueError: as `attention_maps`, or a bad `image`, `item` or `path`.
    """
    path = os.fspath(path)
    if not str(path).lower().endswith(".png"):
        raise ValueError(f"`path` must end in '.png'. Received: path={path!r}")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise ValueError(
            f"The folder of `path` does not exist. Received: path={path!r}"
        )
    image = _to_numpy(image)
    if not (image.ndim == 2 or (image.ndim == 3 and image.shape[2] in (1, 3))):
        raise ValueError(
            "`image` must be (Hi, Wi), (Hi, Wi, 1) or (Hi, Wi, 3). "
            f"Received: image.shape={image.shape}"
        )
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[:, :, 0]
    if queries is None or len(queries) == 0:
        raise ValueError(
            f"Give at least one query position (y, x). Received: queries={queries!r}"
        )
    maps = attention_maps(scores, height, width, queries=queries, heads=heads)
    if (
        isinstance(item, bool)
        or not isinstance(item, (int, np.integer))
        or not 0 <= item < maps.shape[0]
    ):
        raise ValueError(
            f"`item` must be a batch index in [0, {maps.shape[0]}). "
            f"Received: item={item!r}"
        )
    head_index = _check_heads(heads, _to_numpy(scores).shape[1])
    query_pos = _check_queries(queries, height, width)
    maps = maps[item].astype(np.float64)  # (heads', queries', H, W)

    from matplotlib.figure import Figure  # the `plot` extra: lazy

    image_h, image_w = image.shape[:2]
    rows, cols = len(query_pos), len(head_index)
    fig = Figure(figsize=(2.4 * cols, 2.4 * rows), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False)
    # Cell size of one token in image pixels, for the query marker.
    cell_h, cell_w = image_h / height, image_w / width
    for q, (y, x) in enumerate(query_pos):
        for h, head in enumerate(head_index):
            ax = axes[q][h]
            ax.imshow(image, cmap="gray" if image.ndim == 2 else None)
            m = _upsample_nearest(maps[h, q], image_h, image_w)
            top = float(maps[h, q].max())
            ax.imshow(m, cmap=cmap, alpha=alpha, vmin=0.0, vmax=top if top > 0 else 1.0)
            ax.plot(
                (x + 0.5) * cell_w - 0.5,
                (y + 0.5) * cell_h - 0.5,
                marker="x",
                color="cyan",
                markersize=9,
                markeredgewidth=2,
            )
            ax.set_title(f"query ({y}, {x}), head {head}\nmax {top:.2f}", fontsize=8)
            ax.set_xticks([])
            ax.set_yticks([])
    # Written to a temporary file in the same folder, then renamed: a failed
    # save leaves no partial PNG at `path`.
    tmp = f"{path}.{os.getpid()}.tmp.png"
    try:
        fig.savefig(tmp, format="png", dpi=100)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return str(path)


def _to_numpy(x: Tensor | ArrayLike) -> np.ndarray:
    # A backend tensor (a torch tensor that requires grad refuses
    # np.asarray) goes through Keras when Keras is already loaded; this module
    # never imports a framework itself.
    if not isinstance(x, np.ndarray) and "keras" in sys.modules:
        import keras

        if keras.ops.is_tensor(x):
            return np.asarray(keras.ops.convert_to_numpy(x))
    return np.asarray(x)


def _check_size(height: object, width: object) -> tuple[int, int]:
    if not (_is_int(height) and _is_int(width) and height > 0 and width > 0):
        raise ValueError(
            "`height` and `width` must be positive integers. "
            f"Received: height={height!r}, width={width!r}"
        )
    return int(height), int(width)


def _check_heads(heads: Iterable[int] | None, num_heads: int) -> list[int]:
    if heads is None:
        return list(range(num_heads))
    heads = list(heads)
    if not heads or not all(_is_int(h) and 0 <= h < num_heads for h in heads):
        raise ValueError(
            f"`heads` must be head indices in [0, {num_heads}) (the scores have "
            f"{num_heads} heads). Received: heads={heads!r}"
        )
    return [int(h) for h in heads]


def _check_queries(
    queries: Iterable[Sequence[int]] | None, height: int, width: int
) -> list[tuple[int, int]]:
    if queries is None:
        return [(y, x) for y in range(height) for x in range(width)]
    queries = list(queries)
    ok = bool(queries) and all(
        isinstance(q, (tuple, list, np.ndarray))
        and len(q) == 2
        and _is_int(q[0])
        and _is_int(q[1])
        and 0 <= q[0] < height
        and 0 <= q[1] < width
        for q in queries
    )
    if not ok:
        raise ValueError(
            f"`queries` must be (y, x) positions with 0 <= y < {height} and "
            f"0 <= x < {width}. Received: queries={queries!r}"
        )
    return [(int(y), int(x)) for y, x in queries]


def _upsample_nearest(m: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """(H, W) -> (out_h, out_w): each output pixel takes the token whose cell
    holds its centre."""
    h, w = m.shape
    rows = np.minimum(((np.arange(out_h) + 0.5) * h / out_h).astype(int), h - 1)
    cols = np.minimum(((np.arange(out_w) + 0.5) * w / out_w).astype(int), w - 1)
    return m[np.ix_(rows, cols)]
