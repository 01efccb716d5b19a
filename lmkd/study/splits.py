"""The study's data stages: each split normalised (columns, label ids, the budget's row limit) and
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


def prepare_split(opts: StudyOptions, split: str, out: str, labels: list[str] | None = None) -> None:
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
            raise LmkdError(f"{path} has no column {col!r} (it has: {', '.join(rows[0])}); name the right "
                            f"one with {flag}")
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
                raise LmkdError(f"{path} has only one label ({labels[0]!r}); classification needs two or more")
            info["labels"] = labels
        ids = {v: i for i, v in enumerate(labels)}
        unknown = sorted({str(r[tgt]) for r in rows} - set(ids))
        if unknown:
            raise LmkdError(f"{path} has label {unknown[0]!r} that the training data never has; every label "
                            "needs training examples")
        rows = [{"text": str(r[src]), "label": ids[str(r[tgt])]} for r in rows]
    else:
        rows = [{"source": str(r[src]), "target": str(r[tgt])} for r in rows]
        if split == "validation":
            # every student's validation loss is measured against the gold references, whichever
            # column (gold, teacher, inter) it trains on
            rows = [{**r, "teacher": r["target"], "inter": r["target"]} for r in rows]
    write_jsonl(os.path.join(out, f"{split}.jsonl"), rows)
    atomic_write_json(os.path.join(out, "info.json"), info)


def select_transfer_rows(train_file: str, n: int | None, seed: int, out: str) -> None:
    """The transfer set: the training rows (a seeded random sample of ``n``) every student learns
    from -- with the gold targets (baseline, Word-KD) or the teacher's outputs (Seq-KD).

    Args:
        train_file: the training rows.
        n: how many (None: all).
        seed: the sample's seed.
        out: the stage's directory.
    """
    rows = read_rows(train_file)
    if n is not None and len(rows) > n:
        rows = random.Random(seed).sample(rows, n)
    write_jsonl(os.path.join(out, "transfer.jsonl"), rows)
