"""mhsa_core: 2-D multi-head self-attention for Keras 3, identical on TensorFlow,
PyTorch and JAX.

    import mhsa_core                       # before keras.saving.load_model
    layer = mhsa_core.MultiHeadSelfAttention2D(num_heads=8)

The names below are imported on first use (PEP 562), so that
`import mhsa_core.reference` and the `mhsa-core` command import no framework.
The layer is still registered for `.keras` loading whenever keras is in the
process: at once if keras was imported first, else right after keras is
imported (`_register_with_keras`).
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
from collections.abc import Sequence
from importlib.machinery import ModuleSpec
from types import ModuleType
from typing import TYPE_CHECKING, Any

__version__ = "0.2.0"

# public name -> module that defines it
_LAZY = {
    "MultiHeadSelfAttention2D": "mhsa_core.layers.mhsa2d",
    "mhsa_block": "mhsa_core.layers.block",
    "assert_backends_agree": "mhsa_core.consistency.testing",
}
_SUBMODULES = (
    "layers",
    "reference",
    "convert",
    "consistency",
    "testing",
    "distribution",
    "natives",
)

__all__ = [
    "MultiHeadSelfAttention2D",
    "mhsa_block",
    "assert_backends_agree",
    "reference",
    "convert",
    "testing",
    "distribution",
    "__version__",
]

if TYPE_CHECKING:  # static type checkers see the eager imports
    from mhsa_core import convert, distribution, reference, testing
    from mhsa_core.consistency.testing import assert_backends_agree
    from mhsa_core.layers.block import mhsa_block
    from mhsa_core.layers.mhsa2d import MultiHeadSelfAttention2D


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
    elif name in _SUBMODULES:
        value = importlib.import_module(f"mhsa_core.{name}")
    else:
        raise AttributeError(f"module 'mhsa_core' has no attribute {name!r}")
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


class _RegisterWhenKerasLoads(importlib.abc.MetaPathFinder):
    """Imports `mhsa_core.layers` (which registers the layer with Keras) right
    after keras itself is imported, once.

    `keras.saving.load_model` finds our layer through Keras's registry of
    custom objects, which only an import of the layer fills. Importing it
    here at once would import keras (and with it TensorFlow and JAX when
    installed) for every `import mhsa_core.reference`; waiting for keras
    costs nothing and keeps `import mhsa_core; import keras;
    keras.saving.load_model(...)` working.
    """

    def find_spec(
        self,
        fullname: str,
        path: Sequence[str] | None = None,
        target: ModuleType | None = None,
    ) -> ModuleSpec | None:
        if fullname != "keras":
            return None
        sys.meta_path.remove(self)  # one shot; the lookup below skips us
        spec = importlib.util.find_spec("keras")
        if spec is None or spec.loader is None:
            return spec
        exec_module = spec.loader.exec_module

        def exec_then_register(module: ModuleType) -> None:
            exec_module(module)
            importlib.import_module("mhsa_core.layers")

        # This spec's loader, patched: the point of the finder.
        spec.loader.exec_module = exec_then_register  # type: ignore[method-assign]
        return spec


def _register_with_keras() -> None:
    if "keras" in sys.modules:
        importlib.import_module("mhsa_core.layers")
    elif not any(isinstance(f, _RegisterWhenKerasLoads) for f in sys.meta_path):
        sys.meta_path.insert(0, _RegisterWhenKerasLoads())


_register_with_keras()
