"""Loading configs: defaults, then a TOML file or preset, then dotted ``--section.field=value`` overrides;
and writing them back as TOML. Saved run configs go through the schema migrations (versions.py)."""

from __future__ import annotations

import dataclasses
import sys
import typing
from pathlib import Path
from typing import Any

from .errors import ConfigError
from .schema import PRESET_DIR, Config
from .validate import validate
from .versions import migrate

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _coerce(path: str, typ: Any, value: Any) -> Any:
    """Check a TOML or CLI value against a field's type; ints are accepted for floats. ``bool | str``: a
    switch that also takes a word (``train.compile = "auto"``; the word is checked by validation)."""
    if typ == (bool | str):
        if isinstance(value, (bool, str)):
            return value
        raise ConfigError(
            f"{path}: expected bool, got {value!r} ({type(value).__name__}) (or a word: 'auto')"
        )
    ok = {
        bool: lambda v: isinstance(v, bool),
        int: lambda v: isinstance(v, int) and not isinstance(v, bool),
        float: lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
        str: lambda v: isinstance(v, str),
    }
    if typ not in ok:  # pragma: no cover - only the types above are used
        raise TypeError(f"unsupported field type {typ} for {path}")
    if ok[typ](value):
        return float(value) if typ is float else value
    raise ConfigError(f"{path}: expected {typ.__name__}, got {value!r} ({type(value).__name__})")


def apply_dict(obj: Any, data: dict[str, Any], prefix: str = "") -> None:
    """Set the fields of a (nested) config dataclass from a dict, checking names and types."""
    types_ = _field_types(type(obj))
    for key, value in data.items():
        path = f"{prefix}{key}"
        if key not in types_:
            choices = ", ".join(types_)
            raise ConfigError(f"unknown config key '{path}' = {value!r} (choose from: {choices})")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ConfigError(f"{path}: expected a table, got {value!r}")
            apply_dict(current, value, path + ".")
        else:
            setattr(obj, key, _coerce(path, types_[key], value))


def parse_override(text: str) -> tuple[list[str], Any]:
    """``section.field=value`` (leading dashes allowed) -> (["section", "field"], parsed value)."""
    body = text.lstrip("-")
    if "=" not in body:
        raise ConfigError(f"override '{text}' must look like --section.field=value")
    key, raw = body.split("=", 1)
    keys = key.split(".")
    if not all(keys):
        raise ConfigError(f"override '{text}': empty key part")
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw  # bare words are strings: --router.name=switch
    return keys, value


def split_overrides(extra: list[str]) -> list[str]:
    """Command-line words -> overrides; accepts ``--a.b=v`` and ``--a.b v``."""
    out, i = [], 0
    while i < len(extra):
        arg = extra[i]
        if not arg.startswith("--") or "." not in arg.split("=", 1)[0]:
            raise ConfigError(f"unexpected argument '{arg}' (overrides look like --section.field=value)")
        if "=" in arg:
            out.append(arg)
            i += 1
        elif i + 1 < len(extra):
            out.append(f"{arg}={extra[i + 1]}")
            i += 2
        else:
            raise ConfigError(f"override '{arg}' has no value")
    return out


def nest(keys: list[str], value: Any) -> dict[str, Any]:
    out: dict[str, Any] = {keys[-1]: value}
    for k in reversed(keys[:-1]):
        out = {k: out}
    return out


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.toml"))


def config_help() -> str:
    """The help text of a command's config argument (train, eval, config, compare, sweep)."""
    return f"a TOML file or a preset: {', '.join(preset_names())}"


def resolve_config_path(name_or_path: str | None) -> Path | None:
    if name_or_path is None:
        return None
    p = Path(name_or_path)
    if p.suffix == ".toml" or p.exists():
        if not p.is_file():
            raise ConfigError(f"config file '{p}' does not exist")
        return p
    preset = PRESET_DIR / f"{name_or_path}.toml"
    if preset.is_file():
        return preset
    names = ", ".join(preset_names())
    raise ConfigError(f"config '{name_or_path}' is neither a TOML file nor a preset (choose from: {names})")


def read_toml(path: Path) -> dict[str, Any]:
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config file '{path}' is not valid TOML: {e}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"config file '{path}' is not UTF-8 text") from None


def load_config(
    name_or_path: str | None = None, overrides: list[str] | None = None, saved: bool = False
) -> Config:
    """Defaults, then the TOML file or preset, then the dotted overrides; validated.

    ``saved``: the file is a run directory's own config.toml: one without a ``schema`` key was written by
    the first release (version 1) and is migrated. A hand-written file or preset without one is current.
    """
    cfg = Config()
    path = resolve_config_path(name_or_path)
    if path is not None:
        data = migrate(read_toml(path), str(path), assume_first=saved)
        apply_dict(cfg, drop_unloaded_plugin_tables(cfg, data) if saved else data)
    return apply_overrides(cfg, overrides or [])


def apply_overrides(cfg: Config, overrides: list[str]) -> Config:
    """Apply dotted overrides to a config in place, validate, and return it."""
    for text in overrides:
        keys, value = parse_override(text)
        if keys == ["schema"]:
            raise ConfigError("schema cannot be overridden (it is the version of the file layout)")
        apply_dict(cfg, nest(keys, value))
    validate(cfg)
    return cfg


def config_from_dict(data: dict[str, Any], origin: str = "a saved config") -> Config:
    """A config from a saved dict (checkpoint state, config.toml contents), migrated and validated."""
    cfg = Config()
    apply_dict(cfg, drop_unloaded_plugin_tables(cfg, migrate(data, origin, assume_first=True)))
    validate(cfg)
    return cfg


def drop_unloaded_plugin_tables(cfg: Config, data: dict[str, Any]) -> dict[str, Any]:
    """A saved config may hold the table of a plug-in that is not loaded now (a user's own, written while
    it was selected or loaded); unless that plug-in is the selected one, its table cannot matter."""
    for section in ("router", "task"):
        table = data.get(section)
        if not isinstance(table, dict):
            continue
        known = {f.name for f in dataclasses.fields(getattr(cfg, section))}
        for key in [k for k, v in table.items() if isinstance(v, dict) and k not in known]:
            if key == table.get("name"):
                plugins = ", ".join(sorted(known - {"name", "gate_init"}))
                raise ConfigError(
                    f"{section}.name = {key!r}: no such {section} is loaded (choose from: {plugins}); "
                    "for a plug-in of your own, name its file or module in EVOMOE_PLUGINS"
                )
            del table[key]
    return data


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    s = str(v).replace("\\", "\\\\").replace('"', '\\"')
    # control characters (but tab) may not appear raw in a TOML string: escape them
    s = "".join(f"\\u{ord(c):04x}" if (c < " " and c != "\t") or c == "\x7f" else c for c in s)
    return f'"{s}"'


def to_toml(cfg: Any, defaults: Any = None) -> str:
    """Write a (nested) dataclass as TOML; tables in field order, empty tables left out. ``defaults``: an
    object of the same shape; a value that differs from its default gets a ``# default: ...`` comment."""
    lines: list[str] = []

    def line(k: str, v: Any, default: Any) -> str:
        text = f"{k} = {_toml_value(v)}"
        return text if default is None or default == v else f"{text}  # default: {_toml_value(default)}"

    def emit(obj: Any, name: str, base: Any) -> None:
        external = getattr(obj, "external_tables", frozenset())
        scalars = [(f.name, getattr(obj, f.name)) for f in dataclasses.fields(obj)]
        scalars = [(k, v) for k, v in scalars if k not in external or k == getattr(obj, "name", None)]
        plain = [(k, v) for k, v in scalars if not dataclasses.is_dataclass(v)]
        nested = [(k, v) for k, v in scalars if dataclasses.is_dataclass(v)]
        if name and plain:
            lines.append(f"[{name}]")
        lines.extend(line(k, v, getattr(base, k, None)) for k, v in plain)
        if plain:
            lines.append("")
        for k, v in nested:
            emit(v, f"{name}.{k}" if name else k, getattr(base, k, None))

    emit(cfg, "", defaults)
    return "\n".join(lines).strip() + "\n"
