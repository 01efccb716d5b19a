"""The study's data stages: each split normalised (columns, label ids, the budget's row limit), the
teacher's share of the training rows (``--teacher-split``), the source-only rows (``--unlabelled``) and
the transfer set every seq2seq student learns from."""

from __future__ import annotations

import os
import random

from lmkd.core.errors import LmkdError
from lmkd.core.io import atomic_write_json, read_rows, write_jsonl
from lmkd.study.options import StudyOptions


def label_order(values) -> list[str]:
    """Label names in a stable order: integers numerically first, then the rest alphabetically.

    Args:
        values: the label names.

    Returns:
        The distinct names, in order.
    """

    def key(v):
        digit = v.strip().lstrip("-").isdigit()
        return (not digit, int(v) if digit else 0, v)

    return sorted(set(values), key=key)


def prepare_split(
    opts: StudyOptions, split: str, out: str, labels: list[str] | None = None
) -> None:
    """A normalised copy of one split: columns source/target (seq2seq) or text/label with label
    ids (classification; ``labels`` from the training split), row limit of the budget applied.

    Args:
        opts: the resolved options.
        split: train, validation or test.
        out: the stage's directory.
        labels: the training split's label names (classification).
    """
    src, tgt = opts.source_column, opts.target_column
    path = getattr(opts, split)
    rows = read_rows(path)
    for col in (src, tgt):
        if col not in rows[0]:
            flag = "--source-column" if col == src else "--target-column"
            raise LmkdError(
                f"{path} has no column {col!r} (it has: {', '.join(rows[0])}); name the right "
                f"one with {flag}"
            )
    rows = [r for r in rows if str(r[src]).strip() and str(r[tgt]).strip()]
    if not rows:
        raise LmkdError(f"{path} has no row with both {src!r} and {tgt!r} filled in")
    limit = getattr(opts.plan, f"{split}_rows")
    rows = rows[:limit] if limit is not None else rows
    info: dict = {"rows": len(rows)}
    if opts.task == "classification":
        if labels is None:
            labels = label_order(str(r[tgt]) for r in rows)
            if len(labels) < 2:
                raise LmkdError(
                    f"{path} has only one label ({labels[0]!r}); classification needs two or more"
                )
            info["labels"] = labels
        ids = {v: i for i, v in enumerate(labels)}
        unknown = sorted({str(r[tgt]) for r in rows} - set(ids))
        if unknown:
            raise LmkdError(
                f"{path} has label {unknown[0]!r} that the training data never has; every label "
                "needs training examples"
            )
        rows = [{"text": str(r[src]), "label": ids[str(r[tgt])]} for r in rows]
    else:
        rows = [{"source": str(r[src]), "target": str(r[tgt])} for r in rows]
        if split == "validation":
            # every student's validation loss is measured against the gold references, whichever
            # column (gold, teacher, inter) it trains on
            rows = [{**r, "teacher": r["target"], "inter": r["target"]} for r in rows]
    write_jsonl(os.path.join(out, f"{split}.jsonl"), rows)
    atomic_write_json(os.path.join(out, "info.json"), info)


#: the teacher-rows stage's files: the rows the teacher trains on, and the rest (--teacher-split)
TEACHER_ROWS, HELD_OUT_ROWS = "teacher.jsonl", "held_out.jsonl"
#: the column of a transfer row saying whether the teacher trained on it (only with --teacher-split)
TEACHER_ROW = "teacher_row"
#: the column of a transfer row saying whether it has a gold target (only with --unlabelled)
LABELLED = "labelled"


def row_key(row: dict) -> tuple[str, str]:
    """What makes two seq2seq rows the same row: their source and target texts.

    Args:
        row: a normalised row (``source``, ``target``).

    Returns:
        ``(source, target)``.
    """
    return str(row["source"]), str(row["target"])


def split_teacher_rows(train_file: str, fraction: float, seed: int, out: str) -> None:
    """``--teacher-split``: a seeded ``fraction`` of the distinct training rows (by content: a row that
    occurs twice goes to one side only) for the teacher (``teacher.jsonl``), the rest held out from it
    (``held_out.jsonl``); each side keeps at least one row.

    Args:
        train_file: the normalised training rows.
        fraction: the teacher's share, in (0, 1).
        seed: the draw's seed.
        out: the stage's directory.
    """
    rows = read_rows(train_file)
    keys = list(dict.fromkeys(row_key(r) for r in rows))
    if len(keys) < 2:
        raise LmkdError(
            f"--teacher-split needs two or more distinct training rows, {train_file} has "
            f"{len(keys)}"
        )
    k = min(len(keys) - 1, max(1, round(fraction * len(keys))))
    chosen = set(random.Random(seed).sample(keys, k))
    mine = [r for r in rows if row_key(r) in chosen]
    rest = [r for r in rows if row_key(r) not in chosen]
    write_jsonl(os.path.join(out, TEACHER_ROWS), mine)
    write_jsonl(os.path.join(out, HELD_OUT_ROWS), rest)
    atomic_write_json(
        os.path.join(out, "info.json"),
        {"fraction": fraction, "teacher_rows": len(mine), "held_out_rows": len(rest)},
    )


def prepare_unlabelled(path: str, source_column: str, out: str) -> None:
    """``--unlabelled``: the source-only rows as ``unlabelled.jsonl`` (one column, ``source``), read
    from the file's ``source`` column or else the study's source column; empty sources dropped.

    Args:
        path: the file (any format :func:`lmkd.core.io.read_rows` reads).
        source_column: the study's source column.
        out: the stage's directory.
    """
    rows = read_rows(path)
    if not rows:
        raise LmkdError(f"--unlabelled file {path} has no rows")
    col = "source" if "source" in rows[0] else source_column
    if col not in rows[0]:
        raise LmkdError(
            f"--unlabelled file {path} has no column 'source' or {source_column!r} (it has: "
            f"{', '.join(rows[0])}); give it the source texts in one of them"
        )
    rows = [{"source": str(r[col])} for r in rows if str(r.get(col) or "").strip()]
    if not rows:
        raise LmkdError(f"--unlabelled file {path} has no row with a {col!r} filled in")
    write_jsonl(os.path.join(out, "unlabelled.jsonl"), rows)
    atomic_write_json(os.path.join(out, "info.json"), {"rows": len(rows), "column": col})


def select_transfer_rows(
    train_file: str, n: int | None, seed: int, out: str, teacher_rows: str | None = None
) -> None:
    """The transfer set: the training rows (a seeded random sample of ``n``) every student learns
    from -- with the gold targets (baseline, Word-KD) or the teacher's outputs (Seq-KD).  With
    ``teacher_rows`` (``--teacher-split``) each row says whether the teacher trained on it
    (:data:`TEACHER_ROW`, by content).

    Args:
        train_file: the training rows.
        n: how many (None: all).
        seed: the sample's seed.
        out: the stage's directory.
        teacher_rows: the teacher's training rows (the teacher-rows stage's ``teacher.jsonl``), or None.
    """
    rows = read_rows(train_file)
    if n is not None and len(rows) > n:
        rows = random.Random(seed).sample(rows, n)
    if teacher_rows is not None:
        seen = {row_key(r) for r in read_rows(teacher_rows)}
        rows = [{**r, TEACHER_ROW: row_key(r) in seen} for r in rows]
    write_jsonl(os.path.join(out, "transfer.jsonl"), rows)
