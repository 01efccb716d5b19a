"""Does the step cap decide a seq2seq study's ordering?  Retrain chosen variants of a finished study with a
larger cap -- the same init, transfer set, learning rate, seed and stopping rule -- and score them on its
test rows beside the study's own figures.

Every student of the quick demo ran to the 1,500-step cap still improving (docs/results.md), so its
ordering (Seq-KD behind the baseline) is the ordering *at the budget*.  Kim & Rush's students trained to
convergence.  This measures whether more steps change the ordering before any budget is changed.

    python benchmarks/study_step_cap.py runs/demo --steps 4500 --variants baseline seq-kd

Output: a markdown table (steps run, BLEU greedy / beam at the study's cap and at the new one);
``--save FILE`` writes it (benchmarks/results/).  Each student trains on one thread, one after another.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path


def retrain(
    study: Path, variant: str, steps: int, seed: int, out: Path, size: str = "s025"
) -> dict:
    """One variant of ``study`` retrained with a cap of ``steps`` (and the stopping rule of this version)
    and scored on the study's test rows.

    Args:
        study: the finished study's directory (its ``stages`` and ``report.json``).
        variant: baseline, word-kd, seq-kd, seq-kd+word-kd or seq-inter (Word-KD from the study's
            logit cache).
        steps: the new cap.
        seed: the student's seed (the study's first is 42).
        out: where the student is written.
        size: the student's stage prefix (``s025``: 0.25 of the teacher).

    Returns:
        ``steps`` (run), ``seconds``, ``greedy`` and ``beam`` BLEU.
    """
    from lmkd.study.models import LOGIT_CACHE_DIR, evaluate_quality, train_student
    from lmkd.study.plan import plan_view
    from lmkd.study.seq2seq import VARIANT_TARGET
    from lmkd.study.stopping import TRAIN_LOG, StoppingRule

    report = json.loads((study / "report.json").read_text())
    plan = plan_view(report["plan"])
    stages = study / "stages"
    target = VARIANT_TARGET[variant]
    train_file = (
        stages / "transfer-rows" / "transfer.jsonl"
        if target == "target"
        else stages / "transfer" / "transfer.jsonl"
    )
    first = report["plan"].get("seed", 42)
    init = stages / (f"{size}-init" if seed == first else f"{size}-init-seed{seed}")
    word = {}
    if "word-kd" in variant:
        word = dict(
            kd_alpha=plan.kd_alpha,
            logit_cache=str(stages / f"kd-cache-{target}" / LOGIT_CACHE_DIR),
            eval_logit_cache=str(stages / "kd-cache-validation" / LOGIT_CACHE_DIR),
        )
    t0 = time.perf_counter()
    train_student(
        str(out),
        str(init),
        report["task"],
        str(train_file),
        str(stages / "data-validation" / "validation.jsonl"),
        report["plan"],
        steps=steps,
        lr=plan.student_lr,
        target_column=target,
        seed=seed,
        stopping=StoppingRule.from_plan({**report["plan"], "student_steps": steps}, report["task"]),
        **word,
    )
    seconds = time.perf_counter() - t0
    log = json.loads((out / TRAIN_LOG).read_text())
    q = evaluate_quality(
        str(out),
        report["task"],
        str(stages / "data-test" / "test.jsonl"),
        plan.beams,
        plan.max_new_tokens,
    )
    (out / "quality.json").write_text(
        json.dumps(q)
    )  # (with the predictions: a bootstrap can follow)
    return {
        "steps": log.get("steps"),
        "seconds": seconds,
        "greedy": q["greedy"]["bleu"],
        "beam": q["beam"]["bleu"],
    }


def main(argv: list[str] | None = None) -> None:
    """Retrain and print.

    Args:
        argv: the command line (default: sys.argv).
    """
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("study", help="a finished translation study's directory")
    p.add_argument("--steps", type=int, default=4500, help="the new cap")
    p.add_argument("--variants", nargs="+", default=["baseline", "seq-kd"])
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--size", default="0.25", help="the student size (a fraction of the teacher)")
    p.add_argument("--save", help="also write the table to this file")
    a = p.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(1)
    study = Path(a.study)
    report = json.loads((study / "report.json").read_text())
    at_cap = {
        r["variant"]: r
        for r in report["rows"]
        if r.get("seed") == a.seed and r["size"] == float(a.size)
    }
    from lmkd.study.plan import size_name

    prefix = size_name(float(a.size))
    lines = [
        f"Step cap {report['plan']['student_steps']} (the study) vs {a.steps} (here), seed {a.seed}, "
        f"{study.name}, size {a.size}; BLEU on the study's {report['plan'].get('test_rows')} test rows "
        "(this version's stopping rule: no stop before half the cap)",
        "",
        "| variant | steps (study) | BLEU greedy / beam (study) | steps (here) | BLEU greedy / beam (here) "
        "| minutes |",
        "|---|---|---|---|---|---|",
    ]
    for variant in a.variants:
        out = study / "step-cap" / f"{prefix}-{variant}-{a.steps}-seed{a.seed}"
        got = retrain(study, variant, a.steps, a.seed, out, prefix)
        row = at_cap.get(variant, {})
        q = row.get("quality", {})
        lines.append(
            f"| {variant} | {row.get('steps', '?')} | {q.get('greedy', {}).get('bleu', float('nan')):.1f} / "
            f"{q.get('beam', {}).get('bleu', float('nan')):.1f} | {got['steps']} | {got['greedy']:.1f} / "
            f"{got['beam']:.1f} | {got['seconds'] / 60:.1f} |"
        )
        print(lines[-1], flush=True)
    text = "\n".join(lines)
    print(text)
    if a.save:
        Path(a.save).write_text(text + "\n")


if __name__ == "__main__":
    main()
