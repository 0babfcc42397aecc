"""PEFT round trip on the embedded model: a soft prompt trained by run.py (SST-2, seed 13),
exported with `SoftPrompt.export_peft`, loaded with `peft.PeftModel.from_pretrained`, scored both
ways on 25 test rows x 2 label words. Run from the repository root after run.py.
"""

import copy

import numpy as np
import peft
import torch
from ape.search.soft.prompt import SoftPrompt

import ape
from ape.prompt import Prompt
from ape.result import Result

path = "benchmarks/results/classification/runs/sst-2-soft-seed13.json"
soft = SoftPrompt.load(Result.load(path).file("soft_prompt", path))
lm = ape.load_model()
task = ape.load_task("../shared/data/classification/sst-2")
reqs = [
    (Prompt("").context(e.input), f" {w}") for e in task.test[:25] for w in ("terrible", "great")
]
ours = lm.loglikelihood(reqs, soft_prefix=soft.vectors)
folder = soft.export_peft(
    "benchmarks/results/classification/peft-sst-2-seed13",
    lm,
    base_model="HuggingFaceTB/SmolLM2-135M-Instruct",
)
wrapped = peft.PeftModel.from_pretrained(copy.deepcopy(lm.model), folder).eval()
theirs = []
with torch.inference_mode():
    for context, continuation in lm.encode_pairs(reqs):
        ids = torch.tensor([context + continuation])
        logits = wrapped(input_ids=ids).logits[0, soft.n :].float()
        lp = logits[len(context) - 1 : -1].log_softmax(-1)
        theirs.append(float(lp[torch.arange(len(continuation)), continuation].sum()))
diff = np.abs(ours - np.array(theirs)).max()
print(f"{soft.label}: {len(reqs)} requests, max |ape - peft| = {diff:.2e}; peft {peft.__version__}")
