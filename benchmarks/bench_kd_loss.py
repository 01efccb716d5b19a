"""KD loss forward+backward: peak memory and time of lmkd.losses.chunked against the plain loss.

Goals (issue 5): at N = 4096 positions and V = 32k / 128k, peak memory <= 25% of the naive loss's
and time <= 1.0x naive, with the same loss and gradients.

    .venv/bin/python benchmarks/bench_kd_loss.py            # V=32k at N=4096, V=128k at N=1024
    .venv/bin/python benchmarks/bench_kd_loss.py --full     # V=128k at N=4096 too (~25 GB for naive)

How memory is measured (CPU; torch.cuda is not available here): each variant runs in its own
subprocess; after the inputs are built (without temporaries) it reads the process's peak RSS
(``resource.getrusage(RUSAGE_SELF).ru_maxrss``), runs one timed fwd+bwd, and reads the peak
again.  The difference is the peak *extra* memory of the loss: everything the
forward keeps for backward, the temporaries, and the gradient it returns.  The inputs (student
and teacher logits, or hidden states and head) are the same for both and are not counted.  Large
tensors are mmap'ed by glibc malloc and returned on free, so RSS follows live memory; tracemalloc
would not see torch's allocations at all.  Time is the child's CPU time (``time.process_time``)
with torch on one thread: the cores here are shared with other jobs, so wall-clock swings.

Variants: ``naive`` = lmkd.losses.token_kd_loss on full logits (plus CE for the linear case);
``chunked`` = lmkd.losses.chunked.chunked_kd_loss on the same logits; ``naive+linear`` = student logits
from hidden states through the LM head, then the plain CE + KD; ``fused`` = lmkd.losses.fused's
fused_linear_distill_loss (CE + KD from the hidden states, logits never materialised).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

CHILD = "--child"


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def child(variant: str, n: int, v: int, h: int, loss: str) -> dict:
    import torch

    torch.set_num_threads(1)  # CPU time of one thread: the cores here are shared with other jobs
    from lmkd import losses
    from lmkd.losses.chunked import Head, chunked_kd_loss
    from lmkd.losses.fused import fused_linear_distill_loss

    torch.manual_seed(0)
    t = torch.randn(n, v).mul_(3)
    labels = torch.randint(0, v, (n,))
    if variant in ("naive", "chunked"):
        x = torch.randn(n, v).mul_(3).requires_grad_()
        params = [x]
    else:
        x = torch.randn(n, h).requires_grad_()
        w = torch.randn(v, h).mul_(h**-0.5).requires_grad_()
        params = [x, w]

    def run():
        for p in params:
            p.grad = None
        if variant == "naive":
            out = losses.token_kd_loss(x, t, loss=loss, temperature=2.0)
        elif variant == "chunked":
            out = chunked_kd_loss(x, t, loss=loss, temperature=2.0)
        elif variant == "naive+linear":
            z = torch.nn.functional.linear(x, w)
            out = 0.5 * losses.cross_entropy(z, labels) + 0.5 * losses.token_kd_loss(
                z, t, loss=loss, temperature=2.0
            )
        else:
            out = fused_linear_distill_loss(
                x, Head(w), t, labels, loss=loss, temperature=2.0, ce_weight=0.5, kd_weight=0.5
            )[0]
        out.backward()
        return out.detach()

    base = _peak_mb()
    start = time.process_time()  # one run, no warm-up (each run is seconds long)
    value = run()
    seconds = time.process_time() - start
    peak = _peak_mb() - base
    grads = [p.grad for p in params]
    # a fingerprint of the gradients so the parent can compare variants
    g = torch.Generator().manual_seed(1)
    probe = [
        float((gr.double() * torch.randn(gr.shape, generator=g, dtype=torch.float64)).sum())
        for gr in grads
    ]
    return {
        "variant": variant,
        "seconds": seconds,
        "peak_mb": peak,
        "loss": float(value),
        "grad_probe": probe,
    }


def measure(variant, n, v, h, loss):
    out = subprocess.run(
        [sys.executable, __file__, CHILD, variant, str(n), str(v), str(h), loss],
        capture_output=True,
        text=True,
    )
    if out.returncode != 0:
        raise SystemExit(f"{variant} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--full", action="store_true", help="V=128k at N=4096 as well (needs ~25 GB for naive)"
    )
    ap.add_argument("--loss", default="forward_kl")
    ap.add_argument("--hidden", type=int, default=256, help="hidden size of the fused-linear case")
    ns = ap.parse_args()
    cases = [(4096, 32000), (4096 if ns.full else 1024, 128000)]
    print(
        f"KD loss ({ns.loss}, tau=2) forward+backward, fp32 on CPU, 1 thread, CPU seconds; peak extra RSS"
    )
    print(
        f"{'N':>5} {'V':>7} {'case':<14} {'naive MB':>9} {'lean MB':>8} {'mem ratio':>9} "
        f"{'naive s':>8} {'lean s':>7} {'time ratio':>10} {'|dloss|':>8} {'|dgrad|':>8}"
    )
    for n, v in cases:
        for naive, lean, label in (
            ("naive", "chunked", "logits"),
            ("naive+linear", "fused", "hidden+head"),
        ):
            a = measure(naive, n, v, ns.hidden, ns.loss)
            b = measure(lean, n, v, ns.hidden, ns.loss)
            dloss = abs(a["loss"] - b["loss"]) / max(1.0, abs(a["loss"]))
            dgrad = max(
                abs(x - y) / max(1.0, abs(x)) for x, y in zip(a["grad_probe"], b["grad_probe"])
            )
            print(
                f"{n:>5} {v:>7} {label:<14} {a['peak_mb']:>9.0f} {b['peak_mb']:>8.0f} "
                f"{b['peak_mb'] / max(a['peak_mb'], 1):>9.3f} {a['seconds']:>8.2f} {b['seconds']:>7.2f} "
                f"{b['seconds'] / a['seconds']:>10.3f} {dloss:>8.1e} {dgrad:>8.1e}",
                flush=True,
            )
    if not ns.full:
        print(
            "(V=128k measured at N=1024, not 4096: the naive loss would need ~25 GB on this shared machine; "
            "--full runs N=4096)"
        )


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == CHILD:
        variant, n, v, h, loss = (
            sys.argv[2],
            int(sys.argv[3]),
            int(sys.argv[4]),
            int(sys.argv[5]),
            sys.argv[6],
        )
        print(json.dumps(child(variant, n, v, h, loss)))
    else:
        main()
