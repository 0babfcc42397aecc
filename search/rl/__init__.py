"""RL prompts (after RLPrompt): a trained policy writes discrete prompt tokens."""

from ape.search.rl.searcher import RLSearcher

__all__ = ["RLSearcher"]
