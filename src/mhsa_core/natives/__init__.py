"""The block written natively in each framework, with no Keras: one module each.

`tensorflow`, `torch` and `jax` each hold the framework's oracle (every
encoding, mask and dtype: what the tests compare the layer with) and its fused
form `fused_block` (what `mhsa-core bench` measures as the native baseline);
`_common` holds what they share, read from `mhsa_core.reference`. README.md
in this folder describes them.

This package imports no framework: `module(backend)` imports the one asked
for, and `BUILDERS[backend]` (the bench's lookup of the fused forms) does the
same on first use. Never import two of them in one process (TensorFlow and
torch together can segfault).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator, Mapping
from types import ModuleType
from typing import Any

__all__ = ["BACKENDS", "BUILDERS", "module"]

BACKENDS = ("tensorflow", "torch", "jax")


def module(backend: str) -> ModuleType:
    """The native module of `backend` (imports its framework)."""
    if backend not in BACKENDS:
        raise ValueError(
            f"No native implementation for this backend. Expected one of "
            f"{BACKENDS}. Received: backend={backend!r}"
        )
    return importlib.import_module(f"{__name__}.{backend}")


class _FusedBuilders(Mapping[str, Callable[..., Any]]):
    """backend -> its `fused_block`, the module imported on lookup."""

    def __getitem__(self, backend: str) -> Callable[..., Any]:
        if backend not in BACKENDS:
            raise KeyError(backend)
        return module(backend).fused_block

    def __iter__(self) -> Iterator[str]:
        return iter(BACKENDS)

    def __len__(self) -> int:
        return len(BACKENDS)


# backend -> fused_block(config, weights): the bench's native subjects.
BUILDERS: Mapping[str, Callable[..., Any]] = _FusedBuilders()
