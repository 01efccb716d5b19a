"""A 2-process (torchrun, gloo, CPU) run gives the same student as a 1-process run with the same
global batch; the teacher is never wrapped in DDP nor updated (checked inside the script)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForSeq2SeqLM

from lmkd import make_student
from lmkd.modeling import load_model

SCRIPT = Path(__file__).parent / "scripts" / "mp_distill.py"


@pytest.mark.slow
def test_two_processes_equal_one(tiny_model_dir, tmp_path, corpus):
    teacher_dir = tiny_model_dir("bart", layers=2, dropout=0.0)
    student = make_student(load_model(teacher_dir), encoder_layers=[0], decoder_layers=[1])
    student.save_pretrained(tmp_path / "student")
    load_model(teacher_dir)  # tokenizer lives next to the teacher
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(teacher_dir).save_pretrained(tmp_path / "student")
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in corpus[:48]))
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    common = [teacher_dir, str(tmp_path / "student"), str(data)]
    one = subprocess.run([sys.executable, str(SCRIPT), *common, str(tmp_path / "one"), "8"], env=env,
                         capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                          "--master_port", "29533", str(SCRIPT), *common, str(tmp_path / "two"), "4"],
                         env=env, capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    assert "world_size=2 ok" in two.stdout
    a = AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "one").state_dict()
    b = AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "two").state_dict()
    s0 = student.state_dict()
    assert any(not torch.equal(a[k], s0[k]) for k in a)
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-5, rtol=1e-4), k
