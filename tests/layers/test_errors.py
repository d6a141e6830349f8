"""Bad inputs give a ValueError that names the argument and the received value.

Every check matches the argument name AND the received value in the message
(Keras wording: "Received: num_heads=0"), so a backend traceback (a shape error
deep in an einsum, a TypeError from NumPy) never passes for a good message.
After a failed weight load, no weight may have changed (nothing half-written).
"""

import re

import keras
import numpy as np
import pytest

from harness import to_numpy
from mhsa_core import MultiHeadSelfAttention2D, mhsa_block, reference


def _all(*parts):
    """A regex that matches when every literal part occurs, in any order."""
    return "(?s)" + "".join(f"(?=.*{re.escape(str(p))})" for p in parts)


def _snapshot(layer):
    return [to_numpy(w).copy() for w in layer.weights]


def _assert_unchanged(layer, before):
    after = _snapshot(layer)
    assert len(after) == len(before)
    for variable, b, a in zip(layer.weights, before, after):
        assert np.array_equal(b, a), f"{variable.name} was changed by a failed load"


def _built(channels=8, **config):
    layer = MultiHeadSelfAttention2D(**config)
    layer.build((None, 5, 5, channels))
    return layer


def _seed_arrays(channels=16, seed=0, squeeze=False):
    """Eight seed-block arrays: (kernel, bias) of position, query, key, value."""
    rng = np.random.default_rng(seed)
    arrays = []
    for _ in range(4):
        kernel = rng.standard_normal((1, 1, channels, channels)).astype("float32")
        arrays += [kernel[0, 0] if squeeze else kernel,
                   rng.standard_normal(channels).astype("float32")]
    return arrays


# ------------------------------------------------------------- constructor
# Several bad values per test (collected, all reported): each test costs the
# conftest's clear_session, about 0.25 s on torch.
_INVALID_ARGUMENTS = {
    "num_heads": [0, -1, 2.5, True, "2", None],
    "key_dim": [0, -3, 1.5, True, "4"],
    "position_encoding": ["rotary", None, "CONV", "Relative"],
    "position_size": [0, 5, (5,), [5], (5, 0), (5, -1), (5.0, 5), (True, 5), "5x5",
                      (5, 5, 5), (2, None)],
    "scale_position_logits": ["yes", 1, None, 0.0],
    "position_initializer": ["not_an_initializer", 3],
    "data_format": ["channels_middle", "NHWC"],
    "activation": ["not_an_activation", 3],
    "dropout": [-0.1, 1.0, 1.5, "x", float("nan"), True, None],
    "scale": [0, -1, float("nan"), float("inf"), -float("inf"), True, "1.0", 0.0],
    "seed": ["abc", 1.5, True],
}


def _failures(cases):
    """Runs each (label, fn, pattern); returns why those that did not raise a
    ValueError matching `pattern` failed."""
    failures = []
    for label, fn, pattern in cases:
        try:
            fn()
        except ValueError as e:
            if not re.search(pattern, str(e)):
                failures.append(f"{label}: message does not match {pattern!r}: {e}")
        except Exception as e:  # noqa: BLE001 - any other type is the failure
            failures.append(f"{label}: {type(e).__name__} instead of ValueError: {e}")
        else:
            failures.append(f"{label}: no error")
    return failures


@pytest.mark.parametrize("argument", sorted(_INVALID_ARGUMENTS))
def test_invalid_constructor_argument(argument):
    cases = [
        (f"{argument}={value!r}",
         lambda value=value: MultiHeadSelfAttention2D(**{argument: value}),
         _all(f"`{argument}`", f"Received: {argument}={value!r}"))
        for value in _INVALID_ARGUMENTS[argument]
    ]
    failures = _failures(cases)
    assert not failures, "\n".join(failures)


def test_valid_boundary_arguments_are_accepted():
    MultiHeadSelfAttention2D(num_heads=np.int64(2), key_dim=np.int32(3))
    for scale in (np.float32(0.5), 1, None, 1e-30, 1e30):
        MultiHeadSelfAttention2D(scale=scale)
    for dropout in (0, 0.0, 0.999, np.float64(0.5)):
        MultiHeadSelfAttention2D(dropout=dropout, seed=1)
    for activation in (None, "linear", "gelu", keras.activations.tanh):
        MultiHeadSelfAttention2D(activation=activation)
    layer = MultiHeadSelfAttention2D(dropout=0.0, scale=1e-30, key_dim=1)
    assert np.all(np.isfinite(to_numpy(layer(np.ones((1, 2, 2, 4), "float32")))))


def test_numpy_integer_seed_is_accepted():
    layer = MultiHeadSelfAttention2D(dropout=0.1, seed=np.int64(2))
    assert type(layer.get_config()["seed"]) is int


# ------------------------------------------------------- channels vs heads
@pytest.mark.parametrize("data_format", ["channels_last", "channels_first"])
def test_channels_not_divisible_by_heads(data_format):
    shape = (2, 10, 5, 5) if data_format == "channels_first" else (2, 5, 5, 10)
    pattern = _all("divisible", "channels=10", "num_heads=4")

    def layer():
        return MultiHeadSelfAttention2D(num_heads=4, data_format=data_format)

    failures = _failures([
        ("build", lambda: layer().build(shape), pattern),
        ("eager call", lambda: layer()(np.zeros(shape, "float32")), pattern),
        ("symbolic call", lambda: layer()(keras.Input(shape[1:])), pattern),
    ])
    assert not failures, "\n".join(failures)


# ------------------------------------------------------------- input rank
_BAD_RANKS = [(2, 5, 8), (2, 5, 5, 8, 1)]


def test_wrong_rank_on_first_build():
    cases = []
    for shape in _BAD_RANKS:
        symbolic = (None,) + shape[1:]
        # The layer's own check (build / compute_output_shape called directly).
        own = _all("rank-4", f"Received: inputs.shape={shape}")
        # Through __call__ the InputSpec(ndim=4) answers first; still a
        # ValueError stating the expected and received rank and the shape.
        spec = _all("ndim=4", f"ndim={len(shape)}", str(shape))
        spec_symbolic = _all("ndim=4", f"ndim={len(shape)}", str(symbolic))
        cases += [
            (f"build{shape}", lambda s=shape: MultiHeadSelfAttention2D().build(s), own),
            (f"compute_output_shape{shape}",
             lambda s=shape: MultiHeadSelfAttention2D().compute_output_shape(s), own),
            (f"eager{shape}",
             lambda s=shape: MultiHeadSelfAttention2D()(np.zeros(s, "float32")), spec),
            (f"symbolic{symbolic}",
             lambda s=shape: MultiHeadSelfAttention2D()(keras.Input(s[1:])), spec_symbolic),
        ]
    failures = _failures(cases)
    assert not failures, "\n".join(failures)


def test_wrong_rank_or_channels_on_built_layer():
    layer = MultiHeadSelfAttention2D()
    layer(np.zeros((2, 5, 5, 8), "float32"))
    assert layer.built
    cases = []
    for shape in _BAD_RANKS:
        rank = _all("ndim=4", f"ndim={len(shape)}")
        cases += [
            (f"eager{shape}", lambda s=shape: layer(np.zeros(s, "float32")),
             _all("ndim=4", f"ndim={len(shape)}", str(shape))),
            (f"symbolic{shape}", lambda s=shape: layer(keras.Input(s[1:])), rank),
        ]
    cases.append(("channels 6 instead of 8",
                  lambda: layer(np.zeros((2, 5, 5, 6), "float32")),
                  _all("axis -1", "value 8", "(2, 5, 5, 6)")))
    failures = _failures(cases)
    assert not failures, "\n".join(failures)


def test_unknown_channel_dimension():
    cases = []
    for data_format, shape in [
        ("channels_last", (None, None, None)),
        ("channels_last", (5, 5, None)),
        ("channels_first", (None, None, None)),
        ("channels_first", (None, 5, 5)),
    ]:
        cases.append((
            f"{data_format} {shape}",
            lambda d=data_format, s=shape: MultiHeadSelfAttention2D(data_format=d)(keras.Input(s)),
            _all("channel dimension", f"data_format={data_format!r}",
                 f"Received: inputs.shape={(None,) + shape}"),
        ))
    failures = _failures(cases)
    assert not failures, "\n".join(failures)


# ---------------------------------------------------------- attention_mask
# For an input with H=4, W=5, B=2: flat (B, H*W), W+1, a trailing 1, the wrong
# batch, no batch, H and W swapped.
_BAD_MASKS = [(2, 20), (2, 4, 6), (2, 4, 5, 1), (3, 4, 5), (4, 5), (2, 5, 4)]


@pytest.mark.parametrize("data_format", ["channels_last", "channels_first"])
def test_wrong_mask_shape_eager(data_format):
    shape = (2, 8, 4, 5) if data_format == "channels_first" else (2, 4, 5, 8)
    layer = MultiHeadSelfAttention2D(num_heads=2, data_format=data_format)
    x = np.zeros(shape, "float32")
    cases = []
    for when in ("unbuilt", "built"):
        if when == "built":
            layer(x, attention_mask=np.ones((2, 4, 5), bool))
        for mask_shape in _BAD_MASKS:
            cases.append((
                f"{when} mask{mask_shape}",
                lambda m=mask_shape: layer(x, attention_mask=np.ones(m, bool)),
                _all("`attention_mask`", "(B, H, W)=(2, 4, 5)",
                     f"Received: attention_mask.shape={mask_shape}"),
            ))
    failures = _failures(cases)
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize("data_format", ["channels_last", "channels_first"])
def test_wrong_mask_shape_symbolic(data_format):
    shape = (8, 4, 5) if data_format == "channels_first" else (4, 5, 8)
    x = keras.Input(shape)
    cases = []
    for mask_shape in [(20,), (4, 6), (4, 5, 1), (5, 4)]:
        cases.append((
            f"mask{(None,) + mask_shape}",
            lambda m=mask_shape: MultiHeadSelfAttention2D(data_format=data_format)(
                x, attention_mask=keras.Input(m, dtype="bool")),
            _all("`attention_mask`", "(B, H, W)=(None, 4, 5)",
                 f"Received: attention_mask.shape={(None,) + mask_shape}"),
        ))
    failures = _failures(cases)
    assert not failures, "\n".join(failures)


def test_mask_with_unknown_spatial_size_is_accepted_symbolically():
    x = keras.Input((None, None, 8))
    mask = keras.Input((None, None), dtype="bool")
    y = MultiHeadSelfAttention2D()(x, attention_mask=mask)
    assert tuple(y.shape) == (None, None, None, 8)


# ------------------------------------------------------------------ config
def test_from_config_unknown_key():
    layer = MultiHeadSelfAttention2D(num_heads=2)
    config = {**layer.get_config(), "bogus": 1}
    pattern = _all("Unknown key", "'bogus'", "MultiHeadSelfAttention2D", "'bogus': 1")
    with pytest.raises(ValueError, match=pattern):
        MultiHeadSelfAttention2D.from_config(config)
    # An invalid value in a config is caught by the constructor's checks.
    with pytest.raises(ValueError, match=_all("`num_heads`", "Received: num_heads=0")):
        MultiHeadSelfAttention2D.from_config({**layer.get_config(), "num_heads": 0})


def test_deserialize_unknown_key():
    layer = MultiHeadSelfAttention2D(num_heads=2)
    serialized = keras.saving.serialize_keras_object(layer)
    serialized = {**serialized, "config": {**serialized["config"], "bogus": 1}}
    with pytest.raises(ValueError, match=_all("Unknown key", "'bogus'", "'bogus': 1")):
        keras.saving.deserialize_keras_object(serialized)


# --------------------------------------------------------- set_weight_dict
def _dict_for(layer, channels=8, seed=3):
    return reference.random_weights(channels, layer.num_heads, layer.key_dim,
                                    layer.position_encoding, layer.use_bias, seed=seed)


def test_set_weight_dict_wrong_keys():
    layer = _built(num_heads=2)
    before = _snapshot(layer)
    missing = _dict_for(layer)
    del missing["key_bias"]
    extra = {**_dict_for(layer), "bogus_kernel": np.zeros((8, 8))}
    failures = _failures([
        ("missing key_bias", lambda: layer.set_weight_dict(missing),
         _all("`weights`", "'key_bias'", "Received: keys=")),
        ("extra bogus_kernel", lambda: layer.set_weight_dict(extra),
         _all("`weights`", "Received: keys=", "'bogus_kernel'")),
    ])
    assert not failures, "\n".join(failures)
    _assert_unchanged(layer, before)


def test_set_weight_dict_wrong_shape():
    layer = _built()
    before = _snapshot(layer)
    cases = []
    # position_kernel comes first: nothing may be assigned before the check of
    # a later weight (value_bias, last) fails.
    for name in ("position_kernel", "query_kernel", "value_bias"):
        weights = _dict_for(layer)
        good = weights[name].shape
        bad = good[:-1] + (good[-1] + 1,)
        weights[name] = np.zeros(bad)
        cases.append((name, lambda w=weights: layer.set_weight_dict(w),
                      _all(repr(name), str(good), f"Received: shape={bad}")))
    failures = _failures(cases)
    assert not failures, "\n".join(failures)
    _assert_unchanged(layer, before)


def test_set_weight_dict_on_unbuilt_layer():
    with pytest.raises(ValueError, match=_all("set_weight_dict", "built")):
        MultiHeadSelfAttention2D().set_weight_dict({})




def test_set_weight_dict_uncastable_value_changes_nothing():
    layer = _built()
    before = _snapshot(layer)
    weights = _dict_for(layer)
    weights["value_bias"] = np.array(["x"] * 8)  # right shape, not a number
    with pytest.raises(ValueError) as info:
        layer.set_weight_dict(weights)
    _assert_unchanged(layer, before)
    assert "value_bias" in str(info.value), str(info.value)


# ------------------------------------------------------- load_seed_weights
def test_load_seed_weights_wrong_count():
    layer = _built(16)
    before = _snapshot(layer)
    failures = _failures([
        (f"{count} arrays",
         lambda c=count: layer.load_seed_weights((_seed_arrays() * 2)[:c]),
         _all("8 arrays", f"Received: {count} arrays"))
        for count in (0, 7, 9)
    ])
    assert not failures, "\n".join(failures)
    _assert_unchanged(layer, before)


def test_load_seed_weights_wrong_shape():
    layer = _built(16)
    before = _snapshot(layer)
    cases = []
    for index, what, bad_shape, expected in [
        (0, "position kernel", (1, 1, 16, 15), (16, 16)),
        (2, "query kernel", (1, 1, 16, 15), (16, 16)),
        (2, "query kernel", (16, 15), (16, 16)),
        (2, "query kernel", (2, 1, 16, 16), (16, 16)),
        (2, "query kernel", (16, 16, 1), (16, 16)),
        (5, "key bias", (15,), (16,)),
        (6, "value kernel", (1, 1, 15, 16), (16, 16)),
        (7, "value bias", (1, 16), (16,)),
    ]:
        arrays = _seed_arrays()
        arrays[index] = np.zeros(bad_shape, "float32")
        cases.append((
            f"{what} {bad_shape}",
            lambda a=arrays: layer.load_seed_weights(a),
            _all(f"Seed weight {index}", f"({what})", str(expected),
                 f"Received: shape={bad_shape}"),
        ))
    failures = _failures(cases)
    assert not failures, "\n".join(failures)
    _assert_unchanged(layer, before)


def test_load_seed_weights_needs_seed_structure():
    cases = []
    built_layers = []
    unbuilt_layers = []
    for config, received in [
        ({"position_encoding": "none"}, "position_encoding='none'"),
        ({"use_bias": False}, "use_bias=False"),
    ]:
        layer = _built(16, **config)
        built_layers.append((layer, _snapshot(layer)))
        unbuilt = MultiHeadSelfAttention2D(**config)
        unbuilt_layers.append(unbuilt)
        pattern = _all("load_seed_weights", received)
        cases += [
            (f"built {config}", lambda l=layer: l.load_seed_weights(_seed_arrays()), pattern),
            (f"unbuilt {config}", lambda l=unbuilt: l.load_seed_weights(_seed_arrays()),
             pattern),
        ]
    failures = _failures(cases)
    assert not failures, "\n".join(failures)
    for layer, before in built_layers:
        _assert_unchanged(layer, before)
    assert not any(layer.built for layer in unbuilt_layers)


def test_load_seed_weights_layer_mismatch():
    """Built layers whose weight shapes differ from the seed's (C=16, width 16)."""
    key_dim_layer = _built(16, num_heads=2, key_dim=4)
    narrow_layer = _built(8)
    before = [_snapshot(key_dim_layer), _snapshot(narrow_layer)]
    failures = _failures([
        ("key_dim=4, 2 heads", lambda: key_dim_layer.load_seed_weights(_seed_arrays()),
         _all("seed block's settings", "num_heads=2", "key_dim=4")),
        ("C=8 layer", lambda: narrow_layer.load_seed_weights(_seed_arrays(16)),
         _all("(position kernel)", "(8, 8)", "Received: shape=(1, 1, 16, 16)")),
    ])
    assert not failures, "\n".join(failures)
    _assert_unchanged(key_dim_layer, before[0])
    _assert_unchanged(narrow_layer, before[1])


def test_failed_load_seed_weights_leaves_unbuilt_layer_unbuilt():
    layer = MultiHeadSelfAttention2D()
    arrays = _seed_arrays(16)
    arrays[0] = np.zeros((1, 1, 16, 8), "float32")  # position kernel, wrong C_out
    with pytest.raises(ValueError, match=_all("(position kernel)", "(1, 1, 16, 8)")):
        layer.load_seed_weights(arrays)
    assert not layer.built
    layer.load_seed_weights(_seed_arrays(16))  # the corrected arrays


def test_load_seed_weights_uncastable_value_changes_nothing():
    layer = _built(16)
    before = _snapshot(layer)
    arrays = _seed_arrays()
    arrays[7] = np.array(["x"] * 16)  # value bias: right shape, not a number
    with pytest.raises(ValueError) as info:
        layer.load_seed_weights(arrays)
    _assert_unchanged(layer, before)
    assert "value" in str(info.value), str(info.value)


# -------------------------------------------------------------- mhsa_block
def test_mhsa_block_errors():
    failures = _failures([
        ("input_channel=16 on C=8",
         lambda: mhsa_block(keras.Input((5, 5, 8)), input_channel=16),
         _all("`input_channel`", "Received: input_channel=16", "(None, 5, 5, 8)")),
        ("channels_first input_channel=5 on C=8",
         lambda: mhsa_block(keras.Input((8, 5, 5)), input_channel=5,
                            data_format="channels_first"),
         _all("`input_channel`", "Received: input_channel=5", "(None, 8, 5, 5)",
              "channels_first")),
        ("rank 3", lambda: mhsa_block(keras.Input((25, 8)), input_channel=8),
         _all("rank-4", "Received: inputs.shape=(None, 25, 8)")),
        ("num_heads=0", lambda: mhsa_block(keras.Input((5, 5, 8)), num_heads=0),
         _all("`num_heads`", "Received: num_heads=0")),
        ("num_heads=3 on C=8", lambda: mhsa_block(keras.Input((5, 5, 8)), num_heads=3),
         _all("channels=8", "num_heads=3")),
    ])
    assert not failures, "\n".join(failures)


def test_load_seed_weights_rejects_non_seed_settings():
    # The seed's weights only mean the seed's block under the seed's settings.
    for kwargs, shown in (
        ({"num_heads": 2}, "num_heads=2"),
        ({"scale": None}, "scale=None"),
        ({"activation": None}, "activation='linear'"),
        ({"key_dim": 16}, "key_dim=16"),
    ):
        layer = MultiHeadSelfAttention2D(**kwargs)
        with pytest.raises(ValueError, match=_all("load_seed_weights", shown)):
            layer.load_seed_weights(_seed_arrays(16))
        assert not layer.built


# ------------------------------------------------------- position encodings
@pytest.mark.parametrize("encoding", ["relative", "absolute"])
def test_learned_encoding_needs_a_size(encoding):
    """Unknown spatial size at build and no position_size: the error says so."""
    pattern = _all("`position_size`", "Received: position_size=None", "(None, None, None, 8)")

    def layer():
        return MultiHeadSelfAttention2D(position_encoding=encoding)

    failures = _failures([
        ("build", lambda: layer().build((None, None, None, 8)), pattern),
        ("symbolic call", lambda: layer()(keras.Input((None, None, 8))), pattern),
    ])
    assert not failures, "\n".join(failures)
    # Either known size suffices.
    MultiHeadSelfAttention2D(position_encoding=encoding).build((None, 3, 4, 8))
    MultiHeadSelfAttention2D(position_encoding=encoding, position_size=(3, 4)).build(
        (None, None, None, 8))


def test_sinusoidal_needs_channels_divisible_by_4():
    pattern = _all("sinusoidal", "divisible by 4", "channels=6")
    failures = _failures([
        ("build", lambda: MultiHeadSelfAttention2D(
            position_encoding="sinusoidal", num_heads=2).build((None, 3, 3, 6)), pattern),
        ("eager call", lambda: MultiHeadSelfAttention2D(
            position_encoding="sinusoidal")(np.zeros((1, 3, 3, 6), "float32")), pattern),
    ])
    assert not failures, "\n".join(failures)


def test_set_weight_dict_wrong_table_shape():
    layer = _built(8, position_encoding="relative", position_size=(3, 4))
    weights = layer.get_weight_dict()
    before = _snapshot(layer)
    weights["relative_width"] = np.zeros((6, 8))
    with pytest.raises(ValueError, match=_all("relative_width", "(7, 8)", "shape=(6, 8)")):
        layer.set_weight_dict(weights)
    _assert_unchanged(layer, before)


# ----------------------------------------------------- load_botnet_weights
def _botnet_arrays(channels=8, heads=2, key_dim=4, size=(3, 5), seed=0):
    rng = np.random.default_rng(seed)
    return {
        "q_kernel": rng.standard_normal((channels, heads * key_dim)),
        "k_kernel": rng.standard_normal((channels, heads * key_dim)),
        "v_kernel": rng.standard_normal((channels, channels)),
        "rel_height": rng.standard_normal((2 * size[0] - 1, key_dim)),
        "rel_width": rng.standard_normal((2 * size[1] - 1, key_dim)),
    }


_BOTNET_BAD_SHAPES = {  # array -> (bad shape, expected shape in the message)
    "q_kernel": ((8, 6), "(8, 8)"),
    "k_kernel": ((8, 9), "(8, 8)"),
    "v_kernel": ((8, 4), "(8, 8)"),
    "rel_height": ((5, 4), "(5, 4)"),  # right rows, see below
    "rel_width": ((9, 3), "(9, 4)"),
}


@pytest.mark.parametrize("built", [False, True], ids=["unbuilt", "built"])
def test_load_botnet_weights_wrong_shapes(built):
    """Each array with a wrong shape: ValueError naming the array and both
    shapes; a built layer's weights unchanged, an unbuilt layer still unbuilt."""
    bad = dict(_BOTNET_BAD_SHAPES)
    bad["rel_height"] = ((7, 4), "(5, 4)")  # 7 rows where position_size 3 needs 5
    cases = []
    layers = []
    for name, (shape, expected) in bad.items():
        layer = MultiHeadSelfAttention2D.botnet(num_heads=2, position_size=(3, 5))
        if built:
            layer.build((None, None, None, 8))
        arrays = _botnet_arrays()
        arrays[name] = np.zeros(shape)
        layers.append((layer, _snapshot(layer) if built else None))
        cases.append((name, lambda layer=layer, arrays=arrays: layer.load_botnet_weights(
            **arrays), _all(f"`{name}`", expected, f"Received: {name}.shape={shape}")))
    failures = _failures(cases)
    assert not failures, "\n".join(failures)
    for layer, before in layers:
        if built:
            _assert_unchanged(layer, before)
        else:
            assert not layer.built


def test_load_botnet_weights_size_from_tables():
    """Without position_size the tables give it; an even row count cannot be
    2 * n - 1 and is refused."""
    layer = MultiHeadSelfAttention2D.botnet(num_heads=2)
    arrays = _botnet_arrays(size=(3, 5))
    layer.load_botnet_weights(**arrays)
    assert layer.position_size == (3, 5) and layer.channels == 8
    np.testing.assert_array_equal(to_numpy(layer.relative_width),
                                  arrays["rel_width"].astype("float32"))
    layer = MultiHeadSelfAttention2D.botnet(num_heads=2)
    arrays["rel_height"] = np.zeros((4, 4))
    with pytest.raises(ValueError, match=_all("`rel_height`", "odd", "shape=(4, 4)")):
        layer.load_botnet_weights(**arrays)
    assert not layer.built


def test_load_botnet_weights_needs_botnet_structure():
    arrays = _botnet_arrays()
    for config, shown in [
        ({}, "position_encoding='conv'"),
        ({"position_encoding": "relative", "position_size": (3, 5)}, "use_bias=True"),
        ({"position_encoding": "relative", "position_size": (3, 5), "use_bias": False},
         "activation='relu'"),
    ]:
        layer = MultiHeadSelfAttention2D(num_heads=2, **config)
        with pytest.raises(ValueError, match=_all("load_botnet_weights", shown)):
            layer.load_botnet_weights(**arrays)
        assert not layer.built


def test_load_botnet_weights_non_numeric_changes_nothing():
    layer = MultiHeadSelfAttention2D.botnet(num_heads=2, position_size=(3, 5))
    layer.build((None, None, None, 8))
    before = _snapshot(layer)
    arrays = _botnet_arrays()
    arrays["rel_width"] = np.full((9, 4), "x")
    with pytest.raises(ValueError, match=_all("rel_width", "dtype=<U1")):
        layer.load_botnet_weights(**arrays)
    _assert_unchanged(layer, before)
