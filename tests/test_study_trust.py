"""A study a user can trust: a teacher that has not learned stops the study (one line, exit 2, no
report), the check's figures are what they say, and the same command twice gives the same report."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import corpus_rows

from lmkd.scoring import metrics
from lmkd.study import StudyOptions, run_study
from lmkd.study.budgets import BUDGETS
from lmkd.study.checks import QUALITY_MARGIN, check_teacher, target_cross_entropy
from lmkd.study.plan import Plan


@pytest.fixture()
def untrained_teacher(tmp_path, tokenizer):
    """A BART that was never trained, saved with its tokenizer: what a broken teacher looks like."""
    from lmkd.models.scratch import build_model

    path = tmp_path / "untrained"
    build_model(
        "bart", len(tokenizer), d_model=32, layers=1, heads=2, ffn=64, seed=0
    ).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def test_untrained_teacher_stops_the_study_with_one_line(untrained_teacher, tmp_path):
    out = tmp_path / "study"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "lmkd",
            "study",
            "--task",
            "translation",
            "--budget",
            "tiny",
            "--teacher",
            untrained_teacher,
            "--output",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("lmkd study")]
    assert len(lines) == 1 and "the teacher did not learn" in lines[0] and "no report" in lines[0]
    assert "Traceback" not in proc.stderr
    assert not any((out / name).exists() for name in ("report.md", "report.json", "report.png"))
    assert not (out / "stages" / "teacher-check" / "teacher_check.json").exists()


def test_check_figures_are_computed_as_they_say(untrained_teacher):
    train = corpus_rows("train", 200)
    val = corpus_rows("validation", 24)
    check = check_teacher(
        untrained_teacher,
        "translation",
        train,
        val,
        rows=24,
        max_new_tokens=16,
        max_source_length=64,
        max_target_length=64,
        seed=3,
    )
    sources, targets = [r["source"] for r in val], [r["target"] for r in val]
    assert check["floors"]["copying the source"] == pytest.approx(metrics.bleu(sources, targets)[0])
    assert check["floor"] == max(check["floors"].values())
    assert not check["passed"] and check["score"] < check["floor"] + QUALITY_MARGIN
    assert any(
        "ignores the source" in r for r in check["reasons"]
    )  # an untrained model cannot use it


def test_target_cross_entropy_equals_the_models_own_loss(untrained_teacher):
    """The source-use figure is the mean token CE: the same as HF's loss computed row by row."""
    from lmkd.models.loading import load_model, load_tokenizer

    model, tok = load_model(untrained_teacher), load_tokenizer(untrained_teacher)
    rows = corpus_rows("validation", 6)
    src, tgt = [r["source"] for r in rows], [r["target"] for r in rows]
    mine = target_cross_entropy(
        model, tok, src, tgt, max_source_length=64, max_target_length=64, batch_size=4
    )
    total = count = 0
    with torch.no_grad():
        for s, t in zip(src, tgt):
            enc = tok(s, max_length=64, truncation=True, return_tensors="pt")
            labels = tok(text_target=t, max_length=64, truncation=True, return_tensors="pt")[
                "input_ids"
            ]
            total += float(model(**enc, labels=labels).loss) * labels.numel()
            count += labels.numel()
    assert mine == pytest.approx(total / count, rel=1e-5)


def _without_timings(obj):
    """report.json less what a clock or the output path decides."""
    timing = re.compile(
        r"latency|throughput|speed|per_s|ms_per|_ms$|elapsed|seconds|time|path|^output$"
    )
    if isinstance(obj, dict):
        return {k: _without_timings(v) for k, v in obj.items() if not timing.search(k)}
    if isinstance(obj, list):
        return [_without_timings(v) for v in obj]
    return obj


def _flat(obj, prefix="") -> dict:
    if isinstance(obj, dict):
        return {k: v for key, val in obj.items() for k, v in _flat(val, f"{prefix}{key}.").items()}
    if isinstance(obj, list):
        return {k: v for i, val in enumerate(obj) for k, v in _flat(val, f"{prefix}{i}.").items()}
    return {prefix: obj}


@pytest.mark.slow
def test_same_command_twice_gives_the_same_report(tmp_path):
    reports = []
    for run in ("a", "b"):
        run_study(
            StudyOptions(
                task="translation", budget="tiny", teacher_check=False, output=str(tmp_path / run)
            )
        )
        reports.append(json.loads((tmp_path / run / "report.json").read_text()))
    a, b = (_flat(_without_timings(r)) for r in reports)
    assert a == b, {k: (a.get(k), b.get(k)) for k in set(a) | set(b) if a.get(k) != b.get(k)}
    assert reports[0]["rows"][0]["quality"]  # the comparison is over real content


@pytest.mark.parametrize(
    "first, start, factor",
    [
        # ignores the source: collapsed -> round 2 starts again from the init at a third of the lr
        (
            dict(
                score=2.1,
                floor=10.0,
                ce_real_sources=4.15,
                ce_shuffled_sources=4.15,
                source_use_margin=0.25,
            ),
            "init",
            1 / 3,
        ),
        # no better than the trivial answer (a classifier at the majority's accuracy): collapsed too
        (dict(score=11.0, floor=13.5), "init", 1 / 3),
        # uses the source and beats the floor, by too little: under-trained -> continue at half the lr
        (
            dict(
                score=10.5,
                floor=10.0,
                ce_real_sources=3.0,
                ce_shuffled_sources=4.0,
                source_use_margin=0.25,
            ),
            "round-1",
            1 / 2,
        ),
    ],
)
def test_a_failed_teacher_retries_by_how_it_failed(tmp_path, monkeypatch, first, start, factor):
    """The teacher check's second round: a collapsed teacher restarts from its init at lr/3, an
    under-trained one continues from round 1 at lr/2; the second check decides."""
    import types

    from lmkd.study import teachers

    calls, checks = (
        [],
        [
            dict(first, passed=False, reasons=["x"], metric="bleu", rows=4, floor_name="f"),
            dict(
                score=20.0,
                floor=10.0,
                passed=True,
                reasons=[],
                metric="bleu",
                rows=4,
                floor_name="f",
            ),
        ],
    )

    def fake_train(dest, start_dir, *args, lr, stopping, **kw):
        calls.append((start_dir, lr))
        rules.append(stopping)
        os.makedirs(dest)
        Path(dest, "model.safetensors").write_text(str(len(calls)))
        log = {"steps": 6 + len(calls), "stopped_early": len(calls) == 2, "curve": []}
        Path(dest, "train_log.json").write_text(json.dumps(log))

    rules = []

    monkeypatch.setattr(teachers, "train_student", fake_train)
    monkeypatch.setattr(teachers, "check_teacher", lambda *a, **k: checks[len(calls) - 1])
    rows = tmp_path / "rows.jsonl"
    rows.write_text(json.dumps({"source": "a", "target": "b"}) + "\n")
    plan = Plan(**{**BUDGETS["tiny"], "max_new_tokens": 8, "max_length": 16}, check_rows=4)
    opts = types.SimpleNamespace(
        plan=plan, task="translation", teacher_check=True, seed=0, fixed_teacher_steps=False
    )
    out, init = tmp_path / "out", str(tmp_path / "init")
    out.mkdir()
    teachers.train_checked(
        str(out), init, opts, {"train": str(rows), "validation": str(rows)}, steps=10, lr=1e-3
    )
    expected_start = init if start == "init" else str(out / "round-1")
    assert calls == [(init, 1e-3), (expected_start, pytest.approx(1e-3 * factor))]
    assert (
        Path(out, "model.safetensors").read_text() == "2"
    )  # the checked round is the stage's model
    saved = json.loads(Path(out, "teacher_check.json").read_text())
    assert [r["from"] for r in saved["rounds"]] == [
        "init",
        "init" if start == "init" else "round 1",
    ]
    assert saved["passed"] and teachers.collapsed(saved["rounds"][0]) == (start == "init")
    # each round is trained like a student, to its validation plateau, never stopped before half its cap
    assert all(
        r.metric == "eval_bleu"
        and r.min_steps == plan.teacher_steps // 2
        and r.patience == plan.patience
        for r in rules
    )
    assert [(r["trained_steps"], r["stopped_early"]) for r in saved["rounds"]] == [
        (7, False),
        (8, True),
    ]
