"""One options schema: a searcher's dataclass fields as typed, documented options.

The CLI (one flag per field) and bench configs (an ``options`` object per searcher) both read a
searcher's hyperparameters through `options_of`, so a field type is parsed and checked in one
place. Supported field types: ``bool`` (``--flag/--no-flag``), ``int``, ``float``, ``str``,
``Literal[...]`` (choices), ``X | None`` for a scalar X (a value or ``none``), and ``tuple[str,
...]`` or ``list[str]`` (a repeatable flag). `check_options` reports any field that the schema
cannot serve, for the conformance tests run over every registered searcher.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal


class OptionError(TypeError):
    """A searcher field that the schema cannot turn into an option (no help, unsupported type)."""


@dataclass(frozen=True)
class Kind:
    """How a field type is read: from a CLI string (`parse`) and from a config value (`accept`)."""

    describe: str  # "an integer", for error messages
    parse: Callable[[str], Any]
    accept: Callable[[Any], bool]
    metavar: str | None = "TEXT"
    choices: tuple | None = None
    repeatable: bool = False  # a repeatable flag; values collect into `sequence`
    sequence: type = tuple
    boolean: bool = False  # --flag / --no-flag


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return _is_int(value) or isinstance(value, float)


def _is_str(value: Any) -> bool:
    return isinstance(value, str)


def _is_bool(value: Any) -> bool:
    return isinstance(value, bool)


def _parse_bool(text: str) -> bool:
    """'true'/'false' (yes/no, 1/0); the CLI uses --flag/--no-flag instead."""
    words = {"true": True, "yes": True, "1": True, "false": False, "no": False, "0": False}
    if text.lower() not in words:
        raise ValueError(f"not a boolean: {text!r}")
    return words[text.lower()]


SCALARS: dict[Any, Kind] = {
    bool: Kind("true or false", _parse_bool, _is_bool, metavar=None, boolean=True),
    int: Kind("an integer", int, _is_int, metavar="N"),
    float: Kind("a number", float, _is_number, metavar="X"),
    str: Kind("a string", str, _is_str),
}


def kind_of(annotation: Any) -> Kind | None:
    """The Kind of a field type, or None when the schema does not support it."""
    if annotation in SCALARS:
        return SCALARS[annotation]
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is Literal:
        return _literal(args)
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        if len(inner) == 1 and len(args) == 2:
            return _optional(kind_of(inner[0]))
        return None
    if (origin is tuple and args == (str, ...)) or (origin is list and args == (str,)):
        return Kind(
            "a list of strings",
            str,
            lambda v: isinstance(v, list | tuple) and all(map(_is_str, v)),
            repeatable=True,
            sequence=origin,
        )
    return None


def _literal(choices: tuple) -> Kind | None:
    kinds = {type(c) for c in choices}
    if len(kinds) != 1 or not kinds <= {str, int}:
        return None
    parse = kinds.pop()
    return Kind(
        "one of " + ", ".join(repr(c) for c in choices),
        parse,
        lambda v: any(type(v) is type(c) and v == c for c in choices),
        metavar=None,
        choices=choices,
    )


def _optional(inner: Kind | None) -> Kind | None:
    if inner is None or inner.repeatable or inner.boolean:
        return None

    def parse(text: str) -> Any:
        return None if text.lower() == "none" else inner.parse(text)

    parse.__name__ = f"{inner.metavar or 'value'}-or-none"  # argparse names it in its errors
    return Kind(
        f"{inner.describe} or null",
        parse,
        lambda v: v is None or inner.accept(v),
        metavar=f"{inner.metavar or 'VALUE'}|none",
        choices=None if inner.choices is None else (*inner.choices, None),
    )


@dataclass(frozen=True)
class Option:
    """One hyperparameter: its field name, flag, type, default and help."""

    name: str
    flag: str
    kind: Kind
    default: Any
    help: str

    @property
    def dest(self) -> str:
        """The attribute argparse stores the flag's value in (prefixed: no clash with run flags)."""
        return "searcher_" + self.flag.lstrip("-").replace("-", "_")

    def from_config(self, value: Any) -> Any:
        """A JSON/TOML value checked against the type; lists become the field's sequence type."""
        if not self.kind.accept(value):
            raise ValueError(
                f"option {self.name!r} has the wrong type: {value!r} "
                f"(expected {self.kind.describe})"
            )
        return self.kind.sequence(value) if self.kind.repeatable else value

    def from_cli(self, value: Any) -> Any:
        """A parsed flag value as the field takes it (collected repeats become a tuple/list)."""
        return self.kind.sequence(value) if self.kind.repeatable else value

    def add_to(self, group: Any, help: str | None = None) -> None:
        """Add the flag to an argparse parser or group; an absent flag keeps the field default."""
        text = self.help if help is None else help
        kwargs: dict[str, Any] = {"dest": self.dest, "default": argparse.SUPPRESS}
        if self.kind.boolean:
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs["type"] = self.kind.parse
            kwargs["metavar"] = self.kind.metavar
            if self.kind.choices is not None:
                kwargs["choices"] = self.kind.choices
            if self.kind.repeatable:
                kwargs["action"] = "append"
        group.add_argument(self.flag, help=text.replace("%", "%%"), **kwargs)

    def help_with_default(self) -> str:
        """The help text, ending with the default unless the text states it already."""
        if "(default:" in self.help:
            return self.help
        return f"{self.help} (default: {self.default!r})"


def options_of(cls: type) -> list[Option]:
    """A searcher class's options in field order; OptionError names a field it cannot serve."""
    problems = check_options(cls)
    if problems:
        raise OptionError(problems[0])
    hints = typing.get_type_hints(cls)
    return [
        Option(
            name=f.name,
            flag=f.metadata.get("flag") or "--" + f.name.replace("_", "-"),
            kind=kind_of(hints[f.name]),  # type: ignore[arg-type]  # checked above
            default=_default(f),
            help=f.metadata["help"],
        )
        for f in dataclasses.fields(cls)
    ]


def _default(field: dataclasses.Field) -> Any:
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return field.default


def check_options(cls: type) -> list[str]:
    """Every problem with `cls` as a searcher's options: one line each, empty when it is fine.

    A searcher must be a dataclass whose every field has a default, a non-empty help text
    (``option(default, help)``) and a type the schema supports.
    """
    where = f"{cls.__module__}.{cls.__qualname__}"
    if not dataclasses.is_dataclass(cls):
        return [f"{where} is not a dataclass, so its options cannot be read"]
    try:
        hints = typing.get_type_hints(cls)
    except (NameError, TypeError) as err:
        return [f"{where}: cannot resolve the field types ({err})"]
    problems = []
    for f in dataclasses.fields(cls):
        if not str(f.metadata.get("help", "")).strip():
            problems.append(f"{where}.{f.name} has no help; declare it with option(default, help)")
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            problems.append(f"{where}.{f.name} has no default")
        if kind_of(hints[f.name]) is None:
            problems.append(
                f"{where}.{f.name} has the unsupported type {hints[f.name]!r} (supported: bool, "
                "int, float, str, Literal[...], X | None, tuple[str, ...], list[str])"
            )
    return problems
