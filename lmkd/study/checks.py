"""The teacher check: a study ranks students against their teacher only once the teacher has learned.

A from-scratch teacher can fail quietly -- on a corpus it had not seen, one emitted the same
sentence for every input and the report still called a student "391% of the teacher".  So after
the teacher is trained (or loaded) it must pass two tests on the validation split:

* **quality above a trivial floor**: its greedy output scores at least ``QUALITY_MARGIN`` points
  (BLEU for translation, ROUGE-2 for summarisation, accuracy for classification) above the best
  input-free or copying answer -- copying the source, or repeating the most frequent training
  target (classification: always the most frequent label);
* **it uses the source** (seq2seq): its cross-entropy on the gold targets rises by at least
  ``SOURCE_USE_MARGIN`` nats per token when the sources are shuffled among the rows.  A model that
  only learned the target language's statistics scores the same with any source.

:func:`check_teacher` returns the figures and the verdict; the study stops with
:class:`TeacherDidNotLearn` (one line, exit status 2, no report) when a teacher fails.
"""

from __future__ import annotations

import random
from collections import Counter

from lmkd.core.errors import LmkdError

#: how far (in metric points, 0-100) the teacher must be above the trivial floor
QUALITY_MARGIN = 1.0
#: how much (nats per target token) shuffling the sources must raise the teacher's cross-entropy
SOURCE_USE_MARGIN = 0.25
#: the metric each task's check scores, by name in lmkd.scoring.metrics
CHECK_METRIC = {"translation": "bleu", "summarization": "rouge2", "classification": "accuracy"}
_LABEL = {"bleu": "BLEU", "rouge2": "ROUGE-2", "accuracy": "accuracy"}


class TeacherDidNotLearn(LmkdError):
    """The teacher failed the check: the study stops before any student is compared with it."""


def task_score(task: str, hypotheses: list, references: list) -> float:
    """The check metric of ``task`` (:data:`CHECK_METRIC`: BLEU, ROUGE-2, accuracy) of ``hypotheses``.

    Args:
        task: the study task.
        hypotheses: the outputs (texts, or class ids).
        references: the gold targets, one per output.

    Returns:
        The score, 0-100.
    """
    return _score(task, hypotheses, references)


def _score(task: str, hypotheses: list, references: list) -> float:
    from lmkd.scoring import metrics

    if task == "translation":
        return metrics.bleu(hypotheses, references)[0]
    if task == "summarization":
        return metrics.rouge(hypotheses, references)["rouge2"]
    return metrics.accuracy(hypotheses, references)


def trivial_floors(task: str, train_rows: list[dict], rows: list[dict]) -> dict[str, float]:
    """The scores of the input-free or copying answers on ``rows`` (the study's normalised columns):
    ``{"copying the source": ..., "the most frequent target": ...}`` for seq2seq, ``{"most frequent
    label": ...}`` for classification -- the floor a model that learned the task must clear.

    Args:
        task: the study task.
        train_rows: the training rows (the most frequent target or label comes from them).
        rows: the rows scored.

    Returns:
        ``{answer: score}`` on the task's check metric.
    """
    if task == "classification":
        labels = [int(r["label"]) for r in rows]
        majority = Counter(int(r["label"]) for r in train_rows).most_common(1)[0][0]
        return {"most frequent label": _score(task, [majority] * len(rows), labels)}
    sources, targets = [r["source"] for r in rows], [r["target"] for r in rows]
    frequent = Counter(r["target"] for r in train_rows).most_common(1)[0][0]
    return {
        "copying the source": _score(task, sources, targets),
        "the most frequent target": _score(task, [frequent] * len(rows), targets),
    }


def _derangement(n: int, seed: int) -> list[int]:
    """A permutation of range(n) with no fixed point (n >= 2), drawn with ``seed``."""
    rng = random.Random(seed)
    order = list(range(n))
    while True:
        rng.shuffle(order)
        if all(i != j for i, j in enumerate(order)):
            return order


def target_cross_entropy(
    model,
    tokenizer,
    sources: list[str],
    targets: list[str],
    *,
    max_source_length: int,
    max_target_length: int,
    batch_size: int = 32,
) -> float:
    """Mean cross-entropy (nats per target token) of a seq2seq ``model`` on ``targets`` given ``sources``.

    Args:
        model: the seq2seq model.
        tokenizer: its tokenizer.
        sources: the inputs.
        targets: the targets, one per input.
        max_source_length: inputs are cut at this many tokens.
        max_target_length: targets are cut at this many tokens.
        batch_size: rows per forward pass.

    Returns:
        Nats per target token.
    """
    import torch

    from lmkd.core.constants import IGNORE_INDEX
    from lmkd.losses.token import cross_entropy

    model.eval()
    total, count = 0.0, 0
    device = next(model.parameters()).device
    with torch.inference_mode():
        for i in range(0, len(sources), batch_size):
            enc = tokenizer(
                sources[i : i + batch_size],
                max_length=max_source_length,
                truncation=True,
                padding=True,
                return_tensors="pt",
            ).to(device)
            labels = tokenizer(
                text_target=targets[i : i + batch_size],
                max_length=max_target_length,
                truncation=True,
                padding=True,
                return_tensors="pt",
            )["input_ids"].to(device)
            labels = labels.masked_fill(labels.eq(tokenizer.pad_token_id), IGNORE_INDEX)
            logits = model(**enc, labels=labels).logits
            total += float(cross_entropy(logits, labels))
            count += int(labels.ne(IGNORE_INDEX).sum())
    return total / max(count, 1)


def check_teacher(
    model_dir: str,
    task: str,
    train_rows: list[dict],
    validation_rows: list[dict],
    *,
    rows: int,
    max_new_tokens: int,
    max_source_length: int,
    max_target_length: int,
    seed: int,
) -> dict:
    """The teacher's check figures on (up to ``rows``) validation rows of the study's normalised
    splits (``source``/``target`` or ``text``/``label``) and the verdict ``passed`` with its reasons.

    Args:
        model_dir: the teacher.
        task: the study task.
        train_rows: the training rows (for the trivial floors).
        validation_rows: the validation rows (the first ``rows`` are scored).
        rows: how many validation rows to score.
        max_new_tokens: the longest generation.
        max_source_length: inputs are cut at this many tokens.
        max_target_length: targets are cut at this many tokens.
        seed: the seed of the shuffled sources.

    Returns:
        The figures (``score``, ``floors``, ``floor``, cross-entropies, ...), ``passed`` and ``reasons``.
    """
    from lmkd.models.generation import classify, generate_texts
    from lmkd.models.loading import load_model, load_tokenizer

    val = validation_rows[:rows]
    model, tok = load_model(model_dir), load_tokenizer(model_dir)
    metric = CHECK_METRIC[task]
    out: dict = {"metric": metric, "rows": len(val), "quality_margin": QUALITY_MARGIN}
    if task == "classification":
        texts, labels = [r["text"] for r in val], [int(r["label"]) for r in val]
        out["score"] = _score(
            task,
            classify(model, tok, texts, max_source_length=max_source_length, progress=False),
            labels,
        )
    else:
        sources, targets = [r["source"] for r in val], [r["target"] for r in val]
        hyps = generate_texts(
            model,
            tok,
            sources,
            num_beams=1,
            max_new_tokens=max_new_tokens,
            max_source_length=max_source_length,
            progress=False,
        )
        out["score"] = _score(task, hyps, targets)
        out["distinct_outputs"] = len(set(hyps)) / max(len(hyps), 1)
    out["floors"] = trivial_floors(task, train_rows, val)
    if task != "classification" and len(val) >= 2:
        shuffled = [sources[j] for j in _derangement(len(val), seed)]
        kw = dict(max_source_length=max_source_length, max_target_length=max_target_length)
        out["ce_real_sources"] = target_cross_entropy(model, tok, sources, targets, **kw)
        out["ce_shuffled_sources"] = target_cross_entropy(model, tok, shuffled, targets, **kw)
        out["source_use_margin"] = SOURCE_USE_MARGIN
    floor_name, floor = max(out["floors"].items(), key=lambda kv: kv[1])
    out["floor"], out["floor_name"] = floor, floor_name
    reasons = []
    if out["score"] < floor + QUALITY_MARGIN:
        reasons.append(
            f"{_LABEL[metric]} {out['score']:.1f} on validation is not {QUALITY_MARGIN:g} above "
            f"{floor:.1f} for {floor_name}"
        )
    if ignores_source(out):
        reasons.append(
            f"it ignores the source (cross-entropy {out['ce_real_sources']:.2f} with the real sources "
            f"vs {out['ce_shuffled_sources']:.2f} with shuffled ones)"
        )
    out["passed"], out["reasons"] = not reasons, reasons
    return out


def ignores_source(check: dict) -> bool:
    """Whether a seq2seq check's cross-entropy barely rises (less than its ``source_use_margin``) when
    the sources are shuffled among the rows: the model does not use them.  False without those figures.

    Args:
        check: a check's figures (:func:`check_teacher`).

    Returns:
        Whether the model ignores its source.
    """
    return "ce_real_sources" in check and check["ce_shuffled_sources"] - check[
        "ce_real_sources"
    ] < check.get("source_use_margin", SOURCE_USE_MARGIN)


def summary(check: dict) -> str:
    """One sentence for the report: the figures and the verdict.

    Args:
        check: a check's figures (:func:`check_teacher`).

    Returns:
        The sentence.
    """
    text = (
        f"{_LABEL[check['metric']]} {check['score']:.1f} on {check['rows']} validation rows "
        f"vs {check['floor']:.1f} for "
        f"{check['floor_name']}"
    )
    if "ce_real_sources" in check:
        text += (
            f"; cross-entropy {check['ce_real_sources']:.2f} with the real sources vs "
            f"{check['ce_shuffled_sources']:.2f} shuffled"
        )
    return text + (
        ": passed" if check["passed"] else ": FAILED (" + "; ".join(check["reasons"]) + ")"
    )
