"""HTTP to an OpenAI-compatible server: JSON POSTs with retries, a bounded thread pool, and the
tokens the server says it read and wrote.

Only the standard library: a served model must not pull a client SDK into ape's dependencies.
"""

from __future__ import annotations

import http.client
import json
import os
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Any, TypeVar

from ape.model_error import ModelError

T = TypeVar("T")
R = TypeVar("R")

# Where the API key is read from, first set wins. It is held in memory only: never in a model's
# name, a study or a result.
KEY_VARIABLES = ("APE_API_KEY", "OPENAI_API_KEY")
RETRY_STATUS = frozenset({408, 409, 429, 500, 502, 503, 504})


class ServedModelError(ModelError):
    """A served model that cannot do what was asked; the message is one line that says why."""


class UnreachableError(ServedModelError):
    """The server could not be reached (refused, reset or timed out) after the retries."""


class HTTPStatusError(ServedModelError):
    """The server answered with an error status (after retries, where they apply)."""

    def __init__(self, message: str, status: int, detail: str):
        super().__init__(message)
        self.status = status
        self.detail = detail


@dataclass
class Usage:
    """What a server was asked: requests, and the tokens it reports reading and writing."""

    requests: int = 0
    sent: int = 0  # prompt tokens, as the server counts them
    received: int = 0  # completion tokens

    def to_json(self) -> dict[str, int]:
        return asdict(self)


# Every served model's usage in this process, by model name: a run reads what it added (see
# `usage_since`), even for a proposal model its searcher loaded and dropped.
_LEDGER: dict[str, Usage] = {}
_LEDGER_LOCK = threading.Lock()


def usage_totals() -> dict[str, Usage]:
    """A copy of this process's usage so far, per served model name."""
    with _LEDGER_LOCK:
        return {name: Usage(**asdict(u)) for name, u in _LEDGER.items()}


def usage_since(before: dict[str, Usage]) -> dict[str, dict[str, int]]:
    """Per served model, the requests and tokens sent and received since `before`."""
    out = {}
    for name, now in usage_totals().items():
        was = before.get(name, Usage())
        spent = Usage(now.requests - was.requests, now.sent - was.sent, now.received - was.received)
        if spent.requests:
            out[name] = spent.to_json()
    return out


def api_key() -> str | None:
    for variable in KEY_VARIABLES:
        if os.environ.get(variable):
            return os.environ[variable]
    return None


class ServerClient:
    """POSTs JSON to `base_url` (e.g. ``http://host:8000/v1``), `concurrency` at a time.

    Connection failures, timeouts and the statuses in RETRY_STATUS are retried `retries` times
    with exponential backoff from `backoff` seconds (a 429's Retry-After is honoured). Every
    other error status fails at once: retrying a wrong key or a bad request cannot help.
    """

    def __init__(
        self,
        base_url: str,
        key: str | None = None,
        *,
        concurrency: int = 8,
        retries: int = 4,
        backoff: float = 0.25,
        timeout: float = 600.0,
        ledger: str | None = None,
    ):
        if concurrency < 1:
            raise ValueError(f"concurrency must be positive, got {concurrency}")
        self.base_url = base_url.rstrip("/")
        self._key = key
        self.concurrency = concurrency
        self.retries = retries
        self.backoff = backoff
        self.timeout = timeout
        self.usage = Usage()
        self._ledger = ledger  # the name this client's usage is added to in the ledger

    def post(self, path: str, body: dict[str, Any], *, retry: bool = True) -> dict[str, Any]:
        """The JSON answer of POST `path` under the base URL (or at the server's root, for a
        path that starts with "/"); raises ServedModelError in one line when it fails."""
        if path.startswith("/"):  # e.g. llama-server's /tokenize, beside its /v1
            url = self.base_url.removesuffix("/v1") + path
        else:
            url = f"{self.base_url}/{path}"
        attempts = 1 + (self.retries if retry else 0)
        for attempt in range(attempts):
            try:
                answer = self._post_once(url, body)
            except _Retryable as err:
                if attempt + 1 == attempts:
                    raise err.final(self.base_url, attempts) from None
                time.sleep(err.wait if err.wait is not None else self.backoff * 2**attempt)
                continue
            self._count(answer.get("usage") or {})
            return answer
        raise AssertionError("unreachable")

    def map(self, function: Callable[[T], R], items: Iterable[T]) -> list[R]:
        """`function` over `items` on up to `concurrency` threads, results in order."""
        items = list(items)
        if len(items) <= 1 or self.concurrency == 1:
            return [function(item) for item in items]
        with ThreadPoolExecutor(min(self.concurrency, len(items))) as pool:
            return list(pool.map(function, items))

    # ------------------------------------------------------------------------------ internals
    def _post_once(self, url: str, body: dict[str, Any]) -> dict[str, Any]:
        headers = {"Content-Type": "application/json"}
        if self._key:
            headers["Authorization"] = f"Bearer {self._key}"
        request = urllib.request.Request(
            url, data=json.dumps(body).encode(), headers=headers, method="POST"
        )
        self._add(Usage(requests=1))
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                return json.loads(response.read().decode("utf-8"))
        except urllib.error.HTTPError as err:
            detail = _detail(err)
            if err.code in RETRY_STATUS:
                wait = _retry_after(err)
                raise _Retryable(f"HTTP {err.code}: {detail}", wait, err.code) from None
            raise _status_error(self.base_url, url, err.code, detail) from None
        except (urllib.error.URLError, http.client.HTTPException, OSError) as err:
            reason = getattr(err, "reason", err)
            raise _Retryable(f"cannot reach it ({reason})", None, None) from None
        except json.JSONDecodeError:
            raise ServedModelError(f"the server at {url} did not answer with JSON") from None

    def _count(self, usage: dict[str, Any]) -> None:
        sent, received = usage.get("prompt_tokens"), usage.get("completion_tokens")
        self._add(Usage(sent=int(sent or 0), received=int(received or 0)))

    def _add(self, more: Usage) -> None:
        totals = [self.usage]
        with _LEDGER_LOCK:
            if self._ledger is not None:
                totals.append(_LEDGER.setdefault(self._ledger, Usage()))
            for total in totals:
                total.requests += more.requests
                total.sent += more.sent
                total.received += more.received


class _Retryable(Exception):
    def __init__(self, reason: str, wait: float | None, status: int | None):
        super().__init__(reason)
        self.reason = reason
        self.wait = wait
        self.status = status

    def final(self, base_url: str, attempts: int) -> ServedModelError:
        tries = f"{attempts} attempt{'s' if attempts > 1 else ''}"
        message = f"the server at {base_url} failed after {tries}: {self.reason}"
        if self.status is None:
            return UnreachableError(message)
        return HTTPStatusError(message, self.status, self.reason)


def _detail(err: urllib.error.HTTPError) -> str:
    """The server's error message, in one short line."""
    try:
        text = err.read().decode("utf-8", "replace")
    except OSError:
        text = ""
    try:
        data = json.loads(text)
        error = data.get("error", data) if isinstance(data, dict) else data
        text = error.get("message", text) if isinstance(error, dict) else str(error)
    except (json.JSONDecodeError, AttributeError):
        pass
    return " ".join(str(text).split())[:300] or err.reason


def _retry_after(err: urllib.error.HTTPError) -> float | None:
    try:
        return min(60.0, float(err.headers.get("Retry-After", "")))
    except ValueError:
        return None


def _status_error(base_url: str, url: str, status: int, detail: str) -> HTTPStatusError:
    if status in (401, 403):
        names = " or ".join(KEY_VARIABLES)
        message = (
            f"the server at {base_url} refused the API key (HTTP {status}: {detail}); set {names} "
            "to the server's key"
        )
    elif status == 404:
        message = f"the server at {base_url} has no {url} (HTTP 404: {detail})"
    else:
        message = f"the server at {base_url} answered HTTP {status} to {url}: {detail}"
    return HTTPStatusError(message, status, detail)
