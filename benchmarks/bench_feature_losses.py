"""Training-step cost of the feature and relation losses (issue 7), measured side by side.

Goals (issue 7):
  * KD + DistilBERT's hidden cosine (last layer)   / KD step  <= 1.05
  * KD + hidden MSE on every mapped layer          / KD step  <= 1.15
  * KD + relation (RKD or SP, pooled)              / KD step  <= 1.15
  * narrow student: KD + hint MSE (projection)     / its KD step <= 1.20
  The attention loss needs eager attention (the only kind that returns maps), so its ratio includes
  the eager-vs-SDPA difference; it is printed for information, and so is token-level relation.

    .venv/bin/python benchmarks/bench_feature_losses.py            # CPU: small BERT (d=128, 4 -> 2 layers)
    python3 benchmarks/bench_feature_losses.py --large             # GPU: BERT-base (d=768, 12 -> 6 layers)

An MLM teacher and a student made by make_student (every other layer), built from configs with
random weights; one fixed batch of random token ids with 15% masked labels and some padding.  A
"step" is DistillationTrainer.compute_loss (kd_alpha 0.5, tau 2) + backward + AdamW update (bf16
autocast on CUDA).  Variants run round-robin, ``--steps`` timed rounds after three warm-up rounds,
median reported, so load from other processes hits all variants alike.  "step peak" is the peak
GPU memory of one step above what was allocated before it (all variants' models stay resident).
"""

from __future__ import annotations

import argparse
import copy
import importlib.machinery
import os
import statistics
import sys
import time
import types
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
try:  # the GPU image has no `datasets`; this benchmark reads no data files
    import datasets  # noqa: F401
except ImportError:
    stub = types.ModuleType("datasets")
    stub.__spec__ = importlib.machinery.ModuleSpec("datasets", None)
    stub.Dataset = stub.IterableDataset = stub.DatasetDict = type("NoDataset", (), {})
    sys.modules["datasets"] = stub

from lmkd import DistillationConfig, DistillationTrainer, make_student
from lmkd.models.scratch import build_model


def batch_of(n, length, vocab, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, vocab, (n, length), generator=g)
    att = torch.ones(n, length, dtype=torch.long)
    for i in range(n):  # a quarter of the rows padded to 3/4 length
        if i % 4 == 3:
            att[i, length * 3 // 4 :] = 0
            ids[i, length * 3 // 4 :] = 0
    labels = ids.clone()
    masked = (torch.rand(n, length, generator=g) < 0.15) & att.bool()
    labels[~masked] = -100
    ids[masked] = 4  # <mask>
    return {
        k: v.to(device) for k, v in dict(input_ids=ids, attention_mask=att, labels=labels).items()
    }


def main():
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--large", action="store_true", help="BERT-base sizes (for a GPU)")
    p.add_argument("--steps", type=int, default=5)
    a = p.parse_args()
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    if a.large:
        vocab, d, layers, heads, bs, length = 30522, 768, 12, 12, 32, 128
    else:
        vocab, d, layers, heads, bs, length = 1000, 128, 4, 4, 8, 64
    teacher = build_model(
        "bert", vocab, seed=1, d_model=d, layers=layers, heads=heads, max_positions=512
    )
    student = make_student(teacher)
    narrow = build_model(
        "bert",
        vocab,
        seed=2,
        d_model=d // 2,
        layers=layers // 2,
        heads=heads // 2,
        max_positions=512,
    )
    batch = batch_of(bs, length, vocab, device)

    variants = {
        "kd": (student, {}),
        "kd+hidden_cos_last": (
            student,
            dict(hidden_weight=0.143, hidden_loss="cosine", layer_map="-1:-1"),
        ),
        "kd+hidden_mse_all": (student, dict(hidden_weight=1.0)),
        "kd+relation_rkd": (student, dict(relation_weight=1.0)),
        "kd+relation_sp": (student, dict(relation_weight=1.0, relation_loss="sp")),
        "kd+relation_sp_token": (
            student,
            dict(relation_weight=1.0, relation_loss="sp", relation_pooling="token"),
        ),
        "kd+attention_kl": (student, dict(attention_weight=1.0)),
        "narrow:kd": (narrow, {}),
        "narrow:kd+hint_mse": (narrow, dict(hidden_weight=1.0)),
    }
    runs = {}
    for name, (init, kw) in variants.items():
        s, t = copy.deepcopy(init).to(device), copy.deepcopy(teacher)
        args = DistillationConfig(
            output_dir="/tmp/bench_feature",
            kd_alpha=0.5,
            kd_temperature=2.0,
            report_to="none",
            use_cpu=not cuda,
            **kw,
        )
        tr = DistillationTrainer(model=s, args=args, teacher_model=t)
        params = list(s.parameters()) + list(tr.projections.parameters())
        runs[name] = (tr, s, torch.optim.AdamW(params, lr=1e-4))

    def step(name):
        tr, s, opt = runs[name]
        s.train()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
            loss = tr.compute_loss(s, batch)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    times = {n: [] for n in variants}
    peak = {}
    for rnd in range(3 + a.steps):
        for name in variants:
            if cuda:
                torch.cuda.synchronize()
                base_mem = torch.cuda.memory_allocated()
                torch.cuda.reset_peak_memory_stats()
            t0 = time.perf_counter()
            loss = step(name)
            if cuda:
                torch.cuda.synchronize()
            dt = time.perf_counter() - t0
            assert torch.isfinite(loss), (name, loss)
            if rnd >= 3:
                times[name].append(dt)
                if cuda:  # memory the step itself needs above what is allocated before it
                    peak[name] = max(
                        peak.get(name, 0), torch.cuda.max_memory_allocated() - base_mem
                    )
    med = {n: statistics.median(v) for n, v in times.items()}
    print(
        f"device {device} ({torch.cuda.get_device_name() if cuda else 'cpu'}), teacher d={d} x {layers} layers, "
        f"student {layers // 2} layers, batch {bs}x{length}, vocab {vocab}, {a.steps} timed rounds"
    )
    goals = {
        "kd+hidden_cos_last": 1.05,
        "kd+hidden_mse_all": 1.15,
        "kd+relation_rkd": 1.15,
        "kd+relation_sp": 1.15,
        "narrow:kd+hint_mse": 1.20,
    }
    for name in variants:
        base = "narrow:kd" if name.startswith("narrow") else "kd"
        ratio = med[name] / med[base]
        goal = goals.get(name)
        verdict = (
            ""
            if goal is None
            else (f"  goal <= {goal:.2f}: " + ("met" if ratio <= goal else "MISSED"))
        )
        mem = f"  step peak {peak[name] / 2**30:.2f} GiB" if cuda else ""
        print(f"  {name:24s} {med[name] * 1e3:8.1f} ms/step  x{ratio:5.2f} of {base}{mem}{verdict}")


if __name__ == "__main__":
    main()
