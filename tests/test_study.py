"""`lmkd study` on the tiny budget: it completes, its report equals `lmkd evaluate` on the saved
models, an interrupted study resumes without recomputing finished stages, and a changed option
recomputes only the stages that depend on it."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest
import torch

from conftest import corpus_rows
from lmkd.errors import LmkdError
from lmkd.study import SEQ2SEQ_VARIANTS, StudyOptions, StudyStopped, run_study

BEFORE_STOP = ["data-train", "data-validation", "data-test", "tokenizer", "lengths", "teacher", "transfer-rows", "transfer",
               "s025-init"]
TRANSLATION_STAGES = (BEFORE_STOP
                      + [f"s025-{v}" for v in SEQ2SEQ_VARIANTS]
                      + ["eval-teacher"] + [f"eval-s025-{v}" for v in SEQ2SEQ_VARIANTS]
                      + ["speed", "report"])


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run faster on one thread on a shared machine (and the numbers do not change)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _log(out) -> list[str]:
    path = Path(out) / "study.log"
    return [json.loads(line)["stage"] for line in path.read_text().splitlines()] if path.exists() else []


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
        run_study(StudyOptions(task="translation", budget="tiny", teacher_check=False, output=out), after_stage=stop_after_init)
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
    from lmkd.evaluate import evaluate_models

    out, _, _ = translation
    report = json.loads((Path(out) / "report.json").read_text())
    plan = report["plan"]
    test_file = str(Path(out) / "stages" / "data-test" / "test.jsonl")
    assert [r["model"] for r in report["rows"]] == ["teacher"] + [f"s025-{v}" for v in SEQ2SEQ_VARIANTS]
    for row in report["rows"]:
        for mode, beams in (("greedy", 1), ("beam", plan["beams"])):
            res = evaluate_models({"m": row["path"]}, test_file, "translation", num_beams=beams,
                                  max_new_tokens=plan["max_new_tokens"], speed_samples=0, progress=False)
            assert res["models"]["m"]["quality"] == row["quality"][mode]
            assert res["models"]["m"]["size"]["parameters"] == row["parameters"]
            saved = json.loads((Path(out) / "stages" / f"eval-{row['model']}".replace("+", "_")
                                / "quality.json").read_text())
            assert saved["predictions"][mode] == res["predictions"]["m"]
    # and through the command line, as a user would check it
    for row in report["rows"][:2]:
        dest = str(Path(out) / f"check-{row['model']}.json")
        assert main(["evaluate", "--model", row["path"], "--data", test_file, "--task", "translation",
                     "--num-beams", str(plan["beams"]), "--max-new-tokens", str(plan["max_new_tokens"]),
                     "--speed-samples", "0", "--output", dest]) == 0
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
        trained = load_file(str(Path(out) / "stages" / f"s025-{v}".replace("+", "_") / "model.safetensors"))
        assert trained.keys() == init.keys()
        assert any(not torch.equal(trained[k], init[k]) for k in init)
    transfer = [json.loads(line) for line in
                (Path(out) / "stages" / "transfer" / "transfer.jsonl").read_text().splitlines()]
    assert len(transfer) == report["data"]["transfer_rows"] == report["plan"]["transfer_rows"]
    gold = {r["source"]: r["target"] for r in
            map(json.loads, (Path(out) / "stages" / "data-train" / "train.jsonl").read_text().splitlines())}
    assert all(gold[r["source"]] == r["target"] for r in transfer)
    assert {"source", "target", "teacher", "inter"} <= set(transfer[0])


def test_same_command_again_recomputes_nothing(translation):
    out, _, _ = translation
    report = (Path(out) / "report.json").read_text()
    run_study(StudyOptions(task="translation", budget="tiny", teacher_check=False, output=out))
    assert _log(out) == TRANSLATION_STAGES
    assert (Path(out) / "report.json").read_text() == report


def test_changed_kd_alpha_recomputes_only_the_word_kd_stages(translation):
    out, _, _ = translation
    n = len(_log(out))
    report = run_study(StudyOptions(task="translation", budget="tiny", teacher_check=False, output=out, kd_alpha=0.9))
    assert sorted(_log(out)[n:]) == sorted(["s025-word-kd", "s025-seq-kd+word-kd", "eval-s025-word-kd",
                                            "eval-s025-seq-kd+word-kd", "speed", "report"])
    assert report["plan"]["kd_alpha"] == 0.9
    # a second student size adds its own stages and reuses everything else
    n = len(_log(out))
    report = run_study(StudyOptions(task="translation", budget="tiny", teacher_check=False, output=out, kd_alpha=0.9,
                                    student_sizes=[0.25, 0.5]))
    new = _log(out)[n:]
    assert sorted(new) == sorted(["s05-init"] + [f"s05-{v}" for v in SEQ2SEQ_VARIANTS]
                                 + [f"eval-s05-{v}" for v in SEQ2SEQ_VARIANTS] + ["speed", "report"])
    assert len(report["rows"]) == 1 + 2 * len(SEQ2SEQ_VARIANTS)


@pytest.mark.parametrize("options, message", [
    (dict(student_sizes=[1.5]), "--student-sizes"),
    (dict(train="a.jsonl"), "--validation"),
    (dict(kd_alpha=0.0), "--kd-alpha"),
    (dict(task="summarization"), "--train, --validation and --test are needed"),
])
def test_bad_options_are_one_line_errors(tmp_path, options, message):
    opts = dict(task="translation", budget="tiny", teacher_check=False, output=str(tmp_path / "o"))
    opts.update(options)
    with pytest.raises(LmkdError, match=message.replace("-", r"\-")):
        run_study(StudyOptions(**opts))


def test_missing_column_names_the_flag(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"en": "a", "fr": "b"}) + "\n")
    with pytest.raises(LmkdError, match="--source-column"):
        run_study(StudyOptions(task="translation", budget="tiny", teacher_check=False, output=str(tmp_path / "o"), train=str(path),
                               validation=str(path), test=str(path)))


def _write(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return str(path)


@pytest.mark.slow
def test_tiny_classification_study(tmp_path, one_thread):
    """Language identification (en/fr) from the shipped corpus with string labels: the DistilBERT
    path and plain fine-tuning, reported with the accuracy `evaluate_models` gives."""
    from lmkd.evaluate import evaluate_models

    files = {}
    for split, n in (("train", 150), ("validation", 20), ("test", 30)):
        rows = []
        for r in corpus_rows(split, n):
            rows += [{"sentence": r["source"], "lang": "en"}, {"sentence": r["target"], "lang": "fr"}]
        random.Random(0).shuffle(rows)
        files[split] = _write(tmp_path / f"{split}.jsonl", rows)
    out = str(tmp_path / "cls")
    report = run_study(StudyOptions(task="classification", budget="tiny", teacher_check=False, output=out, source_column="sentence",
                                    target_column="lang", **files))
    assert _log(out) == ["data-train", "data-validation", "data-test", "tokenizer", "lengths", "teacher-mlm", "teacher", "s05-init", "s05-mlm-distil",
                         "s05-distilbert", "s05-no-kd", "eval-teacher", "eval-s05-distilbert", "eval-s05-no-kd",
                         "speed", "report"]
    assert [r["model"] for r in report["rows"]] == ["teacher", "s05-distilbert", "s05-no-kd"]
    test_file = str(Path(out) / "stages" / "data-test" / "test.jsonl")
    for row in report["rows"]:
        res = evaluate_models({"m": row["path"]}, test_file, "classification", source_column="text",
                              target_column="label", speed_samples=0, progress=False)
        assert res["models"]["m"]["quality"] == {k: row["quality"][k] for k in ("accuracy", "macro_f1")}
    # the student keeps every other teacher layer (2 -> 1)
    cfg = json.loads((Path(out) / "stages" / "s05-init" / "config.json").read_text())
    assert cfg["num_hidden_layers"] == 1 and cfg["lmkd_layer_map"] == {"layers": [0]}
    labels = json.loads((Path(out) / "stages" / "data-train" / "info.json").read_text())["labels"]
    assert labels == ["en", "fr"]


@pytest.mark.slow
def test_tiny_summarization_study_with_named_columns(tmp_path, one_thread):
    from lmkd.evaluate import evaluate_models

    files = {split: _write(tmp_path / f"{split}.jsonl",
                           [{"document": r["source"], "summary": r["target"]} for r in corpus_rows(split, 200)])
             for split in ("train", "validation", "test")}
    out = str(tmp_path / "sum")
    report = run_study(StudyOptions(task="summarization", budget="tiny", teacher_check=False, output=out, **files))
    assert report["rows"][0]["main_metric"] == "beam.rouge2"
    test_file = str(Path(out) / "stages" / "data-test" / "test.jsonl")
    row = report["rows"][1]
    res = evaluate_models({"m": row["path"]}, test_file, "summarization", source_column="source",
                          target_column="target", num_beams=report["plan"]["beams"],
                          max_new_tokens=report["plan"]["max_new_tokens"], speed_samples=0, progress=False)
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
    from lmkd.scratch import build_model
    from lmkd.modeling import count_parameters
    from lmkd.student import copied_layers_within, scaled_student_config
    from lmkd.student import spread_layers as _spread

    assert _spread(12, 3) == [0, 6, 11] and _spread(3, 1) == [0] and _spread(6, 2) == [0, 5]
    teacher = build_model("bart", 4000, d_model=256, layers=3, ffn=1024)  # the quick budget's teacher
    n = count_parameters(teacher)
    assert copied_layers_within(teacher, 0.25) is None  # embeddings + 1+1 layers are ~43%
    cfg = scaled_student_config(teacher, 0.25)
    student = type(teacher)(cfg)
    assert count_parameters(student) <= 0.25 * n
    assert (cfg.d_model, cfg.encoder_layers, cfg.decoder_layers, cfg.encoder_ffn_dim) == (128, 2, 2, 512)
    assert copied_layers_within(teacher, 0.5) == {"encoder": [0], "decoder": [0]}
    assert copied_layers_within(teacher, 0.7) == {"encoder": [0, 1, 2], "decoder": [0]}
    assert copied_layers_within(teacher, 0.75) == {"encoder": [0, 2], "decoder": [0, 2]}


@pytest.mark.slow
def test_given_teacher_is_used_with_its_tokenizer(translation, tmp_path):
    """--teacher: no tokenizer or teacher training; the students are built from the given teacher."""
    out, _, _ = translation
    teacher = str(Path(out) / "stages" / "teacher")
    dest = str(tmp_path / "given")
    report = run_study(StudyOptions(task="translation", budget="tiny", teacher_check=False, output=dest, teacher=teacher))
    log = _log(dest)
    assert "tokenizer" not in log and log[:4] == ["data-train", "data-validation", "data-test", "teacher"]
    assert report["rows"][0]["path"] == os.path.abspath(teacher)
    first = json.loads((Path(out) / "report.json").read_text())["rows"][0]
    assert report["rows"][0]["quality"] == first["quality"]  # the same teacher scores the same
    init_vocab = json.loads((Path(dest) / "stages" / "s025-init" / "tokenizer.json").read_text())["model"]
    assert init_vocab == json.loads((Path(teacher) / "tokenizer.json").read_text())["model"]
