"""make_student copies the chosen teacher layers bit for bit, for every architecture of its table."""

import re

import pytest
import torch
from transformers import AutoModelForMaskedLM, AutoModelForSeq2SeqLM

from lmkd import LmkdError, make_student
from lmkd.modeling import kind_from_config, load_model
from lmkd.modeling import count_parameters
from lmkd.student import LAYER_STACKS


def _layer_params(model, path, i):
    pat = re.compile(r"(^|\.)" + re.escape(path) + r"\." + str(i) + r"\.")
    return {pat.sub(r"\1" + path + ".#.", k): v for k, v in model.state_dict().items() if pat.search(k)}


CASES = [
    ("bert", None, {"layers": [0, 3]}),
    ("bert", "classification", {}),
    ("gpt2", None, {"layers": [1, 2]}),
    ("llama", None, {"layers": [3]}),
    ("t5", None, {"encoder_layers": [0, 2, 3], "decoder_layers": [3]}),
    ("bart", None, {"encoder_layers": [1, 3], "decoder_layers": [0]}),
    ("marian", None, {}),
]


@pytest.mark.parametrize("arch,kind,choice", CASES, ids=[f"{a}-{k or 'lm'}-{bool(c)}" for a, k, c in CASES])
def test_student_layers_equal_teacher_layers(tiny_model_dir, tmp_path, arch, kind, choice, tokenizer):
    path = tiny_model_dir(arch, kind)
    teacher = load_model(path, kind=kind_from_config(path))
    student = make_student(teacher, **choice)
    stacks = LAYER_STACKS[teacher.config.model_type]
    for name, (stack_path, field) in stacks.items():
        chosen = choice.get("layers" if name == "layers" else f"{name}_layers") or list(range(0, 4, 2))
        assert getattr(student.config, field) == len(chosen)
        assert student.config.lmkd_layer_map[name] == chosen
        for i, j in enumerate(chosen):
            s_params, t_params = _layer_params(student, stack_path, i), _layer_params(teacher, stack_path, j)
            assert s_params, f"no parameters found for {stack_path}.{i}"
            for key, value in s_params.items():
                ref = t_params.get(key)
                if ref is None:  # T5: the relative attention bias exists in block 0 only
                    ref = _layer_params(teacher, stack_path, 0)[key]
                assert torch.equal(value, ref), key
    # non-layer weights (embeddings, heads, final norms) are copied too
    t_state = teacher.state_dict()
    for key, value in student.state_dict().items():
        if not any(re.search(r"(^|\.)" + re.escape(p) + r"\.\d+\.", key) for p, _ in stacks.values()):
            assert torch.equal(value, t_state[key]), key
    assert count_parameters(student) < count_parameters(teacher)

    # a plain HF model: saves and reloads without lmkd, and its forward pass runs
    student.save_pretrained(tmp_path / "s")
    reloaded = type(student).from_pretrained(tmp_path / "s")
    for key, value in student.state_dict().items():
        assert torch.equal(value, reloaded.state_dict()[key])
    ids = tokenizer(["a small test", "the package"], return_tensors="pt", padding=True)
    extra = {"decoder_input_ids": ids.input_ids[:, :3]} if student.config.is_encoder_decoder else {}
    with torch.no_grad():
        out = reloaded(**ids, **extra)
    assert torch.isfinite(out.logits).all()


def test_student_layer_out_of_range(tiny_model_dir):
    teacher = AutoModelForMaskedLM.from_pretrained(tiny_model_dir("bert"))
    with pytest.raises(LmkdError, match="out of range.*4 layers"):
        make_student(teacher, layers=[0, 7])


def test_student_not_smaller(tiny_model_dir):
    teacher = AutoModelForMaskedLM.from_pretrained(tiny_model_dir("bert"))
    with pytest.raises(LmkdError, match="not be smaller"):
        make_student(teacher, layers=[0, 1, 2, 3])


def test_wrong_stack_name(tiny_model_dir):
    teacher = AutoModelForSeq2SeqLM.from_pretrained(tiny_model_dir("bart"))
    with pytest.raises(LmkdError, match="no 'layers' layer stack"):
        make_student(teacher, layers=[0])


def test_make_student_cli(tiny_model_dir, tmp_path, capsys):
    from lmkd.cli import main

    out = tmp_path / "student"
    assert main(["make-student", "--teacher", tiny_model_dir("bart"), "--output", str(out),
                 "--encoder-layers", "0,3", "--decoder-layers", "1"]) == 0
    student = AutoModelForSeq2SeqLM.from_pretrained(out)
    assert (student.config.encoder_layers, student.config.decoder_layers) == (2, 1)
    assert (out / "tokenizer.json").exists()
    assert "parameters" in capsys.readouterr().out
    # an existing output is never overwritten silently, and nothing partial is left behind
    assert main(["make-student", "--teacher", tiny_model_dir("bart"), "--output", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err
    bad = tmp_path / "bad"
    assert main(["make-student", "--teacher", tiny_model_dir("bart"), "--output", str(bad),
                 "--decoder-layers", "9"]) == 2
    assert not bad.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]
