"""Pseudo-label generation throughput of `lmkd generate`: length-sorted batches against batches in
file order (what a plain loop or a pipeline does), same model, same batch size, measured side by
side in one run; the outputs must be identical.

The inputs are a skewed length mix like real text: short rows of the shipped en->fr corpus plus a
few long rows (several corpus sentences joined), spread through the file.  In file order nearly
every batch holds a long row and is padded to it (encoder work and every decoding step's
cross-attention); sorted, the long rows share a few batches.

The teacher is a Marian-style model built from a config (no network), its EOS made likely so that
hypotheses end at different steps as real ones do.  Untrained, its outputs are garbage, but the
same garbage in both arms (checked).

    python benchmarks/bench_generate.py                   # CPU: under a minute on 2 cores
    python benchmarks/bench_generate.py --d-model 512 --layers 6 --rows 4096 --batch-size 64
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import random
import shutil
import tempfile
import time

import torch

from lmkd.models.scratch import EOS, build_model, train_tokenizer
from lmkd.teacher.pseudo_target_files import load_generated
from lmkd.teacher.pseudo_targets import generate_pseudo_targets

CORPUS = os.path.join(
    os.path.dirname(__file__), "..", "lmkd", "corpora", "ddtp_en_fr.train.jsonl.gz"
)


def skewed_rows(n: int, long_share: float, seed: int = 0) -> list[dict]:
    with gzip.open(CORPUS, "rt", encoding="utf-8") as f:
        corpus = [json.loads(line) for _, line in zip(range(n + 2000), f)]
    rng = random.Random(seed)
    rows = [dict(corpus[i], id=i) for i in range(n)]
    for i in rng.sample(range(n), max(1, int(long_share * n))):  # long rows: 6-12 sentences joined
        rows[i]["source"] = " ".join(
            r["source"] for r in rng.sample(corpus[n:], rng.randint(6, 12))
        )
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--rows", type=int, default=384)
    ap.add_argument(
        "--long-share", type=float, default=0.05, help="share of long rows (default 5%%)"
    )
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--num-beams", type=int, default=2)
    ap.add_argument("--max-new-tokens", type=int, default=24)
    ap.add_argument("--d-model", type=int, default=128)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument(
        "--threads", type=int, default=1, help="torch CPU threads (1: steady on a shared machine)"
    )
    ap.add_argument(
        "--repeats", type=int, default=2, help="timed runs per arm, alternating; best is kept"
    )
    a = ap.parse_args()
    torch.set_num_threads(a.threads)

    rows = skewed_rows(a.rows, a.long_share)
    tok = train_tokenizer(
        [r["source"] for r in rows[:600]] + [r["target"] for r in rows[:600]], vocab_size=1000
    )
    model = build_model(
        "marian", len(tok), d_model=a.d_model, layers=a.layers, heads=4, max_positions=1024
    )
    with torch.no_grad():
        model.final_logits_bias[0, EOS] += 4.0  # hypotheses end at different steps
    model.eval()  # generate_pseudo_targets moves it to the process's device (the GPU when there is one)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    lengths = [len(x) for x in tok([r["source"] for r in rows])["input_ids"]]
    print(
        f"{len(rows)} rows, source tokens: median {sorted(lengths)[len(lengths) // 2]}, max {max(lengths)}, "
        f"{sum(x > 64 for x in lengths)} rows > 64; batch {a.batch_size}, beams {a.num_beams}, "
        f"max_new_tokens {a.max_new_tokens}, d_model {a.d_model}, {a.layers}+{a.layers} layers, {device}"
    )

    tmp = tempfile.mkdtemp(prefix="bench-generate-")
    best = {True: float("inf"), False: float("inf")}
    outputs = {}
    try:
        for rep in range(a.repeats):
            for sort in (False, True):
                out = os.path.join(tmp, f"{'sorted' if sort else 'fixed'}-{rep}")
                start = time.perf_counter()
                generate_pseudo_targets(
                    model,
                    tok,
                    rows,
                    out,
                    num_beams=a.num_beams,
                    max_new_tokens=a.max_new_tokens,
                    batch_size=a.batch_size,
                    chunk_size=len(rows),
                    sort_by_length=sort,
                    progress=False,
                )
                best[sort] = min(best[sort], time.perf_counter() - start)
                outputs[sort] = load_generated(out).to_list()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    a_rows, b_rows = outputs[False], outputs[True]
    same = [x["teacher_target"] for x in a_rows] == [x["teacher_target"] for x in b_rows]
    print(f"fixed-order batches : {best[False]:7.2f} s  {len(rows) / best[False]:7.1f} examples/s")
    print(f"length-sorted       : {best[True]:7.2f} s  {len(rows) / best[True]:7.1f} examples/s")
    print(
        f"speed-up (sorted / fixed order): {best[False] / best[True]:.2f}x  (goal >= 1.3x); "
        f"outputs identical: {same}"
    )
    if not same:
        raise SystemExit("outputs differ between the two batch orders")


if __name__ == "__main__":
    main()
