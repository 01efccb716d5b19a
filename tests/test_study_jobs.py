"""Study stages side by side (lmkd.study.stages.Stages.run_jobs): students and evaluations in worker
processes give the same report as one after the other, and a failing worker is one line."""

from __future__ import annotations

import json

import pytest
import torch
from test_study_trust import _flat, _without_timings

from lmkd.core.errors import LmkdError
from lmkd.study import StudyOptions, run_study
from lmkd.study.models import evaluate_into
from lmkd.study.stages import Job, Stages, threads_per_worker


def test_a_failing_worker_is_one_line_and_its_dependents_never_start(tmp_path):
    st = Stages(str(tmp_path / "study"), total=2)
    missing = str(tmp_path / "no-such-model")
    bad = Job(
        "bad",
        {},
        [],
        evaluate_into,
        dict(model_dir=missing, task="translation", test_file=missing, beams=1, max_new_tokens=4),
    )
    after = Job("after", {}, ["bad"], evaluate_into, dict(bad.kwargs))
    with pytest.raises(LmkdError) as e:
        st.run_jobs([bad, after], workers=2)
    assert "no-such-model" in str(e.value) and "\n" not in str(e.value)
    assert (tmp_path / "study" / "logs" / "bad.log").is_file()  # the worker's output is kept
    assert not (tmp_path / "study" / "logs" / "after.log").exists()  # never started
    stages = tmp_path / "study" / "stages"
    assert not (stages / "bad").exists() and not (stages / "after").exists()
    assert not list(stages.glob(".tmp-*"))  # nothing half-written


def test_threads_share_the_cores():
    import os

    assert threads_per_worker(1) == (os.cpu_count() or 1)
    assert threads_per_worker(2) == max(1, (os.cpu_count() or 1) // 2)
    assert threads_per_worker(10**6) == 1


@pytest.mark.slow
@pytest.mark.parametrize("task", ["translation", "classification"])
def test_two_workers_give_the_report_of_one(tmp_path, task):
    """The same tiny study, its students and evaluations one at a time in this process (one thread) and
    two at a time in worker processes (one thread each): the same report.json, timings aside.
    Classification also has a dependency inside the batch (MLM-distil -> the DistilBERT variants)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run_study(
            StudyOptions(
                task=task, budget="tiny", teacher_check=False, jobs=1, output=str(tmp_path / "one")
            )
        )
    finally:
        torch.set_num_threads(threads)
    run_study(
        StudyOptions(
            task=task, budget="tiny", teacher_check=False, jobs=2, output=str(tmp_path / "two")
        )
    )
    one, two = (json.loads((tmp_path / r / "report.json").read_text()) for r in ("one", "two"))
    assert one["plan"]["workers"] == 1 and two["plan"]["workers"] == 2
    for r in (one, two):
        r["plan"].pop("workers"), r["plan"].pop("threads_per_worker")
    a, b = _flat(_without_timings(one)), _flat(_without_timings(two))
    assert a == b, {k: (a.get(k), b.get(k)) for k in set(a) | set(b) if a.get(k) != b.get(k)}
    assert len(two["rows"]) == (
        6 if task == "classification" else 7
    )  # teacher + every variant + served
    assert sorted(p.name for p in (tmp_path / "two" / "logs").iterdir())  # each worker's log kept


def _nested_job_function(out, **kwargs):
    """A module-level function of this test module (not of lmkd.study)."""


def test_a_job_names_its_function_by_module_and_qualname_and_refuses_one_a_worker_cannot_find():
    """A job made from a function keeps the function's ``module:qualname`` (what a worker imports), checked
    when the job is made: a function defined inside another one, or a name that no longer resolves
    (a renamed function), is refused then -- not in a worker process halfway through a study."""
    from lmkd.study.classification import train_classifier
    from lmkd.study.stages import job_ref, resolve_job

    job = Job("eval", {}, [], evaluate_into, {})
    assert job.call == "lmkd.study.models:evaluate_into" == job_ref(evaluate_into)
    assert resolve_job(job.call) is evaluate_into
    assert (
        Job("c", {}, [], train_classifier, {}).call == "lmkd.study.classification:train_classifier"
    )
    assert (
        Job("s", {}, [], Stages.run, {}).call == "lmkd.study.stages:Stages.run"
    )  # a method: its qualname
    assert (
        resolve_job("models:evaluate_into") is evaluate_into
    )  # the short form older callers write

    def local(out):
        raise AssertionError("never called")

    with pytest.raises(ValueError, match="<locals>"):
        Job("local", {}, [], local, {})
    with pytest.raises(ValueError, match="no_such_function"):
        Job("renamed", {}, [], "models:no_such_function", {})
    with pytest.raises(ValueError, match="no_such_module"):
        Job("moved", {}, [], "lmkd.study.no_such_module:evaluate_into", {})
    with pytest.raises(TypeError, match="not a function"):
        Job("constant", {}, [], "lmkd.study.models:TRAIN_LOG", {})
    import test_study_jobs

    original = _nested_job_function
    test_study_jobs._nested_job_function = lambda out, **kw: None
    try:  # the name now holds another object than the function the job is made from
        with pytest.raises(ValueError, match="another object"):
            Job("swapped", {}, [], original, {})
    finally:
        test_study_jobs._nested_job_function = original
    assert Job("kept", {}, [], original, {}).call == "test_study_jobs:_nested_job_function"
