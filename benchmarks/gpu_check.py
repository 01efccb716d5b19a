"""One short GPU check (run on a lent H200; see README "GPU"): prints side-by-side figures.

1. KD loss fwd+bwd, N=4096 positions, V=32k/128k, bf16 logits: naive (lmkd.losses) vs chunked
   and fused-linear (lmkd.losses.chunked): peak CUDA memory and time.
2. bf16 training step of a BART-size pair: online KD step vs (plain student step + teacher forward).
3. Teacher generation: length-sorted vs file-order batches (lmkd.teacher.pseudo_targets), examples/s.
Usage: python benchmarks/gpu_check.py   (add --small for a CPU smoke run)
"""

import sys
import tempfile
import time

import torch

from lmkd import losses
from lmkd.losses.chunked import Head, chunked_kd_loss
from lmkd.losses.fused import fused_linear_distill_loss

SMALL = "--small" in sys.argv
dev = torch.device("cuda" if torch.cuda.is_available() and not SMALL else "cpu")
print(
    "device:",
    torch.cuda.get_device_name() if dev.type == "cuda" else "cpu",
    "| torch",
    torch.__version__,
)


def sync():
    if dev.type == "cuda":
        torch.cuda.synchronize()


def measure(fn, reps=3):
    fn()
    sync()
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t)
    peak = (
        (torch.cuda.max_memory_allocated() - base) / 2**20 if dev.type == "cuda" else float("nan")
    )
    return sorted(times)[len(times) // 2] * 1000, peak


# ---- 1. KD loss memory/time ----
n = 512 if SMALL else 4096
for v in (1000,) if SMALL else (32000, 128000):
    h = 64 if SMALL else 1024
    torch.manual_seed(0)
    hidden = torch.randn(n, h, device=dev, dtype=torch.bfloat16, requires_grad=True)
    w = (torch.randn(v, h, device=dev, dtype=torch.bfloat16) * 0.02).requires_grad_()
    t_logits = torch.randn(n, v, device=dev, dtype=torch.bfloat16) * 3

    def naive():
        loss = losses.forward_kl(hidden @ w.T, t_logits, temperature=2.0)
        loss.backward()

    def chunked():
        loss = chunked_kd_loss(hidden @ w.T, t_logits, temperature=2.0)
        loss.backward()

    def fused():
        loss = fused_linear_distill_loss(
            hidden, Head(weight=w), t_logits, temperature=2.0, ce_weight=0.0
        )[0]
        loss.backward()

    res = {
        name: measure(f) for name, f in (("naive", naive), ("chunked", chunked), ("fused", fused))
    }
    ln = losses.forward_kl(hidden @ w.T, t_logits, temperature=2.0).item()
    lf = fused_linear_distill_loss(
        hidden, Head(weight=w), t_logits, temperature=2.0, ce_weight=0.0
    )[0].item()
    print(
        f"KD loss N={n} V={v}: "
        + " | ".join(f"{k} {t:.1f} ms {m:.0f} MiB" for k, (t, m) in res.items())
        + f" | fused/naive time {res['fused'][0] / res['naive'][0]:.2f}x mem {res['fused'][1] / res['naive'][1]:.2f}x"
        + f" | chunked/naive time {res['chunked'][0] / res['naive'][0]:.2f}x"
        + f" mem {res['chunked'][1] / res['naive'][1]:.2f}x"
        + f" | loss naive {ln:.4f} fused {lf:.4f}"
    )
    hidden = w = t_logits = None  # free them before the next size (closures above read them)

# ---- 2. bf16 training step ----
from lmkd import DistillationConfig, DistillationTrainer, make_student
from lmkd.models.scratch import build_model

V = 1000 if SMALL else 32000
sizes = dict(d_model=64, layers=2, heads=4) if SMALL else dict(d_model=768, layers=6, heads=12)
teacher = build_model("bart", V, dropout=0.0, **sizes).to(
    dev, torch.bfloat16 if dev.type == "cuda" else torch.float32
)
student = make_student(teacher).to(dev)  # every other layer
student = student.float()
B, T = (4, 16) if SMALL else (32, 64)
g = torch.Generator().manual_seed(0)
batch = {
    "input_ids": torch.randint(5, V, (B, T), generator=g).to(dev),
    "attention_mask": torch.ones(B, T, dtype=torch.long, device=dev),
    "labels": torch.randint(5, V, (B, T), generator=g).to(dev),
}
opt = torch.optim.AdamW(student.parameters(), lr=1e-5)
for alpha in (0.0, 0.5):
    args = DistillationConfig(
        output_dir=tempfile.mkdtemp(),
        kd_alpha=alpha,
        report_to="none",
        bf16=dev.type == "cuda",
        use_cpu=dev.type != "cuda",
        teacher_dtype="bfloat16" if dev.type == "cuda" else "auto",
    )
    tr = DistillationTrainer(model=student, args=args, teacher_model=teacher if alpha else None)

    def step():
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda"):
            loss = tr.compute_loss(student, batch)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    t, m = measure(step, reps=10)
    if alpha == 0:
        plain = t

        def tfwd():
            with (
                torch.no_grad(),
                torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda"),
            ):
                teacher(**batch)

        tf, _ = measure(tfwd, reps=10)
    else:
        kd = t
print(
    f"bf16 step B={B} T={T} V={V}: plain student {plain:.1f} ms, teacher fwd {tf:.1f} ms, online KD {kd:.1f} ms, "
    f"KD / (plain + teacher fwd) = {kd / (plain + tf):.2f}  ({B * T / kd * 1000:.0f} target tokens/s)"
)

# ---- 3. generation ----
import gzip  # noqa: E401,E402
import json

from lmkd.models.scratch import train_tokenizer
from lmkd.teacher.pseudo_targets import generate_pseudo_targets

rows = [json.loads(l) for l in gzip.open("lmkd/corpora/ddtp_en_fr.train.jsonl.gz", "rt")][
    : (64 if SMALL else 1024)
]
for i in range(0, len(rows), 20):  # a skewed mix: 5% long rows
    rows[i] = {"source": " ".join(r["source"] for r in rows[i : i + 8]), "target": ""}
tok = train_tokenizer([r["source"] for r in rows[:2000]], vocab_size=V if SMALL else 8000)
gen_teacher = build_model("bart", len(tok), dropout=0.0, **sizes).to(dev)
rates = {}
for sort in (False, True):
    out = tempfile.mkdtemp() + "/g"
    t = time.perf_counter()
    rep = generate_pseudo_targets(
        gen_teacher,
        tok,
        rows,
        out,
        num_beams=4,
        max_new_tokens=32,
        batch_size=64,
        sort_by_length=sort,
        progress=False,
        dtype="bfloat16" if dev.type == "cuda" else "auto",
    )
    rates[sort] = len(rows) / (time.perf_counter() - t)
print(
    f"generation beam 4, {len(rows)} rows, batch 64: file order {rates[False]:.0f} ex/s, length-sorted "
    f"{rates[True]:.0f} ex/s, ratio {rates[True] / rates[False]:.2f}x"
)
