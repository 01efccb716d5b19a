"""label_smoothing_factor: the HF Trainer applies it in its own compute_loss, which DistillationTrainer
replaces -- so the CE term applies it itself (training only), equal to the HF LabelSmoother, and the
paths that compute no smoothed CE refuse it instead of ignoring it."""

import pytest
import torch
from transformers.trainer_pt_utils import LabelSmoother

from lmkd import DistillationTrainer, LmkdError, losses
from lmkd.data.collators import collator_for
from lmkd.models.loading import load_model
from tests.test_trainer import config, make_dataset, manual_kd


def test_smoothed_cross_entropy_equals_the_hf_label_smoother():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 7, 11, generator=g)
    labels = torch.randint(0, 11, (3, 7), generator=g)
    labels[0, 5:] = -100
    labels[2, 3:] = -100
    n = int((labels != -100).sum())
    for eps in (0.0, 0.1, 0.3):
        ours = losses.cross_entropy(logits, labels, label_smoothing=eps) / n
        hf = LabelSmoother(epsilon=eps)({"logits": logits}, labels)
        assert torch.allclose(ours, hf, atol=1e-6), (eps, ours, hf)
    plain = losses.cross_entropy(logits, labels) / n
    assert not torch.allclose(plain, losses.cross_entropy(logits, labels, label_smoothing=0.1) / n)


def test_the_trainer_smooths_the_ce_term_in_training_only(
    tiny_model_dir, tokenizer, corpus, tmp_path
):
    teacher = load_model(tiny_model_dir("bart", dropout=0.0), kind="seq2seq")
    student = load_model(tiny_model_dir("bart", seed=1, dropout=0.0, layers=2), kind="seq2seq")
    teacher.eval()
    ds = make_dataset("translation", corpus[:4], tokenizer)
    batch = collator_for("translation", tokenizer, student)([ds[i] for i in range(4)])
    trainer = DistillationTrainer(
        model=student,
        args=config(tmp_path, kd_alpha=0.3, kd_temperature=2.0, label_smoothing_factor=0.2),
        teacher_model=teacher,
        processing_class=tokenizer,
    )
    labels = batch["labels"]
    mask = labels != -100
    with torch.no_grad():
        s, t = student(**batch).logits, teacher(**batch).logits
        kd = manual_kd(s, t, mask, 2.0)
        smoothed = LabelSmoother(epsilon=0.2)({"logits": s}, labels)
        plain = torch.nn.functional.cross_entropy(s[mask], labels[mask])
        student.train()  # dropout 0: the same logits, and the smoothing on
        got_train = trainer.compute_loss(student, batch)
        student.eval()
        got_eval = trainer.compute_loss(student, batch)
    assert torch.allclose(got_train, 0.7 * smoothed + 0.3 * kd, rtol=1e-5)
    assert torch.allclose(got_eval, 0.7 * plain + 0.3 * kd, rtol=1e-5)
    assert not torch.allclose(got_train, got_eval)


@pytest.mark.parametrize("chunk", [-1, 64])
def test_label_smoothing_on_a_path_without_it_is_refused(tmp_path, chunk):
    with pytest.raises(
        LmkdError, match="label_smoothing_factor 0.1 is applied on the plain loss only"
    ):
        config(tmp_path, label_smoothing_factor=0.1, kd_chunk_size=chunk)
    config(tmp_path, label_smoothing_factor=0.1, kd_chunk_size="auto")  # auto takes the plain path
