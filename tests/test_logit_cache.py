"""lmkd.teacher.logit_cache and `lmkd cache-logits`: what is stored (the teacher's top-K, the tail, compact
dtypes), resuming after a kill gives identical shards, training from a full-vocabulary cache equals
online KD, and a small-K cache trains with no teacher at all."""

import copy
import filecmp
import json
import os

import datasets
import numpy as np
import pytest
import torch

from lmkd import DistillationConfig, DistillationTrainer, LmkdError
from lmkd.cli import ModelArguments, main
from lmkd.data.collators import collator_for
from lmkd.data.dataset import DataArguments
from lmkd.data.reading import load_data
from lmkd.data.tokenizing import tokenize
from lmkd.models.loading import load_model, load_tokenizer
from lmkd.models.scratch import build_model
from lmkd.teacher import logit_cache, logit_cache_writer
from lmkd.train.run import run_distill


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory, tokenizer):
    path = tmp_path_factory.mktemp("cache-teacher")
    build_model("marian", len(tokenizer), seed=1, layers=2, dropout=0.0).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def _data_args(path, **kw):
    return DataArguments(
        task="translation", train_file=path, max_source_length=24, max_target_length=24, **kw
    )


def _files(d):
    return sorted(os.path.relpath(os.path.join(dp, f), d) for dp, _, fs in os.walk(d) for f in fs)


def test_cache_stores_teacher_topk_compactly(teacher_dir, translation_file, tmp_path):
    out = tmp_path / "cache"
    k = 8
    summary = logit_cache_writer.cache_logits(
        teacher_dir, _data_args(translation_file), str(out), k, batch_size=5, shard_rows=16
    )
    cache = logit_cache.LogitCache(str(out))
    assert cache.rows == 64 and summary["shards"] == 4
    # every byte on disk (shards incl. .npy headers, not meta.json) per cached position
    assert summary["bytes_per_position"] <= 6 * k + 8
    assert (
        cache.shards[0]["ids"].dtype == np.uint16
        and cache.shards[0]["logprobs"].dtype == np.float16
    )
    # the 32-bit layout (vocabulary > 65536) is also within 6K + 8: 4K ids + 2K log-probs + token + tail
    assert np.dtype(logit_cache.id_dtype(70000)).itemsize * (k + 1) + 2 * (k + 1) <= 6 * k + 8

    # row 5 against a direct teacher forward
    tok = load_tokenizer(teacher_dir)
    teacher = load_model(teacher_dir, kind="seq2seq").eval()
    ds = tokenize(
        load_data(translation_file, ["source", "target"]), tok, _data_args(translation_file)
    )
    batch = collator_for("translation", tok, teacher)([ds[5]])
    with torch.no_grad():
        lp = torch.log_softmax(teacher(**batch).logits[0].float(), -1)
    tokens, ids, lps, tail = cache.row(5)
    assert tokens.tolist() == ds[5]["labels"]
    top, top_ids = lp.topk(k, -1)
    assert np.array_equal(ids.astype(np.int64), top_ids.numpy())
    assert np.allclose(lps.astype(np.float32), top.numpy(), atol=2e-2, rtol=1e-3)
    rest = torch.logsumexp(lp.scatter(1, top_ids, float("-inf")), -1)
    assert np.allclose(tail.astype(np.float32), rest.numpy(), atol=2e-2, rtol=1e-3)
    # probabilities of the K buckets plus the tail sum to 1
    total = np.exp(lps.astype(np.float64)).sum(-1) + np.exp(tail.astype(np.float64))
    assert np.allclose(total, 1.0, atol=5e-3)


@pytest.mark.parametrize("tail_samples", [0, 3])
def test_resume_after_kill_gives_identical_shards(
    teacher_dir, translation_file, tmp_path, monkeypatch, tail_samples
):
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    kw = dict(batch_size=3, shard_rows=6, tail_samples=tail_samples)
    data = _data_args(translation_file, max_train_samples=24)
    logit_cache_writer.cache_logits(teacher_dir, data, str(full), 4, **kw)

    write = logit_cache_writer.write_shard
    calls = []

    def killed(path, arrays):
        calls.append(path)
        if len(calls) == 3:  # die while writing the third shard: a partial temp dir is left behind
            os.makedirs(path + ".tmp", exist_ok=True)
            np.save(os.path.join(path + ".tmp", "offsets.npy"), arrays["offsets"][:1])
            raise KeyboardInterrupt
        write(path, arrays)

    monkeypatch.setattr(logit_cache_writer, "write_shard", killed)
    with pytest.raises(KeyboardInterrupt):
        logit_cache_writer.cache_logits(teacher_dir, data, str(resumed), 4, **kw)
    monkeypatch.setattr(logit_cache_writer, "write_shard", write)
    with pytest.raises(LmkdError, match="incomplete"):
        logit_cache.LogitCache(str(resumed))
    summary = logit_cache_writer.cache_logits(teacher_dir, data, str(resumed), 4, **kw)
    assert summary["shards_skipped"] == 2 and summary["shards"] == 4
    assert _files(full) == _files(resumed)
    for f in _files(full):
        assert filecmp.cmp(full / f, resumed / f, shallow=False), f
    # other settings into the same directory: refused, not mixed
    with pytest.raises(LmkdError, match="other settings"):
        logit_cache_writer.cache_logits(teacher_dir, data, str(resumed), 5, **kw)


def _config(tmp_path, **kw):
    base = dict(
        output_dir=str(tmp_path / "out"),
        report_to="none",
        use_cpu=True,
        kd_alpha=0.6,
        kd_temperature=2.0,
        save_strategy="no",
        per_device_train_batch_size=8,
        disable_tqdm=True,
    )
    base.update(kw)
    return DistillationConfig(**base)


@pytest.fixture(scope="module")
def full_vocab_cache(teacher_dir, tokenizer, tmp_path_factory):
    from conftest import corpus_rows

    path = tmp_path_factory.mktemp("full-cache")
    data = str(path / "train.jsonl")
    with open(data, "w", encoding="utf-8") as f:
        for r in corpus_rows("train", 12):
            f.write(json.dumps(r) + "\n")
    out = str(path / "cache")
    logit_cache_writer.cache_logits(
        teacher_dir,
        _data_args(data),
        out,
        len(tokenizer),
        batch_size=4,
        shard_rows=8,
        logprob_dtype="float32",
    )
    return data, out


@pytest.mark.parametrize(
    "kd_loss,chunk", [("forward_kl", -1), ("reverse_kl", -1), ("jsd", -1), ("forward_kl", 0)]
)
def test_full_vocab_cache_equals_online_kd(full_vocab_cache, tmp_path, kd_loss, chunk):
    """Exactness: with K = V (float32 log-probs) the cached loss and gradients are the online ones."""
    translation_file, out = full_vocab_cache
    teacher_dir = logit_cache.LogitCache(out).meta["teacher"]
    tok = load_tokenizer(teacher_dir)
    ds = tokenize(
        load_data(translation_file, ["source", "target"]).select(range(12)),
        tok,
        _data_args(translation_file),
    )
    student = build_model("marian", len(tok), seed=2, layers=1, dropout=0.0)
    student.train()
    base = collator_for("translation", tok, student)
    online = DistillationTrainer(
        model=copy.deepcopy(student),
        args=_config(tmp_path, kd_chunk_size=chunk, kd_loss=kd_loss),
        teacher_model=load_model(teacher_dir, kind="seq2seq"),
        processing_class=tok,
    )
    cached = DistillationTrainer(
        model=student,
        args=_config(tmp_path, kd_chunk_size=chunk, kd_loss=kd_loss, logit_cache=out),
        train_dataset=ds,
        data_collator=base,
        processing_class=tok,
    )
    assert cached.teacher is None
    rows = [9, 2, 7, 0, 11]
    b_online = base([ds[i] for i in rows])
    b_cached = cached.data_collator([dict(cached.train_dataset[i]) for i in rows])
    assert b_cached[logit_cache.IDS].shape[-1] == len(tok) == student.config.vocab_size
    for _ in range(2):  # (the second call uses the fused head)
        results = []
        for tr, batch in ((online, b_online), (cached, b_cached)):
            tr.model.zero_grad()
            loss = tr.compute_loss(tr.model, batch)
            loss.backward()
            results.append(
                (
                    loss.detach(),
                    {
                        n: p.grad.clone()
                        for n, p in tr.model.named_parameters()
                        if p.grad is not None
                    },
                )
            )
        (l1, g1), (l2, g2) = results
        assert torch.allclose(l1, l2, rtol=1e-4), (l1, l2)
        for n in g1:
            assert torch.allclose(g1[n], g2[n], rtol=1e-3, atol=1e-5), n


def test_cli_cache_then_distill_without_teacher(
    teacher_dir, translation_file, tmp_path, capsys, monkeypatch
):
    out = str(tmp_path / "cache")
    rc = main(
        [
            "cache-logits",
            "--teacher",
            teacher_dir,
            "--data",
            translation_file,
            "--top-k",
            "4",
            "--output",
            out,
            "--max-source-length",
            "24",
            "--max-target-length",
            "24",
            "--batch-size",
            "8",
            "--max-samples",
            "16",
        ]
    )
    assert rc == 0
    summary = json.loads(capsys.readouterr().out)
    # the CLI's default stores 32 sampled tail ids per token (uint16 ids, fp16 log-probs): 4 * (K + 32) + 4
    assert summary["tail_samples"] == 32
    assert 4 * (4 + 32) <= summary["bytes_per_position"] <= 4 * (4 + 32) + 8

    def no_teacher(*a, **k):
        raise AssertionError("a teacher was loaded")

    monkeypatch.setattr(DistillationTrainer, "_setup_teacher", no_teacher)

    student_dir = tmp_path / "student"
    tok = load_tokenizer(teacher_dir)
    build_model("marian", len(tok), seed=3, layers=1, dropout=0.0).save_pretrained(student_dir)
    tok.save_pretrained(student_dir)
    model_args = ModelArguments(student_model_name_or_path=str(student_dir))
    args = _config(tmp_path, logit_cache=out, max_steps=2, learning_rate=3e-3)
    before = load_model(str(student_dir), kind="seq2seq").state_dict()
    metrics = run_distill(model_args, _data_args(translation_file, max_train_samples=16), args)
    assert np.isfinite(metrics["train_loss"]) and metrics["train_loss"] > 0
    after = load_model(args.output_dir, kind="seq2seq").state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)


def test_tail_samples_are_stored_compactly_and_drawn_outside_the_topk(
    teacher_dir, translation_file, tmp_path
):
    out = tmp_path / "cache"
    k, m = 4, 6
    summary = logit_cache_writer.cache_logits(
        teacher_dir,
        _data_args(translation_file, max_train_samples=32),
        str(out),
        k,
        batch_size=5,
        shard_rows=16,
        tail_samples=m,
        seed=3,
    )
    assert summary["bytes_per_position"] <= 6 * (k + m) + 8
    cache = logit_cache.LogitCache(str(out))
    assert cache.tail_samples == m
    assert (
        cache.shards[0]["sample_ids"].dtype == np.uint16
        and cache.shards[0]["sample_logprobs"].dtype == np.float16
    )
    tok = load_tokenizer(teacher_dir)
    teacher = load_model(teacher_dir, kind="seq2seq").eval()
    ds = tokenize(
        load_data(translation_file, ["source", "target"]).select(range(32)),
        tok,
        _data_args(translation_file),
    )
    for row in (0, 17):
        batch = collator_for("translation", tok, teacher)([ds[row]])
        with torch.no_grad():
            lp = torch.log_softmax(teacher(**batch).logits[0].float(), -1)
        _, ids, _, _ = cache.row(row)
        s_ids, s_lps = cache.samples(row)
        assert s_ids.shape == (len(ds[row]["labels"]), m)
        assert not (s_ids[:, :, None] == ids[:, None, :]).any()  # never one of the top-K
        want = lp.gather(1, torch.from_numpy(s_ids.astype(np.int64)))
        assert np.allclose(s_lps.astype(np.float32), want.numpy(), atol=2e-2, rtol=1e-3)
    # another seed draws other samples; the same seed, the same ones
    again = logit_cache_writer.cache_logits(
        teacher_dir,
        _data_args(translation_file, max_train_samples=32),
        str(tmp_path / "again"),
        k,
        batch_size=5,
        shard_rows=16,
        tail_samples=m,
        seed=3,
    )
    other = logit_cache_writer.cache_logits(
        teacher_dir,
        _data_args(translation_file, max_train_samples=32),
        str(tmp_path / "other"),
        k,
        batch_size=5,
        shard_rows=16,
        tail_samples=m,
        seed=4,
    )
    assert again["bytes"] == summary["bytes"] and other["bytes"] == summary["bytes"]
    a = logit_cache.LogitCache(again["output"]).samples(17)[0]
    b = logit_cache.LogitCache(other["output"]).samples(17)[0]
    assert np.array_equal(a, cache.samples(17)[0]) and not np.array_equal(b, a)


def test_training_from_a_sampled_tail_cache_uses_the_samples(
    teacher_dir, translation_file, tmp_path
):
    """The trainer's KD on a batch equals lmkd.losses.topk.topk_kd_loss with the samples -- and differs
    from the same cache read without them (the tail bucket)."""
    from lmkd.losses.topk import TopK, topk_kd_loss

    out = str(tmp_path / "cache")
    logit_cache_writer.cache_logits(
        teacher_dir,
        _data_args(translation_file, max_train_samples=16),
        out,
        4,
        batch_size=8,
        tail_samples=5,
    )
    tok = load_tokenizer(teacher_dir)
    ds = tokenize(
        load_data(translation_file, ["source", "target"]).select(range(16)),
        tok,
        _data_args(translation_file),
    )
    student = build_model("marian", len(tok), seed=2, layers=1, dropout=0.0)
    trainer = DistillationTrainer(
        model=student,
        args=_config(tmp_path, logit_cache=out, kd_alpha=1.0, kd_temperature=1.0),
        train_dataset=ds,
        data_collator=collator_for("translation", tok, student),
        processing_class=tok,
    )
    batch = next(iter(trainer.get_train_dataloader()))
    assert logit_cache.SAMPLE_IDS in batch
    student.train()
    loss = trainer.compute_loss(student, dict(batch))
    mask = batch["labels"].ne(-100)
    fwd = {k: v for k, v in batch.items() if k not in logit_cache.BATCH_KEYS and k != "labels"}
    fwd["decoder_input_ids"] = student.prepare_decoder_input_ids_from_labels(labels=batch["labels"])
    logits = student(**fwd).logits
    teacher = logit_cache.batch_topk(batch, mask)
    ref = topk_kd_loss(logits, teacher, mask) / mask.sum()
    bucket = (
        topk_kd_loss(logits, TopK(teacher.ids, teacher.logprobs, teacher.tail), mask) / mask.sum()
    )
    assert torch.allclose(loss, ref, rtol=1e-4), (loss, ref)
    assert not torch.allclose(loss, bucket, rtol=1e-3)


def test_small_k_training_logs_kd_and_keeps_cache_columns(teacher_dir, translation_file, tmp_path):
    """remove_unused_columns (on by default) must not drop the cache row column: loss_kd is logged."""
    out = str(tmp_path / "cache")
    logit_cache_writer.cache_logits(
        teacher_dir, _data_args(translation_file, max_train_samples=16), out, 4, batch_size=8
    )
    tok = load_tokenizer(teacher_dir)
    ds = tokenize(
        load_data(translation_file, ["source", "target"]).select(range(16)),
        tok,
        _data_args(translation_file),
    )
    student = build_model("marian", len(tok), seed=2, layers=1, dropout=0.0)
    trainer = DistillationTrainer(
        model=student,
        args=_config(tmp_path, logit_cache=out, max_steps=4, logging_steps=1, learning_rate=3e-3),
        train_dataset=ds,
        data_collator=collator_for("translation", tok, student),
        processing_class=tok,
    )
    assert trainer.args.remove_unused_columns and trainer.teacher is None
    trainer.train()
    kd = [h["loss_kd"] for h in trainer.state.log_history if "loss_kd" in h]
    assert len(kd) == 4 and all(np.isfinite(kd)) and all(v > 0 for v in kd)


def test_mismatched_data_is_refused(teacher_dir, translation_file, tmp_path):
    out = str(tmp_path / "cache")
    logit_cache_writer.cache_logits(
        teacher_dir, _data_args(translation_file, max_train_samples=8), out, 4
    )
    tok = load_tokenizer(teacher_dir)
    raw = load_data(translation_file, ["source", "target"])
    student = build_model("marian", len(tok), seed=2, layers=1, dropout=0.0)
    for ds, msg in (
        (tokenize(raw.select(range(9)), tok, _data_args(translation_file)), "has 9 rows"),
        (
            tokenize(
                raw.select(range(8)),
                tok,
                DataArguments(task="translation", train_file="-", max_target_length=5),
            ),
            "tokenised differently",
        ),
    ):
        with pytest.raises(LmkdError, match=msg):
            DistillationTrainer(
                model=student,
                args=_config(tmp_path, logit_cache=out),
                train_dataset=ds,
                processing_class=tok,
            )
    with pytest.raises(LmkdError, match="mse"):
        _config(tmp_path, logit_cache=out, kd_loss="mse")
    with pytest.raises(LmkdError, match="not a logit cache"):
        DistillationTrainer(
            model=student,
            args=_config(tmp_path, logit_cache=str(tmp_path)),
            train_dataset=datasets.Dataset.from_list([{"input_ids": [1]}]),
            processing_class=tok,
        )


def test_causal_lm_full_vocab_cache_equals_online_kd(tokenizer, corpus, tmp_path):
    """The causal shift: cached position j predicts token j + 1, as the trainer's shifted logits."""
    teacher_dir = tmp_path / "gpt2-teacher"
    build_model("gpt2", len(tokenizer), seed=1, layers=2, dropout=0.0).save_pretrained(teacher_dir)
    tokenizer.save_pretrained(teacher_dir)
    data = tmp_path / "lm.jsonl"
    with open(data, "w", encoding="utf-8") as f:
        for r in corpus[:10]:
            f.write(json.dumps({"text": r["source"]}) + "\n")
    data_args = DataArguments(task="causal-lm", train_file=str(data), max_source_length=20)
    out = str(tmp_path / "cache")
    logit_cache_writer.cache_logits(
        str(teacher_dir), data_args, out, len(tokenizer), batch_size=4, logprob_dtype="float32"
    )
    tok = load_tokenizer(str(teacher_dir))
    ds = tokenize(load_data(str(data), ["text"]), tok, data_args)
    student = build_model("gpt2", len(tok), seed=2, layers=1, dropout=0.0)
    student.train()
    base = collator_for("causal-lm", tok, student)
    online = DistillationTrainer(
        model=copy.deepcopy(student),
        args=_config(tmp_path),
        teacher_model=load_model(str(teacher_dir), kind="causal"),
        processing_class=tok,
    )
    cached = DistillationTrainer(
        model=student,
        args=_config(tmp_path, logit_cache=out),
        train_dataset=ds,
        data_collator=base,
        processing_class=tok,
    )
    rows = [3, 0, 8, 5]
    b_online = base([ds[i] for i in rows])
    b_cached = cached.data_collator([dict(cached.train_dataset[i]) for i in rows])
    assert b_cached[logit_cache.MASK].shape == b_online["input_ids"][:, 1:].shape
    l1 = online.compute_loss(online.model, b_online)
    l2 = cached.compute_loss(student, b_cached)
    assert torch.allclose(l1, l2, rtol=1e-4), (l1, l2)
