"""The seq2seq study's transfer set: the teacher's beam n-best on the transfer rows, the Seq-Inter
choice, the source-only rows of --unlabelled, and the memorisation figures (how far the teacher's
outputs on its transfer rows are the gold targets again).
"""

from __future__ import annotations

import os
import shutil

from lmkd.core.io import atomic_write_json, read_rows, write_jsonl
from lmkd.study.splits import LABELLED, TEACHER_ROW

#: the transfer stage's record of how far the teacher's outputs on its transfer rows are the gold targets
MEMORISATION = "memorisation.json"


def _generate(
    teacher_dir: str, data_file: str, gen_dir: str, beams: int, max_new_tokens: int, max_length: int
) -> tuple[list[dict], dict]:
    """The teacher's beam n-best on ``data_file`` (rows in input order) and the generation's report;
    ``gen_dir`` is removed after."""
    from lmkd.teacher.pseudo_target_files import JSONL_FILE
    from lmkd.teacher.pseudo_targets import generate_pseudo_targets

    report = generate_pseudo_targets(
        teacher_dir,
        data=data_file,
        output_dir=gen_dir,
        source_column="source",
        num_beams=beams,
        num_return_sequences=beams,
        max_new_tokens=max_new_tokens,
        max_source_length=max_length,
        batch_size=64,
        output_format="jsonl",
    )
    rows = read_rows(os.path.join(gen_dir, JSONL_FILE))
    shutil.rmtree(gen_dir)
    return rows, report


def make_transfer_set(
    teacher_dir: str,
    data_file: str,
    out: str,
    beams: int,
    max_new_tokens: int,
    max_length: int,
    task: str = "translation",
    unlabelled_file: str | None = None,
) -> str:
    """The teacher's beam-search n-best on ``data_file``
    (:func:`lmkd.teacher.pseudo_targets.generate_pseudo_targets`) plus the Seq-Inter choice
    (:func:`lmkd.teacher.selection.seq_inter_select`); returns the JSONL path with columns source,
    target (gold), teacher (best beam), inter (closest to the gold of the n-best), and the
    columns of ``data_file`` past those (``teacher_row`` with --teacher-split).  With ``unlabelled_file``
    (``--unlabelled``) its rows follow, ``labelled`` false, their target, teacher and inter all the teacher's
    best beam (no gold to pick by); the labelled rows then say ``labelled`` true.  Also writes
    :data:`MEMORISATION` (:func:`memorisation`, on the labelled rows) and ``generate_report.json``.

    Args:
        teacher_dir: the teacher.
        data_file: the transfer rows.
        out: the stage's directory.
        beams: the beam size (and the n-best size).
        max_new_tokens: the longest generation.
        max_length: inputs are cut at this many tokens.
        task: the study task (the memorisation figures' metric).
        unlabelled_file: the source-only rows (the data-unlabelled stage's file), or None.

    Returns:
        The path of ``transfer.jsonl``.
    """
    from lmkd.teacher.selection import seq_inter_select

    gen = (beams, max_new_tokens, max_length)
    rows, report = _generate(teacher_dir, data_file, os.path.join(out, "generate"), *gen)
    if beams > 1:
        chosen, changed = seq_inter_select(
            [r["teacher_nbest"] for r in rows], [r["target"] for r in rows]
        )
    else:
        chosen, changed = [0] * len(rows), 0
    extra = [k for k in read_rows(data_file)[0] if k not in ("source", "target")]
    out_rows = [
        {
            "source": r["source"],
            "target": r["target"],
            "teacher": r["teacher_target"],
            "inter": r["teacher_nbest"][c] if beams > 1 else r["teacher_target"],
            **{k: r[k] for k in extra},
        }
        for r, c in zip(rows, chosen)
    ]
    if unlabelled_file is not None:
        plain, _ = _generate(
            teacher_dir, unlabelled_file, os.path.join(out, "generate-unlabelled"), *gen
        )
        out_rows = [{**r, LABELLED: True} for r in out_rows]
        out_rows += [
            {
                "source": r["source"],
                "target": r["teacher_target"],
                "teacher": r["teacher_target"],
                "inter": r["teacher_target"],
                LABELLED: False,
            }
            for r in plain
        ]
    path = os.path.join(out, "transfer.jsonl")
    write_jsonl(path, out_rows)
    atomic_write_json(
        os.path.join(out, "generate_report.json"),
        {**{k: v for k, v in report.items() if k != "output"}, "seq_inter_changed": changed},
    )
    atomic_write_json(os.path.join(out, MEMORISATION), memorisation(out_rows, task))
    return path


def _agreement(rows: list[dict], task: str) -> dict:
    """The teacher's best beam against the gold target on ``rows``: the check metric, the identical share."""
    from lmkd.study.checks import CHECK_METRIC, task_score

    same = sum(str(r["teacher"]).strip() == str(r["target"]).strip() for r in rows)
    return {
        "rows": len(rows),
        "metric": CHECK_METRIC[task],
        "score": (
            task_score(task, [r["teacher"] for r in rows], [r["target"] for r in rows])
            if rows
            else None
        ),
        "identical": same / len(rows) if rows else None,
    }


def memorisation(rows: list[dict], task: str) -> dict:
    """How far the teacher's outputs on its transfer rows are the gold targets again: on the labelled
    rows, its best beam scored against the gold (BLEU / ROUGE-2, the teacher check's metric) and the
    share identical to it after stripping whitespace; with --teacher-split the same on the rows the
    teacher trained on and on the held-out ones.

    Args:
        rows: the transfer set's rows (``target``, ``teacher``; ``labelled``, ``teacher_row`` when present).
        task: the study task.

    Returns:
        ``{"all": figures, "teacher_rows"?: figures, "held_out_rows"?: figures, "unlabelled_rows": n}``,
        figures being ``{"rows", "metric", "score", "identical"}``.
    """
    gold = [r for r in rows if r.get(LABELLED, True)]
    out = {"all": _agreement(gold, task), "unlabelled_rows": len(rows) - len(gold)}
    if any(TEACHER_ROW in r for r in gold):
        out["teacher_rows"] = _agreement([r for r in gold if r[TEACHER_ROW]], task)
        out["held_out_rows"] = _agreement([r for r in gold if not r[TEACHER_ROW]], task)
    return out


def read_memorisation(transfer_dir: str, task: str) -> dict:
    """The transfer stage's :data:`MEMORISATION`, or -- a stage made before it was written -- the same
    figures computed from its ``transfer.jsonl``.

    Args:
        transfer_dir: the transfer stage's directory.
        task: the study task.

    Returns:
        The figures (:func:`memorisation`).
    """
    import json

    path = os.path.join(transfer_dir, MEMORISATION)
    if os.path.isfile(path):
        with open(path) as f:
            return json.load(f)
    return memorisation(read_rows(os.path.join(transfer_dir, "transfer.jsonl")), task)
