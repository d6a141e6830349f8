"""The bench's configs: the block's shapes it is measured at, as a table.

Each config is one input shape and one layer config. The names are what
`mhsa-core bench --configs` takes; `DEFAULT_CONFIGS` are the ones of
issue 10 (the legacy YOLOv4-MHSA size, N = 4096, N = 16384, and the relative
encoding at N = 4096); `rope_n4096` measures the rotary encoding (EVA-02's
settings) at N = 4096: it runs on every path, the fused one included; `swin`
is Swin-T's first stage (issue 19: shifted 7x7 windows with the per-head bias,
run on request); `pvt_v2` is PVT v2-b0's first stage (issue 20: a 56x56x64
map, one head, keys and values reduced by an 8x8 stride-8 conv and a
LayerNorm, timm's epsilon; run on request); `tiny`, `tiny_relative` and
`tiny_pvt` are for tests (small enough that every output is checked against
the float64 reference).
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class BenchConfig:
    """One shape of the block: input (batch, height, width, channels), channels_last."""

    name: str
    batch: int
    height: int
    width: int
    channels: int
    num_heads: int
    position_encoding: str = "none"
    note: str = ""
    window_size: int = 0  # square windows of this side (0: none)
    shift_size: int = 0
    kv_reduction: int = 0  # keys and values reduced R x R (0: none)

    @property
    def keys(self) -> int:
        """Keys each query attends to: its window's, the reduced map's, or
        every token."""
        if self.window_size:
            return self.window_size**2
        if self.kv_reduction:
            r = self.kv_reduction
            return (self.height // r) * (self.width // r)
        return self.tokens

    @property
    def tokens(self) -> int:
        """N = H * W."""
        return self.height * self.width

    @property
    def head_dim(self) -> int:
        """Channels per head of query, key and value (key_dim is the default
        C // heads)."""
        return self.channels // self.num_heads

    @property
    def input_shape(self) -> tuple[int, int, int, int]:
        return (self.batch, self.height, self.width, self.channels)

    @property
    def layer_config(self) -> dict:
        """The layer's (and the reference's) config, beyond the defaults."""
        config = {
            "num_heads": self.num_heads,
            "position_encoding": self.position_encoding,
        }
        if self.window_size:
            config.update(window_size=self.window_size, shift_size=self.shift_size)
            if self.position_encoding == "relative_bias":
                config["scale_position_logits"] = False  # timm's Swin
        if self.kv_reduction:
            # timm's pvt_v2: its nn.LayerNorm's epsilon.
            config.update(kv_reduction=self.kv_reduction, norm_epsilon=1e-5)
        return config

    @property
    def position_size(self) -> tuple[int, int] | None:
        """The learned tables' reference size: the window, or the map."""
        if self.window_size:
            return (self.window_size, self.window_size)
        return (self.height, self.width)

    def describe(self) -> str:
        """'2x64x64x256, 8 heads, relative' (the encoding only when there is one)."""
        text = f"{'x'.join(map(str, self.input_shape))}, {self.num_heads} head" + (
            "s" if self.num_heads > 1 else ""
        )
        if self.position_encoding != "none":
            text += f", {self.position_encoding}"
        if self.window_size:
            text += f", window {self.window_size}"
            if self.shift_size:
                text += f" shifted {self.shift_size}"
        if self.kv_reduction:
            text += f", keys reduced {self.kv_reduction}x{self.kv_reduction}"
        return text

    def to_json(self) -> dict:
        return {**dataclasses.asdict(self), "tokens": self.tokens}

    @classmethod
    def from_json(cls, data: dict) -> BenchConfig:
        fields = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in fields})


CONFIGS = {
    c.name: c
    for c in (
        BenchConfig(
            "legacy", 2, 25, 25, 512, 1, note="the Keras 2 YOLOv4-MHSA block's size"
        ),
        BenchConfig("n4096", 2, 64, 64, 256, 8),
        BenchConfig("n16384", 1, 128, 128, 128, 4),
        BenchConfig(
            "n4096_relative",
            2,
            64,
            64,
            256,
            8,
            "relative",
            note="BoTNet's relative position logits",
        ),
        BenchConfig(
            "rope_n4096",
            2,
            64,
            64,
            256,
            8,
            "rope",
            note="EVA-02's axial rotary embedding of q and k",
        ),
        BenchConfig(
            "swin",
            2,
            56,
            56,
            96,
            3,
            "relative_bias",
            note="Swin-T's first stage: shifted 7x7 windows, per-head bias",
            window_size=7,
            shift_size=3,
        ),
        BenchConfig(
            "pvt_v2",
            2,
            56,
            56,
            64,
            1,
            note="PVT v2-b0's first stage: keys and values reduced 8x8 (sr_ratio 8)",
            kv_reduction=8,
        ),
        BenchConfig("tiny", 1, 8, 8, 16, 2, note="for tests: seconds per worker"),
        BenchConfig(
            "tiny_pvt",
            1,
            8,
            8,
            16,
            2,
            note="for tests: keys and values reduced 2x2",
            kv_reduction=2,
        ),
        BenchConfig(
            "tiny_relative",
            1,
            8,
            8,
            16,
            2,
            "relative",
            note="for tests: every output checked, the relative terms too",
        ),
    )
}

DEFAULT_CONFIGS = ("legacy", "n4096", "n16384", "n4096_relative")
