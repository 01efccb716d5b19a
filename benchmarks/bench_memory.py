"""Peak memory and CPU time of a whole training step (trainer-level): naive full-logits KL against lmkd.

Each variant runs in a fresh subprocess: a GPT-2-style teacher (4 layers) and student (2 layers),
d_model 256, vocabulary V, one batch of B x T tokens, and one ``DistillationTrainer.compute_loss``
+ ``backward`` (forward KL, kd_alpha 0.5, both models float32):

* ``naive``: ``kd_chunk_size: 0`` -- full student and teacher logits, the plain losses;
* ``lmkd``: ``kd_chunk_size: -1`` -- the fused CE+KD loss (LM heads run per chunk inside the loss).

``first`` measures the very first step of the process (what a user's step 1 costs: lmkd checks the
fused head then, on a one-row slice); ``steady`` runs one small warm-up step first (B=1, T=16) and
measures the next full step.

Memory is the step's peak resident memory above what the process held just before it (Linux: the
peak, VmHWM, is reset through /proc/self/clear_refs before the step and read from /proc/self/status
after; elsewhere the ru_maxrss difference).  tracemalloc does not see torch's allocations.  Time is
the child's CPU time with torch on one thread (the cores here are shared with other jobs).

    .venv/bin/python benchmarks/bench_memory.py                 # B*T = 1024, V = 64k (~1.5 GB naive)
    .venv/bin/python benchmarks/bench_memory.py --full          # B*T = 2048, V = 128k (~7 GB naive)
    .venv/bin/python benchmarks/bench_memory.py --json out.json # the figures as JSON too

Goal (issue 15): lmkd's first-step peak <= 25% of the naive path's at B*T = 2048, V = 128k.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

CHILD = "--child"


def _rss_mb(field: str) -> float | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def child(variant: str, when: str, b: int, t: int, v: int) -> dict:
    import logging

    import torch
    from transformers.utils import logging as hf_logging

    torch.set_num_threads(1)
    hf_logging.set_verbosity_error()
    logging.disable(logging.WARNING)
    from lmkd import DistillationConfig, DistillationTrainer
    from lmkd.models.scratch import build_model

    teacher = build_model("gpt2", v, seed=1, d_model=256, layers=4, dropout=0.0)
    student = build_model("gpt2", v, seed=2, d_model=256, layers=2, dropout=0.0)
    student.train()
    with tempfile.TemporaryDirectory() as out:
        args = DistillationConfig(
            output_dir=out,
            report_to="none",
            use_cpu=True,
            kd_alpha=0.5,
            save_strategy="no",
            kd_chunk_size=0 if variant == "naive" else -1,
        )
        trainer = DistillationTrainer(model=student, args=args, teacher_model=teacher)

    def batch(rows, cols, seed):
        g = torch.Generator().manual_seed(seed)
        ids = torch.randint(4, v, (rows, cols), generator=g)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}

    def step(inputs):
        student.zero_grad(set_to_none=True)
        loss = trainer.compute_loss(student, inputs)
        loss.backward()
        return float(loss)

    if when == "steady":
        step(batch(1, 16, 1))
    inputs = batch(b, t, 0)
    for p in (
        student.parameters()
    ):  # the gradients' memory is the same for both: count it before the step
        p.grad = torch.zeros_like(p)
    exact = _reset_peak()
    base = _rss_mb("VmRSS") if exact else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    start = time.process_time()
    loss = step(inputs)
    seconds = time.process_time() - start
    peak = _rss_mb("VmHWM") if exact else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {
        "variant": variant,
        "when": when,
        "peak_mb": peak - base,
        "seconds": seconds,
        "loss": loss,
        "exact_peak": exact,
    }


def measure(variant: str, when: str, b: int, t: int, v: int) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    out = subprocess.run(
        [sys.executable, __file__, CHILD, variant, when, str(b), str(t), str(v)],
        capture_output=True,
        text=True,
        env=env,
    )
    if out.returncode != 0:
        raise SystemExit(f"child {variant}/{when} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def run(b: int, t: int, v: int) -> dict:
    """{when: {variant: result}} for when in first, steady."""
    res = {
        when: {var: measure(var, when, b, t, v) for var in ("naive", "lmkd")}
        for when in ("first", "steady")
    }
    for when, r in res.items():
        if abs(r["naive"]["loss"] - r["lmkd"]["loss"]) > 1e-4 * max(1.0, abs(r["naive"]["loss"])):
            raise SystemExit(
                f"{when}: the losses differ: naive {r['naive']['loss']}, lmkd {r['lmkd']['loss']}"
            )
    return res


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == CHILD:
        _, _, variant, when, b, t, v = sys.argv
        print(json.dumps(child(variant, when, int(b), int(t), int(v))))
        return
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--full",
        action="store_true",
        help="B*T = 2048, V = 128k (the issue's size; ~7 GB for naive)",
    )
    ap.add_argument("--json", help="also write the figures here")
    ns = ap.parse_args()
    b, t, v = (8, 256, 128_000) if ns.full else (4, 256, 64_000)
    res = run(b, t, v)
    print(
        f"training step (compute_loss + backward), GPT-2-style 4-layer teacher -> 2-layer student, d 256, "
        f"B*T = {b * t}, V = {v}, fp32, CPU, one thread; fresh process per variant"
    )
    print(
        f"{'step':8} {'naive MB':>10} {'lmkd MB':>10} {'mem ratio':>10} {'naive s':>9} {'lmkd s':>9} {'time ratio':>11}"
    )
    for when, r in res.items():
        n, m = r["naive"], r["lmkd"]
        print(
            f"{when:8} {n['peak_mb']:10.0f} {m['peak_mb']:10.0f} {m['peak_mb'] / n['peak_mb']:10.3f} "
            f"{n['seconds']:9.2f} {m['seconds']:9.2f} {m['seconds'] / n['seconds']:10.2f}x"
        )
    if ns.json:
        with open(ns.json, "w") as f:
            json.dump({"b": b, "t": t, "v": v, **res}, f, indent=1)


if __name__ == "__main__":
    main()
