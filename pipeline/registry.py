"""Registries keyed by name (stages, modalities, teachers, objectives). An unknown name is a UserError
that lists what exists."""

from __future__ import annotations

import difflib
import importlib
import sys
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from typing import Any, Callable, Generic, Iterator, TypeVar

from pipeline.errors import UserError

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, kind: str, entry_point_group: str | None = None, hint: str = ""):
        self.kind = kind
        self.entry_point_group = entry_point_group
        self.hint = hint  # how to add one, said when a name is unknown
        self._items: dict[str, T] = {}
        self._broken: dict[str, str] = {}  # entry-point name -> why its module failed to import
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
        """Import every module of the entry-point group (each registers itself on import). One that fails is
        set aside with its reason and said once: the commands that do not need it go on."""
        if self._loaded_entry_points or not self.entry_point_group:
            return
        self._loaded_entry_points = True
        for ep in entry_points(group=self.entry_point_group):
            if ep.name in self._items:
                continue
            try:
                ep.load()
            except Exception as e:  # a plugin's own bug, or a dependency it lacks: that plugin alone is out
                why = f"entry point {self.entry_point_group}:{ep.name} = {ep.value} failed to import " \
                      f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
                self._broken[ep.name] = why
                print(f"warning: {why}; {self.kind} {ep.name!r} is unavailable", file=sys.stderr)

    def get(self, name: str) -> T:
        self._load_entry_points()
        if name not in self._items:
            if name in self._broken:
                raise UserError(f"{self.kind} {name!r} is unavailable: {self._broken[name]}")
            close = difflib.get_close_matches(name, list(self._items), n=3)
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise UserError(f"unknown {self.kind} {name!r}{hint}; registered: {', '.join(sorted(self._items)) or 'none'}"
                            + (f". {self.hint}" if self.hint else ""))
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
_PLUGIN_HINT = ("A {kind} from a plugin: name its module under `plugins:` in the config, or install the package that "
                "registers it (entry-point group {group}); docs/adding-a-modality.md")
stage_registry: Registry = Registry("stage", "groundgan.stages",
                                    _PLUGIN_HINT.format(kind="stage", group="groundgan.stages"))
modality_registry: Registry = Registry("modality", "groundgan.modalities",
                                       _PLUGIN_HINT.format(kind="modality", group="groundgan.modalities"))


def modality_adapter(root, name: str):
    """The adapter of modality `name`, built on its section of the config (`root.modalities`; the adapter's
    defaults where the config has none)."""
    cls = modality_registry.get(name)
    return cls(root.modalities.get(name) or cls.Config())


@dataclass
class Section:
    """A top-level config section: its dataclass, the function that checks it (and fills the recipe's choices for
    settings left at None) once the whole config is merged, and the keys it retired or moved (key -> the one-line
    message naming where it went). Sections validate in `order`, registration order within one order."""

    name: str
    config_class: type
    validate: Callable[[Any], list[str] | None] | None = None  # root -> notes (the recipe's fallbacks, said aloud)
    order: int = 100
    retired: dict[str, str] = field(default_factory=dict)


section_registry: Registry = Registry("config section")


def register_section(name: str, config_class: type, validate: Callable | None = None, order: int = 100,
                     retired: dict[str, str] | None = None) -> None:
    """A section of the config that no stage owns alone (stages register theirs through register_stage)."""
    section_registry.add(name, Section(name, config_class, validate, order, dict(retired or {})))


def load_builtins() -> None:
    """Every stage and modality, built-in or installed, registered through its entry point (pyproject.toml)."""
    stage_registry.names()
    modality_registry.names()


def sections() -> list[Section]:
    """Every registered section, in validation order."""
    load_builtins()
    items = [s for _, s in section_registry.items()]
    return sorted(items, key=lambda s: s.order)  # stable: registration order within one order
