"""Name -> class registries for objectives and teachers; names feed CLI help and error messages."""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

_REGISTRY: dict[str, dict[str, Any]] = {"objective": {}, "teacher": {}}


def register(kind: str, name: str) -> Callable[[Any], Any]:
    def wrap(obj: Any) -> Any:
        if name in _REGISTRY[kind]:
            raise ValueError(f"{kind} {name!r} is already registered")
        _REGISTRY[kind][name] = obj
        return obj
    return wrap


def names(kind: str) -> list[str]:
    _load_builtins()
    return sorted(_REGISTRY[kind])


def get(kind: str, name: str) -> Any:
    _load_builtins()
    if name not in _REGISTRY[kind]:
        raise KeyError(f"unknown {kind} {name!r}; known {kind}s: {', '.join(names(kind))}")
    return _REGISTRY[kind][name]


def _load_builtins() -> None:
    # Importing the packages runs their @register decorators.
    from . import objectives, teachers  # noqa: F401
