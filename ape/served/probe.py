"""The alignment probe: a served model's continuation log-probs are trusted only after a few
requests whose answers are not in doubt.

llama-cpp-python's server (0.3.36) returns, for prompt token i, log p(token_i | tokens up to
and including i) instead of log p(token_i | tokens before i). Its numbers look plausible, and a
client that trusts them optimizes for the wrong prompts. Two checks catch such a server:

- **Counting.** On "1, 2, ..., 8," + " 9, 10, 11, 12" the model's most likely token at each
  continuation position is, for an aligned server, the token that is there; for a server that is
  off by one, it is the token after it. This needs no strong model, only the top token.
- **Preferences.** Pairs such as " cold" vs " banana" after an antonym demo: the right answer
  has the higher log-prob.

A server is refused when the top tokens run one position late, or when it gets the preferences
wrong and the counting shows no alignment either.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ape.served.scoring import Scoring, TokenLogprob

COUNTING = ("1, 2, 3, 4, 5, 6, 7, 8,", " 9, 10, 11, 12")
PREFERENCES = (
    ("Input: big\nOutput: small\n\nInput: hot\nOutput:", " cold", " banana"),
    ("Input: up\nOutput: down\n\nInput: yes\nOutput:", " no", " table"),
)


@dataclass
class ProbeReport:
    """What the probe saw; `problem` is None for an aligned server."""

    positions: int = 0  # counting positions with a top token to compare
    aligned: int = 0  # ... where the top token is the token there
    late: int = 0  # ... where it is the next token (off by one)
    preferences: list[tuple[str, float, str, float]] = field(default_factory=list)

    @property
    def wrong_preferences(self) -> list[tuple[str, float, str, float]]:
        return [p for p in self.preferences if p[1] <= p[3]]

    @property
    def problem(self) -> str | None:
        wrong = self.wrong_preferences
        shown = "; ".join(
            f"it prefers {w!r} ({lw:.2f}) to {r!r} ({lr:.2f})" for r, lr, w, lw in wrong
        )
        counted = (
            f"on the counting probe its most likely token at position i is token i+1 at "
            f"{self.late} of {self.positions} positions and token i at {self.aligned}"
        )
        if self.positions and self.late > self.aligned:
            detail = "; ".join(filter(None, [counted, shown]))
            return (
                "its prompt log-probs are off by one (the log-prob of token i is read after token "
                f"i, not before it: {detail})"
            )
        if wrong and self.aligned * 2 < max(self.positions, 1):
            return f"its prompt log-probs are misaligned ({shown}; {counted})"
        return None


def probe(scoring: Scoring, counting: list[TokenLogprob] | None = None) -> ProbeReport:
    """Run the probe requests through `scoring`: counting (unless its tokens are given), then
    the preferences, only one pair if the counting has already shown the server off by one."""
    report = ProbeReport()
    tokens = counting if counting is not None else scoring.tokens(*COUNTING, top=1)
    for here, after in zip(tokens, [*tokens[1:], None], strict=True):
        if here.top is None:
            continue
        report.positions += 1
        report.aligned += _same(here.top, here)
        report.late += after is not None and _same(here.top, after)
    if report.late > report.aligned:
        context, right, wrong = PREFERENCES[0]  # one pair, to show what it does to scores
        values = [_total(scoring.tokens(context, text)) for text in (right, wrong)]
        report.preferences.append((right, values[0], wrong, values[1]))
        return report
    for context, right, wrong in PREFERENCES:
        values = [_total(scoring.tokens(context, text)) for text in (right, wrong)]
        report.preferences.append((right, values[0], wrong, values[1]))
    return report


def _same(top: str, token: TokenLogprob) -> bool:
    return top.strip() == token.text.strip() and bool(top.strip())


def _total(tokens: list[TokenLogprob]) -> float:
    return float(sum(t.logprob for t in tokens if t.logprob is not None))
