"""Name -> method class registry (timm style: register by decorator, look up by name)."""

from __future__ import annotations

import contextlib
import importlib
import pkgutil
from typing import Iterator, TypeVar

from searchspace._base import CompressionMethod, Stage

__all__ = ["get_method", "list_methods", "register_method", "registered", "unregister_method"]

_METHODS: dict[str, type[CompressionMethod]] = {}
_T = TypeVar("_T", bound=type[CompressionMethod])
_LOADED = False


def register_method(cls: _T) -> _T:
    """Class decorator: make a :class:`CompressionMethod` available by its ``name``.

    Raises:
        ValueError: the name is already registered, or is not a plain identifier.
    """
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not name.isidentifier():
        raise ValueError(f"a method name must be a Python identifier, got {name!r} ({cls.__qualname__})")
    if name in _METHODS and _METHODS[name] is not cls:
        raise ValueError(f"method names must be unique, but {name!r} is registered twice")
    _METHODS[name] = cls
    return cls


def unregister_method(name: str) -> type[CompressionMethod]:
    """Remove ``name`` from the registry and return its class (for tests and notebooks).

    Raises:
        KeyError: unknown name; the message lists the registered ones.
    """
    cls = get_method(name)
    del _METHODS[name]
    return cls


@contextlib.contextmanager
def registered(cls: _T) -> Iterator[_T]:
    """Register ``cls`` for the duration of a ``with`` block, then remove it again.

    The built-in methods are loaded first, so a name clash with one of them raises as
    :func:`register_method` does; nothing is left registered when the block ends, even on error.
    """
    _load_builtin()
    register_method(cls)
    try:
        yield cls
    finally:
        _METHODS.pop(cls.name, None)


def _load_builtin() -> None:
    # Every module of searchspace.methods registers itself on import, so adding a method is
    # adding a file: nothing else is edited.
    global _LOADED
    if _LOADED:
        return
    import searchspace.methods as pkg

    for info in pkgutil.iter_modules(pkg.__path__):
        if not info.name.startswith("_"):
            importlib.import_module(f"{pkg.__name__}.{info.name}")
    _LOADED = True


def list_methods(stage: Stage | None = None) -> list[str]:
    """Names of the registered methods, optionally of one stage, sorted."""
    _load_builtin()
    return sorted(n for n, c in _METHODS.items() if stage is None or c.stage == stage)


def get_method(name: str) -> type[CompressionMethod]:
    """The method class registered under ``name``.

    Raises:
        KeyError: unknown name; the message lists the registered ones.
    """
    _load_builtin()
    try:
        return _METHODS[name]
    except KeyError:
        raise KeyError(
            f"unknown method {name!r}; allowed: {', '.join(sorted(_METHODS))}"
        ) from None
