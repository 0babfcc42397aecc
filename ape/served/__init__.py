"""Models behind an OpenAI-compatible server, spelled ``openai:MODEL@BASE_URL``.

http.py is the transport (retries, concurrency, token usage), scoring.py the two ways to get a
continuation's log-probs from a server, probe.py the check that they are aligned, and model.py
the `LanguageModel` built on them.
"""

from ape.served.http import KEY_VARIABLES, ServedModelError, Usage, usage_since, usage_totals
from ape.served.model import PREFIX, OpenAICompatibleModel, parse_spec

__all__ = [
    "KEY_VARIABLES",
    "PREFIX",
    "OpenAICompatibleModel",
    "ServedModelError",
    "Usage",
    "parse_spec",
    "usage_since",
    "usage_totals",
]
