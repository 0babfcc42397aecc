"""Contextual calibration (Zhao et al. 2021, "Calibrate before use").

A prompt makes a model prefer some label words whatever the input (the majority label of its
demos, the last demo's label, a word the model likes). Zhao et al. measure that bias on
content-free inputs ("N/A", "", "[MASK]") and divide each label's probability by it.

Here the bias of a word is the mean, over the content-free inputs, of its log-probability after
the prompt, and a calibrated label score is the word's log-probability on the real input minus
that bias. Per content-free input, the paper first renormalizes over the label words; in log
space that subtracts one constant from every word, so the argmax is the paper's with the
content-free probabilities averaged geometrically instead of arithmetically. The gain of the
per-word form: a word's correction does not depend on which other words are asked, so a
label-word search can combine calibrated columns freely (search/label_words.py).
"""

from __future__ import annotations

import numpy as np

# The content-free inputs of Zhao et al. (2021), averaged.
CONTENT_FREE: tuple[str, ...] = ("N/A", "", "[MASK]")


def calibrated(logprobs: np.ndarray, content_free: np.ndarray) -> np.ndarray:
    """Label scores corrected by the content-free bias.

    `logprobs`: (prompts, examples, labels) log-probs of each label's word; `content_free`:
    (prompts, len(CONTENT_FREE), labels), the same words after the content-free inputs.
    """
    return logprobs - content_free.mean(axis=1, keepdims=True)
