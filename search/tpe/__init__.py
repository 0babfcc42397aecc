"""Optuna's TPE over (instruction, demo set, demo count)."""

from ape.search.tpe.searcher import TPESearcher

__all__ = ["TPESearcher"]
