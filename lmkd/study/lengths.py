"""How long the study's inputs may be: sized from the data, not fixed.

The study tokenises the training split with its (trained or given) tokenizer and takes the
``PERCENTILE``-th percentile of the token lengths of inputs and targets, rounded up to a multiple
of 8 and capped by the budget's ``max_length`` (and by what a given teacher's position table
holds).  Every model the study builds gets a position table that holds that length and the
longest generation (``max_new_tokens`` + the start token); the choice and how many training rows
it truncates go into the report.
"""

from __future__ import annotations

import math

#: the share of training rows whose input and target fit untruncated
PERCENTILE = 99


def _percentile(values: list[int], q: float) -> int:
    ordered = sorted(values)
    k = max(0, math.ceil(q / 100 * len(ordered)) - 1)
    return ordered[k]


def size_lengths(
    tokenizer,
    rows: list[dict],
    columns: tuple[str, str | None],
    cap: int,
    max_new_tokens: int,
    limit: int | None = None,
) -> dict:
    """``{"max_length", "positions", "source_p99", "target_p99", "truncated_rows", "rows"}`` for the
    study's ``rows`` (normalised columns: ``source``/``target`` or ``text``/label).

    Args:
        tokenizer: the study's tokenizer.
        rows: the training rows.
        columns: the input column and the target column (None: no target, classification).
        cap: the budget's maximum length.
        max_new_tokens: the longest generation.
        limit: what a given teacher's position table holds, or None.

    Returns:
        The sizing record.
    """
    src, tgt = columns
    src_len = [len(ids) for ids in tokenizer([str(r[src]) for r in rows])["input_ids"]]
    lengths = {"source_p99": _percentile(src_len, PERCENTILE)}
    longest = list(src_len)
    if tgt is not None:
        tgt_len = [
            len(ids) for ids in tokenizer(text_target=[str(r[tgt]) for r in rows])["input_ids"]
        ]
        lengths["target_p99"] = _percentile(tgt_len, PERCENTILE)
        longest = [max(a, b) for a, b in zip(src_len, tgt_len)]
    want = max(lengths.values())
    max_length = min(cap, 8 * math.ceil(want / 8), limit or cap)
    positions = max(max_length, max_new_tokens + 2) if tgt is not None else max_length
    return {
        **lengths,
        "max_length": max_length,
        "positions": positions if limit is None else min(positions, limit),
        "cap": cap,
        "percentile": PERCENTILE,
        "rows": len(rows),
        "truncated_rows": sum(n > max_length for n in longest),
    }


def describe(sizing: dict) -> str:
    """One sentence for the report.

    Args:
        sizing: a :func:`size_lengths` record.

    Returns:
        The sentence.
    """
    text = (
        f"Inputs and targets up to {sizing['max_length']} tokens (the {sizing['percentile']}th percentile of the "
        f"training rows' lengths: inputs {sizing['source_p99']}"
    )
    if "target_p99" in sizing:
        text += f", targets {sizing['target_p99']}"
    text += f"; capped at {sizing['cap']}); {sizing['truncated_rows']} of {sizing['rows']} training rows truncated"
    return text + f"; position tables of {sizing['positions']}."
