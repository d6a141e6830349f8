"""Layers for the matrix's own tests: models that really differ across backends.

The workers import this module (`--import custom_layers`) so that Keras can
load the saved models that use these layers.
"""

import keras
from keras import ops


@keras.saving.register_keras_serializable(package="mhsa_core_tests")
class BackendNoise(keras.layers.Layer):
    """Adds noise from the backend's RNG in `call`: the same seed draws
    different numbers on each backend, so every backend disagrees."""

    def __init__(self, seed=1, stddev=0.1, **kwargs):
        super().__init__(**kwargs)
        self.seed = seed
        self.stddev = stddev
        self.seed_generator = keras.random.SeedGenerator(seed)

    def call(self, inputs):
        noise = keras.random.normal(
            ops.shape(inputs),
            stddev=self.stddev,
            seed=self.seed_generator,
            dtype=inputs.dtype,
        )
        return inputs + noise

    def get_config(self):
        return {**super().get_config(), "seed": self.seed, "stddev": self.stddev}


@keras.saving.register_keras_serializable(package="mhsa_core_tests")
class ScaledOnJax(keras.layers.Layer):
    """Multiplies by `factor` under JAX only: a backend-specific bug, so that
    exactly the JAX cells must fail."""

    def __init__(self, factor=1.001, **kwargs):
        super().__init__(**kwargs)
        self.factor = factor

    def call(self, inputs):
        if keras.backend.backend() == "jax":
            return inputs * self.factor
        return inputs

    def get_config(self):
        return {**super().get_config(), "factor": self.factor}


@keras.saving.register_keras_serializable(package="mhsa_core_tests")
class GradientSkewOnJax(keras.layers.Layer):
    """The identity, whose gradient under JAX only is `1 + 2 * skew * x`
    instead of 1: the forward pass is exact everywhere (`f - stop_gradient(f)`
    is 0), so only training sees the bug."""

    def __init__(self, skew=0.01, **kwargs):
        super().__init__(**kwargs)
        self.skew = skew

    def call(self, inputs):
        if keras.backend.backend() == "jax":
            square = inputs * inputs
            return inputs + self.skew * (square - ops.stop_gradient(square))
        return inputs

    def get_config(self):
        return {**super().get_config(), "skew": self.skew}


@keras.saving.register_keras_serializable(package="mhsa_core_tests")
class ScaledWhenShapeUnknown(keras.layers.Layer):
    """Multiplies by `factor` when its input's height is unknown (None): never
    when run eagerly, but in an export traced with dynamic sizes. A model
    whose exported graph differs from the model: its export cells must fail."""

    def __init__(self, factor=1.01, **kwargs):
        super().__init__(**kwargs)
        self.factor = factor

    def call(self, inputs):
        if inputs.shape[1] is None:
            return inputs * self.factor
        return inputs

    def get_config(self):
        return {**super().get_config(), "factor": self.factor}
