"""Training-step cost of distillation, measured side by side on one batch (CPU).

Goals (issue 5, 15):
  * online KD step / (plain student step + teacher forward)  <= 1.10
  * cached top-K KD step / plain cross-entropy step          <= 1.05
  * cached top-K KD step / fused cross-entropy step (lmkd's own CE-only step, kd_alpha 0: the cost of KD alone)
  * bytes per cached token                                   <= 6K + 8 (6(K+M) + 8 with M tail samples)

    .venv/bin/python benchmarks/bench_step.py [--vocab 16000] [--k 32] [--steps 5]

Models: Marian-style teacher (d=256, 4+4 layers) and student (d=256, 2+2 layers) built from configs
with a unigram tokenizer trained on the shipped en->fr corpus (so the vocabulary is what the corpus
supports, up to --vocab).  One batch of 16 real sentence pairs.  A "step" is forward + backward +
SGD update.  The plain student step is the model's own HF loss (``model(**batch).loss``, mean CE);
the teacher forward is ``torch.no_grad`` teacher(**batch) as the trainer runs it; the KD steps run
``DistillationTrainer.compute_loss`` (kd_alpha 0.5, tau 2) -- its default path (chunked/fused CE+KD)
and, for reference, its plain path (kd_chunk_size 0).  The cached step trains from a real
`cache-logits` directory (K ids + log-probs + tail) with no teacher loaded, and from one with
``--tail-samples`` M sampled tail ids per token as well (the unbiased forward-KL variant).  Variants are run
round-robin, ``--steps`` timed rounds after one warm-up round, and the median is reported, so load
from other processes hits all variants alike.  Timing is the process's CPU time with torch on one
thread (the cores here are shared, so wall-clock ratios swing); wall-clock ratios are printed too.
"""

from __future__ import annotations

import argparse
import copy
import gzip
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def corpus(n):
    rows = []
    with gzip.open(
        ROOT / "lmkd" / "corpora" / "ddtp_en_fr.train.jsonl.gz", "rt", encoding="utf-8"
    ) as f:
        for line in f:
            rows.append(json.loads(line))
            if len(rows) >= n:
                break
    return rows


def main():
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--vocab", type=int, default=16000)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--steps", type=int, default=7)
    ap.add_argument(
        "--json", help="also write the medians and ratios here (benchmarks/bench.py reads them)"
    )
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument(
        "--tail-samples", type=int, default=32, help="M of the sampled-tail cache variant"
    )
    ns = ap.parse_args()

    import datasets
    import transformers

    # One thread and CPU time (time.process_time): the machine's cores are shared with other jobs,
    # which makes wall-clock times of multi-threaded steps swing by tens of percent.
    torch.set_num_threads(1)

    from lmkd import DistillationConfig, DistillationTrainer
    from lmkd.data.collators import collator_for
    from lmkd.data.dataset import DataArguments
    from lmkd.data.reading import load_data
    from lmkd.data.tokenizing import tokenize
    from lmkd.models.scratch import build_model, train_tokenizer
    from lmkd.teacher.logit_cache_writer import cache_logits

    transformers.logging.set_verbosity_error()
    datasets.disable_progress_bars()
    rows = corpus(3000)
    tok = train_tokenizer(
        [r["source"] for r in rows] + [r["target"] for r in rows], vocab_size=ns.vocab
    )
    v = len(tok)
    tmp = Path(tempfile.mkdtemp(prefix="bench-step-"))
    data = tmp / "train.jsonl"
    with open(data, "w", encoding="utf-8") as f:
        for r in rows[: ns.batch * 4]:
            f.write(json.dumps(r) + "\n")
    teacher = build_model("marian", v, seed=1, layers=4, d_model=256, heads=4, dropout=0.0)
    teacher.save_pretrained(tmp / "teacher")
    tok.save_pretrained(tmp / "teacher")
    student = build_model("marian", v, seed=2, layers=2, d_model=256, heads=4, dropout=0.0)
    data_args = DataArguments(
        task="translation", train_file=str(data), max_source_length=64, max_target_length=64
    )

    t0 = time.perf_counter()
    summary = cache_logits(str(tmp / "teacher"), data_args, str(tmp / "cache"), ns.k, batch_size=16)
    cache_s = time.perf_counter() - t0
    summary_s = cache_logits(
        str(tmp / "teacher"),
        data_args,
        str(tmp / "cache_s"),
        ns.k,
        batch_size=16,
        tail_samples=ns.tail_samples,
    )
    ds = tokenize(load_data(str(data), ["source", "target"]), tok, data_args)
    base_collator = collator_for("translation", tok, student)

    def cfg(**kw):
        return DistillationConfig(
            **{
                "output_dir": str(tmp / "out"),
                "report_to": "none",
                "use_cpu": True,
                "kd_alpha": 0.5,
                "kd_temperature": 2.0,
                "save_strategy": "no",
                **kw,
            }
        )

    models = {
        name: copy.deepcopy(student)
        for name in ("plain", "fused_ce", "online", "online_plain", "cached", "cached_s")
    }
    fused_ce = DistillationTrainer(
        model=models["fused_ce"], args=cfg(kd_alpha=0.0), processing_class=tok
    )
    online = DistillationTrainer(
        model=models["online"], args=cfg(), teacher_model=teacher, processing_class=tok
    )
    online_plain = DistillationTrainer(
        model=models["online_plain"],
        args=cfg(kd_chunk_size=0),
        teacher_model=teacher,
        processing_class=tok,
    )
    cached = DistillationTrainer(
        model=models["cached"],
        args=cfg(logit_cache=str(tmp / "cache")),
        train_dataset=ds,
        data_collator=base_collator,
        processing_class=tok,
    )
    cached_s = DistillationTrainer(
        model=models["cached_s"],
        args=cfg(logit_cache=str(tmp / "cache_s")),
        train_dataset=ds,
        data_collator=base_collator,
        processing_class=tok,
    )
    assert cached.teacher is None and cached_s.teacher is None
    idx = list(range(ns.batch))
    batch = base_collator([ds[i] for i in idx])
    cached_batch = cached.data_collator([dict(cached.train_dataset[i]) for i in idx])
    cached_s_batch = cached_s.data_collator([dict(cached_s.train_dataset[i]) for i in idx])
    opts = {n: torch.optim.SGD(m.parameters(), lr=1e-4) for n, m in models.items()}
    for m in models.values():
        m.train()
    t_fwd = online.forward_inputs(teacher, batch)

    def step(name):
        model, opt = models.get(name), opts.get(name)
        if name == "plain":
            loss = model(**batch).loss
        elif name == "teacher_forward":
            with torch.no_grad():
                teacher(**t_fwd)
            return
        elif name == "fused_ce":
            loss = fused_ce.compute_loss(model, batch)
        elif name == "online":
            loss = online.compute_loss(model, batch)
        elif name == "online_plain":
            loss = online_plain.compute_loss(model, batch)
        elif name == "cached":
            loss = cached.compute_loss(model, cached_batch)
        else:
            loss = cached_s.compute_loss(model, cached_s_batch)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    names = ["plain", "fused_ce", "teacher_forward", "online", "online_plain", "cached", "cached_s"]
    models["teacher_forward"] = None
    times = {n: [] for n in names}
    walls = {n: [] for n in names}
    for r in range(ns.steps + 1):
        for n in names:
            start, wall = time.process_time(), time.perf_counter()
            step(n)
            if r:  # round 0 is the warm-up
                times[n].append(time.process_time() - start)
                walls[n].append(time.perf_counter() - wall)
    med = {n: statistics.median(ts) for n, ts in times.items()}
    med_wall = {n: statistics.median(ts) for n, ts in walls.items()}
    n_tok = int(batch["labels"].ne(-100).sum())
    print(
        f"batch: {ns.batch} pairs, {n_tok} target tokens, V={v}, student/teacher d=256 2+2/4+4 layers, "
        f"1 thread, median of {ns.steps} rounds"
    )
    print(f"  {'variant':<16} {'CPU ms':>8} {'wall ms':>8}")
    for n in names:
        print(f"  {n:<16} {med[n] * 1000:8.1f} {med_wall[n] * 1000:8.1f}")
    ratio_online = med["online"] / (med["plain"] + med["teacher_forward"])
    ratio_online_plain = med["online_plain"] / (med["plain"] + med["teacher_forward"])
    ratio_cached = med["cached"] / med["plain"]
    bpt = summary["bytes_per_position"]
    wall_online = med_wall["online"] / (med_wall["plain"] + med_wall["teacher_forward"])
    wall_cached = med_wall["cached"] / med_wall["plain"]
    print(
        "ratios of CPU time (wall-clock ratios, noisier on shared cores: "
        f"online {wall_online:.3f}, cached {wall_cached:.3f})"
    )
    print(
        f"online KD step / (plain step + teacher forward) = {ratio_online:.3f}   (goal <= 1.10; plain-loss "
        f"path: {ratio_online_plain:.3f})"
    )
    print(f"cached top-{ns.k} KD step / plain CE step       = {ratio_cached:.3f}   (goal <= 1.05)")
    print(
        f"bytes per cached token = {bpt:.1f} (goal <= 6K+8 = {6 * ns.k + 8}); {summary['positions']} positions, "
        f"ids {json.load(open(tmp / 'cache' / 'meta.json'))['id_dtype']}, log-probs float16; "
        f"cache-logits took {cache_s:.1f} s"
    )
    k_s = ns.k + ns.tail_samples
    print(
        f"cached top-{ns.k} + {ns.tail_samples} tail samples: step / plain CE step = "
        f"{med['cached_s'] / med['plain']:.3f}   (goal <= 1.05); bytes per cached token = "
        f"{summary_s['bytes_per_position']:.1f} (goal <= 6(K+M)+8 = {6 * k_s + 8})"
    )
    print(
        f"cached top-{ns.k} KD step / fused CE step = {med['cached'] / med['fused_ce']:.3f}; with "
        f"{ns.tail_samples} tail samples {med['cached_s'] / med['fused_ce']:.3f}"
    )
    if ns.json:
        with open(ns.json, "w") as f:
            json.dump(
                {
                    "cpu_s": med,
                    "wall_s": med_wall,
                    "k": ns.k,
                    "tail_samples": ns.tail_samples,
                    "vocab": v,
                    "tokens": n_tok,
                    "bytes_per_token": bpt,
                    "bytes_per_token_samples": summary_s["bytes_per_position"],
                },
                f,
                indent=1,
            )
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
