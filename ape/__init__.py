"""ape: find the prompt that makes your model do your task best on held-out data."""

from ape.api import Interrupted, optimize
from ape.evaluation import evaluate
from ape.lm import HFLanguageModel, LanguageModel
from ape.models import DEFAULT_MODEL, ModelError, load_model
from ape.prompt import Prompt
from ape.result import Entry, Result
from ape.task import Example, Task, TaskError, load_task

__all__ = [
    "DEFAULT_MODEL",
    "Entry",
    "Example",
    "HFLanguageModel",
    "Interrupted",
    "LanguageModel",
    "ModelError",
    "Prompt",
    "Result",
    "Task",
    "TaskError",
    "evaluate",
    "load_model",
    "load_task",
    "optimize",
]
