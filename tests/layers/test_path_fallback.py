"""`choice.fallback`: the scoped setting under which calls that would take a
path an exporter cannot take (the chunked path's loop) take the full path,
and the record of whether any did (`mhsa-core matrix --export` says so in
the export cell)."""

import keras
import numpy as np
import pytest

from mhsa_core.layers.attention import choice

from harness import make_case

BACKEND = keras.backend.backend()


class _Symbolic:
    """An N that is not a Python int (a TensorFlow graph's, jax.export's)."""


def _resolve(implementation, n):
    layer, _, _ = make_case({"num_heads": 2}, (1, 2, 2, 8))
    return choice.resolve(
        implementation,
        n=n,
        dtype="float32",
        query_dim=4,
        value_dim=4,
        position=layer.position,
        scores=False,
        dropout=False,
    )


# The path "auto" takes when N is known only at run time: a cond between full
# and chunked, except on JAX (symbolic sizes can be neither compared nor
# looped over: the full path).
BY_SIZE = choice.FULL if BACKEND == "jax" else choice.BY_SIZE

# (implementation, n, paths of the scope, path taken, paths the record lists)
FALLBACKS = [
    ("chunked", 64, ("chunked",), choice.FULL, {"chunked"}),
    ("fused", 64, ("chunked",), choice.FUSED, set()),
    ("fused", 64, ("fused",), choice.FULL, {"fused"}),
    ("full", 64, ("chunked", "fused"), choice.FULL, set()),
    # "chunked" alone leaves the by-size choice (OpenVINO converts it) ...
    ("auto", _Symbolic(), ("chunked",), BY_SIZE, set()),
    # ... naming it too removes the loop from the graph (LiteRT).
    (
        "auto",
        _Symbolic(),
        ("chunked", choice.BY_SIZE),
        choice.FULL,
        {choice.BY_SIZE} if BY_SIZE == choice.BY_SIZE else set(),
    ),
]


@pytest.mark.parametrize(
    "implementation, n, paths, path, taken",
    FALLBACKS,
    ids=[f"{i}-{'+'.join(p)}" for i, _, p, _, _ in FALLBACKS],
)
def test_fallback_takes_the_full_path_and_says_so(
    implementation, n, paths, path, taken
):
    before = _resolve(implementation, n)
    with choice.fallback(*paths) as record:
        assert _resolve(implementation, n) == path
    assert record.taken == taken
    assert _resolve(implementation, n) == before  # the scope ends with the block


def test_nested_scopes_each_record_and_end_on_error():
    with pytest.raises(RuntimeError):
        with choice.fallback("fused") as outer:
            with choice.fallback("chunked") as inner:
                assert _resolve("chunked", 64) == choice.FULL
                assert _resolve("fused", 64) == choice.FULL
                raise RuntimeError("the export failed")
    assert inner.taken == {"chunked"} and outer.taken == {"fused"}
    assert _resolve("chunked", 64) == choice.CHUNKED


@pytest.mark.parametrize(
    "paths", [("full",), (), ("chunked", "loop")], ids=["full", "none", "unknown"]
)
def test_fallback_refuses_other_paths(paths):
    with pytest.raises(ValueError, match=r"Received: paths="):
        with choice.fallback(*paths):
            pass


def test_a_layer_in_the_scope_computes_the_full_path():
    """The layer honours the scope: a chunked layer's output within
    `fallback("chunked")` is the full path's, bit for bit."""
    config = {"num_heads": 2, "position_encoding": "relative", "position_size": (3, 4)}
    chunked, x, _ = make_case(
        {**config, "attention_implementation": "chunked", "chunk_size": 5}, (2, 3, 4, 8)
    )
    full, _, _ = make_case({**config, "attention_implementation": "full"}, (2, 3, 4, 8))
    with choice.fallback("chunked") as record:
        inside = keras.ops.convert_to_numpy(chunked(x))
    assert record.taken == {"chunked"}
    np.testing.assert_array_equal(inside, keras.ops.convert_to_numpy(full(x)))
