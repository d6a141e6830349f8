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
  the reference, on a tiny case, for every input and weight entry.

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
}

# The seed config: B=2, a 5x7 map, C=32 channels.
SHAPE = (2, 5, 7, 32)  # (B, H, W, C)
# The gradient check: B=2 (one item fully masked when masked), 2x3 map, C=4.
TINY_SHAPE = (2, 2, 3, 4)
GRAD_CASES = {
    "default": {"num_heads": 2},
    "key_dim_linear": {"num_heads": 2, "key_dim": 3, "activation": None,
                       "scale": None, "data_format": "channels_first"},
    "masked_no_position": {"num_heads": 2, "position_encoding": "none",
                           "use_bias": False, "mask": "one_item_full"},
    "masked": {"num_heads": 2, "mask": "partial"},
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


def _setup(case, shape, seed=0):
    """(x, weights, mask, config) for a case; x in the case's data_format."""
    case = dict(case)
    mask_kind = case.pop("mask", None)
    use_bias = case.pop("use_bias", True)
    batch, height, width, channels = shape
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape)
    if case.get("data_format") == "channels_first":
        x = np.ascontiguousarray(x.transpose(0, 3, 1, 2))
    weights = reference.random_weights(
        channels, case.get("num_heads", 1), case.get("key_dim"),
        case.get("position_encoding", "conv"), use_bias, seed=seed + 1)
    mask = _mask(mask_kind, batch, height, width, rng)
    return x, weights, mask, case


def _max_abs(a):
    return float(np.max(np.abs(a)))


class TestNative:
    # No native reference under the numpy backend: collect nothing (not skips).
    __test__ = NATIVE is not None

    @pytest.mark.parametrize("name", list(CASES))
    def test_forward_float64(self, name):
        x, weights, mask, config = _setup(CASES[name], SHAPE)
        ref = reference.mhsa_forward(x, weights, attention_mask=mask, **config)
        out = NATIVE.forward(x, weights, attention_mask=mask, dtype="float64", **config)
        assert out.dtype == np.float64
        assert out.shape == ref.shape
        rel = _max_abs(out - ref) / _max_abs(ref)
        assert rel <= 1e-10, f"{BACKEND} native float64: relative error {rel:.3e}"
        if mask is not None and not mask[0].any():
            assert np.all(out[0] == 0), "fully masked item must give exact zeros"

    @pytest.mark.parametrize("name", list(CASES))
    def test_forward_float32(self, name):
        x, weights, mask, config = _setup(CASES[name], SHAPE)
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
