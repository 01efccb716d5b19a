"""`make bench`: the cost of distillation in one table, measured in one run (CPU).

Runs benchmarks/bench_memory.py (trainer-level first-step and steady-state peak memory and CPU time,
naive full-logits KL vs lmkd, fresh subprocesses) and benchmarks/bench_step.py (online KD step /
(student step + teacher forward), cached-KD step / fused-CE step), each in its own process, and
prints their figures side by side.  Everything runs on one thread; CPU time, not wall clock, is
compared (the cores may be shared).

    .venv/bin/python benchmarks/bench.py [--full]   # --full: the memory benchmark at B*T=2048, V=128k
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _run(script: str, *args: str) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "out.json")
        env = dict(
            os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false"
        )
        proc = subprocess.run(
            [sys.executable, str(HERE / script), *args, "--json", out],
            env=env,
            capture_output=True,
            text=True,
        )
        if proc.returncode != 0:
            raise SystemExit(f"{script} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
        with open(out) as f:
            return json.load(f)


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--full", action="store_true", help="memory benchmark at B*T = 2048, V = 128k (~7 GB naive)"
    )
    ns = ap.parse_args()
    mem = _run("bench_memory.py", *(["--full"] if ns.full else []))
    print("memory:", json.dumps(mem), flush=True)  # kept even if the step benchmark fails
    step = _run("bench_step.py", "--steps", "5")
    cpu = step["cpu_s"]
    rows = [
        (
            f"first-step peak memory, lmkd / naive (B*T={mem['b'] * mem['t']}, V={mem['v']})",
            mem["first"]["lmkd"]["peak_mb"] / mem["first"]["naive"]["peak_mb"],
            f"{mem['first']['lmkd']['peak_mb']:.0f} / {mem['first']['naive']['peak_mb']:.0f} MB",
            "<= 0.25",
        ),
        (
            "steady-state peak memory, lmkd / naive",
            mem["steady"]["lmkd"]["peak_mb"] / mem["steady"]["naive"]["peak_mb"],
            f"{mem['steady']['lmkd']['peak_mb']:.0f} / {mem['steady']['naive']['peak_mb']:.0f} MB",
            "<= 0.25",
        ),
        (
            "first-step CPU time, lmkd / naive",
            mem["first"]["lmkd"]["seconds"] / mem["first"]["naive"]["seconds"],
            f"{mem['first']['lmkd']['seconds']:.2f} / {mem['first']['naive']['seconds']:.2f} s",
            "<= 1.0",
        ),
        (
            "steady-state CPU time, lmkd / naive",
            mem["steady"]["lmkd"]["seconds"] / mem["steady"]["naive"]["seconds"],
            f"{mem['steady']['lmkd']['seconds']:.2f} / {mem['steady']['naive']['seconds']:.2f} s",
            "<= 1.0",
        ),
        (
            f"online KD step / (student step + teacher forward) (V={step['vocab']})",
            cpu["online"] / (cpu["plain"] + cpu["teacher_forward"]),
            f"{cpu['online'] * 1e3:.0f} / ({cpu['plain'] * 1e3:.0f} + {cpu['teacher_forward'] * 1e3:.0f}) ms",
            "<= 1.10",
        ),
        (
            f"cached-KD step (top-{step['k']} + {step['tail_samples']} samples, the default) / fused-CE step",
            cpu["cached_s"] / cpu["fused_ce"],
            f"{cpu['cached_s'] * 1e3:.0f} / {cpu['fused_ce'] * 1e3:.0f} ms",
            "-",
        ),
        (
            f"cached-KD step (top-{step['k']}, tail bucket) / fused-CE step",
            cpu["cached"] / cpu["fused_ce"],
            f"{cpu['cached'] * 1e3:.0f} / {cpu['fused_ce'] * 1e3:.0f} ms",
            "-",
        ),
        (
            "fused-CE step / HF's own CE step",
            cpu["fused_ce"] / cpu["plain"],
            f"{cpu['fused_ce'] * 1e3:.0f} / {cpu['plain'] * 1e3:.0f} ms",
            "-",
        ),
    ]
    print(f"{'measure':78} {'ratio':>7}  {'figures':28} goal")
    for name, ratio, figs, goal in rows:
        print(f"{name:78} {ratio:7.3f}  {figs:28} {goal}")
    print(
        f"bytes per cached token: {step['bytes_per_token_samples']:.0f} (top-{step['k']} + {step['tail_samples']} "
        f"samples), {step['bytes_per_token']:.0f} (tail bucket)"
    )


if __name__ == "__main__":
    main()
