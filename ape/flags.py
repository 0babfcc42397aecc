"""Searcher options as command-line flags, built from the options schema (`ape.options`).

Every searcher's fields become flags of one `ape optimize` parser, grouped by searcher. A flag
that several searchers share (``--minibatch``) is added once and means the same field for each;
its help names each searcher's default. A flag given for a searcher that does not take it is an
error naming the searchers that do.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping, Sequence
from typing import Any

from ape.options import Option, OptionError, options_of


class SearcherFlags:
    """The options of some searchers (name -> options, in field order) as flags of one parser."""

    def __init__(self, searchers: Mapping[str, Sequence[Option]]) -> None:
        self.options = {name: list(options) for name, options in searchers.items()}
        self.holders: dict[str, list[tuple[str, Option]]] = {}  # flag -> (searcher, option)
        for name, options in searchers.items():
            for option in options:
                owners = self.holders.setdefault(option.flag, [])
                if owners:
                    _check_same(owners[0], (name, option))
                owners.append((name, option))

    @classmethod
    def registered(cls) -> SearcherFlags:
        """The flags of every searcher registered under the ``ape.searchers`` entry points."""
        from ape.search.base import available_searchers, searcher_class

        return cls({name: options_of(searcher_class(name)) for name in available_searchers()})

    def add_to(self, parser: argparse.ArgumentParser, focus: str | None = None) -> None:
        """Add the flags, one group per searcher; absent flags keep the fields' defaults.

        With `focus`, only that searcher's flags are shown, with its own defaults; the others
        still parse, so using one names the searcher it belongs to.
        """
        if focus is not None:
            group = parser.add_argument_group(f"options of --searcher {focus}")
            for option in self.options[focus]:
                option.add_to(group, option.help_with_default())
            for owners in self.holders.values():
                if focus not in dict(owners):
                    owners[0][1].add_to(parser, argparse.SUPPRESS)
            return
        groups = {
            name: parser.add_argument_group(f"options of --searcher {name}")
            for name in self.options
        }
        for owners in self.holders.values():
            owners[0][1].add_to(groups[owners[0][0]], _shared_help(owners))

    def values(self, args: argparse.Namespace, searcher: str) -> dict[str, Any]:
        """The options given on the command line for `searcher`, by field name."""
        options = {}
        for flag, owners in self.holders.items():
            option = owners[0][1]
            if not hasattr(args, option.dest):
                continue
            names = [name for name, _ in owners]
            if searcher not in names:
                raise ValueError(
                    f"{flag} is an option of --searcher {' or '.join(names)}, not {searcher}"
                )
            options[option.name] = option.from_cli(getattr(args, option.dest))
        return options


def _check_same(first: tuple[str, Option], other: tuple[str, Option]) -> None:
    """A shared flag must be the same field of the same type, or one parser cannot serve both."""
    (a, x), (b, y) = first, other
    if (x.name, x.kind.describe) != (y.name, y.kind.describe):
        raise OptionError(
            f"searchers {a!r} and {b!r} both take {x.flag}, as different fields or types "
            f"({x.name}: {x.kind.describe}; {y.name}: {y.kind.describe}); rename one with "
            "option(..., flag=...)"
        )


def _shared_help(owners: list[tuple[str, Option]]) -> str:
    first = owners[0][1]
    notes = [
        f" (default for {name}: {option.default!r})"
        for name, option in owners[1:]
        if option.default != first.default
    ]
    return first.help_with_default() + "".join(notes)


def help_focus(argv: Sequence[str], searchers: Sequence[str]) -> str | None:
    """The searcher of ``ape optimize ... --searcher NAME --help``, so help shows its options."""
    if "optimize" not in argv or not {"-h", "--help"} & set(argv):
        return None
    peek = argparse.ArgumentParser(add_help=False)
    peek.add_argument("--searcher")
    name = peek.parse_known_args(list(argv))[0].searcher
    return name if name in searchers else None
