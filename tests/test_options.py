"""The options schema (ape.options), its flags (ape.flags) and the registry (ape.registry)."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from typing import Literal

import pytest
from ape.search.base import available_searchers, option, searcher_class

from ape.flags import SearcherFlags, help_focus
from ape.options import OptionError, check_options, kind_of, options_of
from ape.registry import Registry


@dataclass(frozen=True)
class Toy:
    """One field of every supported type."""

    name = "toy"

    steps: int = option(3, "steps")
    lr: float = option(0.1, "learning rate")
    text: str = option("hi", "a text")
    verbose: bool = option(False, "print more")
    limit: int | None = option(None, "a cap, or none")
    mode: Literal["fast", "slow"] = option("fast", "how")
    words: tuple[str, ...] = option((), "repeatable", flag="--word")
    tags: list[str] = field(default_factory=list, metadata={"help": "a list"})


@dataclass(frozen=True)
class Broken:
    table: dict[str, int] = field(default_factory=dict, metadata={"help": "not supported"})
    quiet: int = 0  # no help


def _parse(*argv: str, focus: str | None = None) -> tuple[SearcherFlags, argparse.Namespace]:
    flags = SearcherFlags({"toy": options_of(Toy)})
    parser = argparse.ArgumentParser()
    flags.add_to(parser, focus=focus)
    return flags, parser.parse_args(argv)


def test_every_registered_searcher_has_help_and_supported_types():
    for name in available_searchers():
        assert check_options(searcher_class(name)) == [], name


def test_check_options_names_each_bad_field():
    problems = check_options(Broken)
    assert any("Broken.table has the unsupported type" in p for p in problems)
    assert any("Broken.quiet has no help" in p for p in problems)
    assert check_options(int) == [
        f"{int.__module__}.int is not a dataclass, so its options cannot be read"
    ]
    with pytest.raises(OptionError, match="table has the unsupported type"):
        options_of(Broken)


def test_supported_and_unsupported_types():
    assert kind_of(int).metavar == "N" and kind_of(bool).boolean
    assert kind_of(tuple[str, ...]).repeatable and kind_of(list[str]).sequence is list
    assert kind_of(Literal["a", "b"]).choices == ("a", "b")
    for unsupported in (dict[str, int], tuple[int, ...], int | str, list[int] | None, bytes):
        assert kind_of(unsupported) is None, unsupported


def test_cli_parses_every_kind():
    flags, args = _parse(
        "--steps", "5", "--lr", "1e-3", "--verbose", "--limit", "none", "--mode", "slow",
        "--word", "a", "--word", "b c", "--tags", "x",
    )  # fmt: skip
    assert flags.values(args, "toy") == {
        "steps": 5,
        "lr": 1e-3,
        "verbose": True,
        "limit": None,
        "mode": "slow",
        "words": ("a", "b c"),
        "tags": ["x"],
    }
    flags, args = _parse("--no-verbose", "--limit", "7")
    assert flags.values(args, "toy") == {"verbose": False, "limit": 7}
    flags, args = _parse()
    assert flags.values(args, "toy") == {}  # absent flags keep the field defaults


@pytest.mark.parametrize(
    "argv", [["--mode", "medium"], ["--limit", "many"], ["--steps", "1.5"], ["--verbose", "1"]]
)
def test_cli_rejects_bad_values(argv, capsys):
    with pytest.raises(SystemExit):
        _parse(*argv)
    assert "error: " in capsys.readouterr().err


def test_config_values_are_checked_with_the_same_types():
    by_name = {o.name: o for o in options_of(Toy)}
    assert by_name["words"].from_config(["a", "b"]) == ("a", "b")
    assert by_name["tags"].from_config(["a"]) == ["a"]
    assert by_name["limit"].from_config(None) is None and by_name["limit"].from_config(2) == 2
    assert by_name["lr"].from_config(1) == 1 and by_name["verbose"].from_config(True) is True
    for name, value in [
        ("steps", True),
        ("steps", "3"),
        ("lr", "0.1"),
        ("verbose", 1),
        ("limit", "none"),
        ("mode", "medium"),
        ("words", "a"),
        ("words", [1]),
    ]:
        with pytest.raises(ValueError, match=f"option '{name}' has the wrong type"):
            by_name[name].from_config(value)


def test_help_shows_defaults_and_escapes_percent(capsys):
    @dataclass(frozen=True)
    class Percent:
        share: float = option(0.5, "share of the pool, in % of rows")

    flags = SearcherFlags({"toy": options_of(Toy), "pct": options_of(Percent)})
    parser = argparse.ArgumentParser()
    flags.add_to(parser)
    text = parser.format_help()
    assert "options of --searcher toy" in text and "--verbose, --no-verbose" in text
    assert "(default: 3)" in text and "{fast,slow}" in text and "--limit N|none" in text
    assert "in % of rows (default: 0.5)" in text


def test_a_shared_flag_must_mean_the_same_field_and_type():
    @dataclass(frozen=True)
    class Other:
        steps: float = option(1.0, "steps, as a float")

    with pytest.raises(OptionError, match="'toy' and 'other' both take --steps"):
        SearcherFlags({"toy": options_of(Toy), "other": options_of(Other)})


def test_a_flag_of_another_searcher_names_its_owners():
    flags = SearcherFlags({"toy": options_of(Toy), "none": []})
    parser = argparse.ArgumentParser()
    flags.add_to(parser)
    args = parser.parse_args(["--steps", "2"])
    with pytest.raises(ValueError, match="^--steps is an option of --searcher toy, not none$"):
        flags.values(args, "none")


def test_help_focus_reads_the_searcher_only_for_optimize_help():
    names = ["ape", "tpe"]
    assert help_focus(["optimize", "d", "--searcher", "tpe", "--help"], names) == "tpe"
    assert help_focus(["optimize", "d", "--searcher=tpe", "-h"], names) == "tpe"
    assert help_focus(["optimize", "d", "--searcher", "tpe"], names) is None
    assert help_focus(["optimize", "d", "--searcher", "bogus", "--help"], names) is None


def test_registry_lists_names_and_explains_unknown_ones():
    registry = Registry("ape.searchers", "searcher")
    assert registry.names() == available_searchers() and "ape" in registry.names()
    with pytest.raises(ValueError, match=r"^unknown searcher 'bogus'; choose one of: ape, "):
        registry.load("bogus")
    assert Registry("ape.no-such-group", "widget").names() == []
