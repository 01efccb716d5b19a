"""No regime silently ignored: a regime key set on DistillationConfig is either run by the trainer
class it is given to, or refused in one line that names the class (or function) that runs it.

Before this check a plain ``DistillationTrainer`` (the README's Python quickstart) never read
``on_policy_fraction``, ``cohort_size`` or ``rounds``, and could not load the ensemble that
``teacher_model_name_or_path: a,b`` (+ ``teacher_weights``) names: only ``lmkd distill`` did."""

from __future__ import annotations

import datasets
import pytest

from lmkd import DistillationConfig, DistillationTrainer, LmkdError
from lmkd.data.collators import collator_for
from lmkd.data.dataset import DataArguments
from lmkd.data.tokenizing import tokenize
from lmkd.models.scratch import build_model
from lmkd.teacher.ensemble import EnsembleTeacher
from lmkd.train.regimes import CoDistillationTrainer, OnPolicyDistillationTrainer, RegimeTrainer


def config(tmp_path, **kw):
    base = dict(
        output_dir=str(tmp_path / "out"),
        per_device_train_batch_size=2,
        max_steps=1,
        report_to="none",
        save_strategy="no",
        use_cpu=True,
        kd_alpha=0.5,
        seed=0,
        disable_tqdm=True,
        kd_chunk_size=0,
    )
    base.update(kw)
    return DistillationConfig(**base)


@pytest.fixture()
def causal(tokenizer, corpus):
    """(teacher, student, data, collator): tiny GPT-2s built in-process from configs."""
    teacher = build_model("gpt2", len(tokenizer), seed=1, layers=2)
    student = build_model("gpt2", len(tokenizer), seed=2, layers=1, dropout=0.1)
    ds = tokenize(
        datasets.Dataset.from_list([{"text": r["source"]} for r in corpus[:4]]),
        tokenizer,
        DataArguments(task="causal-lm", train_file="-"),
    )
    return teacher, student, ds, collator_for("causal-lm", tokenizer)


#: regime key -> (config keys that turn it on, the class that runs it, the words its refusal names)
REGIMES = {
    "on_policy_fraction": (
        dict(on_policy_fraction=1.0, kd_loss="jsd"),
        OnPolicyDistillationTrainer,
        "on_policy_fraction 1.0 needs OnPolicyDistillationTrainer (lmkd.train.regimes)",
    ),
    "cohort_size": (
        dict(cohort_size=2),
        CoDistillationTrainer,
        "cohort_size 2 needs CoDistillationTrainer (lmkd.train.regimes)",
    ),
}


@pytest.mark.parametrize("key", sorted(REGIMES))
@pytest.mark.parametrize("plain", [DistillationTrainer, RegimeTrainer])
def test_regime_key_refused_by_a_trainer_that_does_not_run_it(
    key, plain, tmp_path, tokenizer, causal
):
    teacher, student, ds, collator = causal
    keys, _, words = REGIMES[key]
    args = config(tmp_path, **keys)
    teacher_model = None if key == "cohort_size" else teacher
    with pytest.raises(LmkdError) as err:
        plain(
            model=student,
            args=args,
            teacher_model=teacher_model,
            train_dataset=ds,
            processing_class=tokenizer,
            data_collator=collator,
        )
    message = str(err.value)
    assert words in message and "\n" not in message
    assert not (tmp_path / "out").exists()  # refused before anything was written


@pytest.mark.parametrize("key", sorted(REGIMES))
def test_regime_key_accepted_and_run_by_its_class(key, tmp_path, tokenizer, causal):
    teacher, student, ds, collator = causal
    keys, runner, _ = REGIMES[key]
    args = config(tmp_path, on_policy_max_new_tokens=3, **keys)
    trainer = runner(
        model=student,
        args=args,
        teacher_model=None if key == "cohort_size" else teacher,
        train_dataset=ds,
        processing_class=tokenizer,
        data_collator=collator,
    )
    trainer.train()
    if key == "on_policy_fraction":
        assert trainer.on_policy_batches == 1  # the one micro-batch was the student's own samples
    else:
        assert len(trainer.model.members) == 2


def test_rounds_refused_by_a_trainer_naming_the_function_that_runs_them(
    tmp_path, tokenizer, causal
):
    teacher, student, ds, collator = causal
    with pytest.raises(LmkdError) as err:
        DistillationTrainer(
            model=student,
            args=config(tmp_path, rounds=3),
            teacher_model=teacher,
            train_dataset=ds,
            processing_class=tokenizer,
            data_collator=collator,
        )
    message = str(err.value)
    assert "rounds 3" in message and "lmkd.train.run.run_distill" in message and "\n" not in message


def test_teacher_list_builds_the_weighted_ensemble_in_the_trainer(tmp_path, tokenizer, causal):
    """``teacher_model_name_or_path: a,b`` with ``teacher_weights`` and no teacher_model: the trainer
    itself loads the ensemble (before, only ``lmkd distill`` did; the trainer tried to load 'a,b')."""
    teacher, student, ds, collator = causal
    other = build_model("gpt2", len(tokenizer), seed=3, layers=2)
    paths = []
    for name, model in (("a", teacher), ("b", other)):
        model.save_pretrained(tmp_path / name)
        tokenizer.save_pretrained(tmp_path / name)
        paths.append(str(tmp_path / name))
    args = config(
        tmp_path,
        teacher_model_name_or_path=",".join(paths),
        teacher_weights="0.7,0.3",
        kd_temperature=2.0,
    )
    trainer = DistillationTrainer(
        model=student,
        args=args,
        train_dataset=ds,
        processing_class=tokenizer,
        data_collator=collator,
    )
    assert isinstance(trainer.teacher, EnsembleTeacher)
    assert trainer.teacher.temperature == 2.0
    assert trainer.teacher.weights == pytest.approx([0.7, 0.3])
    trainer.train()
