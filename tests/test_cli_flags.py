"""One flag convention: every long flag of every command answers to ``--a-b`` and ``--a_b``, help
shows the dashed one, and an unknown flag gets one line with the flag the user most likely meant."""

import argparse

import pytest

from lmkd.cli import build_parser, main, subcommand_parser
from lmkd.cli.flags import did_you_mean, shown_options
from lmkd.cli.settings import distill_parser, parse_distill_args

COMMANDS = ["make-student", "distill", "evaluate", "generate", "study", "cache-logits", "compress"]


def _exit_code(argv) -> int:
    """main's exit status, whether it returns it or argparse exits with it."""
    try:
        return main(argv)
    except SystemExit as e:
        return e.code


def _value(action) -> list[str]:
    """Arguments that give ``action`` a valid value (none for a switch)."""
    if action.nargs == 0:
        return []
    if action.choices:
        return [str(next((c for c in action.choices if c != action.default), action.default))]
    name = getattr(action.type, "__name__", "")
    if hasattr(action.type, "example"):  # lmkd.cli.flags' checked numbers
        return [action.type.example]
    if action.type in (int, float):
        return ["7"]
    if name == "layer_list":
        return ["0"]
    if name == "_fractions":
        return ["0.5"]
    if name == "string_to_bool":  # HfArgumentParser's bool fields
        return ["false" if action.default is True else "true"]
    return ["1"] if action.type not in (None, str) else ["x"]


def _optional(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """``parser`` with nothing required, so that one flag alone parses."""
    for action in parser._actions:
        action.required = False
    for group in parser._mutually_exclusive_groups:
        group.required = False
    return parser


def _both_spellings_parse(parser, prefix=()):
    """Parse every long option of ``parser`` in both spellings; (options checked, of them those whose
    value no command line can give, checked only to be one flag in both spellings)."""
    checked, untyped = 0, 0
    for action in parser._actions:
        if isinstance(
            action, (argparse._HelpAction, argparse._VersionAction, argparse._SubParsersAction)
        ):
            continue
        for option in action.option_strings:
            if not option.startswith("--"):
                continue
            assert "_" not in option, f"--help shows {option}: the dashed spelling only"
            value = _value(action)
            parsed = {}
            both = (option, "--" + option[2:].replace("-", "_"))
            try:
                parser.parse_known_args([*prefix, option, *value])
            except SystemExit:  # a type no command line can give (HF's dict and config fields):
                assert {id(parser._option_string_actions[s]) for s in both} == {
                    id(action)
                }  # one flag
                checked, untyped = checked + 1, untyped + 1
                continue
            for spelling in both:
                ns, rest = parser.parse_known_args([*prefix, spelling, *value])
                assert rest == [], (spelling, rest)
                parsed[spelling] = getattr(ns, action.dest)
            values = list(parsed.values())
            assert values == values[:1] * len(values) and values[0] != parser.get_default(
                action.dest
            ), (option, parsed)
            checked += 1
    return checked, untyped


@pytest.mark.parametrize("command", COMMANDS)
def test_every_long_flag_parses_in_both_spellings(command):
    parser = build_parser()
    sub = _optional(subcommand_parser(parser, command))
    checked, untyped = _both_spellings_parse(sub)
    assert checked >= 3 and untyped == 0


def test_every_distill_key_parses_in_both_spellings():
    """The keys of `lmkd distill` (HfArgumentParser over the dataclasses): both spellings, and
    `--help-keys` shows the dashed one."""
    parser = _optional(distill_parser())
    checked, untyped = _both_spellings_parse(parser)
    assert checked > 100 and untyped <= 5, untyped


def test_help_keys_lists_the_dashed_spelling(capsys):
    assert main(["distill", "--help-keys"]) in (0, None)
    out = capsys.readouterr().out
    assert "--kd-alpha" in out and "--output-dir" in out and "--teacher-model-name-or-path" in out
    assert "--kd_alpha" not in out and "--output_dir" not in out


@pytest.mark.parametrize("command", COMMANDS)
def test_help_shows_only_the_dashed_spelling(command, capsys):
    with pytest.raises(SystemExit):
        main([command, "--help"])
    out = capsys.readouterr().out
    import re

    assert not re.findall(r"(?<![\w-])--[a-z0-9]+_[a-z0-9_]+", out), command


def test_distill_overrides_take_both_spellings(tmp_path):
    argv = [
        "--student_model_name_or_path",
        "s",
        "--task",
        "translation",
        "--train-file",
        "t.jsonl",
        "--output-dir",
        str(tmp_path / "o"),
        "--use-cpu",
        "true",
    ]
    _, data, train = parse_distill_args(None, argv + ["--kd-alpha", "0.9", "--kd_temperature", "3"])
    assert (train.kd_alpha, train.kd_temperature, data.train_file) == (0.9, 3.0, "t.jsonl")


def test_did_you_mean_prefers_the_flag_meant():
    keys = shown_options(distill_parser())
    assert did_you_mean("--teacher", keys) == "--teacher-model-name-or-path"
    assert did_you_mean("--output", keys) == "--output-dir"
    assert did_you_mean("--kd_alpah", keys) == "--kd-alpha"
    assert did_you_mean("--lr", keys) == "--learning-rate"
    assert did_you_mean("--epochs", keys) == "--num-train-epochs"
    # the log-probs' dtype, as the other command calls it (not the teacher's own --teacher-dtype)
    assert did_you_mean("--cache-dtype", keys) == "--teacher-logprob-dtype"
    assert did_you_mean("--logprob_dtype", keys) == "--teacher-logprob-dtype"
    cache = shown_options(subcommand_parser(build_parser(), "cache-logits"))
    assert did_you_mean("--teacher-logprob-dtype", cache) == "--cache-dtype"
    assert did_you_mean("--logprob-dtype", cache) == "--cache-dtype"
    study = shown_options(subcommand_parser(build_parser(), "study"))
    assert did_you_mean("--output-dir", study) == "--output"
    assert did_you_mean("--student-step", study) == "--student-steps"


def test_distill_teacher_suggests_the_teacher_model_flag(capsys):
    assert main(["distill", "--teacher", "x"]) == 2
    err = capsys.readouterr().err.strip()
    assert "did you mean --teacher-model-name-or-path?" in err, err
    assert (
        len(err.splitlines()) == 1 and "--teacher_dtype" not in err and "--teacher-dtype" not in err
    )


def UNKNOWN(
    tmp,
):  # one misspelt flag per command (not a prefix of the real one, which argparse would take)
    o, d = (
        str(tmp / "o"),
        str(tmp / "missing.jsonl"),
    )  # (were one taken, a missing file stops the command)
    return {
        "make-student": (
            ["--teacher", d, "--output", o, "--encodr-layers", "0"],
            "--encoder-layers",
        ),
        "distill": (["--kd-alpah", "0.5"], "--kd-alpha"),
        "evaluate": (
            ["--model", d, "--data", d, "--task", "translation", "--num-beems", "2"],
            "--num-beams",
        ),
        "generate": (
            ["--teacher", d, "--data", d, "--output", o, "--max-new-tokes", "2"],
            "--max-new-tokens",
        ),
        "study": (
            ["--task", "translation", "--train", d, "--output", o, "--student-stepz", "2"],
            "--student-steps",
        ),
        "cache-logits": (
            ["--teacher", d, "--data", d, "--top-k", "4", "--output", o, "--tail-sampels", "2"],
            "--tail-samples",
        ),
        "compress": (
            [
                "--model",
                d,
                "--data",
                d,
                "--task",
                "translation",
                "--output",
                o,
                "--prune-hedas",
                "2",
            ],
            "--prune-heads",
        ),
    }


@pytest.mark.parametrize("command", COMMANDS)
def test_unknown_flag_is_one_line_with_a_did_you_mean(command, capsys, tmp_path):
    argv, meant = UNKNOWN(tmp_path)[command]
    assert _exit_code([command, *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert f"did you mean {meant}?" in err, err
    assert not (tmp_path / "o").exists()


def test_evaluate_takes_source_column_with_underscores():
    ns, rest = build_parser().parse_known_args(
        [
            "evaluate",
            "--model",
            "m",
            "--data",
            "d",
            "--task",
            "translation",
            "--source_column",
            "sentence",
            "--max_samples",
            "3",
        ]
    )
    assert (rest, ns.source_column, ns.max_samples) == ([], "sentence", 3)


def test_study_num_beams_and_its_hidden_old_name(capsys):
    parser = build_parser()
    for flag in ("--num-beams", "--num_beams", "--beams"):
        ns = parser.parse_args(["study", "--task", "translation", "--output", "o", flag, "3"])
        assert ns.num_beams == 3
    with pytest.raises(SystemExit):
        main(["study", "--help"])
    out = capsys.readouterr().out
    assert "--num-beams" in out and "--beams" not in out.replace("--num-beams", "")


def test_cache_logits_cache_dtype_and_its_hidden_old_name(capsys):
    parser = build_parser()
    base = ["cache-logits", "--teacher", "t", "--data", "d", "--top-k", "4", "--output", "o"]
    for flag in ("--cache-dtype", "--cache_dtype", "--dtype"):
        ns = parser.parse_args(base + [flag, "float32"])
        assert (ns.cache_dtype, ns.teacher_dtype) == ("float32", "auto")
    with pytest.raises(SystemExit):
        main(["cache-logits", "--help"])
    out = capsys.readouterr().out
    assert "--cache-dtype" in out and " --dtype" not in out and "[--dtype" not in out


def test_cache_logits_task_lists_only_what_it_caches(capsys):
    with pytest.raises(SystemExit) as e:
        main(
            [
                "cache-logits",
                "--teacher",
                "t",
                "--data",
                "d",
                "--top-k",
                "4",
                "--output",
                "o",
                "--task",
                "classification",
            ]
        )
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "invalid choice: 'classification'" in err
    choices = err[err.index("choose from") :]
    assert (
        "causal-lm" in choices
        and "translation" in choices
        and "mlm" not in choices
        and "classification" not in choices
    )


def test_compress_names_the_models_real_kind(tiny_model_dir, tmp_path, capsys):
    gpt2 = tiny_model_dir("gpt2")
    data = tmp_path / "d.jsonl"
    data.write_text('{"source": "a", "target": "b"}\n')
    assert (
        main(
            [
                "compress",
                "--model",
                gpt2,
                "--data",
                str(data),
                "--task",
                "translation",
                "--output",
                str(tmp_path / "c"),
            ]
        )
        == 2
    )
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert "is a causal (decoder-only) LM" in err and "--task causal-lm" in err, err
    assert "encoder-decoder" not in err.split("not ")[0], err
    assert not (tmp_path / "c").exists()


def _bad_values(action) -> list[str]:
    """Values every checked number flag refuses: a negative count or weight, a probability above 1."""
    return ["-1"] + (["1.5"] if action.type.example == "0.25" else [])


@pytest.mark.parametrize("command", COMMANDS)
def test_no_count_or_probability_flag_takes_a_value_out_of_range(command, capsys):
    """A negative or zero count, a probability outside [0, 1]: refused in one line by every command's
    parser (`generate --batch-size 0` used 32 without a word)."""
    parser = _optional(subcommand_parser(build_parser(), command))
    checked = 0
    for action in parser._actions:
        if not hasattr(action.type, "example"):
            continue
        for bad in _bad_values(action):
            with pytest.raises(SystemExit) as e:
                parser.parse_args([action.option_strings[0], bad])
            assert e.value.code == 2
            err = capsys.readouterr().err.strip()
            assert (
                len(err.splitlines()) == 1
                and f"argument {action.option_strings[0]}: must be" in err
            ), err
            checked += 1
    assert checked >= (0 if command in ("make-student", "distill") else 3)
    int_flags = [a for a in parser._actions if a.type is int and a.dest != "seed"]
    assert int_flags == [], [a.dest for a in int_flags]  # every integer flag says its range


def test_study_help_says_the_measured_budget_times(capsys):
    """The quick budget took 65 min (`make demo` from a fresh clone with the whole training set, 2 seeds
    and the teacher trained to its plateau, shipped en->fr corpus, 2 cores; 34 min with the former
    1,500-step teacher and caps); tiny takes seconds with a tiny test model (no measured figure with a
    real teacher, so none is printed): --help says so, and that the time depends on the corpus and the
    teacher."""
    with pytest.raises(SystemExit):
        main(["study", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "65 min from a fresh clone" in out and "seconds with a tiny test model" in out, out
    assert "7 min" not in out  # an unmeasured figure for tiny with a real teacher
    assert "34 min" not in out  # the time with a 1,500-step teacher and students capped at 1,500
    assert "18-20 min" not in out  # the time of the 4,000-row, one-seed protocol
    assert "depends on the corpus and the teacher" in out
    assert "30-40" not in out and "tiny (seconds" not in out


def test_fixed_teacher_steps_reaches_the_study_and_is_refused_where_it_would_be_ignored(
    monkeypatch, tmp_path, capsys
):
    """`--fixed-teacher-steps` sets the option the teacher stages read; for a given seq2seq teacher or the
    causal-lm study (whose teacher always trains its steps) it is refused in one line, not ignored; a
    given classification teacher is still fine-tuned here, so there it is taken."""
    import lmkd.study

    seen = []
    monkeypatch.setattr(lmkd.study, "run_study", lambda options: seen.append(options.resolve()))
    out = str(tmp_path / "o")
    assert main(["study", "--task", "translation", "--budget", "tiny", "--output", out,
                 "--fixed-teacher-steps", "--teacher-steps", "9"]) in (0, None)  # fmt: skip
    assert seen[-1].fixed_teacher_steps is True and seen[-1].plan.teacher_steps == 9
    assert main(["study", "--task", "translation", "--budget", "tiny", "--output", out]) in (
        0,
        None,
    )
    assert seen[-1].fixed_teacher_steps is False
    assert main(["study", "--task", "causal-lm", "--output", out, "--fixed-teacher-steps"]) == 2
    err = capsys.readouterr().err
    assert "--fixed-teacher-steps is for a teacher the study trains" in err and len(seen) == 2
