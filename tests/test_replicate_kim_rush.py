"""benchmarks/replicate_kim_rush.py: the study command it runs is one the real ``lmkd study`` parser
accepts, with the sizes, split and seeds it was given (a space-separated size list once made the
replication exit 2 after its first line)."""

import importlib.util
from pathlib import Path

from lmkd.cli import build_parser

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "replicate_kim_rush.py"


def load():
    spec = importlib.util.spec_from_file_location("replicate_kim_rush", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_replication_s_study_command_parses_with_its_sizes_split_and_seeds():
    bench = load()
    argv = bench.study_command("runs/kr", [0.25, 0.1], 0.5, 3)
    assert argv[1:3] == ["-m", "lmkd"]
    args = build_parser().parse_args(argv[3:])
    assert args.command == "study"
    assert list(args.student_sizes) == [0.25, 0.1]
    assert args.teacher_split == 0.5
    assert args.seeds == 3
    assert args.no_serve is True
    assert args.output == "runs/kr"


def test_without_a_split_the_teacher_trains_on_every_row():
    bench = load()
    args = build_parser().parse_args(bench.study_command("runs/kr", [0.5, 0.2], None, 1)[3:])
    assert args.teacher_split is None
    assert list(args.student_sizes) == [0.5, 0.2]
