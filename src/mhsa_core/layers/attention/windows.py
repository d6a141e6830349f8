"""Window attention (Swin): partition, cyclic shift, padding, region labels.

`Windows` turns the heads of a map, (B, heads, N, d) with N = H * W
row-major, into the heads of its windows, (B * nW, heads, wh * ww, d), so
that every attention path runs per window (windows are batch items: memory
and time O(N * wh * ww)), and back. As timm's `SwinTransformerBlock._attn`:

1. roll the map by -shift along H and W (the cyclic shift);
2. pad it at the bottom and right to whole windows;
3. cut it into windows, row-major, each window's tokens row-major;

and `merge` undoes the three (crop, roll by +shift). The shift along an axis
is dropped when the map fits in one window along it (H <= wh), as timm.

Which keys a query may see inside its window: not the padding
(`key_mask`: padded keys get probability 0; timm's padded keys are zero
tokens that it does not mask), and, with a shift, only the keys of its own
region (`regions`): the rows (columns) that the roll wrapped from the top
(left) are no neighbours of the rows they land by, so their logits get
`schema.SHIFT_MASK_LOGIT` (-100, timm's) against each other. The labels are
2 * (y < sh) + (x < sw) of each token's place (y, x) in the map; at sizes
divisible by the window they partition every window exactly as timm's
`get_attn_mask` does.

H and W may be Python ints or scalar tensors (a TensorFlow graph with
dynamic H, W); the window and the shift are Python ints. The float64 oracle
is `mhsa_core.reference.window_layout`.
"""

from __future__ import annotations

from keras import ops

from mhsa_core._typing import Tensor
from mhsa_core.layers.position._grid import gather, is_static


class Windows:
    """The windows of one H x W map.

    Args:
        height, width: the map's size (ints or scalar tensors).
        window: (wh, ww).
        shift: (sh, sw), each smaller than the window (checked by the layer).

    Attributes:
        window: (wh, ww); `tokens` wh * ww, the keys of one window.
        shift: the shift applied, (sh, sw): 0 along an axis the map fits in
            one window (a tensor along a dynamic axis).
        padded: whether the map is padded to whole windows (a Python bool;
            True when unknown until run time).
    """

    def __init__(
        self,
        height: int | Tensor,
        width: int | Tensor,
        window: tuple[int, int],
        shift: tuple[int, int],
    ) -> None:
        self.height, self.width = height, width
        self.window = window
        self.tokens = window[0] * window[1]
        self.shift = (
            _effective_shift(height, window[0], shift[0]),
            _effective_shift(width, window[1], shift[1]),
        )
        # Windows per axis, and the padding rows (columns) at the bottom
        # (right). From (size - 1) // window, never -size % window: no
        # operand is negative, so the exporters that turn a floor mod or
        # division into a truncating one agree (tf2onnx: -7 % 3 = -1, a
        # negative padding), and JAX's symbolic sizes see the padded size
        # nh * wh as it is (it cannot tell min(nh * wh, H) from H).
        self.counts = ((height - 1) // window[0] + 1, (width - 1) // window[1] + 1)
        self.pad = (
            self.counts[0] * window[0] - height,
            self.counts[1] * window[1] - width,
        )
        self.padded = not all(is_static(p) and p == 0 for p in self.pad)
        self.shifted = not all(is_static(s) and s == 0 for s in self.shift)

    # ------------------------------------------------------------ layout
    def partition(self, t: Tensor) -> Tensor:
        """(B, heads, N, d) -> (B * nW, heads, wh * ww, d): rolled by -shift,
        padded with zeros, cut into windows (window b * nW + w of item b)."""
        shape = ops.shape(t)
        batch, heads, d = shape[0], shape[1], t.shape[-1]
        (wh, ww), (nh, nw) = self.window, self.counts
        grid = ops.reshape(t, (batch, heads, self.height, self.width, d))
        grid = _roll(grid, self.shift[0], axis=2, size=self.height, back=False)
        grid = _roll(grid, self.shift[1], axis=3, size=self.width, back=False)
        grid = _pad(grid, self.pad[0], axis=2)
        grid = _pad(grid, self.pad[1], axis=3)
        # Six axes, ww and d as one (they keep their order): LiteRT's builtin
        # transpose takes at most six (seven needed the Flex delegate).
        grid = ops.reshape(grid, (batch, heads, nh, wh, nw, ww * d))
        grid = ops.transpose(grid, (0, 2, 4, 1, 3, 5))  # (B, nh, nw, heads, ...)
        return ops.reshape(grid, (batch * nh * nw, heads, self.tokens, d))

    def merge(self, t: Tensor) -> Tensor:
        """(B * nW, heads, wh * ww, d) -> (B, heads, N, d): `partition`
        undone (the padding cropped, rolled back by +shift)."""
        (wh, ww), (nh, nw) = self.window, self.counts
        shape = ops.shape(t)
        heads, d = shape[1], t.shape[-1]
        batch = shape[0] // (nh * nw)
        grid = ops.reshape(t, (batch, nh, nw, heads, wh, ww * d))  # as `partition`
        grid = ops.transpose(grid, (0, 3, 1, 4, 2, 5))  # (B, heads, nh, wh, ...)
        grid = ops.reshape(grid, (batch, heads, nh * wh, nw * ww, d))
        grid = _unpad_roll(grid, self.shift[0], axis=2, size=self.height)
        grid = _unpad_roll(grid, self.shift[1], axis=3, size=self.width)
        return ops.reshape(grid, (batch, heads, self.height * self.width, d))

    # ------------------------------------------------------------ masks
    def key_mask(self, key_mask: Tensor | None, batch: int | Tensor) -> Tensor | None:
        """The keys each window's queries may see, bool (B * nW, wh * ww):
        the map's `key_mask` (B, N) (or every token), False at the padding.
        None when nothing is masked (no mask given, no padding)."""
        if key_mask is None and not self.padded:
            return None
        if key_mask is None:
            keep = ops.ones((batch, 1, self.height * self.width, 1), dtype="int32")
        else:
            keep = ops.reshape(ops.cast(key_mask, "int32"), (batch, 1, -1, 1))
        # Partitioned as an int (zeros at the padding), then back to bool.
        keep = self.partition(keep)  # (B * nW, 1, wh * ww, 1)
        return ops.cast(ops.reshape(keep, (-1, self.tokens)), "bool")

    def regions(self, batch: int | Tensor) -> Tensor | None:
        """int32 (B * nW, wh * ww): each slot's shift region (0 at the
        padding, whose keys `key_mask` removes), or None without a shift."""
        if not self.shifted:
            return None
        (wh, ww), (nh, nw) = self.window, self.counts
        # The labels of the rolled, padded map, cut into windows: no roll or
        # gather of a (1, 1, H, W, 1) map, which tf2onnx's optimizer merges
        # into a Reshape that ONNX Runtime refuses ("Invalid position of 0").
        wrapped_y = _wrapped(self.height, self.shift[0], nh * wh)  # (nh * wh,)
        wrapped_x = _wrapped(self.width, self.shift[1], nw * ww)  # (nw * ww,)
        labels = 2 * ops.expand_dims(wrapped_y, 1) + ops.expand_dims(wrapped_x, 0)
        labels = ops.transpose(ops.reshape(labels, (nh, wh, nw, ww)), (0, 2, 1, 3))
        labels = ops.reshape(labels, (nh * nw, self.tokens))  # (nW, Nw)
        return ops.tile(labels, (batch, 1))  # window b * nW + w

    def scores_to_map(self, scores: Tensor) -> Tensor:
        """Window probabilities (B * nW, heads, Nw, Nw) -> (B, heads, N, N)
        over the map's tokens, zero between tokens of different windows
        (padding slots dropped). O(N^2): only for returned scores."""
        (nh, nw), nw_tokens = self.counts, self.tokens
        n = self.height * self.width
        shape = ops.shape(scores)
        heads = shape[1]
        batch = shape[0] // (nh * nw)
        # Each token's (window, slot), as the flat slot index w * Nw + s.
        slots = ops.reshape(
            ops.arange(nh * nw * nw_tokens, dtype="int32"), (nh * nw, 1, nw_tokens, 1)
        )
        flat = ops.reshape(self.merge(slots), (n,))  # (N,)
        window_of, slot_of = flat // nw_tokens, flat % nw_tokens
        probs = ops.reshape(
            ops.transpose(
                ops.reshape(scores, (batch, nh * nw, heads, nw_tokens, nw_tokens)),
                (0, 2, 1, 3, 4),
            ),
            (batch, heads, nh * nw * nw_tokens, nw_tokens),
        )
        rows = ops.take(probs, flat, axis=2)  # (B, heads, N, Nw): query i's row
        full = ops.take(rows, slot_of, axis=3)  # (B, heads, N, N)
        same = ops.equal(ops.expand_dims(window_of, 1), ops.expand_dims(window_of, 0))
        return ops.where(same, full, ops.zeros_like(full))


def _count(size: int | Tensor) -> Tensor:
    """A size known at run time as an int32 tensor, summed from an arange:
    never a cast of the size itself, which torch.export turns into a Python
    number (pinning H and W; see `position._grid.resize_table`)."""
    return ops.sum(ops.ones_like(ops.arange(size, dtype="int32")))


def _wrapped(size: int | Tensor, shift: int | Tensor, padded: int | Tensor) -> Tensor:
    """int32 (padded,): 1 at the places of an axis rolled by -shift that hold
    the map's first `shift` places (wrapped from the start: the last `shift`
    places of the map), 0 elsewhere and at the padding (places >= size)."""
    place = ops.arange(padded, dtype="int32")
    wrapped = ops.logical_and(place >= size - shift, place < size)
    return ops.cast(wrapped, "int32")


def _effective_shift(size: int | Tensor, window: int, shift: int) -> int | Tensor:
    """`shift`, or 0 when the map fits in one window along the axis (timm);
    an int32 tensor for a size known at run time."""
    if shift == 0:
        return 0
    if is_static(size):
        return shift if size > window else 0
    return ops.where(ops.greater(_count(size), window), shift, 0)


def _roll(
    t: Tensor, shift: int | Tensor, axis: int, size: int | Tensor, back: bool
) -> Tensor:
    """`t` rolled along `axis` (of `size`) by -shift, or by +shift (`back`).

    A Python shift is `ops.roll`; a tensor one (a size known only at run
    time decides it) a gather of the rolled indices: torch.roll takes no
    tensor shift.
    """
    if is_static(shift):
        return t if shift == 0 else ops.roll(t, shift if back else -shift, axis=axis)
    return gather(t, _rolled_index(shift, size, back), axis=axis)


def _rolled_index(shift: int | Tensor, size: int | Tensor, back: bool) -> Tensor:
    """(size,) int32: the source of each place of an axis rolled by -shift,
    or by +shift (`back`). size - shift, never -shift: no negative operand
    of the floor mod (tf2onnx's truncates; 0 <= shift < size)."""
    index = ops.arange(size, dtype="int32")
    return (index + (size - shift if back else shift)) % _count(size)


def _unpad_roll(
    t: Tensor, shift: int | Tensor, axis: int, size: int | Tensor
) -> Tensor:
    """The first `size` places of `axis` (the padding cropped), rolled back
    by +shift. A size known only at run time takes both in one gather of
    `size` indices (all below the map's size): its result has the map's size
    as it is, which JAX's symbolic sizes need (a slice to H of the padded
    nh * wh is min(nh * wh, H) to them, which no later reshape accepts)."""
    if is_static(size):
        if t.shape[axis] != size:
            t = t[(slice(None),) * axis + (slice(None, size),)]
        return _roll(t, shift, axis=axis, size=size, back=True)
    return gather(t, _rolled_index(shift, size, back=True), axis=axis)


def _pad(t: Tensor, amount: int | Tensor, axis: int) -> Tensor:
    """Zeros appended along `axis`. Concatenated, not `ops.pad`: it makes a
    Keras Operation on every call, whose new name made torch.compile
    recompile at every call (layers/attention/chunked.py)."""
    if is_static(amount) and amount == 0:
        return t
    shape = list(ops.shape(t))
    shape[axis] = amount
    return ops.concatenate([t, ops.zeros(shape, dtype=t.dtype)], axis=axis)
