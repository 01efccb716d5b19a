"""Tiny teachers for the sequence-level KD tests.

A tiny model with the default initialisation produces the same token over and over for every
input (or nothing at all), which would make "batched output == one-at-a-time output" trivially
true.  These teachers are initialised 10x larger (input-dependent, varied outputs) and their EOS
is made more likely, so that within a batch some hypotheses end early and some run to the length
limit -- the cases where padding and finished-sequence bookkeeping could go wrong.
"""

from __future__ import annotations

import json

import torch

from lmkd.models.loading import AUTO_CLASS
from lmkd.models.scratch import ARCH_KINDS, EOS, model_config

# (init scale, EOS boost) per architecture, chosen so greedy outputs are varied and mixed in length
# (re-chosen for the BPE test tokenizer: Marian at scale 10 said the same 3 things to 20 inputs, and T5 at
# 10 saturated -- top hypotheses at log-prob 0, the third beam decided by float noise of the padding)
TEACHER_SETTINGS = {
    "t5": (5.0, 2.0),
    "bart": (10.0, 3.0),
    "marian": (20.0, 3.0),
    "gpt2": (10.0, 2.0),
}


def build_teacher(arch: str, tokenizer, seed: int = 0):
    scale, eos = TEACHER_SETTINGS[arch]
    torch.manual_seed(seed)
    config = model_config(arch, len(tokenizer), layers=2)
    for name in ("init_std", "initializer_range", "initializer_factor"):
        if hasattr(config, name):
            setattr(config, name, getattr(config, name) * scale)
    model = AUTO_CLASS[ARCH_KINDS[arch]].from_config(config).eval()
    with torch.no_grad():
        if hasattr(model, "final_logits_bias"):  # BART / Marian
            model.final_logits_bias[0, EOS] += eos
        else:
            model.get_output_embeddings().weight[EOS] *= eos
    return model


def save_teacher(path, arch: str, tokenizer, seed: int = 0) -> str:
    model = build_teacher(arch, tokenizer, seed)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def write_jsonl(path, rows: list[dict]) -> str:
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    return str(path)
