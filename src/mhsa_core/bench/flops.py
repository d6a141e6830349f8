"""How many floating-point operations the block costs: the GF/s of the bench.

A multiply-add counts 2. With B batch, N = H*W tokens, C channels, h heads,
kd = C // h channels per head of query and key, dv = C // h of value:

    forward  = 2*B*N*C*h*kd                q projection (C -> h*kd)
             + 2*B*K*C*(h*kd + C)          k (C -> h*kd) and v (C -> C) projections
                                           of the K key tokens
             + 2*B*h*N*K*(kd + dv)         q k^T and probs @ v, K = N keys per query
                                           (K = wh*ww with Swin's windows: there
                                           the projections count N tokens)
             [+ 2*B*K*R*R*C*C]             kv_reduction R: the stride-R conv
                                           (K = (H // R) * (W // R) reduced keys)
             [+ 2*B*h*N*(H + W)*kd]        "relative": q against the H row and W column
                                           embeddings (the least the encoding needs)
    backward = 2 * forward                 each product's gradient wrt both of its
                                           operands
    forward+backward = 3 * forward

With kd = dv = C / h the forward is 6*B*N*C^2 + 4*B*N^2*C. The softmax,
scale, bias, mask and activations are elementwise and not counted. Every
row of a config is credited the same count (the block's), so within a config
GF/s is proportional to 1 / time: `keras.layers.MultiHeadAttention` does an
extra output projection (2*B*N*C^2) that is not credited. The rotation of
"rope" (x * cos + rotated(x) * sin on q and k) is elementwise too.
"""

from __future__ import annotations

from mhsa_core.bench.configs import BenchConfig

FORWARD = "forward"
FORWARD_BACKWARD = "forward+backward"
DIRECTIONS = (FORWARD, FORWARD_BACKWARD)

FORMULA = (
    "forward = 2BNC(2h*kd + C) + 2BhNK(kd + dv) [+ 2BhN(H + W)kd relative], "
    "K = N (or the window's tokens); with kv_reduction R, K = (H/R)(W/R) keys: "
    "2BNC*h*kd + 2BKC(h*kd + C) + 2BKR^2C^2 + 2BhNK(kd + dv); "
    "forward+backward = 3 x forward"
)


def forward_flops(config: BenchConfig) -> int:
    """FLOPs of one forward pass of the block at `config` (module docstring)."""
    b, n, c, h = config.batch, config.tokens, config.channels, config.num_heads
    kd = dv = config.head_dim
    projections = 2 * b * n * c * (2 * h * kd + c)
    if config.kv_reduction:
        r, keys = config.kv_reduction, config.keys
        projections = (
            2 * b * n * c * h * kd  # q
            + 2 * b * keys * c * (h * kd + c)  # k and v of the reduced tokens
            + 2 * b * keys * r * r * c * c  # the stride-R conv
        )
    attention = 2 * b * h * n * config.keys * (kd + dv)
    position = 0
    if config.position_encoding == "relative":
        position = 2 * b * h * n * (config.height + config.width) * kd
    return projections + attention + position


def flops(config: BenchConfig, direction: str) -> int:
    """FLOPs of `direction` ("forward" or "forward+backward") at `config`."""
    if direction not in DIRECTIONS:
        raise ValueError(
            f"Expected a direction in {DIRECTIONS}. Received: direction={direction!r}"
        )
    return forward_flops(config) * (1 if direction == FORWARD else 3)


def matmul_flops(rows: int, inner: int, cols: int) -> int:
    """FLOPs of (rows, inner) @ (inner, cols)."""
    return 2 * rows * inner * cols
