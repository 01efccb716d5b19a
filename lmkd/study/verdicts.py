"""The study report's verdicts: the paired bootstrap of every student variant against the baseline, the
teacher and the best student (:func:`significance`), the verdict lines in words, and the warnings that
open them or stand among the notes -- a weak teacher (:func:`weak_teacher`), students below the trivial
floor (:func:`below_floor`), students that all ran to the step cap (:func:`ran_to_the_cap`), the timing
noise of one architecture (:func:`timing_noise`)."""

from __future__ import annotations

import statistics
from collections.abc import Callable

from lmkd.scoring.significance import DEFAULT_SAMPLES, DEFAULT_SEED, paired_bootstrap

#: a comparison with p below this is reported as a difference; otherwise it is inconclusive
ALPHA = 0.05


def seed_stats(values: list[float]) -> tuple[float, float | None]:
    """Mean and standard deviation (None for one value) over seeds.

    Args:
        values: one value per seed.

    Returns:
        ``(mean, std)``.
    """
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


def variant_groups(
    rows: list[dict],
    columns: Callable[[list[dict]], dict],
    means: tuple[str, ...],
    every_seed: bool = True,
) -> list[dict]:
    """A study's rows grouped by (size, variant) in model order -- what the verdicts compare: the seeds,
    mean ± std of the headline ``score``, the first seed's model (the one the significance tests use),
    ``columns(rows of the group)`` and the mean of each key of ``means`` (``<key>_mean``).

    Args:
        rows: one row per model (``size``, ``variant``, ``label``, ``model``, ``seed``, ``score``).
        columns: the group's ``columns`` entry from its rows (mean ± std of each reported metric).
        means: row keys averaged over the seeds that have them.
        every_seed: a mean only when every seed has the key (else None); False: over those that do.

    Returns:
        The groups.
    """
    by_key: dict[tuple, list[dict]] = {}
    for r in rows:
        by_key.setdefault((r["size"], r["variant"]), []).append(r)
    out = []
    for (size, variant), rs in by_key.items():
        scores = [r["score"] for r in rs]
        mean, std = seed_stats(scores)
        g = {
            "size": size,
            "variant": variant,
            "label": rs[0]["label"],
            "models": [r["model"] for r in rs],
            "seeds": [r["seed"] for r in rs],
            "first": rs[0]["model"],
            "scores": scores,
            "score_mean": mean,
            "score_std": std,
            "columns": columns(rs),
        }
        for key in means:
            vals = [r[key] for r in rs if r.get(key) is not None]
            whole = len(vals) == len(rs) if every_seed else bool(vals)
            g[f"{key}_mean"] = statistics.fmean(vals) if whole else None
        out.append(g)
    return out


#: the variant the KD variants are compared with: trained on the same rows without a teacher
BASELINE_VARIANTS = ("baseline", "no-kd", "sft")

METRIC_LABELS = {
    "bleu": "BLEU",
    "chrf": "chrF",
    "rouge1": "ROUGE-1",
    "rouge2": "ROUGE-2",
    "rougeL": "ROUGE-L",
    "accuracy": "accuracy",
    "macro_f1": "macro-F1",
}

#: the metrics the paired bootstrap runs on, per task (the first is the headline's)
SIGNIFICANCE_METRICS = {
    "translation": ("bleu", "chrf"),
    "summarization": ("rouge2", "rouge1", "rougeL"),
    "classification": ("accuracy", "macro_f1"),
    "causal-lm": ("rougeL", "chrf"),
}


def seed_check(a: dict, b: dict) -> dict | None:
    """Whether the difference between two variants survives the randomness of training: with several
    seeds per variant (seed k of one paired with seed k of the other; a one-model group -- the teacher
    -- paired with every seed), the per-seed differences of the headline score must all have one sign
    and their mean must exceed the seeds' spread -- the larger of the two variants' ranges (max − min
    over their seeds).  None when neither variant has two seeds: training variance is not measured.

    Args:
        a: a group (``scores``: the headline score of each seed's model).
        b: the group it is compared with.

    Returns:
        ``{"seeds", "differences", "mean", "spread", "survives"}`` or None.
    """
    sa, sb = list(a.get("scores") or []), list(b.get("scores") or [])
    if max(len(sa), len(sb)) < 2 or not sa or not sb:
        return None
    if len(sa) == 1:
        sa = sa * len(sb)
    if len(sb) == 1:
        sb = sb * len(sa)
    diffs = [x - y for x, y in zip(sa, sb)]
    spread = max(max(s) - min(s) for s in (sa, sb))
    mean = sum(diffs) / len(diffs)
    same_sign = all(d > 0 for d in diffs) or all(d < 0 for d in diffs)
    return {
        "seeds": len(diffs),
        "differences": diffs,
        "mean": mean,
        "spread": spread,
        "survives": same_sign and abs(mean) > spread,
    }


def compare(
    kind: str, a: dict, b: dict, preds: dict, refs: list, metrics: tuple[str, ...], mode: str | None
) -> dict:
    """Paired bootstrap of group ``a``'s first model against group ``b``'s on every metric; on the
    headline metric (the first), a difference the test rows call significant is still inconclusive
    when it does not survive the seeds (:func:`seed_check`).

    Args:
        kind: the comparison's kind (vs-baseline, best-vs-other, served-vs-student, vs-teacher).
        a: the group compared (``first``, ``label``, ``variant``, ``scores``).
        b: the group it is compared with.
        preds: ``{model: predictions}`` (per decoding mode for seq2seq).
        refs: the test references.
        metrics: the metrics tested, the headline first.
        mode: the decoding mode compared (seq2seq), or None.

    Returns:
        The comparison: the two models and labels, and ``tests`` per metric (the bootstrap's figures,
        ``verdict``, and on the headline metric ``seeds`` / ``within_seed_spread`` when measured).
    """
    pa, pb = preds[a["first"]], preds[b["first"]]
    if mode is not None:
        pa, pb = pa[mode], pb[mode]
    tests = {m: paired_bootstrap(m, pa, pb, refs).as_dict() for m in metrics}
    for t in tests.values():
        t["verdict"] = (
            "inconclusive"
            if t["p_value"] >= ALPHA
            else "better"
            if t["difference"] > 0
            else "worse"
        )
        # the p-value (sacrebleu's, on centred |differences|) and the percentile interval are two readings
        # of the same resamples and can disagree near the edge: a difference is called only when both do
        if t["verdict"] != "inconclusive" and t["ci_low"] <= 0 <= t["ci_high"]:
            t["verdict"], t["ci_includes_zero"] = "inconclusive", True
    seeds = seed_check(a, b)
    head = tests[metrics[0]]
    if seeds is not None:
        head["seeds"] = seeds
        if head["verdict"] != "inconclusive" and not seeds["survives"]:
            head["verdict"], head["within_seed_spread"] = "inconclusive", True
    return {
        "kind": kind,
        "a": a["first"],
        "b": b["first"],
        "a_label": a["label"],
        "b_label": b["label"],
        "a_variant": a["variant"],
        "tests": tests,
    }


def signed(x: float, spec: str = ".1f") -> str:
    """``x`` with its sign, a true minus sign when negative.

    Args:
        x: the number.
        spec: its format.

    Returns:
        ``+1.2`` or ``−1.2``.
    """
    return ("+" if x >= 0 else "−") + format(abs(x), spec)


def verdict_line(c: dict, metric: str) -> str:
    """One comparison in words, e.g. ``Word-KD beats the baseline by +3.1 BLEU (95% CI +2.2…+4.0, p = 0.001).``

    Args:
        c: a comparison (:func:`significance`).
        metric: the metric it is told on.

    Returns:
        The sentence.
    """
    t = c["tests"][metric]
    label = METRIC_LABELS.get(metric, metric)
    a, b = c["a_label"], c["b_label"]
    a = a[0].upper() + a[1:]
    ci = f"95% CI {signed(t['ci_low'])}…{signed(t['ci_high'])}, p = {t['p_value']:.3f}"
    seeds = t.get("seeds")
    over = (
        f"; over {seeds['seeds']} seeds {signed(seeds['mean'])}, seeds' spread {seeds['spread']:.1f}"
        if seeds
        else ""
    )
    if t["verdict"] == "better":
        return f"{a} beats {b} by {signed(t['difference'])} {label} ({ci}{over})."
    if t["verdict"] == "worse":
        return f"{a} is behind {b} by {abs(t['difference']):.1f} {label} ({ci}{over})."
    if t.get("ci_includes_zero"):
        return (
            f"{a} does not differ significantly from {b}: {signed(t['difference'])} {label} ({ci}{over}); "
            "the p-value is below 0.05 but the 95% interval includes zero -- inconclusive on this test set."
        )
    if t.get("within_seed_spread"):
        return (
            f"{a} does not differ from {b} beyond the randomness of training: {signed(t['difference'])} "
            f"{label} on the test rows ({ci}), but over {seeds['seeds']} seeds the differences "
            f"({', '.join(signed(d) for d in seeds['differences'])}) stay within the seeds' spread "
            f"({seeds['spread']:.1f}) -- inconclusive."
        )
    return (
        f"{a} does not differ significantly from {b}: {signed(t['difference'])} {label} ({ci}{over}) -- "
        "inconclusive on this test set."
    )


def served_sources(rows: list[dict]) -> dict[str, dict]:
    """``{served model: the student it was exported from}`` as one-model groups for :func:`compare`.

    Args:
        rows: the report's rows.

    Returns:
        ``{served model: group-like dict of its source}``.
    """
    by_name = {r["model"]: r for r in rows}
    return {
        r["model"]: {
            "first": r["source"],
            "label": by_name[r["source"]]["label"],
            "variant": by_name[r["source"]]["variant"],
        }
        for r in rows
        if r.get("source")
    }


def significance(
    task: str,
    groups: list[dict],
    teacher: dict,
    preds: dict,
    refs: list,
    mode: str | None,
    served: dict[str, dict] | None = None,
) -> dict:
    """Every student variant against the baseline of its size and against the teacher, and the best
    student variant of each size against the others of that size; a served model (``served``: its
    source student, :func:`served_sources`) against that student and the teacher; verdict lines on
    the headline metric.

    Args:
        task: the study task.
        groups: the variants (mean over seeds, first seed's model).
        teacher: the teacher's group.
        preds: ``{model: predictions}``.
        refs: the test references.
        mode: the decoding mode compared (seq2seq), or None.
        served: ``{served model: its source}``.

    Returns:
        ``metrics``, the settings, ``comparisons``, ``weak_teacher`` and ``verdicts``.
    """
    metrics = SIGNIFICANCE_METRICS[task]
    comparisons = []
    exports = [g for g in groups if g["variant"] == "served"]
    students = [g for g in groups if g["variant"] not in ("teacher", "served")]
    for size in dict.fromkeys(g["size"] for g in students):
        same = [g for g in students if g["size"] == size]
        base = next((g for v in BASELINE_VARIANTS for g in same if g["variant"] == v), None)
        others = [g for g in same if g is not base]
        if base is not None:
            comparisons += [
                compare("vs-baseline", g, base, preds, refs, metrics, mode) for g in others
            ]
        ranked = sorted(others, key=lambda g: -g["score_mean"])
        if len(ranked) > 1:
            comparisons += [
                compare("best-vs-other", ranked[0], g, preds, refs, metrics, mode)
                for g in ranked[1:]
            ]
        comparisons += [compare("vs-teacher", g, teacher, preds, refs, metrics, mode) for g in same]
    for g in exports:
        comparisons += [
            compare("served-vs-student", g, (served or {})[g["first"]], preds, refs, metrics, mode),
            compare("vs-teacher", g, teacher, preds, refs, metrics, mode),
        ]
    order = {"vs-baseline": 0, "best-vs-other": 1, "served-vs-student": 2, "vs-teacher": 3}
    comparisons.sort(key=lambda c: order[c["kind"]])
    weak = weak_teacher(comparisons, metrics[0])
    return {
        "metrics": list(metrics),
        "mode": mode,
        "alpha": ALPHA,
        "n_samples": DEFAULT_SAMPLES,
        "seed": DEFAULT_SEED,
        "first_seed_only": any(len(g["models"]) > 1 for g in groups),
        "comparisons": comparisons,
        # training variance: measured (seeds > 1, verdicts must survive it) or not (one seed)
        "seeds": max((len(g["models"]) for g in groups), default=1),
        "weak_teacher": weak,
        "verdicts": ([weak] if weak else []) + [verdict_line(c, metrics[0]) for c in comparisons],
    }


def weak_teacher(comparisons: list[dict], metric: str) -> str | None:
    """The warning that opens the verdicts when a baseline student -- trained on the gold targets with
    no teacher at all -- beats the teacher significantly: the teacher passed its check (it learned
    something) but less than a student a fraction of its size, so every "vs teacher" figure and
    every KD variant's gain is distillation from a weak teacher.  None when no baseline beats it.

    Args:
        comparisons: the comparisons (:func:`significance`).
        metric: the headline metric.

    Returns:
        The warning, or None.
    """
    for c in comparisons:
        t = c["tests"][metric]
        if (
            c["kind"] == "vs-teacher"
            and c["a_variant"] in BASELINE_VARIANTS
            and t["verdict"] == "better"
        ):
            label = METRIC_LABELS.get(metric, metric)
            return (
                f"**Weak teacher**: {c['a_label']}, trained on the gold data without any teacher, beats "
                f"the teacher by {signed(t['difference'])} {label} (95% CI {signed(t['ci_low'])}…"
                f"{signed(t['ci_high'])}, p = {t['p_value']:.3f}). The teacher passed its check but learned "
                'less than a student a fraction of its size: the "vs teacher" figures and the KD variants\' '
                "gains below are distillation from a weak teacher, not evidence about a good one."
            )
    return None


def below_floor(groups: list[dict], floors: dict[str, float], metric: str) -> str | None:
    """The warning that opens the verdicts when a student variant scores below the best trivial answer
    on the test rows (copying the source, the most frequent target / label): it did not learn to use
    its inputs under this budget, so a KD variant "beating" it measures whether training held
    together, not what distillation adds to a student that learned.  None when every student clears it.

    Args:
        groups: the variants.
        floors: ``{trivial answer: score}``.
        metric: the headline metric.

    Returns:
        The warning, or None.
    """
    name, floor = max(floors.items(), key=lambda kv: kv[1])
    low = [g for g in groups if g["variant"] != "teacher" and g["score_mean"] < floor]
    if not low:
        return None
    label = METRIC_LABELS.get(metric, metric)
    who = ", ".join(f"{g['label']} ({g['score_mean']:.1f})" for g in low)
    return (
        f"**Below the trivial floor**: {who} score{'s' if len(low) == 1 else ''} below {floor:.1f} {label}, "
        f"what {name} scores on the test rows -- {'it' if len(low) == 1 else 'they'} did not learn to use the "
        "inputs under this budget. Comparisons with a student below the floor measure whether its training "
        "held together, not what distillation adds to a student that learned."
    )


def ran_to_the_cap(rows: list[dict]) -> str | None:
    """The warning that stands among the verdicts when no student stopped on its validation plateau:
    every one trained to the step cap, so the cap, not the stopping rule, ended them all, and the ranking
    the verdicts give is at that budget -- the students that were still improving (best evaluation at
    their last one) may rank otherwise at convergence.  None when any student stopped early, or no row
    has a train log.

    Args:
        rows: the report's rows (``steps``, ``stopped_early``, ``curve`` from each student's train log).

    Returns:
        The warning, or None.
    """
    students = [r for r in rows if r.get("curve")]
    if not students or any(r["stopped_early"] for r in students):
        return None
    greater = any(r.get("curve_greater_is_better") for r in students)
    rising = 0
    for r in students:
        values = [c["metric"] for c in r["curve"]]
        best = max(values) if greater else min(values)
        rising += values[-1] == best
    cap = max(r["steps"] for r in students)
    return (
        f"**Every student ran to the step cap** ({cap} steps) without its validation metric levelling off "
        f"({rising} of {len(students)} were at their best at their last evaluation): the cap, not the "
        "stopping rule, ended their training, so these verdicts rank the variants at this budget, not at "
        "convergence (more steps: --student-steps)."
    )


def timing_noise(rows: list[dict], key: str) -> str | None:
    """The note on how far apart the speed of one architecture lands in this run: the PyTorch students
    (the served export runs another engine) that share the largest group of one parameter count are the
    same network, so the spread of their ``key`` (``ms_per_token`` or ``latency_ms``) is timing noise --
    a speed difference between them of that size is no difference between the models.  None with
    fewer than two such students.

    Args:
        rows: the report's rows.
        key: the speed figure.

    Returns:
        The note, or None.
    """
    groups: dict[int, list[dict]] = {}
    for r in rows:
        if r["variant"] not in ("teacher", "served") and r.get(key) is not None:
            groups.setdefault(r["parameters"], []).append(r)
    same = max(groups.values(), key=len, default=[])
    if len(same) < 2:
        return None
    values = [r[key] for r in same]
    lo, hi, mean = min(values), max(values), sum(values) / len(values)
    what = "ms/token" if key == "ms_per_token" else "latency (ms/example)"
    return (
        f"Timing noise: the {len(same)} students of {same[0]['parameters'] / 1e6:.2f}M parameters are one "
        f"architecture, and their {what} spread {lo:.2f}-{hi:.2f} in this run (±{(hi - lo) / 2 / mean:.0%} "
        "around their mean): speed differences of that size between them are timing noise, not differences "
        "between the models."
    )
