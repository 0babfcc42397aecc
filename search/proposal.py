"""Instruction proposal: APE's templates for asking an LM what instruction produced some demos,
and for asking it to rephrase an instruction, the cleaning that turns raw samples into
candidates, and the proposal step itself (`propose`), shared by the APE and TPE searchers.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from ape.search.base import non_negative, option, positive

from ape.task import Example

if TYPE_CHECKING:
    from ape.lm import LanguageModel
    from ape.objective import Objective

TEMPLATES = ("auto", "forward", "chat", "both")

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


# ------------------------------------------------------------------------------ the proposal step
def proposer_model(objective: Objective, name: str | None) -> LanguageModel:
    """The model that writes instructions: `name` loaded, or the model being optimized."""
    if name is None:
        return objective.lm
    from ape.models import load_model

    return load_model(name)


def proposal_origin(
    objective: Objective, proposer: LanguageModel, chat: bool, step: str = "proposal"
) -> str:
    """The leaderboard origin of an instruction the LM wrote in `step` ("proposal", "resample
    1"), with the proposer's name when it is not the model being optimized ("proposal
    (openai:qwen2.5-7b)"), and "chat" for a chat turn."""
    notes = [] if proposer is objective.lm else [getattr(proposer, "label", proposer.name)]
    notes += ["chat"] if chat else []
    return step + (f" ({', '.join(notes)})" if notes else "")


def chat_flags(templates: str, proposer: LanguageModel) -> list[bool]:
    """Which templates to ask with (False: forward completion, True: a chat turn)."""
    has_chat = bool(getattr(getattr(proposer, "tokenizer", None), "chat_template", None))
    if templates in ("chat", "both") and not has_chat:
        raise ValueError(
            f"templates={templates!r} needs a chat model; {proposer.name} has no chat template"
        )
    if templates == "auto":
        return [False, True] if has_chat else [False]
    return {"forward": [False], "chat": [True], "both": [False, True]}[templates]


# Instructions are one line: sampling stops at the first line end.
INSTRUCTION_STOP = ("\n",)


def sample_ahead(
    objective: Objective,
    proposer: LanguageModel,
    prompt_sets: Sequence[tuple[Sequence[str], bool]],
    *,
    n: int,
    temperature: float,
    max_new_tokens: int,
    desc: str,
) -> None:
    """Sample the `sample_instructions` calls of a step, one per (prompts, chat) of
    `prompt_sets`, in one decoding run; the calls then replay their texts."""
    objective.generate_ahead(
        prompt_sets,
        n=n,
        temperature=temperature,
        max_new_tokens=max_new_tokens,
        seed=objective.seed,
        stop=list(INSTRUCTION_STOP),
        lm=proposer,
        desc=desc,
    )


def sample_instructions(
    objective: Objective,
    proposer: LanguageModel,
    prompts: Sequence[str],
    *,
    n: int,
    chat: bool,
    temperature: float,
    max_new_tokens: int,
    max_chars: int,
    desc: str,
) -> list[str | None]:
    """`n` cleaned samples per prompt (None where unusable), through the objective's budget."""
    outputs = objective.generate(
        prompts,
        n=n,
        temperature=temperature,
        max_new_tokens=max_new_tokens,
        seed=objective.seed,
        chat=chat,
        stop=list(INSTRUCTION_STOP),
        lm=proposer,
        desc=desc + (" (chat)" if chat else ""),
    )
    return [clean_instruction(text, max_chars) for texts in outputs for text in texts]


def propose(
    objective: Objective,
    proposer: LanguageModel,
    chats: Sequence[bool],
    *,
    num_subsamples: int,
    num_demos: int,
    num_proposals: int,
    temperature: float,
    max_new_tokens: int,
    max_chars: int,
) -> Iterator[tuple[str, list[str]]]:
    """APE's proposal step: yields (origin, new instructions) once per template in `chats`.

    The subsamples of `num_demos` training demos are drawn with `objective.seed`; each is shown
    to the proposer, which samples `num_proposals` instructions per template. Instructions are
    cleaned and de-duplicated across templates. It is a generator so that a caller can take
    each template's instructions before the next template is sampled (a budget stop in between
    keeps what came first). Raises ValueError after the last template if nothing was usable.
    """
    rng = np.random.default_rng(objective.seed)
    train = objective.task.train
    if not train:
        raise ValueError(f"task {objective.task.name!r} has no training examples to show")
    subsamples = [
        [train[i] for i in rng.choice(len(train), min(num_demos, len(train)), False)]
        for _ in range(num_subsamples)
    ]
    prompt_sets = [
        ([proposal_prompt(demos, chat=chat) for demos in subsamples], chat) for chat in chats
    ]
    settings = dict(n=num_proposals, temperature=temperature, max_new_tokens=max_new_tokens)
    sample_ahead(objective, proposer, prompt_sets, desc="proposing, all templates", **settings)
    proposals: list[str] = []
    for prompts, chat in prompt_sets:
        texts = sample_instructions(
            objective,
            proposer,
            prompts,
            chat=chat,
            max_chars=max_chars,
            desc="proposing",
            **settings,
        )
        found = unique(texts, seen=proposals)
        proposals += found
        yield proposal_origin(objective, proposer, chat), list(found)
    if not proposals:
        raise ValueError(
            f"the proposal model ({proposer.name}) wrote no usable instruction in "
            f"{num_subsamples * num_proposals * len(chats)} samples; try another "
            "--proposal-model or more proposals"
        )


SUBSAMPLES_HELP = "S: demo subsamples shown to the proposal model"
PROPOSALS_HELP = "P: instructions sampled per subsample and template"


@dataclass(frozen=True)
class ProposalOptions:
    """The knobs of APE's proposal step, for every searcher that runs it (a dataclass base)."""

    num_subsamples: int = option(5, SUBSAMPLES_HELP)
    num_demos: int = option(5, "D: training demos per subsample")
    num_proposals: int = option(8, PROPOSALS_HELP)
    templates: str = option(
        "auto", "forward, chat, both, or auto (both when the proposal model has a chat template)"
    )
    temperature: float = option(0.9, "sampling temperature for proposals and variations")
    max_new_tokens: int = option(32, "longest proposal, in tokens")
    max_chars: int = option(200, "longer cleaned instructions are dropped")
    proposal_model: str | None = option(
        None,
        "model that writes the instructions (default: the model being optimized); "
        "openai:MODEL@BASE_URL for one behind an OpenAI-compatible server",
    )

    def __post_init__(self) -> None:
        positive(
            num_subsamples=self.num_subsamples,
            num_demos=self.num_demos,
            num_proposals=self.num_proposals,
            max_new_tokens=self.max_new_tokens,
            max_chars=self.max_chars,
        )
        if self.templates not in TEMPLATES:
            raise ValueError(
                f"templates must be one of {', '.join(TEMPLATES)}, not {self.templates!r}"
            )
        non_negative(temperature=self.temperature)

    def proposer(self, objective: Objective) -> LanguageModel:
        return proposer_model(objective, self.proposal_model)

    def propose(
        self, objective: Objective, proposer: LanguageModel
    ) -> Iterator[tuple[str, list[str]]]:
        """`propose` with these options: (origin, new instructions) once per template."""
        return propose(
            objective,
            proposer,
            chat_flags(self.templates, proposer),
            num_subsamples=self.num_subsamples,
            num_demos=self.num_demos,
            num_proposals=self.num_proposals,
            temperature=self.temperature,
            max_new_tokens=self.max_new_tokens,
            max_chars=self.max_chars,
        )
