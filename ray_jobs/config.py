"""Settings from one place: dataclass defaults, overridden by a YAML file, overridden by flags.

``add_arguments`` turns a settings dataclass into argparse options (help text and default shown);
``resolve`` applies the layers in order and returns the final dataclass instance.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from typing import Any, TypeVar

import yaml

T = TypeVar("T")


def _base_type(tp: Any) -> type:
    """``int | None`` -> int; ``str`` -> str."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0]
    return tp


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_arguments(parser: argparse.ArgumentParser, cls: type, positional: tuple[str, ...] = ()) -> None:
    """One option per field; options default to None so ``resolve`` can tell what was given."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = _base_type(hints[f.name])
        helptext = f.metadata.get("help", "").replace("%", "%%")  # argparse formats help with %
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        if f.name in positional:
            parser.add_argument(f.name, type=tp, help=helptext)
        elif tp is bool:
            default = f.default if not required else False
            parser.add_argument(_flag(f.name), action=argparse.BooleanOptionalAction, default=None,
                                help=f"{helptext} (default: {default})")
        else:
            shown = "required unless in --config" if required else f"default: {f.default}"
            parser.add_argument(_flag(f.name), type=tp, default=None, metavar=f.name.upper(),
                                help=f"{helptext} ({shown})")


def resolve(cls: type[T], args: argparse.Namespace | dict | None = None, config_file: str | None = None) -> T:
    """Defaults < YAML file < flags. Unknown YAML keys and missing required settings are errors."""
    names = {f.name for f in dataclasses.fields(cls)}
    values: dict[str, Any] = {}
    if config_file:
        with open(config_file) as fh:
            loaded = yaml.safe_load(fh) or {}
        if not isinstance(loaded, dict):
            raise ValueError(f"{config_file}: expected a mapping of settings")
        unknown = set(loaded) - names
        if unknown:
            raise ValueError(f"{config_file}: unknown settings {sorted(unknown)}")
        values.update(loaded)
    given = vars(args) if isinstance(args, argparse.Namespace) else dict(args or {})
    values.update({k: v for k, v in given.items() if k in names and v is not None})
    missing = [
        f.name for f in dataclasses.fields(cls)
        if f.name not in values and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise ValueError("missing settings: " + ", ".join(_flag(m) for m in missing))
    return cls(**values)


def dump(settings: Any) -> str:
    """The final settings as YAML, for the run's folder."""
    return yaml.safe_dump(dataclasses.asdict(settings), sort_keys=False)
