"""issue 17: every saved student carries a model card (the hub's YAML metadata + how it was made)
and lmkd_config.yaml, which `lmkd distill` accepts to train the same student again."""

import json

import pytest
import torch
import yaml
from transformers import AutoModelForSeq2SeqLM

from lmkd import DistillationConfig, DistillationTrainer
from lmkd.cli import main
from lmkd.data.dataset import DataArguments
from lmkd.train.card import is_lmkd_card, model_card, run_settings
from lmkd.train.config import ModelArguments


def front_matter(path) -> tuple[dict, str]:
    """(the YAML metadata parsed with yaml, the markdown body) of a model card file."""
    text = path.read_text()
    assert text.startswith("---\n")
    meta, body = text[4:].split("\n---\n", 1)
    return yaml.safe_load(meta), body


@pytest.fixture()
def recipe(tmp_path, tiny_model_dir, translation_file):
    teacher = tiny_model_dir("bart")
    student = tmp_path / "student"
    assert main(["make-student", "--teacher", teacher, "--output", str(student)]) == 0
    keys = dict(
        student_model_name_or_path=str(student),
        teacher_model_name_or_path=teacher,
        task="translation",
        train_file=translation_file,
        validation_file=translation_file,
        max_eval_samples=8,
        output_dir=str(tmp_path / "out"),
        per_device_train_batch_size=8,
        max_steps=3,
        learning_rate=1e-3,
        kd_alpha=0.7,
        report_to="none",
        save_strategy="no",
        use_cpu=True,
        logging_steps=1,
    )
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(keys))
    return str(path), teacher


def test_card_metadata_body_and_settings_rerun_to_the_same_student(recipe, tmp_path, capsys):
    path, teacher = recipe
    assert main(["distill", path, "--kd_temperature", "3", "--kd_loss", "jsd"]) == 0
    captured = capsys.readouterr()
    out = tmp_path / "out"
    assert captured.err.strip().splitlines()[-1] == f"student saved to {out}"
    printed = json.loads(
        captured.out[captured.out.rindex("{\n") :]
    )  # stdout is still the JSON metrics
    results = json.loads((out / "distill_results.json").read_text())
    assert printed == results

    meta, body = front_matter(out / "README.md")
    assert meta["library_name"] == "transformers" and {
        "distillation",
        "lmkd",
        "translation",
    } <= set(meta["tags"])
    assert meta["pipeline_tag"] == "translation"
    assert (
        "base_model" not in meta and "datasets" not in meta
    )  # a local student init, local data files
    scores = {m["type"]: m["value"] for m in meta["model-index"][0]["results"][0]["metrics"]}
    assert (
        scores["loss"] == pytest.approx(results["eval_loss"])
        and scores["loss_kd"] == results["eval_loss_kd"]
    )
    assert "runtime" not in scores
    assert f"teacher: `{teacher}`" in body
    assert "loss = 0.3 x CE + 0.7 x jsd (beta 0.5), temperature 3" in body
    assert "64 rows" in body and "validation data" in body and "optimizer steps: 3" in body
    assert f"lmkd distill {path} --kd_temperature 3 --kd_loss jsd\n" in body

    settings = yaml.safe_load((out / "lmkd_config.yaml").read_text())
    assert (
        settings["kd_temperature"] == 3.0
        and settings["kd_loss"] == "jsd"
        and settings["kd_alpha"] == 0.7
    )
    assert settings["max_steps"] == 3 and settings["teacher_model_name_or_path"] == teacher
    assert settings["use_cpu"] is True and settings["output_dir"] == str(out)
    assert (
        "per_device_train_batch_size" not in settings
    )  # 8 is the default: only what differs is written

    again = tmp_path / "again"
    assert main(["distill", str(out / "lmkd_config.yaml"), "--output_dir", str(again)]) == 0
    first, second = (
        AutoModelForSeq2SeqLM.from_pretrained(out),
        AutoModelForSeq2SeqLM.from_pretrained(again),
    )
    student = AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "student")
    assert any(
        not torch.equal(v, first.state_dict()[k]) for k, v in student.state_dict().items()
    )  # it trained
    assert all(torch.equal(v, second.state_dict()[k]) for k, v in first.state_dict().items())
    assert (
        json.loads((again / "distill_results.json").read_text())["train_loss"]
        == results["train_loss"]
    )

    # push_to_hub drafts the Trainer's card before uploading: lmkd's is kept, a directory without one gets the draft
    card_text = (out / "README.md").read_text()
    trainer = DistillationTrainer(
        model=first,
        args=DistillationConfig(output_dir=str(out), report_to="none", use_cpu=True, kd_alpha=0.0),
    )
    trainer.create_model_card(model_name="out")
    assert (out / "README.md").read_text() == card_text and is_lmkd_card(str(out))
    bare = tmp_path / "bare"
    trainer = DistillationTrainer(
        model=first,
        args=DistillationConfig(output_dir=str(bare), report_to="none", use_cpu=True, kd_alpha=0.0),
    )
    trainer.create_model_card(model_name="bare")
    assert (bare / "README.md").is_file() and not is_lmkd_card(str(bare))


def test_hub_student_is_the_base_model_and_secrets_are_not_written(tmp_path):
    model_args = ModelArguments(student_model_name_or_path="google-t5/t5-small")
    data_args = DataArguments(task="summarization", train_file="train.jsonl")
    args = DistillationConfig(
        output_dir=str(tmp_path / "s"), hub_token="hf_secret", kd_alpha=0.0, use_cpu=True
    )
    card = model_card(model_args, data_args, args, {"train_loss": 1.0})
    meta = yaml.safe_load(str(card).split("---\n")[1])
    assert meta["base_model"] == "google-t5/t5-small" and meta["pipeline_tag"] == "summarization"
    assert "model-index" not in meta  # not evaluated
    assert "cross-entropy on the labels alone" in card.text and "trained from Python" in card.text
    settings = run_settings(model_args, data_args, args)
    assert "hub_token" not in settings and settings["kd_alpha"] == 0.0
    assert (
        settings["student_model_name_or_path"] == "google-t5/t5-small"
        and settings["task"] == "summarization"
    )


def test_born_again_rounds_each_get_a_card(recipe, tmp_path, capsys):
    path, _ = recipe
    assert main(["distill", path, "--rounds", "2", "--max_steps", "1"]) == 0
    out = tmp_path / "out"
    meta, body = front_matter(out / "README.md")
    assert "lmkd" in meta["tags"] and "born-again: 2 rounds" in body
    assert yaml.safe_load((out / "lmkd_config.yaml").read_text())["rounds"] == 2
    _, body2 = front_matter(out / "round-2" / "README.md")
    assert f"teacher: `{out / 'round-1'}`" in body2
    assert yaml.safe_load((out / "round-2" / "lmkd_config.yaml").read_text())[
        "teacher_model_name_or_path"
    ] == str(out / "round-1")
