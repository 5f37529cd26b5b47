"""Command-line options of the registered methods, generated from their config fields.

Every field of a method config (and of the configs nested in it, e.g. GPTQConfig.uniform) that
`jaxq.config.setting` marks for the command line becomes an option: `group_size` -> --group-size
(int, or the setting's `parse`, e.g. `config.fraction` for "0.45%"), a Literal -> its choices, a
bool -> --flag (default False) or --no-flag (default True).
Options several methods share (--bits) are offered once. Nothing is given a default on the command
line: what is not given keeps the config's default, and what is given but does not apply (a
method without that field, or a field whose `requires` does not hold) is refused by `check`.
"""

from __future__ import annotations

import argparse
import dataclasses
import typing
from collections.abc import Callable
from typing import Any, Literal

from jaxq.methods import registry


@dataclasses.dataclass(frozen=True)
class Option:
    dest: str                       # the field name
    flags: tuple[str, ...]          # "--group-size" first
    kind: Any                       # the field's type
    default: Any                    # the config's default
    help: str
    requires: tuple[tuple[str, Any], ...]
    parse: Callable[[str], Any] | None = None  # the option's text -> value (default: by `kind`)

    def add_to(self, parser: argparse.ArgumentParser | Any, defaults: str) -> None:
        """defaults: how the help states the default(s), e.g. " (default 4)"."""
        origin, args = typing.get_origin(self.kind), typing.get_args(self.kind)
        if self.kind is bool:
            action = "store_false" if self.default else "store_true"
            parser.add_argument(*self.flags, dest=self.dest, action=action, default=None, help=self.help)
            return
        if origin is Literal:
            kwargs = {"choices": args, "type": type(args[0])}
        elif self.parse is not None:
            kwargs = {"type": _argument_type(self.parse), "metavar": self.flags[0].lstrip("-").upper()}
        else:
            kwargs = {"type": next(a for a in args if a is not type(None)) if args else self.kind}
        parser.add_argument(*self.flags, dest=self.dest, default=None, help=self.help + defaults, **kwargs)


def _argument_type(parse: Callable[[str], Any]) -> Callable[[str], Any]:
    """parse, with its error message shown by argparse (which replaces a ValueError's by its own)."""
    def typed(text: str) -> Any:
        try:
            return parse(text)
        except ValueError as err:
            raise argparse.ArgumentTypeError(str(err)) from None
    typed.__name__ = parse.__name__
    return typed


def config_options(cls: type, defaults: Any = None) -> list[Option]:
    """The command-line options of a method config class, nested configs' included, in field
    order; defaults: the values of `defaults` (a nested config's default instance), else the
    class's."""
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        default = f.default if defaults is None else getattr(defaults, f.name)
        if dataclasses.is_dataclass(default):
            out += config_options(type(default), default)
            continue
        meta = f.metadata
        if not meta.get("cli", False):
            continue
        name = meta.get("option") or f.name.replace("_", "-")
        flag = f"--no-{name}" if hints[f.name] is bool and default else f"--{name}"
        out.append(Option(f.name, (flag, *meta["flags"]), hints[f.name], default, meta["help"],
                          tuple(meta["requires"].items()), meta.get("parse")))
    return out


def all_options() -> dict[str, Option]:
    """dest -> option, over every registered method; a field several methods have must have the
    same type and flags in each (help and default are the first method's, by name)."""
    options: dict[str, Option] = {}
    for name in registry.names():
        for option in config_options(registry.registration(name).config):
            first = options.setdefault(option.dest, option)
            if (first.flags, first.kind) != (option.flags, option.kind):
                raise TypeError(f"method {name!r} offers --{option.dest.replace('_', '-')} as {option.flags} "
                                f"{option.kind}, another method as {first.flags} {first.kind}")
    return options


def add_method_options(parser: argparse.ArgumentParser) -> None:
    """--method and every registered method's options; help names the methods an option is for
    unless it is for all."""
    parser.add_argument("--method", default="rtn", choices=registry.names(), help="quantization method")
    group = parser.add_argument_group("method options (from the method configs' fields)")
    owners = {name: {o.dest: o for o in config_options(registry.registration(name).config)}
              for name in registry.names()}
    for option in all_options().values():
        users = [name for name, options in owners.items() if option.dest in options]
        prefix = "" if len(users) == len(owners) else f"[{', '.join(users)}] "
        by_default: dict[Any, list[str]] = {}
        for name in users:
            by_default.setdefault(owners[name][option.dest].default, []).append(name)
        stated = [f"{', '.join(names)}: {value}" for value, names in by_default.items() if value is not None]
        defaults = (f" (default {next(iter(by_default))})" if len(by_default) == 1 and None not in by_default
                    else f" (defaults: {'; '.join(stated)})" if len(stated) > 1 else "")
        dataclasses.replace(option, help=prefix + option.help).add_to(group, defaults)


def given(args: argparse.Namespace) -> dict[str, Any]:
    """The method options given on the command line: {dest: value}."""
    return {dest: getattr(args, dest) for dest in all_options() if getattr(args, dest, None) is not None}


def not_applying(method: str, args: argparse.Namespace) -> list[tuple[str, str | None]]:
    """Options given that `method` would ignore, as (flag, unmet condition): the condition is
    None for an option that is not the method's, else what its `requires` wants (judged on the
    other fields as given or defaulted), e.g. ("--percentile", "--calibration percentile")."""
    mine = {o.dest: o for o in config_options(registry.registration(method).config)}
    values = {dest: o.default for dest, o in mine.items()} | given(args)
    out = []
    for dest in given(args):
        if dest not in mine:
            out.append((all_options()[dest].flags[0], None))
            continue
        out += [(mine[dest].flags[0], _describe(mine[other], want)) for other, want in mine[dest].requires
                if values[other] != want]
    return out


def _describe(option: Option, value: Any) -> str:
    if option.kind is bool:
        return f"{option.dest.replace('_', '-')} {'on' if value else 'off'}"
    return f"{option.flags[0]} {value}"


def build_config(method: str, args: argparse.Namespace) -> Any:
    """The config of `method` with the options given; every other field keeps its default (a
    nested config's fields: those of the nested default instance)."""
    return _build(registry.registration(method).config(), given(args))


def _build(default: Any, values: dict[str, Any]) -> Any:
    changes = {}
    for f in dataclasses.fields(default):
        value = getattr(default, f.name)
        if dataclasses.is_dataclass(value):
            changes[f.name] = _build(value, values)
        elif f.name in values and f.metadata.get("cli", False):
            changes[f.name] = values[f.name]
    return dataclasses.replace(default, **changes)
