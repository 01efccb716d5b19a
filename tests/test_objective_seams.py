"""The seams between DistillationTrainer and its objective: the objective runs without a trainer,
the Trainer's ``num_items_in_batch`` is a typed LossCounts, and the logged terms are a LossStats."""

from __future__ import annotations

import datasets
import pytest
import torch
import torch.nn.functional as F

from lmkd import DistillationConfig, DistillationTrainer
from lmkd.data.collators import collator_for
from lmkd.data.dataset import DataArguments
from lmkd.data.positions import position_masks, shifted, shifted_labels
from lmkd.data.tokenizing import tokenize
from lmkd.models.scratch import build_model
from lmkd.train.loss_stats import LossCounts, LossStats, ObjectiveInputs
from lmkd.train.objective import DistillationObjective


def config(tmp_path, **kw):
    base = dict(
        output_dir=str(tmp_path / "out"),
        report_to="none",
        save_strategy="no",
        use_cpu=True,
        kd_alpha=0.4,
        kd_temperature=2.0,
        kd_chunk_size=0,
        disable_tqdm=True,
    )
    base.update(kw)
    return DistillationConfig(**base)


@pytest.fixture()
def causal_batch(tokenizer, corpus):
    teacher = build_model("gpt2", len(tokenizer), seed=1, layers=2, dropout=0.0).eval()
    student = build_model("gpt2", len(tokenizer), seed=2, layers=1, dropout=0.0).eval()
    ds = tokenize(
        datasets.Dataset.from_list([{"text": r["source"]} for r in corpus[:6]]),
        tokenizer,
        DataArguments(task="causal-lm", train_file="-"),
    )
    collate = collator_for("causal-lm", tokenizer)
    return teacher, student, [collate([ds[i] for i in range(k, k + 3)]) for k in (0, 3)]


@pytest.mark.parametrize("chunk", [0, -1])
def test_objective_runs_without_a_trainer_and_equals_the_formula(chunk, tmp_path, causal_batch):
    """Built from (args, kind, teacher) and given an ObjectiveInputs: the loss is
    (1 - a) * CE_sum / n_ce + a * T^2 KL_sum / n_kd with the counts it is given, and its LossStats
    hold the per-position CE and KD."""
    teacher, student, (batch, _) = causal_batch
    args = config(tmp_path, kd_chunk_size=chunk)
    objective = DistillationObjective(args, "causal", teacher=teacher)
    fwd = {k: v for k, v in batch.items() if k != "labels"}
    ce_mask, kd_mask = position_masks("causal", batch)
    x = ObjectiveInputs(
        batch=batch, student_forward=fwd, teacher_forward=fwd, ce_mask=ce_mask, kd_mask=kd_mask
    )
    counts = LossCounts(
        ce=int(ce_mask.sum()) * 3, kd=int(kd_mask.sum()) * 2
    )  # as if more micro-batches
    with torch.no_grad():
        result = objective(student, x, counts)
        s = shifted("causal", student(**fwd).logits)[kd_mask]
        t = shifted("causal", teacher(**fwd).logits)[kd_mask]
    labels = shifted_labels("causal", batch["labels"])[ce_mask]
    ce_sum = F.cross_entropy(s, labels, reduction="sum")
    kd_sum = (
        F.kl_div(
            F.log_softmax(s / 2, -1), F.log_softmax(t / 2, -1), reduction="sum", log_target=True
        )
        * 4
    )
    want = 0.6 * ce_sum / counts.ce + 0.4 * kd_sum / counts.kd
    assert torch.allclose(result.loss, want, rtol=1e-5)
    n = int(kd_mask.sum())
    assert result.stats.ce.count == n and result.stats.kd.count == n
    assert result.stats.ce.mean == pytest.approx(float(ce_sum) / n, rel=1e-5)
    assert result.stats.kd.mean == pytest.approx(float(kd_sum) / n, rel=1e-5)
    assert result.teacher_outputs is not None


def test_num_items_in_batch_is_loss_counts_of_the_accumulated_batch(
    tmp_path, tokenizer, causal_batch
):
    teacher, student, batches = causal_batch
    trainer = DistillationTrainer(
        model=student, args=config(tmp_path), teacher_model=teacher, processing_class=tokenizer
    )
    counts = trainer._get_num_items_in_batch(batches, torch.device("cpu"))
    assert isinstance(counts, LossCounts) and counts.features is None
    want = sum(int(b["labels"][:, 1:].ne(-100).sum()) for b in batches)
    assert counts == (want, want, None) and want > 0
    assert trainer.loss_counts(counts) == (counts, 1)
    assert trainer.loss_counts(None) == (None, 1)
    # compute_loss reads the two counts by name: twice the counts halve the loss
    with torch.no_grad():
        one = trainer.compute_loss(student.eval(), batches[0], num_items_in_batch=counts)
        doubled = LossCounts(2 * counts.ce, 2 * counts.kd)
        two = trainer.compute_loss(student, batches[0], num_items_in_batch=doubled)
    assert torch.allclose(one, 2 * two, rtol=1e-6)


def test_loss_stats_add_reset_and_logs():
    a, b = LossStats(), LossStats()
    a.ce.add(6.0, 3)
    a.kd.add(1.0, 4)
    b.ce.add(2.0, 1)
    b.hidden.add(0.5)
    b.taid_t.add(0.25)
    a.add(b)
    assert a.logs("eval_") == {
        "eval_loss_ce": 2.0,
        "eval_loss_kd": 0.25,
        "eval_taid_t": 0.25,
        "eval_loss_hidden": 0.5,
    }
    assert b.ce.count == 1  # adding leaves the other untouched
    a.reset()
    assert a.logs() == {} and a.ce.mean is None
