"""`lmkd study` on the tiny budget: it completes, its report equals `lmkd evaluate` on the saved
models, an interrupted study resumes without recomputing finished stages, and a changed option
recomputes only the stages that depend on it."""

from __future__ import annotations

import json
import os
import random
import re
from pathlib import Path

import pytest
import torch
from conftest import corpus_rows

from lmkd.core.errors import LmkdError
from lmkd.study import SEQ2SEQ_VARIANTS, StudyOptions, StudyStopped, run_study

BEFORE_STOP = [
    "data-train",
    "data-validation",
    "data-test",
    "tokenizer",
    "lengths",
    "teacher",
    "transfer-rows",
    "s025-init",
]
#: one job graph (the transfer set -- the teacher's outputs on every training row -- the Word-KD variants'
#: logit caches, students and evaluations; in this order on one worker), then the served export of the best
#: student and its evaluation
TRANSLATION_STAGES = (
    BEFORE_STOP
    + ["transfer", "kd-cache-validation", "kd-cache-target", "kd-cache-teacher"]
    + [f"s025-{v}" for v in SEQ2SEQ_VARIANTS]
    + ["eval-teacher"]
    + [f"eval-s025-{v}" for v in SEQ2SEQ_VARIANTS]
    + ["serve", "eval-served"]
    + ["speed", "report"]
)
STUDENTS = [f"s025-{v}" for v in SEQ2SEQ_VARIANTS]


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run faster on one thread on a shared machine (and the numbers do not change)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _log(out) -> list[str]:
    path = Path(out) / "study.log"
    return (
        [json.loads(line)["stage"] for line in path.read_text().splitlines()]
        if path.exists()
        else []
    )


def _stage_meta(out, name) -> dict:
    return json.loads((Path(out) / "stages" / name.replace("+", "_") / "stage.json").read_text())


@pytest.fixture(scope="module")
def translation(tmp_path_factory, one_thread):
    """The tiny translation study on the shipped corpus, interrupted after the student init and
    then resumed.  Returns (output dir, stages run before the stop, their stage.json)."""
    out = str(tmp_path_factory.mktemp("study") / "translation")

    def stop_after_init(stage):  # the interruption: right after the student init is saved
        if stage == "s025-init":
            raise StudyStopped(f"stopped after stage {stage}")

    with pytest.raises(StudyStopped):
        run_study(
            StudyOptions(task="translation", budget="tiny", teacher_check=False, output=out),
            after_stage=stop_after_init,
        )
    before = _log(out)
    metas = {name: _stage_meta(out, name) for name in before}
    run_study(StudyOptions(task="translation", budget="tiny", teacher_check=False, output=out))
    return out, before, metas


def test_interrupted_study_resumes_at_the_first_unfinished_stage(translation):
    out, before, metas = translation
    assert before == BEFORE_STOP
    # every stage ran exactly once over the two invocations: nothing finished was recomputed
    assert _log(out) == TRANSLATION_STAGES
    for name, meta in metas.items():
        assert _stage_meta(out, name) == meta
    assert not [p for p in os.listdir(Path(out) / "stages") if p.startswith(".tmp-")]


def test_report_numbers_equal_evaluate_on_the_saved_models(translation):
    from lmkd.cli import main
    from lmkd.evaluate.run import evaluate_models

    out, _, _ = translation
    report = json.loads((Path(out) / "report.json").read_text())
    plan = report["plan"]
    test_file = str(Path(out) / "stages" / "data-test" / "test.jsonl")
    assert [r["model"] for r in report["rows"]] == ["teacher"] + STUDENTS + ["served"]
    for row in report["rows"]:
        for mode, beams in (("greedy", 1), ("beam", plan["beams"])):
            res = evaluate_models(
                {"m": row["path"]},
                test_file,
                "translation",
                num_beams=beams,
                max_new_tokens=plan["max_new_tokens"],
                speed_samples=0,
                progress=False,
            )
            assert res["models"]["m"]["quality"] == row["quality"][mode]
            assert res["models"]["m"]["size"]["parameters"] == row["parameters"]
            saved = json.loads(
                (
                    Path(out) / "stages" / f"eval-{row['model']}".replace("+", "_") / "quality.json"
                ).read_text()
            )
            assert saved["predictions"][mode] == res["predictions"]["m"]
    # and through the command line, as a user would check it
    for row in report["rows"][:2]:
        dest = str(Path(out) / f"check-{row['model']}.json")
        assert (
            main(
                [
                    "evaluate",
                    "--model",
                    row["path"],
                    "--data",
                    test_file,
                    "--task",
                    "translation",
                    "--num-beams",
                    str(plan["beams"]),
                    "--max-new-tokens",
                    str(plan["max_new_tokens"]),
                    "--speed-samples",
                    "0",
                    "--output",
                    dest,
                ]
            )
            == 0
        )
        cli = json.loads(Path(dest).read_text())["models"]["student"]["quality"]
        assert cli == row["quality"]["beam"]
    md = (Path(out) / "report.md").read_text()
    for row in report["rows"]:
        assert f"| {row['model']} |" in md
        assert f"{row['quality']['beam']['bleu']:.1f}" in md
    assert (Path(out) / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_students_are_at_most_a_quarter_of_the_teacher_and_share_one_init(translation):
    from safetensors.torch import load_file

    out, _, _ = translation
    report = json.loads((Path(out) / "report.json").read_text())
    teacher = report["rows"][0]["parameters"]
    for row in report["rows"][1:]:
        assert 0 < row["parameters"] <= 0.25 * teacher
        assert row["parameters_vs_teacher"] == row["parameters"] / teacher
        assert row["speedup"] == report["rows"][0]["latency_ms"] / row["latency_ms"]
    init = load_file(str(Path(out) / "stages" / "s025-init" / "model.safetensors"))
    for v in SEQ2SEQ_VARIANTS:  # every variant trained from the same saved init, and changed it
        trained = load_file(
            str(Path(out) / "stages" / f"s025-{v}".replace("+", "_") / "model.safetensors")
        )
        assert trained.keys() == init.keys()
        assert any(not torch.equal(trained[k], init[k]) for k in init)
    transfer = [
        json.loads(line)
        for line in (Path(out) / "stages" / "transfer" / "transfer.jsonl").read_text().splitlines()
    ]
    train_rows = [
        json.loads(line)
        for line in (Path(out) / "stages" / "data-train" / "train.jsonl").read_text().splitlines()
    ]
    # every student learns from the whole training set: the transfer set is every training row
    assert report["plan"]["transfer_rows"] is None
    assert len(transfer) == report["data"]["transfer_rows"] == len(train_rows) == 160
    assert [(r["source"], r["target"]) for r in transfer] == [
        (r["source"], r["target"]) for r in train_rows
    ]
    # the Seq-KD variants' targets exist for every one of them
    assert all(isinstance(r["teacher"], str) and isinstance(r["inter"], str) for r in transfer)
    for (
        v
    ) in SEQ2SEQ_VARIANTS:  # each student's training file is that set: every training row, counted
        meta = _stage_meta(out, f"s025-{v}")
        assert meta["options"]["target"] in ("target", "teacher", "inter")
    for v in SEQ2SEQ_VARIANTS:  # the model card says what each student read: the file and its rows
        card = (Path(out) / "stages" / f"s025-{v}".replace("+", "_") / "README.md").read_text()
        read = re.search(r"- training data: `([^`]+)`, (\d+) rows", card)
        assert read and int(read.group(2)) == 160, (v, read)
        assert read.group(1).endswith("transfer.jsonl")


def test_the_best_student_by_validation_metric_is_served_and_scored_like_the_others(translation):
    """The serve stage: the student with the best validation BLEU (its stopping rule's metric, from the
    train logs, not the test rows) exported to CTranslate2 int8 -- smaller on disk, the same parameters;
    its row is scored by the
    same evaluation (test_report_numbers_equal_evaluate_on_the_saved_models covers every row) and is
    compared with the student it came from by the same paired bootstrap."""
    out, _, _ = translation
    report = json.loads((Path(out) / "report.json").read_text())
    rows = {r["model"]: r for r in report["rows"]}
    best = {}
    for name in STUDENTS:
        log = json.loads(
            (Path(out) / "stages" / name.replace("+", "_") / "train_log.json").read_text()
        )
        assert log["metric"] == "eval_bleu" and log["greater_is_better"] is True
        best[name] = max(p["metric"] for p in log["curve"])
    source = min(STUDENTS, key=lambda n: (-best[n], STUDENTS.index(n)))
    served = rows["served"]
    assert served["source"] == source == report["plan"]["served"]["student"]
    assert report["plan"]["served"]["validation_metric"] == pytest.approx(best[source])
    assert report["plan"]["served"]["metric"] == "eval_bleu"
    meta = json.loads((Path(out) / "stages" / "serve" / "lmkd_export.json").read_text())
    assert meta["format"] == "ct2-int8" and meta["engine"] == "ctranslate2"
    assert served["parameters"] == rows[source]["parameters"]
    assert served["bytes_on_disk"] < 0.5 * rows[source]["bytes_on_disk"]
    assert served["label"] == f"{rows[source]['label']}, served (CTranslate2 int8)"
    label = served["label"][0].upper() + served["label"][1:]  # the verdicts name it so
    # vs its student, vs the teacher (the verdict lines of its comparisons: the tiny students score 0, so the
    # report gives one "no verdict" line instead)
    from lmkd.study.verdicts import verdict_line

    assert (
        sum(
            verdict_line(c, "bleu").startswith(label) for c in report["significance"]["comparisons"]
        )
        == 2
    )
    assert served["ms_per_token"] > 0 and served["latency_ms"] > 0
    comps = [c for c in report["significance"]["comparisons"] if c["a"] == "served"]
    assert [(c["kind"], c["b"]) for c in comps] == [
        ("served-vs-student", source),
        ("vs-teacher", "teacher"),
    ]
    md = (Path(out) / "report.md").read_text()
    assert f"Served: {source}, the student with the best validation BLEU (greedy)" in md
    assert "| MB on disk |" in md


def test_serve_stage_skips_with_a_note_when_the_engine_cannot_export(monkeypatch):
    from lmkd.study import serving

    def refuse(fmt, config, kind):
        raise LmkdError("ctranslate2 needs the ctranslate2 package(s): pip install 'lmkd[deploy]'")

    class NoStages:
        def run(self, *a, **k):
            raise AssertionError("nothing is exported")

    monkeypatch.setattr(serving.engines, "check_exportable", refuse)
    monkeypatch.setattr(serving, "load_config", lambda d: None)
    opts = StudyOptions(task="translation", budget="tiny", output="unused").resolve()
    models = {
        "teacher": {"variant": "teacher"},
        "a": {"variant": "baseline", "dir": "x", "stage": "a", "size": 0.25},
    }
    curve = {"curve": [{"step": 4, "metric": 2.0}]}
    assert serving.serve_stage(NoStages(), opts, models, lambda m: curve) == {}
    assert opts.plan.notes == [
        "No served model (CTranslate2 int8): ctranslate2 needs the ctranslate2 "
        "package(s): pip install 'lmkd[deploy]'"
    ]
    assert opts.plan.served is None and "served" not in opts.plan.to_dict()
    opts = StudyOptions(task="translation", budget="tiny", output="unused", serve=False).resolve()
    assert serving.serve_stage(NoStages(), opts, models, lambda m: curve) == {}
    assert opts.plan.notes == []


def test_best_student_is_the_best_by_its_rules_direction_first_on_ties():
    from lmkd.study.serving import best_student

    logs = {"a": [3.0, 2.5], "b": [2.9, 2.4, 2.6], "c": [2.4], "d": []}
    models = {
        "teacher": {"variant": "teacher"},
        **{n: {"variant": "baseline", "name": n} for n in logs},
    }
    for greater, expected in ((False, ("b", 2.4, "eval_loss_ce")), (True, ("a", 3.0, "eval_bleu"))):
        metric = "eval_bleu" if greater else "eval_loss_ce"
        read = lambda m, g=greater, k=metric: {  # noqa: E731
            "curve": [{"step": i, "metric": v} for i, v in enumerate(logs[m["name"]])],
            "metric": k,
            "greater_is_better": g,
        }
        assert best_student(models, read) == expected
        assert best_student({"teacher": {"variant": "teacher"}}, read) is None


def test_same_command_again_recomputes_nothing(translation):
    out, _, _ = translation
    report = (Path(out) / "report.json").read_text()
    run_study(StudyOptions(task="translation", budget="tiny", teacher_check=False, output=out))
    assert _log(out) == TRANSLATION_STAGES
    assert (Path(out) / "report.json").read_text() == report


def test_students_stop_on_their_plateau_and_keep_their_best_weights(translation):
    """Every student's train_log.json: the validation BLEU of its greedy outputs every eval_every steps
    (the same rule for every variant, Seq-KD included), within the cap; stopped early exactly when it
    trained fewer steps than the cap, and the saved student is the best evaluation's (min_delta 0 on
    the tiny budget: the maximum of the curve, the first of ties)."""
    out, _, _ = translation
    report = json.loads((Path(out) / "report.json").read_text())
    plan = report["plan"]
    for row in report["rows"][1:-1]:  # the students (the last row is the served export)
        stage = Path(out) / "stages" / row["model"].replace("+", "_")
        log = json.loads((stage / "train_log.json").read_text())
        assert log["metric"] == "eval_bleu" and log["greater_is_better"] and log["kept"] == "best"
        assert 0 < log["steps"] <= plan["student_steps"]
        assert log["stopped_early"] == (log["steps"] < plan["student_steps"])
        steps = [p["step"] for p in log["curve"]]
        assert steps == list(range(plan["eval_every"], log["steps"] + 1, plan["eval_every"])) + (
            [log["steps"]] if log["steps"] % plan["eval_every"] else []
        )
        values = [p["metric"] for p in log["curve"]]
        assert (
            log["best_metric"] == max(values)
            and log["best_step"] == steps[values.index(max(values))]
        )
        assert all("loss_ce" in p for p in log["curve"])  # the gold CE is recorded beside it
        # run_distill evaluates the saved (restored) student once more after training
        final = json.loads((stage / "distill_results.json").read_text())["eval_bleu"]
        assert final == pytest.approx(max(values), abs=1e-6)


def test_a_stage_run_again_redoes_what_was_built_from_it(translation):
    """Deleting the speed stage (to time the models again on an idle machine, as the report advises)
    redoes it and the report built from it -- not only the deleted stage."""
    import shutil

    out, _, _ = translation
    before = json.loads((Path(out) / "stages" / "report" / "stage.json").read_text())
    shutil.rmtree(Path(out) / "stages" / "speed")
    n = len(_log(out))
    run_study(StudyOptions(task="translation", budget="tiny", teacher_check=False, output=out))
    assert _log(out)[n:] == ["speed", "report"]
    after = json.loads((Path(out) / "stages" / "report" / "stage.json").read_text())
    assert after["deps"]["speed"] != before["deps"]["speed"] and after["key"] != before["key"]


def test_seeds_train_every_variant_again_and_share_the_teacher_and_transfer_set(
    translation, capsys
):
    from safetensors.torch import load_file

    from lmkd.study.options import count_stages

    out, _, _ = translation
    n = len(_log(out))
    opts = StudyOptions(
        task="translation", budget="tiny", teacher_check=False, output=out, seeds=2, serve=False
    )
    run_study(opts)
    seed2 = ["s025-init-seed43"] + [f"s025-{v}-seed43" for v in SEQ2SEQ_VARIANTS]
    # the first seed's stages (and the teacher, the transfer set) are the one-seed study's, cached
    assert sorted(_log(out)[n:]) == sorted(
        seed2 + [f"eval-s025-{v}-seed43" for v in SEQ2SEQ_VARIANTS] + ["speed", "report"]
    )
    total = count_stages(opts)
    assert (
        total == len(TRANSLATION_STAGES) - 2 + 2 * len(SEQ2SEQ_VARIANTS) + 1
    )  # (no serve, eval-served)
    assert f"[{total}/{total}] report" in capsys.readouterr().out
    for v in SEQ2SEQ_VARIANTS:
        first = Path(out) / "stages" / f"s025-{v}".replace("+", "_")
        second = Path(out) / "stages" / f"s025-{v}-seed43".replace("+", "_")
        assert _stage_meta(out, f"s025-{v}-seed43")["options"]["seed"] == 43
        assert _stage_meta(out, f"s025-{v}")["options"]["seed"] == 42
        a, b = (
            load_file(str(first / "model.safetensors")),
            load_file(str(second / "model.safetensors")),
        )
        assert any(not torch.equal(a[k], b[k]) for k in a)
        assert json.loads((second / "train_log.json").read_text())["steps"] > 0
    report = json.loads((Path(out) / "report.json").read_text())
    assert [r["model"] for r in report["rows"]] == (
        ["teacher"]
        + [f"s025-{v}" for v in SEQ2SEQ_VARIANTS]
        + [f"s025-{v}-seed43" for v in SEQ2SEQ_VARIANTS]
    )
    # back to one seed (and the served export): nothing retrains or re-exports, the report has the one-seed rows again
    n = len(_log(out))
    run_study(StudyOptions(task="translation", budget="tiny", teacher_check=False, output=out))
    assert sorted(_log(out)[n:]) == ["report", "speed"]


def test_changed_kd_alpha_recomputes_only_the_word_kd_stages(translation):
    out, _, _ = translation
    n = len(_log(out))
    report = run_study(
        StudyOptions(
            task="translation",
            budget="tiny",
            teacher_check=False,
            output=out,
            kd_alpha=0.9,
            serve=False,
        )
    )
    assert sorted(_log(out)[n:]) == sorted(
        [
            "s025-word-kd",
            "s025-seq-kd+word-kd",
            "eval-s025-word-kd",
            "eval-s025-seq-kd+word-kd",
            "speed",
            "report",
        ]
    )
    assert report["plan"]["kd_alpha"] == 0.9
    # a second student size adds its own stages and reuses everything else
    n = len(_log(out))
    report = run_study(
        StudyOptions(
            task="translation",
            budget="tiny",
            teacher_check=False,
            output=out,
            kd_alpha=0.9,
            student_sizes=[0.25, 0.5],
            serve=False,
        )
    )
    new = _log(out)[n:]
    assert sorted(new) == sorted(
        ["s05-init"]
        + [f"s05-{v}" for v in SEQ2SEQ_VARIANTS]
        + [f"eval-s05-{v}" for v in SEQ2SEQ_VARIANTS]
        + ["speed", "report"]
    )
    assert len(report["rows"]) == 1 + 2 * len(SEQ2SEQ_VARIANTS)


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(student_sizes=[1.5]), "--student-sizes"),
        (dict(train="a.jsonl"), "--validation"),
        (dict(kd_alpha=0.0), "--kd-alpha"),
        (
            dict(task="summarization", source_column="text"),
            "--train, --validation and --test are needed",
        ),
        (dict(seeds=0), "--seeds"),
    ],
)
def test_bad_options_are_one_line_errors(tmp_path, options, message):
    opts = dict(task="translation", budget="tiny", teacher_check=False, output=str(tmp_path / "o"))
    opts.update(options)
    with pytest.raises(LmkdError, match=message.replace("-", r"\-")):
        run_study(StudyOptions(**opts))


@pytest.mark.parametrize(
    "task, columns",
    [
        ("translation", ("source", "target")),
        ("summarization", ("document", "summary")),
        ("classification", ("text", "label")),
    ],
)
def test_every_task_has_a_shipped_corpus(tmp_path, task, columns):
    """Without --train/--validation/--test a study runs on the task's shipped DDTP corpus: files that
    exist, with the task's default columns in every row read."""
    import gzip

    opts = StudyOptions(task=task, budget="tiny", output=str(tmp_path / "o")).resolve()
    for split, path in (
        ("train", opts.train),
        ("validation", opts.validation),
        ("test", opts.test),
    ):
        assert Path(path).name.endswith(f".{split}.jsonl.gz")
        with gzip.open(path, "rt", encoding="utf-8") as f:
            rows = [json.loads(line) for line in f]
        assert len(rows) >= 1000 and all(set(columns) <= r.keys() for r in rows)


def test_missing_column_names_the_flag(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"en": "a", "fr": "b"}) + "\n")
    with pytest.raises(LmkdError, match="--source-column"):
        run_study(
            StudyOptions(
                task="translation",
                budget="tiny",
                teacher_check=False,
                output=str(tmp_path / "o"),
                train=str(path),
                validation=str(path),
                test=str(path),
            )
        )


def _write(path: Path, rows: list[dict]) -> str:
    path.write_text(
        "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8"
    )
    return str(path)


@pytest.mark.slow
def test_tiny_classification_study(tmp_path, one_thread):
    """Language identification (en/fr) from the shipped corpus with string labels: fine-tuning
    alone, task KD, the DistilBERT path and MLM-distil + task KD, reported with the accuracy
    `evaluate_models` gives."""
    from lmkd.evaluate.run import evaluate_models

    files = _language_id_files(tmp_path)
    out = str(tmp_path / "cls")
    report = run_study(
        StudyOptions(
            task="classification",
            budget="tiny",
            teacher_check=False,
            output=out,
            source_column="sentence",
            target_column="lang",
            **files,
        )
    )
    assert _log(out) == [
        "data-train",
        "data-validation",
        "data-test",
        "tokenizer",
        "lengths",
        "teacher-mlm",
        "teacher",
        "s05-init",
        "s05-mlm-distil",
        "s05-no-kd",
        "s05-task-kd",
        "s05-distilbert",
        "s05-distilbert+task-kd",
        "eval-teacher",
        "eval-s05-no-kd",
        "eval-s05-task-kd",
        "eval-s05-distilbert",
        "eval-s05-distilbert+task-kd",
        "serve",
        "eval-served",
        "speed",
        "report",
    ]
    assert [r["model"] for r in report["rows"]] == [
        "teacher",
        "s05-no-kd",
        "s05-task-kd",
        "s05-distilbert",
        "s05-distilbert+task-kd",
        "served",
    ]
    served = json.loads((Path(out) / "stages" / "serve" / "lmkd_export.json").read_text())
    assert (
        served["format"] == "onnx-int8"
        and report["rows"][-1]["source"] == report["plan"]["served"]["student"]
    )
    assert report["plan"]["notes"] == []
    test_file = str(Path(out) / "stages" / "data-test" / "test.jsonl")
    for row in report["rows"]:
        res = evaluate_models(
            {"m": row["path"]},
            test_file,
            "classification",
            source_column="text",
            target_column="label",
            speed_samples=0,
            progress=False,
        )
        assert res["models"]["m"]["quality"] == {
            k: row["quality"][k] for k in ("accuracy", "macro_f1")
        }
    # the student keeps every other teacher layer (2 -> 1)
    cfg = json.loads((Path(out) / "stages" / "s05-init" / "config.json").read_text())
    assert cfg["num_hidden_layers"] == 1 and cfg["lmkd_layer_map"] == {"layers": [0]}
    labels = json.loads((Path(out) / "stages" / "data-train" / "info.json").read_text())["labels"]
    assert labels == ["en", "fr"]
    # task KD from the fine-tuned teacher classifier; the DistilBERT variants start from the MLM-distilled student
    for variant, start, kd in (
        ("no-kd", "s05-init", False),
        ("task-kd", "s05-init", True),
        ("distilbert", "s05-mlm-distil", False),
        ("distilbert+task-kd", "s05-mlm-distil", True),
    ):
        meta = _stage_meta(out, f"s05-{variant}")
        assert start in meta["deps"] and ("teacher" in meta["deps"]) == kd
        assert meta["options"].get("kd_alpha") == (0.5 if kd else None)
        train_log = json.loads(
            (
                Path(out) / "stages" / f"s05-{variant}".replace("+", "_") / "train_log.json"
            ).read_text()
        )
        assert (
            train_log["metric"] == "eval_accuracy"
            and 0 < train_log["steps"] <= report["plan"]["student_steps"]
        )
    mlm_log = json.loads((Path(out) / "stages" / "s05-mlm-distil" / "train_log.json").read_text())
    assert (
        mlm_log["steps"] > 0 and mlm_log["metric"] == "eval_loss_ce"
    )  # MLM distillation: no task metric


@pytest.mark.slow
def test_tiny_summarization_study_with_named_columns(tmp_path, one_thread):
    from lmkd.evaluate.run import evaluate_models

    files = {
        split: _write(
            tmp_path / f"{split}.jsonl",
            [{"document": r["source"], "summary": r["target"]} for r in corpus_rows(split, 200)],
        )
        for split in ("train", "validation", "test")
    }
    out = str(tmp_path / "sum")
    report = run_study(
        StudyOptions(task="summarization", budget="tiny", teacher_check=False, output=out, **files)
    )
    assert report["rows"][0]["main_metric"] == "beam.rouge2"
    test_file = str(Path(out) / "stages" / "data-test" / "test.jsonl")
    row = report["rows"][1]
    res = evaluate_models(
        {"m": row["path"]},
        test_file,
        "summarization",
        source_column="source",
        target_column="target",
        num_beams=report["plan"]["beams"],
        max_new_tokens=report["plan"]["max_new_tokens"],
        speed_samples=0,
        progress=False,
    )
    assert res["models"]["m"]["quality"] == row["quality"]["beam"]
    assert "ROUGE-2 beam" in (Path(out) / "report.md").read_text()


def test_cli_help_has_examples(capsys):
    from lmkd.cli import main

    with pytest.raises(SystemExit) as e:
        main(["study", "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    assert "examples:" in text and "--student-sizes" in text and "--budget" in text


def test_student_init_copies_teacher_layers_when_they_fit_else_builds_a_narrower_model():
    from lmkd.models.scratch import build_model
    from lmkd.models.size import count_parameters
    from lmkd.models.student import copied_layers_within, scaled_student_config
    from lmkd.models.student import spread_layers as _spread

    assert _spread(12, 3) == [0, 6, 11] and _spread(3, 1) == [0] and _spread(6, 2) == [0, 5]
    teacher = build_model(
        "bart", 4000, d_model=256, layers=3, ffn=1024
    )  # the quick budget's teacher
    n = count_parameters(teacher)
    assert copied_layers_within(teacher, 0.25) is None  # embeddings + 1+1 layers are ~43%
    cfg = scaled_student_config(teacher, 0.25)
    student = type(teacher)(cfg)
    assert count_parameters(student) <= 0.25 * n
    assert (cfg.d_model, cfg.encoder_layers, cfg.decoder_layers, cfg.encoder_ffn_dim) == (
        128,
        2,
        2,
        512,
    )
    assert copied_layers_within(teacher, 0.5) == {"encoder": [0], "decoder": [0]}
    assert copied_layers_within(teacher, 0.7) == {"encoder": [0, 1, 2], "decoder": [0]}
    assert copied_layers_within(teacher, 0.75) == {"encoder": [0, 2], "decoder": [0, 2]}


@pytest.mark.slow
def test_given_teacher_is_used_with_its_tokenizer(translation, tmp_path):
    """--teacher: no tokenizer or teacher training; the students are built from the given teacher."""
    out, _, _ = translation
    teacher = str(Path(out) / "stages" / "teacher")
    dest = str(tmp_path / "given")
    report = run_study(
        StudyOptions(
            task="translation", budget="tiny", teacher_check=False, output=dest, teacher=teacher
        )
    )
    log = _log(dest)
    assert "tokenizer" not in log and log[:4] == [
        "data-train",
        "data-validation",
        "data-test",
        "teacher",
    ]
    assert report["rows"][0]["path"] == os.path.abspath(teacher)
    first = json.loads((Path(out) / "report.json").read_text())["rows"][0]
    assert report["rows"][0]["quality"] == first["quality"]  # the same teacher scores the same
    init_vocab = json.loads((Path(dest) / "stages" / "s025-init" / "tokenizer.json").read_text())[
        "model"
    ]
    assert init_vocab == json.loads((Path(teacher) / "tokenizer.json").read_text())["model"]


# ---- early stopping: the rule, the callback, real tiny runs ---------------------------------------


def test_plateau_rule_stops_a_flat_metric_and_not_an_improving_one():
    from lmkd.study.stopping import Plateau, plateau_stop

    assert (
        plateau_stop([2.0] * 10, patience=3, min_delta=0.0) == 3
    )  # the first value, then 3 without gain
    assert plateau_stop([5.0, 4.0, 3.0, 2.5, 2.25, 2.2], patience=2, min_delta=0.0) is None
    assert (
        plateau_stop([5.0, 4.0, 3.0, 2.5, 2.25, 2.2], patience=1, min_delta=0.1) == 5
    )  # 0.05 < min_delta
    # gains smaller than min_delta do not count; a real gain resets the count
    assert plateau_stop([1.0, 0.995, 0.99, 0.98], patience=2, min_delta=0.01) == 2
    assert plateau_stop([3.0, 2.0, 2.0, 1.5, 1.5, 1.5], patience=2, min_delta=0.0) == 5
    assert plateau_stop([3.0, 3.5, 2.0, 2.5, 2.6], patience=2, min_delta=0.0) == 4
    assert plateau_stop([float("nan")] * 3, patience=2, min_delta=0.0) == 1  # NaN never improves
    p = Plateau(patience=2, min_delta=0.0)
    for v in (3.0, 2.0, 2.5):
        p.update(v)
    assert (p.best, p.best_index, p.bad) == (2.0, 1, 1)
    with pytest.raises(LmkdError, match="patience"):
        Plateau(patience=0, min_delta=0.0)


def test_plateau_rule_on_a_task_metric_stops_flat_and_not_improving():
    """A larger value is a gain on BLEU / ROUGE / accuracy: the same rule, the other direction."""
    from lmkd.study.stopping import Plateau, StoppingRule, plateau_stop

    assert plateau_stop([10.0] * 6, patience=3, min_delta=0.0, greater_is_better=True) == 3
    assert (
        plateau_stop(
            [1.0, 2.0, 3.0, 4.0, 4.5, 5.0], patience=2, min_delta=0.1, greater_is_better=True
        )
        is None
    )
    assert (
        plateau_stop([1.0, 2.0, 2.05, 2.08], patience=2, min_delta=0.1, greater_is_better=True) == 3
    )
    p = Plateau(patience=2, min_delta=0.0, greater_is_better=True)
    for v in (3.0, 5.0, 4.0):
        p.update(v)
    assert (p.best, p.best_index, p.bad) == (5.0, 1, 1)
    plan = StudyOptions(task="translation", budget="quick", output="unused").resolve().plan
    rules = {
        task: StoppingRule.from_plan(plan, task)
        for task in ("translation", "summarization", "classification", "mlm")
    }
    assert [(r.metric, r.greater_is_better, r.min_delta) for r in rules.values()] == [
        ("eval_bleu", True, plan.metric_min_delta),
        ("eval_rougeL", True, plan.metric_min_delta),
        ("eval_accuracy", True, plan.metric_min_delta),
        ("eval_loss_ce", False, plan.min_delta),
    ]
    assert rules["translation"].generates and not rules["classification"].generates


def test_plateau_callback_stops_training_and_puts_the_best_weights_back():
    from transformers import TrainerControl, TrainerState

    from lmkd.study.stopping import PlateauStopping, StoppingRule

    def run(values, cap=100):
        model = torch.nn.Linear(2, 1, bias=False)
        cb = PlateauStopping(StoppingRule(eval_every=10, patience=2, min_delta=0.0))
        state, control = TrainerState(max_steps=cap), TrainerControl()
        cb.on_train_begin(None, state, control)
        for i, v in enumerate(values):
            state.global_step = 10 * (i + 1)
            with torch.no_grad():
                model.weight.fill_(float(i))  # the weights at evaluation i are all i
            cb.on_evaluate(
                None, state, control, metrics={"eval_loss_ce": v, "eval_loss": v + 1}, model=model
            )
            if control.should_training_stop:
                break
        cb.on_train_end(None, state, control, model=model)
        cb.on_evaluate(
            None, state, control, metrics={"eval_loss_ce": 0.0}, model=model
        )  # after training
        return cb.log(), model.weight.flatten().tolist()

    log, weights = run([3.0, 2.0, 2.5, 2.4, 1.0])
    assert log["stopped_early"] and log["steps"] == 40 and log["max_steps"] == 100
    assert log["curve"] == [
        {"step": 10, "metric": 3.0},
        {"step": 20, "metric": 2.0},
        {"step": 30, "metric": 2.5},
        {"step": 40, "metric": 2.4},
    ]
    assert (log["best_step"], log["best_metric"]) == (20, 2.0) and weights == [1.0, 1.0]
    log, weights = run([3.0, 2.0, 1.5, 1.0], cap=40)  # improving to the cap: not stopped, last kept
    assert (
        not log["stopped_early"]
        and log["steps"] == 40
        and log["best_step"] == 40
        and weights == [3.0, 3.0]
    )
    log, _ = run([3.0, 3.0, 3.0], cap=30)  # flat, but the plateau is reached at the cap itself
    assert not log["stopped_early"] and log["steps"] == 30
    with pytest.raises(LmkdError, match="eval_loss_ce"):
        cb = PlateauStopping(StoppingRule(eval_every=1, patience=1, min_delta=0.0))
        cb.on_train_begin(None, TrainerState(), TrainerControl())
        cb.on_evaluate(None, TrainerState(), TrainerControl(), metrics={"eval_loss": 1.0})


def test_no_stop_before_min_steps_then_patience_counts_from_there():
    """A student whose greedy outputs score 0 BLEU for its first evaluations (it has not learned to
    write yet) is not called a plateau before ``min_steps``; after it, a flat metric stops it after
    ``patience`` evaluations, and the best weights are kept from every evaluation."""
    from transformers import TrainerControl, TrainerState

    from lmkd.study.stopping import PlateauStopping, StoppingRule

    def run(values, min_steps, cap=200):
        rule = StoppingRule(10, 2, 0.1, "eval_bleu", True, min_steps=min_steps)
        cb = PlateauStopping(rule)
        state, control = TrainerState(max_steps=cap), TrainerControl()
        cb.on_train_begin(None, state, control)
        for i, v in enumerate(values):
            state.global_step = 10 * (i + 1)
            cb.on_evaluate(None, state, control, metrics={"eval_bleu": v})
            if control.should_training_stop:
                break
        cb.on_train_end(None, state, control)
        return cb.log()

    slow_start = [0.0, 0.0, 0.0, 0.0, 0.5, 2.0, 6.0, 9.0]
    assert run(slow_start, min_steps=0)["steps"] == 30  # the old rule: stopped at 0 BLEU
    log = run(slow_start, min_steps=50)
    assert not log["stopped_early"] and log["best_metric"] == 9.0
    flat = [0.0] * 12
    log = run(flat, min_steps=50)  # evaluations at 50 and 60 count: stopped at 60, not 30
    assert log["stopped_early"] and log["steps"] == 60
    log = run([0.0, 3.0, 1.0, 1.0, 1.0, 1.0], min_steps=30)  # best kept from before min_steps
    assert log["stopped_early"] and log["steps"] == 40 and log["best_metric"] == 3.0


def test_the_study_rule_waits_half_the_cap():
    from lmkd.study.stopping import StoppingRule

    rule = StoppingRule.from_plan(
        {"eval_every": 100, "patience": 3, "metric_min_delta": 0.1, "student_steps": 1500},
        "translation",
    )
    assert (rule.min_steps, rule.metric, rule.greater_is_better) == (750, "eval_bleu", True)
    assert StoppingRule(**rule.options()) == rule  # a worker's job rebuilds the same rule
    from lmkd.study.causal_lm_eval import CAUSAL_METRIC

    causal = StoppingRule.from_plan(
        {"eval_every": 50, "patience": 3, "metric_min_delta": 0.1, "student_steps": 250},
        "causal-lm",
    )
    assert (causal.metric, causal.greater_is_better, causal.min_steps, causal.min_delta) == (
        f"eval_{CAUSAL_METRIC}",
        True,
        125,
        0.1,
    )


def test_tiny_real_students_flat_is_stopped_early_improving_is_not(tmp_path, tiny_model_dir):
    """Real DistillationTrainer runs: a student that cannot learn (learning rate 0: its validation
    CE is flat) stops after `patience` evaluations; one that learns trains to the cap."""
    from lmkd.study.models import StoppingRule, train_student
    from lmkd.study.plan import BUDGETS, Plan

    rows = corpus_rows("train", 96)
    train = _write(tmp_path / "train.jsonl", rows[:64])
    val = _write(tmp_path / "val.jsonl", rows[64:])
    init = tiny_model_dir("bart", d_model=32, layers=1, heads=2, ffn=64)
    plan = Plan(**BUDGETS["tiny"], kd_temperature=1.0)
    rule = StoppingRule(eval_every=3, patience=2, min_delta=0.0)
    logs = {}
    for name, lr, cap in (("flat", 0.0, 30), ("learns", 3e-3, 9)):
        out = str(tmp_path / name)
        metrics = train_student(
            out, init, "translation", train, val, plan, steps=cap, lr=lr, seed=0, stopping=rule
        )
        logs[name] = log = json.loads((Path(out) / "train_log.json").read_text())
        assert {"steps", "stopped_early", "curve", "metric"} <= set(log) and log[
            "metric"
        ] == "eval_loss_ce"
        assert metrics["eval_loss_ce"] == pytest.approx(log["best_metric"], abs=2e-6)
    flat, learns = logs["flat"], logs["learns"]
    assert flat["stopped_early"] and flat["steps"] == 3 * (
        2 + 1
    )  # best at the first evaluation, 2 more
    assert [p["step"] for p in flat["curve"]] == [3, 6, 9]
    assert len({p["metric"] for p in flat["curve"]}) == 1
    assert not learns["stopped_early"] and learns["steps"] == 9
    values = [p["metric"] for p in learns["curve"]]
    assert [p["step"] for p in learns["curve"]] == [3, 6, 9] and values == sorted(
        values, reverse=True
    )
    assert values[-1] < values[0] and learns["best_step"] == 9


def test_study_rule_stops_a_flat_bleu_for_a_seq_kd_student_as_for_a_baseline(
    tmp_path, tiny_model_dir
):
    """The study's rule on translation (validation BLEU of greedy outputs, higher is better), real
    DistillationTrainer runs: a baseline (gold targets) and a Seq-KD student (the teacher's outputs as
    targets; validated against the gold, as the study's validation split does) that cannot learn (lr
    0: the same outputs at every evaluation) both stop after `patience` evaluations; a student that
    learns its rows (the validation rows are its training rows) improves its BLEU and is not stopped."""
    from lmkd.study.models import StoppingRule, train_student
    from lmkd.study.plan import BUDGETS, Plan

    rows = corpus_rows("train", 12)
    seqkd_rows = [{**r, "teacher": r["target"].split(" ")[0] + " " + r["target"]} for r in rows]
    train = _write(tmp_path / "train.jsonl", seqkd_rows)
    val = _write(tmp_path / "val.jsonl", [{**r, "teacher": r["target"]} for r in rows])
    init = tiny_model_dir("bart", d_model=32, layers=1, heads=2, ffn=64)
    plan = Plan(**BUDGETS["tiny"], kd_temperature=1.0)
    rule = StoppingRule.from_plan(plan, "translation")
    assert (rule.metric, rule.greater_is_better) == ("eval_bleu", True)
    for column in ("target", "teacher"):
        out = str(tmp_path / f"flat-{column}")
        train_student(
            out,
            init,
            "translation",
            train,
            val,
            plan,
            steps=30,
            lr=0.0,
            seed=0,
            target_column=column,
            stopping=StoppingRule(3, 2, 0.0, rule.metric, True),
        )
        log = json.loads((Path(out) / "train_log.json").read_text())
        assert log["metric"] == "eval_bleu" and log["stopped_early"] and log["steps"] == 9
        assert len({p["metric"] for p in log["curve"]}) == 1
    out = str(tmp_path / "learns")
    train_student(
        out,
        init,
        "translation",
        train,
        val,
        plan,
        steps=60,
        lr=1e-2,
        seed=0,
        stopping=StoppingRule(20, 2, 0.0, rule.metric, True),
    )
    log = json.loads((Path(out) / "train_log.json").read_text())
    values = [p["metric"] for p in log["curve"]]
    assert not log["stopped_early"] and log["steps"] == 60 and values[-1] > values[0]


def test_train_student_stopping_needs_a_validation_file(tmp_path):
    from lmkd.study.models import StoppingRule, train_student
    from lmkd.study.plan import BUDGETS

    # (the plan a budget table's dict, as the benchmarks give it)
    with pytest.raises(LmkdError, match="validation"):
        train_student(
            str(tmp_path / "o"),
            str(tmp_path),
            "translation",
            str(tmp_path / "t.jsonl"),
            None,
            BUDGETS["tiny"],
            steps=3,
            lr=1e-3,
            stopping=StoppingRule(1, 1, 0.0),
        )


# ---- classification: a teacher without an MLM head ------------------------------------------------


def _language_id_files(tmp_path, sizes=(("train", 150), ("validation", 20), ("test", 30))) -> dict:
    files = {}
    for split, n in sizes:
        rows = []
        for r in corpus_rows(split, n):
            rows += [
                {"sentence": r["source"], "lang": "en"},
                {"sentence": r["target"], "lang": "fr"},
            ]
        random.Random(0).shuffle(rows)
        files[split] = _write(tmp_path / f"{split}.jsonl", rows)
    return files


def test_has_mlm_head_tells_a_masked_lm_from_a_bare_encoder(tmp_path, tiny_model_dir, tokenizer):
    from transformers import BertModel

    from lmkd.models.scratch import model_config
    from lmkd.study.models import has_mlm_head

    assert has_mlm_head(tiny_model_dir("bert", "mlm", d_model=32, layers=2, heads=2, ffn=64))
    bare = tmp_path / "bare"
    BertModel(
        model_config("bert", len(tokenizer), d_model=32, layers=2, heads=2, ffn=64)
    ).save_pretrained(bare)
    tokenizer.save_pretrained(bare)
    assert not has_mlm_head(str(bare))
    assert not has_mlm_head(
        tiny_model_dir("bert", "classification", d_model=32, layers=2, heads=2, ffn=64)
    )


@pytest.mark.slow
def test_classification_study_with_a_bare_encoder_teacher_skips_the_mlm_variants(
    tmp_path, tokenizer, capsys
):
    """A BertModel directory (no MLM head) as --teacher: fine-tuned as the teacher, no MLM-distil
    stage and no MLM-distil variant, and the report data says why."""
    from transformers import BertModel

    from lmkd.models.scratch import model_config

    teacher = tmp_path / "encoder"
    torch.manual_seed(0)
    BertModel(
        model_config("bert", len(tokenizer), d_model=32, layers=2, heads=2, ffn=64)
    ).save_pretrained(teacher)
    tokenizer.save_pretrained(teacher)
    files = _language_id_files(tmp_path)
    out = str(tmp_path / "cls")
    report = run_study(
        StudyOptions(
            task="classification",
            budget="tiny",
            teacher_check=False,
            output=out,
            source_column="sentence",
            target_column="lang",
            teacher=str(teacher),
            **files,
        )
    )
    log = _log(out)
    assert log == [
        "data-train",
        "data-validation",
        "data-test",
        "teacher-mlm",
        "lengths",
        "teacher",
        "s05-init",
        "s05-no-kd",
        "s05-task-kd",
        "eval-teacher",
        "eval-s05-no-kd",
        "eval-s05-task-kd",
        "serve",
        "eval-served",
        "speed",
        "report",
    ]
    assert f"[{len(log)}/{len(log)}] report" in capsys.readouterr().out  # count_stages knew
    assert [r["variant"] for r in report["rows"]] == ["teacher", "no-kd", "task-kd", "served"]
    notes = report["plan"]["notes"]
    assert len(notes) == 1 and "no masked-LM head" in notes[0] and "distilbert+task-kd" in notes[0]
    # the students copy the encoder's layers (every other: 2 -> 1) and are fine-tuned with a fresh head
    cfg = json.loads((Path(out) / "stages" / "s05-init" / "config.json").read_text())
    assert cfg["architectures"] == ["BertModel"] and cfg["lmkd_layer_map"] == {"layers": [0]}
    assert _stage_meta(out, "s05-task-kd")["options"]["kd_alpha"] == 0.5
    assert "kd_alpha" not in _stage_meta(out, "s05-no-kd")["options"]


def test_word_kd_students_read_the_cached_teacher_and_online_kd_runs_it(translation, tmp_path):
    """The Word-KD variants train from the teacher's log-probs cached once per target column (the
    cache's top-K equal the teacher's own log-softmax on the transfer rows, computed here directly);
    the other variants never see them; --online-kd retrains only the Word-KD students (and what was
    built from them), with the teacher loaded and no cache stage."""
    import shutil

    import yaml

    from lmkd.models.loading import load_model, load_tokenizer
    from lmkd.teacher.logit_cache import LogitCache

    out, _, _ = translation
    stages = Path(out) / "stages"
    caches = {"s025-word-kd": "kd-cache-target", "s025-seq-kd+word-kd": "kd-cache-teacher"}
    for v in SEQ2SEQ_VARIANTS:
        name = f"s025-{v}"
        meta = _stage_meta(out, name)
        config = yaml.safe_load((stages / name.replace("+", "_") / "lmkd_config.yaml").read_text())
        if name in caches:
            assert {caches[name], "kd-cache-validation"} <= set(meta["deps"])
            assert config["logit_cache"] == str(stages / caches[name] / "cache")
            assert config["eval_logit_cache"] == str(stages / "kd-cache-validation" / "cache")
            assert "teacher_model_name_or_path" not in config and config.get("kd_alpha", 0.5) > 0
        else:
            assert (
                not [d for d in meta["deps"] if d.startswith("kd-cache")]
                and "logit_cache" not in config
            )
    # the cached top-K of a transfer row are the teacher's log-probs at its gold target positions
    cache = LogitCache(str(stages / "kd-cache-target" / "cache"))
    row = json.loads((stages / "transfer-rows" / "transfer.jsonl").read_text().splitlines()[0])
    teacher_dir = str(stages / "teacher")
    tok, teacher = load_tokenizer(teacher_dir), load_model(teacher_dir).eval()
    enc = tok(row["source"], text_target=row["target"], return_tensors="pt")
    with torch.no_grad():
        logp = (
            teacher(
                input_ids=enc["input_ids"],
                attention_mask=enc["attention_mask"],
                labels=enc["labels"],
            )
            .logits.float()
            .log_softmax(-1)[0]
        )
    tokens, ids, logprobs, _ = cache.row(0)
    assert tokens.tolist() == enc["labels"][0].tolist()
    want = logp.topk(cache.top_k, dim=-1)
    assert ids[:, 0].tolist() == want.indices[:, 0].tolist()
    assert torch.tensor(logprobs.astype("float32")) == pytest.approx(
        want.values, abs=2e-3
    )  # stored as float16

    online = str(tmp_path / "online")
    shutil.copytree(out, online)
    n = len(_log(online))
    run_study(
        StudyOptions(
            task="translation", budget="tiny", teacher_check=False, output=online, online_kd=True
        )
    )
    redone = _log(online)[n:]
    assert sorted(v for v in redone if v.startswith("s025-")) == sorted(caches)
    assert not [v for v in redone if v.startswith("kd-cache")]
    for name in caches:
        config = yaml.safe_load(
            (Path(online) / "stages" / name.replace("+", "_") / "lmkd_config.yaml").read_text()
        )
        assert (
            config["teacher_model_name_or_path"] == teacher_dir.replace(out, online)
            and "logit_cache" not in config
        )
    report = json.loads((Path(online) / "report.json").read_text())
    assert report["plan"]["kd_cache"] is None
    assert "Word-KD teacher: online (--online-kd)" in (Path(online) / "report.md").read_text()
    assert (
        "kd_cache" not in _stage_meta(online, "s025-word-kd")["options"]
    )  # as before the cache existed
    assert "Word-KD teacher: the Word-KD variants read" in (Path(out) / "report.md").read_text()
