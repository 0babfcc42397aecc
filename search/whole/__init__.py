"""Whole-prompt search: instruction, demonstrations and their number and order, together."""

from ape.search.whole.searcher import WholePromptSearcher

__all__ = ["WholePromptSearcher"]
