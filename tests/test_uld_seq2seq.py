"""Cross-tokenizer KD for encoder-decoder models (issue 18): the decoder-position rule on hand-made
offsets, the seq2seq collator on two real tokenizers, and `lmkd distill` runs through the CLI with a
Marian teacher and a BART student of two different BPE vocabularies."""

import json
import math

import pytest
import torch

from lmkd.data.collators import collator_for
from lmkd.models.scratch import build_model, train_tokenizer
from lmkd.teacher.cross_tokenizer import (
    Seq2SeqCrossTokenizerCollator,
    align_offsets,
    decoder_positions,
    encode_with_offsets,
)


def spans(text, pieces):
    """(start, end) of each piece left to right in ``text``; None gives a special token's (0, 0)."""
    out, at = [], 0
    for p in pieces:
        if p is None:
            out.append((0, 0))
            continue
        i = text.index(p, at)
        out.append((i, i + len(p)))
        at = i + len(p)
    return out


# ---- the decoder-position rule ------------------------------------------------------------------


def test_decoder_positions_follow_the_text_read():
    text = "the unbelievable"
    student = spans(text, ["the", " un", "believ", "able", None])  # ... </s>
    teacher = spans(text, ["the", " unbelievable", None])
    align = align_offsets(student, teacher)
    assert align == [0, 0, 0, 1, -1]
    # position 0 (read nothing) <-> 0; after "the" <-> after "the" (1); after " un" / "believ" the teacher
    # has read no more than "the" (1); after "able" both have read the whole text and predict </s> (2)
    assert decoder_positions(align, student, teacher) == [0, 1, 1, 1, 2]
    # the other way round: the teacher splits
    back = align_offsets(teacher, student)
    assert decoder_positions(back, teacher, student) == [0, 1, 4]


def test_leading_special_tokens_and_a_short_teacher():
    text = "a cat"
    bart_like = spans(text, [None, "a", " cat", None])  # <s> a cat </s>
    marian_like = spans(text, ["a", " cat", None])  # a cat </s>
    # the student's <s> is predicted from nothing, by no teacher position; the position after it predicts "a",
    # as the teacher's first position does
    assert decoder_positions(align_offsets(bart_like, marian_like), bart_like, marian_like) == [
        -1,
        0,
        1,
        2,
    ]
    assert decoder_positions(align_offsets(marian_like, bart_like), marian_like, bart_like) == [
        1,
        2,
        3,
    ]
    # a teacher cut after "a" (no </s>): the positions after its last label have no teacher position
    cut = spans(text, ["a"])
    assert decoder_positions(
        align_offsets(marian_like, cut, teacher_covers=1), marian_like, cut
    ) == [0, -1, -1]
    # a student target of special tokens only has no aligned position
    assert decoder_positions([-1], [(0, 0)], marian_like) == [-1]


# ---- the collator on real tokenizers ------------------------------------------------------------


@pytest.fixture(scope="module")
def pair(corpus):
    texts = [r["source"] for r in corpus[:300]] + [r["target"] for r in corpus[:300]]
    return train_tokenizer(texts, vocab_size=300), train_tokenizer(texts, vocab_size=900)


def features(tok, rows):
    out = []
    for r in rows:
        enc = dict(tok(r["source"]))
        enc["labels"] = tok(text_target=r["target"])["input_ids"]
        out.append(enc)
    return out


def test_collator_encodes_source_and_target_for_the_teacher(pair, corpus):
    small, large = pair
    rows = corpus[:3]
    model = build_model("bart", len(small), layers=1)
    batch = Seq2SeqCrossTokenizerCollator(
        collator_for("translation", small, model), small, large, 64, 64
    )(features(small, rows))
    aligned = []
    for b, r in enumerate(rows):
        assert (
            batch["teacher_input_ids"][b][batch["teacher_attention_mask"][b].bool()].tolist()
            == large(r["source"])["input_ids"]
        )
        t_labels = batch["teacher_labels"][b]
        assert t_labels[t_labels != -100].tolist() == large(r["target"])["input_ids"]
        s_ids, s_off, _ = encode_with_offsets(small, r["target"])
        _, t_off, _ = encode_with_offsets(large, r["target"])
        n = len(s_ids)
        want = decoder_positions(align_offsets(s_off, t_off), s_off, t_off)
        assert batch["teacher_position"][b, :n].tolist() == want
        assert (batch["teacher_position"][b, n:] == -1).all()
        assert len(s_ids) > len(t_off)  # the smaller vocabulary splits more
        aligned += [j >= 0 for j in want]
    assert (
        0 < sum(aligned) < len(aligned)
    )  # most positions aligned, some not (inside a teacher's first token)
    # one tokenizer on both sides: the identity
    same = Seq2SeqCrossTokenizerCollator(
        collator_for("translation", small, model), small, small, 64, 64
    )(features(small, rows))
    real = same["labels"].ne(-100)
    assert torch.equal(
        same["teacher_position"][real], torch.arange(real.shape[1]).expand_as(real)[real]
    )
    assert torch.equal(same["teacher_labels"], same["labels"])


# ---- `lmkd distill` through the CLI ---------------------------------------------------------------


def save_pair(tmp_path, tokenizers, teacher_arch="marian", peaked=True):
    """A (Marian) teacher and a BART student, each saved with its own tokenizer (no dropout: runs compare)."""
    paths = {}
    for name, tok in tokenizers.items():
        arch = teacher_arch if name == "teacher" else "bart"
        model = build_model(
            arch, len(tok), seed=1 if name == "teacher" else 0, layers=1, dropout=0.0
        )
        if (
            name == "teacher" and peaked
        ):  # a sharper last norm: a peaked teacher, something to learn
            with torch.no_grad():
                model.model.decoder.layers[-1].final_layer_norm.weight.mul_(20)
        model.save_pretrained(tmp_path / name)
        tok.save_pretrained(tmp_path / name)
        paths[name] = tmp_path / name
    return paths


def distill(tmp_path, paths, corpus, loss, steps, name, teacher_tokenizer=True):
    from lmkd.cli import main

    data = tmp_path / "train.jsonl"
    data.write_text(
        "".join(
            json.dumps({"source": r["source"], "target": r["target"]}) + "\n" for r in corpus[:32]
        )
    )
    out = tmp_path / name
    flags = {
        "student_model_name_or_path": str(paths["student"]),
        "teacher_model_name_or_path": str(paths["teacher"]),
        "task": "translation",
        "train_file": str(data),
        "max_source_length": 48,
        "max_target_length": 48,
        "kd_loss": loss,
        "kd_alpha": 1.0,
        "kd_temperature": 1.0,
        "learning_rate": 1e-2,
        "lr_scheduler_type": "constant",
        "warmup_steps": 0,
        "max_steps": steps,
        "per_device_train_batch_size": 8,
        "logging_steps": 1,
        "use_cpu": True,
        "report_to": "none",
        "save_strategy": "steps",
        "save_steps": steps,
        "output_dir": str(out),
        "dataloader_num_workers": 0,
        "seed": 0,
    }
    if teacher_tokenizer:
        flags["teacher_tokenizer"] = str(paths["teacher"])
    recipe = tmp_path / f"{name}.yaml"
    recipe.write_text("".join(f"{k}: {json.dumps(v)}\n" for k, v in flags.items()))
    assert main(["distill", str(recipe)]) == 0
    history = json.loads((out / f"checkpoint-{steps}" / "trainer_state.json").read_text())[
        "log_history"
    ]
    return out, [h["loss_kd"] for h in history if "loss_kd" in h]


def state(path, kind="seq2seq"):
    from lmkd.models.loading import AUTO_CLASS

    return {k: v.clone() for k, v in AUTO_CLASS[kind].from_pretrained(path).state_dict().items()}


@pytest.mark.parametrize("loss", ["uld", "uld_hybrid"])
def test_cross_tokenizer_seq2seq_distill_through_the_cli(tmp_path, corpus, pair, loss):
    small, large = pair
    paths = save_pair(tmp_path, {"student": small, "teacher": large})
    student0, teacher0 = state(paths["student"]), state(paths["teacher"])
    out, kd = distill(tmp_path, paths, corpus, loss, 10, "out")
    print("loss_kd per step:", kd)
    assert len(kd) == 10 and all(math.isfinite(x) and x > 0 for x in kd)
    assert (
        loss == "uld_hybrid" or max(kd) <= 2
    )  # ULD alone is an L1 distance of probability vectors
    assert sum(kd[-3:]) / 3 < 0.9 * sum(kd[:3]) / 3 and kd[-1] < kd[0], (
        kd
    )  # seeded: the same on every run
    student1, teacher1 = state(out), state(paths["teacher"])
    assert any(not torch.equal(v, student1[k]) for k, v in student0.items())  # the student learned
    assert all(torch.equal(v, teacher1[k]) for k, v in teacher0.items())  # the teacher did not


def test_same_tokenizer_hybrid_is_the_forward_kl_through_the_cli(tmp_path, corpus, pair):
    small, _ = pair
    # one architecture: the plain path feeds the teacher the student's decoder inputs (BART's start token),
    # the cross-tokenizer path the teacher's own (Marian's); with one architecture they are the same
    paths = save_pair(
        tmp_path, {"student": small, "teacher": small}, teacher_arch="bart", peaked=False
    )
    out_h, kd_h = distill(tmp_path, paths, corpus, "uld_hybrid", 3, "hybrid")
    out_f, kd_f = distill(tmp_path, paths, corpus, "forward_kl", 3, "fkl", teacher_tokenizer=False)
    assert len(kd_h) == 3 and kd_h == pytest.approx(kd_f, rel=1e-5), (kd_h, kd_f)
    h, f = state(out_h), state(out_f)
    assert all(torch.allclose(v, f[k], atol=1e-5) for k, v in h.items())


@pytest.mark.parametrize("kind", ["mlm", "classification"])
def test_kinds_without_generated_text_are_refused_in_one_line(kind):
    from lmkd.core.errors import LmkdError
    from lmkd.teacher.frozen import check_cross_tokenizer_kind

    check_cross_tokenizer_kind("seq2seq"), check_cross_tokenizer_kind("causal")  # accepted
    with pytest.raises(
        LmkdError, match=f"works with causal LMs and seq2seq models, not {kind} models"
    ) as e:
        check_cross_tokenizer_kind(kind)
    assert "\n" not in str(e.value)
