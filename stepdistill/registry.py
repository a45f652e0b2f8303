"""Name -> class registries for objectives, teachers, domain metrics and backbones; names feed CLI help and errors.

A leaf module: it imports nothing from the package. The plug-ins import it to `register` themselves, and it finds
them by scanning their packages (every module of stepdistill/objectives/, stepdistill/teachers/ and
stepdistill/models/backbones/) the first time a kind's names are asked for, so a new objective, teacher or backbone
is one new file and no list to update. A file outside the
package registers the same way when a recipe lists it under `plugins` (`load_file`).
"""
from __future__ import annotations

import hashlib
import importlib
import importlib.util
import pkgutil
import sys
from collections.abc import Callable
from typing import Any

from .errors import RecipeError

_REGISTRY: dict[str, dict[str, Any]] = {"objective": {}, "teacher": {}, "domain": {}, "backbone": {}}
# where each kind's built-ins live: a package (every module of it is imported) or one module (the domain metrics)
PLUGIN_PACKAGES = {"objective": f"{__package__}.objectives", "teacher": f"{__package__}.teachers",
                   "domain": f"{__package__}.eval.domains", "backbone": f"{__package__}.models.backbones"}


def register(kind: str, name: str) -> Callable[[Any], Any]:
    def wrap(obj: Any) -> Any:
        if name in _REGISTRY[kind]:
            owner = getattr(_REGISTRY[kind][name], "__module__", "?")
            raise RecipeError(f"{kind} {name!r} is already registered (by {owner}): give the plug-in's @register "
                              "another name")
        _REGISTRY[kind][name] = obj
        return obj
    return wrap


def names(kind: str) -> list[str]:
    _load_builtins(kind)
    return sorted(_REGISTRY[kind])


def get(kind: str, name: str) -> Any:
    _load_builtins(kind)
    if name not in _REGISTRY[kind]:
        raise RecipeError(f"unknown {kind} {name!r}; known {kind}s: {', '.join(names(kind))}")
    return _REGISTRY[kind][name]


_scanned: set[str] = set()


def _load_builtins(kind: str) -> None:
    """Import every module of the kind's package once: importing them runs their @register decorators. By name, at
    run time, so this module stays below the plug-ins (tests/test_import_graph.py)."""
    if kind in _scanned:
        return
    package = importlib.import_module(PLUGIN_PACKAGES[kind])
    for module in pkgutil.iter_modules(getattr(package, "__path__", [])):
        importlib.import_module(f"{package.__name__}.{module.name}")
    _scanned.add(kind)


def load_file(path: str) -> None:
    """Import a plug-in module from a Python file (a recipe's `plugins`), once per file: its @register decorators add
    its objectives, teachers, domain metrics or backbones. Registered in sys.modules under a name derived from the
    path, so its dataclasses' type hints resolve as a package module's do."""
    name = "stepdistill_plugin_" + hashlib.sha256(path.encode()).hexdigest()[:12]
    if name in sys.modules:
        return
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]  # a failed import leaves nothing half-registered under that name
        raise
