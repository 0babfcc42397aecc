"""Soft prompts: trained vectors before the input (prompt tuning, PEZ)."""

from ape.search.soft.prompt import SoftPrompt
from ape.search.soft.searcher import SoftPromptSearcher

__all__ = ["SoftPrompt", "SoftPromptSearcher"]
