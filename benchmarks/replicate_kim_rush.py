"""Kim & Rush (2016), Table 1, replicated as closely as this machine allows -- beside the paper's figures.

The paper (WMT'14 English->German, 4.5M pairs): a 4x1000 LSTM teacher and 2x500 / 2x300 LSTM students;
baseline, Word-KD, Seq-KD, Seq-KD + Word-KD and Seq-Inter (the paper's "Baseline + Seq-Inter"); BLEU of
greedy (K = 1) and beam (K = 5) decoding.  Here: ``lmkd study`` on the shipped English->French synopses
(16,973 pairs) with the quick budget -- a 6.6M pre-LN BART teacher and students at two sizes (fractions of
the teacher's parameters), every variant on the whole training set, stopped by the same validation-BLEU
rule -- and, with ``--teacher-split`` (default 0.5), a teacher that trained on half the rows only, so that
on the other half its outputs are real predictions, as the paper's large-data teacher's were (a small
teacher on its own training rows mostly returns the gold targets: ``memorisation.json``).

    python benchmarks/replicate_kim_rush.py --run --output runs/kim-rush      # runs the study (long), then prints
    python benchmarks/replicate_kim_rush.py --output runs/kim-rush            # prints from a finished study

Output: a markdown table per student size, ours beside the paper's, the orderings of both, the memorisation
figures of the transfer set; ``--save FILE`` writes it (benchmarks/results/).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

#: Kim & Rush (2016), "Sequence-Level Knowledge Distillation", EMNLP, Table 1 (WMT'14 En->De): BLEU with
#: greedy decoding (K = 1) and beam search (K = 5), transcribed from the paper.
PAPER = {
    "teacher": {"label": "Teacher 4x1000", "greedy": 17.7, "beam": 19.5},
    "large": {  # the 2x500 student
        "label": "Student 2x500",
        "baseline": (14.7, 17.6),
        "word-kd": (15.4, 17.7),
        "seq-kd": (18.9, 19.0),
        "seq-inter": (18.5, 18.7),  # "Baseline + Seq-Inter"
        "seq-kd+word-kd": (18.7, 18.9),
    },
    "small": {  # the 2x300 student
        "label": "Student 2x300",
        "baseline": (14.1, 16.9),
        "word-kd": (14.9, 17.6),
        "seq-kd": (18.1, 18.1),
        "seq-inter": (17.6, 17.9),
        "seq-kd+word-kd": (17.9, 18.8),
    },
}
VARIANTS = ("baseline", "word-kd", "seq-kd", "seq-kd+word-kd", "seq-inter")
NAMES = {
    "baseline": "Baseline",
    "word-kd": "Word-KD",
    "seq-kd": "Seq-KD",
    "seq-kd+word-kd": "Seq-KD + Word-KD",
    "seq-inter": "Seq-Inter",
}


def study_command(
    output: str, sizes: list[float], teacher_split: float | None, seeds: int
) -> list[str]:
    """The ``lmkd study`` command of the replication.

    Args:
        output: the study's directory.
        sizes: the two student sizes (fractions of the teacher's parameters), the larger first.
        teacher_split: the fraction of the rows the teacher trains on (None: all).
        seeds: seeds per variant.

    Returns:
        The argv.
    """
    cmd = [
        sys.executable,
        "-m",
        "lmkd",
        "study",
        "--task",
        "translation",
        "--budget",
        "quick",
        "--output",
        output,
        "--student-sizes",
        ",".join(str(s) for s in sizes),
        "--seeds",
        str(seeds),
        "--no-serve",
    ]
    return cmd + (["--teacher-split", str(teacher_split)] if teacher_split else [])


def table(report: dict, sizes: list[float]) -> str:
    """Ours beside the paper's, per student size, from a finished study's report.json.

    Args:
        report: the study's report.json.
        sizes: the student sizes, the larger first (matched to the paper's 2x500 and 2x300).

    Returns:
        Markdown.
    """
    rows = report["variants"] if "variants" in report else []
    by = {(g["size"], g["variant"]): g for g in rows}
    teacher = next(r for r in report["rows"] if r["variant"] == "teacher")
    q = teacher["quality"]
    lines = [
        "| model | ours: BLEU greedy | ours: BLEU beam | paper: BLEU K=1 | paper: BLEU K=5 |",
        "|---|---|---|---|---|",
        f"| teacher ({teacher['parameters'] / 1e6:.2f}M / paper 4x1000) | {q['greedy']['bleu']:.1f} | "
        f"{q['beam']['bleu']:.1f} | {PAPER['teacher']['greedy']} | {PAPER['teacher']['beam']} |",
    ]
    orderings = []
    for size, key in zip(sizes, ("large", "small")):
        ours = {}
        for v in VARIANTS:
            g = by.get((size, v))
            if g is None:
                continue
            cols = g["columns"]
            ours[v] = (cols["greedy.bleu"]["mean"], cols["beam.bleu"]["mean"])
            paper = PAPER[key][v]
            lines.append(
                f"| {NAMES[v]} ({size:g} of the teacher / paper {PAPER[key]['label']}) | {ours[v][0]:.1f} | "
                f"{ours[v][1]:.1f} | {paper[0]} | {paper[1]} |"
            )
        if not ours:  # (a study without this size)
            continue
        for mode, i in (("greedy", 0), ("beam", 1)):
            mine = " > ".join(NAMES[v] for v in sorted(ours, key=lambda v: -ours[v][i]))
            theirs = " > ".join(NAMES[v] for v in sorted(ours, key=lambda v: -PAPER[key][v][i]))
            orderings.append(f"- size {size:g}, {mode}: ours {mine}; paper {theirs}")
    return "\n".join(lines + ["", "Orderings:"] + orderings)


def main(argv: list[str] | None = None) -> None:
    """Run (``--run``) and print the replication.

    Args:
        argv: the command line (default: sys.argv).
    """
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--output", default="runs/kim-rush", help="the study's directory")
    p.add_argument("--run", action="store_true", help="run the study first (resumes a partial one)")
    p.add_argument(
        "--sizes", type=float, nargs=2, default=[0.25, 0.1], help="the two student sizes"
    )
    p.add_argument(
        "--teacher-split", type=float, default=0.5, help="0 trains the teacher on every row"
    )
    p.add_argument("--seeds", type=int, default=1)
    p.add_argument("--save", help="also write the table to this file")
    a = p.parse_args(argv)
    if a.run:
        subprocess.run(
            study_command(a.output, a.sizes, a.teacher_split or None, a.seeds), check=True
        )
    out = Path(a.output)
    report = json.loads((out / "report.json").read_text())
    text = table(report, a.sizes)
    memo = out / "stages" / "transfer" / "memorisation.json"
    if memo.exists():
        text += "\n\nMemorisation of the transfer set (the teacher's beam outputs against the gold):\n```\n"
        text += memo.read_text() + "\n```"
    print(text)
    if a.save:
        Path(a.save).write_text(text + "\n")


if __name__ == "__main__":
    main()
