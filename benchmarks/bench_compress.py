"""What `lmkd compress` gives on the shipped corpus's demo-sized student, measured side by side in one run
(issue 19's targets: int8 CTranslate2 >= 3x the per-token speed of the fp32 PyTorch student, <= 30% of its
bytes, <= 0.5 BLEU lost; the served model >= 10x faster than the PyTorch teacher at >= 90% of its BLEU --
measured and printed here, not tuned to).

Without --student / --teacher it first trains them from scratch on lmkd/corpora/ddtp_en_fr.train.jsonl.gz
with `lmkd distill`'s code (plain training, kd_alpha 0), the shapes and settings of `lmkd study --budget
quick`: a BPE tokenizer of 4,000 tokens, a BART-style student (d_model 128, 2+2 layers, 4 heads, ffn 512:
~1.5M parameters) and teacher (d_model 256, 3+3 layers, ffn 1024), batch 32, lr 1e-3, no dropout.  They
are kept in --workdir, so a second run only measures.  Then `lmkd compress` (lmkd.compress.run.compress_model)
exports the student to int8 PyTorch, float32 and int8 CTranslate2 and scores all five models on the test
rows with `lmkd evaluate`'s code (CTranslate2 float32 separates the engine's speed-up from int8's): BLEU
with beam 4, ms per token when each decodes exactly 64 tokens (greedy, batch 1), all on the same thread
count (OMP_NUM_THREADS; CTranslate2 gets torch's thread count).

    OMP_NUM_THREADS=1 python benchmarks/bench_compress.py | tee benchmarks/results/bench_compress.txt
    python benchmarks/bench_compress.py --student runs/demo/.../student --teacher runs/demo/.../teacher
"""

import argparse
import gzip
import json
import os
import platform
import time

import torch

CORPUS = os.path.join(os.path.dirname(__file__), "..", "lmkd", "corpora")


def rows(split):
    with gzip.open(
        os.path.join(CORPUS, f"ddtp_en_fr.{split}.jsonl.gz"), "rt", encoding="utf-8"
    ) as f:
        return [json.loads(line) for line in f]


def train(out, tokenizer, sizes, steps, train_file, lr):
    from lmkd.data.dataset import DataArguments
    from lmkd.models.scratch import build_model
    from lmkd.train.config import DistillationConfig, ModelArguments
    from lmkd.train.run import run_distill

    init = out + "-init"
    model = build_model("bart", len(tokenizer), dropout=0.0, max_positions=256, **sizes)
    model.save_pretrained(init)
    tokenizer.save_pretrained(init)
    data = DataArguments(
        task="translation", train_file=train_file, max_source_length=64, max_target_length=64
    )
    args = DistillationConfig(
        output_dir=out,
        max_steps=steps,
        learning_rate=lr,
        warmup_steps=min(300, steps // 3),
        lr_scheduler_type="constant_with_warmup",
        weight_decay=0.01,
        per_device_train_batch_size=32,
        save_strategy="no",
        report_to="none",
        logging_steps=max(1, steps // 10),
        seed=42,
        data_seed=42,
        dataloader_num_workers=0,
        dataloader_pin_memory=False,
        max_grad_norm=0.0,
        kd_alpha=0.0,
        use_cpu=True,
        disable_tqdm=True,
    )
    t0 = time.perf_counter()
    run_distill(ModelArguments(student_model_name_or_path=init), data, args)
    return time.perf_counter() - t0


def main():
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--workdir", default="runs/bench_compress", help="trained models and the compress output"
    )
    p.add_argument("--student", help="a trained student (default: train one into --workdir)")
    p.add_argument(
        "--teacher", help="a trained teacher (default: train one into --workdir); 'none' skips it"
    )
    p.add_argument("--student-steps", type=int, default=1500)
    p.add_argument("--teacher-steps", type=int, default=1500)
    p.add_argument("--test-rows", type=int, default=300)
    p.add_argument(
        "--new-tokens", type=int, default=64, help="tokens decoded per example for ms/token"
    )
    p.add_argument("--speed-samples", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3)
    a = p.parse_args()

    from lmkd.compress.run import compress_model
    from lmkd.core.io import write_jsonl
    from lmkd.models.scratch import train_tokenizer

    os.makedirs(a.workdir, exist_ok=True)
    train_file = os.path.join(CORPUS, "ddtp_en_fr.train.jsonl.gz")
    test_file = os.path.join(a.workdir, "test.jsonl")
    write_jsonl(test_file, rows("test")[: a.test_rows])
    tok_dir = os.path.join(a.workdir, "tokenizer")
    if (a.student is None or a.teacher is None) and not os.path.isdir(tok_dir):
        texts = [t for r in rows("train") for t in (r["source"], r["target"])]
        train_tokenizer(texts, vocab_size=4000).save_pretrained(tok_dir)
    notes = []
    if a.student is None:
        from transformers import AutoTokenizer

        a.student = os.path.join(a.workdir, "student")
        if not os.path.isfile(os.path.join(a.student, "config.json")):
            s = train(
                a.student,
                AutoTokenizer.from_pretrained(tok_dir),
                dict(d_model=128, layers=2, heads=4, ffn=512),
                a.student_steps,
                train_file,
                1e-3,
            )
            notes.append(f"student trained {a.student_steps} steps in {s / 60:.1f} min")
    if a.teacher is None:
        from transformers import AutoTokenizer

        a.teacher = os.path.join(a.workdir, "teacher")
        if not os.path.isfile(os.path.join(a.teacher, "config.json")):
            s = train(
                a.teacher,
                AutoTokenizer.from_pretrained(tok_dir),
                dict(d_model=256, layers=3, heads=4, ffn=1024),
                a.teacher_steps,
                train_file,
                1e-3,
            )
            notes.append(f"teacher trained {a.teacher_steps} steps in {s / 60:.1f} min")
    teacher = None if a.teacher == "none" else a.teacher

    t0 = time.perf_counter()
    result = compress_model(
        a.student,
        test_file,
        "translation",
        os.path.join(a.workdir, "compressed"),
        teacher=teacher,
        exports=["torch-int8", "ct2-float32", "ct2-int8"],
        overwrite=True,
        num_beams=4,
        max_new_tokens=64,
        batch_size=16,
        speed_samples=a.speed_samples,
        repeats=a.repeats,
        fixed_new_tokens=a.new_tokens,
        progress=False,
    )
    took = time.perf_counter() - t0
    m, vs = result["models"], result["compress"]["vs_student"]
    print(
        f"# bench_compress: {platform.processor() or platform.machine()}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} thread(s), {result['n_examples']} test rows"
    )
    for n in notes:
        print(f"# {n}")
    print(f"# compress + evaluation of {len(m)} models: {took / 60:.1f} min\n")
    with open(os.path.join(a.workdir, "compressed", "compress.md"), encoding="utf-8") as f:
        print(f.read())
    ct2, s = m["ct2-int8"], m["student"]
    print("## Issue 19's targets (measured in this run)\n")
    print(
        f"- int8 CTranslate2 per-token speed vs fp32 PyTorch student: {vs['ct2-int8']['speedup_per_token']:.2f}x "
        f"(target >= 3x); torch int8: {vs['torch-int8']['speedup_per_token']:.2f}x"
    )
    print(
        f"  of which the engine (CTranslate2 float32 vs PyTorch): {vs['ct2-float32']['speedup_per_token']:.2f}x, "
        f"int8 within CTranslate2: {m['ct2-float32']['speed']['ms_per_token'] / ct2['speed']['ms_per_token']:.2f}x"
    )
    print(
        f"- bytes on disk vs the student: CTranslate2 int8 {100 * vs['ct2-int8']['bytes_ratio']:.1f}% "
        f"(target <= 30%); torch int8 {100 * vs['torch-int8']['bytes_ratio']:.1f}%"
    )
    print(
        f"- BLEU: student {s['quality']['bleu']:.2f}, CTranslate2 int8 {ct2['quality']['bleu']:.2f} "
        f"({vs['ct2-int8']['bleu_difference']:+.2f}; target >= -0.5), "
        f"torch int8 {m['torch-int8']['quality']['bleu']:.2f} "
        f"({vs['torch-int8']['bleu_difference']:+.2f})"
    )
    same = sum(
        x == y for x, y in zip(result["predictions"]["ct2-int8"], result["predictions"]["student"])
    )
    print(
        f"- CTranslate2 int8 outputs identical to the fp32 student's on {same} of {result['n_examples']} rows"
    )
    if teacher:
        t = m["teacher"]
        print(
            f"- served (CTranslate2 int8) vs PyTorch teacher: {ct2['vs_teacher']['speedup_per_token']:.2f}x per "
            f"token, {ct2['vs_teacher']['speedup_latency']:.2f}x latency (target >= 10x), "
            f"{ct2['vs_teacher']['retained_%']['bleu']:.1f}% of its BLEU {t['quality']['bleu']:.2f} (target >= 90%)"
        )


if __name__ == "__main__":
    main()
