"""The study's plan (lmkd.study.plan.Plan): built in one place from a budget and the options, read by
attribute, printed into report.json in one fixed form that reads back; the job functions also take the
plan as the mapping a worker process, report.json or a benchmark gives them."""

from __future__ import annotations

import json

import pytest

from lmkd.core.errors import LmkdError
from lmkd.study.options import StudyOptions
from lmkd.study.plan import (
    BUDGETS,
    LOGIT_CACHE,
    Plan,
    ServedModel,
    plan_view,
    thread_options,
)


def _resolved(**kw) -> Plan:
    return (
        StudyOptions(**{"task": "translation", "budget": "tiny", "output": "unused", **kw})
        .resolve()
        .plan
    )


def test_the_plan_is_the_budget_with_the_overrides_and_the_kd_settings(monkeypatch):
    import os

    monkeypatch.setattr(os, "cpu_count", lambda: 4)
    plan = _resolved(student_steps=7, beams=3, kd_alpha=0.9, jobs=2)
    tiny = BUDGETS["tiny"]
    assert (plan.student_steps, plan.beams, plan.teacher_steps) == (7, 3, tiny["teacher_steps"])
    assert (plan.kd_alpha, plan.kd_temperature, plan.workers, plan.threads_per_worker) == (
        0.9,
        1.0,
        2,
        2,
    )
    assert plan.logit_cache == LOGIT_CACHE and plan.logit_cache is not LOGIT_CACHE  # a copy
    assert plan.check_rows == min(200, tiny["validation_rows"]) and plan.notes == []
    assert thread_options(plan) == {"threads": 2} and thread_options(_resolved(jobs=1)) == {}
    cls = _resolved(task="classification")
    assert (
        cls.logit_cache is None and cls.kd_temperature == 2.0
    )  # task KD reads class logits: online
    assert _resolved(online_kd=True).logit_cache is None
    with pytest.raises(LmkdError, match="--student-steps must be >= 1"):
        _resolved(student_steps=0)


def test_report_json_prints_the_plan_in_one_form_that_reads_back():
    plan = _resolved()
    form = plan.to_dict()
    # the keys of report.json: the budget's in its order, the cache under its old key, nothing set later
    assert list(form)[: len(BUDGETS["tiny"])] == list(BUDGETS["tiny"])
    assert form["kd_cache"] == LOGIT_CACHE and "logit_cache" not in form
    later = {
        "batch_tokens",
        "max_length_cap",
        "positions",
        "length_sizing",
        "batch_size_cap",
        "served",
    }
    assert not later & set(form)
    assert form["teacher_check"] is None  # (printed once the study has a teacher: always)
    plan.length_cap()
    plan.apply_lengths({"max_length": 40, "positions": 48, "cap": 64})
    plan.served = ServedModel(
        student="s025-word-kd", metric="eval_bleu", validation_metric=2.5, format="ct2-int8"
    )
    form = plan.to_dict()
    assert (form["max_length"], form["max_length_cap"], form["positions"]) == (40, 64, 48)
    assert form["served"] == {
        "student": "s025-word-kd",
        "metric": "eval_bleu",
        "validation_metric": 2.5,
        "format": "ct2-int8",
    }
    back = Plan.from_dict(json.loads(json.dumps(form)))
    assert back == plan and back.served == plan.served
    form["teacher"]["layers"] = 99  # a copy: the plan is not changed through its printed form
    assert plan.teacher["layers"] == BUDGETS["tiny"]["teacher"]["layers"]


def test_a_plan_given_as_a_mapping_reads_like_the_plan():
    """What a worker process, report.json or a benchmark's budget table gives the job functions."""
    plan = _resolved()
    view = plan_view(json.loads(json.dumps(plan.to_dict())))
    assert view.logit_cache == plan.logit_cache and view.max_length == plan.max_length
    assert plan_view(plan) is plan
    partial = plan_view({"batch_size": 8, "kd_temperature": 1.0})
    assert (partial.batch_size, partial.kd_temperature) == (8, 1.0)
    assert thread_options({"threads_per_worker": 3}) == {}  # no workers: one at a time
    assert thread_options({"workers": 2, "threads_per_worker": 3}) == {"threads": 3}


@pytest.mark.parametrize(
    "max_length, batch, noted", [(32, 16, False), (128, 8, True), (4096, 4, True)]
)
def test_the_batch_fits_the_token_budget_once_and_from_the_budget_s_batch(max_length, batch, noted):
    plan = Plan(
        **{**BUDGETS["quick"], "batch_size": 16, "batch_tokens": 1024, "max_length": max_length}
    )
    plan.fit_batch()
    assert plan.batch_size == batch and plan.batch_size_cap == 16
    assert plan.notes == (
        [
            f"Batch {batch} rather than 16: inputs of up to {max_length} tokens, and the "
            "budget's 1024 input tokens per step."
        ]
        if noted
        else []
    )
    plan.fit_batch()  # again: from the budget's batch, not the fitted one
    assert plan.batch_size == batch


def test_a_task_s_budget_changes_only_what_it_names():
    """TASK_BUDGETS: the translation quick budget's caps (a teacher trained to its plateau, students with
    room to stop), the summarisation quick teacher's learning rate; every other key is the budget's."""
    from lmkd.study.budgets import TASK_BUDGETS
    from lmkd.study.stopping import StoppingRule

    quick = {t: _resolved(task=t, budget="quick") for t in ("translation", "summarization")}
    changed = {"translation": {"teacher_steps", "student_steps"}, "summarization": {"teacher_lr"}}
    for task, plan in quick.items():
        assert set(TASK_BUDGETS[task]["quick"]) == changed[task]
        for key, value in BUDGETS["quick"].items():
            want = TASK_BUDGETS[task]["quick"].get(key, value)
            if key not in ("batch_size", "max_length", "workers"):  # fitted to the data / the cores
                assert getattr(plan, key) == want, (task, key)
    assert quick["summarization"].teacher_lr < quick["translation"].teacher_lr
    assert quick["translation"].teacher_steps > quick["translation"].student_steps
    # the teacher's rule is the students' with its own cap: no stop before half of it
    rule = StoppingRule.for_teacher(quick["translation"], "translation")
    assert rule.min_steps == quick["translation"].teacher_steps // 2
    students = StoppingRule.from_plan(quick["translation"], "translation").options()
    assert rule.options() == {**students, "min_steps": rule.min_steps}
    # the flags win over the task's changes
    steps = _resolved(task="translation", budget="quick", teacher_steps=7, student_steps=5)
    assert (steps.teacher_steps, steps.student_steps) == (7, 5)
    # a budget no task changes is the table itself
    assert _resolved(task="summarization").teacher_lr == BUDGETS["tiny"]["teacher_lr"]
