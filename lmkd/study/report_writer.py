"""The study report's files: ``report.md`` (the verdict lines, the table of models or variants, the
comparisons and the notes saying how everything was measured) and ``report.png`` (quality against speed,
and the students' validation curves), from the report :func:`lmkd.study.results.build_report` makes
(its JSON form: this module reads nothing else), through the shared writer :mod:`lmkd.evaluate.report`."""

from __future__ import annotations

import os

from lmkd.evaluate.report import (
    Curve,
    PlotPoint,
    markdown_table,
    plot_quality_speed,
    write_report,
)
from lmkd.scoring.timing import busy_warning
from lmkd.study.checks import summary as check_summary
from lmkd.study.lengths import describe as describe_lengths
from lmkd.study.plan import FORMAT_NAMES
from lmkd.study.results import CURVE_METRICS, value_at
from lmkd.study.verdicts import METRIC_LABELS, signed, timing_noise


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


def teacher_training_note(rounds: list[dict]) -> str | None:
    """What the report says of how long a teacher trained here trained: stopped by the students' rule, or
    at its cap -- still improving (its best evaluation the last: not the strongest teacher the recipe
    makes), or levelling off without the patience to stop.

    Args:
        rounds: the rounds of ``teacher_check.json`` (``steps`` the cap, ``trained_steps``,
            ``stopped_early``, ``best_step``, ``from``).

    Returns:
        The sentence, or None for a teacher without a training log (a given one, an older study,
        ``--fixed-teacher-steps``).
    """
    last = rounds[-1] if rounds else {}
    trained = last.get("trained_steps")
    if trained is None:
        return None
    before = ""
    if len(rounds) > 1 and last.get("from") == "round 1" and rounds[0].get("trained_steps"):
        before = f" (round 2, after round 1's {rounds[0]['trained_steps']})"
    best = last.get("best_step")
    if last.get("stopped_early"):
        return (
            f"The teacher trained to its validation plateau: stopped by the students' rule at {trained} "
            f"steps{before} (cap {last['steps']}), keeping its best evaluation's weights"
            + (f" (step {best})." if best is not None else ".")
        )
    if best is not None and best < trained:
        return (
            f"The teacher ran to its step cap ({trained} steps{before}); its best validation evaluation "
            f"was at step {best}, whose weights it keeps."
        )
    return (
        f"**The teacher ran to its step cap** ({trained} steps{before}) still improving: a stronger "
        "teacher needs more steps (--teacher-steps), and students that beat it may only show that it is "
        "under-trained."
    )


def report_markdown(report: dict) -> str:
    """``report.md``: the verdict lines, the table of models (or variants, with several seeds) and
    notes saying how everything was measured.

    Args:
        report: the report (:func:`lmkd.study.results.build_report`, or report.json read back).

    Returns:
        The markdown.
    """
    keys = report["column_keys"]
    rows_in = report["rows"]
    seq2seq = report["task"] != "classification"
    per_token = all(r.get("ms_per_token") is not None for r in rows_in)
    has_steps = any(r.get("steps") is not None for r in rows_in)
    fixed = report["speed_setup"].get("fixed_new_tokens")
    has_bytes = all(r.get("bytes_on_disk") for r in rows_in)
    head = (
        ["model", "params", "size"]
        + (["MB on disk"] if has_bytes else [])
        + (["steps"] if has_steps else [])
    )
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
        vals += [f"{value_at(r['quality'], k):.1f}" for k in keys]
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
    lines += transfer_set_lines(report)
    nothing = sig.get("no_verdict")
    lines += [
        f"Paired bootstrap resampling of the test rows ({sig['n_samples']} resamples, seed {sig['seed']}; "
        f"BLEU/chrF exactly sacrebleu's paired bootstrap test) on {metric}"
        + (f", {sig['mode']} search" if sig["mode"] else "")
        + f": a difference is reported when p < {sig['alpha']} and its 95% interval excludes zero, otherwise "
        "the comparison is inconclusive; "
        "each p-value is for one comparison (no correction for the number of comparisons)."
        + (
            " With several seeds per variant the tests compare each variant's first seed; the table "
            "below gives mean ± std over the seeds, and a difference is reported only when it also "
            "survives the randomness of training: the same sign for every seed and a mean difference "
            "larger than the seeds' spread (each variant's max − min over its seeds)."
            if sig["first_seed_only"]
            else " One seed per variant: the randomness of training (seed, data order) is not measured, "
            "so a verdict can rest on one lucky or unlucky training (run with --seeds 2 or more)."
        ),
        "",
    ]
    variants = report["variants"]
    if any(len(g["models"]) > 1 for g in variants):
        vhead = ["variant", "seeds"] + (["steps (mean)"] if has_steps else []) + report["columns"]
        vrows = []
        for g in variants:
            v = [g["label"], str(len(g["models"]))]
            v += [_opt(g["steps_mean"], ".0f")] if has_steps else []
            v += [_pm(g["columns"][k]["mean"], g["columns"][k]["std"]) for k in keys]
            vrows.append(v)
        lines += [
            "## Variants: mean ± std over seeds",
            "",
            markdown_table(vhead, vrows),
            "",
            "## Every model",
            "",
        ]
    lines += [markdown_table(head, table), ""]
    lines += ["## Comparisons", ""]
    chead = ["A", "B"] + [f"{METRIC_LABELS.get(m, m)} A − B (95% CI), p" for m in sig["metrics"]]
    crows = []
    for c in sig["comparisons"]:
        cells = [c["a"], c["b"]]
        for m in sig["metrics"]:
            t = c["tests"][m]
            cells.append(
                f"{signed(t['difference'], '.2f')} ({signed(t['ci_low'], '.2f')}…"
                f"{signed(t['ci_high'], '.2f')}), p = {t['p_value']:.3f}"
            )
        crows.append(cells)
    lines += (
        ["No comparisons listed: every student scored 0 (see the verdicts).", ""]
        if nothing
        else [markdown_table(chead, crows), ""]
    )
    if has_steps and "eval_every" in plan:
        metric_name = next((r["curve_metric"] for r in rows_in if r.get("curve_metric")), "metric")
        steps_note = (
            f"Students: each trained until its {CURVE_METRICS.get(metric_name, 'validation ' + metric_name)} "
            f"stopped improving (measured every {plan['eval_every']} steps, patience "
            f"{plan.get('patience')}), at most {plan['student_steps']} steps; the steps column says where "
            'each one stopped ("stopped": before the cap).'
        )
    else:
        steps_note = f"Students: {plan['student_steps']} steps each."
    lines += [
        f"Teacher: {report['teacher']}. Data: {d.get('train_rows')} training rows"
        + (
            f" ({d['transfer_rows']} in the transfer set every student learns from)"
            if "transfer_rows" in d
            else ""
        )
        + f", {d.get('validation_rows')} validation, {d.get('test_rows')} test rows.",
        steps_note,
        (
            f"Training: batch {plan['batch_size']}, lr {plan['student_lr']}; "
            f"word-level KD alpha {plan['kd_alpha']}, temperature {plan['kd_temperature']}. Beam size {plan['beams']}."
            if report["task"] != "classification"
            else f"Training: batch {plan['batch_size']}; classifiers (the teacher's fine-tuning, every student) at lr "
            f"{plan.get('finetune_lr', plan['student_lr'])}, MLM-distillation at lr {plan['student_lr']}; KD alpha "
            f"{plan['kd_alpha']}, temperature {plan['kd_temperature']}."
        )
        + (
            f" Students and evaluations ran {plan['workers']} at a time, each in its own process on "
            f"{plan.get('threads_per_worker', 1)} thread(s)."
            if plan.get("workers", 1) > 1
            else ""
        ),
    ]
    if seq2seq:
        lines.append(
            f"Output tokens: mean length of each model's {sig['mode'] or ''} outputs on the test rows, "
            "in its tokenizer's tokens."
        )
    if per_token:
        lines.append(
            f"Speed per token: greedy decoding forced to exactly {fixed} new tokens per example "
            "(EOS held off), batch 1 -- the architecture's speed, whatever the length of a model's own "
            "outputs; speed-up per token = teacher ms/token / model ms/token (the headline figure)."
        )
    lines.append(
        f"Latency: ms per example at batch size 1 ({'beam search' if seq2seq else 'forward'}), "
        f"median of {sp.get('repeats')} rounds over {sp.get('latency_examples')} examples, models interleaved; "
        "speed-up per example = teacher latency / model latency"
        + (" -- it also counts how long each model's outputs are." if seq2seq else ".")
    )
    busy = busy_warning(sp)
    if busy:
        lines.append(
            busy
            + " To time them alone: delete `stages/speed` in the study's output directory and run the "
            "same command again (only the speed and the report are redone)."
        )
    check = plan.get("teacher_check")
    if check and not check.get("skipped"):
        rounds = check.get("rounds", [])
        text = f"Teacher check ({check['rows']} validation rows): {check_summary(check)}"
        if len(rounds) > 1:
            first, last = rounds[0], rounds[-1]
            how = (
                "restarted from the init"
                if last.get("from") == "init"
                else "continued from round 1"
            )
            text += (
                f" -- after {len(rounds)} training rounds: round 1 (lr {first['lr']:g}) failed "
                f"({check_summary(first)}); round 2 {how} at lr {last['lr']:g}"
            )
        lines.append(text + ".")
    else:
        lines.append(
            "**Teacher NOT checked** (--skip-teacher-check): nothing shows it learned the task, so the "
            "comparisons with it may mean nothing."
        )
    trained = teacher_training_note((check or {}).get("rounds") or [])
    if trained:
        lines.append(trained)
    if report.get("floors"):
        lines.append(
            f"Trivial floors on the test rows ({metric}): "
            + "; ".join(f"{name} {v:.1f}" for name, v in report["floors"].items())
            + " -- a student below the best of them did not learn to use its inputs."
        )
    served = plan.get("served")
    if served and any(r["variant"] == "served" for r in rows_in):
        lines.append(
            f"Served: {served['student']}, the student with the best "
            f"{CURVE_METRICS.get(served['metric'], served['metric'])} "
            f"({served['validation_metric']:.3f}), exported to {FORMAT_NAMES.get(served['format'], served['format'])} "
            "(lmkd compress's export, no pruning) -- the row `served`, scored and timed like every other "
            "model and compared with the student it came from above."
        )
    cache = plan.get("kd_cache")
    word_kd = any("word-kd" in r["variant"] for r in rows_in)
    if cache and word_kd:
        unbiased = (
            "unbiased"
            if plan.get("kd_temperature") == 1.0
            else f"consistent, slightly biased at temperature {plan.get('kd_temperature'):g}"
        )
        lines.append(
            f"Word-KD teacher: the Word-KD variants read the teacher's log-probs cached once per transfer "
            f"set (lmkd cache-logits: the top {cache['top_k']} per target token plus {cache['tail_samples']} "
            f"drawn from the rest, which keeps the forward-KL gradient {unbiased}) instead of running the "
            "teacher at every step; --online-kd runs it at every step."
        )
    elif word_kd:
        lines.append(
            "Word-KD teacher: online (--online-kd): the Word-KD variants ran the teacher at every step."
        )
    noise = timing_noise(rows_in, "ms_per_token" if per_token else "latency_ms")
    if noise:
        lines.append(noise)
    if plan.get("length_sizing"):
        lines.append(describe_lengths(plan["length_sizing"]))
    for note in plan.get("notes") or []:
        lines.append(str(note))
    return "\n".join(lines) + "\n"


def _figures(f: dict, label: str) -> str:
    """``12.3 BLEU, 4% identical to the gold`` (``–`` for no rows)."""
    if not f.get("rows"):
        return "no rows"
    return f"{f['score']:.1f} {label}, {f['identical']:.0%} identical to the gold target"


def transfer_set_lines(report: dict) -> list[str]:
    """The report's "Transfer set" section (seq2seq): how far the teacher's outputs on the rows the students
    learn from are the gold targets again (beside its validation metric), the memorisation warning, the
    teacher split and the unlabelled rows, and how each student size was initialised; nothing for a
    report without them.

    Args:
        report: the report (``transfer_set``, ``student_inits``).

    Returns:
        The markdown lines.
    """
    ts, inits = report.get("transfer_set"), report.get("student_inits")
    if not ts and not inits:
        return []
    lines = ["## Transfer set and student inits", ""]
    if ts:
        whole = ts["all"]
        label = METRIC_LABELS.get(whole["metric"], whole["metric"])
        val = ts["validation"]
        beside = (
            f"its validation {label} {val['score']:.1f} (greedy, {val['rows']} rows, the teacher check)"
            + (f"; {ts['ratio']:.2f}x" if ts.get("ratio") is not None else "")
            if val.get("score") is not None
            else "no validation figure (the teacher check was skipped)"
        )
        lines.append(
            f"- The teacher's beam outputs on the {whole['rows']} labelled transfer rows: "
            f"{_figures(whole, label)}; {beside}."
        )
        if "teacher_rows" in ts:
            mine, rest = ts["teacher_rows"], ts["held_out_rows"]
            lines.append(
                f"- --teacher-split {ts['teacher_split']:g}: the teacher trained on {mine['rows']} "
                f"of these rows ({_figures(mine, label)}) and not on the other {rest['rows']} "
                f"({_figures(rest, label)}), where its outputs are its predictions; every student "
                "learns from all of them."
            )
        if ts.get("unlabelled_rows"):
            lines.append(
                f"- --unlabelled: {ts['unlabelled_rows']} source-only rows in every KD variant's "
                "transfer set, their target the teacher's best beam (Word-KD: that target with "
                "the KD term, as lmkd distill's transfer-set regime trains a seq2seq student on "
                "unlabelled rows; Seq-Inter: the best beam, there being no gold to pick by); the "
                "baseline learns from the gold rows only."
            )
        if ts.get("warning"):
            lines.append(f"- {ts['warning']}")
    for size in dict.fromkeys(i["size"] for i in inits or []):
        first = next(i for i in inits if i["size"] == size)
        share = first["parameters_vs_teacher"]
        shape = first["shape"] or {}
        dims = (
            f"{shape.get('d_model')}-wide, {shape.get('encoder_layers')}+{shape.get('decoder_layers')} "
            "layers"
        )
        if first["init"] == "fresh":
            how = f"fresh (random init, a narrower model of the teacher's kind), {dims}"
        else:
            lay = first["layers"]
            how = (
                f"copied encoder layer(s) {', '.join(map(str, lay['encoder']))} and decoder layer(s) "
                f"{', '.join(map(str, lay['decoder']))} of the teacher ({dims})"
            )
        extra = (
            f" -- larger than the asked {size:.0%}: the fewest layers that can be copied"
            if first["larger_than_asked"]
            else ""
        )
        lines.append(
            f"- Students at {size:.0%} of the teacher: {how}; "
            + (f"{share:.0%} of its parameters" if share is not None else "")
            + extra
            + "."
        )
    return lines + [""]


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
    main_is_sig = (
        report["rows"][0]["main_metric"].split(".")[-1] == report["significance"]["metrics"][0]
    )
    points = []
    for g in report["variants"]:
        if seeds:
            err = (g["score_std"], g["score_std"]) if g["score_std"] is not None else None
        else:
            half = ci.get(g["first"]) if main_is_sig else None
            err = (half, half) if half is not None else None
        points.append(
            PlotPoint(
                _short(g["label"]),
                g[key],
                g["score_mean"],
                g["variant"] == "teacher",
                score_err=err,
            )
        )
    note = (
        "error bars: ±1 std over the seeds of each variant"
        if seeds
        else f"error bars: bootstrap 95% CI of each model's score ({report['significance']['n_samples']} "
        "resamples of the test rows)"
    )
    return points, note


def write_study_report(report: dict, out: str) -> None:
    """``report.json``, ``report.md`` and ``report.png`` (quality against speed, and the students'
    validation curves) into ``out``.

    Args:
        report: the report.
        out: the directory.
    """
    write_report(
        report,
        report_markdown(report),
        os.path.join(out, "report.json"),
        os.path.join(out, "report.md"),
    )
    points, note = _plot_points(report)
    per_token = all(r.get("ms_per_token") is not None for r in report["rows"])
    fixed = report["speed_setup"].get("fixed_new_tokens")
    xlabel = (
        f"ms per token ({fixed} tokens forced, greedy, batch 1)"
        if per_token
        else "latency per example, batch 1 (ms)"
    )
    first = {g["first"] for g in report["variants"]}
    curves = [
        Curve(
            _short(r["label"]), [c["step"] for c in r["curve"]], [c["metric"] for c in r["curve"]]
        )
        for r in report["rows"]
        if r["model"] in first and r.get("curve")
    ]
    curve_metric = next((r["curve_metric"] for r in report["rows"] if r.get("curve")), "")
    plot_quality_speed(
        points,
        os.path.join(out, "report.png"),
        xlabel=xlabel,
        ylabel=_main_label(report),
        title=f"lmkd study: {report['task']} ({report['budget']} budget)",
        curves=curves,
        curve_ylabel=CURVE_METRICS.get(curve_metric, f"validation {curve_metric}".strip()),
        note=note,
        curve_title="students' validation curves"
        + (
            " (first seed)"
            if len(first) < sum(len(g["models"]) for g in report["variants"])
            else ""
        ),
    )
