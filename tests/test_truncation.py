"""Issue 20: one truncation rule for every command (lmkd.models.truncation.fit_length and friends).

Models whose position tables hold 32 positions get documents of 100+ tokens through every path that
tokenises text -- evaluate, generate, cache-logits, distill (live teacher and cached), on-policy
KD: each gives an output for every row and reports how many rows were cut (counted here with the
tokenizer itself, untruncated).  Before the rule each of these died in the position embedding
with ``IndexError: index out of range in self``.
"""

from __future__ import annotations

import json

import pytest
import torch

from lmkd.core.constants import CLASSIFICATION
from lmkd.models.scratch import build_model

TABLE = 32  # positions of every model here


def write_jsonl(path, rows):
    path.write_text(
        "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8"
    )
    return str(path)


def n_tokens(tokenizer, text, target=False):
    """Untruncated length with special tokens, straight from the tokenizer."""
    enc = tokenizer(text_target=text) if target else tokenizer(text)
    return len(enc["input_ids"])


@pytest.fixture(scope="module")
def documents(corpus, tokenizer):
    """8 rows: 4 long documents (100+ tokens) with long summaries (> 32 tokens), 4 short ones
    (< 32 tokens) with short summaries -- so the counts to report are 4 of 8, not all or none."""
    rows = []
    # short rows: the first corpus rows from 100 on whose source and target fit the table
    short = [
        r
        for r in corpus[100:]
        if n_tokens(tokenizer, r["source"]) < TABLE
        and n_tokens(tokenizer, r["target"], target=True) < TABLE
    ][:4]
    for i in range(4):
        rows.append(
            {
                "document": " ".join(r["source"] for r in corpus[10 * i : 10 * i + 10]),
                "summary": " ".join(r["target"] for r in corpus[10 * i : 10 * i + 4]),
            }
        )
        rows.append({"document": short[i]["source"], "summary": short[i]["target"]})
    for r in rows:
        r["text"], r["label"] = r["document"], len(r["document"]) % 2  # the classification columns
    long_src = [n_tokens(tokenizer, r["document"]) for r in rows[0::2]]
    short_src = [n_tokens(tokenizer, r["document"]) for r in rows[1::2]]
    assert min(long_src) >= 100 and max(short_src) < TABLE, (long_src, short_src)
    return rows


@pytest.fixture(scope="module")
def cut_counts(documents, tokenizer):
    """How many documents / summaries are longer than the table (what every command must report)."""
    return (
        sum(n_tokens(tokenizer, r["document"]) > TABLE for r in documents),
        sum(n_tokens(tokenizer, r["summary"], target=True) > TABLE for r in documents),
    )


@pytest.fixture(scope="module")
def bart32(tiny_model_dir):
    """(teacher, student) BART directories with 32-position tables."""
    return (
        tiny_model_dir("bart", seed=1, layers=1, max_positions=TABLE),
        tiny_model_dir("bart", seed=2, layers=1, max_positions=TABLE),
    )


@pytest.fixture(scope="module")
def bert32(tiny_model_dir):
    return (
        tiny_model_dir("bert", CLASSIFICATION, seed=1, layers=1, max_positions=TABLE),
        tiny_model_dir("bert", CLASSIFICATION, seed=2, layers=1, max_positions=TABLE),
    )


# ---- the rule itself, per architecture -----------------------------------------------------------


def _model(arch, **kw):
    from transformers import AutoModelForSequenceClassification, RobertaConfig

    if (
        arch == "roberta"
    ):  # positions numbered from padding_idx + 1: 34 table rows hold 32 positions
        config = RobertaConfig(
            vocab_size=300,
            hidden_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=64,
            max_position_embeddings=TABLE + 2,
            pad_token_id=1,
        )
        return AutoModelForSequenceClassification.from_config(config)
    return build_model(arch, 300, layers=1, max_positions=TABLE, **kw)


@pytest.mark.parametrize(
    "arch,kw",
    [
        ("bart", {}),
        ("marian", {}),
        ("gpt2", {}),
        ("bert", {}),
        ("bert", {"kind": CLASSIFICATION}),
        ("roberta", {}),
    ],
)
def test_fit_length_is_what_the_model_takes_and_one_more_crashes(arch, kw):
    """The rule read from the config agrees with the model itself: an input of fit_length tokens
    runs, one token more overruns the table."""
    from lmkd.models.truncation import fit_length, input_limit

    model = _model(arch, **kw).eval()
    length = fit_length(512, model)
    assert length == input_limit(model) == TABLE
    assert fit_length(20, model) == 20 and fit_length(None, model) == TABLE
    seq2seq = model.config.is_encoder_decoder

    def run(n):
        ids = torch.full((1, n), 7)
        extra = {"decoder_input_ids": torch.full((1, 2), 7)} if seq2seq else {}
        with torch.no_grad():
            model(input_ids=ids, **extra)

    run(length)
    with pytest.raises((IndexError, RuntimeError)):
        run(length + 1)


def test_tables_of_relative_and_rotary_models_and_real_tokenizer_limits(tokenizer):
    from transformers import DebertaV2Config, LlamaConfig, T5Config

    from lmkd.models.truncation import (
        fit_length,
        generation_lengths,
        input_limit,
        position_table,
        target_limit,
    )

    assert (
        position_table(T5Config()) is None and fit_length(777, T5Config()) == 777
    )  # relative: no table
    assert fit_length(None, T5Config()) is None
    assert position_table(DebertaV2Config(position_biased_input=False)) is None
    assert position_table(DebertaV2Config(max_position_embeddings=64)) == 64
    assert position_table(LlamaConfig(max_position_embeddings=48)) == 48
    gpt2 = build_model("gpt2", 300, layers=1, max_positions=TABLE).config
    assert target_limit(gpt2) == TABLE  # causal: targets are the inputs
    # a tokenizer's model_max_length counts when it is real, not transformers' 1e30 placeholder
    assert tokenizer.model_max_length > 10**20 and input_limit(gpt2, tokenizer) == TABLE
    tok = tokenizer.__class__(tokenizer_object=tokenizer.backend_tokenizer, model_max_length=20)
    assert input_limit(gpt2, tok) == 20 and input_limit(T5Config(), tok) == 20
    # several models: the smallest table wins
    assert input_limit([gpt2, build_model("gpt2", 300, layers=1, max_positions=24).config]) == 24
    # generation: the start token + new tokens fit the decoder; prompt + new tokens fit a causal table
    bart = build_model("bart", 300, layers=1, max_positions=TABLE).config
    assert generation_lengths(bart, None, 512, 128) == (TABLE, TABLE - 1)
    assert generation_lengths(bart, None, 16, 8) == (16, 8)
    assert generation_lengths(gpt2, None, 512, 10) == (TABLE - 10, 10)
    assert generation_lengths(gpt2, None, 512, 100) == (1, TABLE - 1)
    assert generation_lengths(T5Config(), None, None, 300) == (None, 300)


def test_encode_fitted_counts_the_rows_it_cuts_and_keeps_eos(tokenizer, documents, cut_counts):
    from lmkd.models.truncation import describe_truncation, encode_fitted, truncation_note

    texts = [r["document"] for r in documents]
    enc, cut = encode_fitted(tokenizer, texts, TABLE)
    assert len(cut) == cut_counts[0] == 4
    assert [len(x) for x in enc["input_ids"]] == [min(n_tokens(tokenizer, t), TABLE) for t in texts]
    assert all(x[-1] == tokenizer.eos_token_id for x in enc["input_ids"])  # truncation keeps </s>
    assert all(len(m) == len(x) for m, x in zip(enc["attention_mask"], enc["input_ids"]))
    assert encode_fitted(tokenizer, texts, None)[0]["input_ids"] == tokenizer(texts)["input_ids"]
    note = truncation_note("inputs", 8, len(cut), TABLE, 512, TABLE)
    assert (
        describe_truncation(note)
        == "4 of 8 inputs truncated to 32 tokens (the model takes 32 positions)"
    )
    assert describe_truncation(truncation_note("inputs", 8, 4, 16, 16, TABLE)).endswith(
        "(the maximum asked for)"
    )


# ---- every command on a 32-position seq2seq model ------------------------------------------------


def test_evaluate_seq2seq_32_positions(tmp_path, bart32, documents, cut_counts):
    from lmkd.evaluate.run import evaluate_models
    from lmkd.evaluate.summary import markdown_table

    teacher, student = bart32
    data = write_jsonl(tmp_path / "test.jsonl", documents)
    result = evaluate_models(
        {"student": student},
        data,
        "summarization",
        teacher=teacher,
        num_beams=2,
        max_new_tokens=128,
        batch_size=4,
        max_source_length=512,
        speed_samples=2,
        latency_samples=1,
        repeats=1,
        device="cpu",
        progress=False,
    )
    for label in ("student", "teacher"):
        assert len(result["predictions"][label]) == len(documents)
        cut = result["models"][label]["truncation"]
        assert cut["inputs"]["truncated"] == cut_counts[0] and cut["inputs"]["rows"] == len(
            documents
        )
        assert cut["inputs"]["length"] == TABLE and cut["inputs"]["model_positions"] == TABLE
        assert cut["new tokens"]["length"] == TABLE - 1 and cut["new tokens"]["requested"] == 128
    assert (
        "teacher: 4 of 8 inputs truncated to 32 tokens (the model takes 32 positions)."
        in markdown_table(result)
    )


def test_generate_seq2seq_32_positions(tmp_path, bart32, documents, cut_counts):
    from lmkd.teacher.pseudo_target_files import load_generated
    from lmkd.teacher.pseudo_targets import generate_pseudo_targets

    teacher, _ = bart32
    report = generate_pseudo_targets(
        teacher,
        data=documents,
        output_dir=str(tmp_path / "gen"),
        source_column="document",
        num_beams=2,
        max_new_tokens=128,
        batch_size=4,
        output_format="jsonl",
        progress=False,
    )
    out = load_generated(str(tmp_path / "gen"))
    assert len(out) == len(documents) and all(isinstance(t, str) for t in out["teacher_target"])
    assert report["truncation"]["inputs"]["truncated"] == cut_counts[0]
    assert report["truncation"]["new tokens"]["length"] == TABLE - 1


def test_cache_logits_and_distill_seq2seq_32_positions(
    tmp_path, bart32, documents, cut_counts, tokenizer
):
    from lmkd.data.dataset import DataArguments
    from lmkd.teacher.logit_cache_writer import cache_logits
    from lmkd.train.config import DistillationConfig, ModelArguments
    from lmkd.train.run import run_distill

    teacher, student = bart32
    data = write_jsonl(tmp_path / "train.jsonl", documents)
    data_args = DataArguments(
        task="summarization",
        train_file=data,
        validation_file=data,
        max_source_length=512,
        max_target_length=512,
    )
    summary = cache_logits(
        teacher, data_args, str(tmp_path / "cache"), 4, batch_size=4, device="cpu"
    )
    assert summary["rows"] == len(documents)
    assert summary["truncation"]["inputs"]["truncated"] == cut_counts[0]
    assert summary["truncation"]["targets"]["truncated"] == cut_counts[1] > 0
    assert summary["positions"] == sum(
        min(n_tokens(tokenizer, r["summary"], target=True), TABLE) for r in documents
    )

    def distill(out, **kw):
        args = DistillationConfig(
            output_dir=str(tmp_path / out),
            max_steps=2,
            per_device_train_batch_size=4,
            per_device_eval_batch_size=4,
            report_to="none",
            save_strategy="no",
            use_cpu=True,
            disable_tqdm=True,
            kd_alpha=0.5,
            seed=0,
            **kw,
        )
        return run_distill(ModelArguments(student_model_name_or_path=student), data_args, args)

    for metrics in (
        distill("live", teacher_model_name_or_path=teacher),
        # validation = training file here, so its cache is the validation data's cache too
        distill(
            "cached", logit_cache=str(tmp_path / "cache"), eval_logit_cache=str(tmp_path / "cache")
        ),
    ):
        assert metrics["eval_loss"] == metrics["eval_loss"]  # a number, not NaN
        for split in ("train", "validation"):
            assert metrics[f"{split}_inputs_truncated"] == cut_counts[0]
            assert metrics[f"{split}_targets_truncated"] == cut_counts[1]
            assert (
                metrics[f"{split}_inputs_truncated_to"]
                == metrics[f"{split}_targets_truncated_to"]
                == TABLE
            )


# ---- a 32-position BERT classifier ---------------------------------------------------------------


def test_evaluate_and_distill_bert_classifier_32_positions(tmp_path, bert32, documents, cut_counts):
    from lmkd.data.dataset import DataArguments
    from lmkd.evaluate.run import evaluate_models
    from lmkd.train.config import DistillationConfig, ModelArguments
    from lmkd.train.run import run_distill

    teacher, student = bert32
    data = write_jsonl(tmp_path / "cls.jsonl", documents)
    result = evaluate_models(
        {"student": student},
        data,
        "classification",
        teacher=teacher,
        batch_size=4,
        max_source_length=512,
        speed_samples=0,
        device="cpu",
        progress=False,
    )
    for label in ("student", "teacher"):
        assert len(result["predictions"][label]) == len(documents)
        assert result["models"][label]["truncation"]["inputs"]["truncated"] == cut_counts[0]
        assert "new tokens" not in result["models"][label]["truncation"]
    data_args = DataArguments(
        task="classification", train_file=data, validation_file=data, max_source_length=512
    )
    args = DistillationConfig(
        output_dir=str(tmp_path / "out"),
        max_steps=2,
        per_device_train_batch_size=4,
        per_device_eval_batch_size=4,
        report_to="none",
        save_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
        kd_alpha=0.5,
        seed=0,
        teacher_model_name_or_path=teacher,
    )
    metrics = run_distill(ModelArguments(student_model_name_or_path=student), data_args, args)
    for split in ("train", "validation"):
        assert (metrics[f"{split}_inputs_truncated"], metrics[f"{split}_inputs_truncated_to"]) == (
            cut_counts[0],
            TABLE,
        )
        assert f"{split}_targets_truncated" not in metrics  # class labels are not tokenised


# ---- a GPT-2 with 32 positions: generation and on-policy KD --------------------------------------


def test_generate_causal_32_positions_prompt_and_new_tokens_fit(
    tmp_path, tiny_model_dir, documents, tokenizer
):
    from lmkd.teacher.pseudo_target_files import load_generated
    from lmkd.teacher.pseudo_targets import generate_pseudo_targets

    teacher = tiny_model_dir("gpt2", seed=1, layers=1, max_positions=TABLE)
    new = 8
    report = generate_pseudo_targets(
        teacher,
        data=documents,
        output_dir=str(tmp_path / "gen"),
        source_column="document",
        num_beams=1,
        max_new_tokens=new,
        batch_size=4,
        output_format="jsonl",
        progress=False,
    )
    assert len(load_generated(str(tmp_path / "gen"))) == len(documents)
    note = report["truncation"]["inputs"]
    assert note["length"] == TABLE - new  # the prompt leaves room for the new tokens
    assert note["truncated"] == sum(
        n_tokens(tokenizer, r["document"]) > TABLE - new for r in documents
    )


def test_on_policy_new_tokens_fit_a_32_position_table(tmp_path, tokenizer, documents):
    import datasets

    from lmkd.data.collators import collator_for
    from lmkd.data.dataset import DataArguments
    from lmkd.data.tokenizing import tokenize
    from lmkd.train.config import DistillationConfig
    from lmkd.train.regimes import OnPolicyDistillationTrainer

    teacher = build_model("gpt2", len(tokenizer), seed=1, layers=1, max_positions=TABLE)
    student = build_model("gpt2", len(tokenizer), seed=2, layers=1, max_positions=TABLE)
    notes: list = []
    ds = tokenize(
        datasets.Dataset.from_list([{"text": r["document"]} for r in documents]),
        tokenizer,
        DataArguments(task="causal-lm", train_file="-", max_source_length=512),
        model=student,
        notes=notes,
    )
    assert notes[0]["truncated"] == 4 and max(len(x) for x in ds["input_ids"]) == TABLE
    args = DistillationConfig(
        output_dir=str(tmp_path / "out"),
        per_device_train_batch_size=4,
        max_steps=2,
        report_to="none",
        save_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
        kd_loss="jsd",
        kd_alpha=1.0,
        on_policy_fraction=1.0,
        on_policy_max_new_tokens=64,
        on_policy_prompt_tokens=3,
    )
    widths = []

    class Recording(OnPolicyDistillationTrainer):
        def on_policy_batch(self, model, batch):
            out = super().on_policy_batch(model, batch)
            widths.append(out["input_ids"].shape[1])
            return out

    trainer = Recording(
        model=student,
        args=args,
        teacher_model=teacher,
        train_dataset=ds,
        processing_class=tokenizer,
        data_collator=collator_for("causal-lm", tokenizer, student),
    )
    assert trainer.max_new_tokens == TABLE - 3  # 3 prompt tokens + 29 new ones fill the table
    trainer.train()
    assert len(widths) == 2 and max(widths) <= TABLE


@pytest.mark.parametrize(
    "max_length, batch, noted", [(32, 32, False), (128, 8, True), (256, 4, True), (4096, 4, True)]
)
def test_study_batch_fits_the_token_budget(max_length, batch, noted):
    """Long documents get a smaller batch (batch x length within the budget's input tokens, at least
    4); short rows keep the budget's batch, and only a changed batch is noted in the report."""
    from lmkd.study.teachers import fit_batch

    plan = {"batch_size": 32, "batch_tokens": 1024, "max_length": max_length, "notes": []}
    fit_batch(plan)
    assert plan["batch_size"] == batch and plan["batch_size_cap"] == 32
    assert bool(plan["notes"]) == noted and (
        not noted or f"Batch {batch} rather than 32" in plan["notes"][0]
    )
    fit_batch(plan)  # idempotent: the cap, not the fitted batch, is the base
    assert plan["batch_size"] == batch
