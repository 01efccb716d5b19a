"""Issue 16, the training side: results that were wrong without a warning (co-distillation
cohorts, the vocabulary guard, eval_loss with a logit cache, on-policy resume and prompts)."""

from __future__ import annotations

import copy
import json
import logging

import pytest
import torch

from lmkd import DistillationConfig, DistillationTrainer, LmkdError
from lmkd.cli import main
from lmkd.models.loading import load_model, load_tokenizer
from lmkd.models.scratch import build_model


def config(tmp_path, **kw):
    base = dict(
        output_dir=str(tmp_path / "out"),
        per_device_train_batch_size=4,
        max_steps=2,
        learning_rate=1e-3,
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
        save_strategy="no",
        seed=0,
    )
    base.update(kw)
    return DistillationConfig(**base)


def write_jsonl(path, rows):
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return str(path)


def distill_cli(tmp_path, name="cfg", **cfg):
    import yaml

    base = dict(
        output_dir=str(tmp_path / "o"),
        per_device_train_batch_size=4,
        report_to="none",
        use_cpu=True,
        save_strategy="no",
        disable_tqdm=True,
    )
    base.update(cfg)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(base))
    return main(["distill", str(path)])


# ---- bf16 from Python ------------------------------------------------------------------------------


def test_bf16_on_a_machine_without_it_is_an_lmkd_error(tmp_path):
    from transformers.utils import is_torch_bf16_gpu_available

    if is_torch_bf16_gpu_available():
        pytest.skip("this machine runs bf16")
    with pytest.raises(LmkdError, match=r"bf16 needs a GPU .*bf16=torch.cuda.is_available\(\)"):
        config(tmp_path, bf16=True, use_cpu=False)
    assert (
        config(tmp_path, bf16=torch.cuda.is_available()).bf16 is False
    )  # the README's choice by device


def test_layer_map_out_of_range_from_python_leaves_no_output_dir(tmp_path, tokenizer):
    teacher = build_model("gpt2", len(tokenizer), seed=1, layers=2)
    student = build_model("gpt2", len(tokenizer), seed=2, layers=1)
    out = tmp_path / "a" / "b"
    with pytest.raises(
        LmkdError, match="layer_map '0:5' pairs layers 0:5, but the student has 1 and the teacher 2"
    ):
        DistillationTrainer(
            model=student,
            teacher_model=teacher,
            processing_class=tokenizer,
            args=config(tmp_path, output_dir=str(out), hidden_weight=1.0, layer_map="0:5"),
        )
    assert not (tmp_path / "a").exists()


# ---- the vocabulary guard -----------------------------------------------------------------------


def test_teacher_dir_without_tokenizer_files_is_judged_by_its_config(
    tmp_path, tokenizer, corpus, caplog
):
    """(a) same vocabulary, no tokenizer files: transformers 5 loads a near-empty tokenizer, which
    used to be refused as 'tokenizers differ'."""
    teacher = build_model("gpt2", len(tokenizer), seed=1, layers=2)
    tdir = tmp_path / "teacher"
    teacher.save_pretrained(tdir)  # config + weights, no tokenizer
    sdir = tmp_path / "student"
    build_model("gpt2", len(tokenizer), seed=2, layers=1).save_pretrained(sdir)
    tokenizer.save_pretrained(sdir)
    assert load_tokenizer(str(tdir), required=False) is None
    with pytest.raises(LmkdError, match="no tokenizer found"):
        load_tokenizer(str(tdir))
    train = write_jsonl(tmp_path / "train.jsonl", [{"text": r["source"]} for r in corpus[:8]])
    with caplog.at_level(logging.INFO, logger="lmkd.models.loading"):
        assert (
            distill_cli(
                tmp_path,
                student_model_name_or_path=str(sdir),
                teacher_model_name_or_path=str(tdir),
                task="causal-lm",
                train_file=train,
                max_steps=1,
            )
            == 0
        )
    assert "the teacher's tokenizer is unknown; decided from the configs" in caplog.text


def test_teacher_object_with_a_larger_vocabulary_and_no_tokenizer_is_refused(tmp_path, tokenizer):
    """(b) a teacher of another, larger vocabulary passed without its tokenizer used to be sliced
    silently to the student's width."""
    student = build_model("gpt2", len(tokenizer), seed=2, layers=1)
    teacher = build_model("gpt2", len(tokenizer) + 100, seed=1, layers=2)
    with pytest.raises(
        LmkdError,
        match=r"teacher vocabulary \(400\) and student vocabulary \(300\) differ and "
        r"the teacher's tokenizer is unknown.*DistillationTrainer\(\.\.\., "
        r"teacher_tokenizer=TOKENIZER\)",
    ):
        DistillationTrainer(
            model=student,
            teacher_model=teacher,
            processing_class=tokenizer,
            args=config(tmp_path, kd_alpha=0.5),
        )
    assert not (tmp_path / "out").exists()
    # with the teacher's tokenizer the padding rows are sliced as before
    trainer = DistillationTrainer(
        model=student,
        teacher_model=teacher,
        processing_class=tokenizer,
        teacher_tokenizer=tokenizer,
        args=config(tmp_path, kd_alpha=0.5),
    )
    assert trainer.loss_objective.vocab == len(tokenizer)


def test_same_size_but_other_special_tokens_without_tokenizer_is_refused(tmp_path, tokenizer):
    student = build_model("gpt2", len(tokenizer), seed=2, layers=1)
    teacher = build_model("gpt2", len(tokenizer), seed=1, layers=2)
    teacher.config.eos_token_id = 7
    with pytest.raises(
        LmkdError,
        match=r"configs name different special tokens \(teacher vs student: "
        r"eos_token_id \[7\] vs \[1\]\)",
    ):
        DistillationTrainer(
            model=student,
            teacher_model=teacher,
            processing_class=tokenizer,
            args=config(tmp_path, kd_alpha=0.5),
        )


def test_teacher_loaded_from_a_dir_brings_its_tokenizer(tmp_path, tokenizer, corpus):
    """A teacher object loaded with from_pretrained: its saved tokenizer is the evidence."""
    from lmkd.models.scratch import train_tokenizer

    other = train_tokenizer([r["target"] for r in corpus], vocab_size=len(tokenizer))
    tdir = tmp_path / "teacher"
    build_model("gpt2", len(other), seed=1, layers=2).save_pretrained(tdir)
    other.save_pretrained(tdir)
    teacher = load_model(str(tdir), kind="causal")
    student = build_model("gpt2", len(tokenizer), seed=2, layers=1)
    with pytest.raises(LmkdError, match="tokenizers differ"):
        DistillationTrainer(
            model=student,
            teacher_model=teacher,
            processing_class=tokenizer,
            args=config(tmp_path, kd_alpha=0.5),
        )


# ---- co-distillation cohorts ----------------------------------------------------------------------


def test_cohort_of_dropout_free_copies_is_refused(tmp_path, tokenizer):
    from lmkd.train.regimes import CoDistillationTrainer, CohortModel

    student = build_model("llama", len(tokenizer), seed=1, layers=1)  # Llama: no dropout at all
    with pytest.raises(
        LmkdError, match="2 members start from identical weights and have no dropout"
    ):
        CoDistillationTrainer(
            model=student,
            args=config(tmp_path, cohort_size=2, kd_alpha=0.5),
            processing_class=tokenizer,
        )
    assert not (tmp_path / "out").exists()
    with pytest.raises(LmkdError, match="identical weights"):
        CohortModel([student, copy.deepcopy(student), copy.deepcopy(student)])
    # with dropout the copies diverge through their own masks: accepted, as before
    CohortModel.copies(build_model("gpt2", len(tokenizer), seed=1, layers=1, dropout=0.1), 2)


def test_cohort_from_distinct_checkpoints_trains_and_members_differ(tmp_path, tokenizer, corpus):
    paths = []
    for seed in (1, 2):
        d = tmp_path / f"s{seed}"
        build_model("llama", len(tokenizer), seed=seed, layers=1).save_pretrained(d)
        tokenizer.save_pretrained(d)
        paths.append(str(d))
    train = write_jsonl(tmp_path / "train.jsonl", [{"text": r["source"]} for r in corpus[:16]])
    out = tmp_path / "o"
    assert (
        distill_cli(
            tmp_path,
            student_model_name_or_path=",".join(paths),
            task="causal-lm",
            train_file=train,
            cohort_size=2,
            kd_alpha=0.5,
            max_steps=3,
            learning_rate=1e-3,
            logging_steps=1,
        )
        == 0
    )
    members = [load_model(str(out / f"member-{k}"), kind="causal") for k in range(2)]
    inits = [load_model(p, kind="causal") for p in paths]
    batch = tokenizer([r["source"] for r in corpus[:4]], return_tensors="pt", padding=True)
    with torch.no_grad():
        z = [m.eval()(**batch).logits for m in members]
    assert not torch.allclose(z[0], z[1])  # the KD term between them is not 0
    for member, init in zip(members, inits):  # member k trained from checkpoint k
        a, b = member.state_dict(), init.state_dict()
        assert any(not torch.equal(a[k], b[k]) for k in a)
        assert all(a[k].shape == b[k].shape for k in a)
    # a cohort of 3 from 2 checkpoints is refused
    with pytest.raises(
        LmkdError, match="names 2 students: that is a co-distillation cohort, set cohort_size 2"
    ):
        from lmkd.train.config import ModelArguments
        from lmkd.train.regimes import cohort_paths

        cohort_paths(
            ModelArguments(student_model_name_or_path=",".join(paths)),
            config(tmp_path, cohort_size=3),
        )


def test_one_checkpoint_cohort_gets_distinct_seeds_for_weights_it_lacks(tmp_path, tokenizer):
    """A masked-LM checkpoint loaded as K classifiers: each member's new head is initialised under
    its own seed, so a dropout-free cohort of them can differ."""
    from lmkd.train.regimes import load_cohort

    d = tmp_path / "mlm"
    build_model("bert", len(tokenizer), seed=1, layers=1, dropout=0.0).save_pretrained(d)
    cohort = load_cohort([str(d)], "classification", config(tmp_path, cohort_size=2, kd_alpha=0.5))
    heads = [m.classifier.weight for m in cohort.members]
    assert not torch.equal(heads[0], heads[1])
    assert torch.equal(
        cohort.members[0].bert.embeddings.word_embeddings.weight,
        cohort.members[1].bert.embeddings.word_embeddings.weight,
    )


# ---- on-policy KD: exact resume, per-row prompts ----------------------------------------------------


def _on_policy_run(
    tmp_path, tokenizer, corpus, out, max_steps=6, callbacks=(), resume=None, record=None
):
    import datasets

    from lmkd.data.collators import collator_for
    from lmkd.data.dataset import DataArguments
    from lmkd.data.tokenizing import tokenize
    from lmkd.train.regimes import OnPolicyDistillationTrainer

    class Recording(OnPolicyDistillationTrainer):
        def on_policy_batch(self, model, batch):
            if record is not None:
                record.append(self.batch_index)
            return super().on_policy_batch(model, batch)

    teacher = build_model("gpt2", len(tokenizer), seed=1, layers=2)
    student = build_model("gpt2", len(tokenizer), seed=2, layers=1)
    ds = tokenize(
        datasets.Dataset.from_list([{"text": r["source"]} for r in corpus[:24]]),
        tokenizer,
        DataArguments(task="causal-lm", train_file="-"),
    )
    args = config(
        tmp_path,
        output_dir=str(tmp_path / out),
        kd_loss="jsd",
        kd_alpha=0.7,
        on_policy_fraction=0.5,
        on_policy_max_new_tokens=4,
        max_steps=max_steps,
        gradient_accumulation_steps=2,
        per_device_train_batch_size=2,
        save_strategy="steps",
        save_steps=2,
        learning_rate=3e-3,
        seed=5,
    )
    trainer = Recording(
        model=student,
        args=args,
        teacher_model=teacher,
        train_dataset=ds,
        processing_class=tokenizer,
        data_collator=collator_for("causal-lm", tokenizer),
        callbacks=list(callbacks),
    )
    trainer.train(resume_from_checkpoint=resume)
    return trainer


def test_on_policy_resume_equals_an_uninterrupted_run(tmp_path, tokenizer, corpus):
    from transformers import TrainerCallback

    class Crash(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            if state.global_step == 3:
                raise KeyboardInterrupt("simulated kill")

    drawn_full, drawn_resumed = [], []
    full = _on_policy_run(tmp_path, tokenizer, corpus, "full", record=drawn_full)
    with pytest.raises(KeyboardInterrupt):
        _on_policy_run(tmp_path, tokenizer, corpus, "killed", callbacks=[Crash()])
    resumed = _on_policy_run(
        tmp_path, tokenizer, corpus, "killed", resume=True, record=drawn_resumed
    )
    assert resumed.state.global_step == 6
    # the coin is a function of (seed, micro-batch index): the resumed run draws the same batches on-policy
    assert drawn_resumed == [i for i in drawn_full if i >= 2 * 2] and 0 < len(drawn_full) < 12
    a, b = full.model.state_dict(), resumed.model.state_dict()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6), k


def test_on_policy_causal_prompts_are_per_row(tmp_path, tokenizer, corpus):
    import datasets

    from lmkd.data.collators import collator_for
    from lmkd.data.dataset import DataArguments
    from lmkd.data.tokenizing import PROMPT_LENGTH, tokenize
    from lmkd.train.regimes import OnPolicyDistillationTrainer, wrap_collator

    rows = [
        {"text": r["source"], "prompt": " ".join(r["source"].split()[: 1 + i % 3])}
        for i, r in enumerate(corpus[:4])
    ]
    data_args = DataArguments(task="causal-lm", train_file="-", prompt_column="prompt")
    ds = tokenize(datasets.Dataset.from_list(rows), tokenizer, data_args)
    lengths = ds[PROMPT_LENGTH]
    for row, n, ids in zip(
        rows, lengths, ds["input_ids"]
    ):  # the tokens the prompt and the row share
        p_ids = tokenizer(row["prompt"])["input_ids"]
        assert ids[:n] == p_ids[:n] and n >= 1
    assert len(set(lengths)) > 1
    teacher = build_model("gpt2", len(tokenizer), seed=1, layers=2)
    student = build_model("gpt2", len(tokenizer), seed=2, layers=1)
    collator = wrap_collator(collator_for("causal-lm", tokenizer), data_args)
    args = config(
        tmp_path, kd_loss="jsd", kd_alpha=1.0, on_policy_fraction=1.0, on_policy_max_new_tokens=5
    )
    trainer = OnPolicyDistillationTrainer(
        model=student,
        args=args,
        teacher_model=teacher,
        train_dataset=ds,
        processing_class=tokenizer,
        data_collator=collator,
    )
    batch = collator([ds[i] for i in range(4)])
    assert batch[PROMPT_LENGTH].tolist() == lengths
    got = trainer.on_policy_batch(student, batch)
    for k, n in enumerate(
        lengths
    ):  # row k continues its own prompt of n tokens, not the shortest one
        assert got["input_ids"][k, :n].tolist() == ds[k]["input_ids"][:n]
        assert (got["labels"][k, :n] == -100).all() and got["labels"][k, n] != -100
        assert got["attention_mask"][k, :n].all()
        assert torch.equal(got["attention_mask"][k, n:].bool(), got["labels"][k, n:] != -100)
    # without a prompt column: each row's first on_policy_prompt_tokens tokens (all but its last at most)
    short = {
        "input_ids": torch.tensor([[5, 6, 7, 8, 9, 10], [5, 6, 0, 0, 0, 0]]),
        "attention_mask": torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 0, 0, 0, 0]]),
    }
    trainer.args.on_policy_prompt_tokens = 4
    got = trainer.on_policy_batch(student, short)
    assert got["input_ids"][0, :4].tolist() == [5, 6, 7, 8] and (got["labels"][0, :4] == -100).all()
    assert got["input_ids"][1, :1].tolist() == [5] and (got["labels"][1, 1] != -100)


# ---- eval_loss: one quantity with an online teacher and with a logit cache ----------------------


def test_eval_loss_is_the_same_mix_online_and_from_a_cache(
    tmp_path, tiny_model_dir, tokenizer, corpus
):
    from lmkd.data.collators import collator_for
    from lmkd.data.dataset import DataArguments
    from lmkd.data.reading import load_data
    from lmkd.data.tokenizing import tokenize
    from lmkd.teacher import logit_cache_writer

    teacher_dir = tiny_model_dir("marian", layers=1)
    train = write_jsonl(tmp_path / "train.jsonl", corpus[:12])
    valid = write_jsonl(tmp_path / "valid.jsonl", corpus[100:110])
    data_args = DataArguments(
        task="translation", train_file=train, max_source_length=24, max_target_length=24
    )
    caches = {}
    for name, path in (("train", train), ("valid", valid)):
        caches[name] = str(tmp_path / f"cache-{name}")
        logit_cache_writer.cache_logits(
            teacher_dir,
            DataArguments(
                task="translation", train_file=path, max_source_length=24, max_target_length=24
            ),
            caches[name],
            len(tokenizer),
            batch_size=4,
            logprob_dtype="float32",
        )
    ds = {
        n: tokenize(load_data(p, ["source", "target"]), tokenizer, data_args)
        for n, p in (("train", train), ("valid", valid))
    }
    student = build_model("marian", len(tokenizer), seed=2, layers=1, dropout=0.0)
    results = []
    for extra in ({}, {"logit_cache": caches["train"], "eval_logit_cache": caches["valid"]}):
        kw = {} if extra else {"teacher_model": load_model(teacher_dir, kind="seq2seq")}
        trainer = DistillationTrainer(
            model=copy.deepcopy(student),
            processing_class=tokenizer,
            args=config(tmp_path, kd_alpha=0.6, per_device_eval_batch_size=4, **extra),
            train_dataset=ds["train"],
            eval_dataset=ds["valid"],
            data_collator=collator_for("translation", tokenizer, student),
            **kw,
        )
        results.append(trainer.evaluate())
    online, cached = results
    assert online["eval_loss_kd"] > 0 and cached["eval_loss_kd"] > 0
    for key in ("eval_loss", "eval_loss_ce", "eval_loss_kd"):
        assert online[key] == pytest.approx(cached[key], rel=1e-4), key
    # the documented mix (the mean over eval batches of each batch's (1 - alpha) CE + alpha KD)
    assert online["eval_loss"] == pytest.approx(
        0.4 * online["eval_loss_ce"] + 0.6 * online["eval_loss_kd"], rel=0.05
    )
    # without a cache of the validation data a cached run is refused instead of reporting CE alone
    with pytest.raises(LmkdError, match="set eval_logit_cache DIR"):
        DistillationTrainer(
            model=copy.deepcopy(student),
            processing_class=tokenizer,
            args=config(
                tmp_path,
                kd_alpha=0.6,
                logit_cache=caches["train"],
                output_dir=str(tmp_path / "refused"),
            ),
            train_dataset=ds["train"],
            eval_dataset=ds["valid"],
            data_collator=collator_for("translation", tokenizer, student),
        )
    assert not (tmp_path / "refused").exists()
