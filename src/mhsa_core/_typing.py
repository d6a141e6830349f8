"""The type aliases of mhsa_core's annotations (typing only: no framework).

`Tensor` is whatever the running Keras backend computes with: a `tf.Tensor`,
`torch.Tensor` or `jax.Array` in eager calls, a `keras.KerasTensor` while a
functional model is traced, a `keras.Variable` for a weight. One annotation
must hold all of them, and Keras 3 ships no type information (no `py.typed`),
so the alias is `Any`: it names what a parameter is for the reader and the
docs, and checks nothing. NumPy arrays are typed as NumPy types them
(`np.ndarray`, `numpy.typing.ArrayLike`).
"""

from __future__ import annotations

from typing import Any, TypeAlias

__all__ = ["DType", "Nested", "Tensor"]

# A backend tensor, KerasTensor or Variable (see above).
Tensor: TypeAlias = Any
# An array or tensor, or a list, tuple or dict of them (nested): a model's
# inputs or outputs, as `keras.tree` walks them.
Nested: TypeAlias = Any
# A dtype as Keras and the frameworks hand it over: a name ("float32") or a
# backend's own dtype object (`torch.float32`, `tf.float32`).
DType: TypeAlias = Any
