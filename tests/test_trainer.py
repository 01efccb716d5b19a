"""DistillationTrainer on tiny models of every kind: it learns, the teacher stays frozen, the
student saves as a plain HF model, gradient accumulation is exact, and bad input fails clearly."""

import copy

import datasets
import pytest
import torch
from transformers import AutoModelForSequenceClassification

from lmkd import DistillationConfig, DistillationTrainer, LmkdError, losses, make_student
from lmkd.data.collators import collator_for
from lmkd.data.dataset import DataArguments
from lmkd.data.tokenizing import tokenize
from lmkd.models.loading import load_model
from lmkd.models.scratch import build_model

# (architecture, model kind for build_model, data task)
KINDS = [
    ("bert", None, "mlm"),
    ("bert", "classification", "classification"),
    ("t5", None, "translation"),
    ("bart", None, "translation"),
    ("marian", None, "translation"),
    ("gpt2", None, "causal-lm"),
]


def make_dataset(task, rows, tokenizer):
    if task == "translation":
        raw = [{"source": r["source"], "target": r["target"]} for r in rows]
    elif task == "classification":
        raw = [{"text": r["source"], "label": len(r["source"].split()) % 2} for r in rows]
    else:
        raw = [{"text": r["source"]} for r in rows]
    return tokenize(
        datasets.Dataset.from_list(raw), tokenizer, DataArguments(task=task, train_file="-")
    )


def config(tmp_path, **kw):
    base = dict(
        output_dir=str(tmp_path / "out"),
        per_device_train_batch_size=8,
        learning_rate=3e-3,
        max_steps=10,
        report_to="none",
        save_strategy="no",
        logging_steps=5,
        use_cpu=True,
        kd_alpha=0.5,
        kd_temperature=2.0,
        seed=0,
        disable_tqdm=True,
        warmup_steps=0,
    )
    base.update(kw)
    return DistillationConfig(**base)


def state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("arch,kind,task", KINDS, ids=[f"{a}-{t}" for a, _, t in KINDS])
def test_trainer_learns_and_keeps_teacher_frozen(
    tiny_model_dir, tokenizer, corpus, tmp_path, arch, kind, task
):
    from lmkd.core.constants import TASK_KIND

    teacher = load_model(tiny_model_dir(arch, kind), kind=TASK_KIND[task])
    student = make_student(teacher)
    ds = make_dataset(task, corpus[:16], tokenizer)
    collator = collator_for(task, tokenizer, student, seed=0)
    trainer = DistillationTrainer(
        model=student,
        args=config(tmp_path),
        teacher_model=teacher,
        train_dataset=ds,
        processing_class=tokenizer,
        data_collator=collator,
    )
    assert trainer.teacher is teacher and not teacher.training
    assert all(not p.requires_grad for p in teacher.parameters())
    fixed = collator([ds[i] for i in range(8)])
    student.eval()
    with torch.no_grad():
        before = trainer.compute_loss(student, fixed).item()
    s0, t0 = state(student), state(teacher)
    trainer.train()
    student.eval()
    with torch.no_grad():
        after = trainer.compute_loss(student, fixed).item()
    assert after < before, (before, after)
    assert any(not torch.equal(v, student.state_dict()[k]) for k, v in s0.items()), (
        "student did not change"
    )
    assert all(torch.equal(v, teacher.state_dict()[k]) for k, v in t0.items()), "teacher changed"
    logged = [h for h in trainer.state.log_history if "loss_kd" in h]
    assert logged and all(h["loss_ce"] > 0 and h["loss_kd"] >= 0 for h in logged)

    # the saved student is a plain HF model: it reloads without lmkd, with the trained weights,
    # and the checkpoint holds no teacher weights
    trainer.save_model(str(tmp_path / "saved"))
    reloaded = type(student).from_pretrained(tmp_path / "saved")
    for k, v in student.state_dict().items():
        assert torch.equal(v, reloaded.state_dict()[k]), k
    assert sum(p.numel() for p in reloaded.parameters()) == sum(
        p.numel() for p in student.parameters()
    )


def test_loss_value_equals_manual_combination(tiny_model_dir, tokenizer, corpus, tmp_path):
    teacher = load_model(tiny_model_dir("bart"), kind="seq2seq")
    student = make_student(teacher)
    teacher.eval(), student.eval()
    ds = make_dataset("translation", corpus[:4], tokenizer)
    batch = collator_for("translation", tokenizer, student)([ds[i] for i in range(4)])
    trainer = DistillationTrainer(
        model=student,
        args=config(tmp_path, kd_alpha=0.3, kd_temperature=3.0),
        teacher_model=teacher,
        processing_class=tokenizer,
    )
    with torch.no_grad():
        got = trainer.compute_loss(student, batch)
        s = student(**batch).logits
        t = teacher(**batch).logits
    labels = batch["labels"]
    mask = labels != -100
    ce = torch.nn.functional.cross_entropy(s[mask], labels[mask])
    assert torch.allclose(got, 0.7 * ce + 0.3 * manual_kd(s, t, mask, 3.0), rtol=1e-5)


def manual_kd(s, t, mask, tau):
    """Hinton's KD term by hand: KL(teacher || student) at temperature tau over the masked positions,
    their mean, times tau^2 -- the reference the trainer's loss is checked against."""
    return (
        torch.nn.functional.kl_div(
            torch.log_softmax(s[mask] / tau, -1),
            torch.log_softmax(t[mask] / tau, -1),
            reduction="batchmean",
            log_target=True,
        )
        * tau**2
    )


@pytest.mark.parametrize("arch,task", [("bart", "translation"), ("gpt2", "causal-lm")])
def test_gradient_accumulation_equals_one_big_batch(tokenizer, corpus, tmp_path, arch, task):
    """2 micro-batches of 4 (different token counts) give the same update as one batch of 8."""
    kind = {"translation": "seq2seq", "causal-lm": "causal"}[task]
    teacher = build_model(arch, len(tokenizer), seed=1, layers=2, dropout=0.0)
    init = build_model(arch, len(tokenizer), seed=2, layers=1, dropout=0.0)
    ds = make_dataset(task, corpus[:8], tokenizer)
    results = []
    for bs, ga in ((8, 1), (4, 2)):
        student = copy.deepcopy(init)
        trainer = DistillationTrainer(
            model=student,
            args=config(
                tmp_path,
                per_device_train_batch_size=bs,
                gradient_accumulation_steps=ga,
                max_steps=1,
                learning_rate=1e-2,
                optim="sgd",
                max_grad_norm=0.0,
            ),
            teacher_model=teacher,
            train_dataset=ds,
            processing_class=tokenizer,
            data_collator=collator_for(task, tokenizer, student),
        )
        trainer.train()
        results.append(state(student))
        assert trainer.kind == kind
    moved = 0
    for k in results[0]:
        assert torch.allclose(results[0][k], results[1][k], atol=1e-6, rtol=1e-5), k
        moved += not torch.equal(results[0][k], init.state_dict()[k])
    assert moved > 0


def test_alpha_zero_is_plain_finetuning_without_teacher_forward(
    tiny_model_dir, tokenizer, corpus, tmp_path
):
    teacher = load_model(tiny_model_dir("bart"), kind="seq2seq")
    calls = []
    teacher.register_forward_hook(lambda *a: calls.append(1))
    student = make_student(teacher)
    ds = make_dataset("translation", corpus[:8], tokenizer)
    trainer = DistillationTrainer(
        model=student,
        args=config(tmp_path, kd_alpha=0.0, max_steps=2),
        teacher_model=teacher,
        train_dataset=ds,
        processing_class=tokenizer,
        data_collator=collator_for("translation", tokenizer, student),
    )
    assert trainer.teacher is None
    batch = collator_for("translation", tokenizer, student)([ds[i] for i in range(4)])
    student.eval()
    with torch.no_grad():
        ref = student(**batch).loss  # the model's own mean token CE
        got = trainer.compute_loss(student, batch)
    assert torch.allclose(got, ref, rtol=1e-5)
    trainer.train()
    assert calls == []
    assert all("loss_kd" not in h for h in trainer.state.log_history)


def test_vocab_padding_rows_are_sliced(tokenizer, corpus, tmp_path):
    """Same tokenizer, embedding matrices padded to different sizes (like 151,936 vs 152,064)."""
    v = len(tokenizer)
    teacher = build_model("gpt2", v + 40, seed=1, layers=2)
    student = build_model("gpt2", v + 8, seed=2, layers=1)
    ds = make_dataset("causal-lm", corpus[:4], tokenizer)
    # the same tokenizer on both sides is what shows the extra rows are padding (issue 16: without the
    # teacher's tokenizer a larger teacher vocabulary is refused, not sliced)
    trainer = DistillationTrainer(
        model=student,
        args=config(tmp_path, kd_alpha=1.0),
        teacher_model=teacher,
        processing_class=tokenizer,
        teacher_tokenizer=tokenizer,
    )
    assert trainer._vocab == v
    batch = collator_for("causal-lm", tokenizer)([ds[i] for i in range(4)])
    teacher.eval(), student.eval()
    with torch.no_grad():
        got = trainer.compute_loss(student, batch)
        s = student(**batch).logits[:, :-1, :v]
        t = teacher(**batch).logits[:, :-1, :v]
    mask = batch["labels"][:, 1:] != -100
    ref = losses.forward_kl(s, t, mask, temperature=2.0) / mask.sum()
    assert torch.allclose(got, ref, rtol=1e-5)


def test_different_vocabularies_fail_before_training(tokenizer, corpus, tmp_path):
    from lmkd.models.scratch import train_tokenizer

    other = train_tokenizer([r["target"] for r in corpus], vocab_size=200)
    teacher = build_model("gpt2", len(other), seed=1, layers=2)
    student = build_model("gpt2", len(tokenizer), seed=2, layers=1)
    with pytest.raises(LmkdError, match="vocabular"):
        DistillationTrainer(
            model=student,
            args=config(tmp_path),
            teacher_model=teacher,
            processing_class=tokenizer,
            teacher_tokenizer=other,
        )
    # without tokenizers to compare, different output sizes are refused too
    with pytest.raises(LmkdError, match="differ"):
        DistillationTrainer(model=student, args=config(tmp_path), teacher_model=teacher)


def test_kd_without_teacher_is_an_error(tokenizer, tmp_path):
    student = build_model("gpt2", len(tokenizer), layers=1)
    with pytest.raises(LmkdError, match="needs a teacher"):
        DistillationTrainer(model=student, args=config(tmp_path), processing_class=tokenizer)


def test_classification_label_count_mismatch(tiny_model_dir, tmp_path):
    teacher = AutoModelForSequenceClassification.from_pretrained(
        tiny_model_dir("bert", "classification")
    )
    student = build_model(
        "bert", teacher.config.vocab_size, kind="classification", layers=1, num_labels=3
    )
    with pytest.raises(LmkdError, match="labels"):
        DistillationTrainer(model=student, args=config(tmp_path), teacher_model=teacher)


@pytest.mark.parametrize(
    "field,value,message",
    [
        ("kd_alpha", 1.5, "kd_alpha must be in"),
        ("kd_alpha", -0.1, "kd_alpha must be in"),
        ("kd_temperature", 0.0, "kd_temperature must be > 0"),
        ("kd_loss", "kl2", "unknown kd_loss"),
        ("jsd_beta", 2.0, "jsd_beta"),
        ("teacher_dtype", "int8", "teacher_dtype"),
    ],
)
def test_config_rejects_bad_values(tmp_path, field, value, message):
    with pytest.raises(LmkdError, match=message):
        config(tmp_path, **{field: value})


def test_nonfinite_loss_stops_with_step_number(tiny_model_dir, tokenizer, corpus, tmp_path):
    teacher = load_model(tiny_model_dir("bart"), kind="seq2seq")
    student = make_student(teacher)
    with torch.no_grad():
        student.lm_head.weight[0, 0] = float("nan")
    ds = make_dataset("translation", corpus[:8], tokenizer)
    trainer = DistillationTrainer(
        model=student,
        args=config(tmp_path, max_steps=2),
        teacher_model=teacher,
        train_dataset=ds,
        processing_class=tokenizer,
        data_collator=collator_for("translation", tokenizer, student),
    )
    with pytest.raises(LmkdError, match="at step 0"):
        trainer.train()


def test_teacher_of_another_seq2seq_architecture_gets_its_own_decoder_inputs(
    tokenizer, corpus, tmp_path
):
    """A Marian teacher (decoder start <pad>) for a BART student (start <s>), one tokenizer: the teacher
    reads the decoder inputs its own label shift makes, not the student's; the KD term equals the one
    computed with the teacher's own forward on the labels."""
    teacher = build_model("marian", len(tokenizer), seed=1, layers=1).eval()
    student = build_model("bart", len(tokenizer), seed=2, layers=1).eval()
    assert teacher.config.decoder_start_token_id != student.config.decoder_start_token_id
    ds = make_dataset("translation", corpus[:4], tokenizer)
    batch = collator_for("translation", tokenizer, student)([ds[i] for i in range(4)])
    trainer = DistillationTrainer(
        model=student,
        args=config(tmp_path, kd_alpha=1.0, kd_temperature=1.0),
        teacher_model=teacher,
        processing_class=tokenizer,
    )
    t_in = trainer.forward_inputs(trainer.teacher, batch)["decoder_input_ids"]
    s_in = trainer.forward_inputs(student, batch)["decoder_input_ids"]
    assert (t_in[:, 0] == teacher.config.decoder_start_token_id).all()
    assert (s_in[:, 0] == student.config.decoder_start_token_id).all()
    assert torch.equal(t_in[:, 1:], s_in[:, 1:])  # the same labels, shifted
    with torch.no_grad():
        got = trainer.compute_loss(student, batch)
        s = student(**batch).logits
        t = teacher(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            labels=batch["labels"],
        ).logits  # Marian shifts its own labels
    mask = batch["labels"] != -100
    kd = torch.nn.functional.kl_div(
        torch.log_softmax(s[mask], -1),
        torch.log_softmax(t[mask], -1),
        reduction="batchmean",
        log_target=True,
    )
    assert torch.allclose(got, kd, rtol=1e-5)
