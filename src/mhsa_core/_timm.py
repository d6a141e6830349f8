"""timm's own module files, loaded without timm's package `__init__`.

`import timm` runs timm/__init__.py, which imports timm.layers and
timm.models, whose `__init__`s import torchvision (`create_norm`'s
FrozenBatchNorm2d, timm.data's transforms): not installed here. The tests
and the bench's "timm" rows (`mhsa_core.bench.timm_peer`) need a few module
files that import none of it. `module("timm.layers.norm")` registers
stand-ins for the packages `timm`, `timm.layers` and `timm.models` in
`sys.modules` (empty modules with timm's real `__path__`), so Python imports
the real file, and the files its relative imports name, and never runs an
`__init__`. `eva_attention()` is timm's `EvaAttention` class compiled from
its own source in timm/models/eva.py, whose module imports half of timm;
`swin()` does the same for the Swin pieces of swin_transformer.py, and
`model_definitions(file, names)` for any definitions of a timm/models file
(Swin v2's attention), the `from timm.layers import` names they use taken
from their own files.

timm is an optional peer (backends/requirements-peers.txt, installed with
--no-deps): `available()` says whether it is installed, without importing
it. This module imports no framework at module level (torch only inside
the functions that build timm's classes); tests/timm_loader.py re-exports it
for the tests.
"""

from __future__ import annotations

import ast
import functools
import importlib
import importlib.machinery
import importlib.util
import math
import sys
import types
import typing
from pathlib import Path

PACKAGES = ("timm", "timm.layers", "timm.models")
# Where `eva_attention()` defines timm's EvaAttention (not timm.models.eva:
# importing that runs what needs torchvision).
EVA_MODULE = f"{__name__}.eva"


@functools.cache
def _root() -> Path | None:
    """timm's installed directory, found without importing it (or None).

    Once a stand-in package is registered, `find_spec("timm")` raises (the
    stand-in has no `__spec__`): its `__path__` says where timm is then."""
    loaded = sys.modules.get("timm")
    if loaded is not None and getattr(loaded, "__path__", None):
        return Path(list(loaded.__path__)[0])
    spec = importlib.util.find_spec("timm")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def available() -> bool:
    """Whether timm is installed here (nothing imported)."""
    return _root() is not None


def _register_packages() -> Path:
    root = _root()
    if root is None:
        raise ImportError("timm is not installed (backends/requirements-peers.txt)")
    for name in PACKAGES:
        if name in sys.modules:
            continue
        package = types.ModuleType(name)
        package.__path__ = [str(root.joinpath(*name.split(".")[1:]))]
        package.__package__ = name
        # A spec, as an imported package has: importlib.util.find_spec(name)
        # reads it once the name is in sys.modules (the older timm tests'
        # own loaders call it).
        package.__spec__ = importlib.machinery.ModuleSpec(
            name, None, origin=str(Path(package.__path__[0], "__init__.py"))
        )
        package.__spec__.submodule_search_locations = list(package.__path__)
        sys.modules[name] = package
    return root


def module(name: str) -> types.ModuleType:
    """The timm module `name` (e.g. "timm.layers.attention"), loaded from its
    file, its package `__init__`s skipped."""
    _register_packages()
    return importlib.import_module(name)


def eva_attention() -> type:
    """timm's `EvaAttention` (timm/models/eva.py), its class statement run
    in a namespace of the names it uses, from the timm.layers files that
    define them."""
    root = _register_packages()
    source = (root / "models" / "eva.py").read_text(encoding="utf-8")
    (node,) = [
        n
        for n in ast.parse(source).body
        if isinstance(n, ast.ClassDef) and n.name == "EvaAttention"
    ]
    import torch
    import torch.nn.functional as F
    from torch import nn

    attention = module("timm.layers.attention")
    namespace = {
        "torch": torch,
        "nn": nn,
        "F": F,
        **{name: getattr(typing, name) for name in typing.__all__},
        "use_fused_attn": module("timm.layers.config").use_fused_attn,
        "apply_rot_embed_cat": module(
            "timm.layers.pos_embed_sincos"
        ).apply_rot_embed_cat,
        "maybe_add_mask": attention.maybe_add_mask,
        "resolve_self_attn_mask": attention.resolve_self_attn_mask,
    }
    # The namespace is a module of its own in sys.modules: torch.compile
    # imports the module its globals name, and the real timm.models.eva
    # imports torchvision (through timm.data).
    home = types.ModuleType(EVA_MODULE)
    home.__dict__.update(namespace)
    sys.modules.setdefault(EVA_MODULE, home)
    home = sys.modules[EVA_MODULE]
    if "EvaAttention" not in home.__dict__:
        code = compile(
            ast.Module([node], type_ignores=[]), str(root / "models/eva.py"), "exec"
        )
        exec(code, home.__dict__)  # noqa: S102 -- timm's own class statement
    return home.EvaAttention


@functools.cache
def _layers_index():
    """name -> the timm.layers file that defines it, read off
    timm/layers/__init__.py's `from .file import name` lines."""
    root = _register_packages()
    tree = ast.parse((root / "layers" / "__init__.py").read_text(encoding="utf-8"))
    index = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 1 and node.module:
            for alias in node.names:
                index[alias.asname or alias.name] = f"timm.layers.{node.module}"
    return index


def model_definitions(file, names):
    """Top-level definitions `names` (classes, functions, assignments) of
    timm/models/<file>.py, run in a namespace of what the file's imports
    give them: the standard library and torch as imported, and each name of
    `from timm.layers import ...` from the timm.layers file that defines it
    (a name whose file does not import here is left out; the definitions
    asked for must not need it). timm's own relative imports (its builder,
    registry) and the decorators (fx registration) are dropped.
    E.g. model_definitions("swin_transformer_v2", ["WindowAttention"])."""
    root = _register_packages()
    path = root / "models" / f"{file}.py"
    tree = ast.parse(path.read_text(encoding="utf-8"))
    # A module of its own in sys.modules, as EvaAttention's: torch.compile
    # imports the module a function's globals name, and the real
    # timm/models/<file>.py may import torchvision (pvt_v2's through
    # timm.data). Definitions asked for again are not run again.
    home_name = f"{__name__}.models.{file}"
    home = sys.modules.get(home_name)
    if home is None:
        home = types.ModuleType(home_name)
        sys.modules[home_name] = home
    namespace = home.__dict__
    names = list(names)
    missing = [n for n in names if n not in namespace]
    index = _layers_index()
    body = []
    for node in tree.body:
        if isinstance(node, ast.ImportFrom) and node.module == "timm.layers":
            for alias in node.names:
                try:
                    value = getattr(module(index[alias.name]), alias.name)
                except (ImportError, KeyError, AttributeError):
                    continue
                namespace[alias.asname or alias.name] = value
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            source = getattr(node, "module", None) or ""
            if not getattr(node, "level", 0) and not source.startswith("timm"):
                exec(  # noqa: S102 -- the file's own import statement
                    compile(ast.Module([node], type_ignores=[]), str(path), "exec"),
                    namespace,
                )
            continue
        name = getattr(node, "name", None)
        if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name):
            name = node.targets[0].id
        if name in missing:
            if hasattr(node, "decorator_list"):
                node.decorator_list = []
            body.append(node)
    code = compile(ast.Module(body, type_ignores=[]), str(path), "exec")
    exec(code, namespace)  # noqa: S102 -- timm's own definitions
    return types.SimpleNamespace(**{name: namespace[name] for name in names})


# What the Swin tests take of timm's swin_transformer.py (top-level names).
_SWIN_NAMES = (
    "_int_or_tuple_2_t",
    "window_partition",
    "window_reverse",
    "get_relative_position_index",
    "WindowAttention",
    "SwinTransformerBlock",
)


def swin() -> types.SimpleNamespace:
    """timm's Swin pieces (`_SWIN_NAMES`, and `resize_rel_pos_bias_table`),
    their definitions executed from the real swin_transformer.py (its
    module-level imports and model registry left out) in a namespace of the
    timm.layers names they use."""
    root = _register_packages()
    import torch
    from torch import nn

    layers = {
        name: module(f"timm.layers.{name}")
        for name in ("pos_embed_rel", "helpers", "grid", "mlp", "drop", "config")
    }
    weight_init = module("timm.layers.weight_init")
    path = root / "models" / "swin_transformer.py"
    body = []
    for node in ast.parse(path.read_text(encoding="utf-8")).body:
        name = getattr(node, "name", None)
        if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name):
            name = node.targets[0].id
        if name in _SWIN_NAMES:
            if hasattr(node, "decorator_list"):
                node.decorator_list = []  # timm's fx registration
            body.append(node)
    namespace = {
        "torch": torch,
        "nn": nn,
        "math": math,
        **{name: getattr(typing, name) for name in typing.__all__},
        "to_2tuple": layers["helpers"].to_2tuple,
        "get_device_dtype": layers["helpers"].get_device_dtype,
        "ndgrid": layers["grid"].ndgrid,
        "Mlp": layers["mlp"].Mlp,
        "DropPath": layers["drop"].DropPath,
        "use_fused_attn": layers["config"].use_fused_attn,
        "trunc_normal_": weight_init.trunc_normal_,
        "resize_rel_pos_bias_table": layers["pos_embed_rel"].resize_rel_pos_bias_table,
    }
    code = compile(ast.Module(body=body, type_ignores=[]), str(path), "exec")
    exec(code, namespace)  # noqa: S102 -- timm's own definitions
    return types.SimpleNamespace(
        **{name: namespace[name] for name in _SWIN_NAMES},
        resize_rel_pos_bias_table=layers["pos_embed_rel"].resize_rel_pos_bias_table,
    )
