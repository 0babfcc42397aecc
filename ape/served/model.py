"""`OpenAICompatibleModel`: the `LanguageModel` protocol over a server's HTTP API.

Spelled ``openai:MODEL@BASE_URL`` (``openai:qwen2.5-7b@http://localhost:8080/v1``) wherever a
model is named. `generate` goes through /completions (or /chat/completions for a chat turn);
`loglikelihood` through the scoring way the server offers (ape/served/scoring.py), after the
alignment probe (ape/served/probe.py) has passed. A server that fails either is refused for
scoring in one line, and stays usable for proposals.
"""

from __future__ import annotations

import os
import re
import threading
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ape.served.http import ServedModelError, ServerClient, Usage, api_key
from ape.served.probe import COUNTING, probe
from ape.served.scoring import Scoring, detect_scoring

PREFIX = "openai:"
_SPEC = re.compile(r"^openai:(?P<model>[^@]+)@(?P<url>https?://\S+)$")
BASE_URL_VARIABLE = "OPENAI_BASE_URL"  # the server when a spec names none


def parse_spec(spec: str) -> tuple[str, str]:
    """(model, base URL) of ``openai:MODEL@BASE_URL`` (or ``openai:MODEL`` and $OPENAI_BASE_URL)."""
    if "@" not in spec and os.environ.get(BASE_URL_VARIABLE):
        spec = f"{spec}@{os.environ[BASE_URL_VARIABLE]}"
    found = _SPEC.match(spec)
    if found is None:
        raise ServedModelError(
            f"a served model is spelled openai:MODEL@BASE_URL (e.g. openai:llama-3-70b@"
            f"http://gpu-host:8000/v1), not {spec!r}"
        )
    return found["model"], found["url"].rstrip("/")


@dataclass
class Encoding:
    input_ids: Sequence[int]

    def __getitem__(self, key: str) -> Sequence[int]:
        return getattr(self, key)


class TokenCounter:
    """What ape asks a tokenizer for, for a model it cannot tokenize for: counts of tokens.

    A text this model generated counts the tokens the server reported for it, so the budget
    charges served generations as it charges local ones. Any other text counts its UTF-8 bytes,
    an upper bound (no token is shorter than a byte). `input_ids` are placeholders of that length.
    `chat_template` is truthy: the server applies the model's own template to a chat turn.
    """

    chat_template = "(the server's)"

    def __init__(self) -> None:
        self._generated: dict[str, int] = {}
        self._lock = threading.Lock()

    def remember(self, texts: Sequence[str], tokens: int) -> None:
        """The server wrote `texts` in `tokens` tokens together (split evenly between them)."""
        share, extra = divmod(tokens, max(1, len(texts)))
        with self._lock:
            for i, text in enumerate(texts):
                self._generated[text] = share + (i < extra)

    def __call__(self, text: str, add_special_tokens: bool = False, **_: object) -> Encoding:
        count = self._generated.get(text)
        return Encoding(range(len(text.encode("utf-8")) if count is None else count))


class OpenAICompatibleModel:
    """A model behind an OpenAI-compatible server (vLLM, llama.cpp, Ollama, a hosted API).

    `name` is the spec without the key; the key comes from $APE_API_KEY or $OPENAI_API_KEY and is
    kept in memory only. `label` (``openai:MODEL``) names it on the leaderboard.
    """

    device = "cpu"  # where worker processes of a served model run: their model is the server

    def __init__(self, model: str, base_url: str, *, concurrency: int = 8, **client_options):
        self.model_id = model  # not `model`: ape reads that as a torch module
        self.base_url = base_url.rstrip("/")
        self.name = f"{PREFIX}{model}@{self.base_url}"
        self.label = f"{PREFIX}{model}"
        self.client = ServerClient(
            self.base_url, api_key(), concurrency=concurrency, ledger=self.name, **client_options
        )
        self.tokenizer = TokenCounter()
        self._scoring: Scoring | None = None
        self._refusal: ServedModelError | None = None

    @classmethod
    def from_spec(cls, spec: str, **options) -> OpenAICompatibleModel:
        model, base_url = parse_spec(spec)
        return cls(model, base_url, **options)

    @property
    def usage(self) -> Usage:
        return self.client.usage

    def __repr__(self) -> str:
        return f"OpenAICompatibleModel({self.name!r})"

    # ------------------------------------------------------------------------------ scoring
    def scoring(self) -> Scoring:
        """How this server scores, found and probed once; ServedModelError if it cannot."""
        if self._refusal is not None:
            raise self._refusal
        if self._scoring is None:
            found, counting, failures = detect_scoring(self.client, self.model_id, COUNTING)
            if found is None:
                problem = f"the server returns no prompt log-probs ({'; '.join(failures)})"
            else:
                problem = probe(found, counting).problem
            if problem is not None:  # once: later calls get the same answer without asking
                self._refusal = ServedModelError(
                    f"{self.name} is refused for scoring: {problem}. It can still propose: "
                    f"--proposal-model {self.name}"
                )
                raise self._refusal
            self._scoring = found
        return self._scoring

    def loglikelihood(
        self, requests: Sequence[tuple[str, str]], *, return_counts: bool = False
    ) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
        """Summed log-prob of each continuation given its context, in request order."""
        pairs = []
        for i, (context, continuation) in enumerate(requests):
            if not continuation:
                raise ValueError(f"request {i} has an empty continuation; nothing to score")
            # As the local scorer does: trailing context whitespace starts the continuation.
            stripped = context.rstrip()
            pairs.append((stripped, context[len(stripped) :] + continuation))
        scoring = self.scoring() if pairs else None
        found = self.client.map(lambda pair: scoring.tokens(*pair), pairs)
        sums = np.array([sum(t.logprob for t in tokens) for tokens in found], dtype=np.float64)
        counts = np.array([len(tokens) for tokens in found], dtype=np.int64)
        return (sums, counts) if return_counts else sums

    # ------------------------------------------------------------------------------ generation
    def generate(
        self,
        prompts: Sequence[str],
        n: int = 1,
        temperature: float = 0.0,
        top_p: float = 1.0,
        max_new_tokens: int = 32,
        seed: int | None = None,
        chat: bool = False,
        stop: Sequence[str] | None = None,
    ) -> list[list[str]]:
        """`n` completions per prompt, cut at the first `stop`; concurrent across prompts."""
        settings = {"temperature": temperature, "top_p": top_p, "max_tokens": max_new_tokens}
        if stop:
            settings["stop"] = list(stop)

        def one(index: int) -> list[str]:
            base = None if seed is None else (seed + 1_000_003 * index) % 2**31
            return self._samples(prompts[index], n, settings, base, chat, stop or ())

        return self.client.map(one, range(len(prompts)))

    def _samples(
        self, prompt: str, n: int, settings: dict, seed: int | None, chat: bool, stop
    ) -> list[str]:
        """`n` samples of one prompt: asks for n, then again for the rest if the server gave
        fewer (llama-cpp-python's server answers one choice for any n)."""
        greedy = settings["temperature"] == 0
        texts: list[str] = []
        while len(texts) < (1 if greedy else n):
            # Always the rest, never what earlier answers taught: the same call sends the same
            # requests in any process, so a resumed run's requests are the ones it would send.
            want = 1 if greedy else n - len(texts)
            body = {"model": self.model_id, "n": want, **settings}
            if seed is not None:
                body["seed"] = (seed + len(texts)) % 2**31  # each ask a seed of its own
            if chat:
                body["messages"] = [{"role": "user", "content": prompt}]
            else:
                body["prompt"] = prompt
            answer = self.client.post("chat/completions" if chat else "completions", body)
            got = [_cut(_text(c, chat), stop) for c in answer.get("choices") or []][:want]
            if not got:
                raise ServedModelError(f"the server at {self.base_url} answered no choices")
            completion = int((answer.get("usage") or {}).get("completion_tokens") or 0)
            if completion:  # else the budget charges the byte count, an upper bound
                self.tokenizer.remember(got, completion)
            texts += got
        return texts * n if greedy else texts  # greedy decoding has one answer


def _text(choice: dict, chat: bool) -> str:
    if chat:
        return (choice.get("message") or {}).get("content") or ""
    return choice.get("text") or ""


def _cut(text: str, stop: Sequence[str]) -> str:
    """`text` up to its first stop string (servers cut too; not all of them the same way)."""
    ends = [text.find(s) for s in stop if s and s in text]
    return text[: min(ends)] if ends else text
