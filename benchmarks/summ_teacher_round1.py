"""Does the study's from-scratch seq2seq teacher learn at its first round?  Trains round 1 of the
study's teacher exactly as ``lmkd study`` does (same data stages, tokenizer, length rule, init, steps and
training settings), with one setting changed at a time, and prints the teacher check of that round: the
validation score beside the best trivial answer and the cross-entropy of the gold targets with the real
sources beside shuffled ones (a collapsed model scores the same with both).

The measurement behind the summarisation recipe's first-round settings (issue 27, item 8): each run is
one teacher (1,500 steps of the quick budget, ~7 min on one core).  Round 1 here trains its fixed steps
(the study's teacher now stops on its validation plateau, never before half its cap: a collapse shows
long before).  Nothing here changes the study.

Example::

    OMP_NUM_THREADS=1 python benchmarks/summ_teacher_round1.py --lr 1e-3 --output runs/r1-lr1e-3
    OMP_NUM_THREADS=1 python benchmarks/summ_teacher_round1.py --rows 5000 --lr 3e-4 \\
        --max-grad-norm 1.0 --output runs/r1-5k
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class _RoundOneDone(Exception):
    """Raised after round 1's check, so the study stops there."""


def _subset(path: str, out: str, first: int, last: int | None) -> str:
    """Rows ``first .. last`` of ``path`` written to ``out`` (a derived corpus)."""
    from lmkd.core.io import read_rows, write_jsonl

    rows = read_rows(path)[first:last]
    write_jsonl(out, rows)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="example: python benchmarks/summ_teacher_round1.py --lr 3e-4 --output runs/r1",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--task", default="summarization", choices=("summarization", "translation"))
    p.add_argument("--train", help="training rows (default: the shipped corpus of the task)")
    p.add_argument("--validation")
    p.add_argument("--test")
    p.add_argument("--source-column")
    p.add_argument("--target-column")
    p.add_argument(
        "--rows", help="a derived corpus: training rows A:B of --train (e.g. 0:5000, 7000:)"
    )
    p.add_argument("--lr", type=float, help="round 1's learning rate (default: the budget's)")
    p.add_argument(
        "--max-grad-norm", type=float, default=None, help="gradient clipping (study: 0, none)"
    )
    p.add_argument("--warmup", type=int, help="warm-up steps (default: the budget's)")
    p.add_argument("--steps", type=int, help="the teacher's steps (default: the budget's)")
    p.add_argument(
        "--shape",
        help="train another shape in the teacher's place: d_model,layers,heads,ffn (e.g. 128,2,2,512, "
        "the quick budget's 0.25 student: does a baseline student learn at this rate?)",
    )
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--budget", default="quick", choices=("tiny", "quick"))
    p.add_argument("--output", required=True)
    args = p.parse_args(argv)

    from lmkd.study import budgets, models, teachers
    from lmkd.study.checks import summary
    from lmkd.study.options import StudyOptions, shipped_corpus
    from lmkd.study.run import run_study

    if args.lr is not None:  # over the budget and the task's change to it (TASK_BUDGETS)
        budgets.BUDGETS[args.budget]["teacher_lr"] = args.lr
        task_budget = budgets.TASK_BUDGETS.get(args.task, {}).get(args.budget)
        if task_budget is not None and "teacher_lr" in task_budget:
            task_budget["teacher_lr"] = args.lr
    if args.shape:
        d, layers, heads, ffn = (int(x) for x in args.shape.split(","))
        budgets.BUDGETS[args.budget]["teacher"] = dict(
            d_model=d, layers=layers, heads=heads, ffn=ffn
        )
    if args.warmup is not None:
        budgets.BUDGETS[args.budget]["warmup_steps"] = args.warmup
    settings = models.training_settings
    if args.max_grad_norm is not None:

        def clipped(*a, **k):
            return {**settings(*a, **k), "max_grad_norm": args.max_grad_norm}

        models.training_settings = clipped

    os.makedirs(args.output, exist_ok=True)
    files = {
        s: getattr(args, s) or shipped_corpus(s, args.task) for s in ("train", "validation", "test")
    }
    if args.rows:
        a, _, b = args.rows.partition(":")
        files["train"] = _subset(
            files["train"],
            os.path.join(args.output, "train.jsonl"),
            int(a or 0),
            int(b) if b else None,
        )
    result: dict = {}

    def round_one(out, init, opts, data, steps, lr):
        t0 = time.time()
        dest = os.path.join(out, "round-1")
        models.train_student(
            dest, init, opts.task, data["train"], data["validation"], opts.plan, steps=steps,
            lr=lr, seed=opts.seed,
        )  # fmt: skip
        check = teachers.run_check(opts, data, dest, opts.task)
        result.update(
            {
                "settings": {
                    "rows": args.rows or "all",
                    "shape": opts.plan.teacher,
                    "lr": lr,
                    "max_grad_norm": args.max_grad_norm or 0.0,
                    "warmup": opts.plan.warmup_steps,
                    "steps": steps,
                    "max_length": opts.plan.max_length,
                    "batch": opts.plan.batch_size,
                },
                "check": check,
                "collapsed": (not check["passed"]) and teachers.collapsed(check),
                "train_s": round(time.time() - t0, 1),
            }
        )
        raise _RoundOneDone

    teachers.train_checked = round_one
    opts = StudyOptions(
        task=args.task,
        budget=args.budget,
        output=os.path.join(args.output, "study"),
        seed=args.seed,
        teacher_steps=args.steps,
        source_column=args.source_column,
        target_column=args.target_column,
        **files,
    ).resolve()
    try:
        run_study(opts)
    except _RoundOneDone:
        pass
    check = result["check"]
    print(json.dumps(result["settings"]))
    print(
        f"round 1: {summary(check)}"
        + (" (collapsed)" if result["collapsed"] else "")
        + f"; {result['train_s']:.0f} s"
    )
    with open(os.path.join(args.output, "round1.json"), "w") as f:
        json.dump(result, f, indent=1, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
