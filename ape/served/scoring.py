"""Per-token log-probs of a continuation from a server, in one of two ways, whichever it offers.

- ``echo``: POST /completions with the context and continuation as the prompt, ``echo`` and
  ``logprobs``: the server returns a log-prob for every prompt token (vLLM, llama-cpp-python;
  OpenAI's own models dropped it). The continuation's tokens are the ones whose text, at the
  server's own ``text_offset``, reaches past the context: the tokenization seam is the server's.
- ``forced``: llama.cpp's ``llama-server`` refuses ``echo``. It tokenizes (``/tokenize``) and takes
  a GBNF ``grammar`` that can name tokens by id, so the context's tokens go in as the prompt and
  the continuation's tokens are generated under a grammar that allows exactly them, one by one;
  each forced token's log-prob is read from the model's unconstrained distribution (``logprobs``
  with ``post_sampling_probs`` off). The seam is the server's tokenization of the whole text.

Either way is only trusted after the alignment probe (ape/served/probe.py) has passed.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from ape.served.http import HTTPStatusError, ServedModelError, ServerClient, UnreachableError


@dataclass(frozen=True)
class TokenLogprob:
    """One token of a server's answer: its text, log-prob, and the most likely token there."""

    text: str
    logprob: float | None
    top: str | None = None  # the most likely token at this position, when the server says


class Scoring(Protocol):
    name: str

    def tokens(self, context: str, continuation: str, top: int = 0) -> list[TokenLogprob]:
        """The continuation's tokens with their log-probs given `context` (and all before)."""
        ...


class EchoScoring:
    """Prompt log-probs through ``echo`` + ``logprobs`` on /completions."""

    name = "echo"

    def __init__(self, client: ServerClient, model: str):
        self.client = client
        self.model = model
        self.retry = True  # off while detecting: a refusal answered with a 500 is final

    def tokens(self, context: str, continuation: str, top: int = 0) -> list[TokenLogprob]:
        text = context + continuation
        # One generated token: some servers read max_tokens 0 as "no limit".
        body = {"model": self.model, "prompt": text, "max_tokens": 1, "temperature": 0.0}
        body.update(echo=True, logprobs=max(1, top))
        answer = self.client.post("completions", body, retry=self.retry)
        spans = legacy_logprobs(_choice(answer).get("logprobs"))
        if spans is None:
            raise ServedModelError(
                f"the server at {self.client.base_url} returned no prompt log-probs for echo"
            )
        # The continuation: tokens that reach past the context and start inside the prompt.
        picked = [t for at, t in spans if at + len(t.text) > len(context) and at < len(text)]
        if not picked or any(t.logprob is None for t in picked):
            raise ServedModelError(
                f"the server at {self.client.base_url} gave no log-prob for the continuation "
                f"{continuation!r}"
            )
        return picked


class ForcedScoring:
    """Continuation log-probs by decoding under a grammar that allows only its tokens."""

    name = "forced"

    def __init__(self, client: ServerClient, model: str):
        self.client = client
        self.model = model
        self.retry = True

    def tokens(self, context: str, continuation: str, top: int = 0) -> list[TokenLogprob]:
        # The server's own tokens of the whole text; the continuation's are those that reach
        # past the context (the seam rule of `EchoScoring`).
        asked = {"content": context + continuation, "with_pieces": True, "parse_special": False}
        pieces = self.client.post("/tokenize", asked, retry=self.retry).get("tokens") or []
        ids, ends, at = [], [], 0
        for piece in pieces:
            text = piece["piece"]
            at += len(bytes(text) if isinstance(text, list) else text.encode("utf-8"))
            ids.append(piece["id"])
            ends.append(at)
        split = next((i for i, end in enumerate(ends) if end > len(context.encode())), len(ids))
        forced = ids[split:]
        if not forced:
            raise ServedModelError(
                f"the server gave no tokens for the continuation {continuation!r}"
            )
        body = {
            "model": self.model,
            "prompt": ids[:split],
            "max_tokens": len(forced),
            "temperature": 0.0,
            # Token by token: a string grammar lets greedy decoding split " cold" into " " and
            # "cold" when " " alone is the likelier first token.
            "grammar": "root ::= " + " ".join(f"<[{i}]>" for i in forced),
            "logprobs": max(1, top),
            "post_sampling_probs": False,  # the model's own distribution, not the grammar's
        }
        answer = self.client.post("completions", body, retry=self.retry)
        content = (_choice(answer).get("logprobs") or {}).get("content") or []
        got = [item.get("id") for item in content[: len(forced)]]
        if got != forced or any(item.get("logprob") is None for item in content[: len(forced)]):
            raise ServedModelError(
                f"the server at {self.client.base_url} did not follow the grammar for "
                f"{continuation!r}: it wrote tokens {got}, not {forced}"
            )
        return [
            TokenLogprob(item.get("token", ""), item["logprob"], _best(item.get("top_logprobs")))
            for item in content[: len(forced)]
        ]


def detect_scoring(
    client: ServerClient, model: str, trial: tuple[str, str], top: int = 1
) -> tuple[Scoring | None, list[TokenLogprob], list[str]]:
    """The first way the server gives continuation log-probs, with its tokens for `trial`
    (context, continuation); or None, with each way's failure."""
    failures = []
    for scoring in (EchoScoring(client, model), ForcedScoring(client, model)):
        scoring.retry = False
        try:
            found = scoring.tokens(*trial, top=top)
        except UnreachableError:
            raise
        except ServedModelError as err:
            if isinstance(err, HTTPStatusError) and err.status in (401, 403):
                raise
            failures.append(f"{scoring.name}: {err}")
            continue
        finally:
            scoring.retry = True
        if found and all(t.logprob is not None for t in found):
            return scoring, found, failures
        failures.append(f"{scoring.name}: no log-probs in the answer")
    return None, [], failures


def legacy_logprobs(logprobs: dict[str, Any] | None) -> list[tuple[int, TokenLogprob]] | None:
    """(text offset, token) pairs from OpenAI's completions ``logprobs`` object."""
    if not logprobs or "tokens" not in logprobs:
        return None
    tokens, values = logprobs["tokens"], logprobs.get("token_logprobs") or []
    offsets = logprobs.get("text_offset")
    if offsets is None:  # offsets by the token texts themselves
        offsets, at = [], 0
        for token in tokens:
            offsets.append(at)
            at += len(token)
    tops = logprobs.get("top_logprobs") or [None] * len(tokens)
    return [
        (offset, TokenLogprob(token, value, _best(top)))
        for offset, token, value, top in zip(offsets, tokens, values, tops, strict=False)
    ]


def _choice(answer: dict[str, Any]) -> dict[str, Any]:
    choices = answer.get("choices") or []
    if not choices:
        raise ServedModelError(f"the server answered without choices: {json.dumps(answer)[:200]}")
    return choices[0]


def _best(top: Any) -> str | None:
    """The most likely token of a top-log-probs entry (a dict, or a list of objects)."""
    if isinstance(top, dict) and top:
        return max(top.items(), key=lambda kv: kv[1])[0]
    if isinstance(top, Sequence) and top and isinstance(top[0], dict):
        return max(top, key=lambda t: t.get("logprob", float("-inf"))).get("token")
    return None
