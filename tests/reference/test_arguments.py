"""The layer's argument rules (`mhsa_core.reference.arguments`): one table that
the layer's constructor and the natives both apply (their own tests check that
they do: tests/layers/test_errors.py, tests/backends/test_native.py)."""

import inspect
import subprocess
import sys

import numpy as np
import pytest

from mhsa_core import MultiHeadSelfAttention2D
from mhsa_core.reference import arguments


def test_message_is_keras_wording():
    """Golden string: the wording the layer has always had (Keras's)."""
    with pytest.raises(ValueError) as info:
        arguments.check_arguments({"num_heads": 0})
    assert str(info.value) == (
        "Received an invalid value for argument `num_heads`, expected a positive "
        "integer. Received: num_heads=0"
    )


def test_every_rule_is_a_layer_argument():
    """A rule for an argument the layer does not take would be dead."""
    layer_arguments = inspect.signature(MultiHeadSelfAttention2D.__init__).parameters
    assert set(arguments.ARGUMENTS) <= set(layer_arguments)


def test_first_bad_argument_in_table_order_is_reported():
    with pytest.raises(ValueError, match="Received: num_heads=0"):
        arguments.check_arguments({"dropout": 2.0, "num_heads": 0})


@pytest.mark.parametrize(
    "name, value",
    [
        ("num_heads", np.int64(3)),
        ("key_dim", None),
        ("position_size", [2, 3]),
        ("scale_position_logits", np.bool_(False)),
        ("scale", np.float32(0.5)),
        ("dropout", 0),
        ("data_format", "channels_first"),
        ("seed", np.int32(7)),
        ("attention_implementation", "chunked"),
        ("chunk_size", None),
        ("position_encoding", "absolute"),
        ("rope_temperature", np.float64(100.0)),
        ("rope_layout", "half"),
        ("rope_grid_indexing", "xy"),
        ("rope_grid_offset", -0.5),
        ("rope_in_pixels", np.bool_(True)),
        ("rope_max_resolution", 448),
        ("window_size", 7),
        ("window_size", (7, 5)),
        ("window_size", None),
        ("shift_size", 0),
        ("shift_size", [3, 2]),
    ],
)
def test_valid_values_pass_unchanged(name, value):
    assert arguments.check_arguments({name: value}) == {name: value}


def test_rope_rules_join_arguments():
    """key_dim and the rope_* settings are judged with the encoding: a
    rotary key_dim is a multiple of 4; a setting nothing reads is an error.
    A golden message of each."""
    with pytest.raises(ValueError) as info:
        arguments.check_arguments({"position_encoding": "rope", "key_dim": 6})
    assert str(info.value) == (
        "position_encoding='rope' rotates pairs of query and key channels, half "
        "of them per axis of the map, so `key_dim` must be divisible by 4. "
        "Received: key_dim=6"
    )
    with pytest.raises(ValueError) as info:
        arguments.check_arguments(
            {"position_encoding": "rope_mixed", "rope_grid_offset": 1.0}
        )
    assert str(info.value) == (
        "`rope_grid_offset` has no effect with position_encoding='rope_mixed'; "
        "leave it at its default 0.0. Received: rope_grid_offset=1.0"
    )
    # Alone, or with a key_dim that fits, they pass.
    arguments.check_arguments({"key_dim": 6, "rope_grid_offset": 1.0})
    arguments.check_arguments({"position_encoding": "rope", "key_dim": 8})
    with pytest.raises(ValueError, match="key_dim=None .C // num_heads = 6."):
        arguments.check_channels(12, 2, "rope")
    arguments.check_channels(12, 2, "rope", key_dim=4)


def test_resolver_result_is_returned_and_its_errors_get_the_rule_message():
    def resolve(value):
        if value == "bad":
            raise TypeError("no")
        return value.upper()

    out = arguments.check_arguments(
        {"activation": "relu"}, convert={"activation": resolve}
    )
    assert out == {"activation": "RELU"}
    with pytest.raises(ValueError) as info:
        arguments.check_arguments(
            {"activation": "bad"}, convert={"activation": resolve}
        )
    assert str(info.value) == (
        "Received an invalid value for argument `activation`, expected None, the "
        "name of a Keras activation or a callable. Received: activation='bad'"
    )


def test_a_caller_can_replace_a_rule():
    rules = {"activation": arguments.one_of(["relu", None])}
    arguments.check_arguments({"activation": None}, rules=rules)
    with pytest.raises(ValueError, match=r"one of \['relu', None\]"):
        arguments.check_arguments({"activation": "gelu"}, rules=rules)


def test_an_argument_without_a_rule_or_a_resolver_is_a_programming_error():
    with pytest.raises(TypeError, match="bogus"):
        arguments.check_arguments({"bogus": 1})
    with pytest.raises(TypeError, match="converter"):
        arguments.check_arguments({"activation": "relu"})


@pytest.mark.parametrize(
    "channels, num_heads, encoding, parts",
    [
        (8, 3, "none", ("divisible by `num_heads`", "channels=8, num_heads=3")),
        (6, 2, "sinusoidal", ("'sinusoidal'", "divisible by 4", "channels=6")),
    ],
)
def test_check_channels(channels, num_heads, encoding, parts):
    with pytest.raises(ValueError) as info:
        arguments.check_channels(channels, num_heads, encoding)
    for part in parts:
        assert part in str(info.value)
    arguments.check_channels(12, 3, encoding)  # divisible by both: accepted


@pytest.mark.parametrize(
    "values, parts",
    [
        ({"window_size": 0}, ("`window_size`", "Received: window_size=0")),
        ({"window_size": (7,)}, ("`window_size`", "Received: window_size=(7,)")),
        ({"window_size": 7.0}, ("`window_size`", "Received: window_size=7.0")),
        ({"shift_size": -1}, ("`shift_size`", "Received: shift_size=-1")),
        ({"shift_size": None}, ("`shift_size`", "Received: shift_size=None")),
        ({"shift_size": (1, 2, 3)}, ("`shift_size`", "shift_size=(1, 2, 3)")),
    ],
    ids=lambda v: str(v),
)
def test_window_and_shift_rules(values, parts):
    with pytest.raises(ValueError) as info:
        arguments.check_arguments(values)
    for part in parts:
        assert part in str(info.value)


@pytest.mark.parametrize(
    "window, shift, encoding, parts",
    [
        (None, 2, "none", ("`shift_size`", "window_size=None", "shift_size=2")),
        (None, (0, 1), "none", ("`shift_size`", "shift_size=(0, 1)")),
        (7, 7, "none", ("`shift_size`", "window_size=7", "Received: shift_size=7")),
        ((4, 8), (2, 8), "none", ("smaller than the window", "shift_size=(2, 8)")),
        (
            7,
            0,
            "absolute",
            ("position_encoding='absolute'", "inside windows", "window_size=7"),
        ),
    ],
)
def test_check_window(window, shift, encoding, parts):
    with pytest.raises(ValueError) as info:
        arguments.check_window(window, shift, encoding)
    for part in parts:
        assert part in str(info.value)


@pytest.mark.parametrize(
    "window, shift, encoding",
    [
        (None, 0, "absolute"),
        (None, (0, 0), "none"),
        (7, 3, "relative_bias"),
        ((4, 8), (3, 7), "relative"),
        (1, 0, "sinusoidal"),
        (2, 1, "conv"),
    ],
)
def test_check_window_accepts(window, shift, encoding):
    arguments.check_window(window, shift, encoding)


def test_pair():
    assert arguments.pair(7) == (7, 7)
    assert arguments.pair([3, np.int64(4)]) == (3, 4)


def test_imports_no_framework():
    """The natives' shared module and the CLI's parent import it: NumPy only."""
    code = (
        "import sys, mhsa_core.reference.arguments, mhsa_core.natives._common\n"
        "loaded = [m for m in ('keras', 'tensorflow', 'torch', 'jax') "
        "if m in sys.modules]\n"
        "assert not loaded, loaded"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
