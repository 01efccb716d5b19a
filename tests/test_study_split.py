"""The study's transfer set as a stated choice: the teacher's memorisation of it measured (and equal to a
direct computation on the saved transfer set), ``--teacher-split`` (the teacher never trains on a held-out
row; the students learn from every row), ``--unlabelled`` (source-only rows reach the KD variants, never the
baseline), how each student was initialised, and no verdicts when every student scored 0."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import sacrebleu
import yaml
from conftest import corpus_rows

from lmkd.core.errors import LmkdError
from lmkd.core.io import read_rows
from lmkd.study import SEQ2SEQ_VARIANTS, StudyOptions, run_study

#: enough teacher steps on the tiny budget for the teacher to learn its own rows (BLEU ~60 there, ~0 others)
TEACHER_STEPS = 400


def _key(row: dict) -> tuple[str, str]:
    return row["source"], row["target"]


def _config(stages: Path, name: str) -> dict:
    return yaml.safe_load((stages / name.replace("+", "_") / "lmkd_config.yaml").read_text())


@pytest.fixture(scope="module")
def split_study(tmp_path_factory):
    """A tiny translation study whose teacher trains on half of the training rows, with 20 source-only rows
    (test sources that no training row has).  Returns (output dir, the unlabelled sources)."""
    root = tmp_path_factory.mktemp("split")
    train_sources = {r["source"] for r in corpus_rows("train")}
    sources = [r["source"] for r in corpus_rows("test") if r["source"] not in train_sources][:20]
    unlabelled = root / "unlabelled.jsonl"
    unlabelled.write_text("".join(json.dumps({"source": s}) + "\n" for s in sources))
    out = str(root / "study")
    run_study(
        StudyOptions(
            task="translation",
            budget="tiny",
            teacher_check=False,
            output=out,
            serve=False,
            teacher_steps=TEACHER_STEPS,
            fixed_teacher_steps=True,  # a tiny teacher's validation BLEU stays ~0: the rule would stop it
            teacher_split=0.5,
            unlabelled=str(unlabelled),
        )
    )
    return out, sources


def _direct(rows: list[dict]) -> dict:
    """The figures computed here, with sacrebleu itself."""
    return {
        "rows": len(rows),
        "metric": "bleu",
        "score": sacrebleu.corpus_bleu(
            [r["teacher"] for r in rows], [[r["target"] for r in rows]]
        ).score,
        "identical": sum(r["teacher"].strip() == r["target"].strip() for r in rows) / len(rows),
    }


def test_memorisation_figures_equal_a_direct_computation_on_the_saved_transfer_set(split_study):
    out, _ = split_study
    stages = Path(out) / "stages"
    rows = [r for r in read_rows(str(stages / "transfer" / "transfer.jsonl")) if r["labelled"]]
    saved = json.loads((stages / "transfer" / "memorisation.json").read_text())
    want = {
        "all": _direct(rows),
        "teacher_rows": _direct([r for r in rows if r["teacher_row"]]),
        "held_out_rows": _direct([r for r in rows if not r["teacher_row"]]),
    }
    for part, figures in want.items():
        assert (
            saved[part]["rows"] == figures["rows"]
            and saved[part]["identical"] == figures["identical"]
        )
        assert saved[part]["score"] == pytest.approx(figures["score"], abs=1e-9)
    assert saved["unlabelled_rows"] == 20
    # the teacher learned its own rows and not the held-out ones: the figures tell the two apart
    assert want["teacher_rows"]["score"] > 20 > want["held_out_rows"]["score"] + 10
    report = json.loads((Path(out) / "report.json").read_text())
    assert list(report).index("transfer_set") < list(report).index("rows")
    ts = report["transfer_set"]
    assert {k: ts[k] for k in saved} == saved and ts["teacher_split"] == 0.5
    md = (Path(out) / "report.md").read_text()
    assert md.index("## Verdicts") < md.index("## Transfer set") < md.index("| model |")
    mine, rest = saved["teacher_rows"], saved["held_out_rows"]
    assert f"the teacher trained on {mine['rows']} of these rows ({mine['score']:.1f} BLEU" in md
    assert f"not on the other {rest['rows']} ({rest['score']:.1f} BLEU" in md


def test_memorisation_warning_follows_its_rule():
    from lmkd.study.results import MEMORISED_RATIO, MEMORISED_SHARE, transfer_set_report
    from lmkd.study.transfer import memorisation

    gold = [
        "le chat dort sur le lit",
        "un paquet de transition factice",
        "outil de gestion des fichiers",
        "bibliothèque partagée pour le son",
    ]
    rows = [
        {"source": str(i), "target": t, "teacher": t + (" " if i < 3 else " en plus")}
        for i, t in enumerate(gold)
    ]
    memo = memorisation(rows, "translation")
    assert memo["all"]["identical"] == 0.75 > MEMORISED_SHARE  # trailing whitespace does not count
    direct = sacrebleu.corpus_bleu([r["teacher"] for r in rows], [gold]).score
    assert memo["all"]["score"] == pytest.approx(direct)
    check = {"score": memo["all"]["score"], "rows": 4}
    assert "mostly the gold targets" in transfer_set_report(memo, check, None)["warning"]
    half = memorisation(
        rows[:2] + [{**r, "teacher": "autre chose"} for r in rows[2:]], "translation"
    )
    assert half["all"]["identical"] == 0.5  # not more than half: only the ratio can warn
    ratio = MEMORISED_RATIO * 1.01
    high = transfer_set_report(half, {"score": half["all"]["score"] / ratio, "rows": 4}, None)
    assert (
        high["ratio"] == pytest.approx(ratio)
        and f"{ratio:.1f}x its validation BLEU" in high["warning"]
    )
    low = transfer_set_report(
        half, {"score": half["all"]["score"] / (MEMORISED_RATIO * 0.99), "rows": 4}, None
    )
    assert low["warning"] is None
    skipped = transfer_set_report(half, {"skipped": True, "passed": True}, None)
    assert (
        skipped["validation"]["score"] is None
        and skipped["ratio"] is None
        and skipped["warning"] is None
    )


def test_teacher_split_teacher_never_trains_on_a_held_out_row_and_students_learn_every_row(
    split_study,
):
    out, _ = split_study
    stages = Path(out) / "stages"
    train = read_rows(str(stages / "data-train" / "train.jsonl"))
    teacher_file = _config(stages, "teacher")["train_file"]
    assert Path(teacher_file).parent.name == "teacher-rows"
    taught = {_key(r) for r in read_rows(teacher_file)}
    held_out = {_key(r) for r in train} - taught
    assert len(held_out) > 0.4 * len({_key(r) for r in train}) and len(taught) > 0.4 * len(train)
    assert {_key(r) for r in read_rows(str(stages / "teacher-rows" / "held_out.jsonl"))} == held_out
    # every student's file holds every training row (the labelled ones, with their gold target)
    for v in SEQ2SEQ_VARIANTS:
        rows = [
            r
            for r in read_rows(_config(stages, f"s025-{v}")["train_file"])
            if r.get("labelled", True)
        ]
        assert sorted(map(_key, rows)) == sorted(map(_key, train)), v
    for r in read_rows(str(stages / "transfer" / "transfer.jsonl")):
        if r["labelled"]:
            assert r["teacher_row"] == (_key(r) in taught)


def test_unlabelled_rows_reach_the_kd_variants_and_never_the_baseline(split_study):
    out, sources = split_study
    stages = Path(out) / "stages"
    transfer = {r["source"]: r for r in read_rows(str(stages / "transfer" / "transfer.jsonl"))}
    for v in SEQ2SEQ_VARIANTS:
        config = _config(stages, f"s025-{v}")
        rows = {r["source"]: r for r in read_rows(config["train_file"])}
        if v == "baseline":
            assert not set(sources) & set(rows)
            continue
        assert set(sources) <= set(rows), v
        for s in sources:  # the target it learns there: the teacher's best beam (no gold exists)
            assert rows[s][config["target_column"]] == transfer[s]["teacher"]
    # Word-KD's logit cache covers its unlabelled rows too (made on the same file)
    cache = json.loads((stages / "kd-cache-target" / "stage.json").read_text())
    assert "transfer" in cache["deps"] and "transfer-rows" not in cache["deps"]
    md = (Path(out) / "report.md").read_text()
    assert "--unlabelled: 20 source-only rows" in md


def test_teacher_split_and_unlabelled_options_are_one_line_errors(tmp_path, split_study):
    out, _ = split_study
    teacher = str(Path(out) / "stages" / "teacher")
    for kwargs, message in [
        (dict(teacher=teacher, teacher_split=0.5), "does not know which rows"),
        (dict(teacher_split=1.0), r"in \(0, 1\)"),
        (dict(teacher_split=0.0), r"in \(0, 1\)"),
        (dict(unlabelled=str(tmp_path / "missing.jsonl")), "does not exist"),
    ]:
        with pytest.raises(LmkdError, match=message) as e:
            StudyOptions(task="translation", output=str(tmp_path / "o"), **kwargs).resolve()
        assert "\n" not in str(e.value)
    with pytest.raises(LmkdError, match="seq2seq"):
        StudyOptions(task="classification", output=str(tmp_path / "o"), teacher_split=0.5).resolve()


def test_split_teacher_rows_splits_by_content():
    import tempfile

    from lmkd.study.splits import HELD_OUT_ROWS, TEACHER_ROWS, split_teacher_rows

    rows = [
        {"source": f"s{i % 7}", "target": f"t{i % 7}"} for i in range(40)
    ]  # every content 5-6 times
    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        split_teacher_rows(str(Path(d) / "train.jsonl"), 0.5, 3, d)
        mine, rest = read_rows(str(Path(d) / TEACHER_ROWS)), read_rows(str(Path(d) / HELD_OUT_ROWS))
    assert not {_key(r) for r in mine} & {_key(r) for r in rest}
    assert (
        len(mine) + len(rest) == 40 and len({_key(r) for r in mine}) == 4
    )  # round(0.5 * 7) contents


def test_every_student_init_is_reported(split_study, tmp_path):
    """A from-scratch teacher's students: fresh (as Kim & Rush), said so; a given trained teacher's: the
    fewest layers that can be copied (one encoder and one decoder layer) when no copied student fits, said
    larger."""
    from lmkd.models.loading import load_model
    from lmkd.models.size import count_parameters

    out, _ = split_study
    report = json.loads((Path(out) / "report.json").read_text())
    (init,) = report["student_inits"]
    assert init["init"] == "fresh" and init["layers"] is None and not init["larger_than_asked"]
    config = json.loads((Path(out) / "stages" / "s025-init" / "config.json").read_text())
    shape = {k: config[k] for k in ("d_model", "encoder_layers", "decoder_layers")}
    assert init["shape"] == shape
    md = (Path(out) / "report.md").read_text()
    assert (
        f"Students at 25% of the teacher: fresh (random init, a narrower model of the teacher's kind), "
        f"{shape['d_model']}-wide, {shape['encoder_layers']}+{shape['decoder_layers']} layers"
    ) in md

    teacher = str(Path(out) / "stages" / "teacher")
    given = str(tmp_path / "given")
    report = run_study(
        StudyOptions(
            task="translation",
            budget="tiny",
            teacher_check=False,
            output=given,
            serve=False,
            teacher=teacher,
        )
    )
    (init,) = report["student_inits"]
    assert init["init"] == "copied teacher layers" and init["layers"] == {
        "encoder": [0],
        "decoder": [0],
    }
    student = load_model(str(Path(given) / "stages" / "s025-init"))
    share = count_parameters(student) / count_parameters(load_model(teacher))
    assert init["parameters_vs_teacher"] == pytest.approx(share)
    assert share > 0.25 and init["larger_than_asked"]
    md = (Path(given) / "report.md").read_text()
    assert (
        f"Students at 25% of the teacher: copied encoder layer(s) 0 and decoder layer(s) 0 of the "
        f"teacher ({student.config.d_model}-wide, 1+1 layers); {share:.0%} of its parameters -- larger "
        "than the asked 25%: the fewest layers that can be copied."
    ) in md


def test_all_zero_students_give_one_no_verdict_line(split_study):
    from lmkd.study.results import no_verdict

    out, _ = split_study
    report = json.loads((Path(out) / "report.json").read_text())
    students = [g for g in report["variants"] if g["variant"] != "teacher"]
    assert students and all(g["score_mean"] == 0 for g in students)  # 12 steps: nothing learned
    # the warnings stay first (below the trivial floor here); one line instead of one per comparison
    assert report["verdicts"] == [
        report["below_floor"],
        report["ran_to_the_cap"],  # the tiny students all train their 12 steps
        report["significance"]["no_verdict"],
    ]
    assert report["ran_to_the_cap"].startswith("**Every student ran to the step cap**")
    assert report["verdicts"][2].startswith("**No verdict is possible**")
    md = (Path(out) / "report.md").read_text()
    assert "p = 1.000)" not in md and "No comparisons listed" in md
    assert report["significance"]["comparisons"]  # still in report.json, for whoever wants them
    groups = [
        {"variant": "teacher", "score_mean": 5.0},
        {"variant": "baseline", "score_mean": 0.0},
        {"variant": "seq-kd", "score_mean": 0.0},
    ]
    assert "every student scored 0.0 BLEU" in no_verdict(groups, "BLEU", 5.0)
    groups[2]["score_mean"] = 0.1
    assert no_verdict(groups, "BLEU", 5.0) is None
