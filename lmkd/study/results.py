"""The study's report: verdict lines first (paired bootstrap of every student variant against the
baseline, the teacher and the best student), one row per model with its quality, size, output
length and speed against the teacher's, and per variant the mean ± std over seeds; written as
report.json / report.md / report.png by the shared writer :mod:`lmkd.evaluate.report`.

What it reads, and from whom:

* ``models``: ``{name: {"dir", "stage", "variant", "size", "seed"?, "train_log"?}}`` (the teacher is
  ``"teacher"``); with several seeds per variant the names are ``{size}-{variant}`` for the first
  seed and ``{size}-{variant}-seed{k}`` for the others, and the rows are grouped by (size, variant);
* ``results``: each eval stage's ``quality.json`` -- the scores, and ``predictions`` (greedy/beam
  texts, or class ids) on the test rows, which the significance tests resample;
* ``speed``: the speed stage's per-model figures (latency per example, throughput and, seq2seq,
  ``ms_per_token`` at ``fixed_new_tokens`` forced tokens);
* ``train_log.json`` in a student's stage dir (optional): ``{"steps", "stopped_early", "curve":
  [{"step", "metric"}], "metric"}`` -- the steps column and the validation-curve panel.
"""

from __future__ import annotations

import json
import os
import statistics

from lmkd.models.generation import output_lengths
from lmkd.core.io import read_rows
from lmkd.scoring.metrics import busy_warning
from lmkd.models.loading import load_tokenizer
from lmkd.evaluate.report import Curve, PlotPoint, markdown_table, plot_quality_speed, write_report
from lmkd.scoring.significance import DEFAULT_SAMPLES, DEFAULT_SEED, paired_bootstrap
from lmkd.study.checks import summary as check_summary
from lmkd.study.checks import trivial_floors
from lmkd.study.teachers import scratch_teacher
from lmkd.study.lengths import describe as describe_lengths
from lmkd.study.plan import FORMAT_NAMES, StudyOptions

#: a comparison with p below this is reported as a difference; otherwise it is inconclusive
ALPHA = 0.05
#: the variant the KD variants are compared with: trained on the same rows without a teacher
BASELINE_VARIANTS = ("baseline", "no-kd")
VARIANT_NAMES = {"baseline": "the baseline", "word-kd": "Word-KD", "seq-kd": "Seq-KD",
                 "seq-kd+word-kd": "Seq-KD + Word-KD", "seq-inter": "Seq-Inter", "no-kd": "fine-tuning alone",
                 "task-kd": "task KD", "distilbert": "MLM-distil + fine-tune",
                 "distilbert+task-kd": "MLM-distil + task KD", "teacher": "the teacher"}
METRIC_LABELS = {"bleu": "BLEU", "chrf": "chrF", "rouge1": "ROUGE-1", "rouge2": "ROUGE-2", "rougeL": "ROUGE-L",
                 "accuracy": "accuracy", "macro_f1": "macro-F1"}
TRAIN_LOG = "train_log.json"
#: how the validation metric of train_log.json is named in the notes and on the curve panel
CURVE_METRICS = {"eval_loss_ce": "validation CE on the gold targets (nats)"}


def _main_metric(task: str) -> tuple[str, list[tuple[str, str]]]:
    """(headline metric key, [(column label, key path)])."""
    if task == "classification":
        return "accuracy", [("accuracy", "accuracy"), ("macro-F1", "macro_f1")]
    if task == "summarization":
        return "beam.rouge2", [("ROUGE-2 greedy", "greedy.rouge2"), ("ROUGE-L greedy", "greedy.rougeL"),
                               ("ROUGE-2 beam", "beam.rouge2"), ("ROUGE-L beam", "beam.rougeL")]
    return "beam.bleu", [("BLEU greedy", "greedy.bleu"), ("chrF greedy", "greedy.chrf"),
                         ("BLEU beam", "beam.bleu"), ("chrF beam", "beam.chrf")]


#: the metrics the paired bootstrap runs on, per task (the first is the headline's)
SIGNIFICANCE_METRICS = {"translation": ("bleu", "chrf"), "summarization": ("rouge2", "rouge1", "rougeL"),
                        "classification": ("accuracy", "macro_f1")}


def _get(d: dict, path: str):
    for k in path.split("."):
        d = d[k]
    return d


def variant_label(variant: str, size: float | None, sizes: int) -> str:
    """``Word-KD`` (one student size) or ``Word-KD (25%)``; the teacher is ``the teacher``."""
    name = VARIANT_NAMES.get(variant, variant)
    return name if size is None or sizes <= 1 else f"{name} ({size:.0%})"


def read_train_log(model: dict) -> dict | None:
    """A student's ``train_log.json`` (its ``train_log`` path, else the file in its stage dir), or
    None when there is none or it is not the documented shape."""
    path = model.get("train_log") or os.path.join(model["dir"], TRAIN_LOG)
    try:
        with open(path) as f:
            log = json.load(f)
    except (OSError, ValueError):
        return None
    if not isinstance(log, dict) or not isinstance(log.get("steps"), int):
        return None
    curve = [c for c in log.get("curve") or [] if isinstance(c, dict) and "step" in c and "metric" in c]
    return {"steps": log["steps"], "stopped_early": bool(log.get("stopped_early", False)), "curve": curve,
            "metric": str(log.get("metric", "validation metric"))}


def _references(task: str, test_file: str) -> list:
    rows = read_rows(test_file)
    return [r["label"] for r in rows] if task == "classification" else [str(r["target"]) for r in rows]


def _std(values: list[float]) -> float | None:
    return statistics.stdev(values) if len(values) > 1 else None


def _groups(rows: list[dict], keys: list[str]) -> list[dict]:
    """Rows grouped by (size, variant) in model order: the seeds, mean ± std of every column and of
    the headline score, and the first seed's model (the one the significance tests use)."""
    by_key: dict[tuple, list[dict]] = {}
    for r in rows:
        by_key.setdefault((r["size"], r["variant"]), []).append(r)
    out = []
    for (size, variant), rs in by_key.items():
        scores = [r["score"] for r in rs]
        g = {"size": size, "variant": variant, "label": rs[0]["label"],
             "models": [r["model"] for r in rs], "seeds": [r["seed"] for r in rs], "first": rs[0]["model"],
             "score_mean": statistics.fmean(scores), "score_std": _std(scores),
             "columns": {k: {"mean": statistics.fmean(_get(r["quality"], k) for r in rs),
                             "std": _std([_get(r["quality"], k) for r in rs])} for k in keys}}
        for key in ("ms_per_token", "latency_ms", "steps"):
            vals = [r[key] for r in rs if r.get(key) is not None]
            g[f"{key}_mean"] = statistics.fmean(vals) if len(vals) == len(rs) else None
        out.append(g)
    return out


def _compare(kind: str, a: dict, b: dict, preds: dict, refs: list, metrics: tuple[str, ...],
             mode: str | None) -> dict:
    """Paired bootstrap of group ``a``'s first model against group ``b``'s on every metric."""
    pa, pb = preds[a["first"]], preds[b["first"]]
    if mode is not None:
        pa, pb = pa[mode], pb[mode]
    tests = {m: paired_bootstrap(m, pa, pb, refs).as_dict() for m in metrics}
    for t in tests.values():
        t["verdict"] = ("inconclusive" if t["p_value"] >= ALPHA else "better" if t["difference"] > 0 else "worse")
    return {"kind": kind, "a": a["first"], "b": b["first"], "a_label": a["label"], "b_label": b["label"],
            "a_variant": a["variant"],
            "tests": tests}


def _signed(x: float, spec: str = ".1f") -> str:
    return ("+" if x >= 0 else "−") + format(abs(x), spec)


def verdict_line(c: dict, metric: str) -> str:
    """One comparison in words, e.g. ``Word-KD beats the baseline by +3.1 BLEU (95% CI +2.2…+4.0, p = 0.001).``"""
    t = c["tests"][metric]
    label = METRIC_LABELS.get(metric, metric)
    a, b = c["a_label"], c["b_label"]
    a = a[0].upper() + a[1:]
    ci = f"95% CI {_signed(t['ci_low'])}…{_signed(t['ci_high'])}, p = {t['p_value']:.3f}"
    if t["verdict"] == "better":
        return f"{a} beats {b} by {_signed(t['difference'])} {label} ({ci})."
    if t["verdict"] == "worse":
        return f"{a} is behind {b} by {abs(t['difference']):.1f} {label} ({ci})."
    return (f"{a} does not differ significantly from {b}: {_signed(t['difference'])} {label} ({ci}) -- "
            "inconclusive on this test set.")


def served_sources(rows: list[dict]) -> dict[str, dict]:
    """``{served model: the student it was exported from}`` as one-model groups for :func:`_compare`."""
    by_name = {r["model"]: r for r in rows}
    return {r["model"]: {"first": r["source"], "label": by_name[r["source"]]["label"],
                         "variant": by_name[r["source"]]["variant"]} for r in rows if r.get("source")}


def significance(task: str, groups: list[dict], teacher: dict, preds: dict, refs: list, mode: str | None,
                 served: dict[str, dict] | None = None) -> dict:
    """Every student variant against the baseline of its size and against the teacher, and the best
    student variant of each size against the others of that size; a served model (``served``: its
    source student, :func:`served_sources`) against that student and the teacher; verdict lines on
    the headline metric."""
    metrics = SIGNIFICANCE_METRICS[task]
    comparisons = []
    exports = [g for g in groups if g["variant"] == "served"]
    students = [g for g in groups if g["variant"] not in ("teacher", "served")]
    for size in dict.fromkeys(g["size"] for g in students):
        same = [g for g in students if g["size"] == size]
        base = next((g for v in BASELINE_VARIANTS for g in same if g["variant"] == v), None)
        others = [g for g in same if g is not base]
        if base is not None:
            comparisons += [_compare("vs-baseline", g, base, preds, refs, metrics, mode) for g in others]
        ranked = sorted(others, key=lambda g: -g["score_mean"])
        if len(ranked) > 1:
            comparisons += [_compare("best-vs-other", ranked[0], g, preds, refs, metrics, mode) for g in ranked[1:]]
        comparisons += [_compare("vs-teacher", g, teacher, preds, refs, metrics, mode) for g in same]
    for g in exports:
        comparisons += [_compare("served-vs-student", g, (served or {})[g["first"]], preds, refs, metrics, mode),
                        _compare("vs-teacher", g, teacher, preds, refs, metrics, mode)]
    order = {"vs-baseline": 0, "best-vs-other": 1, "served-vs-student": 2, "vs-teacher": 3}
    comparisons.sort(key=lambda c: order[c["kind"]])
    weak = weak_teacher(comparisons, metrics[0])
    return {"metrics": list(metrics), "mode": mode, "alpha": ALPHA, "n_samples": DEFAULT_SAMPLES, "seed": DEFAULT_SEED,
            "first_seed_only": any(len(g["models"]) > 1 for g in groups), "comparisons": comparisons,
            "weak_teacher": weak,
            "verdicts": ([weak] if weak else []) + [verdict_line(c, metrics[0]) for c in comparisons]}


def weak_teacher(comparisons: list[dict], metric: str) -> str | None:
    """The warning that opens the verdicts when a baseline student -- trained on the gold targets with
    no teacher at all -- beats the teacher significantly: the teacher passed its check (it learned
    something) but less than a student a fraction of its size, so every "vs teacher" figure and
    every KD variant's gain is distillation from a weak teacher.  None when no baseline beats it."""
    for c in comparisons:
        t = c["tests"][metric]
        if c["kind"] == "vs-teacher" and c["a_variant"] in BASELINE_VARIANTS and t["verdict"] == "better":
            label = METRIC_LABELS.get(metric, metric)
            return (f"**Weak teacher**: {c['a_label']}, trained on the gold data without any teacher, beats "
                    f"the teacher by {_signed(t['difference'])} {label} (95% CI {_signed(t['ci_low'])}…"
                    f"{_signed(t['ci_high'])}, p = {t['p_value']:.3f}). The teacher passed its check but learned "
                    "less than a student a fraction of its size: the \"vs teacher\" figures and the KD variants' "
                    "gains below are distillation from a weak teacher, not evidence about a good one.")
    return None


def below_floor(groups: list[dict], floors: dict[str, float], metric: str) -> str | None:
    """The warning that opens the verdicts when a student variant scores below the best trivial answer
    on the test rows (copying the source, the most frequent target / label): it did not learn to use
    its inputs under this budget, so a KD variant "beating" it measures whether training held
    together, not what distillation adds to a student that learned.  None when every student clears it."""
    name, floor = max(floors.items(), key=lambda kv: kv[1])
    low = [g for g in groups if g["variant"] != "teacher" and g["score_mean"] < floor]
    if not low:
        return None
    label = METRIC_LABELS.get(metric, metric)
    who = ", ".join(f"{g['label']} ({g['score_mean']:.1f})" for g in low)
    return (f"**Below the trivial floor**: {who} score{'s' if len(low) == 1 else ''} below {floor:.1f} {label}, "
            f"what {name} scores on the test rows -- {'it' if len(low) == 1 else 'they'} did not learn to use the "
            "inputs under this budget. Comparisons with a student below the floor measure whether its training "
            "held together, not what distillation adds to a student that learned.")


def timing_noise(rows: list[dict], key: str) -> str | None:
    """The note on how far apart the speed of one architecture lands in this run: the PyTorch students
    (the served export runs another engine) that share the largest group of one parameter count are the
    same network, so the spread of their ``key`` (``ms_per_token`` or ``latency_ms``) is timing noise --
    a speed difference between them of that size is no difference between the models.  None with
    fewer than two such students."""
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
    return (f"Timing noise: the {len(same)} students of {same[0]['parameters'] / 1e6:.2f}M parameters are one "
            f"architecture, and their {what} spread {lo:.2f}-{hi:.2f} in this run (±{(hi - lo) / 2 / mean:.0%} "
            "around their mean): speed differences of that size between them are timing noise, not differences "
            "between the models.")


def build_report(opts: StudyOptions, models: dict, results: dict, speed: dict, data: dict) -> dict:
    """The report: the plan, the data sizes, one row per model (quality, size, output length,
    speed, steps, and each against the teacher), the variants (mean ± std over seeds) and the
    significance tests with their verdict lines, from the eval stages' ``results``, the speed
    stage's ``speed`` and the students' ``train_log.json``."""
    plan = opts.plan
    main, cols = _main_metric(opts.task)
    mode = None if opts.task == "classification" else main.split(".")[0]
    t_params = results["teacher"]["parameters"]
    t_sp = speed["teacher"]
    t_score = _get(results["teacher"], main)
    info = {}
    for split in ("train", "validation", "test"):
        with open(os.path.join(data[f"{split}_dir"], "info.json")) as f:
            split_info = json.load(f)
        info[f"{split}_rows"] = split_info["rows"]
        if "labels" in split_info:
            info["labels"] = split_info["labels"]
    if "transfer_rows" in data:
        info["transfer_rows"] = len(read_rows(data["transfer_rows"]))
    sizes = len({m["size"] for m in models.values() if m["size"] is not None})
    rows = []
    for name, m in models.items():
        r = results[name]
        sp = speed[name]
        label = variant_label(m["variant"], m["size"], sizes)
        if m["variant"] == "served":  # "Word-KD, served (CTranslate2 int8)"
            src = models[m["source"]]
            label = (f"{variant_label(src['variant'], src['size'], sizes)}, served "
                     f"({FORMAT_NAMES.get(m['format'], m['format'])})")
        row = {
            "model": name, "variant": m["variant"], "size": m["size"], "seed": m.get("seed"),
            "label": label, "path": os.path.abspath(m["dir"]), "bytes_on_disk": r.get("bytes_on_disk"),
            "parameters": r["parameters"], "parameters_vs_teacher": r["parameters"] / t_params,
            "quality": {k: v for k, v in r.items() if k not in ("parameters", "predictions")},
            "main_metric": main, "score": _get(r, main),
            "score_vs_teacher": (_get(r, main) / t_score) if t_score else None,
            "latency_ms": sp["latency_ms"], "throughput_per_s": sp["throughput_per_s"],
            # per example (batch 1, the study's beam search): counts how long each model's outputs are
            "speedup": t_sp["latency_ms"] / sp["latency_ms"] if sp["latency_ms"] else None,
            "ms_per_token": sp.get("ms_per_token"),
            # per token at a fixed output length: the architecture's speed, the headline speed-up
            "speedup_per_token": (t_sp["ms_per_token"] / sp["ms_per_token"]
                                  if sp.get("ms_per_token") and t_sp.get("ms_per_token") else None),
        }
        if mode is not None:
            lengths = output_lengths(load_tokenizer(m["dir"]), r["predictions"][mode])
            row["output_tokens_mean"] = sum(lengths) / len(lengths)
        log = read_train_log(m) if m["variant"] != "teacher" else None
        if m["variant"] == "served":
            row.update(source=m["source"], format=m["format"])
        if log is not None:
            row.update(steps=log["steps"], stopped_early=log["stopped_early"], curve=log["curve"],
                       curve_metric=log["metric"])
        rows.append(row)
    keys = [k for _, k in cols]
    groups = _groups(rows, keys)
    teacher = next(g for g in groups if g["variant"] == "teacher")
    sig = significance(opts.task, groups, teacher, {n: results[n]["predictions"] for n in models},
                       _references(opts.task, data["test"]), mode, served_sources(rows))
    # the trivial answers' scores on the test rows, on the headline metric (the teacher check's floors)
    floors = trivial_floors(opts.task, read_rows(data["train"]), read_rows(data["test"]))
    below = below_floor(groups, floors, sig["metrics"][0])
    if below:
        sig["verdicts"].insert(1 if sig["weak_teacher"] else 0, below)
    per_model = ("latency_ms", "throughput_per_s", "ms_per_token")
    return {"task": opts.task, "budget": opts.budget, "plan": plan,
            "data": {"train": opts.train, "validation": opts.validation, "test": opts.test, **info},
            "teacher": opts.teacher or scratch_teacher(opts), "columns": [c for c, _ in cols],
            "column_keys": keys, "speed_setup": {k: v for k, v in t_sp.items() if k not in per_model},
            "verdicts": sig["verdicts"], "significance": sig, "variants": groups, "rows": rows,
            "floors": floors, "below_floor": below}


def _main_label(report: dict) -> str:
    return report["columns"][report["column_keys"].index(report["rows"][0]["main_metric"])]


def _pm(mean: float, std: float | None, spec: str = ".1f") -> str:
    return format(mean, spec) if std is None else f"{format(mean, spec)} ± {format(std, spec)}"


def _opt(value, spec: str) -> str:
    return "–" if value is None else format(value, spec)


def _steps_cell(r: dict) -> str:
    if r.get("steps") is None:
        return "–"
    return f"{r['steps']}" + (" (stopped)" if r.get("stopped_early") else "")


def report_markdown(report: dict) -> str:
    """``report.md``: the verdict lines, the table of models (or variants, with several seeds) and
    notes saying how everything was measured."""
    keys = report["column_keys"]
    rows_in = report["rows"]
    seq2seq = report["task"] != "classification"
    per_token = all(r.get("ms_per_token") is not None for r in rows_in)
    has_steps = any(r.get("steps") is not None for r in rows_in)
    fixed = report["speed_setup"].get("fixed_new_tokens")
    has_bytes = all(r.get("bytes_on_disk") for r in rows_in)
    head = ["model", "params", "size"] + (["MB on disk"] if has_bytes else []) + (["steps"] if has_steps else [])
    head += report["columns"]
    if seq2seq:
        head += ["output tokens"]
    if per_token:
        head += [f"ms/token ({fixed} tokens)", "speed-up per token"]
    head += ["latency ms/example", "speed-up per example", f"{_main_label(report)} vs teacher"]

    def speed_cells(r):
        cells = [f"{r['output_tokens_mean']:.1f}"] if seq2seq else []
        if per_token:
            cells += [f"{r['ms_per_token']:.2f}", _opt(r["speedup_per_token"], ".2f") + "x"]
        return cells + [f"{r['latency_ms']:.1f}", _opt(r["speedup"], ".2f") + "x"]

    table = []
    for r in rows_in:
        vals = [r["model"], f"{r['parameters'] / 1e6:.2f}M", f"{r['parameters_vs_teacher']:.0%}"]
        vals += [f"{r['bytes_on_disk'] / 1e6:.1f}"] if has_bytes else []
        vals += [_steps_cell(r)] if has_steps else []
        vals += [f"{_get(r['quality'], k):.1f}" for k in keys]
        vals += speed_cells(r)
        vals += [f"{r['score_vs_teacher']:.0%}" if r["score_vs_teacher"] is not None else "-"]
        table.append(vals)
    sig = report["significance"]
    plan = report["plan"]
    d = report["data"]
    sp = report["speed_setup"]
    metric = METRIC_LABELS.get(sig["metrics"][0], sig["metrics"][0])
    lines = [f"# lmkd study: {report['task']} ({report['budget']} budget)", ""]
    lines += ["## Verdicts", ""] + [f"- {v}" for v in report["verdicts"]] + [""]
    lines += [f"Paired bootstrap resampling of the test rows ({sig['n_samples']} resamples, seed {sig['seed']}; "
              f"BLEU/chrF exactly sacrebleu's paired bootstrap test) on {metric}"
              + (f", {sig['mode']} search" if sig["mode"] else "")
              + f": a difference is reported when p < {sig['alpha']}, otherwise the comparison is inconclusive; "
              "each p-value is for one comparison (no correction for the number of comparisons)."
              + (" With several seeds per variant the tests compare each variant's first seed; the table "
                 "below gives mean ± std over the seeds." if sig["first_seed_only"] else ""), ""]
    variants = report["variants"]
    if any(len(g["models"]) > 1 for g in variants):
        vhead = ["variant", "seeds"] + (["steps (mean)"] if has_steps else []) + report["columns"]
        vrows = []
        for g in variants:
            v = [g["label"], str(len(g["models"]))]
            v += [_opt(g["steps_mean"], ".0f")] if has_steps else []
            v += [_pm(g["columns"][k]["mean"], g["columns"][k]["std"]) for k in keys]
            vrows.append(v)
        lines += ["## Variants: mean ± std over seeds", "", markdown_table(vhead, vrows), "",
                  "## Every model", ""]
    lines += [markdown_table(head, table), ""]
    lines += ["## Comparisons", ""]
    chead = ["A", "B"] + [f"{METRIC_LABELS.get(m, m)} A − B (95% CI), p" for m in sig["metrics"]]
    crows = []
    for c in sig["comparisons"]:
        cells = [c["a"], c["b"]]
        for m in sig["metrics"]:
            t = c["tests"][m]
            cells.append(f"{_signed(t['difference'], '.2f')} ({_signed(t['ci_low'], '.2f')}…"
                         f"{_signed(t['ci_high'], '.2f')}), p = {t['p_value']:.3f}")
        crows.append(cells)
    lines += [markdown_table(chead, crows), ""]
    if has_steps and "eval_every" in plan:
        metric_name = next((r["curve_metric"] for r in rows_in if r.get("curve_metric")), "metric")
        steps_note = (f"Students: each trained until its {CURVE_METRICS.get(metric_name, 'validation ' + metric_name)} "
                      f"stopped improving (measured every {plan['eval_every']} steps, patience "
                      f"{plan.get('patience')}), at most {plan['student_steps']} steps; the steps column says where "
                      "each one stopped (\"stopped\": before the cap).")
    else:
        steps_note = f"Students: {plan['student_steps']} steps each."
    lines += [
        f"Teacher: {report['teacher']}. Data: {d.get('train_rows')} training rows"
        + (f" ({d['transfer_rows']} in the transfer set every student learns from)" if "transfer_rows" in d else "")
        + f", {d.get('validation_rows')} validation, {d.get('test_rows')} test rows.",
        steps_note,
        (f"Training: batch {plan['batch_size']}, lr {plan['student_lr']}; "
         f"word-level KD alpha {plan['kd_alpha']}, temperature {plan['kd_temperature']}. Beam size {plan['beams']}."
         if report["task"] != "classification" else
         f"Training: batch {plan['batch_size']}; classifiers (the teacher's fine-tuning, every student) at lr "
         f"{plan.get('finetune_lr', plan['student_lr'])}, MLM-distillation at lr {plan['student_lr']}; KD alpha "
         f"{plan['kd_alpha']}, temperature {plan['kd_temperature']}.")
        + (f" Students and evaluations ran {plan['workers']} at a time, each in its own process on "
           f"{plan.get('threads_per_worker', 1)} thread(s)." if plan.get("workers", 1) > 1 else ""),
    ]
    if seq2seq:
        lines.append(f"Output tokens: mean length of each model's {sig['mode'] or ''} outputs on the test rows, "
                     "in its tokenizer's tokens.")
    if per_token:
        lines.append(f"Speed per token: greedy decoding forced to exactly {fixed} new tokens per example "
                     "(EOS held off), batch 1 -- the architecture's speed, whatever the length of a model's own "
                     "outputs; speed-up per token = teacher ms/token / model ms/token (the headline figure).")
    lines.append(
        f"Latency: ms per example at batch size 1 ({'beam search' if seq2seq else 'forward'}), "
        f"median of {sp.get('repeats')} rounds over {sp.get('latency_examples')} examples, models interleaved; "
        "speed-up per example = teacher latency / model latency"
        + (" -- it also counts how long each model's outputs are." if seq2seq else "."))
    busy = busy_warning(sp)
    if busy:
        lines.append(busy + " To time them alone: delete `stages/speed` in the study's output directory and run the "
                     "same command again (only the speed and the report are redone).")
    check = plan.get("teacher_check")
    if check and not check.get("skipped"):
        rounds = check.get("rounds", [])
        text = f"Teacher check ({check['rows']} validation rows): {check_summary(check)}"
        if len(rounds) > 1:
            first, last = rounds[0], rounds[-1]
            how = ("restarted from the init" if last.get("from") == "init" else "continued from round 1")
            text += (f" -- after {len(rounds)} training rounds: round 1 (lr {first['lr']:g}) failed "
                     f"({check_summary(first)}); round 2 {how} at lr {last['lr']:g}")
        lines.append(text + ".")
    else:
        lines.append("**Teacher NOT checked** (--skip-teacher-check): nothing shows it learned the task, so the "
                     "comparisons with it may mean nothing.")
    if report.get("floors"):
        lines.append(f"Trivial floors on the test rows ({metric}): "
                     + "; ".join(f"{name} {v:.1f}" for name, v in report["floors"].items())
                     + " -- a student below the best of them did not learn to use its inputs.")
    served = plan.get("served")
    if served and any(r["variant"] == "served" for r in rows_in):
        lines.append(f"Served: {served['student']}, the student with the lowest validation CE "
                     f"({served['validation_ce']:.3f}), exported to {FORMAT_NAMES.get(served['format'], served['format'])} "
                     "(lmkd compress's export, no pruning) -- the row `served`, scored and timed like every other "
                     "model and compared with the student it came from above.")
    cache = plan.get("kd_cache")
    word_kd = any("word-kd" in r["variant"] for r in rows_in)
    if cache and word_kd:
        unbiased = ("unbiased" if plan.get("kd_temperature") == 1.0
                    else f"consistent, slightly biased at temperature {plan.get('kd_temperature'):g}")
        lines.append(f"Word-KD teacher: the Word-KD variants read the teacher's log-probs cached once per transfer "
                     f"set (lmkd cache-logits: the top {cache['top_k']} per target token plus {cache['tail_samples']} "
                     f"drawn from the rest, which keeps the forward-KL gradient {unbiased}) instead of running the "
                     "teacher at every step; --online-kd runs it at every step.")
    elif word_kd:
        lines.append("Word-KD teacher: online (--online-kd): the Word-KD variants ran the teacher at every step.")
    noise = timing_noise(rows_in, "ms_per_token" if per_token else "latency_ms")
    if noise:
        lines.append(noise)
    if plan.get("length_sizing"):
        lines.append(describe_lengths(plan["length_sizing"]))
    for note in plan.get("notes") or []:
        lines.append(str(note))
    return "\n".join(lines) + "\n"


def _short(label: str) -> str:
    """A legend entry: the label without its article (``the baseline`` -> ``baseline``)."""
    return label[4:] if label.startswith("the ") else label


def _plot_points(report: dict) -> tuple[list[PlotPoint], str]:
    """One point per variant (the mean over its seeds), error bars = std over seeds when there are
    several, else the bootstrap 95% CI of the model's own score; and the note saying which."""
    per_token = all(r.get("ms_per_token") is not None for r in report["rows"])
    key = "ms_per_token_mean" if per_token else "latency_ms_mean"
    seeds = any(len(g["models"]) > 1 for g in report["variants"])
    ci = {}
    for c in report["significance"]["comparisons"]:
        t = c["tests"][report["significance"]["metrics"][0]]
        ci.setdefault(c["a"], t["ci_a"])
        ci.setdefault(c["b"], t["ci_b"])
    main_is_sig = report["rows"][0]["main_metric"].split(".")[-1] == report["significance"]["metrics"][0]
    points = []
    for g in report["variants"]:
        if seeds:
            err = (g["score_std"], g["score_std"]) if g["score_std"] is not None else None
        else:
            half = ci.get(g["first"]) if main_is_sig else None
            err = (half, half) if half is not None else None
        points.append(PlotPoint(_short(g["label"]), g[key], g["score_mean"], g["variant"] == "teacher", score_err=err))
    note = ("error bars: ±1 std over the seeds of each variant" if seeds
            else f"error bars: bootstrap 95% CI of each model's score ({report['significance']['n_samples']} "
                 "resamples of the test rows)")
    return points, note


def write_study_report(report: dict, out: str) -> None:
    """``report.json``, ``report.md`` and ``report.png`` (quality against speed, and the students'
    validation curves) into ``out``."""
    write_report(report, report_markdown(report), os.path.join(out, "report.json"), os.path.join(out, "report.md"))
    points, note = _plot_points(report)
    per_token = all(r.get("ms_per_token") is not None for r in report["rows"])
    fixed = report["speed_setup"].get("fixed_new_tokens")
    xlabel = (f"ms per token ({fixed} tokens forced, greedy, batch 1)" if per_token
              else "latency per example, batch 1 (ms)")
    first = {g["first"] for g in report["variants"]}
    curves = [Curve(_short(r["label"]), [c["step"] for c in r["curve"]], [c["metric"] for c in r["curve"]])
              for r in report["rows"] if r["model"] in first and r.get("curve")]
    curve_metric = next((r["curve_metric"] for r in report["rows"] if r.get("curve")), "")
    plot_quality_speed(points, os.path.join(out, "report.png"), xlabel=xlabel, ylabel=_main_label(report),
                       title=f"lmkd study: {report['task']} ({report['budget']} budget)", curves=curves,
                       curve_ylabel=CURVE_METRICS.get(curve_metric, f"validation {curve_metric}".strip()), note=note,
                       curve_title="students' validation curves" + (" (first seed)" if len(first) < sum(
                           len(g["models"]) for g in report["variants"]) else ""))
