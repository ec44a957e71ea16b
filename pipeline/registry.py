"""Registries keyed by name (stages, modalities, teachers, objectives). An unknown name is a UserError
that lists what exists."""

from __future__ import annotations

import difflib
import importlib
from importlib.metadata import entry_points
from typing import Callable, Generic, Iterator, TypeVar

from pipeline.errors import UserError

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, kind: str, entry_point_group: str | None = None):
        self.kind = kind
        self.entry_point_group = entry_point_group
        self._items: dict[str, T] = {}
        self._loaded_entry_points = False

    def register(self, name: str) -> Callable[[T], T]:
        def deco(obj: T) -> T:
            self.add(name, obj)
            return obj

        return deco

    def add(self, name: str, obj: T) -> None:
        existing = self._items.get(name)
        if existing is not None and existing is not obj and getattr(existing, "__qualname__", None) != getattr(
            obj, "__qualname__", object()
        ):
            raise ValueError(f"{self.kind} {name!r} is registered twice ({existing!r} and {obj!r})")
        self._items[name] = obj

    def _load_entry_points(self) -> None:
        if self._loaded_entry_points or not self.entry_point_group:
            return
        self._loaded_entry_points = True
        for ep in entry_points(group=self.entry_point_group):
            if ep.name not in self._items:
                ep.load()  # the module registers itself on import

    def get(self, name: str) -> T:
        self._load_entry_points()
        if name not in self._items:
            close = difflib.get_close_matches(name, list(self._items), n=3)
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise UserError(f"unknown {self.kind} {name!r}{hint}; registered: {', '.join(sorted(self._items)) or 'none'}")
        return self._items[name]

    def __contains__(self, name: str) -> bool:
        self._load_entry_points()
        return name in self._items

    def names(self) -> list[str]:
        self._load_entry_points()
        return list(self._items)

    def items(self) -> Iterator[tuple[str, T]]:
        self._load_entry_points()
        return iter(list(self._items.items()))


def import_plugins(modules: list[str]) -> None:
    """Import user modules named in the config's `plugins:` so that they can register things.

    A module is found as Python finds it (sys.path, PYTHONPATH); the working directory is searched last, and
    only for the modules named here, so that no file there can stand in for pipeline, stages, modalities or a
    dependency (`python -m pipeline` would otherwise put it first; see pipeline/__main__.py)."""
    import os
    import sys

    cwd = os.getcwd()
    for mod in modules or []:
        added = cwd not in sys.path
        if added:
            sys.path.append(cwd)
        try:
            importlib.import_module(mod)
        except ImportError as e:
            raise UserError(f"plugin {mod!r} could not be imported: {e}") from None
        finally:
            if added and cwd in sys.path:
                sys.path.remove(cwd)


# The project's registries. Modules register into them on import; plugins and entry points add more.
stage_registry: Registry = Registry("stage", "groundgan.stages")
modality_registry: Registry = Registry("modality", "groundgan.modalities")
