"""timm's module files without its package `__init__`, for the tests: a
re-export of `mhsa_core._timm` (the bench builds its "timm" rows with the
same loader; its docstring says why the loader exists)."""

from mhsa_core._timm import (
    PACKAGES,
    available,
    eva_attention,
    model_definitions,
    module,
    swin,
)

__all__ = [
    "PACKAGES",
    "available",
    "eva_attention",
    "model_definitions",
    "module",
    "swin",
]
