"""Sequence-level KD generation (lmkd.teacher.pseudo_targets): batching invariance, sampling, resuming,
Seq-Inter, filters."""

from __future__ import annotations

import json
import os

import pytest
import torch
from _seqkd_helpers import save_teacher
from sacrebleu import sentence_bleu, sentence_chrf

from lmkd.core.errors import LmkdError
from lmkd.models.loading import load_model, load_tokenizer
from lmkd.scoring.metrics import sentence_scores
from lmkd.teacher.pseudo_target_files import CHUNK_DIR, SETTINGS_FILE, load_generated
from lmkd.teacher.pseudo_targets import generate_pseudo_targets
from lmkd.teacher.selection import filter_below, select_and_filter, seq_inter_select


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory, tokenizer):
    cache: dict = {}

    def make(arch: str) -> str:
        if arch not in cache:
            cache[arch] = save_teacher(tmp_path_factory.mktemp(f"teacher-{arch}"), arch, tokenizer)
        return cache[arch]

    return make


@pytest.fixture(scope="module")
def rows(corpus):
    """20 rows of very different lengths (one four sentences long), with an extra column."""
    out = [dict(r, id=i) for i, r in enumerate(corpus[:20])]
    out[3]["source"] = " ".join(r["source"] for r in corpus[20:24])
    return out


def _gen(teacher, rows, out, **kw):
    kw.setdefault("max_new_tokens", 12)
    return generate_pseudo_targets(teacher, data=rows, output_dir=str(out), progress=False, **kw)


TIE = 1e-4  # hypotheses whose teacher scores are this close are tied; their n-best order is float noise


def _tied(scores: list[float], i: int) -> bool:
    return any(abs(scores[i] - s) < TIE for j, s in enumerate(scores) if j != i)


def _assert_same(a: list[dict], b: list[dict]):
    """Equal rows: the same columns and values, the same pseudo-target; scores equal up to float
    rounding; and the same n-best except that hypotheses with tied scores may come in either order
    (padding changes the float rounding of a batch, so the order of exact ties is not defined)."""
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert set(x) == set(y)
        for k in x:
            if k.endswith("score") or k.endswith("scores"):
                assert x[k] == pytest.approx(y[k], rel=1e-3, abs=TIE), k
            elif k == "teacher_nbest":
                sx = x["teacher_nbest_scores"]
                assert all(h == g or _tied(sx, i) for i, (h, g) in enumerate(zip(x[k], y[k]))), (
                    x[k],
                    y[k],
                )
                assert sum(h != g for h, g in zip(x[k], y[k])) <= len(x[k]) // 2
            else:
                assert x[k] == y[k], k


def _hf_one_at_a_time(path, text, beams, k, max_new_tokens=12):
    """Reference: plain HF generate on one unpadded input, decoded."""
    model, tok = load_model(path).eval(), load_tokenizer(path)
    enc = tok(text, return_tensors="pt")
    with torch.no_grad():
        seq = model.generate(
            **enc,
            num_beams=beams,
            num_return_sequences=k,
            max_new_tokens=max_new_tokens,
            do_sample=False,
        )
    if not model.config.is_encoder_decoder:
        seq = seq[:, enc["input_ids"].shape[1] :]
    return [t.strip() for t in tok.batch_decode(seq, skip_special_tokens=True)]


@pytest.mark.parametrize("arch", ["t5", "bart", "marian", "gpt2"])
@pytest.mark.parametrize("beams", [1, 3])
def test_batched_length_sorted_equals_one_at_a_time(arch, beams, teacher_dir, rows, tmp_path):
    path = teacher_dir(arch)
    kw = dict(num_beams=beams, num_return_sequences=beams, chunk_size=12)
    batched = _gen(path, rows, tmp_path / "batched", batch_size=6, **kw)
    single = _gen(path, rows, tmp_path / "single", batch_size=1, **kw)
    a, b = load_generated(batched["output"]).to_list(), load_generated(single["output"]).to_list()
    _assert_same(a, b)
    # input order and original columns kept; the teacher says different things to different inputs
    assert [r["id"] for r in a] == list(range(len(rows)))
    assert [r["source"] for r in a] == [r["source"] for r in rows]
    assert len({r["teacher_target"] for r in a}) >= 4
    if beams > 1:
        assert all(
            len(r["teacher_nbest"]) == beams and r["teacher_nbest"][0] == r["teacher_target"]
            for r in a
        )
    # ... and equal plain HF generate on one unpadded input at a time
    for i in (0, 3, 7, 12):
        ref = _hf_one_at_a_time(path, rows[i]["source"], beams, beams)
        assert a[i]["teacher_target"] == ref[0], i
        if beams > 1:
            sx = a[i]["teacher_nbest_scores"]
            assert all(
                h == g or _tied(sx, j) for j, (h, g) in enumerate(zip(a[i]["teacher_nbest"], ref))
            ), i


def test_scores_are_mean_teacher_log_probs(teacher_dir, rows, tmp_path):
    path = teacher_dir("t5")
    out = load_generated(
        _gen(path, rows[:6], tmp_path / "o", num_beams=1, batch_size=3)["output"]
    ).to_list()
    model, tok = load_model(path).eval(), load_tokenizer(path)
    for r in out:
        enc = tok(r["source"], return_tensors="pt")
        with torch.no_grad():
            g = model.generate(
                **enc,
                num_beams=1,
                do_sample=False,
                max_new_tokens=12,
                output_scores=True,
                return_dict_in_generate=True,
            )
        lp = model.compute_transition_scores(g.sequences, g.scores, normalize_logits=True)[0]
        toks = g.sequences[0, 1:].tolist()
        n = toks.index(tok.eos_token_id) + 1 if tok.eos_token_id in toks else len(toks)
        assert r["teacher_score"] == pytest.approx(lp[:n].mean().item(), abs=1e-4)


@pytest.mark.parametrize("arch", ["t5", "gpt2"])
def test_sampling_is_reproducible_and_independent_of_batching(arch, teacher_dir, rows, tmp_path):
    path = teacher_dir(arch)
    kw = dict(num_beams=1, do_sample=True, num_return_sequences=2, top_k=50, temperature=20.0)
    a = load_generated(
        _gen(path, rows, tmp_path / "a", batch_size=7, seed=3, **kw)["output"]
    ).to_list()
    b = load_generated(
        _gen(path, rows, tmp_path / "b", batch_size=1, seed=3, **kw)["output"]
    ).to_list()
    c = load_generated(
        _gen(path, rows, tmp_path / "c", batch_size=7, seed=4, **kw)["output"]
    ).to_list()
    _assert_same(a, b)
    assert [r["teacher_nbest"] for r in a] != [r["teacher_nbest"] for r in c]
    assert sum(r["teacher_nbest"][0] != r["teacher_nbest"][1] for r in a) >= len(a) // 2


def test_max_tokens_batching_gives_the_same_rows(teacher_dir, rows, tmp_path):
    path = teacher_dir("marian")
    a = load_generated(
        _gen(path, rows, tmp_path / "a", num_beams=2, batch_size=4)["output"]
    ).to_list()
    b = load_generated(
        _gen(path, rows, tmp_path / "b", num_beams=2, batch_size=None, max_tokens=64)["output"]
    )
    _assert_same(a, b.to_list())


class Killed(RuntimeError):
    """Raised from the on_chunk callback to simulate a run killed part-way."""


def _kill_after(chunks: int):
    def on_chunk(written: int) -> None:
        if written >= chunks:
            raise Killed(f"killed after {written} chunks")

    return on_chunk


def test_killed_run_resumes_to_the_uninterrupted_output(teacher_dir, rows, tmp_path):
    path = teacher_dir("t5")
    kw = dict(
        num_beams=2, num_return_sequences=2, batch_size=3, chunk_size=4
    )  # 20 rows -> 5 chunks
    full = load_generated(_gen(path, rows, tmp_path / "full", **kw)["output"]).to_list()

    out = tmp_path / "killed"
    with pytest.raises(Killed):
        _gen(path, rows, out, on_chunk=_kill_after(2), **kw)
    assert sorted(os.listdir(out / CHUNK_DIR)) == ["chunk-000000.jsonl", "chunk-000001.jsonl"]
    assert json.loads((out / SETTINGS_FILE).read_text())["complete"] is False
    (out / CHUNK_DIR / "chunk-000002.jsonl.tmp-1").write_text(
        '{"_index": 0, "half a line'
    )  # a torn write
    with pytest.raises(LmkdError, match="num_beams"):  # resuming with other settings is refused
        _gen(path, rows, out, **dict(kw, num_beams=3))

    report = _gen(path, rows, out, **dict(kw, batch_size=2))  # the batch size may change on resume
    assert report["generated_here"] == len(rows) - 8
    assert load_generated(str(out)).to_list() == full
    assert not (out / CHUNK_DIR).exists()
    again = _gen(path, rows, out, **kw)
    assert again["already_complete"] and load_generated(str(out)).to_list() == full


def test_output_directory_checks(teacher_dir, rows, tmp_path):
    path = teacher_dir("t5")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "x.txt").write_text("mine")
    with pytest.raises(LmkdError, match="not written by lmkd generate"):
        _gen(path, rows, tmp_path / "other")
    with pytest.raises(LmkdError, match="no column 'text'"):
        _gen(path, rows, tmp_path / "o", source_column="text")
    with pytest.raises(LmkdError, match="num-beams >= 3"):
        _gen(path, rows, tmp_path / "o", num_beams=2, num_return_sequences=3)
    with pytest.raises(LmkdError, match="reference-column"):
        _gen(path, rows, tmp_path / "o", num_beams=2, num_return_sequences=2, select="seq-inter")


# ---- Seq-Inter and filters on hand-made n-best lists --------------------------------------------


def test_seq_inter_picks_the_highest_sentence_bleu():
    nbest = [
        ["a dog ran away", "the cat sat on a mat", "the cat sat on the mat"],
        ["the house is red", "a house is red", "house red"],
        ["completely wrong", "also wrong", "nothing"],
        ["le chat noir dort", "le chien noir dort"],
    ]
    refs = ["the cat sat on the mat", "the house is red", "xyz", "le chien noir dort bien"]
    chosen, changed = seq_inter_select(nbest, refs)
    assert chosen == [
        2,
        0,
        0,
        1,
    ]  # row 3: all zero BLEU -> the teacher's best (ties keep rank order)
    assert changed == 2
    rows = [
        {
            "target": r,
            "teacher_target": n[0],
            "teacher_score": -1.0,
            "teacher_nbest": n,
            "teacher_nbest_scores": [-1.0 - j for j in range(len(n))],
        }
        for n, r in zip(nbest, refs)
    ]
    out, report = select_and_filter(rows, select="seq-inter", reference_column="target")
    assert [r["teacher_target"] for r in out] == [
        "the cat sat on the mat",
        "the house is red",
        "completely wrong",
        "le chien noir dort",
    ]
    assert [r["teacher_score"] for r in out] == [-3.0, -1.0, -1.0, -2.0]
    assert report == {"rows_in": 4, "seq_inter_changed": 2, "rows_out": 4}


@pytest.mark.parametrize("metric", ["bleu", "chrf", "rouge2"])
def test_filter_drops_exactly_the_rows_below_the_threshold(metric):
    refs = [
        "the cat sat on the mat",
        "the house is red",
        "a b c d e",
        "open source software for linux",
    ]
    hyps = [
        "the cat sat on the mat",
        "the house is blue",
        "z y x w",
        "open source software for windows",
    ]
    scores = sentence_scores(hyps, refs, metric)
    if metric == "bleu":
        expected = [sentence_bleu(h, [r]).score for h, r in zip(hyps, refs)]
    elif metric == "chrf":
        expected = [sentence_chrf(h, [r]).score for h, r in zip(hyps, refs)]
    else:  # rouge-2 F1 by hand: shared bigrams

        def f1(h, r):
            bh, br = list(zip(h.split(), h.split()[1:])), list(zip(r.split(), r.split()[1:]))
            common = sum(min(bh.count(b), br.count(b)) for b in set(bh))
            return 0.0 if not common else 100 * 2 * common / (len(bh) + len(br))

        expected = [f1(h, r) for h, r in zip(hyps, refs)]
    assert scores == pytest.approx(expected)
    assert scores[0] == pytest.approx(100) and scores[2] == pytest.approx(0)
    threshold = scores[3]  # a row exactly at the threshold is kept
    keep = filter_below(scores, threshold)
    assert keep == [i for i, s in enumerate(expected) if s >= threshold - 1e-9]
    assert 0 < len(keep) < 4
    rows = [{"target": r, "teacher_target": h} for h, r in zip(hyps, refs)]
    out, report = select_and_filter(
        rows, reference_column="target", filter_metric=metric, filter_min=threshold
    )
    assert [r["teacher_target"] for r in out] == [hyps[i] for i in keep]
    assert report["filter_dropped"] == 4 - len(keep)
    assert [r[f"teacher_{metric}"] for r in out] == pytest.approx([scores[i] for i in keep])


def test_seq_inter_and_filter_in_a_generation_run(teacher_dir, rows, tmp_path):
    path = teacher_dir("t5")
    kw = dict(num_beams=3, num_return_sequences=3, batch_size=5)
    plain = load_generated(_gen(path, rows, tmp_path / "plain", **kw)["output"]).to_list()
    # references: the 2nd hypothesis for even rows, the 1st for odd ones
    refd = [
        dict(r, ref=p["teacher_nbest"][1 if i % 2 == 0 else 0])
        for i, (r, p) in enumerate(zip(rows, plain))
    ]
    report = _gen(path, refd, tmp_path / "inter", select="seq-inter", reference_column="ref", **kw)
    inter = load_generated(report["output"]).to_list()
    expected = []
    for r in inter:
        bleu = [sentence_bleu(h, [r["ref"]]).score for h in r["teacher_nbest"]]
        expected.append(max(range(3), key=lambda j: (bleu[j], -j)))
    assert [r["teacher_target"] for r in inter] == [
        r["teacher_nbest"][j] for r, j in zip(inter, expected)
    ]
    assert [r["teacher_rank"] for r in inter] == expected
    assert report["seq_inter_changed"] == sum(j != 0 for j in expected) > 0

    # filter: references equal the teacher's output on every third row, unrelated elsewhere
    refd = [
        dict(r, ref=p["teacher_target"] if i % 3 == 0 else "zz qq ww")
        for i, (r, p) in enumerate(zip(rows, plain))
    ]
    report = _gen(
        path,
        refd,
        tmp_path / "filt",
        reference_column="ref",
        filter_metric="chrf",
        filter_min=50,
        output_format="jsonl",
        **kw,
    )
    kept = load_generated(report["output"]).to_list()
    want = [
        i
        for i, (r, p) in enumerate(zip(refd, plain))
        if sentence_chrf(p["teacher_target"], [r["ref"]]).score >= 50
    ]
    assert [r["id"] for r in kept] == want and 0 < len(want) < len(rows)
    assert report["filter_dropped"] == len(rows) - len(want)
    assert os.path.isfile(os.path.join(report["output"], "generated.jsonl"))
