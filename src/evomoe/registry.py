"""Name -> class registries. Unknown names raise with the list of valid choices."""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, kind: str, loader: Callable[[], None] | None = None) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}
        self._loader = loader
        self._loaded = False

    def _load(self) -> None:
        if not self._loaded and self._loader is not None:
            self._loaded = True
            self._loader()

    def register(self, name: str) -> Callable[[T], T]:
        def deco(obj: T) -> T:
            if name in self._items:
                raise KeyError(f"{self.kind} '{name}' registered twice")
            self._items[name] = obj
            return obj

        return deco

    def get(self, name: str) -> T:
        self._load()
        if name not in self._items:
            raise KeyError(f"unknown {self.kind} '{name}' (choose from: {', '.join(self.names())})")
        return self._items[name]

    def names(self) -> list[str]:
        self._load()
        return sorted(self._items)


def _load_routers() -> None:
    from .moe import routers  # noqa: F401  (importing registers them)


ROUTERS: Registry = Registry("router", _load_routers)
