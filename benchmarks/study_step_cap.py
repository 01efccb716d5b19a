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


def retrain(study: Path, variant: str, steps: int, seed: int, out: Path) -> dict:
    """One variant of ``study`` retrained with a cap of ``steps`` and scored on the study's test rows.

    Args:
        study: the finished study's directory (its ``stages`` and ``report.json``).
        variant: baseline, seq-kd or seq-inter (the variants that read no teacher logits).
        steps: the new cap.
        seed: the student's seed (the study's first is 42).
        out: where the student is written.

    Returns:
        ``steps`` (run), ``seconds``, ``greedy`` and ``beam`` BLEU.
    """
    from lmkd.study.models import evaluate_quality, train_student
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
    init = stages / ("s025-init" if seed == first else f"s025-init-seed{seed}")
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
        stopping=StoppingRule.from_plan(plan, report["task"]).options(),
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
    p.add_argument("--save", help="also write the table to this file")
    a = p.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(1)
    study = Path(a.study)
    report = json.loads((study / "report.json").read_text())
    at_cap = {
        r["variant"]: r for r in report["rows"] if r.get("seed") == a.seed and r["size"] == 0.25
    }
    lines = [
        f"Step cap {report['plan']['student_steps']} (the study) vs {a.steps} (here), seed {a.seed}, "
        f"{study.name}; BLEU on the study's {report['plan'].get('test_rows')} test rows",
        "",
        "| variant | steps (study) | BLEU greedy / beam (study) | steps (here) | BLEU greedy / beam (here) "
        "| minutes |",
        "|---|---|---|---|---|---|",
    ]
    for variant in a.variants:
        got = retrain(study, variant, a.steps, a.seed, study / "step-cap" / f"{variant}-{a.steps}")
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
