"""Draft tokens for a decoding row from its own prompt (prompt lookup decoding).

Many answers copy spans of their prompt: a negated sentence repeats the input with "not" in it,
a formal rewrite keeps most of the informal words. When the last tokens of a row (the newest
generated among them) occurred earlier in the row's text, the tokens that followed there are a
cheap guess of what comes next. The decoding loop checks such a draft in one forward pass and
keeps the part the model would have picked anyway, so the text is the same as without drafts
while a copied span costs one pass instead of one per token. On a CPU, where a pass of a few
rows costs about as much as reading all the weights, that is most of a copying answer's time.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

MAX_NGRAM = 3  # the longest tail looked up; shorter tails are tried when it is not found


def draft(
    text: Sequence[int], generated: int, length: int, max_ngram: int = MAX_NGRAM
) -> list[int]:
    """Up to `length` tokens that followed the latest earlier occurrence of the last n tokens of
    `text` (n from `max_ngram` down to 1), or [] when none occurs.

    `text` is the prompt followed by `generated` new tokens. The tail looked up always ends with
    a new token: at the start of an answer, the prompt's own last tokens ("Output:") recur after
    every demonstration, and their continuations are other answers.
    """
    if generated < 1 or length < 1:
        return []
    tokens = np.asarray(text)
    end = len(tokens)
    for n in range(min(max_ngram, end - 1), 0, -1):
        tail = tokens[end - n :]
        # Starts of earlier occurrences of the tail, with at least one token after them.
        starts = np.flatnonzero(tokens[: end - n] == tail[0])
        for start in starts[::-1]:
            if np.array_equal(tokens[start : start + n], tail):
                return tokens[start + n : start + n + length].tolist()
    return []
