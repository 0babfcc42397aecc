"""What an optimization run returns and saves: the best prompt, the leaderboard, the evidence."""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from ape.prompt import Prompt
from ape.study import prompt_from_json, prompt_to_json


@dataclass
class Entry:
    """One prompt on the leaderboard with its mean scores (higher is better)."""

    instruction: str
    val_score: float | None
    val_examples: int
    test_score: float | None = None
    origin: str = ""
    demos: list[list[str]] = field(default_factory=list)
    test_metric: float | None = None  # the task's metric by greedy generation, on test
    tokens: int | None = None  # what the instruction and demos add to every call
    # label -> the word the prompt answers with (`choice`); empty: the task's own label words
    label_words: dict[str, str] = field(default_factory=dict)

    @property
    def prompt(self) -> Prompt:
        data = {"instruction": self.instruction, "demos": self.demos}
        return prompt_from_json({**data, "label_words": self.label_words})

    def render(self, input: str) -> str:
        """The exact text to send to the model for `input` (what the scores were measured on)."""
        return self.prompt.render(input)

    @classmethod
    def of(cls, prompt: Prompt, **scores: Any) -> Entry:
        return cls(**prompt_to_json(prompt), **scores)


@runtime_checkable
class Artifact(Protocol):
    """Something a searcher produced beside its prompts (weights, a soft prompt) that is saved as
    files next to the result JSON."""

    def save(self, directory: Path) -> None:
        """Write the artifact's files into `directory` (created by the caller)."""
        ...


@dataclass
class Result:
    """The outcome of `ape.optimize`; `save`/`load` round-trip it through JSON."""

    best: Entry | None
    leaderboard: list[Entry]
    budget_used: int
    seed: int
    reference: Entry | None = None  # the task with no instruction, scored the same way
    # best − each baseline on test with a paired bootstrap 95% interval (ape.evidence.Comparison)
    evidence: list[dict[str, Any]] = field(default_factory=list)
    length_penalty: float = 0.0
    budget: int | None = None
    budget_detail: dict[str, int] = field(default_factory=dict)
    # per served model (ape/served/): {"requests", "sent", "received"}, tokens as its server
    # counted them; models run in-process are charged in budget_detail only
    model_tokens: dict[str, dict[str, int]] = field(default_factory=dict)
    task: str = ""
    model: str = ""
    searcher: str = ""
    evaluator: str = ""
    options: dict[str, Any] = field(default_factory=dict)
    storage: str | None = None
    study: str = ""
    test_examples: int | None = None  # test rows the finalists were scored on
    test_split_rows: int | None = None  # rows in the test split they were sampled from
    timings: dict[str, float] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=dict)
    # device, CPU, cores and torch threads the run was timed on (see ape.device.describe_machine)
    machine: dict[str, Any] = field(default_factory=dict)
    interrupted: bool = False
    stopped_by_budget: bool = False
    # [budget used, best validation score so far] as the search went (see Objective._note_best);
    # empty in results saved before it was recorded
    history: list[list[float]] = field(default_factory=list)
    # JSON-serialisable extras a searcher reports (e.g. a training curve), by name
    extras: dict[str, Any] = field(default_factory=dict)
    # name -> folder of a saved artifact, relative to the result file (filled by `save`)
    files: dict[str, str] = field(default_factory=dict)
    # artifacts not yet saved; `save` writes them and records them in `files`
    artifacts: dict[str, Artifact] = field(default_factory=dict, repr=False)

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)  # artifacts are objects, not data: they are saved as files
        data.pop("artifacts")
        return finite(data)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Result:
        data = dict(data)
        for key in ("best", "reference"):
            if data.get(key) is not None:
                data[key] = Entry(**data[key])
        data["leaderboard"] = [Entry(**e) for e in data.get("leaderboard", [])]
        return cls(**data)

    def save(self, path: str | os.PathLike) -> Path:
        """Write the result as JSON (atomically: a killed write never leaves half a file)."""
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        for name, artifact in self.artifacts.items():
            folder = target.parent / f"{target.stem}.files" / name
            folder.mkdir(parents=True, exist_ok=True)
            artifact.save(folder)
            self.files[name] = str(folder.relative_to(target.parent))
        partial = target.with_name(target.name + ".partial")
        partial.write_text(json.dumps(self.to_json(), indent=2, ensure_ascii=False) + "\n")
        os.replace(partial, target)
        return target

    def file(self, name: str, result_path: str | os.PathLike) -> Path:
        """The folder of saved artifact `name` of the result stored at `result_path`."""
        if name not in self.files:
            raise KeyError(f"the result has no saved {name!r}; it has: {sorted(self.files)}")
        return Path(result_path).parent / self.files[name]

    @classmethod
    def load(cls, path: str | os.PathLike) -> Result:
        source = Path(path)
        try:
            data = json.loads(source.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ValueError(f"{source}: no such result file") from None
        except json.JSONDecodeError as err:
            raise ValueError(f"{source}:{err.lineno}: not valid JSON ({err.msg})") from None
        try:
            return cls.from_json(data)
        except (TypeError, KeyError) as err:
            raise ValueError(f"{source}: not an ape result ({err})") from None


def finite(value: Any) -> Any:
    """NaN becomes null so the file is strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [finite(v) for v in value]
    return value
