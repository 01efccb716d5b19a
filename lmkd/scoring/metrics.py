"""Quality of a model's outputs -- through the real libraries, nothing reimplemented.

* BLEU and chrF: sacrebleu (``BLEU().corpus_score`` == ``sacrebleu.corpus_bleu``), with the
  signature string that makes a score reproducible;
* ROUGE-1/2/L/Lsum: rouge-score with the Porter stemmer, mean F-measure over examples;
  ROUGE-Lsum splits texts into sentences on newlines (added after sentence-final punctuation when
  a text has none, as the CNN/DM evaluations do);
* per sentence (:func:`sentence_scores`, the filters and Seq-Inter of ``lmkd generate``): sacrebleu's
  sentence BLEU and chrF, rouge-score's ROUGE-2 F1 (no stemmer);
* accuracy and macro-F1 from confusion counts (sklearn's definitions, zero_division=0);
* size lives with the models: :func:`lmkd.models.size.count_parameters` (distinct parameters) and
  :func:`lmkd.models.size.weights_bytes` (the weight files ``from_pretrained`` loads);
* speed lives in :mod:`lmkd.scoring.timing` (:func:`lmkd.scoring.timing.measure_speed`).

:func:`compute_metrics_for` scores a Trainer's evaluation with the same functions.  All quality
scores are on a 0-100 scale (accuracy and macro-F1 as percentages).  Running the
models whose outputs these score is :mod:`lmkd.models.generation`'s (``generate_texts``, ``classify``).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from lmkd.core.errors import LmkdError

# ---- text quality -------------------------------------------------------------------------------


def bleu(hypotheses: Sequence[str], references: Sequence[str]) -> tuple[float, str]:
    """Corpus BLEU (sacrebleu defaults: 13a tokenisation, exp smoothing) and its signature.

    Args:
        hypotheses: the outputs, one per row.
        references: one reference per row.

    Returns:
        ``(score, signature)``: BLEU on a 0-100 scale and sacrebleu's signature string.

    Raises:
        LmkdError: the two lists differ in length, or are empty.
    """
    from sacrebleu.metrics import BLEU

    _check_pairs(hypotheses, references)
    metric = BLEU()
    score = metric.corpus_score(list(hypotheses), [list(references)])
    return float(score.score), str(metric.get_signature())


def chrf(hypotheses: Sequence[str], references: Sequence[str]) -> tuple[float, str]:
    """Corpus chrF (sacrebleu defaults: character 6-grams, beta 2) and its signature.

    Args:
        hypotheses: the outputs, one per row.
        references: one reference per row.

    Returns:
        ``(score, signature)``: chrF on a 0-100 scale and sacrebleu's signature string.

    Raises:
        LmkdError: the two lists differ in length, or are empty.
    """
    from sacrebleu.metrics import CHRF

    _check_pairs(hypotheses, references)
    metric = CHRF()
    score = metric.corpus_score(list(hypotheses), [list(references)])
    return float(score.score), str(metric.get_signature())


ROUGE_TYPES = ("rouge1", "rouge2", "rougeL", "rougeLsum")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def split_sentences(text: str) -> str:
    """``text`` with one sentence per line, as ROUGE-Lsum expects.

    Args:
        text: a text; one that already has newlines is kept as it is (stripped); otherwise lines are
            broken after ``.``, ``!`` or ``?``.

    Returns:
        The text, one sentence per line.
    """
    text = text.strip()
    if "\n" in text:
        return text
    return "\n".join(s for s in _SENTENCE_END.split(text) if s)


def rouge(hypotheses: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """Mean ROUGE-1/2/L/Lsum F-measure x 100 (rouge-score, ``use_stemmer=True``).

    Args:
        hypotheses: the outputs, one per row (sentences split by :func:`split_sentences` for Lsum).
        references: one reference per row.

    Returns:
        ``{rouge type: mean F-measure x 100}`` for each of :data:`ROUGE_TYPES`.

    Raises:
        LmkdError: the two lists differ in length, or are empty.
    """
    from rouge_score import rouge_scorer

    _check_pairs(hypotheses, references)
    scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=True)
    totals = dict.fromkeys(ROUGE_TYPES, 0.0)
    for hyp, ref in zip(hypotheses, references):
        # score(target, prediction); Lsum reads the newlines, the others ignore them
        scores = scorer.score(split_sentences(ref), split_sentences(hyp))
        for k in ROUGE_TYPES:
            totals[k] += scores[k].fmeasure
    return {k: 100.0 * v / len(hypotheses) for k, v in totals.items()}


#: the sentence-level scores of :func:`sentence_scores`
SENTENCE_METRICS = ("bleu", "chrf", "rouge2")


def sentence_scores(
    hypotheses: Sequence[str], references: Sequence[str], metric: str = "bleu"
) -> list[float]:
    """Sentence-level ``bleu`` / ``chrf`` (sacrebleu) or ``rouge2`` F1 (rouge-score) of each
    hypothesis against its reference, all on a 0-100 scale.

    Args:
        hypotheses: the outputs, one per row.
        references: one reference per row.
        metric: one of :data:`SENTENCE_METRICS`.

    Returns:
        One score per row.

    Raises:
        LmkdError: the lists differ in length, or an unknown ``metric``.
    """
    if len(hypotheses) != len(references):
        raise LmkdError(
            f"{len(hypotheses)} hypotheses but {len(references)} references; give one reference per row"
        )
    if metric == "bleu":
        from sacrebleu import sentence_bleu

        return [sentence_bleu(h, [r]).score for h, r in zip(hypotheses, references)]
    if metric == "chrf":
        from sacrebleu import sentence_chrf

        return [sentence_chrf(h, [r]).score for h, r in zip(hypotheses, references)]
    if metric == "rouge2":
        from rouge_score import rouge_scorer

        scorer = rouge_scorer.RougeScorer(["rouge2"], use_stemmer=False)
        return [
            100.0 * scorer.score(r, h)["rouge2"].fmeasure for h, r in zip(hypotheses, references)
        ]
    raise LmkdError(
        f"unknown filter metric {metric!r}; choose one of {', '.join(SENTENCE_METRICS)}"
    )


def accuracy(predictions: Sequence, labels: Sequence) -> float:
    """Share of predictions equal to their label, in %.

    Args:
        predictions: the predicted labels.
        labels: the true labels, one per prediction.

    Returns:
        The accuracy, 0-100.

    Raises:
        LmkdError: the two lists differ in length, or are empty.
    """
    _check_pairs(predictions, labels)
    return 100.0 * sum(p == y for p, y in zip(predictions, labels)) / len(labels)


def macro_f1(predictions: Sequence, labels: Sequence) -> float:
    """Unweighted mean over classes (those in labels or predictions) of per-class F1, in %; a class
    never predicted correctly scores 0 (sklearn's ``f1_score(average='macro', zero_division=0)``).

    Args:
        predictions: the predicted labels.
        labels: the true labels, one per prediction.

    Returns:
        The macro-F1, 0-100.

    Raises:
        LmkdError: the two lists differ in length, or are empty.
    """
    _check_pairs(predictions, labels)
    classes = sorted(set(labels) | set(predictions), key=str)
    f1s = []
    for c in classes:
        tp = sum(p == c and y == c for p, y in zip(predictions, labels))
        fp = sum(p == c and y != c for p, y in zip(predictions, labels))
        fn = sum(p != c and y == c for p, y in zip(predictions, labels))
        f1s.append(2 * tp / (2 * tp + fp + fn) if tp else 0.0)
    return 100.0 * sum(f1s) / len(f1s)


def quality(
    task: str, predictions: list, references: list
) -> tuple[dict[str, float], dict[str, str]]:
    """The scores of ``predictions`` for ``task``: BLEU and chrF (translation), ROUGE (summarization),
    accuracy and macro-F1 (classification) -- what ``lmkd evaluate`` reports and what training reports
    with ``predict_with_generate`` (:func:`compute_metrics_for`).

    Args:
        task: ``translation``, ``summarization`` or ``classification``.
        predictions: the outputs (texts, or class ids), one per row.
        references: the references (texts, or label ids), one per row.

    Returns:
        ``(scores, signatures)``: the scores by metric name, and the sacrebleu signatures (BLEU,
        chrF) or a description of the ROUGE settings (none for classification).

    Raises:
        LmkdError: a task without a prediction metric, or predictions and references that differ in
            length or are empty.
    """
    if task == "translation":
        b, b_sig = bleu(predictions, references)
        c, c_sig = chrf(predictions, references)
        return {"bleu": b, "chrf": c}, {"bleu": b_sig, "chrf": c_sig}
    if task == "summarization":
        return rouge(predictions, references), {
            "rouge": "rouge-score, use_stemmer=True, mean F1, Lsum on newline-split sentences"
        }
    if task == "classification":
        return {
            "accuracy": accuracy(predictions, references),
            "macro_f1": macro_f1(predictions, references),
        }, {}
    raise LmkdError(f"no prediction metric for task {task!r}")


def compute_metrics_for(task: str, tokenizer, references: list | None = None):
    """The Trainer's ``compute_metrics`` for ``task``, scored by :func:`quality` -- the code of
    ``lmkd evaluate``.

    Translation/summarization decode the generated ids (``predict_with_generate``) as
    :func:`lmkd.models.generation.generate_texts` does and score them against ``references``;
    classification scores the argmax of the logits against the label ids.  The keys (``bleu``,
    ``chrf``, ``rouge2``, ``accuracy``, ``macro_f1``, ...) are logged with the ``eval_`` prefix and can
    be ``metric_for_best_model`` (e.g. ``eval_bleu``).

    Args:
        task: ``translation``, ``summarization`` or ``classification``.
        tokenizer: decodes the generated ids (negative ids are read as its pad id).
        references: the validation rows' target texts, in order (generation tasks).

    Returns:
        A function of the Trainer's ``EvalPrediction`` giving ``{metric: score}``; it raises
        :class:`LmkdError` when the number of generated outputs is not the number of ``references``.
    """
    import numpy as np  # (the Trainer's predictions are numpy arrays)

    def compute(pred) -> dict[str, float]:
        out = pred.predictions[0] if isinstance(pred.predictions, tuple) else pred.predictions
        if task == "classification":
            return quality(
                task, np.asarray(out).argmax(-1).tolist(), np.asarray(pred.label_ids).tolist()
            )[0]
        ids = np.where(np.asarray(out) < 0, tokenizer.pad_token_id, out)
        texts = [t.strip() for t in tokenizer.batch_decode(ids, skip_special_tokens=True)]
        if references is None or len(references) != len(texts):
            raise LmkdError(
                f"{len(texts)} generated outputs for {len(references or [])} validation references"
            )
        return quality(task, texts, [str(r) for r in references])[0]

    return compute


def _check_pairs(hypotheses, references) -> None:
    if len(hypotheses) != len(references):
        raise LmkdError(
            f"{len(hypotheses)} predictions but {len(references)} references; score the same rows"
        )
    if not len(references):
        raise LmkdError("nothing to score: no examples")
