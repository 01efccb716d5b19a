"""make_student copies the chosen teacher layers bit for bit, for every architecture of its table."""

import re

import pytest
import torch
from transformers import AutoModelForMaskedLM, AutoModelForSeq2SeqLM

from lmkd import LmkdError, make_student
from lmkd.models.loading import kind_from_config, load_model
from lmkd.models.size import count_parameters
from lmkd.models.student import LAYER_STACKS


def _layer_params(model, path, i):
    pat = re.compile(r"(^|\.)" + re.escape(path) + r"\." + str(i) + r"\.")
    return {
        pat.sub(r"\1" + path + ".#.", k): v for k, v in model.state_dict().items() if pat.search(k)
    }


CASES = [
    ("bert", None, {"layers": [0, 3]}),
    ("bert", "classification", {}),
    ("gpt2", None, {"layers": [1, 2]}),
    ("llama", None, {"layers": [3]}),
    ("t5", None, {"encoder_layers": [0, 2, 3], "decoder_layers": [3]}),
    ("bart", None, {"encoder_layers": [1, 3], "decoder_layers": [0]}),
    ("marian", None, {}),
]


@pytest.mark.parametrize(
    "arch,kind,choice", CASES, ids=[f"{a}-{k or 'lm'}-{bool(c)}" for a, k, c in CASES]
)
def test_student_layers_equal_teacher_layers(
    tiny_model_dir, tmp_path, arch, kind, choice, tokenizer
):
    path = tiny_model_dir(arch, kind)
    teacher = load_model(path, kind=kind_from_config(path))
    student = make_student(teacher, **choice)
    stacks = LAYER_STACKS[teacher.config.model_type]
    for name, (stack_path, field) in stacks.items():
        chosen = choice.get("layers" if name == "layers" else f"{name}_layers") or list(
            range(0, 4, 2)
        )
        assert getattr(student.config, field) == len(chosen)
        assert student.config.lmkd_layer_map[name] == chosen
        for i, j in enumerate(chosen):
            s_params, t_params = (
                _layer_params(student, stack_path, i),
                _layer_params(teacher, stack_path, j),
            )
            assert s_params, f"no parameters found for {stack_path}.{i}"
            for key, value in s_params.items():
                ref = t_params.get(key)
                if ref is None:  # T5: the relative attention bias exists in block 0 only
                    ref = _layer_params(teacher, stack_path, 0)[key]
                assert torch.equal(value, ref), key
    # non-layer weights (embeddings, heads, final norms) are copied too
    t_state = teacher.state_dict()
    for key, value in student.state_dict().items():
        if not any(
            re.search(r"(^|\.)" + re.escape(p) + r"\.\d+\.", key) for p, _ in stacks.values()
        ):
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
    with pytest.raises(
        LmkdError,
        match="a bart model has an encoder and a decoder, so --layers does not apply; "
        "use --encoder-layers / --decoder-layers",
    ):
        make_student(teacher, layers=[0])


def test_make_student_cli(tiny_model_dir, tmp_path, capsys):
    from lmkd.cli import main

    out = tmp_path / "student"
    assert (
        main(
            [
                "make-student",
                "--teacher",
                tiny_model_dir("bart"),
                "--output",
                str(out),
                "--encoder-layers",
                "0,3",
                "--decoder-layers",
                "1",
            ]
        )
        == 0
    )
    student = AutoModelForSeq2SeqLM.from_pretrained(out)
    assert (student.config.encoder_layers, student.config.decoder_layers) == (2, 1)
    assert (out / "tokenizer.json").exists()
    assert "parameters" in capsys.readouterr().out
    # an existing output is never overwritten silently, and nothing partial is left behind
    assert main(["make-student", "--teacher", tiny_model_dir("bart"), "--output", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err
    bad = tmp_path / "bad"
    assert (
        main(
            [
                "make-student",
                "--teacher",
                tiny_model_dir("bart"),
                "--output",
                str(bad),
                "--decoder-layers",
                "9",
            ]
        )
        == 2
    )
    assert not bad.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]


# ---- issue 16: the layer-list messages read right, and repeated / decreasing lists are refused --------


@pytest.mark.parametrize(
    "arch,kw,message",
    [
        (
            "bert",
            {"layers": [0, 5]},
            "layer index 5 is out of range: the teacher has 4 layers (0..3)",
        ),
        (
            "bart",
            {"encoder_layers": [0, 5]},
            "encoder layer index 5 is out of range: the teacher has 4 encoder layers (0..3)",
        ),
        ("bert", {"layers": [0, 0]}, "--layers 0,0 names layer 0 more than once"),
        (
            "bert",
            {"layers": [3, 0]},
            (
                "--layers 3,0 is not in increasing order; list the teacher layers in the order "
                "they run, e.g. 0,3"
            ),
        ),
        (
            "bart",
            {"decoder_layers": [2, 2, 1]},
            "--decoder-layers 2,2,1 names decoder layer 2 more than once",
        ),
        ("bart", {"encoder_layers": [2, 1]}, "--encoder-layers 2,1 is not in increasing order"),
        ("bert", {"layers": []}, "the student needs at least one layer; --layers is empty"),
        (
            "bart",
            {"layers": [0, 1]},
            "a bart model has an encoder and a decoder, so --layers does not apply",
        ),
        (
            "bert",
            {"encoder_layers": [0]},
            "a bert model has one stack of layers, so --encoder-layers does not apply; "
            "use --layers",
        ),
    ],
)
def test_layer_list_errors_read_right(tiny_model_dir, arch, kw, message):
    teacher = load_model(tiny_model_dir(arch))
    with pytest.raises(LmkdError) as exc_info:
        make_student(teacher, **kw)
    assert message in str(exc_info.value)
    text = str(exc_info.value).replace("'", "")
    assert "layers layer" not in text and "layers layers" not in text


def test_make_student_cli_refuses_repeated_and_decreasing_layers(tiny_model_dir, tmp_path, capsys):
    from lmkd.cli import main

    for layers, message in (
        ("0,0", "names layer 0 more than once"),
        ("3,0", "not in increasing order"),
    ):
        out = tmp_path / f"s-{layers}"
        assert (
            main(
                [
                    "make-student",
                    "--teacher",
                    tiny_model_dir("gpt2"),
                    "--output",
                    str(out),
                    "--layers",
                    layers,
                ]
            )
            == 2
        )
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and message in err and not out.exists()
