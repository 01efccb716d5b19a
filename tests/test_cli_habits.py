"""issue 17, the command's habits: `lmkd --version`, DeepSpeed imported (and its accelerator warning
printed) only when it is used, `report_to: tensorboard` writing the logged loss, cache-logits'
progress bar."""

import glob
import importlib.metadata
import importlib.util
import json
import os
import pathlib
import subprocess
import sys

import pytest
import tomllib
import yaml

from lmkd.cli import main
from lmkd.data.dataset import DataArguments
from lmkd.teacher import logit_cache_writer

ROOT = pathlib.Path(__file__).resolve().parents[1]
DS_WARNING = "Setting accelerator to"
HAS_DEEPSPEED = importlib.util.find_spec("deepspeed") is not None


def test_version_is_the_package_version(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    printed = capsys.readouterr().out.strip()
    assert printed == f"lmkd {importlib.metadata.version('lmkd')}"
    with open(ROOT / "pyproject.toml", "rb") as f:
        assert printed == f"lmkd {tomllib.load(f)['project']['version']}"


def _python(code: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=1800
    )


@pytest.mark.skipif(not HAS_DEEPSPEED, reason="deepspeed is not installed: nothing could import it")
def test_deepspeed_is_imported_only_when_used(tiny_model_dir, translation_file, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        yaml.safe_dump(
            dict(
                student_model_name_or_path=tiny_model_dir("bart"),
                task="translation",
                train_file=translation_file,
                output_dir=str(tmp_path / "out"),
                max_steps=1,
                kd_alpha=0.0,
                report_to="none",
                save_strategy="no",
                use_cpu=True,
            )
        )
    )
    commands = [
        ["--help"],
        ["evaluate", "--help"],
        ["make-student", "--teacher", tiny_model_dir("bart"), "--output", str(tmp_path / "small")],
        ["distill", str(recipe)],
    ]
    run = _python(
        "import sys\nfrom lmkd.cli import main\ncodes = []\n"
        f"for c in {commands!r}:\n"
        "    try: codes.append(main(c))\n    except SystemExit as e: codes.append(e.code)\n"
        "print(*codes, 'deepspeed' in sys.modules)"
    )
    assert run.stdout.strip().splitlines()[-1] == "0 0 0 0 False", run.stderr[-2000:]
    assert DS_WARNING not in run.stdout + run.stderr  # (DeepSpeed's logger writes to stdout)
    assert "student saved to" in run.stderr
    # the control: accelerate's unwrap_model alone imports it (and warns) -- what lmkd avoids
    control = _python(
        "import sys, torch\nfrom accelerate.utils.other import extract_model_from_parallel\n"
        "extract_model_from_parallel(torch.nn.Linear(2, 2))\nprint('deepspeed' in sys.modules)"
    )
    assert control.stdout.strip().endswith("True") and DS_WARNING in control.stdout + control.stderr


@pytest.mark.skipif(
    importlib.util.find_spec("tensorboard") is None, reason="pip install 'lmkd[tensorboard]'"
)
def test_report_to_tensorboard_writes_the_logged_loss(
    tiny_model_dir, translation_file, tmp_path, capsys
):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "out"
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        yaml.safe_dump(
            dict(
                student_model_name_or_path=tiny_model_dir("bart"),
                task="translation",
                train_file=translation_file,
                output_dir=str(out),
                max_steps=2,
                kd_alpha=0.0,
                report_to="tensorboard",
                logging_steps=1,
                save_strategy="no",
                use_cpu=True,
                per_device_train_batch_size=8,
            )
        )
    )
    assert main(["distill", str(recipe)]) == 0
    capsys.readouterr()
    events = glob.glob(str(out / "**" / "events.out.tfevents.*"), recursive=True)
    assert events, sorted(os.listdir(out))
    acc = EventAccumulator(os.path.dirname(events[0]))
    acc.Reload()
    losses = [e.value for e in acc.Scalars("train/loss")]
    assert [e.step for e in acc.Scalars("train/loss")] == [1, 2]
    train_loss = json.loads((out / "distill_results.json").read_text())["train_loss"]
    assert sum(losses) / len(losses) == pytest.approx(
        train_loss, rel=1e-4
    )  # the run's mean of its step losses


def _bar_finished(err: str) -> bool:
    return any(
        seg.startswith("cache-logits") and "64/64" in seg
        for seg in err.replace("\r", "\n").splitlines()
    )


def test_cache_logits_shows_a_progress_bar(tiny_model_dir, translation_file, tmp_path, capsys):
    data = DataArguments(
        task="translation", train_file=translation_file, max_source_length=24, max_target_length=24
    )
    logit_cache_writer.cache_logits(
        tiny_model_dir("bart"),
        data,
        str(tmp_path / "c"),
        4,
        batch_size=16,
        shard_rows=32,
        progress=True,
    )
    err = capsys.readouterr().err
    assert _bar_finished(err), err
    for progress in (True, False):  # resumed: both shards are skipped, and still counted
        logit_cache_writer.cache_logits(
            tiny_model_dir("bart"),
            data,
            str(tmp_path / "c"),
            4,
            batch_size=16,
            shard_rows=32,
            progress=progress,
        )
        assert _bar_finished(capsys.readouterr().err) == progress


def test_json_commands_print_one_json_document_on_stdout(
    tiny_model_dir, translation_file, tmp_path, capsys, monkeypatch
):
    """`lmkd cache-logits ... | jq` and `lmkd generate ... | jq`: stdout is the one JSON document even
    when the work prints to stdout (as the Trainer's log dicts did under distill): that goes to stderr."""
    import lmkd.teacher.pseudo_targets

    teacher = tiny_model_dir("bart")
    for module, name in (
        (logit_cache_writer, "cache_logits"),
        (lmkd.teacher.pseudo_targets, "generate_pseudo_targets"),
    ):
        real = getattr(module, name)

        def chatty(
            *a, _real=real, **k
        ):  # the work, printing a log dict on stdout as transformers' logs do
            print({"loss": 1.0})
            return _real(*a, **k)

        monkeypatch.setattr(module, name, chatty)
    for argv in (
        [
            "cache-logits",
            "--teacher",
            teacher,
            "--data",
            translation_file,
            "--top-k",
            "4",
            "--max-samples",
            "8",
            "--output",
            str(tmp_path / "c"),
        ],
        [
            "generate",
            "--teacher",
            teacher,
            "--data",
            translation_file,
            "--max-new-tokens",
            "4",
            "--num-beams",
            "1",
            "--output",
            str(tmp_path / "g"),
            "--no-progress",
            "--format",
            "jsonl",
        ],
    ):
        assert main(argv) == 0
        captured = capsys.readouterr()
        assert isinstance(json.loads(captured.out), dict), captured.out
        assert "{'loss': 1.0}" in captured.err
