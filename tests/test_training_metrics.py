"""Metrics during training: with predict_with_generate, BLEU/chrF of the validation set; accuracy and
macro-F1 for classification -- equal to what `lmkd evaluate` reports on the saved student and the same
rows, and usable as metric_for_best_model."""

import json

import pytest
import yaml

from lmkd.cli import main
from lmkd.evaluate.run import evaluate_models


def write_yaml(path, **keys):
    path.write_text(yaml.safe_dump(keys))
    return str(path)


COMMON = dict(
    per_device_train_batch_size=8,
    per_device_eval_batch_size=4,
    learning_rate=1e-3,
    kd_alpha=0.5,
    report_to="none",
    use_cpu=True,
    logging_steps=1,
    max_eval_samples=8,
    seed=3,
)


def test_bleu_chrf_during_training_equal_lmkd_evaluate_and_pick_the_best(
    tmp_path, tiny_model_dir, translation_file
):
    teacher = tiny_model_dir("bart")
    student = tmp_path / "student"
    assert main(["make-student", "--teacher", teacher, "--output", str(student)]) == 0
    out = tmp_path / "out"
    recipe = write_yaml(
        tmp_path / "r.yaml",
        student_model_name_or_path=str(student),
        teacher_model_name_or_path=teacher,
        task="translation",
        train_file=translation_file,
        validation_file=translation_file,
        output_dir=str(out),
        max_steps=3,
        predict_with_generate=True,
        generation_num_beams=2,
        generation_max_length=9,
        eval_strategy="steps",
        eval_steps=1,
        save_strategy="steps",
        save_steps=1,
        metric_for_best_model="eval_chrf",
        load_best_model_at_end=True,
        **{**COMMON, "learning_rate": 2e-2},
    )
    assert main(["distill", recipe]) == 0
    results = json.loads((out / "distill_results.json").read_text())
    last = max(out.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    state = json.loads((last / "trainer_state.json").read_text())
    logged = [e["eval_chrf"] for e in state["log_history"] if "eval_chrf" in e]
    assert len(logged) == 3 and all(
        "eval_bleu" in e for e in state["log_history"] if "eval_chrf" in e
    )
    assert (
        state["best_metric"] == max(logged) > logged[-1]
    )  # metric_for_best_model read eval_chrf, not the loss
    # the loss stays the CE + KD mix (its parts are logged), not the model's own CE
    assert "eval_loss_kd" in results and "eval_loss_ce" in results
    # the best model was loaded at the end and saved: lmkd evaluate scores it the same on the same rows
    ev = evaluate_models(
        str(out),
        translation_file,
        "translation",
        num_beams=2,
        max_new_tokens=8,
        max_samples=8,
        max_source_length=128,
        speed_samples=0,
        device="cpu",
        progress=False,
    )
    q = ev["models"]["student"]["quality"]
    assert q["chrf"] > 0
    assert results["eval_chrf"] == pytest.approx(q["chrf"]) == pytest.approx(max(logged))
    assert results["eval_bleu"] == pytest.approx(q["bleu"])


def test_accuracy_during_training_equals_lmkd_evaluate(tmp_path, tiny_model_dir, corpus):
    teacher = tiny_model_dir("bert", kind="classification", seed=5)
    student = tiny_model_dir("bert", kind="classification", seed=6, layers=2)
    rows = [{"text": r["source"], "label": len(r["source"]) % 2} for r in corpus[:40]]
    data = tmp_path / "cls.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out"
    recipe = write_yaml(
        tmp_path / "c.yaml",
        student_model_name_or_path=student,
        teacher_model_name_or_path=teacher,
        task="classification",
        train_file=str(data),
        validation_file=str(data),
        output_dir=str(out),
        max_steps=2,
        save_strategy="no",
        **COMMON,
    )
    assert main(["distill", recipe]) == 0
    results = json.loads((out / "distill_results.json").read_text())
    ev = evaluate_models(
        str(out),
        str(data),
        "classification",
        max_samples=8,
        max_source_length=128,
        speed_samples=0,
        device="cpu",
        progress=False,
    )
    q = ev["models"]["student"]["quality"]
    assert 0 < q["accuracy"] < 100
    assert results["eval_accuracy"] == pytest.approx(q["accuracy"])
    assert results["eval_macro_f1"] == pytest.approx(q["macro_f1"])
