"""Derive the shipped instruction corpus ``ddtp_fr_chat.{train,validation,test}.jsonl.gz`` (rows of
chat ``messages``) from the shipped summarisation corpus ``ddtp_fr_summ`` (French Debian package
description -> its one-line synopsis, from the Debian Description Translation Project).

Run from the repository root (it rewrites the three files; the output is the same every run)::

    python benchmarks/make_chat_corpus.py

Each ``ddtp_fr_summ`` row (of the first ``LIMITS[split]`` rows of its split, in the file's order)
becomes one conversation, drawn with ``random.Random(SEED)``:

* 3 in 4: the user gives the description and asks for the synopsis; the assistant answers it;
* 1 in 4: the other direction -- the user gives the synopsis and asks for a description; the
  assistant answers the description;
* half the rows start with a system turn (one of ``SYSTEMS``).

Standard library only, so the script runs without lmkd installed.
"""

from __future__ import annotations

import gzip
import json
import random
from pathlib import Path

HERE = Path(__file__).resolve().parents[1] / "lmkd" / "corpora"
#: the seed of every draw (direction, wording, system turn)
SEED = 20261207
#: rows kept per split: small enough to ship (about 1 MB gzipped in all)
LIMITS = {"train": 5000, "validation": 500, "test": 500}
#: the system turns, one drawn for half the rows
SYSTEMS = (
    "Tu es un assistant qui rédige les descriptions des paquets Debian.",
    "Tu aides les traducteurs du projet Debian. Réponds en français, sans commentaire.",
)
#: user requests for the synopsis of a description
TO_SYNOPSIS = (
    "Écris le résumé d'une ligne de ce paquet : {document}",
    "Voici la description d'un paquet Debian. Donne son résumé en une ligne.\n\n{document}",
)
#: user requests for the description of a synopsis
TO_DESCRIPTION = (
    "Rédige la description longue d'un paquet Debian dont le résumé est : {summary}",
    "Décris en quelques phrases le paquet « {summary} ».",
)


def conversation(row: dict, rng: random.Random) -> list[dict]:
    """One ``ddtp_fr_summ`` row as a conversation.

    Args:
        row: the row (``document``, ``summary``).
        rng: the draws' generator.

    Returns:
        The messages (an optional system turn, a user turn, an assistant turn).
    """
    messages = []
    if rng.random() < 0.5:
        messages.append({"role": "system", "content": rng.choice(SYSTEMS)})
    if rng.random() < 0.75:
        ask, answer = rng.choice(TO_SYNOPSIS).format(**row), row["summary"]
    else:
        ask, answer = rng.choice(TO_DESCRIPTION).format(**row), row["document"]
    messages += [{"role": "user", "content": ask}, {"role": "assistant", "content": answer}]
    return messages


def make(split: str, limit: int) -> int:
    """Write ``ddtp_fr_chat.<split>.jsonl.gz`` from ``ddtp_fr_summ.<split>.jsonl.gz``.

    Args:
        split: train, validation or test.
        limit: the most rows kept (the file's first ones).

    Returns:
        The rows written.
    """
    rng = random.Random(f"{SEED}:{split}")
    with gzip.open(HERE / f"ddtp_fr_summ.{split}.jsonl.gz", "rt", encoding="utf-8") as f:
        rows = [json.loads(line) for line, _ in zip(f, range(limit))]
    out = HERE / f"ddtp_fr_chat.{split}.jsonl.gz"
    # mtime=0: the same bytes every run
    with open(out, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as gz:
        for row in rows:
            line = json.dumps({"messages": conversation(row, rng)}, ensure_ascii=False)
            gz.write((line + "\n").encode("utf-8"))
    return len(rows)


if __name__ == "__main__":
    for split, limit in LIMITS.items():
        print(split, make(split, limit))
