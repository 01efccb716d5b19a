"""`lmkd evaluate --task causal-lm|mlm` and the fidelity figures: perplexity equals exp(mean token
CE) of a hand loop over single rows (no padding), top-1 agreement and KL(teacher || student) equal a
hand computation, and a model against itself agrees everywhere with KL 0."""

import json
import math

import pytest
import torch
import torch.nn.functional as F
from transformers import (
    AutoModelForCausalLM,
    AutoModelForMaskedLM,
    AutoModelForSeq2SeqLM,
    AutoTokenizer,
)

from lmkd.cli import main
from lmkd.data.collators import collator_for
from lmkd.evaluate.run import evaluate_models


def write_jsonl(path, rows):
    path.write_text(
        "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8"
    )
    return str(path)


def hand_scores(pairs):
    """(mean CE, agreement %, mean KL) over a list of (student logits, teacher logits, targets) per row."""
    ce = agree = kl = n = 0.0
    for s, t, y in pairs:
        ce += float(F.cross_entropy(s, y, reduction="sum"))
        agree += int((s.argmax(-1) == t.argmax(-1)).sum())
        kl += float(
            F.kl_div(F.log_softmax(s, -1), F.log_softmax(t, -1), log_target=True, reduction="sum")
        )
        n += len(y)
    return ce / n, 100 * agree / n, kl / n, int(n)


@pytest.fixture()
def texts(corpus):
    return [
        r["source"] for r in corpus[:11]
    ]  # 11 rows of different lengths: batches of 4 are padded


def test_causal_lm_perplexity_agreement_kl_equal_a_hand_loop(
    tmp_path, tiny_model_dir, texts, capsys
):
    student, teacher = tiny_model_dir("gpt2", seed=1, layers=2), tiny_model_dir("gpt2", seed=2)
    data = write_jsonl(tmp_path / "lm.jsonl", [{"text": t} for t in texts])
    out = tmp_path / "eval.json"
    assert (
        main(
            [
                "evaluate",
                "--model",
                student,
                "--teacher",
                teacher,
                "--data",
                data,
                "--task",
                "causal-lm",
                "--batch-size",
                "4",
                "--speed-samples",
                "4",
                "--repeats",
                "1",
                "--device",
                "cpu",
                "--output",
                str(out),
            ]
        )
        == 0
    )
    result = json.loads(out.read_text())
    tok = AutoTokenizer.from_pretrained(student)
    s_model, t_model = (AutoModelForCausalLM.from_pretrained(p).eval() for p in (student, teacher))
    pairs, t_pairs = [], []
    with torch.no_grad():
        for text in texts:
            ids = tok(text, return_tensors="pt")["input_ids"]
            s, t = s_model(ids).logits[0, :-1], t_model(ids).logits[0, :-1]
            pairs.append((s, t, ids[0, 1:]))
            t_pairs.append((t, t, ids[0, 1:]))
    ce, agree, kl, n = hand_scores(pairs)
    m = result["models"]["student"]
    assert m["fidelity"]["tokens"] == n
    assert m["quality"]["perplexity"] == pytest.approx(math.exp(ce), rel=1e-5)
    assert m["fidelity"]["top1_agreement"] == pytest.approx(agree)
    assert m["fidelity"]["kl_to_teacher"] == pytest.approx(kl, rel=1e-4)
    assert 0 < agree < 100 and kl > 0
    t_ce = hand_scores(t_pairs)[0]
    tm = result["models"]["teacher"]
    assert tm["quality"]["perplexity"] == pytest.approx(math.exp(t_ce), rel=1e-5)
    assert tm["fidelity"]["top1_agreement"] == 100.0 and tm["fidelity"]["kl_to_teacher"] == 0.0
    retained = m["vs_teacher"]["retained_%"]["perplexity"]
    assert retained == pytest.approx(100 * math.exp(t_ce) / math.exp(ce), rel=1e-4)
    assert m["speed"]["latency_ms"] > 0 and "predictions" in result and result["predictions"] == {}
    table = (tmp_path / "eval.md").read_text()
    assert table.startswith(
        "| model | perplexity | top-1 agreement % | KL to teacher | parameters |"
    )
    assert f"| student | {m['quality']['perplexity']:.2f} | {agree:.2f} | {kl:.4f} |" in table
    assert table in capsys.readouterr().out


def test_mlm_scores_the_seeded_masks_and_a_model_against_itself_agrees(
    tmp_path, tiny_model_dir, texts
):
    path = tiny_model_dir("bert")
    data = write_jsonl(tmp_path / "mlm.jsonl", [{"text": t} for t in texts])
    result = evaluate_models(
        path,
        data,
        "mlm",
        teacher=path,
        batch_size=4,
        mlm_probability=0.3,
        seed=5,
        speed_samples=0,
        device="cpu",
        progress=False,
    )
    # the hand loop: the same collator and seed give the same masks; each row then runs alone, unpadded
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForMaskedLM.from_pretrained(path).eval()
    collator = collator_for("mlm", tok, mlm_probability=0.3, seed=5)
    features = [dict(tok(t)) for t in texts]
    pairs = []
    with torch.no_grad():
        for i in range(0, len(features), 4):
            batch = collator(features[i : i + 4])
            for ids, att, labels in zip(
                batch["input_ids"], batch["attention_mask"], batch["labels"]
            ):
                keep = att.bool()
                logits = model(ids[keep][None]).logits[0]
                sel = labels[keep] != -100
                pairs.append((logits[sel], logits[sel], labels[keep][sel]))
    ce, _, _, n = hand_scores(pairs)
    assert n > 0.2 * sum(
        len(f["input_ids"]) for f in features
    )  # about 30% of the tokens (specials never)
    for label in ("student", "teacher"):
        m = result["models"][label]
        assert m["fidelity"]["tokens"] == n
        assert m["quality"]["perplexity"] == pytest.approx(math.exp(ce), rel=1e-5)
        assert m["fidelity"]["top1_agreement"] == 100.0
        assert m["fidelity"]["kl_to_teacher"] == pytest.approx(0.0, abs=1e-6)
    assert result["models"]["student"]["vs_teacher"]["retained_%"]["perplexity"] == pytest.approx(
        100.0
    )
    # another seed masks other tokens: another perplexity
    other = evaluate_models(
        path,
        data,
        "mlm",
        batch_size=4,
        mlm_probability=0.3,
        seed=6,
        speed_samples=0,
        device="cpu",
        progress=False,
    )
    assert other["models"]["student"]["quality"]["perplexity"] != pytest.approx(
        math.exp(ce), rel=1e-6
    )
    assert (
        "fidelity" in other["models"]["student"]
        and "top1_agreement" not in other["models"]["student"]["fidelity"]
    )


def test_seq2seq_fidelity_is_teacher_forced_on_the_references(tmp_path, tiny_model_dir, corpus):
    student, teacher = tiny_model_dir("marian", seed=1, layers=2), tiny_model_dir("marian", seed=4)
    rows = corpus[30:37]
    data = write_jsonl(
        tmp_path / "t.jsonl", [{"source": r["source"], "target": r["target"]} for r in rows]
    )
    result = evaluate_models(
        student,
        data,
        "translation",
        teacher=teacher,
        num_beams=1,
        max_new_tokens=6,
        batch_size=3,
        speed_samples=0,
        device="cpu",
        progress=False,
    )
    tok = AutoTokenizer.from_pretrained(student)
    s_model, t_model = (AutoModelForSeq2SeqLM.from_pretrained(p).eval() for p in (student, teacher))
    pairs = []
    with torch.no_grad():
        for r in rows:
            enc = tok(r["source"], text_target=r["target"], return_tensors="pt")
            s = s_model(input_ids=enc["input_ids"], labels=enc["labels"]).logits[0]
            t = t_model(input_ids=enc["input_ids"], labels=enc["labels"]).logits[0]
            pairs.append((s, t, enc["labels"][0]))
    ce, agree, kl, n = hand_scores(pairs)
    f = result["models"]["student"]["fidelity"]
    assert f["tokens"] == n and f["perplexity"] == pytest.approx(math.exp(ce), rel=1e-5)
    assert f["top1_agreement"] == pytest.approx(agree) and f["kl_to_teacher"] == pytest.approx(
        kl, rel=1e-4
    )
    assert result["models"]["teacher"]["fidelity"]["top1_agreement"] == 100.0
    assert "bleu" in result["models"]["student"]["quality"]  # the generated scores are still there
