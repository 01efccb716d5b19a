"""GPU check of `lmkd generate` (run by hand on a GPU machine; not part of the test suite):
batched, padded, length-sorted generation against one input at a time on CUDA, per teacher and
decoding mode, then the length-sorting throughput benchmark at a GPU-sized configuration.

    python benchmarks/device_check_generate.py
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
from _seqkd_helpers import build_teacher  # noqa: E402
from conftest import corpus_rows  # noqa: E402

from lmkd.models.scratch import build_model, train_tokenizer
from lmkd.teacher.pseudo_target_files import load_generated
from lmkd.teacher.pseudo_targets import generate_pseudo_targets


def main() -> None:
    print(
        "torch",
        torch.__version__,
        "cuda",
        torch.cuda.is_available(),
        torch.cuda.get_device_name() if torch.cuda.is_available() else "",
    )
    rows = corpus_rows("train", 1200)
    tok = train_tokenizer(
        [r["source"] for r in rows[:600]] + [r["target"] for r in rows[:600]], vocab_size=300
    )
    data = [dict(r, id=i) for i, r in enumerate(rows[600:664])]
    for i in range(0, 64, 9):  # some long rows
        data[i]["source"] = " ".join(r["source"] for r in rows[700 + i : 706 + i])
    big = build_model("marian", len(tok), d_model=512, layers=6, heads=8, max_positions=1024)
    teachers = {a: build_teacher(a, tok) for a in ("t5", "bart", "gpt2")} | {"marian-512x6": big}
    tmp = tempfile.mkdtemp()
    for name, model in teachers.items():
        for beams, k, sample in ((1, 1, False), (4, 4, False), (1, 2, True)):
            kw = dict(
                num_beams=beams,
                num_return_sequences=k,
                do_sample=sample,
                top_k=50,
                max_new_tokens=24,
                progress=False,
                seed=1,
            )
            start = time.perf_counter()
            a = load_generated(
                generate_pseudo_targets(
                    model, tok, data, f"{tmp}/{name}-{beams}-{sample}-b", batch_size=16, **kw
                )["output"]
            ).to_list()
            t_batched = time.perf_counter() - start
            b = load_generated(
                generate_pseudo_targets(
                    model, tok, data, f"{tmp}/{name}-{beams}-{sample}-1", batch_size=1, **kw
                )["output"]
            ).to_list()
            col = "teacher_nbest" if k > 1 else "teacher_target"
            diff = sum(x[col] != y[col] for x, y in zip(a, b))
            score = max(abs(x["teacher_score"] - y["teacher_score"]) for x, y in zip(a, b))
            print(
                f"{name:13s} beams {beams} K {k} sample {sample!s:5s}: rows differing batched vs one-at-a-time "
                f"{diff}/{len(a)}; max score diff {score:.2e}; distinct targets "
                f"{len({x['teacher_target'] for x in a})}; batched {t_batched:.1f}s",
                flush=True,
            )
    print("== bench_generate (GPU size)", flush=True)
    subprocess.run(
        [
            sys.executable,
            os.path.join(os.path.dirname(__file__), "bench_generate.py"),
            "--d-model",
            "512",
            "--layers",
            "6",
            "--rows",
            "2048",
            "--batch-size",
            "64",
            "--num-beams",
            "4",
            "--max-new-tokens",
            "48",
        ],
        check=False,
    )


if __name__ == "__main__":
    main()
