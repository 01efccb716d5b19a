"""Quality of offline KD: students trained from cached teacher logits against the online teacher.

Issue 5's goal: on the shipped en->fr data, a student trained from cached top-K logits (K <= 64) is
within 0.5 BLEU of one trained with the online teacher, same seed and steps.  This script takes
the teacher, the student initialisation and the transfer set of a `make demo` study (`lmkd
study --budget quick`, in ``--study``) and trains, for every seed, three Word-KD students with
the study's own training settings (lmkd.study.train_student: AdamW 1e-3, constant after 200 warm-up
steps, batch 32, alpha 0.5, tau 1):

  online     the teacher runs in every step
  topK       from `cache-logits --top-k K` (K ids + one tail bucket)
  topK+M     from `cache-logits --top-k K --tail-samples M` (K ids + M sampled tail ids)

then scores each on the shipped test split (1,000 pairs, greedy, BLEU via sacrebleu) and prints
the BLEU of each and its difference to the online student of the same seed.  Finished students
are kept under ``--output`` and reused on a rerun.  CPU: about 10 minutes per seed at 2,000 steps
on 2 cores (online runs are ~2x the cached ones).

    make demo   # once: the teacher, the student initialisation and the transfer set
    .venv/bin/python benchmarks/quality_cached_kd.py --study runs/demo --steps 2000 --seeds 42 1 2
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--study", default="runs/demo", help="output dir of `lmkd study --task translation`"
    )
    ap.add_argument(
        "--output", default="runs/quality-cached-kd", help="where students and caches go"
    )
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--seeds", type=int, nargs="+", default=[42, 1, 2])
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--tail-samples", type=int, default=32)
    ap.add_argument("--test", help="test file (default: the shipped test split, 1,000 pairs)")
    ns = ap.parse_args()

    from lmkd.data.dataset import DataArguments
    from lmkd.study import BUDGETS, evaluate_quality, shipped_corpus, train_student
    from lmkd.teacher.logit_cache_writer import cache_logits

    stages = os.path.join(ns.study, "stages")
    teacher, init = os.path.join(stages, "teacher"), os.path.join(stages, "s025-init")
    transfer = os.path.join(stages, "transfer-rows", "transfer.jsonl")
    for path in (teacher, init, transfer):
        if not os.path.exists(path):
            print(
                f"{path} does not exist: run `make demo` (or `lmkd study --task translation --output "
                f"{ns.study}`) first",
                file=sys.stderr,
            )
            return 2
    test = ns.test or shipped_corpus("test")
    plan = dict(BUDGETS["quick"], kd_temperature=1.0)
    os.makedirs(ns.output, exist_ok=True)
    data_args = DataArguments(
        task="translation",
        train_file=transfer,
        max_source_length=plan["max_length"],
        max_target_length=plan["max_length"],
    )
    k, m = ns.k, ns.tail_samples
    caches = {
        f"top{k}": (os.path.join(ns.output, f"cache-top{k}"), 0),
        f"top{k}+{m}": (os.path.join(ns.output, f"cache-top{k}-tail{m}"), m),
    }
    for name, (path, samples) in caches.items():
        t0 = time.perf_counter()
        summary = cache_logits(teacher, data_args, path, k, batch_size=64, tail_samples=samples)
        print(
            f"cache {name}: {summary['bytes_per_position']:.1f} bytes per token, "
            f"{time.perf_counter() - t0:.0f} s",
            flush=True,
        )

    variants = {"online": {}} | {name: {"logit_cache": path} for name, (path, _) in caches.items()}
    bleu: dict[str, dict[int, float]] = {v: {} for v in variants}
    for seed in ns.seeds:
        for name, extra in variants.items():
            out = os.path.join(ns.output, f"{name.replace('+', '-tail')}-s{seed}-{ns.steps}")
            if not os.path.isfile(os.path.join(out, "model.safetensors")):
                t0 = time.perf_counter()
                train_student(
                    out,
                    init,
                    "translation",
                    transfer,
                    None,
                    plan,
                    steps=ns.steps,
                    lr=plan["student_lr"],
                    teacher_dir=teacher if name == "online" else None,
                    kd_alpha=0.5,
                    seed=seed,
                    **extra,
                )
                print(f"trained {name} seed {seed}: {time.perf_counter() - t0:.0f} s", flush=True)
            bleu[name][seed] = evaluate_quality(
                out, "translation", test, 1, plan["max_new_tokens"]
            )["greedy"]["bleu"]
            print(f"  {name:<10} seed {seed}: BLEU {bleu[name][seed]:.2f}", flush=True)

    print(
        f"\nBLEU (greedy) on {test}, {ns.steps} steps; difference to the online student of the same seed"
    )
    print(
        f"{'variant':<10} " + " ".join(f"{'s' + str(s):>14}" for s in ns.seeds) + f" {'mean':>14}"
    )
    for name in variants:
        cells = []
        for s in ns.seeds:
            d = bleu[name][s] - bleu["online"][s]
            cells.append(
                f"{bleu[name][s]:6.2f}" + (f" ({d:+.2f})" if name != "online" else " " * 8)
            )
        mean = statistics.mean(bleu[name].values())
        dm = mean - statistics.mean(bleu["online"].values())
        cells.append(f"{mean:6.2f}" + (f" ({dm:+.2f})" if name != "online" else " " * 8))
        print(f"{name:<10} " + " ".join(f"{c:>14}" for c in cells))
    with open(os.path.join(ns.output, f"bleu-{ns.steps}.json"), "w") as f:
        json.dump(bleu, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
