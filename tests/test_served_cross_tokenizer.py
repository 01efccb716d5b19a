"""Cross-tokenizer KD (teacher_tokenizer) with a served teacher (teacher_server_url): `lmkd
serve-teacher`'s server runs in this process with a tiny teacher of another tokenizer than the
student's; the loss is checked against the in-process cross-tokenizer loss on the same batch."""

from __future__ import annotations

import copy
import json
import math
import threading
from http.server import ThreadingHTTPServer

import pytest
import torch
from conftest import corpus_rows
from test_regimes import lm_dataset
from test_served_teacher import FakeEngine
from test_trainer import config, make_dataset
from test_uld import byte_bpe

from lmkd import DistillationTrainer, losses
from lmkd.cli import main
from lmkd.core.errors import LmkdError
from lmkd.data.collators import collator_for
from lmkd.models.loading import load_model
from lmkd.models.scratch import build_model, train_tokenizer
from lmkd.teacher import cross_tokenizer, logit_cache, served
from lmkd.teacher.served_server import serve_in_thread

ARCHS = {"causal": ("gpt2", "gpt2", "causal-lm"), "seq2seq": ("marian", "bart", "translation")}


@pytest.fixture(autouse=True)
def quick_retries(monkeypatch):
    monkeypatch.setattr(served, "BACKOFF_S", 0.01)
    monkeypatch.setattr(served, "RETRIES", 3)


@pytest.fixture(scope="module")
def teacher_tokenizers(corpus):
    """The teacher's tokenizer per kind, where the student's is the `tokenizer` fixture (300 ids, an
    appended </s>): a causal teacher's is byte-level BPE of 700 ids that appends nothing (so a
    student position aligns with the teacher's last token, whose distribution the served causal
    row's repeated last token brings back); a seq2seq teacher's, 900 ids."""
    texts = [r["source"] for r in corpus[:300]] + [r["target"] for r in corpus[:300]]
    return {"causal": byte_bpe(texts, 700), "seq2seq": train_tokenizer(texts, vocab_size=900)}


def saved_teacher(tmp_path, kind, t_tok):
    """A tiny teacher of ``kind`` with its own tokenizer, saved (no dropout; a sharper last norm, so
    its distributions are peaked and a top-k holds most, not all, of their mass)."""
    arch = ARCHS[kind][0]
    model = build_model(arch, len(t_tok), seed=1, layers=2, dropout=0.0)
    norm = (
        model.transformer.ln_f
        if kind == "causal"
        else model.model.decoder.layers[-1].final_layer_norm
    )
    with torch.no_grad():
        norm.weight.mul_(8)
    path = tmp_path / f"teacher-{kind}"
    model.save_pretrained(path)
    t_tok.save_pretrained(path)
    return str(path)


def trainer_for(tmp_path, kind, s_tok, student, name, teacher=None, **keys):
    task = ARCHS[kind][2]
    rows = corpus_rows("train", 16)
    ds = lm_dataset(rows[:16], s_tok) if kind == "causal" else make_dataset(task, rows[:16], s_tok)
    args = config(
        tmp_path,
        output_dir=str(tmp_path / name),
        kd_alpha=1.0,
        per_device_train_batch_size=4,
        max_steps=3,
        **keys,
    )
    return DistillationTrainer(
        model=student,
        args=args,
        teacher_model=teacher,
        train_dataset=ds,
        processing_class=s_tok,
        data_collator=collator_for(task, s_tok, student),
    )


# ---- the rebuilt distribution -------------------------------------------------------------------


def test_dense_logprobs_keeps_the_top_k_and_spreads_the_tail_evenly():
    torch.manual_seed(0)
    lp = torch.log_softmax(torch.randn(5, 11) * 3, -1)
    for k in (11, 4, 1):
        top, ids = lp.topk(k, -1)
        tail = torch.logsumexp(lp.scatter(1, ids, float("-inf")), -1)
        got = losses.dense_logprobs(losses.TopK(ids, top, tail), 11)
        for n in range(5):  # written out: the k ids keep theirs, the others share the tail equally
            rest = [i for i in range(11) if i not in ids[n].tolist()]
            want = [float(lp[n, i]) for i in range(11)]
            for i in rest:
                want[i] = math.log(sum(math.exp(float(lp[n, j])) for j in rest) / len(rest))
            assert got[n].tolist() == pytest.approx(want, abs=1e-5), (k, n)
        assert torch.allclose(got.logsumexp(-1), torch.zeros(5), atol=1e-5)
        assert torch.equal(got, lp) if k == 11 else not torch.allclose(got, lp)
    with pytest.raises(ValueError, match="does not fit a vocabulary of 3"):
        losses.dense_logprobs(losses.TopK(ids, top, tail), 3)


# ---- the loss: the in-process cross-tokenizer loss, with k = the teacher's vocabulary ----------


@pytest.mark.parametrize("kind", ["causal", "seq2seq"])
def test_served_cross_tokenizer_loss_is_the_in_process_one(
    tmp_path, tokenizer, teacher_tokenizers, kind
):
    teacher_tokenizer = teacher_tokenizers[kind]
    t_path = saved_teacher(tmp_path, kind, teacher_tokenizer)
    v_t = len(teacher_tokenizer)
    student = build_model(ARCHS[kind][1], len(tokenizer), seed=0, layers=1, dropout=0.0)
    srv, url = serve_in_thread(t_path)
    try:
        for loss in ("uld", "uld_hybrid"):
            common = dict(kd_loss=loss, teacher_tokenizer=t_path)
            local = trainer_for(
                tmp_path, kind, tokenizer, copy.deepcopy(student), "local",
                teacher=load_model(t_path), **common,
            )  # fmt: skip
            got = {}
            for k in (v_t, 16):
                remote = trainer_for(
                    tmp_path, kind, tokenizer, copy.deepcopy(student), f"served-{k}",
                    teacher_server_url=url, teacher_top_k=k, teacher_logprob_dtype="float32",
                    **common,
                )  # fmt: skip
                assert remote.teacher is None and remote.served_vocab == v_t
                features = [remote.train_dataset[i] for i in range(4)]
                mine, theirs = remote.data_collator(features), local.data_collator(features)
                for key in cross_tokenizer.BATCH_KEYS:  # the same alignment both ways
                    assert (key in mine) == (key in theirs)
                    assert key not in mine or torch.equal(mine[key], theirs[key]), key
                before = srv.scorer.batches
                got[k] = remote.compute_loss(remote.model, mine)
                assert srv.scorer.batches == before + 1  # one request: the teacher's tokens
                kd_mask = remote.position_masks(mine)[1]
                assert torch.equal(mine[logit_cache.MASK], kd_mask)  # every KD position answered
                assert int(kd_mask.sum()) > 0
                if k == v_t:
                    ref = local.compute_loss(local.model, theirs)
                    assert torch.isfinite(ref) and ref != 0  # (the hybrid's partial KL may be < 0)
                    assert torch.allclose(got[k], ref, rtol=1e-5, atol=1e-6), (loss, got[k], ref)
                    print(f"{kind} {loss}: in-process {ref.item():.6f}")
                    # and its gradient: the very objective
                    g_served = torch.autograd.grad(got[k], list(remote.model.parameters()))
                    g_local = torch.autograd.grad(ref, list(local.model.parameters()))
                    assert all(
                        torch.allclose(a, b, rtol=1e-4, atol=1e-7)
                        for a, b in zip(g_served, g_local)
                    )
            print(f"{kind} {loss}: served k=V {got[v_t].item():.6f}, k=16 {got[16].item():.6f}")
            # k < V: the tail spread evenly is another teacher: a different, finite loss
            assert torch.isfinite(got[16]) and (got[16] > 0 or loss == "uld_hybrid")
            assert not torch.allclose(got[16], got[v_t], rtol=1e-3), (loss, got)
    finally:
        srv.shutdown()
        srv.server_close()


def test_vllm_answers_give_the_lmkd_servers_cross_tokenizer_batch(
    tmp_path, tokenizer, teacher_tokenizers
):
    """vLLM's prompt_logprobs (a fake server answering from the same teacher) at the teacher's
    tokens, the last one repeated: the same answer at every aligned student position."""
    teacher_tokenizer = teacher_tokenizers["causal"]
    t_path = saved_teacher(tmp_path, "causal", teacher_tokenizer)
    engine = ThreadingHTTPServer(("127.0.0.1", 0), FakeEngine)
    engine.teacher, engine.tokenizer = load_model(t_path).eval(), teacher_tokenizer
    threading.Thread(target=engine.serve_forever, args=(0.05,), daemon=True).start()
    srv, url = serve_in_thread(t_path)
    try:
        student = build_model("gpt2", len(tokenizer), seed=0, layers=1)
        trainer = trainer_for(
            tmp_path, "causal", tokenizer, student, "vllm", kd_loss="uld",
            teacher_tokenizer=t_path, teacher_server_url=url, teacher_top_k=12,
            teacher_logprob_dtype="float32",
        )  # fmt: skip
        batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
        theirs = served.ServedTeacher(
            f"http://127.0.0.1:{engine.server_address[1]}", "vllm", 12, logprob_dtype="float32"
        )
        theirs.check(teacher_tokenizer, None, cross=True)
        with pytest.raises(LmkdError, match="differently from teacher_tokenizer") as e:
            theirs.check(tokenizer, None, cross=True)
        assert "set teacher_tokenizer to the served teacher's tokenizer" in str(e.value)
        a = served.served_batch(trainer.served, batch, "causal")
        b = served.served_batch(theirs, batch, "causal")
        assert torch.equal(a[logit_cache.MASK], b[logit_cache.MASK]) and a[logit_cache.MASK].any()
        assert torch.equal(a[logit_cache.IDS], b[logit_cache.IDS])
        assert torch.allclose(a[logit_cache.LOGPROBS], b[logit_cache.LOGPROBS], atol=1e-5)
        # the answer at the last real token too (a student position aligned with it)
        last = batch[cross_tokenizer.TEACHER_ATTENTION_MASK].sum(-1) - 1
        pos = batch[cross_tokenizer.TEACHER_POSITION][:, :-1]
        assert bool((pos == last.unsqueeze(-1)).any())
    finally:
        for s in (srv, engine):
            s.shutdown()
            s.server_close()


# ---- training, and the refusals --------------------------------------------------------------


def recipe(tmp_path, kind, student_path, t_path, url, **keys):
    task = ARCHS[kind][2]
    rows = corpus_rows("train", 16)
    data = tmp_path / f"{kind}.jsonl"
    cols = ("source", "target") if kind == "seq2seq" else ()
    data.write_text(
        "".join(
            json.dumps({c: r[c] for c in cols} if cols else {"text": r["source"]}) + "\n"
            for r in rows
        )
    )
    flags = dict(
        student_model_name_or_path=student_path,
        teacher_tokenizer=t_path,
        teacher_server_url=url,
        task=task,
        train_file=str(data),
        output_dir=str(tmp_path / f"out-{kind}"),
        kd_loss="uld",
        kd_alpha=1.0,
        learning_rate=1e-2,
        max_steps=3,
        per_device_train_batch_size=4,
        logging_steps=1,
        report_to="none",
        save_strategy="no",
        use_cpu=True,
        seed=0,
    )
    flags.update(keys)
    path = tmp_path / f"{kind}.yaml"
    path.write_text(json.dumps(flags))  # (JSON is YAML)
    return str(path)


@pytest.mark.parametrize("kind", ["causal", "seq2seq"])
def test_a_few_steps_with_k_below_v_train_the_student_not_the_teacher(
    tmp_path, tokenizer, teacher_tokenizers, kind
):
    t_path = saved_teacher(tmp_path, kind, teacher_tokenizers[kind])
    student = build_model(ARCHS[kind][1], len(tokenizer), seed=0, layers=1)
    student.save_pretrained(tmp_path / "student")
    tokenizer.save_pretrained(tmp_path / "student")
    srv, url = serve_in_thread(t_path)
    teacher0 = {k: v.clone() for k, v in srv.scorer.model.state_dict().items()}
    try:
        path = recipe(tmp_path, kind, str(tmp_path / "student"), t_path, url, teacher_top_k=16)
        assert main(["distill", path]) == 0  # float16 log-probs, k = 16 of 700 or 900
    finally:
        srv.shutdown()
        srv.server_close()
    assert srv.scorer.batches >= 3
    out = tmp_path / f"out-{kind}"
    results = json.loads((out / "distill_results.json").read_text())
    print(kind, "served cross-tokenizer run:", results)
    assert math.isfinite(results["train_loss"]) and 0 < results["train_loss"] <= 2  # ULD <= 2
    trained = load_model(str(out)).state_dict()
    assert any(not torch.equal(v, trained[k]) for k, v in student.state_dict().items())
    assert all(torch.equal(v, srv.scorer.model.state_dict()[k]) for k, v in teacher0.items())
    card = (out / "README.md").read_text()
    assert f"served at {url}" in card


def test_a_server_of_another_tokenizer_than_teacher_tokenizer_is_refused_in_one_line(
    tmp_path, teacher_tokenizers, tiny_model_dir, capsys
):
    t_path = saved_teacher(tmp_path, "causal", teacher_tokenizers["causal"])
    # a server whose teacher reads the student's tokenizer, not teacher_tokenizer
    srv, url = serve_in_thread(tiny_model_dir("gpt2", layers=1, seed=2))
    try:
        path = recipe(tmp_path, "causal", tiny_model_dir("gpt2", layers=1, seed=4), t_path, url)
        capsys.readouterr()
        assert main(["distill", path]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "has another tokenizer" in err[0], err
        assert "teacher_tokenizer's" in err[0] and "set teacher_tokenizer to the served" in err[0]
        assert not (tmp_path / "out-causal").exists()  # before any work
        assert srv.scorer.batches == 0
    finally:
        srv.shutdown()
        srv.server_close()


@pytest.mark.parametrize(
    "keys,message",
    [
        (dict(kd_loss="forward_kl"), "use kd_loss uld or uld_hybrid"),
        (dict(on_policy_fraction=0.5, kd_loss="jsd"), "use kd_loss uld or uld_hybrid"),
        (dict(on_policy_fraction=0.5), "does not combine with on_policy_fraction"),
        (dict(logit_cache="c"), "does not combine with logit_cache"),
        (dict(hidden_weight=1.0), "does not combine with hidden/attention/relation weights"),
    ],
)
def test_what_cannot_work_with_a_served_cross_tokenizer_teacher_is_refused(tmp_path, keys, message):
    base = dict(teacher_server_url="http://127.0.0.1:1", teacher_tokenizer="t", kd_loss="uld")
    with pytest.raises(LmkdError, match=message) as e:
        config(tmp_path, **dict(base, **keys))
    assert "\n" not in str(e.value)
