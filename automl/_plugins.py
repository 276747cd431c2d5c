"""Importing a study's plugin modules: user methods (and models) register themselves on import.

Every process that builds or replays a plan (the config check, each trial worker, the dry-run
screen, ``automl finalize``) imports the config's ``plugins`` first, through :func:`import_plugins`,
so a user's method is in the registry wherever a plan may name it.
"""

from __future__ import annotations

import importlib
from typing import Iterable

__all__ = ["PluginError", "import_plugins"]


class PluginError(ValueError):
    """A plugin module cannot be imported; the message names it, its place in ``plugins`` and why."""


def import_plugins(modules: Iterable[str]) -> None:
    """Import each module of ``modules`` in order (a module imported before is not run again).

    Raises:
        PluginError: ``plugins[i]: module 'x' cannot be imported: <error type>: <message>``; the
            import error is its cause.
    """
    for i, module in enumerate(modules):
        try:
            importlib.import_module(module)
        except Exception as exc:  # noqa: BLE001 - any import failure: the module cannot be used
            raise PluginError(f"plugins[{i}]: module {module!r} cannot be imported: {type(exc).__name__}: {exc}") from exc
