"""`lmkd study --task causal-lm`: prompt tokens are masked in every student's training labels, the
students change and the teacher does not, the options, and (slow) a tiny study of every variant whose
report's verdicts equal a paired bootstrap recomputed on the saved outputs."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from lmkd.core.constants import IGNORE_INDEX
from lmkd.core.errors import LmkdError
from lmkd.core.io import read_rows, write_jsonl
from lmkd.models.scratch import build_model, train_tokenizer
from lmkd.scoring.significance import paired_bootstrap
from lmkd.study import StudyOptions, causal_lm_data, run_study
from lmkd.study.causal_lm import CAUSAL_VARIANTS, causal_student_init, train_causal
from lmkd.study.causal_lm_data import SEPARATOR, encode_rows, read_prompt_rows
from lmkd.study.causal_lm_eval import check_causal_teacher, trivial_floors
from lmkd.study.verdicts import ALPHA

WORDS = (
    "chat chien loup ours lion tigre vache cheval poule canard mouton chevre lapin souris".split()
)


def _rows(n: int, seed: int) -> list[dict]:
    """Prompts of four words; the response is the last two, reversed (the prompt decides it)."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        w = rng.sample(WORDS, 4)
        out.append({"prompt": "mots : " + " ".join(w), "completion": " ".join(reversed(w[2:]))})
    return out


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict[str, str]:
    d = tmp_path_factory.mktemp("lm-data")
    files = {}
    for split, n, seed in (("train", 160, 0), ("validation", 32, 1), ("test", 24, 2)):
        files[split] = str(d / f"{split}.jsonl")
        write_jsonl(files[split], _rows(n, seed))
    return files


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory, corpus) -> str:
    rows = read_rows(corpus["train"])
    tok = train_tokenizer([r["prompt"] + SEPARATOR + r["completion"] for r in rows], 120)
    model = build_model("llama", len(tok), d_model=32, layers=4, heads=2, ffn=64, max_positions=64)
    d = str(tmp_path_factory.mktemp("lm-teacher"))
    model.save_pretrained(d)
    tok.save_pretrained(d)
    return d


def test_encode_rows_masks_the_prompt(teacher_dir, corpus):
    """Labels are IGNORE_INDEX on exactly the prompt + separator tokens (counted from the prompt
    tokenised on its own), the response's ids and EOS after them."""
    from lmkd.models.loading import load_tokenizer

    tok = load_tokenizer(teacher_dir)
    rows = read_rows(corpus["train"])[:20]
    enc = encode_rows(tok, rows, prompt_tokens=5, completion_tokens=8)
    sep = tok(SEPARATOR, add_special_tokens=False)["input_ids"]
    for r, e in zip(rows, enc):
        n_prompt = min(5, len(tok(r["prompt"], add_special_tokens=False)["input_ids"])) + len(sep)
        completion = tok(r["completion"], add_special_tokens=False)["input_ids"][:7]
        assert e["labels"] == [IGNORE_INDEX] * n_prompt + completion + [tok.eos_token_id]
        assert e["input_ids"][n_prompt:] == completion + [tok.eos_token_id]
        assert e["lmkd_prompt_length"] == n_prompt


@pytest.mark.parametrize("variant", ["fkl", "on-policy"])
def test_students_train_on_the_response_only(teacher_dir, corpus, tmp_path, monkeypatch, variant):
    """Every batch the trainer draws masks each row's prompt tokens (their count from the prompts
    tokenised on their own); the student changes, the teacher does not."""
    from lmkd.models.loading import load_model, load_tokenizer

    tok = load_tokenizer(teacher_dir)
    sep = len(tok(SEPARATOR, add_special_tokens=False)["input_ids"])
    expected = {}  # a prompt's first 8 tokens -> the positions masked for it (cut prompt + separator)
    for r in read_rows(corpus["train"]):
        ids = tok(r["prompt"], add_special_tokens=False)["input_ids"]
        expected[tuple(ids[:8])] = min(8, len(ids)) + sep
    seen = []
    original = causal_lm_data.PadCollator.__call__

    def record(self, features):
        batch = original(self, features)
        seen.append({k: v.clone() for k, v in batch.items()})
        return batch

    monkeypatch.setattr(causal_lm_data.PadCollator, "__call__", record)
    init = str(tmp_path / "init")
    causal_student_init(init, teacher_dir, 0.25)
    before_teacher = {k: v.clone() for k, v in load_model(teacher_dir).state_dict().items()}
    before = {k: v.clone() for k, v in load_model(init).state_dict().items()}
    plan = dict(
        max_length=8,
        max_new_tokens=6,
        batch_size=8,
        warmup_steps=0,
        kd_alpha=0.5,
        kd_temperature=1.0,
    )
    out = str(tmp_path / "student")
    metrics = train_causal(
        out,
        init,
        corpus["train"],
        corpus["validation"],
        plan,
        variant=variant,
        steps=3,
        lr=1e-2,
        seed=0,
        teacher_dir=teacher_dir,
    )
    assert len(seen) >= 3
    for batch in seen:
        for ids, att, labels in zip(batch["input_ids"], batch["attention_mask"], batch["labels"]):
            real = int(att.sum())
            masked = int(labels[:real].eq(IGNORE_INDEX).sum())
            assert expected[tuple(ids[: masked - sep].tolist())] == masked
            assert labels[masked:real].ne(IGNORE_INDEX).all()
            assert labels[real:].eq(IGNORE_INDEX).all()
    # the count over the training set equals the prompts' tokens counted on their own
    counted = 0
    for r in read_rows(corpus["train"]):
        counted += min(8, len(tok(r["prompt"], add_special_tokens=False)["input_ids"])) + sep
    assert metrics["prompt_tokens_masked"] == counted
    after = load_model(out).state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    teacher_after = load_model(teacher_dir).state_dict()
    assert all(torch.equal(before_teacher[k], teacher_after[k]) for k in before_teacher)


def test_student_init_copies_a_quarter_of_the_layers(teacher_dir, tmp_path):
    from lmkd.models.loading import load_model

    causal_student_init(str(tmp_path), teacher_dir, 0.25)
    info = json.loads((tmp_path / "init.json").read_text())
    assert info["layers"] == {"layers": [0]} and info["teacher_layers"] == 4
    student, teacher = load_model(str(tmp_path)), load_model(teacher_dir)
    assert torch.equal(
        student.model.layers[0].mlp.up_proj.weight, teacher.model.layers[0].mlp.up_proj.weight
    )


def test_trivial_floors():
    """Copying the first words scores 100 when the response is those words; the most frequent
    response scores 100 on rows that all have it."""
    train = [{"source": "a b c d", "completion": "a b"}] * 3 + [
        {"source": "x", "completion": "q r"}
    ]
    floors = trivial_floors(train, [{"source": "e f g", "completion": "e f"}])
    assert floors["copying the first 2 words of the input"] == pytest.approx(100.0)
    assert floors["the most frequent response"] == pytest.approx(0.0)
    floors = trivial_floors(train, [{"source": "z", "completion": "a b"}])
    assert floors["the most frequent response"] == pytest.approx(100.0)


def test_an_untrained_teacher_fails_its_check(teacher_dir, corpus):
    """A freshly initialised teacher answers nothing like the responses and reads its prompt no better
    than a shuffled one: the check fails on both counts, with its figures."""
    plan = dict(max_length=12, max_new_tokens=6)
    train, val = (
        read_prompt_rows(corpus[s], "prompt", "completion") for s in ("train", "validation")
    )
    check = check_causal_teacher(teacher_dir, train, val, plan, rows=16, seed=0)
    assert check["rows"] == 16 and not check["passed"]
    assert check["floor"] == max(trivial_floors(train, val[:16]).values())
    assert check["score"] < check["floor"] + 1
    assert abs(check["ce_shuffled_sources"] - check["ce_real_sources"]) < 0.25
    assert len(check["reasons"]) == 2 and "ignores the prompt" in check["reasons"][1]


def test_chat_rows_become_prompt_and_response(tmp_path):
    """messages rows: the prompt is every turn before the last assistant turn, rendered role by role;
    the response that turn; rows that do not end with an assistant turn are dropped."""
    path = str(tmp_path / "chat.jsonl")
    write_jsonl(
        path,
        [
            {
                "messages": [
                    {"role": "system", "content": "Sois bref."},
                    {"role": "user", "content": "Résume :\n\nun éditeur de texte puissant"},
                    {"role": "assistant", "content": " éditeur de texte "},
                ]
            },
            {"messages": [{"role": "user", "content": "Bonjour"}]},
            {
                "messages": [
                    {"role": "user", "content": "a"},
                    {"role": "assistant", "content": "b"},
                    {"role": "user", "content": "c"},
                    {"role": "assistant", "content": "d"},
                ]
            },
        ],
    )
    rows = read_prompt_rows(path, "prompt", "completion", instruction="Tâche :")
    assert rows == [
        {
            "prompt": "Tâche :\nsystem: Sois bref.\n\nuser: Résume :\n\nun éditeur de texte puissant",
            "completion": "éditeur de texte",
            "source": "un éditeur de texte puissant",
        },
        {"prompt": "Tâche :\nuser: a\n\nassistant: b\n\nuser: c", "completion": "d", "source": "c"},
    ]
    write_jsonl(path, [{"messages": [{"role": "user", "content": "Bonjour"}]}])
    with pytest.raises(LmkdError, match="no messages row that ends with an assistant turn"):
        read_prompt_rows(path, "prompt", "completion")


def test_options(tmp_path):
    opts = StudyOptions(task="causal-lm", output=str(tmp_path / "o"), budget="tiny").resolve()
    assert (opts.source_column, opts.target_column) == ("prompt", "completion")
    assert opts.instruction is None and opts.train.endswith("ddtp_fr_chat.train.jsonl.gz")
    rows = read_prompt_rows(opts.train, opts.source_column, opts.target_column)
    assert len(rows) == 5000 and rows[0]["prompt"].startswith("user: Voici la description")
    assert opts.plan.max_length == 24 and opts.plan.logit_cache is None
    with pytest.raises(LmkdError, match="--teacher-split is for the seq2seq"):
        StudyOptions(task="causal-lm", output=str(tmp_path), teacher_split=0.5).resolve()
    # the causal-lm teacher always trains its steps: the flag that would fix them is refused, not ignored
    with pytest.raises(LmkdError, match="--fixed-teacher-steps is for a teacher the study trains"):
        StudyOptions(task="causal-lm", output=str(tmp_path), fixed_teacher_steps=True).resolve()


@pytest.mark.slow
def test_tiny_causal_study(corpus, tmp_path):
    """Every variant trains and is evaluated; the report's verdicts (every variant vs SFT) are the
    paired bootstrap of the saved greedy responses on ROUGE-L, recomputed here."""
    out = tmp_path / "study"
    opts = StudyOptions(
        task="causal-lm",
        budget="tiny",
        output=str(out),
        teacher_steps=80,
        student_steps=16,
        **corpus,
    )
    report = run_study(opts)
    assert {r["variant"] for r in report["rows"]} == {"teacher", *CAUSAL_VARIANTS}
    assert report["teacher_check"]["passed"]
    refs = [r["completion"] for r in read_rows(corpus["test"])]
    stages = out / "stages"

    def preds(name):
        return json.loads((stages / f"eval-{name}" / "quality.json").read_text())["predictions"]

    vs = [c for c in report["significance"]["comparisons"] if c["kind"] == "vs-baseline"]
    assert {c["a_variant"] for c in vs} == set(CAUSAL_VARIANTS) - {"sft"}
    differ = 0
    for c in vs:
        t = c["tests"]["rougeL"]
        again = paired_bootstrap(
            "rougeL", preds(c["a"])["greedy"], preds("s025-sft")["greedy"], refs
        )
        assert t["difference"] == pytest.approx(again.difference)
        assert t["p_value"] == pytest.approx(again.p_value)
        verdict = (
            "inconclusive"
            if again.p_value >= ALPHA
            else "better"
            if again.difference > 0
            else "worse"
        )
        assert t["verdict"] == verdict
        differ += again.difference != 0
    assert differ > 0  # the variants learned different things: the comparison is not all +0.0
    for v in CAUSAL_VARIANTS:
        log = json.loads((stages / f"s025-{v}" / "train_log.json").read_text())
        assert log["metric"] == "eval_rougeL" and log["curve"]
    md = (out / "report.md").read_text()
    assert all(line in md for line in report["significance"]["verdicts"])
    assert (out / "report.png").stat().st_size > 0
    assert Path(out / "report.json").exists()
