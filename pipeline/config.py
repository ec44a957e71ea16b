"""The typed config, assembled from what is registered: each stage owns its section (a dataclass and a validate
function beside the stage, registered with it), a few shared sections register themselves (`decoding`), and each
modality adapter owns `modalities.<name>`. This module knows none of them by name: it merges YAML files left to
right, then `key=value` overrides with dotted paths, checks every field's `metadata={"min": x}`, and calls each
section's validate in order.

A stage section's hash covers what the stage declares (pipeline.graph.StageSpec.hash_sections), never the run-time
knobs under `run:`.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf import errors as oc_errors

from pipeline.errors import UserError
from pipeline.plain import stable_hash, to_plain  # noqa: F401  (re-exported: what configs are hashed on)


def minimum(x) -> dict:
    """A field's metadata: its value must be >= x (checked after the merge)."""
    return {"min": x}


def added_later() -> dict:
    """A field's metadata: a setting added after runs were made, None meaning the old behaviour; the config hash
    leaves it out while it is None (pipeline.plain.hashed), so those runs stay done."""
    return {"hash_when_set": True}


def path_field(kind: str = "path") -> dict:
    """A field's metadata: its value is a file or folder that a relative spelling in a config file locates from
    that file's folder. kind: path (always a path) | location (a path or a URL: one with a scheme is left alone)
    | weights (a path or a name: only a value that looks like a path, or `local-dir:PATH`, is a path)."""
    return {"path": kind}


def check_choice(value, options: tuple, key: str) -> None:
    """A one-line error unless `value` is one of `options`."""
    if value not in options:
        raise UserError(f"config: '{key}' must be {', '.join(map(str, options[:-1]))} or {options[-1]}, got {value!r}")


# ------------------------------------------------------------------------------------------------------- run
@dataclass
class RunConfig:
    """Run-time knobs: not part of any stage's config hash."""

    keep_checkpoints: int = field(default=3, metadata=minimum(1))  # newest K step checkpoints kept
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    num_threads: int = field(default=0, metadata=minimum(0))  # torch threads (0: torch's default)
    # torch.use_deterministic_algorithms (warn_only): the same run repeats to the bit at any thread count. Without
    # it, the backward of an indexed lookup (Whisper's positional embedding) sums in thread order on CPU, and two
    # runs of one config part after a few steps (docs/results.md). false: torch's faster defaults.
    deterministic: bool = True
    progress: bool = True  # tqdm bars
    distributed_backend: str = "auto"  # auto (nccl on GPU, gloo on CPU) | nccl | gloo
    # where training stages' scalars go besides metrics.jsonl: tensorboard (RUN/<stage>/tensorboard/), or a
    # logger a plugin registers (pipeline.scalar_log); [] for none
    loggers: List[str] = field(default_factory=lambda: ["tensorboard"])



# Keys every config has, before the registered sections.
BASE_FIELDS = ("seed", "stages", "plugins", "run", "modalities")


def root_config_class() -> type:
    """The RootConfig dataclass: the base keys, then one field per registered section, in section order."""
    from pipeline.registry import sections

    secs = sections()
    key = tuple((s.name, s.config_class) for s in secs)
    if key not in _ROOT_CLASSES:
        fields = [("seed", int, field(default=0)),  # seeds python, numpy and torch in every stage
                  ("stages", List[str], field(default_factory=lambda: ["ingest", "pseudo_label", "distill",
                                                                       "adversarial", "evaluate"])),  # the graph, in order
                  ("plugins", List[str], field(default_factory=list)),  # modules imported first, to register things
                  ("run", RunConfig, field(default_factory=RunConfig)),
                  ("modalities", Dict[str, Any], field(default_factory=dict))]  # validated by each adapter's dataclass
        fields += [(s.name, s.config_class, field(default_factory=s.config_class)) for s in secs]
        _ROOT_CLASSES[key] = dataclasses.make_dataclass("RootConfig", fields)
    return _ROOT_CLASSES[key]


_ROOT_CLASSES: dict = {}


# ------------------------------------------------------------------------------------------------- loading
def _close(key: str, options) -> str:
    close = difflib.get_close_matches(key, list(options), n=3, cutoff=0.5)
    return f"; did you mean {', '.join(close)}?" if close else f"; valid keys: {', '.join(sorted(options))}"


def _keys_at(schema: DictConfig, full_key: str) -> list[str]:
    node: Any = schema
    parts = [p for p in full_key.split(".")[:-1] if p]
    for p in parts:
        try:
            if isinstance(node, ListConfig):
                node = node[int(p.strip("[]"))] if len(node) else None
            else:
                node = node[p]
        except Exception:
            return []
        if node is None:
            return []
    return list(node.keys()) if isinstance(node, DictConfig) else []


def _merge(schema: DictConfig, other: Any, where: str) -> DictConfig:
    try:
        return OmegaConf.merge(schema, other)
    except oc_errors.ConfigKeyError as e:
        key = str(getattr(e, "key", "") or "")
        full = str(getattr(e, "full_key", "") or key)
        options = _keys_at(schema, full) or list(schema.keys())
        raise UserError(f"{where}: unknown key '{full}'{_close(key.split('.')[-1], options)}") from None
    except oc_errors.ValidationError as e:
        full = getattr(e, "full_key", "") or "?"
        msg = str(e).splitlines()[0]
        raise UserError(f"{where}: wrong type at '{full}': {msg}") from None
    except oc_errors.OmegaConfBaseException as e:
        raise UserError(f"{where}: {str(e).splitlines()[0]}") from None


class _NoAliasLoader(yaml.SafeLoader):
    """yaml.safe_load without anchors and aliases: a few hundred bytes of nested aliases ("billion laughs")
    expand to billions of nodes when the config is merged. A config never needs them (YAML files merge)."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise yaml.composer.ComposerError(None, None, f"aliases (*{event.anchor}) are not allowed in a config; "
                                              "write the value out, or put it in an overlay file", event.start_mark)
        return super().compose_node(parent, index)


def _load_yaml(path: str) -> dict:
    p = Path(path)
    if not p.is_file():
        raise UserError(f"config file not found: {path}")
    try:
        loader = _NoAliasLoader(p.read_text(encoding="utf-8"))
        try:
            data = loader.get_single_data()
        finally:
            loader.dispose()
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        what = getattr(e, "problem", None) or str(e).strip().splitlines()[0]
        at = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        raise UserError(f"{path}: not valid YAML: {what}{at}") from None
    except UnicodeDecodeError:
        raise UserError(f"{path}: not UTF-8 text") from None
    except RecursionError:
        raise UserError(f"{path}: not valid YAML: nested too deeply") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"{path}: the top level must be a mapping, not {type(data).__name__}")
    _refuse_env(data, path)
    return data


def _check_top_keys(layer: dict, where: str, known: list[str]) -> None:
    """A layer's top-level keys, checked before it is merged (the registered sections and the base keys)."""
    for k in layer:
        if k not in known and k != "extra":  # extra: refused with its replacement by _refuse_retired
            raise UserError(f"{where}: unknown key '{k}'{_close(str(k), known)}")


def _refuse_env(node: Any, where: str, at: str = "") -> None:
    """Environment interpolations (${oc.env:...}) are refused: the resolved config is written in clear to
    RUN/config.yaml and hashed into manifests, so a secret read from the environment would land on disk."""
    if isinstance(node, dict):
        for k, v in node.items():
            _refuse_env(v, where, f"{at}.{k}" if at else str(k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            _refuse_env(v, where, f"{at}[{i}]")
    elif isinstance(node, str) and "${" in node and "oc.env" in node.replace(" ", ""):
        raise UserError(f"{where}: '{at}' reads the environment ({node}); environment interpolation is refused, "
                        "since the resolved config is written in clear to RUN/config.yaml: give the value itself")


def _parse_overrides(overrides: list[str]) -> DictConfig:
    for o in overrides:
        if "=" not in o:
            raise UserError(f"override {o!r} is not key=value")
    for o in overrides:
        _refuse_env(o.split("=", 1)[1], "override", o.split("=", 1)[0])
    try:
        return OmegaConf.from_dotlist(list(overrides))
    except Exception as e:
        raise UserError(f"bad override: {e}") from None


def _check_mins(obj: Any, path: str = "") -> None:
    if not dataclasses.is_dataclass(obj):
        return
    for f in dataclasses.fields(obj):
        v = getattr(obj, f.name)
        p = f"{path}.{f.name}" if path else f.name
        _check_finite(v, p)
        lo = f.metadata.get("min")
        if lo is not None and isinstance(v, (int, float)) and not isinstance(v, bool) and v < lo:
            raise UserError(f"config: '{p}' must be >= {lo}, got {v}")
        if dataclasses.is_dataclass(v):
            _check_mins(v, p)
        elif isinstance(v, list):
            for i, item in enumerate(v):
                _check_mins(item, f"{p}[{i}]")


def _check_finite(v: Any, path: str) -> None:
    """NaN and infinities are refused everywhere: `lr=nan` would fail inside torch after the data stages, and
    `split.train=nan` compares false with everything (every key would land in test)."""
    if isinstance(v, float) and not math.isfinite(v):
        raise UserError(f"config: '{path}' must be a finite number, got {v}")
    if isinstance(v, (list, tuple)):
        for i, x in enumerate(v):
            if not dataclasses.is_dataclass(x):
                _check_finite(x, f"{path}[{i}]")
    elif isinstance(v, dict):
        for k, x in v.items():
            if not dataclasses.is_dataclass(x):
                _check_finite(x, f"{path}.{k}")


def load_config(files: list[str], overrides: list[str] | None = None) -> "Config":
    """Merge YAML files left to right, then the overrides; import plugins; validate everything.

    Returns a Config whose `.root` is a RootConfig instance and `.modalities` maps name -> adapter config.
    Raises UserError with one clear message on any mistake.
    """
    from pipeline.registry import import_plugins, load_builtins, modality_registry, sections, stage_registry

    raw_layers = [(_load_yaml(f), f) for f in files]
    over = _parse_overrides(overrides or [])
    # Plugins register stages and modalities, so they are imported before anything is validated.
    plugins: list = []
    where = "config"
    for layer, name in raw_layers:
        if "plugins" in layer:
            plugins, where = layer["plugins"] or [], name
    if "plugins" in over:
        plugins, where = over.plugins, "override"
        plugins = list(plugins) if isinstance(plugins, ListConfig) else plugins
    if not isinstance(plugins, list) or not all(isinstance(m, str) and m for m in plugins):
        raise UserError(f"{where}: 'plugins' must be a list of module names (strings), got {plugins!r}")
    import_plugins(plugins)
    load_builtins()
    known = [*BASE_FIELDS, *(s.name for s in sections())]
    for layer, name in raw_layers:
        _refuse_retired(_dotted_keys(layer), name)
        _check_top_keys(layer, name, known)
    _refuse_retired([o.split("=", 1)[0].strip() for o in overrides or []], "override")

    RootConfig = root_config_class()
    for layer, name in raw_layers:
        _rebase_paths(layer, RootConfig, Path(name).parent, name)
    schema = OmegaConf.structured(RootConfig)
    merged = schema
    for layer, name in raw_layers:
        merged = _merge(merged, layer, name)
    merged = _merge(merged, over, "override")

    # Modality sections: each validated against its adapter's dataclass.
    mod_cfgs: dict[str, Any] = {}
    raw_mods = OmegaConf.to_container(merged.modalities, resolve=True) or {}
    for name, section in raw_mods.items():
        adapter = modality_registry.get(name)
        m_schema = OmegaConf.structured(adapter.Config)
        m = _merge(m_schema, section or {}, f"modalities.{name}")
        mod_cfgs[name] = OmegaConf.to_object(m)
        _check_mins(mod_cfgs[name], f"modalities.{name}")

    try:
        root = OmegaConf.to_object(merged)
    except UserError:
        raise
    except Exception as e:
        raise UserError(f"config: {str(e).splitlines()[0]}") from None
    root.modalities = mod_cfgs
    _check_mins(root)
    _check_run(root.run)
    notes: list[str] = []
    for s in sections():  # in order: a section may read what an earlier one settled (distill's student style)
        if s.validate is not None:
            notes += s.validate(root) or []
    for name, mcfg in root.modalities.items():
        modality_registry.get(name).validate_config(mcfg, f"modalities.{name}")
    for s in root.stages:
        stage_registry.get(s)
    return Config(root, notes)


# -------------------------------------------------------------------------------------------- relative paths
def _rebase_paths(layer: Any, cls: Any, base: Path, file: str, key: str = "") -> None:
    """Relative paths of a config file's layer resolved against the file's folder, in place, by the schema's
    path_field markers (modality sections by their adapter's dataclass). Overrides on the command line are the
    shell's: they stay relative to the working directory."""
    import typing

    from pipeline.registry import modality_registry

    if not isinstance(layer, dict) or not dataclasses.is_dataclass(cls):
        return
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name not in layer:
            continue
        v, where, tp = layer[f.name], f"{key}{f.name}", hints.get(f.name)
        if f.metadata.get("path") and isinstance(v, str) and v:
            layer[f.name] = _rebased(v, f.metadata["path"], base, file, where)
        elif f.name == "modalities" and not key and isinstance(v, dict):
            for m, sec in v.items():
                if m in modality_registry.names():
                    _rebase_paths(sec, modality_registry.get(m).Config, base, file, f"modalities.{m}.")
        elif typing.get_origin(tp) in (list, List) and isinstance(v, list):
            (item,) = typing.get_args(tp) or (None,)
            for i, x in enumerate(v):
                _rebase_paths(x, item, base, file, f"{where}[{i}].")
        else:
            _rebase_paths(v, tp, base, file, f"{where}.")


def _rebased(v: str, kind: str, base: Path, file: str, where: str) -> str:
    prefix = ""
    if kind == "weights":
        if v.startswith("local-dir:"):
            prefix, v = "local-dir:", v[len("local-dir:"):]
        elif not ("/" in v or v.startswith((".", "~")) or v.endswith((".pt", ".pth", ".safetensors", ".bin"))):
            return v  # a model name or a route (offline:tiny.en, random, small.en)
    if kind == "location" and ("://" in v or v.split(":", 1)[0] in ("pipe", "file")):
        return v
    p = Path(v).expanduser()
    if p.is_absolute():
        return prefix + str(p)
    there = Path(os.path.normpath((base / p).absolute()))
    if not _exists(there) and _exists(Path.cwd() / p):
        raise UserError(f"{file}: '{where}': {v} is read from the config file's folder, where it does not exist "
                        f"({there}); it exists from the working directory ({Path.cwd() / p}): write it relative to "
                        "the config file, or absolute")
    return prefix + str(there)


def _exists(p: Path) -> bool:
    """A path, or a brace-expanded shard pattern's folder."""
    return p.exists() if "{" not in str(p) else p.parent.exists()


@dataclass
class Config:
    root: Any  # a root_config_class() instance
    notes: List[str] = field(default_factory=list)  # the fallbacks the sections took for settings left at None (each validate_config)

    def section(self, name: str) -> Any:
        return getattr(self.root, name, None)

    def to_plain(self) -> dict:
        return to_plain(self.root)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_plain(), sort_keys=False)



def _check_run(run: RunConfig) -> None:
    """The run-time knobs with a closed set of values."""
    import re

    from pipeline.scalar_log import logger_registry

    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", run.device):
        raise UserError(f"config: 'run.device' must be auto, cpu, cuda or cuda:N, got {run.device!r}")
    check_choice(run.distributed_backend, ("auto", "nccl", "gloo"), "run.distributed_backend")
    for name in run.loggers:
        logger_registry.get(name)  # an unknown one lists the registered loggers


# ------------------------------------------------------------------------------------- retired and moved keys
def _dotted_keys(layer: dict, prefix: str = "", depth: int = 2) -> list[str]:
    """The dotted keys of a YAML layer, two levels down (section.key)."""
    out = []
    for k, v in layer.items():
        key = f"{prefix}{k}"
        out.append(key)
        if isinstance(v, dict) and depth > 1:
            out += _dotted_keys(v, key + ".", depth - 1)
    return out


def _refuse_retired(keys: list[str], where: str) -> None:
    """A one-line error for a key a section retired or moved (each section registers its own; docs/history.md)."""
    from pipeline.registry import sections

    gone = {"extra": "the sections of plugin stages are top-level keys now, like the built-in stages' "
                     "(docs/history.md)"}
    for s in sections():
        gone.update({f"{s.name}.{k}": why for k, why in s.retired.items()})
    for k in keys:
        if k in gone:
            raise UserError(f"{where}: '{k}' {gone[k]}")
