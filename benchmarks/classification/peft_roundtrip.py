"""PEFT round trips on the embedded model: the soft prompts run_soft.py trained on SST-2 (seed 13;
prompt tuning, prefix tuning, P-tuning), each exported with `SoftPrompt.export_peft`, loaded with
`peft.PeftModel.from_pretrained`, scored both ways on 25 test rows x 2 label words.

Run from the repository root after run_soft.py; writes
benchmarks/results/classification/soft/peft_roundtrip.txt and the adapters beside it.
"""

import copy
import sys
from pathlib import Path

import numpy as np
import peft
import torch
from ape.search.soft.prompt import SoftPrompt

import ape
from ape.prompt import Prompt
from ape.result import Result

OUT = Path("benchmarks/results/classification/soft")
lm = ape.load_model()
task = ape.load_task("../shared/data/classification/sst-2")
reqs = [
    (Prompt("").context(e.input), f" {w}") for e in task.test[:25] for w in ("terrible", "great")
]
lines = []
for mode in sys.argv[1:] or ["continuous", "prefix", "ptuning"]:
    path = OUT / "runs" / f"sst-2-{mode}-seed13.json"
    soft = SoftPrompt.load(Result.load(path).file("soft_prompt", path))
    ours = lm.loglikelihood(reqs, soft_prefix=soft.vectors)
    folder = soft.export_peft(
        OUT / f"peft-sst-2-{mode}-seed13", lm, base_model="HuggingFaceTB/SmolLM2-135M-Instruct"
    )
    wrapped = peft.PeftModel.from_pretrained(copy.deepcopy(lm.model), folder).eval()
    virtual = 0 if soft.kind == "kv" else soft.n  # prefix tuning adds no positions to the output
    theirs = []
    with torch.inference_mode():
        for context, continuation in lm.encode_pairs(reqs):
            logits = wrapped(input_ids=torch.tensor([context + continuation])).logits[0, virtual:]
            lp = logits.float()[len(context) - 1 : -1].log_softmax(-1)
            theirs.append(float(lp[torch.arange(len(continuation)), continuation].sum()))
    diff = np.abs(ours - np.array(theirs)).max()
    adapter = peft.PeftConfig.from_pretrained(folder).peft_type.value
    lines.append(
        f"{mode} ({adapter}) {soft.label}: {len(reqs)} requests, max |ape - peft| = {diff:.2e}"
    )
    print(lines[-1], flush=True)
lines.append(f"peft {peft.__version__}, torch {torch.__version__}")
(OUT / "peft_roundtrip.txt").write_text("\n".join(lines) + "\n")
