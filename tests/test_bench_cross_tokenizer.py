"""benchmarks/bench_cross_tokenizer.py (issue 18's measurement) runs end to end on a tiny stand-in
for a finished translation study: the own-tokenizer student is built and trained with the hybrid
cross-tokenizer KD and without KD, scored, compared, tabulated, and a rerun is served from the cache."""

from __future__ import annotations

import importlib.util
import json
import math
import shutil
from pathlib import Path

from conftest import corpus_rows

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_cross_tokenizer.py"


def _bench():
    spec = importlib.util.spec_from_file_location("bench_cross_tokenizer", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8"
    )


def _study(root: Path, tiny_model_dir, corpus) -> Path:
    """The files of a finished `lmkd study --task translation` that the benchmark reads."""
    stages = root / "stages"
    shutil.copytree(
        tiny_model_dir("mbart", d_model=32, layers=2, heads=2, ffn=64, max_positions=64),
        stages / "teacher",
    )
    shutil.copytree(
        tiny_model_dir("mbart", seed=1, d_model=16, layers=1, heads=2, ffn=32, max_positions=64),
        stages / "s025-init",
    )
    # the teacher's "beam outputs": the gold targets with their words reversed (another target column)
    _write_jsonl(
        stages / "transfer" / "transfer.jsonl",
        [
            {
                "source": r["source"],
                "target": r["target"],
                "teacher": " ".join(r["target"].split()[::-1]),
                "inter": r["target"],
            }
            for r in corpus[:32]
        ],
    )
    _write_jsonl(
        stages / "data-validation" / "validation.jsonl",
        [
            {
                "source": r["source"],
                "target": r["target"],
                "teacher": r["target"],
                "inter": r["target"],
            }
            for r in corpus_rows("validation", 8)
        ],
    )
    _write_jsonl(
        stages / "data-test" / "test.jsonl",
        [{"source": r["source"], "target": r["target"]} for r in corpus_rows("test", 6)],
    )
    plan = dict(
        student_steps=4,
        eval_every=2,
        patience=2,
        min_delta=0.0,
        batch_size=8,
        student_lr=3e-3,
        warmup_steps=1,
        beams=2,
        max_new_tokens=12,
        max_length=48,
        positions=64,
        kd_alpha=0.5,
        kd_temperature=1.0,
    )
    (root / "report.json").write_text(json.dumps({"task": "translation", "plan": plan}))
    return root


def test_bench_cross_tokenizer_tiny(tmp_path, tiny_model_dir, corpus):
    study = _study(tmp_path / "study", tiny_model_dir, corpus)
    out, results = tmp_path / "bench", tmp_path / "table.txt"
    argv = [
        "--study",
        str(study),
        "--output",
        str(out),
        "--variants",
        "xtok-gold,xtok-hybrid",
        "--jobs",
        "1",
        "--vocab",
        "150",
        "--results",
        str(results),
    ]
    bench = _bench()
    assert bench.main(argv) == 0
    table = results.read_text()
    assert "| xtok-hybrid |" in table and "vs xtok-gold" in table and "| teacher |" in table
    figures = json.loads(results.with_suffix(".json").read_text())
    hybrid, gold = figures["variants"]["xtok-hybrid"], figures["variants"]["xtok-gold"]
    assert hybrid["vocab"] == gold["vocab"] == figures["xtok"]["vocab"] <= 150
    assert hybrid["max_weight_change"] > 0 and gold["max_weight_change"] > 0
    assert (
        math.isfinite(hybrid["eval_loss_kd"])
        and hybrid["eval_loss_kd"] > 0
        and gold["eval_loss_kd"] is None
    )
    assert hybrid["steps"] >= 2 and hybrid["vs_reference"]["reference"] == "xtok-gold"
    assert (out / "results.txt").read_text() == table
    ran = (out / "study.log").read_text()
    assert bench.main(argv) == 0  # the rerun: every stage cached
    assert (out / "study.log").read_text() == ran


def test_the_studys_own_baseline_and_word_kd_are_read_only_when_their_settings_match(tmp_path):
    bench = _bench()
    plan = dict(
        student_steps=1500, student_lr=1e-3, batch_size=32, kd_alpha=0.5, beams=4, max_new_tokens=64
    )
    for name, options in (("s025-baseline", {}), ("s025-word-kd", {"kd_alpha": 0.5})):
        d = tmp_path / "stages" / name
        d.mkdir(parents=True)
        (d / "stage.json").write_text(
            json.dumps(
                {
                    "options": dict(
                        steps=1500, seed=42, lr=1e-3, batch=32, target="target", **options
                    )
                }
            )
        )
        (d / "train_log.json").write_text("{}")
        (d / "distill_results.json").write_text("{}")
        e = tmp_path / "stages" / f"eval-{name}"
        e.mkdir()
        (e / "quality.json").write_text("{}")
        (e / "stage.json").write_text(json.dumps({"options": {"beams": 4, "max_new_tokens": 64}}))
    assert bench.study_student(str(tmp_path), "gold", plan, 42) == (
        str(tmp_path / "stages" / "s025-baseline"),
        str(tmp_path / "stages" / "eval-s025-baseline"),
    )
    assert bench.study_student(str(tmp_path), "fkl", plan, 42)[0].endswith("s025-word-kd")
    assert bench.study_student(str(tmp_path), "fkl", plan, 43) is None  # another seed: retrained
    assert bench.study_student(str(tmp_path), "fkl", {**plan, "kd_alpha": 0.9}, 42) is None
    assert (
        bench.study_student(str(tmp_path), "gold", {**plan, "beams": 2}, 42) is None
    )  # evaluated otherwise
    assert bench.study_student(str(tmp_path), "taid", plan, 42) is None  # not a study student
    # a Word-KD student that read the study's teacher cache is not this benchmark's online forward KL
    meta = tmp_path / "stages" / "s025-word-kd" / "stage.json"
    options = json.loads(meta.read_text())["options"]
    meta.write_text(
        json.dumps({"options": {**options, "kd_cache": {"top_k": 32, "tail_samples": 32}}})
    )
    assert bench.study_student(str(tmp_path), "fkl", plan, 42) is None
    meta.write_text(json.dumps({"options": {**options, "kd_cache": None}}))  # --online-kd
    assert bench.study_student(str(tmp_path), "fkl", plan, 42)[0].endswith("s025-word-kd")
