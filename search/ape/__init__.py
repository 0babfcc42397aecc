"""APE (Zhou et al. 2022): instructions proposed from demos, scored by a UCB bandit, resampled."""

from ape.search.ape.searcher import APESearcher

__all__ = ["APESearcher"]
