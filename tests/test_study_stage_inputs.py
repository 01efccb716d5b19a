"""What the study's stage cache hashes must not change with a refactoring: a resumed study would
retrain what it already has.  The options and dependencies of every stage (and job) of a few tiny
studies, and the plan the report prints, are pinned (tests/data/study_stage_inputs.json): recorded before
the plan became a dataclass, and recorded again when the protocol changed on purpose (students on the whole
training set, stopped on the validation task metric, two seeds in the quick budget, the transfer set a job
of the graph; no stop before half the cap) -- a change of these inputs must be deliberate, and re-recorded with it.

The study runs for real up to its plan (data, tokenizer, lengths, transfer rows); the costly stages
(teacher, transfer set, students, evaluations) are only recorded, and the study stops at its speed stage."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from lmkd.study import StudyOptions, run_study
from lmkd.study.stages import Stages, StudyStopped

PINS = Path(__file__).resolve().parent / "data" / "study_stage_inputs.json"
#: the stages whose outputs the study reads while it plans (cheap): run for real
RUN_FOR_REAL = (
    "data-train",
    "data-validation",
    "data-test",
    "tokenizer",
    "lengths",
    "transfer-rows",
)
#: the recorded studies: tiny budget, every path through the plan that changes a hashed option
CASES = {
    "translation-2-seeds-2-sizes-2-jobs": dict(
        task="translation", seeds=2, student_sizes=[0.25, 0.5], jobs=2
    ),
    "translation-online-overrides": dict(
        task="translation",
        online_kd=True,
        kd_alpha=0.9,
        kd_temperature=2.0,
        teacher_check=False,
        student_steps=7,
        beams=3,
        teacher_steps=9,
    ),
    "summarization": dict(task="summarization"),
    "classification-2-seeds-2-jobs": dict(task="classification", seeds=2, jobs=2),
    # a budget with a token budget per batch: the long documents get a fitted batch (batch_size_cap, a note)
    "summarization-quick": dict(task="summarization", budget="quick", jobs=1),
}


def _jsonable(obj):
    return json.loads(json.dumps(obj, default=str))


def _call_name(call) -> str:
    """``models:train_student`` whether the job names its function by a short or a full module path."""
    module, _, name = str(call).partition(":")
    return f"{module.rsplit('.', 1)[-1]}:{name}"


def _plan_json(plan) -> str:
    """The plan as the report writes it (key order included)."""
    return json.dumps(plan.to_dict() if hasattr(plan, "to_dict") else plan)


def record_study(root: Path, monkeypatch, **options) -> dict:
    """Run the tiny study of ``options`` up to its speed stage, recording every stage's and job's name,
    options and deps (the hash inputs), each job's function and kwargs (paths relative to ``root``),
    and the plan."""
    monkeypatch.setattr(
        os, "cpu_count", lambda: 4
    )  # the worker threads are hashed: same on any machine
    record: list[dict] = []
    real_run = Stages.run
    where = str(root)

    def rel(obj):
        return json.loads(json.dumps(_jsonable(obj)).replace(where, "<root>"))

    def fake_run(self, name, opts, deps, fn, what=""):
        record.append({"stage": name, "options": _jsonable(opts), "deps": list(deps)})
        if name in RUN_FOR_REAL:
            return real_run(self, name, opts, deps, fn, what)
        if name == "speed":
            raise StudyStopped("recorded")
        os.makedirs(self.path(name), exist_ok=True)
        self.keys[name] = name
        return self.path(name)

    def fake_run_jobs(self, jobs, workers=1):
        for j in jobs:
            kwargs = {k: v for k, v in j.kwargs.items() if k != "plan"}
            record.append(
                {
                    "job": j.name,
                    "options": _jsonable(j.options),
                    "deps": list(j.deps),
                    "call": _call_name(j.call),
                    "kwargs": rel(kwargs),
                    "plan_kwarg": "plan" in j.kwargs,
                    "cost": j.cost,
                    "workers": workers,
                }
            )
            os.makedirs(self.path(j.name), exist_ok=True)
            if j.name.startswith("eval-"):
                Path(self.path(j.name), "quality.json").write_text("{}")
        return {j.name: self.path(j.name) for j in jobs}

    monkeypatch.setattr(Stages, "run", fake_run)
    monkeypatch.setattr(Stages, "run_jobs", fake_run_jobs)
    opts = StudyOptions(**{"budget": "tiny", "output": str(root / "study"), **options})
    with pytest.raises(StudyStopped):
        run_study(opts)
    return {"stages": record, "plan": _plan_json(opts.plan)}


@pytest.mark.parametrize("case", list(CASES))
def test_stage_hash_inputs_are_what_they_were(tmp_path, monkeypatch, case):
    """Every stage's options and deps, every job's function and kwargs, and the plan (as report.json
    prints it) equal the recording made before the plan became a dataclass."""
    expected = json.loads(PINS.read_text())[case]
    got = record_study(tmp_path, monkeypatch, **CASES[case])
    assert [s.get("stage") or s["job"] for s in got["stages"]] == [
        s.get("stage") or s["job"] for s in expected["stages"]
    ]
    for g, e in zip(got["stages"], expected["stages"]):
        assert g == e, (g.get("stage") or g["job"], g, e)
    assert got["plan"] == expected["plan"]
