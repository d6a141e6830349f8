"""torch.compile compiles the layer once per input shape, not at every call.

Dynamo guards on what the traced code read, Keras's global naming state
included: an op that makes a Keras `Operation` on every call (`ops.pad` does,
even eager) gives it a new unique name, the guard fails, and the model is
recompiled at every call (seconds each, silently). The chunked path once
padded its queries with `ops.pad` and recompiled every call. Dynamo alone
(`backend="eager"`) decides recompiles, so the test skips inductor.
"""

import keras
import pytest

from harness import make_case

BACKEND = keras.backend.backend()

# (attention_implementation, chunk_size): the chunked path with a ragged last
# chunk (6 tokens, chunks of 4); the fused path.
PATHS = [("chunked", 4), ("fused", None)]


@pytest.mark.skipif(BACKEND != "torch", reason="torch.compile: the torch backend only")
@pytest.mark.parametrize("implementation, chunk_size", PATHS, ids=[p[0] for p in PATHS])
def test_same_shape_does_not_recompile(implementation, chunk_size):
    import torch

    layer, x, _ = make_case(
        {
            "num_heads": 1,
            "attention_implementation": implementation,
            "chunk_size": chunk_size,
        },
        (1, 2, 3, 4),
    )
    x = torch.from_numpy(x)
    layer(x)  # eager first: Keras's first call ever sets global state dynamo guards on
    torch._dynamo.reset()
    limit = torch._dynamo.config.recompile_limit
    fail = torch._dynamo.config.fail_on_recompile_limit_hit
    torch._dynamo.config.recompile_limit = 1
    torch._dynamo.config.fail_on_recompile_limit_hit = True
    try:
        compiled = torch.compile(lambda t: layer(t), backend="eager")
        with torch.no_grad():
            for _ in range(3):  # a recompile raises FailOnRecompileLimitHit
                compiled(x)
    finally:
        torch._dynamo.config.recompile_limit = limit
        torch._dynamo.config.fail_on_recompile_limit_hit = fail
        torch._dynamo.reset()
