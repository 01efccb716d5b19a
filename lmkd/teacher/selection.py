"""Seq-Inter selection and filtering of pseudo-targets (Kim & Rush 2016): pure functions on lists of
strings, usable on their own; ``lmkd generate`` applies them when it merges its chunks
(:func:`lmkd.teacher.pseudo_target_files.merge`).  The sentence scores are
:mod:`lmkd.scoring.metrics`'.
"""

from __future__ import annotations

from collections.abc import Sequence

from lmkd.core.errors import LmkdError
from lmkd.scoring.metrics import SENTENCE_METRICS, sentence_scores

FILTER_METRICS = SENTENCE_METRICS  # --filter-metric: the sentence scores of lmkd.scoring.metrics
SELECT_METHODS = ("seq-inter",)


def seq_inter_select(
    nbest: Sequence[Sequence[str]], references: Sequence[str]
) -> tuple[list[int], int]:
    """Seq-Inter (Kim & Rush): for each row, the index in its n-best list of the hypothesis with the
    highest sentence-BLEU against the reference (ties go to the teacher's higher-ranked one).

    Args:
        nbest: per row, the teacher's hypotheses, best first.
        references: per row, its reference.

    Returns:
        (chosen indices, number of rows whose choice is not the teacher's best).

    Raises:
        LmkdError: the two lengths differ, or an n-best list is empty.
    """
    if len(nbest) != len(references):
        raise LmkdError(
            f"{len(nbest)} n-best lists but {len(references)} references; give one reference per row"
        )
    chosen = []
    for hyps, ref in zip(nbest, references):
        if not hyps:
            raise LmkdError("an n-best list is empty; generate at least one hypothesis per row")
        scores = sentence_scores(list(hyps), [ref] * len(hyps), "bleu")
        chosen.append(max(range(len(hyps)), key=lambda i: (scores[i], -i)))
    return chosen, sum(1 for c in chosen if c != 0)


def filter_below(scores: Sequence[float], minimum: float) -> list[int]:
    """Indices of the rows to keep: those whose score is at least ``minimum``.

    Args:
        scores: per row, its score.
        minimum: the lowest score kept.

    Returns:
        The kept rows' indices, in order.
    """
    return [i for i, s in enumerate(scores) if s >= minimum]


def select_and_filter(
    rows: list[dict],
    select: str | None = None,
    reference_column: str | None = None,
    filter_metric: str | None = None,
    filter_min: float | None = None,
) -> tuple[list[dict], dict]:
    """Apply Seq-Inter and/or a filter to generated rows (dicts with ``teacher_target`` and, for
    Seq-Inter, ``teacher_nbest``/``teacher_nbest_scores``).

    Seq-Inter sets each row's ``teacher_target``, ``teacher_score`` and ``teacher_rank`` in place;
    the filter sets ``teacher_<metric>``.

    Args:
        rows: the generated rows.
        select: ``seq-inter``, or None.
        reference_column: the rows' reference column (needed by both).
        filter_metric: a sentence metric (:data:`FILTER_METRICS`) to filter on, or None.
        filter_min: the lowest score kept (0-100; goes with ``filter_metric``).

    Returns:
        (rows, report) where the report says how many rows came in, were changed and dropped,
        and went out.

    Raises:
        LmkdError: no ``reference_column`` (or the rows lack it), an unknown selection, Seq-Inter
            without n-best lists, or one of ``filter_metric`` / ``filter_min`` without the other.
    """
    report: dict = {"rows_in": len(rows)}
    if (select or filter_metric) and not reference_column:
        raise LmkdError(
            "--select/--filter-metric need the references: pass --reference-column (e.g. target)"
        )
    if rows and reference_column and reference_column not in rows[0]:
        raise LmkdError(
            f"the data has no reference column {reference_column!r} (it has: "
            f"{', '.join(k for k in rows[0] if not k.startswith('teacher_'))}); fix --reference-column"
        )
    if select is not None:
        if select not in SELECT_METHODS:
            raise LmkdError(f"unknown selection {select!r}; choose seq-inter")
        if rows and "teacher_nbest" not in rows[0]:
            raise LmkdError(
                "--select seq-inter needs an n-best list: pass --num-return-sequences K > 1 "
                "(with --num-beams >= K)"
            )
        chosen, changed = seq_inter_select(
            [r["teacher_nbest"] for r in rows], [str(r[reference_column]) for r in rows]
        )
        for r, c in zip(rows, chosen):
            r["teacher_target"] = r["teacher_nbest"][c]
            r["teacher_score"] = r["teacher_nbest_scores"][c]
            r["teacher_rank"] = c
        report["seq_inter_changed"] = changed
    if filter_metric is not None:
        if filter_min is None:
            raise LmkdError("--filter-metric needs --filter-min (the lowest score kept, 0-100)")
        scores = sentence_scores(
            [r["teacher_target"] for r in rows],
            [str(r[reference_column]) for r in rows],
            filter_metric,
        )
        for r, s in zip(rows, scores):
            r[f"teacher_{filter_metric}"] = s
        keep = filter_below(scores, filter_min)
        report["filter_dropped"] = len(rows) - len(keep)
        rows = [rows[i] for i in keep]
    elif filter_min is not None:
        raise LmkdError("--filter-min needs --filter-metric (bleu, chrf or rouge2)")
    report["rows_out"] = len(rows)
    return rows, report
