"""Does regularising the study's from-scratch teacher trade memorisation for quality?  Trains the study's
seq2seq teacher exactly as ``lmkd study`` does (same data stages, tokenizer, length rule, init, stopping rule
and caps) with one regularisation setting changed, then measures on the same rows what the study's
memorisation and quality figures measure: greedy BLEU and the share of outputs identical to the gold on
the first ``--train-check`` training rows (its memorisation), and greedy / beam BLEU on the test rows --
for the new teacher and, with ``--compare DIR``, for a teacher already trained (e.g. a study's
``stages/teacher``), on the same rows.

The measurement behind the quick budget's teacher dropout and label smoothing (issue 27, item 4).  Nothing
here changes the study.

Example::

    OMP_NUM_THREADS=1 python benchmarks/teacher_regularisation.py --dropout 0.1 \\
        --compare runs/demo/stages/teacher --output runs/reg-dropout0.1
    OMP_NUM_THREADS=1 python benchmarks/teacher_regularisation.py --label-smoothing 0.1 --output runs/reg-ls0.1
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import shutil
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class _TeacherDone(Exception):
    """Raised once the teacher is trained and checked, so the study stops there."""


def _scores(model_dir: str, rows: dict, plan) -> dict:
    """Greedy BLEU and identical share on the training rows, greedy and beam BLEU on the test rows."""
    import sacrebleu

    from lmkd.models.generation import generate_texts
    from lmkd.models.loading import load_model, load_tokenizer

    model, tok = load_model(model_dir).eval(), load_tokenizer(model_dir)
    out = {}
    for name, beams in (("train", 1), ("test", 1), ("test_beam", plan.beams)):
        rs = rows[name.split("_")[0]]
        hyps = generate_texts(
            model,
            tok,
            [r["source"] for r in rs],
            num_beams=beams,
            max_new_tokens=plan.max_new_tokens,
            max_source_length=plan.max_length,
            progress=False,
        )
        refs = [r["target"] for r in rs]
        out[name] = {
            "rows": len(rs),
            "bleu": round(sacrebleu.corpus_bleu(hyps, [refs]).score, 2),
            "identical": round(
                sum(h.strip() == t.strip() for h, t in zip(hyps, refs)) / len(rs), 4
            ),
        }
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="example: python benchmarks/teacher_regularisation.py --dropout 0.1 --output runs/reg",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--dropout", type=float, default=0.0, help="the teacher's dropout (study: 0)")
    p.add_argument(
        "--label-smoothing",
        type=float,
        default=0.0,
        help="the teacher's label_smoothing_factor (study: 0)",
    )
    p.add_argument("--source-column")
    p.add_argument("--target-column")
    p.add_argument(
        "--train-check", type=int, default=1000, help="training rows scored (the first N)"
    )
    p.add_argument("--compare", help="a trained teacher to score on the same rows")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--budget", default="quick", choices=("tiny", "quick"))
    p.add_argument(
        "--skip-teacher-check", action="store_true", help="(the tiny budget's teacher fails it)"
    )
    p.add_argument("--output", required=True)
    args = p.parse_args(argv)

    from lmkd.core.io import read_rows
    from lmkd.study import budgets, teachers
    from lmkd.study.options import StudyOptions, shipped_corpus
    from lmkd.study.run import run_study

    budgets.BUDGETS[args.budget]["dropout"] = args.dropout
    if args.label_smoothing:
        teachers.train_student = functools.partial(
            teachers.train_student, label_smoothing_factor=args.label_smoothing
        )
    trained = {}
    train_checked = teachers.train_checked

    def train_then_stop(out, init, opts, data, steps, lr):
        t0 = time.time()
        train_checked(out, init, opts, data, steps, lr)
        kept = os.path.join(args.output, "teacher")  # the stage's directory goes with the exception
        shutil.rmtree(kept, ignore_errors=True)
        shutil.copytree(out, kept, ignore=shutil.ignore_patterns("init"))
        trained.update(dir=kept, data=data, opts=opts, train_s=round(time.time() - t0, 1))
        raise _TeacherDone

    teachers.train_checked = train_then_stop
    opts = StudyOptions(
        task="translation",
        budget=args.budget,
        output=os.path.join(args.output, "study"),
        seed=args.seed,
        teacher_check=not args.skip_teacher_check,
        source_column=args.source_column,
        target_column=args.target_column,
        # other columns of the shipped corpus (a derived corpus, e.g. fr->en) name its files
        **{s: shipped_corpus(s, "translation") for s in ("train", "validation", "test")},
    ).resolve()
    try:
        run_study(opts)
    except _TeacherDone:
        pass
    data, plan = trained["data"], trained["opts"].plan
    rows = {
        "train": read_rows(data["train"])[: args.train_check],
        "test": read_rows(data["test"]),
    }
    with open(os.path.join(trained["dir"], "teacher_check.json")) as f:
        check = json.load(f)
    result = {
        "dropout": args.dropout,
        "label_smoothing": args.label_smoothing,
        "columns": [opts.source_column, opts.target_column],
        "train_s": trained["train_s"],
        "rounds": [
            {
                k: r.get(k)
                for k in ("round", "lr", "trained_steps", "stopped_early", "best_step", "score")
            }
            for r in check["rounds"]
        ],
        "teacher": _scores(trained["dir"], rows, plan),
    }
    if args.compare:
        result["compare"] = {"dir": args.compare, **_scores(args.compare, rows, plan)}
    print(json.dumps(result, indent=1))
    with open(os.path.join(args.output, "regularisation.json"), "w") as f:
        json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
