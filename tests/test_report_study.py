"""The study report (lmkd.study.results, lmkd.evaluate.report): its significance numbers equal sacrebleu's
PairedTest run directly on the saved outputs, its verdict lines say what the tests say, its speed
is per token at a fixed output length beside per example, several seeds give mean ± std per
variant, train_log.json gives the steps and the curves, and the plot's axes show the real spread."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest

from lmkd.evaluate.report import padded_range
from lmkd.study import SEQ2SEQ_VARIANTS, StudyOptions, run_study
from lmkd.study.report_writer import report_markdown, teacher_training_note, write_study_report
from lmkd.study.results import build_report
from lmkd.study.stopping import read_train_log
from lmkd.study.verdicts import verdict_line


def _tiny(out) -> StudyOptions:
    """The tiny translation study; its 40-step teacher is not meant to pass the teacher check (where
    the study has one): these tests are about the report, not the teacher."""
    unchecked = (
        {"teacher_check": False} if "teacher_check" in StudyOptions.__dataclass_fields__ else {}
    )
    return StudyOptions(task="translation", budget="tiny", output=str(out), **unchecked)


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """The tiny translation study, and what build_report needs to rebuild its report."""
    out = tmp_path_factory.mktemp("report") / "study"
    report = run_study(_tiny(out))
    return out, report


def _stage(out: Path, name: str) -> Path:
    return out / "stages" / name.replace("+", "_")


def _inputs(out: Path, names: list[str]):
    """(opts, models, results, speed, data) of build_report, read back from the study's stage dirs."""
    opts = _tiny(out).resolve()
    models = {
        "teacher": {
            "dir": str(_stage(out, "teacher")),
            "stage": "teacher",
            "variant": "teacher",
            "size": None,
        }
    }
    for n in names:
        models[n] = {
            "dir": str(_stage(out, n)),
            "stage": n,
            "variant": n.split("-", 1)[1],
            "size": 0.25,
        }
    results = {
        n: json.loads((_stage(out, f"eval-{n}") / "quality.json").read_text()) for n in models
    }
    speed = json.loads((_stage(out, "speed") / "speed.json").read_text())
    data = {
        s: str(_stage(out, f"data-{s}") / f"{s}.jsonl") for s in ("train", "validation", "test")
    }
    data.update(
        {f"{s}_dir": str(_stage(out, f"data-{s}")) for s in ("train", "validation", "test")}
    )
    data["transfer_rows"] = str(_stage(out, "transfer-rows") / "transfer.jsonl")
    return opts, models, results, speed, data


def test_significance_equals_sacrebleu_paired_test_on_the_saved_outputs(study):
    from sacrebleu.metrics import BLEU, CHRF
    from sacrebleu.significance import PairedTest

    out, report = study
    refs = [
        json.loads(line)["target"]
        for line in (_stage(out, "data-test") / "test.jsonl").read_text().splitlines()
    ]
    preds = {
        r["model"]: json.loads((_stage(out, f"eval-{r['model']}") / "quality.json").read_text())[
            "predictions"
        ]
        for r in report["rows"]
    }
    sig = report["significance"]
    assert sig["mode"] == "beam" and sig["metrics"] == ["bleu", "chrf"] and sig["n_samples"] == 1000
    kinds = [c["kind"] for c in sig["comparisons"]]
    n = len(SEQ2SEQ_VARIANTS)
    assert kinds == (
        ["vs-baseline"] * (n - 1)
        + ["best-vs-other"] * (n - 2)
        + ["served-vs-student"]
        + ["vs-teacher"] * (n + 1)
    )
    assert {c["a"] for c in sig["comparisons"] if c["kind"] == "vs-baseline"} == {
        f"s025-{v}" for v in SEQ2SEQ_VARIANTS[1:]
    }
    for c in sig["comparisons"]:
        _, scores = PairedTest(
            [("b", preds[c["b"]]["beam"]), ("a", preds[c["a"]]["beam"])],
            {"bleu": BLEU(), "chrf": CHRF()},
            references=[refs],
            test_type="bs",
            n_samples=1000,
        )()
        for metric, key in (("bleu", "BLEU"), ("chrf", "chrF2")):
            base, sys = scores[key]
            t = c["tests"][metric]
            assert t["difference"] == sys.score - base.score
            assert t["score_a"] == sys.score and t["score_b"] == base.score
            assert (t["mean_a"], t["ci_a"]) == (sys.mean, sys.ci)
            # two models that score alike on every resample (tiny models: often 0 BLEU each) have p = 1,
            # where sacrebleu's formula gives its smallest value; otherwise the p-value is sacrebleu's
            alike = t["difference"] == t["ci_low"] == t["ci_high"] == 0.0
            assert t["p_value"] == (1.0 if alike else sys.p_value)
            assert not alike or sys.p_value == 1 / 1001
            assert t["verdict"] == (
                "inconclusive"
                if t["p_value"] >= 0.05
                else "better"
                if t["difference"] > 0
                else "worse"
            )
    # the report opens with one verdict line per comparison, in words
    md = (out / "report.md").read_text()
    assert md.splitlines()[2] == "## Verdicts"
    body = md.split("## Verdicts\n\n", 1)[1]
    assert body.startswith("\n".join(f"- {v}" for v in report["verdicts"]))
    # the warnings first (a weak teacher, students below the trivial floor, all at the step cap), then one
    # line per comparison
    warnings = [
        w for w in (sig["weak_teacher"], report["below_floor"], report["ran_to_the_cap"]) if w
    ]
    assert report["verdicts"][: len(warnings)] == warnings
    # every tiny student scored 0: one "no verdict" line instead of one line per comparison
    assert all(g["score_mean"] == 0 for g in report["variants"] if g["variant"] != "teacher")
    assert report["verdicts"][len(warnings) :] == [sig["no_verdict"]]
    first = verdict_line(sig["comparisons"][0], "bleu")
    assert first.startswith("Word-KD ") and "the baseline" in first


def test_verdict_lines_say_what_the_test_says():
    def comp(diff, lo, hi, p, a="Word-KD", b="the baseline"):
        verdict = "inconclusive" if p >= 0.05 else "better" if diff > 0 else "worse"
        return {
            "a_label": a,
            "b_label": b,
            "tests": {
                "bleu": {
                    "difference": diff,
                    "ci_low": lo,
                    "ci_high": hi,
                    "p_value": p,
                    "verdict": verdict,
                }
            },
        }

    assert (
        verdict_line(comp(3.14, 2.2, 4.0, 0.000999), "bleu")
        == "Word-KD beats the baseline by +3.1 BLEU (95% CI +2.2…+4.0, p = 0.001)."
    )
    assert (
        verdict_line(comp(-1.26, -2.0, -0.5, 0.012, "Seq-KD", "the teacher"), "bleu")
        == "Seq-KD is behind the teacher by 1.3 BLEU (95% CI −2.0…−0.5, p = 0.012)."
    )
    line = verdict_line(comp(0.4, -0.9, 1.8, 0.41, "Seq-KD", "Word-KD"), "bleu")
    assert line == (
        "Seq-KD does not differ significantly from Word-KD: +0.4 BLEU (95% CI −0.9…+1.8, p = 0.410) "
        "-- inconclusive on this test set."
    )
    assert verdict_line(comp(1.0, 0.1, 2.0, 0.2, "the baseline", "the teacher"), "bleu").startswith(
        "The baseline"
    )


def test_speed_is_per_token_at_a_fixed_length_beside_per_example(study):
    from lmkd.models.generation import output_lengths
    from lmkd.models.loading import load_tokenizer

    out, report = study
    plan = report["plan"]
    assert report["speed_setup"]["fixed_new_tokens"] == plan["max_new_tokens"]
    teacher = report["rows"][0]
    for r in report["rows"]:
        assert r["ms_per_token"] > 0 and r["latency_ms"] > 0
        assert r["speedup_per_token"] == teacher["ms_per_token"] / r["ms_per_token"]
        assert r["speedup"] == teacher["latency_ms"] / r["latency_ms"]
        beam = json.loads((_stage(out, f"eval-{r['model']}") / "quality.json").read_text())[
            "predictions"
        ]["beam"]
        lengths = output_lengths(load_tokenizer(r["path"]), beam)
        assert r["output_tokens_mean"] == sum(lengths) / len(lengths)
        assert r["output_tokens_mean"] <= plan["max_new_tokens"]
    md = (out / "report.md").read_text()
    assert f"ms/token ({plan['max_new_tokens']} tokens)" in md and "speed-up per token" in md
    assert "speed-up per example" in md
    for r in report["rows"]:
        assert f"{r['ms_per_token']:.2f} | {r['speedup_per_token']:.2f}x" in md


def test_fixed_length_decoding_generates_exactly_that_many_tokens(tiny_model_dir):
    from lmkd.models.generation import generate_fixed_length
    from lmkd.models.loading import load_model, load_tokenizer

    path = tiny_model_dir("marian", seed=1)
    model, tok = load_model(path).eval(), load_tokenizer(path)
    # an untrained model says EOS early or never; forced, it decodes exactly the asked length
    for n in (1, 7, 20):
        assert generate_fixed_length(model, tok, "the source sentence", n) == n


def test_seeds_give_mean_and_std_per_variant_and_train_logs_give_steps_and_curves(study, tmp_path):
    out, _ = study
    names = [f"s025-{v}" for v in SEQ2SEQ_VARIANTS]
    opts, models, results, speed, data = _inputs(out, names)
    # a second "seed" of Word-KD: the Seq-KD model's outputs stand in for it (other numbers, same shape)
    models["s025-word-kd-seed43"] = {**models["s025-seq-kd"], "variant": "word-kd", "seed": 43}
    models["s025-word-kd"]["seed"] = 42
    results["s025-word-kd-seed43"] = results["s025-seq-kd"]
    speed["s025-word-kd-seed43"] = speed["s025-seq-kd"]
    logs = {}
    for i, n in enumerate(names):  # train_log.json as the students' stages write it
        log = {
            "steps": 100 + 10 * i,
            "stopped_early": i % 2 == 0,
            "metric": "eval_loss_ce",
            "curve": [{"step": s, "metric": 5.0 - 0.01 * s - 0.1 * i} for s in (20, 40, 60)],
        }
        path = tmp_path / f"{n}.json"
        path.write_text(json.dumps(log))
        models[n]["train_log"] = logs[n] = str(path)
    (tmp_path / "broken.json").write_text("{not json")
    models["s025-word-kd-seed43"]["train_log"] = str(
        tmp_path / "broken.json"
    )  # read defensively: omitted
    report = build_report(opts, models, results, speed, data)
    rows = {r["model"]: r for r in report["rows"]}
    assert rows["s025-baseline"]["steps"] == 100 and rows["s025-baseline"]["stopped_early"] is True
    assert (
        rows["s025-word-kd"]["curve"] == json.loads(Path(logs["s025-word-kd"]).read_text())["curve"]
    )
    assert "steps" not in rows["s025-word-kd-seed43"]
    # the teacher trained here stops by the students' rule: its steps from its own log, no curve
    teacher_log = json.loads((Path(models["teacher"]["dir"]) / "train_log.json").read_text())
    assert rows["teacher"]["steps"] == teacher_log["steps"] > 0 and "curve" not in rows["teacher"]
    assert rows["teacher"]["stopped_early"] is teacher_log["stopped_early"]
    check = json.loads((Path(models["teacher"]["dir"]) / "teacher_check.json").read_text())
    assert check["rounds"][-1]["trained_steps"] == teacher_log["steps"]
    md = (out / "report.md").read_text()
    assert teacher_training_note(check["rounds"]) in md
    word = next(g for g in report["variants"] if g["variant"] == "word-kd")
    assert word["models"] == ["s025-word-kd", "s025-word-kd-seed43"] and word["seeds"] == [42, 43]
    chrf = [results["s025-word-kd"]["beam"]["chrf"], results["s025-seq-kd"]["beam"]["chrf"]]
    assert word["columns"]["beam.chrf"] == {
        "mean": statistics.fmean(chrf),
        "std": statistics.stdev(chrf),
    }
    assert word["first"] == "s025-word-kd"
    assert all(g["score_std"] is None for g in report["variants"] if g["variant"] != "word-kd")
    sig = report["significance"]
    assert sig["first_seed_only"] is True
    assert "s025-word-kd-seed43" not in {c["a"] for c in sig["comparisons"]} | {
        c["b"] for c in sig["comparisons"]
    }
    md = report_markdown(report)
    assert "## Variants: mean ± std over seeds" in md and "compare each variant's first seed" in md
    # steps: a mean only when every seed has a log (here one does not); quality: mean ± std over the seeds
    g = word["columns"]
    assert (
        f"| Word-KD | 2 | – | {g['greedy.bleu']['mean']:.1f} ± {g['greedy.bleu']['std']:.1f} | "
        f"{g['greedy.chrf']['mean']:.1f} ± {g['greedy.chrf']['std']:.1f} |"
    ) in md
    assert "| the baseline | 1 | 100 | " in md
    for name, steps in (("s025-baseline", "100 (stopped)"), ("s025-word-kd", "110")):
        r = rows[name]
        assert (
            f"| {name} | {r['parameters'] / 1e6:.2f}M | {r['parameters_vs_teacher']:.0%} | "
            f"{r['bytes_on_disk'] / 1e6:.1f} | {steps} | "
        ) in md
    # the plot: two panels (quality against speed, the first seeds' validation curves)
    write_study_report(report, str(tmp_path / "r"))
    import matplotlib.image

    img = matplotlib.image.imread(str(tmp_path / "r" / "report.png"))
    assert img.shape[1] > 1.8 * img.shape[0]  # two panels side by side


def test_axes_show_the_real_spread():
    # scores 0.004 apart: the axis is at least 5 points wide, centred on them
    lo, hi = padded_range(20.100, 20.104, 5.0, floor=0.0)
    assert hi - lo == pytest.approx(5.0) and lo < 20.100 < 20.104 < hi
    # a real spread keeps its 10% margins on each side
    assert padded_range(10.0, 40.0, 5.0, floor=0.0) == (pytest.approx(7.0), pytest.approx(43.0))
    # near zero: starts at the floor (less a sliver so markers on it show), never far below it
    lo, hi = padded_range(0.0, 0.0, 5.0, floor=0.0)
    assert lo == pytest.approx(-0.15) and hi == pytest.approx(4.85)


def test_train_log_is_read_defensively(tmp_path):
    assert read_train_log({"dir": str(tmp_path)}) is None  # absent
    (tmp_path / "train_log.json").write_text(json.dumps({"steps": "many"}))
    assert read_train_log({"dir": str(tmp_path)}) is None  # not the documented shape
    (tmp_path / "train_log.json").write_text(
        json.dumps(
            {
                "steps": 30,
                "curve": [{"step": 10, "metric": 2.5}, {"bad": 1}],
                "metric": "eval_loss_ce",
            }
        )
    )
    assert read_train_log({"dir": str(tmp_path)}) == {
        "steps": 30,
        "stopped_early": False,
        "best_step": None,
        "metric": "eval_loss_ce",
        "curve": [{"step": 10, "metric": 2.5}],
        "greater_is_better": False,
    }
    (tmp_path / "train_log.json").write_text(json.dumps({"steps": 30, "best_step": 20}))
    assert read_train_log({"dir": str(tmp_path)})["best_step"] == 20


def test_evaluate_reports_per_token_speed_and_output_length(tmp_path, tiny_model_dir, corpus):
    from lmkd.evaluate.run import evaluate_models
    from lmkd.evaluate.summary import markdown_table
    from lmkd.models.generation import output_lengths
    from lmkd.models.loading import load_tokenizer

    path = tiny_model_dir("marian", seed=1)
    data = tmp_path / "t.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in corpus[:6]))
    res = evaluate_models(
        path,
        str(data),
        "translation",
        teacher=path,
        num_beams=2,
        max_new_tokens=9,
        batch_size=3,
        speed_samples=4,
        latency_samples=2,
        repeats=1,
        device="cpu",
        progress=False,
    )
    assert res["settings"]["fixed_new_tokens"] == 9
    s, t = res["models"]["student"], res["models"]["teacher"]
    assert s["speed"]["fixed_new_tokens"] == 9 and s["speed"]["ms_per_token"] > 0
    assert (
        s["vs_teacher"]["speedup_per_token"]
        == t["speed"]["ms_per_token"] / s["speed"]["ms_per_token"]
    )
    lengths = output_lengths(load_tokenizer(path), res["predictions"]["student"])
    assert s["output_tokens"] == {"mean": sum(lengths) / len(lengths), "max": max(lengths)}
    table = markdown_table(res)
    assert "ms/token (9 tokens, batch 1)" in table and "speed-up per token" in table
    assert f"| {s['speed']['ms_per_token']:.2f} |" in table
    off = evaluate_models(
        path,
        str(data),
        "translation",
        num_beams=1,
        max_new_tokens=9,
        speed_samples=2,
        latency_samples=1,
        repeats=1,
        fixed_new_tokens=0,
        device="cpu",
        progress=False,
    )
    assert (
        off["settings"]["fixed_new_tokens"] is None
        and "ms_per_token" not in off["models"]["student"]["speed"]
    )


def test_a_baseline_that_beats_the_teacher_opens_the_verdicts_with_a_weak_teacher_warning():
    """The fr->en study's case: the teacher passed its check, but the baseline (gold data, no teacher)
    beats it -- the verdicts then open with a warning; when the teacher is the better one, none."""
    from lmkd.study.verdicts import significance

    refs = [f"the package number {i} provides a small tool for files" for i in range(40)]
    good, bad = list(refs), [f"package {i} tool" for i in range(40)]

    def groups(teacher_out, baseline_out):
        g = lambda name, variant, label, score: {
            "first": name,
            "variant": variant,
            "size": 0.25 if variant != "teacher" else None,
            "label": label,
            "score_mean": score,
            "models": [name],
        }
        preds = {
            "teacher": {"beam": teacher_out},
            "s025-baseline": {"beam": baseline_out},
            "s025-word-kd": {"beam": baseline_out},
        }
        gs = [
            g("teacher", "teacher", "the teacher", 0),
            g("s025-baseline", "baseline", "the baseline", 0),
            g("s025-word-kd", "word-kd", "Word-KD", 0),
        ]
        return gs, preds

    gs, preds = groups(bad, good)
    sig = significance("translation", gs, gs[0], preds, refs, "beam")
    assert sig["weak_teacher"] and sig["verdicts"][0] == sig["weak_teacher"]
    assert (
        sig["verdicts"][0].startswith("**Weak teacher**: the baseline")
        and "beats the teacher by +" in sig["verdicts"][0]
    )
    gs, preds = groups(good, bad)
    sig = significance("translation", gs, gs[0], preds, refs, "beam")
    assert sig["weak_teacher"] is None and not any("Weak teacher" in v for v in sig["verdicts"])


def test_students_below_the_trivial_floor_open_the_verdicts(study):
    """A student variant scoring below copying the source / the most frequent target on the test rows
    is named in a warning that opens the verdicts; the floors are computed on the test rows as the
    teacher check computes them on validation."""
    import sacrebleu

    from lmkd.study.verdicts import below_floor

    out, report = study
    test = [
        json.loads(line)
        for line in (_stage(out, "data-test") / "test.jsonl").read_text().splitlines()
    ]
    copy = sacrebleu.corpus_bleu([r["source"] for r in test], [[r["target"] for r in test]]).score
    assert report["floors"]["copying the source"] == pytest.approx(copy)
    floor = max(report["floors"].values())
    low = [
        g["label"]
        for g in report["variants"]
        if g["variant"] != "teacher" and g["score_mean"] < floor
    ]
    assert (report["below_floor"] is not None) == bool(low)
    if low:
        assert (
            report["verdicts"][0 if not report["significance"]["weak_teacher"] else 1]
            == report["below_floor"]
        )
    groups = [
        {"variant": "teacher", "label": "the teacher", "score_mean": 30.0},
        {"variant": "baseline", "label": "the baseline", "score_mean": 3.2},
        {"variant": "word-kd", "label": "Word-KD", "score_mean": 14.5},
        {"variant": "seq-inter", "label": "Seq-Inter", "score_mean": 3.1},
    ]
    line = below_floor(
        groups, {"copying the source": 9.8, "the most frequent target": 0.4}, "rouge2"
    )
    assert line.startswith(
        "**Below the trivial floor**: the baseline (3.2), Seq-Inter (3.1) score below 9.8 "
        "ROUGE-2, what copying the source scores on the test rows"
    )
    assert below_floor(groups[:1] + groups[2:3], {"copying the source": 9.8}, "rouge2") is None


def test_the_report_says_how_far_one_architecture_s_speed_spreads(study):
    """Students of one parameter count are one network: the report states the spread of their
    ms/token in this run (the served export and the teacher are not in it), so a user does not read
    timing noise as a speed difference between variants."""
    from lmkd.study.verdicts import timing_noise

    out, report = study
    students = [r for r in report["rows"] if r["variant"] not in ("teacher", "served")]
    values = [r["ms_per_token"] for r in students]
    line = timing_noise(report["rows"], "ms_per_token")
    assert line == (
        f"Timing noise: the {len(students)} students of {students[0]['parameters'] / 1e6:.2f}M parameters "
        f"are one architecture, and their ms/token spread {min(values):.2f}-{max(values):.2f} in this run "
        f"(±{(max(values) - min(values)) / 2 / (sum(values) / len(values)):.0%} around their mean): speed "
        "differences of that size between them are timing noise, not differences between the models."
    )
    assert line in (out / "report.md").read_text()
    rows = [
        {"variant": "teacher", "parameters": 9, "latency_ms": 10.0},
        {"variant": "baseline", "parameters": 4, "latency_ms": 4.0},
        {"variant": "word-kd", "parameters": 4, "latency_ms": 6.0},
        {"variant": "baseline", "parameters": 2, "latency_ms": 1.0},
        {"variant": "served", "parameters": 4, "latency_ms": 1.0},
    ]
    assert "latency (ms/example) spread 4.00-6.00 in this run (±20% around" in timing_noise(
        rows, "latency_ms"
    )
    assert timing_noise(rows[:2] + rows[3:], "latency_ms") is None  # no two students of one size


def test_a_verdict_within_the_seeds_spread_is_inconclusive_however_small_its_p_value():
    """Two variants whose first seeds differ a lot on the test rows (p < 0.001) but whose seeds
    disagree -- one seed better, one worse, or a mean difference inside the spread -- get no verdict;
    the same test-row difference with seeds that agree and differ by more than their spread does."""
    from lmkd.study.verdicts import compare, seed_check, verdict_line

    refs = [f"the package provides tool number {i} for the system" for i in range(60)]
    preds = {"a": {"greedy": list(refs)}, "b": {"greedy": [f"a {i}" for i in range(60)]}}

    def group(name, scores):
        return {"first": name, "label": f"variant {name}", "variant": name, "scores": scores}

    noisy = compare(
        "vs-baseline",
        group("a", [30.0, 10.0]),
        group("b", [20.0, 21.0]),
        preds,
        refs,
        ("bleu",),
        "greedy",
    )
    t = noisy["tests"]["bleu"]
    assert (
        t["p_value"] < 0.01 and t["difference"] > 50
    )  # the test rows alone would call it a difference
    assert t["verdict"] == "inconclusive" and t["within_seed_spread"]
    assert t["seeds"]["differences"] == [10.0, -11.0] and t["seeds"]["spread"] == 20.0
    assert "beyond the randomness of training" in verdict_line(noisy, "bleu")
    inside = seed_check(
        group("a", [30.0, 26.0]), group("b", [25.0, 24.0])
    )  # same sign, mean 3.5 < spread 4
    assert (
        inside["differences"] == [5.0, 2.0] and inside["spread"] == 4.0 and not inside["survives"]
    )
    steady = compare(
        "vs-baseline",
        group("a", [30.0, 31.0]),
        group("b", [20.0, 21.0]),
        preds,
        refs,
        ("bleu",),
        "greedy",
    )
    assert (
        steady["tests"]["bleu"]["verdict"] == "better"
        and steady["tests"]["bleu"]["seeds"]["survives"]
    )
    assert "over 2 seeds +10.0" in verdict_line(steady, "bleu")
    # the teacher (one model) against a variant of two seeds: its score paired with each seed
    assert seed_check(group("a", [30.0, 31.0]), group("t", [40.0]))["differences"] == [-10.0, -9.0]
    assert seed_check(group("a", [30.0]), group("b", [20.0])) is None  # one seed: not measured


def test_students_that_all_ran_to_the_cap_are_flagged_and_early_stoppers_are_not():
    """When no student stopped on its plateau the verdicts rank the variants at the step budget: the
    report says so (with how many were still at their best at their last evaluation); one student that
    stopped early means the rule decided, and there is no warning."""
    from lmkd.study.verdicts import ran_to_the_cap

    def row(values, steps=300, early=False, greater=True):
        curve = [{"step": 100 * (i + 1), "metric": v} for i, v in enumerate(values)]
        return {
            "steps": steps,
            "stopped_early": early,
            "curve": curve,
            "curve_greater_is_better": greater,
        }

    teacher = {"steps": None, "stopped_early": None}  # no train log: not a student
    rows = [teacher, row([10.0, 12.0, 13.0]), row([10.0, 14.0, 13.5]), row([9.0, 9.5, 11.0])]
    warning = ran_to_the_cap(rows)
    assert warning.startswith("**Every student ran to the step cap** (300 steps)")
    assert "(2 of 3 were at their best at their last evaluation)" in warning
    # a loss (lower is better): the last value is the best when it is the minimum
    assert "(1 of 2 were" in ran_to_the_cap(
        [row([3.0, 2.0], greater=False), row([3.0, 3.5], greater=False)]
    )
    assert ran_to_the_cap(rows + [row([10.0, 10.0], steps=200, early=True)]) is None
    assert ran_to_the_cap([teacher]) is None


def test_the_teacher_s_training_note_says_how_it_stopped():
    """Stopped by the rule; at its cap with an earlier best (levelling off); at its cap still improving
    (bold: the students may beat an under-trained teacher); round 2 continued from round 1 counts both;
    no log (a given teacher, --fixed-teacher-steps): nothing."""
    r = {"round": 1, "steps": 6000, "from": "init"}
    stopped = teacher_training_note(
        [{**r, "trained_steps": 3700, "stopped_early": True, "best_step": 3400}]
    )
    assert stopped == (
        "The teacher trained to its validation plateau: stopped by the students' rule at 3700 steps "
        "(cap 6000), keeping its best evaluation's weights (step 3400)."
    )
    level = teacher_training_note(
        [{**r, "trained_steps": 6000, "stopped_early": False, "best_step": 5800}]
    )
    assert (
        level.startswith("The teacher ran to its step cap (6000 steps); its best validation")
        and "5800" in level
    )
    rising = teacher_training_note(
        [{**r, "trained_steps": 6000, "stopped_early": False, "best_step": 6000}]
    )
    assert rising.startswith("**The teacher ran to its step cap** (6000 steps) still improving")
    two = teacher_training_note(
        [
            {**r, "trained_steps": 6000, "stopped_early": False, "best_step": 6000},
            {
                **r,
                "round": 2,
                "from": "round 1",
                "trained_steps": 3100,
                "stopped_early": True,
                "best_step": 3000,
            },
        ]
    )
    assert "at 3100 steps (round 2, after round 1's 6000) (cap 6000)" in two
    assert (
        teacher_training_note([{**r, "trained_steps": None}]) is None
        and teacher_training_note([]) is None
    )


def test_a_p_value_below_alpha_with_an_interval_over_zero_is_inconclusive(monkeypatch):
    """sacrebleu's p-value and the percentile interval read the same resamples differently and can
    disagree near the edge (a report printed "95% CI −0.1…+3.8, p = 0.038" as a win): a difference is
    called only when both say so."""
    from lmkd.scoring.significance import Comparison
    from lmkd.study import verdicts

    def fake(lo, hi, p):
        def bootstrap(metric, *a, **k):
            return Comparison(
                metric, 30.0, 28.2, 1.8, lo, hi, p, 30.0, 1.0, 28.2, 1.0, 1000, 1, 300, "fake"
            )

        return bootstrap

    group = {"label": "x", "variant": "x", "scores": [1.0]}
    a, b = (
        {**group, "first": "a", "label": "Word-KD"},
        {**group, "first": "b", "label": "the baseline"},
    )
    preds = {"a": ["x"], "b": ["y"]}
    cases = [
        ((-0.1, 3.8, 0.038), "inconclusive"),
        ((0.2, 3.8, 0.038), "better"),
        ((-3.8, 0.1, 0.038), "inconclusive"),
    ]
    for (lo, hi, p), want in cases:
        monkeypatch.setattr(verdicts, "paired_bootstrap", fake(lo, hi, p))
        c = verdicts.compare("vs-baseline", a, b, preds, ["r"], ("bleu",), None)
        t = c["tests"]["bleu"]
        over_zero = lo <= 0 <= hi
        assert t["verdict"] == want and t.get("ci_includes_zero", False) == over_zero
        line = verdicts.verdict_line(c, "bleu")
        assert ("the 95% interval includes zero -- inconclusive" in line) == over_zero, line
        assert line.startswith("Word-KD beats the baseline by +1.8") == (not over_zero), line
