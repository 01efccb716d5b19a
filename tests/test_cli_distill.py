"""`lmkd distill CONFIG.yaml --key value`: the real CLI path, end to end, and its one-line errors."""

import json
import os
import shutil

import pytest
import torch
import yaml
from transformers import AutoModelForSeq2SeqLM

from lmkd.cli import main, parse_distill_args


def write_yaml(path, **keys):
    path.write_text("# lmkd distill " + str(path) + "\n" + yaml.safe_dump(keys))
    return str(path)


@pytest.fixture()
def recipe(tmp_path, tiny_model_dir, translation_file):
    teacher = tiny_model_dir("bart")
    student = tmp_path / "student"
    assert main(["make-student", "--teacher", teacher, "--output", str(student)]) == 0
    return write_yaml(
        tmp_path / "r.yaml",
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
        kd_alpha=0.5,
        kd_temperature=2.0,
        report_to="none",
        save_strategy="no",
        use_cpu=True,
        logging_steps=1,
    )


def test_distill_end_to_end(recipe, tmp_path, capsys):
    student_before = AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "student")
    assert main(["distill", recipe, "--kd_temperature", "3"]) == 0
    out = tmp_path / "out"
    trained = AutoModelForSeq2SeqLM.from_pretrained(out)
    assert (out / "tokenizer.json").exists()
    assert any(
        not torch.equal(v, trained.state_dict()[k]) for k, v in student_before.state_dict().items()
    )
    results = json.loads((out / "distill_results.json").read_text())
    assert results["train_loss"] > 0 and "eval_loss" in results and "eval_loss_kd" in results
    out_text = capsys.readouterr().out  # exactly one JSON document (`lmkd distill ... | jq` works)
    assert json.loads(out_text)["train_loss"] == results["train_loss"]
    args = torch.load(out / "training_args.bin", weights_only=False)
    assert args.kd_temperature == 3.0  # the override won over the YAML


def test_overrides_and_types(recipe):
    m, d, t = parse_distill_args(
        recipe, ["--kd_alpha", "0.9", "--max_steps", "7", "--kd_loss", "jsd"]
    )
    assert (t.kd_alpha, t.max_steps, t.kd_loss, d.task, d.source_column, d.target_column) == (
        0.9,
        7,
        "jsd",
        "translation",
        "source",
        "target",
    )


@pytest.mark.parametrize(
    "extra,message",
    [
        ({"kd_alpah": 0.5}, "unknown key 'kd_alpah'; did you mean 'kd_alpha'"),
        ({"kd_alpha": 1.5}, "kd_alpha must be in"),
        ({"kd_temperature": 0}, "kd_temperature must be > 0"),
        ({"kd_loss": "kl"}, "unknown kd_loss"),
        ({"task": "qa"}, "unknown task 'qa'"),
        ({"source_column": "english"}, "has no column 'english'"),
        ({"train_file": "/nonexistent/train.jsonl"}, "does not exist"),
        ({"teacher_model_name_or_path": "/nonexistent/teacher"}, "does not exist"),
    ],
)
def test_distill_bad_input_is_one_line(recipe, tmp_path, capsys, extra, message):
    cfg = yaml.safe_load(open(recipe))
    cfg.update(extra)
    path = write_yaml(tmp_path / "bad.yaml", **cfg)
    assert main(["distill", path]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err


def test_bad_data_files(recipe, tmp_path, capsys):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    notjson = tmp_path / "bad.jsonl"
    notjson.write_text('{"source": "a", "target": "b"}\nnot json\n')
    for path, message in ((empty, "is empty"), (notjson, "line 2 is not JSON")):
        assert main(["distill", recipe, "--train_file", str(path)]) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1


def test_unknown_override(recipe, capsys):
    assert main(["distill", recipe, "--kd_temprature", "2"]) == 2
    assert "did you mean --kd-temperature?" in capsys.readouterr().err
    assert main(["distill", recipe, "--kd-temprature", "2"]) == 2
    assert "did you mean --kd-temperature?" in capsys.readouterr().err


def test_ctrl_c_says_the_command_that_resumes(recipe, monkeypatch, capsys):
    """issue 16: after Ctrl-C, distill names the real resuming command (the same one is refused
    without --resume, and --overwrite would start again); commands that write nothing say so."""
    import lmkd.models.student
    import lmkd.train.run

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    def interrupted_after_a_save(model_args, data_args, args, **k):
        os.makedirs(os.path.join(args.output_dir, "checkpoint-2"), exist_ok=True)
        raise KeyboardInterrupt

    monkeypatch.setattr(lmkd.train.run, "run_distill", interrupted_after_a_save)
    assert main(["distill", recipe, "--kd_alpha", "0.7"]) == 130
    err = capsys.readouterr().err.strip()
    assert (
        err
        == f"lmkd distill: interrupted; continue from the last saved checkpoint with: lmkd distill {recipe} "
        "--kd_alpha 0.7 --resume"
    )
    assert main(["distill", recipe, "--overwrite", "--resume"]) == 130
    assert capsys.readouterr().err.strip().endswith(f"with: lmkd distill {recipe} --resume")
    # stopped before the first checkpoint: --resume would be refused, so the hint starts the run again
    shutil.rmtree(yaml.safe_load(open(recipe))["output_dir"])
    monkeypatch.setattr(lmkd.train.run, "run_distill", interrupted)
    assert main(["distill", recipe, "--kd_alpha", "0.7", "--resume"]) == 130
    out = yaml.safe_load(open(recipe))["output_dir"]
    assert capsys.readouterr().err.strip() == (
        f"lmkd distill: interrupted; no checkpoint was saved in {out} yet, so "
        f"there is nothing to resume; start again with: lmkd distill {recipe} "
        "--kd_alpha 0.7"
    )
    monkeypatch.setattr(lmkd.models.student, "make_student", interrupted)
    assert (
        main(
            [
                "make-student",
                "--teacher",
                yaml.safe_load(open(recipe))["teacher_model_name_or_path"],
                "--output",
                recipe + ".never",
            ]
        )
        == 130
    )
    assert "nothing was written" in capsys.readouterr().err
    # generate resumes when re-run -- but not with --overwrite, which discards its chunks: the hint drops it
    import lmkd.teacher.pseudo_targets

    monkeypatch.setattr(lmkd.teacher.pseudo_targets, "generate_pseudo_targets", interrupted)
    cfg = yaml.safe_load(open(recipe))
    assert (
        main(
            [
                "generate",
                "--teacher",
                cfg["teacher_model_name_or_path"],
                "--data",
                cfg["train_file"],
                "--output",
                recipe + ".gen",
                "--overwrite",
            ]
        )
        == 130
    )
    assert capsys.readouterr().err.strip() == (
        "lmkd generate: interrupted; resume with the same command without --overwrite: lmkd generate --teacher "
        f"{cfg['teacher_model_name_or_path']} --data {cfg['train_file']} --output {recipe}.gen"
    )


def test_help_keys_lists_every_key_without_a_traceback(capsys):
    """`lmkd distill --help-keys` (the README's pointer for every key) prints every key of the three
    argument groups: argparse formats each help text, so one with a bare '%' crashed it."""
    from dataclasses import fields

    from lmkd.data.dataset import DataArguments
    from lmkd.train.config import DistillationConfig, ModelArguments

    assert main(["distill", "--help-keys"]) in (0, None)
    out = capsys.readouterr().out
    for cls in (ModelArguments, DataArguments, DistillationConfig):
        for f in fields(cls):
            if f.init and f.metadata.get("help"):
                assert f"--{f.name.replace('_', '-')}" in out, f.name  # the dashed spelling
