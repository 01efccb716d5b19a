"""A teacher served over HTTP (``lmkd serve-teacher``) against the same teacher in the training process.

Goals (issue 29):
  * step time, teacher served by `lmkd serve-teacher` on this machine / teacher in process, with
    and without prefetch (teacher_prefetch 2 / 0)                          goal <= 1.10 with it
  * bytes per target token on the wire (lmkd's binary answer in each log-prob dtype and its older
    JSON/base64 answer; vLLM's format synthesised from the same numbers) against what `lmkd
    cache-logits` stores for the same K                                    goal: binary <= cache
  * the same student trained both ways reaches the same loss (measured on held-out rows against
    the teacher's full distribution: KL(teacher || student) and CE)

    .venv/bin/python benchmarks/bench_served_teacher.py [--steps 30] [--k 32]

Models: a GPT-2-style causal teacher (d=128, 4 layers) and student (d=64, 2 layers) built from
configs, with a BPE tokenizer trained on the shipped en->fr corpus; causal-LM KD on its source
sentences, batches of 16.  The server is a separate process (`python -m lmkd serve-teacher`), one
torch thread like the trainer: on this machine the two compete for its two shared cores, as a
teacher and a trainer on one box would.  Step times are wall-clock (the served teacher works in
another process, so the trainer's CPU time would flatter it): the median over the steps after the
first 3 of a DistillationTrainer run, timed by a callback.  On shared, loaded cores wall-clock
ratios swing with the other jobs, so the CPU seconds per step are printed too: the trainer
process's (its prefetch threads included) and the server process's over the same run -- the work
serving adds (HTTP, encoding the answer, the top-k) whatever the scheduler does.  kd_alpha 1, tau 1,
forward KL; the in-process run takes lmkd's default path (chunked KD on full logits), the served runs
the top-K path of the logit cache (K = --k) with teacher_logprob_dtype float16 (the default).  Wire
bytes are answer bodies (HTTP headers left out), per target position: the prefetch-2 run's, then the
same training batches asked again in each encoding.
"""

from __future__ import annotations

import argparse
import copy
import gzip
import json
import os
import platform
import statistics
import subprocess
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
    with gzip.open(ROOT / "lmkd/corpora/ddtp_en_fr.train.jsonl.gz", "rt", encoding="utf-8") as f:
        for line in f:
            rows.append(json.loads(line))
            if len(rows) >= n:
                break
    return rows


def start_server(teacher_dir, port):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    proc = subprocess.Popen(
        [sys.executable, "-m", "lmkd", "serve-teacher", teacher_dir, "--port", str(port)],
        env=env,
        stderr=subprocess.PIPE,
        text=True,
    )
    line = proc.stderr.readline()  # "serving ... at http://127.0.0.1:PORT -- Ctrl-C stops"
    if "serving" not in line:
        proc.kill()
        raise SystemExit(f"serve-teacher did not start: {line}{proc.stderr.read()}")
    return proc, f"http://127.0.0.1:{port}"


def main():
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--vocab", type=int, default=2000)
    ap.add_argument("--port", type=int, default=18731)
    ns = ap.parse_args()
    torch.set_num_threads(1)

    import datasets
    from transformers import TrainerCallback

    from lmkd import DistillationConfig, DistillationTrainer, losses
    from lmkd.data.collators import collator_for
    from lmkd.data.dataset import DataArguments
    from lmkd.data.tokenizing import tokenize
    from lmkd.models.scratch import build_model, train_tokenizer
    from lmkd.teacher.logit_cache import LogitCache
    from lmkd.teacher.logit_cache_writer import cache_logits
    from lmkd.teacher.served import ServedTeacher, served_batch

    rows = corpus(1000)
    texts = [r["source"] for r in rows]
    tok = train_tokenizer(texts + [r["target"] for r in rows], vocab_size=ns.vocab)
    tmp = Path(tempfile.mkdtemp(prefix="bench_served_"))
    teacher_dir = str(tmp / "teacher")
    teacher = build_model("gpt2", len(tok), seed=1, d_model=128, layers=4, dropout=0.0)
    with torch.no_grad():  # a peaked teacher (logits x6), so that matching it is a visible change
        teacher.transformer.ln_f.weight.mul_(6.0)
    teacher.save_pretrained(teacher_dir)
    tok.save_pretrained(teacher_dir)
    init = build_model("gpt2", len(tok), seed=2, d_model=64, layers=2)
    n_train = 16 * (ns.steps + 4)
    train_file = tmp / "train.jsonl"
    train_file.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts[:n_train]))
    data_args = DataArguments(task="causal-lm", train_file=str(train_file))
    train = tokenize(
        datasets.Dataset.from_list([{"text": t} for t in texts[:n_train]]), tok, data_args
    )
    held = tokenize(datasets.Dataset.from_list([{"text": t} for t in texts[-64:]]), tok, data_args)
    collate = collator_for("causal-lm", tok)

    class Clock(TrainerCallback):
        def __init__(self):
            self.t, self.cpu = [], []

        def on_step_end(self, args, state, control, **kw):
            self.t.append(time.perf_counter())
            self.cpu.append(time.process_time())

    def server_cpu():
        if proc is None:
            return 0.0
        fields = Path(f"/proc/{proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def run(name, **keys):
        student = copy.deepcopy(init)
        clock = Clock()
        args = DistillationConfig(
            output_dir=str(tmp / name),
            per_device_train_batch_size=16,
            max_steps=ns.steps,
            learning_rate=2e-3,
            warmup_steps=0,
            kd_alpha=1.0,
            kd_temperature=1.0,
            report_to="none",
            save_strategy="no",
            use_cpu=True,
            seed=0,
            disable_tqdm=True,
            logging_steps=10**6,
            **keys,
        )
        trainer = DistillationTrainer(
            model=student,
            args=args,
            teacher_model=teacher if "teacher_server_url" not in keys else None,
            train_dataset=train,
            processing_class=tok,
            data_collator=collate,
            callbacks=[clock],
        )
        t0, c0, s0 = time.perf_counter(), time.process_time(), server_cpu()
        trainer.train()
        steps = [b - a for a, b in zip([t0] + clock.t[:-1], clock.t)][3:]
        # CPU seconds per step over the whole run: this process's, and the server's
        trainer.cpu_per_step = (time.process_time() - c0) / ns.steps
        trainer.server_cpu_per_step = (server_cpu() - s0) / ns.steps if keys else 0.0
        return student, statistics.median(steps), trainer

    def held_out(student):
        """Mean full-vocabulary KL(teacher || student) and CE per next-token position."""
        student.eval()
        batch = collate([held[i] for i in range(len(held))])
        fwd = {k: v for k, v in batch.items() if k != "labels"}
        with torch.no_grad():
            s, t = student(**fwd).logits[:, :-1], teacher(**fwd).logits[:, :-1]
        mask = batch["attention_mask"][:, 1:].bool()
        n = int(mask.sum())
        kl = float(losses.token_kd_loss(s, t, mask)) / n
        ce = float(losses.cross_entropy(s, batch["labels"][:, 1:])) / n
        return kl, ce

    teacher.eval()
    results = {}
    proc = None
    proc, url = start_server(teacher_dir, ns.port)
    try:
        local, t_local, tr_l = run("local")
        served0, t_s0, tr0 = run(
            "served0", teacher_server_url=url, teacher_top_k=ns.k, teacher_prefetch=0
        )
        served2, t_s2, tr2 = run(
            "served2", teacher_server_url=url, teacher_top_k=ns.k, teacher_prefetch=2
        )
        local_b, t_local_b, tr_lb = run(
            "local_b"
        )  # the baseline again, after: load drifts on shared cores
        # the same training batches in each answer (the JSON one: what a pre-binary server sends)
        batches = [collate([train[i] for i in range(b, b + 16)]) for b in range(0, n_train, 16)]
        encodings = {}
        for name, dtype in (
            ("float16", "float16"),
            ("bfloat16", "bfloat16"),
            ("float32", "float32"),
            ("json", "float32"),
        ):
            client = ServedTeacher(url, top_k=ns.k, logprob_dtype=dtype)
            client.binary = name != "json"
            for batch in batches:
                served_batch(client, batch, "causal")
            encodings[name] = client.bytes_received / client.positions_received
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    base = statistics.mean([t_local, t_local_b])
    wire = tr2.served[0].bytes_received / max(tr2.served[0].positions_received, 1)

    # what the cache stores for the same K (tail bucket only, and the default 32 tail samples)
    cache_bytes = {}
    for m in (0, 32):
        out = tmp / f"cache{m}"
        cache_logits(teacher_dir, data_args, str(out), ns.k, tail_samples=m, progress=False)
        size = sum(p.stat().st_size for p in out.rglob("*.npy"))
        cache_bytes[m] = size / LogitCache(str(out)).positions

    # vLLM's prompt_logprobs JSON for the same numbers (K + the prompt's own token per position)
    batch = collate([train[i] for i in range(16)])
    with torch.no_grad():
        lp = torch.log_softmax(teacher(input_ids=batch["input_ids"]).logits.float(), -1)
    vllm_bytes, positions = 0, 0
    for b in range(16):
        n = int(batch["attention_mask"][b].sum())
        ids = batch["input_ids"][b, :n].tolist()
        plp = [None]
        for j in range(n - 1):
            v, a = lp[b, j].topk(ns.k)
            e = {
                str(int(x)): {
                    "logprob": float(y),
                    "rank": r + 1,
                    "decoded_token": tok.decode([int(x)]),
                }
                for r, (y, x) in enumerate(zip(v, a))
            }
            e.setdefault(
                str(ids[j + 1]),
                {"logprob": float(lp[b, j, ids[j + 1]]), "rank": 999, "decoded_token": "x"},
            )
            plp.append(e)
        vllm_bytes += len(json.dumps({"index": b, "text": "", "prompt_logprobs": plp}))
        positions += n - 1

    results = {
        "step_s": {
            "in_process": [t_local, t_local_b],
            "served_prefetch0": t_s0,
            "served_prefetch2": t_s2,
        },
        "cpu_s_per_step": {
            "in_process": [tr_l.cpu_per_step, tr_lb.cpu_per_step],
            "served_prefetch0": [tr0.cpu_per_step, tr0.server_cpu_per_step],
            "served_prefetch2": [tr2.cpu_per_step, tr2.server_cpu_per_step],
        },
        "ratio_served_prefetch2": t_s2 / base,
        "ratio_served_prefetch0": t_s0 / base,
        "bytes_per_token": {
            "wire_lmkd_training_run": wire,
            "wire_lmkd_binary": encodings,
            "wire_vllm_json_synthetic": vllm_bytes / positions,
            "cache_tail_bucket": cache_bytes[0],
            "cache_32_tail_samples": cache_bytes[32],
        },
        "held_out": {
            "in_process": held_out(local),
            "served_prefetch2": held_out(served2),
            "init": held_out(copy.deepcopy(init)),
        },
    }
    print(f"# bench_served_teacher  {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    print(
        f"# machine: {platform.machine()} {os.cpu_count()}-core VM, load average "
        f"{os.getloadavg()[0]:.1f} at the end; torch "
        f"{torch.__version__}, 1 thread per process; steps {ns.steps}, batch 16, K {ns.k}, vocab {len(tok)}"
    )
    print(
        "teacher gpt2 d128x4 / student d64x2, causal-LM KD; server: `lmkd serve-teacher` in its own process"
    )
    s = results["step_s"]
    print(
        f"step (median, wall): in-process teacher {s['in_process'][0] * 1e3:.1f} ms (again after: "
        f"{s['in_process'][1] * 1e3:.1f} ms)"
    )
    print(
        f"  served, no prefetch   {s['served_prefetch0'] * 1e3:.1f} ms   ratio {results['ratio_served_prefetch0']:.2f}"
    )
    print(
        f"  served, prefetch 2    {s['served_prefetch2'] * 1e3:.1f} ms   ratio "
        f"{results['ratio_served_prefetch2']:.2f}  (goal <= 1.10)"
    )
    c = results["cpu_s_per_step"]
    cpu_base = statistics.mean(c["in_process"])
    for name in ("served_prefetch0", "served_prefetch2"):
        trainer_cpu, srv_cpu = c[name]
        print(
            f"  CPU per step, {name}: trainer {trainer_cpu * 1e3:.0f} ms + server {srv_cpu * 1e3:.0f} "
            f"ms = {(trainer_cpu + srv_cpu) / cpu_base:.2f} x the in-process step's "
            f"{cpu_base * 1e3:.0f} ms"
        )
    bt = results["bytes_per_token"]
    enc = bt["wire_lmkd_binary"]
    print(
        f"bytes per target token, K={ns.k}: wire, lmkd binary answer (uint16 ids) float16 "
        f"{enc['float16']:.1f} (the training run's {bt['wire_lmkd_training_run']:.1f}) / bfloat16 "
        f"{enc['bfloat16']:.1f} / float32 {enc['float32']:.1f}; cache on disk "
        f"{bt['cache_tail_bucket']:.1f} (float16, tail bucket) / {bt['cache_32_tail_samples']:.1f} "
        f"(+32 tail samples)  (goal: float16 wire <= cache: "
        f"{'met' if enc['float16'] <= bt['cache_tail_bucket'] else 'NOT met'})"
    )
    print(
        f"  older answers: lmkd JSON (base64 int32 + float32) {enc['json']:.0f}; vLLM "
        f"prompt_logprobs JSON (synthesised, same numbers) {bt['wire_vllm_json_synthetic']:.0f}"
    )
    h = results["held_out"]
    print(
        "held-out per position, KL(teacher||student) / CE:  init "
        f"{h['init'][0]:.4f} / {h['init'][1]:.4f};  in-process {h['in_process'][0]:.4f} / "
        f"{h['in_process'][1]:.4f};  served {h['served_prefetch2'][0]:.4f} / {h['served_prefetch2'][1]:.4f}"
    )
    print(json.dumps(results))


if __name__ == "__main__":
    main()
