"""Instruction proposal: APE's templates for asking an LM what instruction produced some demos,
and for asking it to rephrase an instruction, plus the cleaning that turns raw samples into
candidates.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

from ape.task import Example

# APE's forward-generation template (Zhou et al. 2022): the model completes the instruction.
FORWARD_TEMPLATE = (
    "I gave a friend an instruction and {count} inputs. The friend read the instruction and "
    "wrote an output for every one of the inputs. Here are the input-output pairs:\n\n"
    "{demos}\n\nThe instruction was to"
)
# The same question as a user turn, for chat models that answer rather than complete.
CHAT_TEMPLATE = (
    "I gave a friend an instruction and {count} inputs. The friend read the instruction and "
    "wrote an output for every one of the inputs. Here are the input-output pairs:\n\n"
    "{demos}\n\nWhat was the instruction? Reply with the instruction only, in one sentence."
)
# APE's resampling template: a variation that keeps the meaning.
RESAMPLE_TEMPLATE = (
    "Generate a variation of the following instruction while keeping the semantic meaning."
    "\n\nInput: {instruction}\n\nOutput:"
)
CHAT_RESAMPLE_TEMPLATE = (
    "Rewrite this instruction in other words, keeping its meaning. Reply with the new "
    "instruction only.\n\nInstruction: {instruction}"
)

_NUMBERS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"]

# Lead-ins a model writes before the instruction itself ("The instruction was to ...", "Sure! ...").
_LEAD_INS = re.compile(
    r"^\s*(?:sure[!,.]?\s*|here(?: is|'s) (?:the|a|an) (?:new |rewritten )?(?:instruction|"
    r"variation)[^:]*:\s*|output:\s*|instruction:\s*|new instruction:\s*|answer:\s*|"
    r"the (?:original )?instruction (?:was|is)(?: to)?:?\s*|the friend was (?:asked|told) to\s*)",
    re.IGNORECASE,
)
# A sentence ends at . ! or ? and any closing quotes, before whitespace.
_SENTENCE_END = re.compile(r"(?<=[.!?])[\"'`”’]*\s")
_QUOTES = "\"'`“”‘’"


def format_demos(demos: Sequence[Example]) -> str:
    return "\n\n".join(f"Input: {d.input}\nOutput: {d.output}" for d in demos)


def proposal_prompt(demos: Sequence[Example], chat: bool = False) -> str:
    """The text that asks for the instruction behind `demos`."""
    count = _NUMBERS[len(demos)] if len(demos) < len(_NUMBERS) else str(len(demos))
    template = CHAT_TEMPLATE if chat else FORWARD_TEMPLATE
    return template.format(count=count, demos=format_demos(demos))


def resample_prompt(instruction: str, chat: bool = False) -> str:
    """The text that asks for a variation of `instruction` with the same meaning."""
    return (CHAT_RESAMPLE_TEMPLATE if chat else RESAMPLE_TEMPLATE).format(instruction=instruction)


def clean_instruction(text: str, max_chars: int = 200) -> str | None:
    """The first sentence of the first non-empty line, without lead-ins or quotes.

    None when nothing usable is left or the result is longer than `max_chars`.
    """
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    if not lines:
        return None
    line = lines[0]
    for _ in range(3):  # lead-ins can stack: "Sure! The instruction was to ..."
        stripped = _LEAD_INS.sub("", line, count=1).strip().strip(_QUOTES).strip()
        if stripped == line:
            break
        line = stripped
    sentence = _SENTENCE_END.split(line, maxsplit=1)[0].strip().strip(_QUOTES).strip()
    if len(sentence) < 3 or len(sentence) > max_chars or not any(c.isalpha() for c in sentence):
        return None
    return sentence


def unique(instructions: Iterable[str | None], seen: Iterable[str] = ()) -> list[str]:
    """Instructions without None and without repeats (ignoring case and spacing), in order."""
    keys = {_normal(s) for s in seen}
    out = []
    for text in instructions:
        if text is None or _normal(text) in keys:
            continue
        keys.add(_normal(text))
        out.append(text)
    return out


def _normal(text: str) -> str:
    return " ".join(text.lower().split()).rstrip(".")
