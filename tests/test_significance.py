"""lmkd.scoring.significance: BLEU/chrF equal sacrebleu's own paired bootstrap (PairedTest) on the same outputs;
ROUGE, accuracy and macro-F1 equal a reference that rescoring every resample with lmkd.scoring.metrics gives."""

from __future__ import annotations

import random

import numpy as np
import pytest
from conftest import corpus_rows

from lmkd.core.errors import LmkdError
from lmkd.scoring import metrics
from lmkd.scoring.significance import paired_bootstrap, resample_indices


def _noisy(texts: list[str], drop: float, seed: int) -> list[str]:
    """Outputs of a pretend system: each reference with a share ``drop`` of its words removed."""
    rng = random.Random(seed)
    return [" ".join(w for w in t.split() if rng.random() > drop) or t.split()[0] for t in texts]


@pytest.fixture(scope="module")
def outputs():
    refs = [r["target"] for r in corpus_rows("test", 60)]
    return refs, _noisy(refs, 0.25, 1), _noisy(refs, 0.35, 2)


@pytest.mark.parametrize("name", ["bleu", "chrf"])
def test_equals_sacrebleu_paired_test(outputs, monkeypatch, name):
    from sacrebleu.metrics import BLEU, CHRF
    from sacrebleu.significance import PairedTest

    refs, good, bad = outputs
    monkeypatch.setenv("SACREBLEU_SEED", "777")
    metric = {"bleu": BLEU, "chrf": CHRF}[name]()
    _, scores = PairedTest(
        [("base", bad), ("sys", good)],
        {name: metric},
        references=[refs],
        test_type="bs",
        n_samples=200,
    )()
    (key,) = [k for k in scores if k != "System"]
    base, sys = scores[key]
    c = paired_bootstrap(name, good, bad, refs, n_samples=200, seed=777)
    assert c.p_value == sys.p_value
    assert (c.score_a, c.mean_a, c.ci_a) == (sys.score, sys.mean, sys.ci)
    assert (c.score_b, c.mean_b, c.ci_b) == (base.score, base.mean, base.ci)
    assert c.difference == sys.score - base.score
    assert c.score_a == getattr(metrics, name)(good, refs)[0]
    # the CI of the difference: the 2.5th / 97.5th percentile (sacrebleu's index rule) of the paired
    # resampled differences, recomputed here from sacrebleu's corpus_score on every resample (up to the
    # float32 of the statistics sacrebleu's resampling sums)
    if (
        name == "chrf"
    ):  # the slow rescoring once is enough (BLEU); chrF's p, means and CIs are checked above
        return
    idx = resample_indices(len(refs), 200, 777)
    diffs = sorted(
        metric.corpus_score([good[i] for i in row], [[refs[i] for i in row]]).score
        - metric.corpus_score([bad[i] for i in row], [[refs[i] for i in row]]).score
        for row in idx
    )
    assert c.ci_low == pytest.approx(diffs[200 // 40], abs=1e-5)
    assert c.ci_high == pytest.approx(diffs[200 - 200 // 40 - 1], abs=1e-5)
    assert (
        c.ci_low < c.difference < c.ci_high and c.p_value < 0.05
    )  # 25% vs 35% of the words dropped
    assert (
        c.method.startswith("sacrebleu paired bootstrap")
        and "seed:777" in c.method
        and "bs:200" in c.method
    )


def _reference(metric_fn, good, bad, refs, n, seed):
    """p-value and CI by rescoring every resample with ``metric_fn`` (lmkd.scoring.metrics) on the drawn rows."""
    idx = resample_indices(len(refs), n, seed)
    a = np.array([metric_fn([good[i] for i in row], [refs[i] for i in row]) for row in idx])
    b = np.array([metric_fn([bad[i] for i in row], [refs[i] for i in row]) for row in idx])
    return _reference_from(metric_fn(good, refs) - metric_fn(bad, refs), a, b)


def _reference_from(real: float, a: np.ndarray, b: np.ndarray):
    n = len(a)
    d = np.abs(a - b)
    p = (np.sum(d - d.mean() > abs(real)) + 1) / (n + 1)
    s = np.sort(a - b)
    return real, p, s[n // 40], s[n - n // 40 - 1]


def test_rouge_equals_rescoring_every_resample(outputs):
    refs, good, bad = outputs
    refs, good, bad = refs[:20], good[:20], bad[:20]
    n = 50
    idx = resample_indices(len(refs), n, 5)
    full_a, full_b = metrics.rouge(good, refs), metrics.rouge(bad, refs)
    res_a = [metrics.rouge([good[i] for i in row], [refs[i] for i in row]) for row in idx]
    res_b = [metrics.rouge([bad[i] for i in row], [refs[i] for i in row]) for row in idx]
    for name in ("rouge1", "rouge2", "rougeL"):
        real, p, lo, hi = _reference_from(
            full_a[name] - full_b[name],
            np.array([r[name] for r in res_a]),
            np.array([r[name] for r in res_b]),
        )
        c = paired_bootstrap(name, good, bad, refs, n_samples=n, seed=5)
        assert c.difference == pytest.approx(real, abs=1e-9)
        assert c.p_value == pytest.approx(p, abs=1e-12)
        assert (c.ci_low, c.ci_high) == (pytest.approx(lo, abs=1e-9), pytest.approx(hi, abs=1e-9))


@pytest.mark.parametrize("name", ["accuracy", "macro_f1"])
def test_classification_metrics_equal_rescoring_every_resample(name):
    rng = random.Random(3)
    labels = [rng.choice([0, 0, 0, 1, 1, 2, 3]) for _ in range(70)]  # imbalanced; class 3 is rare
    good = [y if rng.random() < 0.8 else rng.randrange(4) for y in labels]
    bad = [y if rng.random() < 0.6 else rng.randrange(4) for y in labels]
    n = 300
    real, p, lo, hi = _reference(getattr(metrics, name), good, bad, labels, n, 11)
    c = paired_bootstrap(name, good, bad, labels, n_samples=n, seed=11)
    assert c.difference == pytest.approx(real, abs=1e-9)
    assert c.p_value == pytest.approx(p, abs=1e-12)
    assert (c.ci_low, c.ci_high) == (pytest.approx(lo, abs=1e-9), pytest.approx(hi, abs=1e-9))
    assert c.score_a == pytest.approx(getattr(metrics, name)(good, labels), abs=1e-9)


def test_same_outputs_do_not_differ_and_seed_is_deterministic(outputs):
    refs, good, bad = outputs
    same = paired_bootstrap("bleu", good, good, refs, n_samples=200)
    assert same.difference == same.ci_low == same.ci_high == 0.0 and same.p_value == 1.0
    a = paired_bootstrap("chrf", good, bad, refs, n_samples=200, seed=1)
    assert a == paired_bootstrap("chrf", good, bad, refs, n_samples=200, seed=1)
    assert a != paired_bootstrap("chrf", good, bad, refs, n_samples=200, seed=2)
    # A against B is B against A mirrored
    b = paired_bootstrap("chrf", bad, good, refs, n_samples=200, seed=1)
    assert b.difference == -a.difference and b.p_value == a.p_value
    assert (b.ci_low, b.ci_high) == (pytest.approx(-a.ci_high), pytest.approx(-a.ci_low))


def test_mistakes_are_one_line():
    with pytest.raises(LmkdError, match="same rows"):
        paired_bootstrap("bleu", ["a"], ["a", "b"], ["a", "b"])
    with pytest.raises(LmkdError, match="no paired bootstrap for metric 'ter'"):
        paired_bootstrap("ter", ["a"], ["a"], ["a"])
    with pytest.raises(LmkdError, match="no test rows"):
        paired_bootstrap("accuracy", [], [], [])
