"""The native per-framework references in `backends/` against the NumPy oracle.

One pytest process runs per Keras backend (KERAS_BACKEND = tensorflow, torch or
jax) and tests only the native reference of that framework, so that no process
imports two of them (TF and torch in one process can segfault). Under the numpy
backend there is no native reference and this file collects no test.

Checks:
- float64 forward equals `reference.mhsa_forward` to 1e-10 relative
  (max abs error / max |ref|), over a set of configs;
- float32 forward is within the error budget
  2 * max|ref32 - ref64| + 1e-6 * max|ref64|, ref32 being the NumPy reference
  run in float32;
- a batch item whose keys are all masked gives exactly zero (and zero gradient);
- float64 gradients of loss = sum(out * L) match central finite differences of
  the reference, on a tiny case, for every input and weight entry (the learned
  position tables included, also at a map size other than their reference
  size);
- the position encodings ("relative", "absolute", "sinusoidal") at the
  reference size of the learned tables and at other map sizes (larger, smaller
  and non-square, 1xN, Nx1); the native's table resize against
  `reference.resize_table` (bit-identical at the reference size) and, on
  TensorFlow, against `tf.image.resize`; its sine-cosine embedding against
  `reference.sinusoidal_embedding`;
- mismatched weight dicts (the tables included) raise ValueError.

jax float64 needs JAX_ENABLE_X64=1 in the environment (tests/conftest.py sets
it); the native's NumPy helpers also switch 64-bit mode on, scoped, by themselves.
"""

import importlib
import os
import sys
from pathlib import Path

import numpy as np
import pytest

from mhsa_core import reference

sys.path.insert(0, str(Path(__file__).parents[1] / "backends"))

_NATIVE_MODULES = {
    "tensorflow": "native_tensorflow",
    "torch": "native_torch",
    "jax": "native_jax",
}


def _keras_backend():
    backend = os.environ.get("KERAS_BACKEND")
    if backend is None:  # Keras' own default (keras.json or tensorflow)
        import keras

        backend = keras.config.backend()
    return backend


BACKEND = _keras_backend()
# Import only the current backend's native: each one imports its framework.
NATIVE = (importlib.import_module(_NATIVE_MODULES[BACKEND])
          if BACKEND in _NATIVE_MODULES else None)

# name -> config. "mask" selects an attention mask (see `_mask`); "use_bias"
# and the weight-shape arguments go to `random_weights`; the rest is the
# block's config, passed to both the reference and the native.
CASES = {
    "seed": {},
    "heads2": {"num_heads": 2},
    "heads8": {"num_heads": 8},
    "key_dim": {"num_heads": 4, "key_dim": 5},
    "linear_scale_none": {"num_heads": 2, "activation": None, "scale": None},
    "position_none": {"num_heads": 2, "position_encoding": "none"},
    "no_bias": {"num_heads": 2, "use_bias": False},
    "channels_first": {"num_heads": 2, "data_format": "channels_first"},
    "mask_one_item_full": {"num_heads": 2, "mask": "one_item_full"},
    "mask_partial": {"num_heads": 2, "mask": "partial"},
    "combined": {"num_heads": 4, "key_dim": 3, "scale": None, "use_bias": False,
                 "data_format": "channels_first", "mask": "one_item_full"},
    # Position encodings. key_dim != C / heads = 32 / heads throughout; the
    # cases without scale_position_logits use a scale != 1 (with scale 1 the
    # two conventions coincide).
    "relative": {"num_heads": 4, "key_dim": 6, "position_encoding": "relative"},
    "relative_unscaled_cf_masked": {
        "num_heads": 2, "key_dim": 5, "position_encoding": "relative", "scale": None,
        "scale_position_logits": False, "data_format": "channels_first",
        "mask": "one_item_full"},
    "relative_linear_partial": {
        "num_heads": 8, "key_dim": 3, "position_encoding": "relative", "activation": None,
        "scale": 0.3, "use_bias": False, "mask": "partial"},
    "absolute": {"num_heads": 2, "key_dim": 12, "position_encoding": "absolute",
                 "scale": None},
    "absolute_unscaled_partial": {
        "num_heads": 4, "key_dim": 3, "position_encoding": "absolute", "scale": 0.5,
        "scale_position_logits": False, "use_bias": False, "mask": "partial"},
    "absolute_cf_masked": {
        "num_heads": 4, "key_dim": 10, "position_encoding": "absolute", "scale": None,
        "data_format": "channels_first", "mask": "one_item_full"},
    "sinusoidal": {"num_heads": 2, "key_dim": 4, "position_encoding": "sinusoidal"},
    "sinusoidal_cf_partial": {
        "num_heads": 4, "key_dim": 5, "position_encoding": "sinusoidal", "scale": None,
        "activation": "gelu", "data_format": "channels_first", "mask": "partial"},
}

# The seed config: B=2, a 5x7 map, C=32 channels.
SHAPE = (2, 5, 7, 32)  # (B, H, W, C)
# Map sizes (H, W) of the position-encoding cases. The learned tables always
# have the reference size (5, 7) of SHAPE's map; the other sizes make the
# natives resize them (up, down, to 1 row / 1 column; (8, 9) is 8/5 and 9/7
# larger, (3, 2) 3/5 and 2/7 smaller).
POSITION_SIZE = SHAPE[1:3]
MAP_SIZES = {
    "ref": POSITION_SIZE,
    "larger": (8, 9),
    "smaller": (3, 2),
    "row": (1, 6),
    "column": (6, 1),
    "single": (1, 1),
}
_POSITION_CASES = [name for name, case in CASES.items()
                   if case.get("position_encoding") in ("relative", "absolute", "sinusoidal")]
# (case, map size): every case at the reference size, position cases at all.
FORWARD_PARAMS = ([pytest.param(name, "ref", id=name)
                   for name in CASES if name not in _POSITION_CASES]
                  + [pytest.param(name, size, id=f"{name}-{size}")
                     for name in _POSITION_CASES for size in MAP_SIZES])
# The gradient check: B=2 (one item fully masked when masked), 2x3 map, C=4.
TINY_SHAPE = (2, 2, 3, 4)
GRAD_CASES = {
    "default": {"num_heads": 2},
    "key_dim_linear": {"num_heads": 2, "key_dim": 3, "activation": None,
                       "scale": None, "data_format": "channels_first"},
    "masked_no_position": {"num_heads": 2, "position_encoding": "none",
                           "use_bias": False, "mask": "one_item_full"},
    "masked": {"num_heads": 2, "mask": "partial"},
    # Learned tables at a reference size other than the 2x3 map: (3, 2)
    # resizes the height tables down and the width tables up; at (2, 3) they
    # are used as they are.
    "relative_resized": {"num_heads": 2, "position_encoding": "relative", "scale": None,
                         "position_size": (3, 2), "mask": "partial"},
    "relative_unscaled": {"num_heads": 2, "key_dim": 3, "position_encoding": "relative",
                          "scale": 0.5, "scale_position_logits": False,
                          "data_format": "channels_first", "mask": "one_item_full"},
    "absolute_resized": {"num_heads": 2, "key_dim": 3, "position_encoding": "absolute",
                         "scale": 0.5, "scale_position_logits": False,
                         "position_size": (3, 2), "activation": None},
    "absolute": {"num_heads": 2, "position_encoding": "absolute", "use_bias": False,
                 "mask": "partial"},
    "sinusoidal": {"num_heads": 2, "key_dim": 3, "position_encoding": "sinusoidal",
                   "scale": None},
}


def _mask(kind, batch, height, width, rng):
    """None, or bool (B, H, W), True = the key may be attended to."""
    if kind is None:
        return None
    mask = rng.random((batch, height, width)) < 0.6
    mask[:, 0, 0] = True  # every item keeps at least one key...
    if kind == "one_item_full":
        mask[0] = False  # ...except item 0, fully masked
    return mask


def _setup(case, shape, seed=0, position_size=None):
    """(x, weights, mask, config) for a case; x in the case's data_format.

    The learned position tables get the reference size `position_size`, or the
    case's "position_size", or by default the map size of `shape`.
    """
    case = dict(case)
    mask_kind = case.pop("mask", None)
    use_bias = case.pop("use_bias", True)
    batch, height, width, channels = shape
    position_size = case.pop("position_size", position_size or (height, width))
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape)
    if case.get("data_format") == "channels_first":
        x = np.ascontiguousarray(x.transpose(0, 3, 1, 2))
    weights = reference.random_weights(
        channels, case.get("num_heads", 1), case.get("key_dim"),
        case.get("position_encoding", "conv"), use_bias, seed=seed + 1,
        position_size=position_size)
    mask = _mask(mask_kind, batch, height, width, rng)
    return x, weights, mask, case


def _sized(size):
    """SHAPE with the map size MAP_SIZES[size]."""
    height, width = MAP_SIZES[size]
    return (SHAPE[0], height, width, SHAPE[3])


def _max_abs(a):
    return float(np.max(np.abs(a)))


class TestNative:
    # No native reference under the numpy backend: collect nothing (not skips).
    __test__ = NATIVE is not None

    @pytest.mark.parametrize("name, size", FORWARD_PARAMS)
    def test_forward_float64(self, name, size):
        x, weights, mask, config = _setup(CASES[name], _sized(size),
                                          position_size=POSITION_SIZE)
        ref = reference.mhsa_forward(x, weights, attention_mask=mask, **config)
        out = NATIVE.forward(x, weights, attention_mask=mask, dtype="float64", **config)
        assert out.dtype == np.float64
        assert out.shape == ref.shape
        rel = _max_abs(out - ref) / _max_abs(ref)
        assert rel <= 1e-10, f"{BACKEND} native float64: relative error {rel:.3e}"
        if mask is not None and not mask[0].any():
            assert np.all(out[0] == 0), "fully masked item must give exact zeros"

    @pytest.mark.parametrize("name, size", FORWARD_PARAMS)
    def test_forward_float32(self, name, size):
        x, weights, mask, config = _setup(CASES[name], _sized(size),
                                          position_size=POSITION_SIZE)
        ref64 = reference.mhsa_forward(x, weights, attention_mask=mask, **config)
        ref32 = reference.mhsa_forward(x, weights, attention_mask=mask,
                                       dtype=np.float32, **config)
        ref32_err = _max_abs(ref32.astype(np.float64) - ref64)
        budget = 2.0 * ref32_err + 1e-6 * _max_abs(ref64)
        out = NATIVE.forward(x, weights, attention_mask=mask, dtype="float32", **config)
        assert out.dtype == np.float32
        err = _max_abs(out.astype(np.float64) - ref64)
        assert err <= budget, (
            f"{BACKEND} native float32: error {err:.3e}, numpy float32 reference "
            f"error {ref32_err:.3e} (ratio {err / ref32_err:.2f}), budget {budget:.3e}")
        if mask is not None and not mask[0].any():
            assert np.all(out[0] == 0), "fully masked item must give exact zeros"

    @pytest.mark.parametrize("name", list(GRAD_CASES))
    def test_value_and_grad_float64(self, name):
        x, weights, mask, config = _setup(GRAD_CASES[name], TINY_SHAPE, seed=3)
        out_shape = reference.mhsa_forward(x, weights, attention_mask=mask,
                                           **config).shape
        loss_weights = np.cos(np.arange(int(np.prod(out_shape)))).reshape(out_shape)

        def ref_loss(x_, weights_):
            out = reference.mhsa_forward(x_, weights_, attention_mask=mask, **config)
            return float(np.sum(out * loss_weights))

        loss, grad_x, grad_w = NATIVE.value_and_grad(
            x, weights, loss_weights, attention_mask=mask, dtype="float64", **config)
        ref = ref_loss(x, weights)
        assert np.asarray(loss).dtype == np.float64
        assert abs(float(loss) - ref) <= 1e-12 * max(1.0, abs(ref)), (float(loss), ref)
        assert set(grad_w) == set(weights)

        def central_difference(array, rebuild):
            """d loss / d array, entry by entry, with step 1e-6."""
            step = 1e-6
            grad = np.zeros_like(array)
            for index in np.ndindex(array.shape):
                plus, minus = array.copy(), array.copy()
                plus[index] += step
                minus[index] -= step
                grad[index] = (ref_loss(*rebuild(plus)) - ref_loss(*rebuild(minus))) / (2 * step)
            return grad

        checks = {"x": (grad_x, central_difference(x, lambda a: (a, weights)))}
        for key, value in weights.items():
            checks[key] = (grad_w[key], central_difference(
                value, lambda a, key=key: (x, {**weights, key: a})))
        # The finite-difference error is about the same for every entry (loss
        # rounding / step), whatever the entry's size, so the tolerance is
        # relative to the largest gradient entry overall, not per array: some
        # exact gradients are 0 (see below) and their FD is pure rounding noise.
        scale = max(_max_abs(fd) for _, fd in checks.values())
        for key, (grad, fd) in checks.items():
            assert grad.shape == fd.shape and grad.dtype == np.float64, key
            assert np.all(np.isfinite(grad)), key
            err = _max_abs(grad - fd)
            assert err <= 1e-6 * scale, (
                f"{BACKEND} d loss / d {key}: max error {err:.3e}, "
                f"max |fd| {_max_abs(fd):.3e}, largest gradient entry {scale:.3e}")

        if config.get("activation", "relu") is None and "key_bias" in weights:
            # With linear k, the key bias adds q . b_k to a whole row of logits:
            # the softmax ignores it, its exact gradient is zero.
            assert _max_abs(grad_w["key_bias"]) <= 1e-12 * scale

        if mask is not None and not mask[0].any():
            assert np.all(grad_x[0] == 0), "fully masked item must get zero gradient"

    def test_rejects_mismatched_weights(self):
        x, weights, _, config = _setup({"num_heads": 2}, TINY_SHAPE)
        with pytest.raises(ValueError):
            NATIVE.forward(x, weights, use_bias=False, **config)
        missing = {k: v for k, v in weights.items() if k != "key_bias"}
        with pytest.raises(ValueError):
            NATIVE.forward(x, missing, **config)
        wrong = {**weights, "query_kernel": weights["query_kernel"][:, :2]}
        with pytest.raises(ValueError):
            NATIVE.forward(x, wrong, **config)

    def test_rejects_mismatched_tables(self):
        """Missing, unexpected or wrongly shaped position tables raise ValueError."""
        relative = {"num_heads": 2, "position_encoding": "relative"}
        x, weights, _, config = _setup(relative, TINY_SHAPE, position_size=(3, 2))
        NATIVE.forward(x, weights, **config)  # the well-formed dict runs
        bad_dicts = {
            "missing": {k: v for k, v in weights.items() if k != "relative_width"},
            "extra absolute table": {**weights, "absolute_height": weights["relative_height"]},
            "wrong key_dim": {**weights, "relative_height": weights["relative_height"][:, :1]},
            "even rows": {**weights, "relative_width": weights["relative_width"][:2]},
        }
        for what, bad in bad_dicts.items():
            with pytest.raises(ValueError):
                NATIVE.forward(x, bad, **config)
                pytest.fail(f"no ValueError for a relative dict with {what}")
        # An explicit position_size must agree with the tables.
        with pytest.raises(ValueError):
            NATIVE.forward(x, weights, position_size=(2, 3), **config)
        # Tables where the encoding has none, and absolute tables of the wrong width.
        x, conv_weights, _, config = _setup({"num_heads": 2}, TINY_SHAPE)
        with pytest.raises(ValueError):
            NATIVE.forward(x, {**conv_weights, "relative_height": weights["relative_height"],
                               "relative_width": weights["relative_width"]}, **config)
        absolute = {"num_heads": 2, "position_encoding": "absolute"}
        x, weights, _, config = _setup(absolute, TINY_SHAPE)
        NATIVE.forward(x, weights, **config)
        with pytest.raises(ValueError):
            NATIVE.forward(x, {**weights, "absolute_width": weights["absolute_width"][:, :1]},
                           **config)
        with pytest.raises(ValueError):
            NATIVE.forward(x, {k: v for k, v in weights.items() if k != "absolute_height"},
                           **config)

    def test_rejects_sinusoidal_channels(self):
        """The sine-cosine embedding needs C % 4 == 0, as the reference."""
        x, weights, _, config = _setup({"num_heads": 2, "position_encoding": "sinusoidal"},
                                       (2, 2, 3, 6))
        with pytest.raises(ValueError):
            reference.mhsa_forward(x, weights, **config)
        with pytest.raises(ValueError):
            NATIVE.forward(x, weights, **config)


# Table resizes of the position tests: rows of the reference table -> rows at
# the map size, both directions, to and from 1 row.
_RESIZES = [(rows, length) for rows in (1, 2, 3, 5, 9, 13, 17)
            for length in (1, 2, 3, 4, 5, 7, 9, 13, 15, 17, 25, 33)]


class TestNativePositionPieces:
    """The natives' table resize and sine-cosine embedding on their own."""

    __test__ = NATIVE is not None

    @pytest.mark.parametrize("dtype", ["float64", "float32"])
    def test_resize_identity_at_reference_size(self, dtype):
        """At the reference size the tables come back bit-identical."""
        rng = np.random.default_rng(0)
        for rows in (1, 2, 3, 5, 9, 13, 17):
            table = rng.standard_normal((rows, 6)).astype(dtype)
            out = NATIVE.resize_table(table, rows, dtype)
            assert out.dtype == np.dtype(dtype)
            assert np.array_equal(out, table), f"{BACKEND} resize {rows} -> {rows} rows"

    def test_resize_float64(self):
        """The half-pixel rule of `reference.resize_table`, to float64 rounding.

        Measured: at most 1.3e-15 relative on every backend; any other rule
        (align_corners, antialiasing when shrinking) misses by 1e-2 or more.
        """
        rng = np.random.default_rng(1)
        for rows, length in _RESIZES:
            table = rng.standard_normal((rows, 6))
            ref = reference.resize_table(table, length)
            out = NATIVE.resize_table(table, length, "float64")
            assert out.dtype == np.float64 and out.shape == (length, 6)
            err = _max_abs(out - ref) / _max_abs(table)
            assert err <= 1e-13, f"{BACKEND} resize {rows} -> {length}: rel. error {err:.2e}"

    def test_resize_float32(self):
        """float32 resize within the forward's budget rule: 2x the error of the
        reference run in float32, plus 1e-6 of the table's scale."""
        rng = np.random.default_rng(2)
        for rows, length in _RESIZES:
            table = rng.standard_normal((rows, 6))
            ref64 = reference.resize_table(table, length)
            ref32 = reference.resize_table(table, length, np.float32)
            budget = 2 * _max_abs(ref32 - ref64) + 1e-6 * _max_abs(table)
            out = NATIVE.resize_table(table, length, "float32")
            assert out.dtype == np.float32
            err = _max_abs(out.astype(np.float64) - ref64)
            assert err <= budget, (f"{BACKEND} resize {rows} -> {length}: error {err:.2e}, "
                                   f"budget {budget:.2e}")

    if BACKEND == "tensorflow":  # (torch and JAX resize with that op itself)
        def test_resize_matches_tf_image_resize(self):
            """The TF native resizes by its own interpolation matrix, in the run's
            dtype, because `tf.image.resize` always returns float32 (and computes
            its source positions and weights in float32). That op,
            `method="bilinear", antialias=False` on the table seen as an (L, 1)
            image of d channels, follows the same half-pixel rule: it is within
            the float32 budget of `reference.resize_table` (measured: at most
            1.1e-6 relative; align_corners, the legacy non-half-pixel rule or
            antialiasing when shrinking miss by 4e-2 or more, except where they
            coincide) and bit-identical at the reference size."""
            import tensorflow as tf

            rng = np.random.default_rng(3)
            for rows, length in _RESIZES:
                table = rng.standard_normal((rows, 6))
                image = tf.image.resize(tf.constant(table, tf.float64)[:, None, :],
                                        (length, 1), method="bilinear", antialias=False)
                assert image.dtype == tf.float32  # whatever the input's dtype
                resized = image[:, 0, :].numpy()
                ref64 = reference.resize_table(table, length)
                ref32 = reference.resize_table(table, length, np.float32)
                budget = 2 * _max_abs(ref32 - ref64) + 1e-6 * _max_abs(table)
                err = _max_abs(resized.astype(np.float64) - ref64)
                assert err <= budget, (f"tf.image.resize {rows} -> {length}: error "
                                       f"{err:.2e}, budget {budget:.2e}")
                # The native's float32 resize against the op: within the same budget.
                native = NATIVE.resize_table(table, length, "float32")
                assert _max_abs(native.astype(np.float64) - resized) <= budget
                if rows == length:
                    assert np.array_equal(resized, table.astype(np.float32))

    @pytest.mark.parametrize("size", list(MAP_SIZES) + ["one", "wide"])
    def test_sinusoidal_embedding(self, size):
        height, width = {"one": (1, 1), "wide": (3, 40)}.get(size) or MAP_SIZES[size]
        for channels in (4, 32, 12):
            ref64 = reference.sinusoidal_embedding(height, width, channels)
            ref32 = reference.sinusoidal_embedding(height, width, channels, np.float32)
            out64 = NATIVE.sinusoidal_embedding(height, width, channels, "float64")
            out32 = NATIVE.sinusoidal_embedding(height, width, channels, "float32")
            assert out64.dtype == np.float64 and out32.dtype == np.float32
            assert out64.shape == out32.shape == ref64.shape
            assert _max_abs(out64 - ref64) <= 1e-14 * max(height, width)
            budget = 2 * _max_abs(ref32 - ref64) + 1e-6 * _max_abs(ref64)
            assert _max_abs(out32.astype(np.float64) - ref64) <= budget
