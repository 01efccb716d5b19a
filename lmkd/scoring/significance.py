"""Paired bootstrap resampling: is model A better than model B on the same test rows, and by how much?

Both models' outputs on the same ``n`` rows are resampled together: ``n_samples`` times, ``n`` row
indices are drawn with replacement (one index matrix, shared by every metric and both models, so
the comparison is paired), each model's score is recomputed on the drawn rows, and

* ``difference`` = score(A) - score(B) on the real test set;
* ``ci_low`` .. ``ci_high``: the 95% interval of the resampled differences (the 2.5th and 97.5th
  percentile by sacrebleu's index rule: the ``n_samples // 40``-th value from each end, sorted);
* ``p_value``: sacrebleu's two-sided p-value -- the share of resampled |differences|, centred on
  their mean, that exceed the real |difference|, with the +1 correction ``(c + 1) / (n_samples + 1)``
  (1.0 when the two models score alike on every resample, e.g. the same outputs, where sacrebleu's
  formula would give its smallest value);
* ``mean_a`` / ``ci_a`` (and ``_b``): each model's bootstrap mean and CI half-width (sacrebleu's
  ``Result.mean`` / ``Result.ci``).

BLEU and chrF are exactly sacrebleu's paired bootstrap test (``sacrebleu.significance.PairedTest``
with ``test_type="bs"``, the Moses ``bootstrap-hypothesis-difference-significance.pl``): the same
sufficient statistics per sentence (float32), the same index draw
(``numpy.random.default_rng(seed).choice(n, (n_samples, n))``, sacrebleu's default seed 12345) and
the same score from the summed statistics -- so ``p_value``, ``mean_a`` and ``ci_a`` equal the
``Result`` that PairedTest returns for A against the baseline B.  ROUGE-1/2/L/Lsum, accuracy and
macro-F1 use the same draw over per-row statistics re-aggregated per sample: ROUGE F-measures
(the corpus score is their mean, as :func:`lmkd.scoring.metrics.rouge`), correct-or-not (accuracy), and
per-class true/false positive and false negative counts (macro-F1 over the classes that occur in
the sample's labels or predictions, as :func:`lmkd.scoring.metrics.macro_f1` on those rows).

Everything is deterministic for a given ``seed``.  No models here: only outputs and references.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import numpy as np

from lmkd.core.errors import LmkdError
from lmkd.scoring.metrics import ROUGE_TYPES, split_sentences

#: sacrebleu's default seed (``SACREBLEU_SEED``) and resample count for the paired bootstrap
DEFAULT_SEED = 12345
DEFAULT_SAMPLES = 1000
#: the metrics :func:`paired_bootstrap` knows (the keys of :func:`lmkd.evaluate.run.quality`'s scores)
METRICS = ("bleu", "chrf", *ROUGE_TYPES, "accuracy", "macro_f1")
SACREBLEU_METRICS = ("bleu", "chrf")


@dataclass(frozen=True)
class Comparison:
    """Model A against model B on one metric (0-100 scale, like :mod:`lmkd.scoring.metrics`).

    Args:
        metric: the metric (one of :data:`METRICS`).
        score_a: A's score on the real test set.
        score_b: B's score on the real test set.
        difference: ``score_a - score_b``.
        ci_low: the low end of the 95% CI of the difference.
        ci_high: its high end.
        p_value: the two-sided p-value (see the module docstring).
        mean_a: A's bootstrap mean (sacrebleu's ``Result.mean``).
        ci_a: the half-width of A's 95% interval (sacrebleu's ``Result.ci``).
        mean_b: B's bootstrap mean.
        ci_b: the half-width of B's 95% interval.
        n_samples: the resamples drawn.
        seed: the seed of the draw.
        rows: the test rows.
        method: what was resampled, in words (with the sacrebleu signature for BLEU/chrF).
    """

    metric: str
    score_a: float
    score_b: float
    difference: float  # score_a - score_b
    ci_low: float  # 95% CI of the difference
    ci_high: float
    p_value: float
    mean_a: float  # bootstrap mean and CI half-width of each model's score (sacrebleu's Result.mean / .ci)
    ci_a: float
    mean_b: float
    ci_b: float
    n_samples: int
    seed: int
    rows: int
    method: str  # what was resampled, in words (with the sacrebleu signature for BLEU/chrF)

    def as_dict(self) -> dict:
        """The comparison as a plain dict (for JSON).

        Returns:
            The fields by name.
        """
        return asdict(self)


def _sacrebleu_metric(name: str):
    from sacrebleu.metrics import BLEU, CHRF

    return BLEU() if name == "bleu" else CHRF()


def _row_stats(
    metric: str, hyps: Sequence, refs: Sequence
) -> tuple[np.ndarray, Callable[[np.ndarray], float]]:
    """(per-row statistics ``(n, k)``, score of a vector of summed statistics) for ``metric``."""
    n = len(refs)
    if metric in SACREBLEU_METRICS:
        m = _sacrebleu_metric(metric)
        # sacrebleu's own path (PairedTest uses these very calls): sentence statistics as float32
        raw = m._extract_corpus_statistics([str(h) for h in hyps], [[str(r) for r in refs]])
        stats = np.array(raw, dtype="float32")

        def score(s: np.ndarray):
            # kept as sacrebleu returns it (chrF: a float32), so the arrays below are sacrebleu's arrays
            return m._compute_score_from_stats(s).score

        score.metric = m
        # the real test set's score as sacrebleu gives it (from the integer statistics, not float32)
        score.real = float(m._aggregate_and_compute(raw).score)
        return stats, score
    if metric in ROUGE_TYPES:
        from rouge_score import rouge_scorer

        scorer = rouge_scorer.RougeScorer([metric], use_stemmer=True)
        f = [
            scorer.score(split_sentences(str(r)), split_sentences(str(h)))[metric].fmeasure
            for h, r in zip(hyps, refs)
        ]
        return np.array(f, dtype="float64")[:, None], lambda s: 100.0 * float(s[0]) / n
    if metric == "accuracy":
        return (
            np.array([[float(h == r)] for h, r in zip(hyps, refs)], dtype="float64"),
            lambda s: 100.0 * float(s[0]) / n,
        )
    if metric == "macro_f1":
        classes = sorted(set(refs) | set(hyps), key=str)
        c = len(classes)
        pos = {k: i for i, k in enumerate(classes)}
        stats = np.zeros((n, 3 * c), dtype="float64")  # [tp per class, fp per class, fn per class]
        for i, (h, r) in enumerate(zip(hyps, refs)):
            if h == r:
                stats[i, pos[h]] = 1
            else:
                stats[i, c + pos[h]] = 1
                stats[i, 2 * c + pos[r]] = 1

        def macro(s: np.ndarray) -> float:
            tp, fp, fn = s[:c], s[c : 2 * c], s[2 * c :]
            present = (tp + fp + fn) > 0  # the classes in this sample's labels or predictions
            f1 = np.where(tp > 0, 2 * tp / np.maximum(2 * tp + fp + fn, 1), 0.0)
            return 100.0 * float(f1[present].sum()) / int(present.sum())

        return stats, macro
    raise LmkdError(
        f"no paired bootstrap for metric {metric!r}; choose one of {', '.join(METRICS)}"
    )


def _method(metric: str, n_samples: int, seed: int, score_of) -> str:
    if metric in SACREBLEU_METRICS:
        sig = (
            score_of.metric.get_signature()
        )  # the metric that scored (it knows the number of references)
        sig.update("seed", str(seed))
        sig.update("bs", n_samples)
        return f"sacrebleu paired bootstrap ({sig})"
    per_row = {"accuracy": "correct-or-not per row", "macro_f1": "per-class TP/FP/FN per row"}.get(
        metric, f"{metric} F-measure per row (rouge-score, stemmed)"
    )
    return f"paired bootstrap over test rows, {n_samples} resamples, seed {seed}: {per_row}, re-aggregated per sample"


def resample_indices(
    n: int, n_samples: int = DEFAULT_SAMPLES, seed: int = DEFAULT_SEED
) -> np.ndarray:
    """The row indices every comparison draws (sacrebleu's draw for that seed).

    Args:
        n: the test rows.
        n_samples: the resamples.
        seed: the seed of ``numpy.random.default_rng``.

    Returns:
        ``(n_samples, n)`` row indices, drawn with replacement.
    """
    return np.random.default_rng(seed).choice(n, size=(n_samples, n), replace=True)


def _ci(scores: np.ndarray) -> tuple[float, float]:
    """sacrebleu's ``estimate_ci``: (mean, half-width of the 95% interval)."""
    s = np.sort(scores)
    lo = len(s) // 40
    return float(s.mean()), float(0.5 * (s[len(s) - lo - 1] - s[lo]))


def paired_bootstrap(
    metric: str,
    hyps_a: Sequence,
    hyps_b: Sequence,
    references: Sequence,
    *,
    n_samples: int = DEFAULT_SAMPLES,
    seed: int = DEFAULT_SEED,
) -> Comparison:
    """Model A (``hyps_a``) against model B (``hyps_b``) on ``metric`` over the same ``references``:
    see the module docstring.

    Args:
        metric: one of :data:`METRICS`.
        hyps_a: A's outputs (texts, or class ids for accuracy/macro-F1), one per row.
        hyps_b: B's outputs on the same rows.
        references: the references of those rows (texts, or class ids).
        n_samples: the resamples.
        seed: the seed of the draw (:func:`resample_indices`).

    Returns:
        The :class:`Comparison`.

    Raises:
        LmkdError: no rows; outputs not one per reference; ``n_samples`` below 1; an unknown metric.
    """
    if not len(references):
        raise LmkdError("nothing to compare: no test rows")
    if len(hyps_a) != len(references) or len(hyps_b) != len(references):
        raise LmkdError(
            f"paired bootstrap needs outputs for the same rows: {len(hyps_a)} and {len(hyps_b)} "
            f"outputs for {len(references)} references"
        )
    if n_samples < 1:
        raise LmkdError("paired bootstrap needs at least one resample")
    # each model's own statistics and scorer (macro-F1: over the classes of its predictions and the labels)
    stats_a, score_of = _row_stats(metric, hyps_a, references)
    stats_b, score_of_b = _row_stats(metric, hyps_b, references)
    idxs = resample_indices(len(references), n_samples, seed)
    score_a = float(getattr(score_of, "real", None) or score_of(stats_a.sum(0)))
    score_b = float(getattr(score_of_b, "real", None) or score_of_b(stats_b.sum(0)))
    # one sample at a time (memory stays O(n)); the same sums as sacrebleu's stats[idxs][i].sum(0)
    sa = np.array([score_of(stats_a[i].sum(0)) for i in idxs])
    sb = np.array([score_of_b(stats_b[i].sum(0)) for i in idxs])
    diffs = sa - sb
    centred = np.abs(diffs) - np.abs(diffs).mean()
    if not np.any(diffs) and score_a == score_b:
        # outputs that score alike on every resample (the same outputs): no evidence of a difference.
        # sacrebleu's formula would give its smallest p-value, 1 / (n_samples + 1), here
        p = 1.0
    else:
        p = (int(np.sum(centred > abs(score_a - score_b))) + 1) / (n_samples + 1)
    d = np.sort(diffs)
    lo = n_samples // 40
    mean_a, ci_a = _ci(sa)
    mean_b, ci_b = _ci(sb)
    return Comparison(
        metric=metric,
        score_a=score_a,
        score_b=score_b,
        difference=score_a - score_b,
        ci_low=float(d[lo]),
        ci_high=float(d[n_samples - lo - 1]),
        p_value=float(p),
        mean_a=mean_a,
        ci_a=ci_a,
        mean_b=mean_b,
        ci_b=ci_b,
        n_samples=n_samples,
        seed=seed,
        rows=len(references),
        method=_method(metric, n_samples, seed, score_of),
    )
