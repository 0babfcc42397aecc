"""What a prompt costs the user on every call: its tokens beyond the bare input/output template."""

from __future__ import annotations

from ape.prompt import Prompt

_PROBE = "x"  # any input: the template around it is the same for every prompt


def prompt_tokens(lm, prompt: Prompt) -> int:
    """Tokens the instruction and demos add to each model call (0 for the bare template).

    Counted with the model's tokenizer; a model without one (a test double) counts words.
    """
    tokenizer = getattr(lm, "tokenizer", None)
    if tokenizer is None:
        return len(prompt.context(_PROBE).split()) - len(Prompt().context(_PROBE).split())
    full = tokenizer(prompt.context(_PROBE), add_special_tokens=False).input_ids
    bare = tokenizer(Prompt().context(_PROBE), add_special_tokens=False).input_ids
    return len(full) - len(bare)
