"""Name -> class registries for the plug-ins (routers, tasks, models), with "choose from" errors.

A plug-in is one file that registers a class: ``@ROUTERS.register("dts")``. The packages that hold the
plug-ins are discovered by name (``PLUGIN_PACKAGES``), like entry points: this module imports none of them
statically, so the registry sits at the bottom of the dependency graph and nothing imports in a cycle.
A plug-in class may carry ``Options``, a dataclass of its own settings: the config gets a table for it
(``[router.dts]``, ``[task.mt]``) without a line changed anywhere else.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Generic, TypeVar

T = TypeVar("T")

# the packages whose import registers the plug-ins (each imports its plug-in modules)
PLUGIN_PACKAGES = ("evomoe.moe.routers", "evomoe.models", "evomoe.tasks")


def load_plugins() -> None:
    """Import every plug-in package once (idempotent: Python caches modules)."""
    for name in PLUGIN_PACKAGES:
        importlib.import_module(name)


def load_user_plugins(specs: str) -> list[str]:
    """Import a user's own plug-in modules: a comma-separated list of module names or ``.py`` paths (the
    ``EVOMOE_PLUGINS`` variable). Importing one registers what it defines. Returns the modules loaded."""
    loaded = []
    for spec in (s.strip() for s in specs.split(",")):
        if not spec:
            continue
        if spec.endswith(".py"):
            path = Path(spec)
            if not path.is_file():
                raise ImportError(f"EVOMOE_PLUGINS: plug-in file '{spec}' does not exist")
            name = f"evomoe_user_plugin_{path.stem}"
            if name not in sys.modules:
                module_spec = importlib.util.spec_from_file_location(name, path)
                module = importlib.util.module_from_spec(module_spec)
                sys.modules[name] = module
                module_spec.loader.exec_module(module)
            loaded.append(name)
        else:
            importlib.import_module(spec)
            loaded.append(spec)
    return loaded


class Registry(Generic[T]):
    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def deco(obj: T) -> T:
            if name in self._items and self._items[name] is not obj:
                raise KeyError(f"{self.kind} '{name}' registered twice")
            self._items[name] = obj
            if hasattr(obj, "registered_name") or isinstance(obj, type):
                obj.registered_name = name
            return obj

        return deco

    def unregister(self, name: str) -> None:
        """Forget a plug-in (tests that register their own clean up with it)."""
        self._items.pop(name, None)

    def get(self, name: str) -> T:
        load_plugins()
        if name not in self._items:
            raise KeyError(f"unknown {self.kind} '{name}' (choose from: {', '.join(self.names())})")
        return self._items[name]

    def names(self) -> list[str]:
        load_plugins()
        return sorted(self._items)

    def items(self) -> list[tuple[str, T]]:
        load_plugins()
        return sorted(self._items.items())


ROUTERS: Registry = Registry("router")
TASKS: Registry = Registry("task")
MODELS: Registry = Registry("model")
