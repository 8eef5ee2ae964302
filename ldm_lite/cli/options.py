"""Command-line flags built from a settings dataclass, so that each default and help text lives once.

Each field becomes `--field-name` (or `--FLAG` from the field's metadata "flag"), typed by its annotation; bools
take --x / --no-x. Field metadata: help, flag, aliases (more flags), metavar, choices, required, repeat (the flag
may be given several times; the values arrive as a list).
"""
import argparse
import dataclasses

from ldm_lite.checks import finite
from ldm_lite.config_io import field_type


class ArgumentParser(argparse.ArgumentParser):
    """argparse that refuses NaN and infinity in every number it parses, in one line naming the flag (the one
    place command-line options are checked for it; comma lists: `ldm_lite.checks.comma_list`)."""

    def parse_known_args(self, args=None, namespace=None):
        namespace, extras = super().parse_known_args(args, namespace)
        for action in self._actions:
            value = getattr(namespace, action.dest, None)
            if isinstance(value, float):
                finite(value, action.option_strings[0] if action.option_strings else action.dest)
        return namespace, extras


def add_dataclass_arguments(parser: argparse.ArgumentParser, cls, skip=()) -> None:
    """Add one flag per field of the dataclass `cls` (except the names in `skip`) to `parser`."""
    for field in dataclasses.fields(cls):
        if field.name in skip:
            continue
        meta = field.metadata
        flags = ["--" + name.replace("_", "-") for name in (meta.get("flag", field.name), *meta.get("aliases", ()))]
        kind, _ = field_type(cls, field.name)
        options = dict(dest=field.name, help=meta.get("help", ""))
        if kind is bool:
            parser.add_argument(*flags, action=argparse.BooleanOptionalAction, default=field.default, **options)
            continue
        if meta.get("repeat"):
            options.update(action="append", default=[])
        else:
            options.update(type=kind, default=field.default)
        for key in ("metavar", "choices", "required"):
            if key in meta:
                options[key] = meta[key]
        parser.add_argument(*flags, **options)


def dataclass_from_args(cls, args: argparse.Namespace, **values):
    """An instance of `cls` from parsed flags; `values` override (e.g. fields parsed further by the caller)."""
    names = {field.name for field in dataclasses.fields(cls)}
    return cls(**{**{k: v for k, v in vars(args).items() if k in names}, **values})
