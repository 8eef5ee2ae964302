"""Configs as text: TOML files and `--section.key=value` overrides read into a `Config` (every value type-checked
on the way in, with an error naming `section.key`; the ranges are checked by the dataclasses of
`ldm_lite.config`), and a `Config` written back as TOML (a run's config.toml)."""
import dataclasses
import math
import tomllib
import types
import typing
from pathlib import Path

from ldm_lite.config import ALIASES, LEGACY_VALUES, SECTIONS, Config


def field_type(section_cls, key: str):
    """The value type of `section.key` (int, float, bool, str) and whether None is allowed."""
    hint = typing.get_type_hints(section_cls)[key]
    args = typing.get_args(hint) if isinstance(hint, types.UnionType) else ()
    if args:
        return next(a for a in args if a is not type(None)), type(None) in args
    return hint, False


def _coerce(name: str, value, kind, nullable: bool):
    """A TOML value or command-line string as `kind`; ValueError naming `name` when it does not fit."""
    if isinstance(value, str) and kind is not str:
        value = _parse_string(name, value, kind, nullable)
    if value is None and nullable:
        return None
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if kind is float and isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value}")  # TOML's nan and inf, or a typed one
    if type(value) is not kind:
        raise ValueError(f"{name} must be {kind.__name__}, got {value!r} ({type(value).__name__})")
    return value


def _parse_string(name: str, text: str, kind, nullable: bool):
    lowered = text.strip().lower()
    if nullable and lowered in ("none", "null"):
        return None
    if kind is bool:
        if lowered in ("true", "1", "yes", "on"):
            return True
        if lowered in ("false", "0", "no", "off"):
            return False
        raise ValueError(f"{name} must be true or false, got {text!r}")
    try:
        return kind(text)
    except ValueError:
        raise ValueError(f"{name} must be {kind.__name__}, got {text!r}") from None


def _apply(tree: dict, values: dict) -> dict:
    """Merge {"section.key": value} into a nested {section: {key: value}} after checking names and types."""
    for dotted, value in values.items():
        section, _, key = dotted.partition(".")
        if section not in SECTIONS:
            raise ValueError(f"unknown config section {section!r} in {dotted!r}; sections: {sorted(SECTIONS)}")
        known = {f.name for f in dataclasses.fields(SECTIONS[section])}
        if key not in known:
            raise ValueError(f"unknown config key {dotted!r}; keys of [{section}]: {sorted(known)}")
        kind, nullable = field_type(SECTIONS[section], key)
        if isinstance(value, (bool, str)) and dotted in LEGACY_VALUES:
            value = value.strip().lower() if isinstance(value, str) else value
            value = LEGACY_VALUES[dotted].get(value, value)
        tree.setdefault(section, {})[key] = _coerce(dotted, value, kind, nullable)
    return tree


def config_from_dict(tree: dict) -> Config:
    """A Config from nested {section: {key: value}} (TOML or `config_to_dict` output), type-checked."""
    flat = {}
    for section, values in tree.items():
        if not isinstance(values, dict):
            raise ValueError(f"config entry {section!r} must be a [section] table; sections: {sorted(SECTIONS)}")
        flat.update({f"{section}.{key}": value for key, value in values.items()})
    checked = _apply({}, flat)
    return Config(**{name: SECTIONS[name](**checked.get(name, {})) for name in SECTIONS})


def config_to_dict(config: Config) -> dict:
    """Nested plain dict {section: {key: value}} of a Config."""
    return dataclasses.asdict(config)


def load_config(path=None, overrides: dict | None = None) -> Config:
    """Defaults, then the TOML file at `path` (if any), then `overrides` {"section.key": value or string}."""
    tree = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config file {str(path)!r} not found")
        try:
            tree = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as error:
            raise ValueError(f"config file {str(path)!r} is not valid TOML: {error}") from None
    flat = {f"{s}.{k}": v for s, values in tree.items() if isinstance(values, dict) for k, v in values.items()}
    flat.update({s: v for s, v in tree.items() if not isinstance(v, dict)})  # stray top-level keys: rejected below
    flat.update(overrides or {})
    return config_from_dict(_nest(flat))


def _nest(flat: dict) -> dict:
    tree = {}
    for dotted, value in flat.items():
        section, dot, key = dotted.partition(".")
        if not dot:
            raise ValueError(f"config key {dotted!r} must be written section.key; sections: {sorted(SECTIONS)}")
        tree.setdefault(section, {})[key] = value
    return tree


def parse_overrides(args: list[str]) -> tuple[str | None, dict]:
    """Command-line arguments -> (config file or None, {"section.key": string}).

    Accepts `--config PATH`, `--section.key=value`, `--section.key value` and the short ALIASES
    (`--data`, `--steps`, `--out`, ...). A bare `--flag` of a bool key means true.
    """
    config_path, overrides, i = None, {}, 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--"):
            raise ValueError(f"unexpected argument {arg!r}; options look like --section.key=value")
        name, eq, value = arg[2:].partition("=")
        if not eq:
            takes_value = i + 1 < len(args) and not args[i + 1].startswith("--")
            value = args[i + 1] if takes_value else "true"
            i += takes_value
        i += 1
        if name == "config":
            config_path = value
            continue
        dotted = ALIASES.get(name, name.replace("-", "_"))
        if "." not in dotted:
            raise ValueError(f"unknown option --{name}; use --section.key=value or one of "
                             f"{', '.join('--' + a for a in ALIASES)}, --config")
        overrides[dotted] = value
    return config_path, overrides


def to_toml(config: Config) -> str:
    """The config as TOML text (None values omitted), readable back by `load_config`."""
    lines = []
    for section, values in config_to_dict(config).items():
        lines.append(f"[{section}]")
        for key, value in values.items():
            if value is not None:
                lines.append(f"{key} = {_toml_value(value)}")
        lines.append("")
    return "\n".join(lines)


def _toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return repr(value)
