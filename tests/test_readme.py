"""The README's quickstarts run as written, with tiny models swapped in.

Each test takes a code block from README.md (the first block under its heading), replaces the hub
id by a tiny Marian teacher built from a config and saved with ``save_pretrained``, and caps
training by text substitution. Every substitution must find its text, so a README edit that moves
away from what the test expects fails here instead of silently testing something else.
"""

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

README = Path(__file__).resolve().parents[1] / "README.md"
HUB_ID = "Helsinki-NLP/opus-mt-en-de"


def readme_block(heading: str, language: str) -> str:
    """The first ``language`` code block under the README heading ``heading``.

    Args:
        heading: the heading's text without its hashes, e.g. ``"Python quickstart"``.
        language: the fence's info string, e.g. ``"python"`` or ``"bash"``.

    Returns:
        The block's text, without the fences.
    """
    text = README.read_text(encoding="utf-8")
    title = re.search(rf"^#+ {re.escape(heading)}$", text, re.M)
    assert title, f"README has no heading {heading!r}"
    block = re.compile(rf"^```{language}\n(.*?)^```", re.S | re.M).search(text, title.end())
    assert block, f"README has no {language} block after {heading!r}"
    between = text[title.end() : block.start()]
    assert not re.search(r"^#+ ", between, re.M), (
        f"the {language} block is not in the {heading!r} section"
    )
    return block.group(1)


def substituted(block: str, replacements: dict[str, str]) -> str:
    """``block`` with each key replaced by its value; every key must occur in it.

    Args:
        block: the README code block.
        replacements: text to find -> text to put in its place.

    Returns:
        The rewritten block.
    """
    for old, new in replacements.items():
        assert old in block, (
            f"the README block no longer contains {old!r}: update tests/test_readme.py"
        )
        block = block.replace(old, new)
    return block


@pytest.fixture()
def workdir(tmp_path, monkeypatch, tokenizer):
    """A working directory with train/valid/test.jsonl from the shipped corpus and a tiny Marian
    teacher (6 + 6 layers, so the README's layer choices fit) saved beside them."""
    from lmkd.models.scratch import build_model

    rows = corpus_rows("train", 48)
    for name, part in (("train", rows[:32]), ("valid", rows[32:40]), ("test", rows[40:48])):
        with open(tmp_path / f"{name}.jsonl", "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r) + "\n" for r in part)
    teacher_dir = tmp_path / "tiny-marian-teacher"
    teacher = build_model("marian", len(tokenizer), layers=6, d_model=32, seed=0)
    teacher.save_pretrained(teacher_dir)
    tokenizer.save_pretrained(teacher_dir)
    monkeypatch.chdir(tmp_path)
    return tmp_path, str(teacher_dir)


def test_python_quickstart_trains_a_smaller_student(workdir):
    from transformers import AutoModelForSeq2SeqLM

    from lmkd import make_student
    from lmkd.models.size import count_parameters

    root, teacher_dir = workdir
    code = substituted(
        readme_block("Python quickstart", "python"),
        {HUB_ID: teacher_dir, "num_train_epochs=3": "max_steps=2"},
    )
    namespace: dict = {}
    exec(compile(code, "README.md:Python quickstart", "exec"), namespace)

    assert namespace["trainer"].state.global_step == 2
    out = root / namespace["args"].output_dir
    assert (out / "config.json").is_file()
    student = AutoModelForSeq2SeqLM.from_pretrained(out)
    teacher = AutoModelForSeq2SeqLM.from_pretrained(teacher_dir)
    assert (student.config.encoder_layers, student.config.decoder_layers) == (3, 2)
    assert count_parameters(student) < count_parameters(teacher)
    # the student trained: its weights moved away from the layers it was copied from
    initial = make_student(teacher, encoder_layers=[0, 2, 4], decoder_layers=[0, 5]).state_dict()
    trained = student.state_dict()
    assert initial.keys() == trained.keys()
    assert any(not torch.equal(initial[k], trained[k]) for k in initial)
    # and the teacher did not: it is frozen, outside the optimizer
    used = namespace["teacher"].state_dict()
    assert all(torch.equal(used[k].cpu(), v) for k, v in teacher.state_dict().items())


def test_cli_quickstart_runs_as_written(workdir):
    from transformers import AutoModelForSeq2SeqLM

    from lmkd.models.size import count_parameters

    root, teacher_dir = workdir
    script = substituted(
        readme_block("CLI quickstart", "bash"),
        {
            HUB_ID: teacher_dir,
            "num_train_epochs: 3": "max_steps: 2",
            "per_device_train_batch_size: 32": "per_device_train_batch_size: 8",
            # a short evaluation: few rows, greedy, short outputs, one timed repeat
            "--task translation --output": "--task translation --max-samples 4 --num-beams 1 --max-new-tokens 8 "
            "--speed-samples 2 --repeats 1 --output",
        },
    )
    shell = f'lmkd() {{ "{sys.executable}" -m lmkd "$@"; }}\nset -euo pipefail\n' + script
    env = dict(os.environ, PYTHONPATH=str(README.parent), LMKD_QUIET="1", OMP_NUM_THREADS="1")
    run = subprocess.run(["bash", "-c", shell], cwd=root, env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]

    student_init = root / "students" / "opus-3-2"
    init = AutoModelForSeq2SeqLM.from_pretrained(student_init)
    assert (init.config.encoder_layers, init.config.decoder_layers) == (3, 2)

    out = root / "runs" / "opus-3-2-kd"
    # distill printed its metrics as one JSON object on stdout (after make-student's line, before
    # evaluate's table)
    start = run.stdout.index("\n{\n") + 1
    metrics = json.loads(run.stdout[start : run.stdout.index("\n}\n", start) + 2])
    assert metrics["train_loss"] > 0
    saved = (out / "lmkd_config.yaml").read_text(encoding="utf-8")
    assert "kd_alpha: 0.7" in saved  # the command-line override won over the YAML's 0.5
    student = AutoModelForSeq2SeqLM.from_pretrained(out)
    assert count_parameters(student) < count_parameters(
        AutoModelForSeq2SeqLM.from_pretrained(teacher_dir)
    )
    before, after = init.state_dict(), student.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)

    report = json.loads((out / "eval.json").read_text(encoding="utf-8"))
    assert report["n_examples"] == 4 and report["primary_metric"] == "bleu"
    scored = report["models"]["student"]
    assert scored["size"]["parameters"] == count_parameters(student)
    assert 0 < scored["vs_teacher"]["parameters_ratio"] < 1
    assert 0 <= scored["quality"]["chrf"] <= 100
    assert (out / "eval.md").is_file()
