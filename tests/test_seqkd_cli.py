"""`lmkd generate` from the command line (one and two processes) and `lmkd distill` on its output."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import datasets
import pytest
import torch
from _seqkd_helpers import save_teacher, write_jsonl

from lmkd.cli import main, parse_distill_args
from lmkd.core.errors import LmkdError
from lmkd.data.dataset import DataArguments
from lmkd.data.reading import mix_gold_targets
from lmkd.models.loading import load_model
from lmkd.teacher.pseudo_target_files import load_generated
from lmkd.train.trainer import DistillationTrainer

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def teacher(tmp_path_factory, tokenizer):
    return save_teacher(tmp_path_factory.mktemp("teacher-t5"), "t5", tokenizer)


@pytest.fixture(scope="module")
def data_file(tmp_path_factory, corpus):
    rows = [dict(r, id=i) for i, r in enumerate(corpus[:30])]
    rows[5]["source"] = " ".join(r["source"] for r in corpus[30:36])
    return write_jsonl(tmp_path_factory.mktemp("data") / "train.jsonl", rows)


def _args(teacher, data, out, *extra):
    return [
        "generate",
        "--teacher",
        teacher,
        "--data",
        data,
        "--output",
        str(out),
        "--num-beams",
        "3",
        "--num-return-sequences",
        "2",
        "--max-new-tokens",
        "10",
        "--batch-size",
        "4",
        "--chunk-size",
        "5",
        "--no-progress",
        *extra,
    ]


def test_generate_cli_writes_a_dataset_and_refuses_other_settings(
    teacher, data_file, tmp_path, capsys
):
    out = tmp_path / "gen"
    assert main(_args(teacher, data_file, out)) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["rows"] == 30 and report["generated_here"] == 30
    ds = datasets.load_from_disk(str(out))
    assert ds.column_names == [
        "source",
        "target",
        "id",
        "teacher_target",
        "teacher_score",
        "teacher_nbest",
        "teacher_nbest_scores",
    ]
    assert list(ds["id"]) == list(range(30))
    assert main(_args(teacher, data_file, out, "--num-beams", "4")) == 2
    err = capsys.readouterr().err.strip()
    assert (
        err.startswith("lmkd generate: error:")
        and "num_beams" in err
        and len(err.splitlines()) == 1
    )
    # jsonl output holds the same rows
    assert main(_args(teacher, data_file, tmp_path / "j", "--format", "jsonl")) == 0
    rows = [json.loads(line) for line in open(tmp_path / "j" / "generated.jsonl", encoding="utf-8")]
    assert rows == ds.to_list()


def test_generate_help_has_examples(capsys):
    with pytest.raises(SystemExit) as e:
        main(["generate", "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    assert (
        "examples:" in text and "accelerate launch -m lmkd generate" in text and "--select" in text
    )


def test_two_processes_give_the_rows_of_one(teacher, data_file, tmp_path):
    one = tmp_path / "one"
    assert main(_args(teacher, data_file, one)) == 0
    two = tmp_path / "two"
    env = dict(
        os.environ,
        OMP_NUM_THREADS="1",
        HF_HUB_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        PYTHONPATH=str(ROOT),
    )
    torchrun = str(Path(sys.executable).with_name("torchrun"))
    proc = subprocess.run(
        [
            torchrun,
            "--nproc_per_node",
            "2",
            "--master_port",
            "29533",
            "-m",
            "lmkd",
            *_args(teacher, data_file, two),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout[proc.stdout.index("{") :])  # printed once, by the main process
    assert 0 < report["generated_here"] < 30  # the other process generated the rest
    assert load_generated(str(two)).to_list() == load_generated(str(one)).to_list()


_MADE: list = []


def _distill(monkeypatch, student, train, out, *extra):
    """`lmkd distill` on a small YAML; returns the trainer it ran (caught in DistillationTrainer.train)."""
    _MADE.clear()
    original = DistillationTrainer.train

    def train_and_record(self, *a, **kw):
        _MADE.append(self)
        return original(self, *a, **kw)

    monkeypatch.setattr(DistillationTrainer, "train", train_and_record)
    config = Path(str(out) + ".yaml")
    config.write_text(
        f"student_model_name_or_path: {student}\ntask: translation\ntrain_file: {train}\n"
        f"target_column: teacher_target\noutput_dir: {out}\nmax_steps: 3\n"
        "per_device_train_batch_size: 4\nlearning_rate: 1.0e-2\nreport_to: none\n"
        "save_strategy: 'no'\nuse_cpu: true\ndataloader_num_workers: 0\n"
    )
    assert main(["distill", str(config), *extra]) == 0
    return _MADE[-1]


def test_distill_on_generated_targets(
    teacher, data_file, tiny_model_dir, tokenizer, tmp_path, monkeypatch
):
    gen = tmp_path / "gen"
    assert main(_args(teacher, data_file, gen)) == 0
    student = tiny_model_dir("t5")
    pseudo = list(load_generated(str(gen))["teacher_target"])

    # Seq-KD: kd_alpha 0 -- a teacher path that does not exist is never loaded
    trainer = _distill(
        monkeypatch,
        student,
        str(gen),
        tmp_path / "seqkd",
        "--kd_alpha",
        "0",
        "--teacher_model_name_or_path",
        str(tmp_path / "no-such-teacher"),
    )
    assert trainer.teacher is None
    labels = list(trainer.train_dataset["labels"])
    assert labels == tokenizer(text_target=pseudo, max_length=128, truncation=True)["input_ids"]
    before, after = load_model(student), load_model(str(tmp_path / "seqkd"))
    assert any(not torch.equal(p, after.state_dict()[k]) for k, p in before.state_dict().items())

    # Seq-KD + Word-KD: the teacher is loaded and used
    trainer = _distill(
        monkeypatch,
        student,
        str(gen),
        tmp_path / "both",
        "--kd_alpha",
        "0.5",
        "--teacher_model_name_or_path",
        teacher,
        "--logging_steps",
        "1",
    )
    assert trainer.teacher is not None
    assert any("loss_kd" in h for h in trainer.state.log_history)

    # gold and pseudo targets mixed: half the rows train on the reference
    trainer = _distill(
        monkeypatch,
        student,
        str(gen),
        tmp_path / "mix",
        "--kd_alpha",
        "0",
        "--mix_gold_fraction",
        "0.5",
        "--gold_column",
        "target",
    )
    gold = tokenizer(
        text_target=list(load_generated(str(gen))["target"]), max_length=128, truncation=True
    )["input_ids"]
    pseudo_ids = tokenizer(text_target=pseudo, max_length=128, truncation=True)["input_ids"]
    got = list(trainer.train_dataset["labels"])
    assert (
        sum(g == x for g, x in zip(got, gold)) >= 15
        and sum(p == x for p, x in zip(got, pseudo_ids)) >= 15
    )
    assert all(x in (g, p) for x, g, p in zip(got, gold, pseudo_ids))


def test_mix_gold_targets_takes_exactly_the_fraction():
    ds = datasets.Dataset.from_list([{"t": f"pseudo {i}", "g": f"gold {i}"} for i in range(40)])
    mixed = mix_gold_targets(ds, "t", "g", 0.25, seed=1)
    gold_rows = [i for i, t in enumerate(mixed["t"]) if t.startswith("gold")]
    assert list(mixed["g"]) == list(ds["g"])
    assert len(gold_rows) == 10
    assert all(mixed["t"][i] == f"gold {i}" for i in gold_rows)
    assert gold_rows == [
        i
        for i, t in enumerate(mix_gold_targets(ds, "t", "g", 0.25, seed=1)["t"])
        if t.startswith("gold")
    ]
    assert gold_rows != [
        i
        for i, t in enumerate(mix_gold_targets(ds, "t", "g", 0.25, seed=2)["t"])
        if t.startswith("gold")
    ]
    assert list(mix_gold_targets(ds, "t", "g", 0.0)["t"]) == list(ds["t"])
    assert list(mix_gold_targets(ds, "t", "g", 1.0)["t"]) == list(ds["g"])
    with pytest.raises(LmkdError, match="mix_gold_fraction"):
        DataArguments(task="translation", train_file="x", mix_gold_fraction=1.5)
    with pytest.raises(LmkdError, match="teacher_target"):
        DataArguments(
            task="translation", train_file="x", mix_gold_fraction=0.5
        )  # gold == target column


def test_seqkd_recipes_parse():
    paths = sorted((ROOT / "recipes" / "translation").glob("seqkd_*.yaml"))
    assert len(paths) >= 4
    for path in paths:
        first = path.read_text().split("\n")[0]
        assert first.startswith("#")
        model_args, data_args, args = parse_distill_args(str(path), ["--use_cpu", "true"])
        assert data_args.target_column == "teacher_target"
        assert (args.kd_alpha > 0) == bool(args.teacher_model_name_or_path)


def test_generate_do_sample_without_num_beams_samples_from_one_beam(
    teacher, data_file, tmp_path, capsys
):
    """issue 16: the default of 5 beams gives way to sampling; only an explicit --num-beams > 1 is refused."""
    from lmkd.teacher.pseudo_target_files import SETTINGS_FILE

    out = tmp_path / "sampled"
    assert (
        main(
            [
                "generate",
                "--teacher",
                teacher,
                "--data",
                data_file,
                "--output",
                str(out),
                "--do-sample",
                "--max-new-tokens",
                "4",
                "--batch-size",
                "8",
                "--no-progress",
            ]
        )
        == 0
    )
    settings = json.loads((out / SETTINGS_FILE).read_text())["settings"]
    assert settings["do_sample"] is True and settings["num_beams"] == 1
    assert (
        main(
            [
                "generate",
                "--teacher",
                teacher,
                "--data",
                data_file,
                "--output",
                str(tmp_path / "beam"),
                "--max-new-tokens",
                "2",
                "--batch-size",
                "8",
                "--chunk-size",
                "100",
                "--no-progress",
            ]
        )
        == 0
    )
    assert (
        json.loads((tmp_path / "beam" / SETTINGS_FILE).read_text())["settings"]["num_beams"] == 5
    )  # default
    capsys.readouterr()
    assert (
        main(
            [
                "generate",
                "--teacher",
                teacher,
                "--data",
                data_file,
                "--output",
                str(tmp_path / "bad"),
                "--do-sample",
                "--num-beams",
                "2",
                "--no-progress",
            ]
        )
        == 2
    )
    err = capsys.readouterr().err.strip()
    assert (
        len(err.splitlines()) == 1
        and "not --num-beams 2" in err
        and not (tmp_path / "bad").exists()
    )


def test_generate_reads_the_translation_layout_of_a_data_file(teacher, corpus, tmp_path, capsys):
    """--source-lang / --target-lang apply to --data as in evaluate and cache-logits (generate read
    them only with --dataset-name, and refused the file for lacking a 'source' column)."""
    rows = [{"translation": {"en": r["source"], "fr": r["target"]}} for r in corpus[:6]]
    data = write_jsonl(tmp_path / "tr.jsonl", rows)
    out = tmp_path / "gen"
    assert (
        main(
            [
                "generate",
                "--teacher",
                teacher,
                "--data",
                data,
                "--source-lang",
                "en",
                "--target-lang",
                "fr",
                "--output",
                str(out),
                "--num-beams",
                "1",
                "--max-new-tokens",
                "3",
                "--batch-size",
                "6",
                "--no-progress",
            ]
        )
        == 0
    )
    ds = datasets.load_from_disk(str(out))
    assert list(ds["source"]) == [r["source"] for r in corpus[:6]]
    assert (
        list(ds["target"]) == [r["target"] for r in corpus[:6]] and len(ds["teacher_target"]) == 6
    )
