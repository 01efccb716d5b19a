"""Speed figures of `lmkd evaluate`, measured side by side in one run.

1. A student with fewer decoder layers against its teacher: latency (batch 1) and throughput
   speed-ups as `lmkd evaluate` reports them (lmkd.evaluate.run.evaluate_models).
2. Length-sorted batching in lmkd.models.generation.generate_texts against batching in file order: the
   throughput ratio (same model, same inputs, same outputs).

Models are built from configs (no network): a Marian-style teacher (--layers encoder and decoder
layers, --d-model) and a student keeping all encoder layers and --student-decoder-layers of the
decoder.  Untrained, so outputs run to --max-new-tokens for both: the ratios measure compute.

    python benchmarks/bench_evaluate.py                 # CPU, small
    python benchmarks/bench_evaluate.py --device cuda --d-model 512 --layers 6 --samples 256
"""

import argparse
import gzip
import json
import os
import statistics
import tempfile
import time

import torch

from lmkd.evaluate.run import evaluate_models
from lmkd.models.generation import generate_texts
from lmkd.models.scratch import build_model, train_tokenizer
from lmkd.models.student import make_student

CORPUS = os.path.join(
    os.path.dirname(__file__), "..", "lmkd", "corpora", "ddtp_en_fr.test.jsonl.gz"
)


def main():
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--d-model", type=int, default=64)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--student-decoder-layers", type=int, default=2)
    p.add_argument("--samples", type=int, default=48)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--num-beams", type=int, default=4)
    p.add_argument("--max-new-tokens", type=int, default=24)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", help="also write the figures here")
    a = p.parse_args()

    with gzip.open(CORPUS, "rt", encoding="utf-8") as f:
        rows = [json.loads(line) for line in f]
    tok = train_tokenizer(
        [r["source"] for r in rows] + [r["target"] for r in rows], vocab_size=2000
    )
    work = tempfile.mkdtemp(prefix="bench_evaluate-")
    teacher = build_model(
        "marian",
        len(tok),
        d_model=a.d_model,
        layers=a.layers,
        heads=max(4, a.d_model // 64),
        max_positions=512,
    )
    keep = [
        round(i * (a.layers - 1) / max(1, a.student_decoder_layers - 1))
        for i in range(a.student_decoder_layers)
    ]
    student = make_student(teacher, encoder_layers=list(range(a.layers)), decoder_layers=keep)
    for name, model in (("teacher", teacher), ("student", student)):
        model.generation_config.forced_eos_token_id = None
        model.save_pretrained(os.path.join(work, name))
        tok.save_pretrained(os.path.join(work, name))
    data = os.path.join(work, "test.jsonl")
    with open(data, "w", encoding="utf-8") as f:
        for r in rows[: a.samples]:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")

    # 1. student against teacher, as lmkd evaluate measures it
    result = evaluate_models(
        os.path.join(work, "student"),
        data,
        "translation",
        teacher=os.path.join(work, "teacher"),
        num_beams=a.num_beams,
        max_new_tokens=a.max_new_tokens,
        batch_size=a.batch_size,
        speed_samples=a.samples,
        repeats=a.repeats,
        device=a.device,
        progress=False,
    )
    s, t = result["models"]["student"], result["models"]["teacher"]
    figures = {
        "device": a.device,
        "teacher_parameters": t["size"]["parameters"],
        "student_parameters": s["size"]["parameters"],
        "decoder_layers": f"{a.layers} -> {a.student_decoder_layers}",
        "teacher_latency_ms": t["speed"]["latency_ms"],
        "student_latency_ms": s["speed"]["latency_ms"],
        "speedup_latency": s["vs_teacher"]["speedup_latency"],
        "teacher_throughput": t["speed"]["throughput_per_s"],
        "student_throughput": s["speed"]["throughput_per_s"],
        "speedup_throughput": s["vs_teacher"]["speedup_throughput"],
    }

    # 2. length-sorted batches against file order, same model and inputs, interleaved repeats
    model = teacher.to(a.device).eval()
    sources = [r["source"] for r in rows[: a.samples]]
    # a realistic spread of lengths: every fourth input three times as long
    sources = [s_ if i % 4 else " ".join([s_] * 3) for i, s_ in enumerate(sources)]

    def file_order():
        out = []
        with torch.inference_mode():
            for i in range(0, len(sources), a.batch_size):
                enc = tok(
                    sources[i : i + a.batch_size],
                    return_tensors="pt",
                    padding=True,
                    truncation=True,
                    max_length=512,
                ).to(a.device)
                ids = model.generate(
                    **enc, num_beams=a.num_beams, max_new_tokens=a.max_new_tokens, do_sample=False
                )
                out += [x.strip() for x in tok.batch_decode(ids, skip_special_tokens=True)]
        return out

    def sorted_batches():
        return generate_texts(
            model,
            tok,
            sources,
            num_beams=a.num_beams,
            max_new_tokens=a.max_new_tokens,
            batch_size=a.batch_size,
            progress=False,
        )

    def timed(fn):
        if a.device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if a.device.startswith("cuda"):
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    file_order(), sorted_batches()  # warm-up
    plain, lmkd = [], []
    for _ in range(a.repeats):
        plain.append(timed(file_order))
        lmkd.append(timed(sorted_batches))
    figures["file_order_s"] = statistics.median(plain)
    figures["length_sorted_s"] = statistics.median(lmkd)
    figures["sorting_speedup"] = figures["file_order_s"] / figures["length_sorted_s"]

    for k, v in figures.items():
        print(f"{k:22s} {v:,.3f}" if isinstance(v, float) else f"{k:22s} {v}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(figures, f, indent=1)


if __name__ == "__main__":
    main()
