"""An evaluator's own options: the dataclass fields it declares with a help text.

They go through the options schema (ape.options) as a searcher's fields do: each becomes a flag
of `ape optimize` and `ape evaluate` (``--calibrate/--no-calibrate`` for `choice`) and a keyword
of `optimize()` and `evaluate()`. Fields without help (`labels`, `verbalizers`: taken from the
task) are not options.
"""

from __future__ import annotations

import argparse
import dataclasses
import typing
from typing import Any

from ape.options import Option, kind_of


def evaluator_options_of(cls: type) -> list[Option]:
    """The options of evaluator class `cls`: its dataclass fields that have a help text."""
    if not dataclasses.is_dataclass(cls):
        return []
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        help_text = str(f.metadata.get("help", "")).strip()
        kind = kind_of(hints[f.name])
        if help_text and kind is not None:
            flag = "--" + f.name.replace("_", "-")
            out.append(Option(f.name, flag, kind, f.default, help_text))
    return out


def _registered() -> dict[str, list[Option]]:
    from ape.evaluators.base import EVALUATORS  # the face reaches evaluators only by name

    found = {}
    for name in EVALUATORS.names():
        try:
            found[name] = evaluator_options_of(EVALUATORS.load(name))
        except Exception:  # a broken third-party plugin must not break the command line
            continue
    return found


def add_evaluator_flags(parser: argparse.ArgumentParser) -> None:
    """One group per registered evaluator with options; an absent flag keeps the default."""
    added: set[str] = set()  # a flag two evaluators share is added once
    for name, options in _registered().items():
        fresh = [o for o in options if o.flag not in added]
        if fresh:
            group = parser.add_argument_group(f"options of --evaluator {name}")
            for option in fresh:
                option.add_to(group, option.help_with_default())
                added.add(option.flag)


def evaluator_values(args: argparse.Namespace, evaluator: str) -> dict[str, Any]:
    """The evaluator options given on the command line; one given for an evaluator that does
    not take it is an error naming the evaluators that do."""
    owners: dict[str, list[str]] = {}
    options: dict[str, Option] = {}
    for name, declared in _registered().items():
        for option in declared:
            owners.setdefault(option.flag, []).append(name)
            options.setdefault(option.flag, option)
    values = {}
    for flag, option in options.items():
        if not hasattr(args, option.dest):
            continue
        if evaluator not in owners[flag]:
            takers = " or ".join(owners[flag])
            raise ValueError(f"{flag} is an option of --evaluator {takers}, not {evaluator}")
        values[option.name] = option.from_cli(getattr(args, option.dest))
    return values


def split_options(evaluator: Any, options: dict[str, Any]) -> tuple[dict, dict]:
    """`optimize()`'s keywords split into (the named evaluator's options, the searcher's).

    An evaluator instance takes none: it is configured already."""
    if not isinstance(evaluator, str):
        return {}, dict(options)
    own = {o.name: o for o in _registered().get(evaluator, [])}
    mine = {k: own[k].from_config(v) for k, v in options.items() if k in own}
    return mine, {k: v for k, v in options.items() if k not in own}
