"""Interrupted training resumes to the same student; checkpoints hold no teacher; runs are
deterministic on CPU."""

import os

import pytest
import torch
from safetensors.torch import load_file
from test_trainer import make_dataset
from transformers import TrainerCallback

from lmkd import DistillationConfig, DistillationTrainer, make_student
from lmkd.data.collators import collator_for
from lmkd.models.loading import load_model


class Crash(TrainerCallback):
    def __init__(self, at):
        self.at = at

    def on_step_end(self, args, state, control, **kw):
        if state.global_step == self.at:
            raise KeyboardInterrupt("simulated kill")


def run(tmp, teacher_dir, tokenizer, corpus, out, callbacks=(), resume=None):
    teacher = load_model(teacher_dir, kind="seq2seq")
    torch.manual_seed(123)
    student = make_student(teacher)
    ds = make_dataset("translation", corpus[:40], tokenizer)
    args = DistillationConfig(
        output_dir=str(tmp / out),
        per_device_train_batch_size=8,
        max_steps=5,
        learning_rate=2e-3,
        save_steps=2,
        save_strategy="steps",
        report_to="none",
        use_cpu=True,
        seed=7,
        disable_tqdm=True,
        kd_alpha=0.5,
    )
    trainer = DistillationTrainer(
        model=student,
        args=args,
        teacher_model=teacher,
        train_dataset=ds,
        processing_class=tokenizer,
        callbacks=list(callbacks),
        data_collator=collator_for("translation", tokenizer, student),
    )
    trainer.train(resume_from_checkpoint=resume)
    return trainer


def test_resume_after_kill_gives_same_student(tiny_model_dir, tokenizer, corpus, tmp_path):
    teacher_dir = tiny_model_dir("bart")
    full = run(tmp_path, teacher_dir, tokenizer, corpus, "full")
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path, teacher_dir, tokenizer, corpus, "killed", callbacks=[Crash(3)])
    assert sorted(os.listdir(tmp_path / "killed")) == ["checkpoint-2"]
    resumed = run(tmp_path, teacher_dir, tokenizer, corpus, "killed", resume=True)
    assert resumed.state.global_step == 5
    a, b = full.model.state_dict(), resumed.model.state_dict()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6), k
    # checkpoints hold the student only: same tensor names and sizes as the student
    saved = load_file(tmp_path / "killed" / "checkpoint-2" / "model.safetensors")
    student_state = resumed.model.state_dict()
    assert set(saved) <= set(student_state)
    assert all(saved[k].shape == student_state[k].shape for k in saved)
    assert len(saved) < len(resumed.teacher.state_dict())


def test_same_seed_same_student_bit_for_bit(tiny_model_dir, tokenizer, corpus, tmp_path):
    teacher_dir = tiny_model_dir("bart")
    a = run(tmp_path, teacher_dir, tokenizer, corpus, "a").model.state_dict()
    b = run(tmp_path, teacher_dir, tokenizer, corpus, "b").model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_mlm_resume_after_kill_gives_same_student(tiny_model_dir, tokenizer, corpus, tmp_path):
    """MLM masks are random per batch: drawn from one stream, a resumed run masked the batch after
    the checkpoint differently (the data loader collates one batch ahead, so the saved random
    state had already drawn it) and ended with another student.  Keyed by the batch, it does not."""
    from lmkd.data.collators import KeyedMasking

    def run_mlm(out, callbacks=(), resume=None):
        teacher = load_model(tiny_model_dir("bert"), kind="mlm")
        torch.manual_seed(123)
        student = make_student(teacher)
        args = DistillationConfig(
            output_dir=str(tmp_path / out),
            per_device_train_batch_size=8,
            max_steps=5,
            learning_rate=2e-3,
            save_steps=2,
            save_strategy="steps",
            report_to="none",
            use_cpu=True,
            seed=7,
            disable_tqdm=True,
            kd_alpha=0.5,
        )
        collator = collator_for("mlm", tokenizer, student, seed=args.seed)
        assert isinstance(collator, KeyedMasking)
        trainer = DistillationTrainer(
            model=student,
            args=args,
            teacher_model=teacher,
            processing_class=tokenizer,
            train_dataset=make_dataset("mlm", corpus[:40], tokenizer),
            callbacks=list(callbacks),
            data_collator=collator,
        )
        trainer.train(resume_from_checkpoint=resume)
        return trainer

    full = run_mlm("full")
    with pytest.raises(KeyboardInterrupt):
        run_mlm("killed", callbacks=[Crash(3)])
    resumed = run_mlm("killed", resume=True)
    assert resumed.state.global_step == 5
    a, b = full.model.state_dict(), resumed.model.state_dict()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6), k
    # the masks of a batch do not depend on what was collated before it, and differ between batches
    ds = make_dataset("mlm", corpus[:16], tokenizer)
    collator = collator_for("mlm", tokenizer, seed=7)
    first, second = [ds[i] for i in range(8)], [ds[i] for i in range(8, 16)]
    x = collator(first)["labels"]
    collator(second)
    assert torch.equal(collator(first)["labels"], x) and not torch.equal(
        collator_for("mlm", tokenizer, seed=8)(first)["labels"], x
    )
    assert (x != -100).any()
