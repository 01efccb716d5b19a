"""A 2-process run (torchrun, gloo, CPU) gives the same student as a 1-process run with the same
global batch, under DDP, DeepSpeed ZeRO-2/3 and FSDP2 (FSDP1: accelerate trains DDP on CPU, and
lmkd says so); the teacher is never wrapped for training nor updated (checked in the scripts)."""

import json

import pytest
from _mp_helpers import assert_same_student, run_script
from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

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


@pytest.fixture()
def causal_pair(tiny_model_dir, tmp_path, corpus):
    """(gpt2 teacher dir, gpt2 student dir, text data file, the student's initial state dict)."""
    teacher_dir = tiny_model_dir("gpt2", layers=2, dropout=0.0, seed=1)
    student_dir = tiny_model_dir("gpt2", layers=1, dropout=0.0, seed=2)
    data = tmp_path / "text.jsonl"
    data.write_text("".join(json.dumps({"text": r["source"]}) + "\n" for r in corpus[:48]))
    start = AutoModelForCausalLM.from_pretrained(student_dir).state_dict()
    return teacher_dir, student_dir, str(data), start


@pytest.mark.slow
def test_fsdp2_two_processes_equal_one(causal_pair, tmp_path):
    """FSDP2 (fsdp_version 2) on 2 CPU processes over gloo: accelerate shards the student, lmkd
    shards the teacher for inference (checked in the script: FSDP units of DTensor shards, frozen,
    eval, not in the optimizer, unchanged); the student equals a 1-process run's."""
    teacher_dir, student_dir, data, start = causal_pair
    common = [teacher_dir, student_dir, data]
    run_script("fsdp2_distill.py", [*common, str(tmp_path / "one"), "8", "causal-lm"])
    out = run_script(
        "fsdp2_distill.py",
        [*common, str(tmp_path / "two"), "4", "causal-lm", "fsdp2"],
        processes=2,
        port=29541,
    )
    assert out.count("world_size=2 fsdp2 teacher ok") == 2
    assert_same_student(AutoModelForCausalLM, tmp_path / "one", tmp_path / "two", start)


@pytest.mark.slow
def test_fsdp2_shards_an_encoder_decoder_teacher(pair):
    """lmkd's FSDP2 teacher sharding on BART (embedding tied across encoder, decoder and head): each
    process holds half of each weight and the sharded teacher gives the whole teacher's logits."""
    out = run_script("fsdp2_teacher.py", [pair[0]], processes=2, port=29542)
    assert out.count("sharded teacher ok") == 2


@pytest.mark.slow
def test_fsdp2_refuses_a_student_with_its_embedding_shared(pair, tmp_path):
    """accelerate's FSDP2 puts BART's encoder/decoder embed_tokens (which share the embedding
    weight) in another group than the embedding, which torch refuses at the first forward: lmkd
    refuses it in one line when the trainer is built."""
    teacher_dir, student_dir, data, _ = pair
    with pytest.raises(AssertionError) as e:
        run_script(
            "fsdp2_distill.py",
            [teacher_dir, student_dir, data, str(tmp_path / "two"), "4", "translation", "fsdp2"],
            processes=2,
            port=29543,
        )
    assert "LmkdError: FSDP2 cannot shard this BartForConditionalGeneration" in str(e.value)
    assert "model.encoder.embed_tokens, model.decoder.embed_tokens" in str(e.value)
    assert not (tmp_path / "two").exists()
