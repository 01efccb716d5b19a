"""A 2-process run (torchrun, gloo, CPU) gives the same student as a 1-process run with the same
global batch, under DDP and under DeepSpeed ZeRO-2/3 (FSDP: accelerate trains DDP on CPU, and
lmkd says so); the teacher is never wrapped for training nor updated (checked in the scripts)."""

import json

import pytest
from _mp_helpers import assert_same_student, run_script
from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

from lmkd import make_student
from lmkd.models.loading import load_model


@pytest.fixture()
def pair(tiny_model_dir, tmp_path, corpus):
    """(teacher dir, student dir, data file, the student's initial state dict)."""
    teacher_dir = tiny_model_dir("bart", layers=2, dropout=0.0)
    student = make_student(load_model(teacher_dir), encoder_layers=[0], decoder_layers=[1])
    student.save_pretrained(tmp_path / "student")
    AutoTokenizer.from_pretrained(teacher_dir).save_pretrained(tmp_path / "student")
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in corpus[:48]))
    return teacher_dir, str(tmp_path / "student"), str(data), student.state_dict()


@pytest.mark.slow
def test_two_processes_equal_one(pair, tmp_path):
    teacher_dir, student_dir, data, start = pair
    run_script("mp_distill.py", [teacher_dir, student_dir, data, str(tmp_path / "one"), "8"])
    out = run_script(
        "mp_distill.py", [teacher_dir, student_dir, data, str(tmp_path / "two"), "4"], processes=2
    )
    assert "world_size=2 ok" in out
    assert_same_student(AutoModelForSeq2SeqLM, tmp_path / "one", tmp_path / "two", start)


@pytest.mark.slow
def test_fsdp_on_cpu_trains_ddp_and_says_so(pair, tmp_path):
    """accelerate enables FSDP only for GPU-like processes: on CPU the Trainer wraps the student in
    DDP (asserted in the script) -- the same student as one process -- and lmkd warns about it."""
    teacher_dir, student_dir, data, start = pair
    run_script("mp_distill.py", [teacher_dir, student_dir, data, str(tmp_path / "one"), "8"])
    out = run_script(
        "mp_distill.py",
        [teacher_dir, student_dir, data, str(tmp_path / "two"), "4", "fsdp"],
        processes=2,
        port=29540,
    )
    assert "world_size=2 ok" in out
    assert out.count("fsdp is set but accelerate did not enable FSDP") == 2  # once per process
    assert_same_student(AutoModelForSeq2SeqLM, tmp_path / "one", tmp_path / "two", start)


@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_two_processes_equal_one(pair, tmp_path, stage):
    """ZeRO-2: the teacher stays a plain frozen replica.  ZeRO-3 partitions the teacher too (zero.Init
    in from_pretrained); DistillationTrainer runs it in its own inference engine.  DeepSpeed's CPU
    accelerator over gloo stands in for GPUs."""
    teacher_dir, student_dir, data, start = pair
    run_script("mp_distill.py", [teacher_dir, student_dir, data, str(tmp_path / "one"), "8"])
    out = run_script(
        "ds_distill.py",
        [teacher_dir, student_dir, data, str(tmp_path / "two"), "4", str(stage)],
        processes=2,
        port=29534 + stage,
    )
    assert out.count(f"world_size=2 zero{stage} teacher ok") == 2
    assert_same_student(AutoModelForSeq2SeqLM, tmp_path / "one", tmp_path / "two", start)
