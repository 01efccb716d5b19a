"""Data through `datasets`: dataset_name as a parquet file, a saved dataset directory or a directory
of data files (offline), their splits, and the HF translation layout with source_lang/target_lang --
the same tokenised rows as lmkd's flat columns, and the same trained student."""

import json

import datasets
import pytest
import torch
import yaml
from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

from lmkd.cli import main
from lmkd.core.errors import LmkdError
from lmkd.data.dataset import DataArguments
from lmkd.data.reading import read_split
from lmkd.data.tokenizing import tokenize


@pytest.fixture()
def rows(corpus):
    return [{"source": r["source"], "target": r["target"]} for r in corpus[:24]]


def nested(rows):
    return [
        {"translation": {"en": r["source"], "fr": r["target"]}, "id": i} for i, r in enumerate(rows)
    ]


def jsonl(path, rows):
    path.write_text(
        "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8"
    )
    return str(path)


def plain(ds):
    return [dict(r) for r in ds]


def test_parquet_file_and_saved_directory_through_dataset_name(tmp_path, rows):
    parquet = str(tmp_path / "train.parquet")
    datasets.Dataset.from_list(rows).to_parquet(parquet)
    got = read_split(
        DataArguments(task="translation", dataset_name=parquet), "train", ["source", "target"]
    )
    assert plain(got) == rows
    # one file is the train split; the default validation split is then absent, an explicit one an error
    assert read_split(DataArguments(task="translation", dataset_name=parquet), "validation") is None
    with pytest.raises(LmkdError, match="one file, read as the train split"):
        read_split(
            DataArguments(task="translation", dataset_name=parquet, validation_split="validation"),
            "validation",
        )
    saved = str(tmp_path / "saved")
    datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_list(rows[:16]),
            "validation": datasets.Dataset.from_list(rows[16:]),
        }
    ).save_to_disk(saved)
    args = DataArguments(task="translation", dataset_name=saved)
    assert plain(read_split(args, "train")) == rows[:16]
    assert plain(read_split(args, "validation")) == rows[16:]
    args = DataArguments(
        task="translation", dataset_name=saved, train_split="validation", validation_split="test"
    )
    assert plain(read_split(args, "train")) == rows[16:]
    with pytest.raises(LmkdError, match="has no split 'test' \\(it has: train, validation\\)"):
        read_split(args, "validation")
    with pytest.raises(
        LmkdError, match="has no column 'tgt' .*name the right one with --target-column"
    ):
        read_split(
            DataArguments(task="translation", dataset_name=saved, target_column="tgt"),
            "train",
            ["source", "tgt"],
        )


def test_directory_of_files_gives_its_splits_by_name(tmp_path, rows):
    d = tmp_path / "files"
    d.mkdir()
    jsonl(d / "train.jsonl", rows[:20])
    jsonl(d / "validation.jsonl", rows[20:])
    args = DataArguments(task="translation", dataset_name=str(d), train_split="train[:5]")
    assert plain(read_split(args, "train")) == rows[:5]
    assert plain(read_split(args, "validation")) == rows[20:]


def test_translation_layout_gives_the_flat_columns_tokenised_rows(tmp_path, rows, tokenizer):
    flat = DataArguments(task="translation", train_file=jsonl(tmp_path / "flat.jsonl", rows))
    layout = DataArguments(
        task="translation",
        train_file=jsonl(tmp_path / "nested.jsonl", nested(rows)),
        source_lang="en",
        target_lang="fr",
    )
    parquet = str(tmp_path / "nested.parquet")
    datasets.Dataset.from_list(nested(rows)).to_parquet(parquet)
    hub_style = DataArguments(
        task="translation", dataset_name=parquet, source_lang="en", target_lang="fr"
    )
    want = plain(tokenize(read_split(flat), tokenizer, flat))
    assert want and "labels" in want[0]
    for args in (layout, hub_style):
        ds = read_split(args, "train", [args.source_column, args.target_column])
        assert ds["source"] == [r["source"] for r in rows] and ds["target"] == [
            r["target"] for r in rows
        ]
        assert plain(tokenize(ds, tokenizer, args)) == want
    # reversed languages: the French side becomes the source
    rev = DataArguments(
        task="translation", dataset_name=parquet, source_lang="fr", target_lang="en"
    )
    assert read_split(rev)["source"] == [r["target"] for r in rows]
    with pytest.raises(LmkdError, match="has no language 'de' \\(it has: en, fr\\)"):
        read_split(
            DataArguments(
                task="translation", dataset_name=parquet, source_lang="en", target_lang="de"
            )
        )
    with pytest.raises(LmkdError, match="read a 'translation' column"):
        read_split(
            DataArguments(
                task="translation", train_file=flat.train_file, source_lang="en", target_lang="fr"
            )
        )


def test_bad_combinations_are_one_line():
    with pytest.raises(LmkdError, match="train_file .* or as dataset_name .*not both"):
        DataArguments(task="translation", train_file="a.jsonl", dataset_name="b.parquet")
    with pytest.raises(LmkdError, match="one of them"):
        DataArguments(task="translation")
    with pytest.raises(LmkdError, match="source_lang and target_lang go together"):
        DataArguments(task="translation", dataset_name="x", source_lang="en")
    with pytest.raises(LmkdError, match="cannot read dataset_name"):
        read_split(
            DataArguments(task="translation", dataset_name="no-such-org/no-such-dataset-xyz")
        )


def test_distill_from_dataset_name_trains_the_same_student_as_from_files(
    tmp_path, tiny_model_dir, rows
):
    teacher = tiny_model_dir("marian", seed=7)
    saved = str(tmp_path / "saved")
    datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_list(nested(rows[:16])),
            "validation": datasets.Dataset.from_list(nested(rows[16:])),
        }
    ).save_to_disk(saved)
    common = dict(
        student_model_name_or_path=teacher,
        teacher_model_name_or_path=teacher,
        task="translation",
        per_device_train_batch_size=8,
        max_steps=2,
        learning_rate=1e-2,
        kd_alpha=0.5,
        report_to="none",
        save_strategy="no",
        use_cpu=True,
        seed=1,
    )
    a = tmp_path / "a.yaml"
    a.write_text(
        yaml.safe_dump(
            {
                **common,
                "dataset_name": saved,
                "source_lang": "en",
                "target_lang": "fr",
                "output_dir": str(tmp_path / "out-a"),
            }
        )
    )
    b = tmp_path / "b.yaml"
    b.write_text(
        yaml.safe_dump(
            {
                **common,
                "train_file": jsonl(tmp_path / "t.jsonl", rows[:16]),
                "validation_file": jsonl(tmp_path / "v.jsonl", rows[16:]),
                "output_dir": str(tmp_path / "out-b"),
            }
        )
    )
    assert main(["distill", str(a)]) == 0 and main(["distill", str(b)]) == 0
    ra, rb = (
        json.loads((tmp_path / o / "distill_results.json").read_text()) for o in ("out-a", "out-b")
    )
    assert ra["eval_loss"] == pytest.approx(rb["eval_loss"]) and ra["train_loss"] == pytest.approx(
        rb["train_loss"]
    )
    ma, mb = (
        AutoModelForSeq2SeqLM.from_pretrained(tmp_path / o).state_dict() for o in ("out-a", "out-b")
    )
    before = AutoModelForSeq2SeqLM.from_pretrained(teacher).state_dict()
    assert all(torch.equal(v, mb[k]) for k, v in ma.items())
    assert any(not torch.equal(v, before[k]) for k, v in ma.items())
    assert AutoTokenizer.from_pretrained(tmp_path / "out-a") is not None


def test_evaluate_and_cache_logits_read_dataset_name_as_data(
    tmp_path, tiny_model_dir, rows, capsys
):
    model = tiny_model_dir("marian", seed=7)
    saved = str(tmp_path / "saved")
    datasets.DatasetDict({"test": datasets.Dataset.from_list(nested(rows[:6]))}).save_to_disk(saved)
    flat = jsonl(tmp_path / "flat.jsonl", rows[:6])
    common = [
        "--model",
        model,
        "--task",
        "translation",
        "--num-beams",
        "1",
        "--max-new-tokens",
        "5",
        "--speed-samples",
        "0",
        "--device",
        "cpu",
    ]
    assert main(["evaluate", *common, "--data", flat, "--output", str(tmp_path / "a.json")]) == 0
    assert (
        main(
            [
                "evaluate",
                *common,
                "--dataset-name",
                saved,
                "--source-lang",
                "en",
                "--target-lang",
                "fr",
                "--output",
                str(tmp_path / "b.json"),
            ]
        )
        == 0
    )
    a, b = (json.loads((tmp_path / f).read_text()) for f in ("a.json", "b.json"))
    assert (
        a["predictions"] == b["predictions"]
        and a["models"]["student"]["quality"] == b["models"]["student"]["quality"]
    )
    assert b["data"] == f"{saved} [test]"
    with pytest.raises(SystemExit):
        main(["evaluate", *common, "--data", flat, "--dataset-name", saved])
    assert "not allowed with argument" in capsys.readouterr().err
    # cache-logits: the same top-K entries from the dataset's split as from the flat file
    train = str(tmp_path / "train.parquet")
    datasets.Dataset.from_list(nested(rows[:6])).to_parquet(train)
    assert (
        main(
            [
                "cache-logits",
                "--teacher",
                model,
                "--data",
                flat,
                "--top-k",
                "4",
                "--output",
                str(tmp_path / "ca"),
            ]
        )
        == 0
    )
    assert (
        main(
            [
                "cache-logits",
                "--teacher",
                model,
                "--dataset-name",
                train,
                "--source-lang",
                "en",
                "--target-lang",
                "fr",
                "--top-k",
                "4",
                "--output",
                str(tmp_path / "cb"),
            ]
        )
        == 0
    )
    files = sorted(
        p.relative_to(tmp_path / "ca") for p in (tmp_path / "ca").rglob("*") if p.is_file()
    )
    assert len(files) > 1
    for rel in files:
        if rel.name != "meta.json":
            assert (tmp_path / "ca" / rel).read_bytes() == (tmp_path / "cb" / rel).read_bytes(), rel
    meta = json.loads((tmp_path / "cb" / "meta.json").read_text())
    assert (
        meta["data"]["dataset_name"] == train
        and "dataset_name" not in json.loads((tmp_path / "ca" / "meta.json").read_text())["data"]
    )


def test_generate_reads_dataset_name_as_data(tmp_path, tiny_model_dir, rows):
    """lmkd generate --dataset-name (the translation layout of a saved dataset's split) writes the same
    pseudo-targets as --data on the flat file."""
    model = tiny_model_dir("marian", seed=7)
    saved = str(tmp_path / "saved")
    datasets.DatasetDict({"train": datasets.Dataset.from_list(nested(rows[:6]))}).save_to_disk(
        saved
    )
    flat = jsonl(tmp_path / "flat.jsonl", rows[:6])
    common = [
        "generate",
        "--teacher",
        model,
        "--num-beams",
        "1",
        "--max-new-tokens",
        "5",
        "--format",
        "jsonl",
        "--no-progress",
    ]
    assert main([*common, "--data", flat, "--output", str(tmp_path / "a")]) == 0
    assert (
        main(
            [
                *common,
                "--dataset-name",
                saved,
                "--source-lang",
                "en",
                "--target-lang",
                "fr",
                "--output",
                str(tmp_path / "b"),
            ]
        )
        == 0
    )
    a, b = (
        [json.loads(line) for line in (tmp_path / d / "generated.jsonl").read_text().splitlines()]
        for d in "ab"
    )
    assert len(a) == 6 and [r["teacher_target"] for r in a] == [r["teacher_target"] for r in b]
    assert [r["source"] for r in b] == [r["source"] for r in rows[:6]]


def test_study_reads_dataset_name_splits_into_its_files(tmp_path, rows):
    """lmkd study --dataset-name: the dataset's train/validation/test splits (translation layout) become
    the study's three files with the task's flat columns; mixing it with --train is one line."""
    import argparse

    from lmkd.cli.study import named_splits

    saved = str(tmp_path / "saved")
    datasets.DatasetDict(
        {
            s: datasets.Dataset.from_list(nested(rows[i : i + 8]))
            for s, i in (("train", 0), ("validation", 8), ("test", 16))
        }
    ).save_to_disk(saved)
    ns = argparse.Namespace(
        task="translation",
        dataset_name=saved,
        dataset_config_name=None,
        source_lang="en",
        target_lang="fr",
        source_column=None,
        target_column=None,
        train=None,
        validation=None,
        test=None,
        output=str(tmp_path / "study"),
    )
    paths = named_splits(ns)
    for path, i in zip(paths, (0, 8, 16)):
        assert [json.loads(line) for line in open(path, encoding="utf-8")] == rows[i : i + 8]
    ns.train = "x.jsonl"
    with pytest.raises(LmkdError, match="either --dataset-name or --train"):
        named_splits(ns)
