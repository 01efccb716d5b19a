"""A teacher served over HTTP (teacher_server_url): `lmkd serve-teacher`'s server runs in this process
on a free port, with a tiny teacher built from a config; vLLM's and SGLang's wire formats are played
by small fake servers that answer from the same teacher in their documented formats."""

from __future__ import annotations

import copy
import glob
import json
import os
import socket
import threading
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import datasets
import numpy as np
import pytest
import torch
from test_regimes import lm_dataset
from test_trainer import config, make_dataset
from transformers import TrainerCallback

from lmkd import DistillationTrainer, losses
from lmkd.cli import main
from lmkd.core.errors import LmkdError
from lmkd.data.collators import collator_for
from lmkd.data.dataset import DataArguments
from lmkd.data.tokenizing import tokenize
from lmkd.models.loading import load_model, load_tokenizer
from lmkd.models.scratch import build_model, train_tokenizer
from lmkd.teacher import logit_cache, served, served_protocol, served_server
from lmkd.teacher.logit_cache_writer import cache_logits
from lmkd.teacher.served_server import serve_in_thread
from lmkd.train.regimes.on_policy import OnPolicyDistillationTrainer


@pytest.fixture(autouse=True)
def quick_retries(monkeypatch):
    monkeypatch.setattr(served, "BACKOFF_S", 0.01)
    monkeypatch.setattr(served, "RETRIES", 3)


@pytest.fixture()
def causal_teacher(tiny_model_dir):
    return tiny_model_dir("gpt2", layers=2, seed=1)


@pytest.fixture()
def server(causal_teacher):
    srv, url = serve_in_thread(causal_teacher, max_batch_rows=16)
    yield srv, url
    srv.shutdown()
    srv.server_close()


def causal_batch(tokenizer, corpus, n=4):
    ds = lm_dataset(corpus[:n], tokenizer)
    return collator_for("causal-lm", tokenizer)([ds[i] for i in range(n)])


def direct_topk(teacher, batch, kind, k):
    """The teacher's top-k at the KD positions, computed in process (the reference)."""
    fwd = {key: v for key, v in batch.items() if key != "labels"}
    if kind == "seq2seq":
        fwd["decoder_input_ids"] = teacher.prepare_decoder_input_ids_from_labels(
            labels=batch["labels"]
        )
    with torch.no_grad():
        logits = teacher(**fwd).logits.float()
    if kind == "causal":
        logits, mask = logits[:, :-1], batch["attention_mask"][:, 1:].bool()
    else:
        mask = batch["labels"] != -100
    lp = torch.log_softmax(logits, -1)[mask]
    top, ids = lp.topk(k, -1)
    tail = torch.logsumexp(lp.scatter(1, ids, float("-inf")), -1)
    return losses.TopK(ids, top, tail), logits, mask


# ---- the loss: the same as the in-process teacher's, through the cached top-K path ----------


@pytest.mark.parametrize("arch", ["gpt2", "bart"])
def test_served_teacher_gives_the_in_process_kd_loss(tiny_model_dir, tokenizer, corpus, arch):
    kind = "causal" if arch == "gpt2" else "seq2seq"
    path = tiny_model_dir(arch, layers=2, seed=1)
    teacher = load_model(path).eval()  # the served teacher, in process
    student = build_model(arch, len(tokenizer), seed=5, layers=1)
    if kind == "causal":
        batch = causal_batch(tokenizer, corpus)
    else:
        ds = make_dataset("translation", corpus[:4], tokenizer)
        batch = collator_for("translation", tokenizer, student)([ds[i] for i in range(4)])
    srv, url = serve_in_thread(path)
    try:
        for k in (7, len(tokenizer)):
            client = served.ServedTeacher(url, "lmkd", top_k=k, logprob_dtype="float32")
            client.check(tokenizer, len(tokenizer))
            keys = served.served_batch(client, batch, kind)
            ref, t_logits, mask = direct_topk(teacher, batch, kind, k)
            assert torch.equal(keys[logit_cache.MASK], mask)
            got = logit_cache.batch_topk(keys, mask)
            assert torch.equal(got.ids, ref.ids)
            assert torch.allclose(got.logprobs, ref.logprobs, atol=1e-5)
            fwd = {key: v for key, v in batch.items() if key != "labels"}
            if kind == "seq2seq":
                fwd["decoder_input_ids"] = student.prepare_decoder_input_ids_from_labels(
                    labels=batch["labels"]
                )
            s = student(**fwd).logits
            s = s[:, :-1] if kind == "causal" else s
            a = losses.topk_kd_loss(s, got, mask, temperature=2.0)
            b = losses.topk_kd_loss(s, ref, mask, temperature=2.0)
            assert torch.allclose(a, b, rtol=1e-5), (k, a, b)
            if k == len(
                tokenizer
            ):  # the whole vocabulary: exactly the full-logit KD of the teacher
                full = losses.token_kd_loss(s, t_logits, mask, temperature=2.0)
                assert torch.allclose(a, full, rtol=1e-4), (a, full)
    finally:
        srv.shutdown()
        srv.server_close()


# ---- the binary answer: the cache's dtypes and bytes ----------------------------------------------


def token_rows(batch):
    """The rows of a right-padded causal batch, as a /topk request carries them."""
    return [
        {"input_ids": ids[att.bool()].tolist()}
        for ids, att in zip(batch["input_ids"], batch["attention_mask"])
    ]


def recording(srv):
    """The float32 arrays the server computes, per row, as it computes them."""
    seen = []
    score = srv.scorer.score
    srv.scorer.score = lambda rows, k: seen.extend(score(rows, k)) or seen[-len(rows) :]
    return seen


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_the_binary_answer_decodes_to_the_arrays_the_server_computed(
    server, tokenizer, corpus, dtype
):
    srv, url = server
    seen = recording(srv)
    rows = token_rows(causal_batch(tokenizer, corpus))
    client = served.ServedTeacher(url, top_k=12, logprob_dtype=dtype)
    client.check(tokenizer, len(tokenizer))
    client.bytes_received = 0  # (the /info answer)
    got = client.score(rows)
    assert len(seen) == len(got) == 4
    n = sum(r["n"] for r in seen)
    for r, (ids, lp, tail) in zip(seen, got):
        assert ids.dtype == np.int64 and np.array_equal(ids, r["ids"])
        # the values the server computed, cast to the dtype asked (float32: exactly them)
        for mine, theirs in ((lp, r["logprobs"]), (tail, r["tail"])):
            want = torch.from_numpy(theirs).to(getattr(torch, dtype)).float().numpy()
            assert mine.dtype == np.float32 and np.array_equal(mine, want)
            assert np.array_equal(mine, theirs) == (dtype == "float32")
    # its size: ids uint16 (300 ids), log-probs and tail 2 or 4 bytes, plus one small header
    size = 2 if dtype != "float32" else 4
    header = client.bytes_received - n * (12 * 2 + 13 * size)
    assert 0 < header <= 120 and client.positions_received == n, header


def test_an_old_servers_json_answer_still_parses(server, tokenizer, corpus, caplog):
    """A server without the binary answer (its /info names no encodings) is asked as before; its
    float32 answer, rounded here, gives the batch a binary answer gives."""
    srv, url = server
    batch = causal_batch(tokenizer, corpus)
    for dtype in ("float32", "float16"):
        new = served.ServedTeacher(url, top_k=9, logprob_dtype=dtype)
        new.check(tokenizer, len(tokenizer))
        info = srv.scorer.info
        srv.scorer.info = lambda: {k: v for k, v in info().items() if k != "encodings"}
        old = served.ServedTeacher(url, top_k=9, logprob_dtype=dtype)
        with caplog.at_level("WARNING", logger="lmkd.teacher.served"):
            old.check(tokenizer, len(tokenizer))
        srv.scorer.info = info
        new.bytes_received = old.bytes_received = 0  # (the /info answers)
        assert new.binary and not old.binary and "answers in JSON only" in caplog.text
        a = served.served_batch(new, batch, "causal")
        b = served.served_batch(old, batch, "causal")
        for key in (logit_cache.IDS, logit_cache.LOGPROBS, logit_cache.TAIL, logit_cache.MASK):
            assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), (dtype, key)
        assert a[logit_cache.LOGPROBS].dtype == getattr(torch, dtype)
        # base64 of int32 / float32 in JSON against uint16 / float16 (float32: uint16 / float32)
        assert old.bytes_received > (2.5 if dtype == "float16" else 1.5) * new.bytes_received
    # the JSON answer as it is on the wire: rows of base64 arrays
    rows = token_rows(batch)
    body = json.dumps({"top_k": 9, "rows": rows}).encode()
    with urllib.request.urlopen(urllib.request.Request(url + "/topk", data=body)) as r:
        assert r.headers["Content-Type"] == "application/json"
        answer = json.loads(r.read())
    assert sorted(answer["rows"][0]) == ["ids", "logprobs", "n", "tail"]
    ids = served_protocol.decode_array(answer["rows"][0]["ids"], np.int32, (-1, 9))
    assert ids.shape == (answer["rows"][0]["n"], 9)


@pytest.mark.parametrize(
    "extra,message",
    [
        ({"encoding": "xml"}, "unknown encoding 'xml'; choose one of json, binary"),
        ({"encoding": "binary", "logprob_dtype": "int8"}, "unknown logprob_dtype 'int8'"),
        ({"logprob_dtype": "float16"}, 'the JSON answer carries float32 log-probs; ask "encoding"'),
    ],
)
def test_a_request_for_an_answer_the_server_cannot_give_is_refused_in_one_line(
    server, extra, message
):
    body = json.dumps(dict({"top_k": 3, "rows": [{"input_ids": [5, 6, 7]}]}, **extra)).encode()
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(urllib.request.Request(server[1] + "/topk", data=body))
    assert e.value.code == 400
    error = json.loads(e.value.read())["error"]
    assert message in error and "\n" not in error, error


@pytest.fixture()
def float16_cache(tmp_path, causal_teacher, corpus):
    """A float16 logit cache of 8 rows at K = 32 (what `lmkd cache-logits` writes by default),
    and those rows tokenised for training on it."""
    data = tmp_path / "lm.jsonl"
    data.write_text("".join(json.dumps({"text": r["source"]}) + "\n" for r in corpus[:8]))
    data_args = DataArguments(task="causal-lm", train_file=str(data))
    out = str(tmp_path / "cache")
    cache_logits(causal_teacher, data_args, out, 32, batch_size=8, progress=False)
    tok = load_tokenizer(causal_teacher)
    ds = tokenize(
        datasets.Dataset.from_list([{"text": r["source"]} for r in corpus[:8]]), tok, data_args
    )
    return logit_cache.LogitCache(out), logit_cache.attach_cache(ds, out, "causal"), tok


def test_the_float16_served_loss_is_the_float16_cache_loss(server, float16_cache):
    cache, ds, tok = float16_cache
    assert cache.lp_dtype == "float16"
    collate = logit_cache.CachedLogitsCollator(collator_for("causal-lm", tok), cache)
    cached = collate([dict(ds[i]) for i in range(8)])  # the cache's tensors of the 8 rows
    batch = {k: cached[k] for k in ("input_ids", "attention_mask", "labels")}
    student = build_model("gpt2", len(tok), seed=5, layers=1)
    with torch.no_grad():
        s = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    mask = batch["attention_mask"][:, 1:].bool()
    ref = losses.topk_kd_loss(s[:, :-1], logit_cache.batch_topk(cached, mask), mask)
    got = {}
    for dtype in ("float16", "float32"):
        client = served.ServedTeacher(server[1], top_k=32, logprob_dtype=dtype)
        keys = served.served_batch(client, batch, "causal")
        got[dtype] = losses.topk_kd_loss(s[:, :-1], logit_cache.batch_topk(keys, mask), mask)
        if dtype == "float16":  # the very tensors the cache gives, in its dtype
            for key in (logit_cache.IDS, logit_cache.LOGPROBS, logit_cache.TAIL, logit_cache.MASK):
                assert keys[key].dtype == cached[key].dtype and torch.equal(keys[key], cached[key])
    assert torch.equal(got["float16"], ref), (got["float16"], ref)
    # float32 is another (exact) teacher signal: the rounding is visible in the loss
    assert not torch.equal(got["float32"], ref)
    assert torch.allclose(got["float32"], ref, rtol=1e-3)


def test_the_binary_answer_costs_no_more_bytes_per_token_than_the_cache(server, float16_cache):
    cache, ds, tok = float16_cache
    cache_bytes = sum(os.path.getsize(p) for p in glob.glob(f"{cache.path}/shard-*/*.npy"))
    rows = [{k: v for k, v in ds[i].items() if k != logit_cache.CACHE_ROW} for i in range(8)]
    batch = collator_for("causal-lm", tok)(rows)
    per_token = {}
    for dtype in ("float16", "bfloat16", "float32"):
        client = served.ServedTeacher(server[1], top_k=32, logprob_dtype=dtype)
        served.served_batch(client, batch, "causal")
        assert client.positions_received == cache.positions
        per_token[dtype] = client.bytes_received / client.positions_received
    json_client = served.ServedTeacher(server[1], top_k=32)
    json_client.binary = False  # the JSON answer (an older server's)
    served.served_batch(json_client, batch, "causal")
    per_token["json"] = json_client.bytes_received / json_client.positions_received
    in_cache = cache_bytes / cache.positions
    # K = 32: the cache stores 32 x (2 + 2) + 2 (tail) + 2 (target token) bytes a position
    assert 132 < in_cache < 140, in_cache
    assert per_token["float16"] <= in_cache and per_token["bfloat16"] <= in_cache, per_token
    assert 130 <= per_token["float16"] < 132 and per_token["float32"] > in_cache, per_token
    assert per_token["json"] > 2.5 * in_cache, per_token


# ---- training --------------------------------------------------------------------------------


def state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def train_causal(tmp_path, tokenizer, corpus, init, out, teacher=None, callbacks=(), **keys):
    student = copy.deepcopy(init)
    keys = dict(
        dict(output_dir=str(tmp_path / out), per_device_train_batch_size=4, max_steps=4), **keys
    )
    args = config(tmp_path, kd_temperature=1.0, **keys)
    trainer = DistillationTrainer(
        model=student,
        args=args,
        teacher_model=teacher,
        train_dataset=lm_dataset(corpus[:24], tokenizer),
        processing_class=tokenizer,
        data_collator=collator_for("causal-lm", tokenizer),
        callbacks=list(callbacks),
    )
    return trainer


@pytest.mark.parametrize("prefetch", [0, 2])
def test_training_with_a_served_teacher_is_training_with_the_teacher_in_process(
    tmp_path, tokenizer, corpus, causal_teacher, server, prefetch
):
    """With k = the vocabulary, the served top-k path trains the very student the in-process
    teacher does; the server's teacher is untouched."""
    srv, url = server
    teacher_before = state(srv.scorer.model)
    init = build_model("gpt2", len(tokenizer), seed=3, layers=1)
    local = train_causal(
        tmp_path, tokenizer, corpus, init, "local", teacher=load_model(causal_teacher)
    )
    local.train()
    remote = train_causal(
        tmp_path,
        tokenizer,
        corpus,
        init,
        "served",
        teacher_server_url=url,
        teacher_top_k=len(tokenizer),
        teacher_logprob_dtype="float32",
        teacher_prefetch=prefetch,
    )
    assert remote.teacher is None and remote.served is not None
    remote.train()
    a, b = state(local.model), state(remote.model)
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)
    assert any(not torch.equal(v, a[k]) for k, v in init.state_dict().items())
    assert srv.scorer.batches >= 1
    assert all(torch.equal(v, srv.scorer.model.state_dict()[k]) for k, v in teacher_before.items())
    assert remote.served[0].positions_received > 0


def test_on_policy_kd_scores_the_students_fresh_samples_on_the_server(
    tmp_path, tokenizer, corpus, server
):
    srv, url = server
    scored = []
    score = srv.scorer.score
    srv.scorer.score = lambda rows, k: scored.extend(r["input_ids"] for r in rows) or score(rows, k)
    data = lm_dataset(corpus[:8], tokenizer)
    init = build_model("gpt2", len(tokenizer), seed=2, layers=1)
    student = copy.deepcopy(init)
    trainer = OnPolicyDistillationTrainer(
        model=student,
        args=config(
            tmp_path,
            kd_loss="jsd",
            kd_alpha=1.0,
            on_policy_fraction=1.0,
            max_steps=2,
            per_device_train_batch_size=4,
            on_policy_max_new_tokens=5,
            on_policy_prompt_tokens=3,
            teacher_server_url=url,
            teacher_top_k=16,
        ),
        train_dataset=data,
        processing_class=tokenizer,
        data_collator=collator_for("causal-lm", tokenizer),
    )
    trainer.train()
    assert trainer.on_policy_batches == 2
    rows = [list(r) for r in data["input_ids"]]
    # every row the teacher scored is a prompt of the data continued by the student's own tokens
    assert len(scored) == 8 and all(s not in rows for s in scored)
    assert all(any(s[:3] == r[:3] for r in rows) for s in scored)
    assert any(not torch.equal(v, student.state_dict()[k]) for k, v in init.state_dict().items())


class KillServer(TrainerCallback):
    def __init__(self, srv, at):
        self.srv, self.at = srv, at

    def on_step_end(self, args, state, control, **kw):
        if state.global_step == self.at:
            self.srv.shutdown()
            self.srv.server_close()


def test_server_killed_mid_run_stops_resumably_and_resume_loses_nothing(
    tmp_path, tokenizer, corpus, causal_teacher
):
    init = build_model("gpt2", len(tokenizer), seed=3, layers=1)
    srv, url = serve_in_thread(causal_teacher)
    port = srv.server_address[1]
    keys = dict(teacher_server_url=url, teacher_top_k=32, teacher_prefetch=1, max_steps=6)
    try:
        full = train_causal(tmp_path, tokenizer, corpus, init, "full", **keys)
        full.train()
    finally:
        srv.shutdown()
        srv.server_close()
    srv, _ = serve_in_thread(causal_teacher, port=port)
    killed = train_causal(
        tmp_path, tokenizer, corpus, init, "killed", callbacks=[KillServer(srv, 2)], **keys
    )
    with pytest.raises(LmkdError, match="rerun the same command with --resume") as stop:
        killed.train()
    assert "did not answer /topk after 3 tries" in str(stop.value)
    assert "\n" not in str(stop.value)
    stopped_at = killed.state.global_step
    assert 2 <= stopped_at < 6
    assert os.path.isdir(tmp_path / "killed" / f"checkpoint-{stopped_at}")
    srv, _ = serve_in_thread(causal_teacher, port=port)  # the server is back
    try:
        resumed = train_causal(tmp_path, tokenizer, corpus, init, "killed", **keys)
        resumed.train(resume_from_checkpoint=True)
    finally:
        srv.shutdown()
        srv.server_close()
    assert resumed.state.global_step == 6
    a, b = state(full.model), state(resumed.model)
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


# ---- faults found before any work --------------------------------------------------------------


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def causal_recipe(tmp_path, tiny_model_dir, corpus, url, **keys):
    data = tmp_path / "lm.jsonl"
    data.write_text("".join(json.dumps({"text": r["source"]}) + "\n" for r in corpus[:16]))
    recipe = dict(
        student_model_name_or_path=tiny_model_dir("gpt2", layers=1, seed=4),
        task="causal-lm",
        train_file=str(data),
        output_dir=str(tmp_path / "out"),
        per_device_train_batch_size=4,
        max_steps=2,
        kd_alpha=0.5,
        teacher_server_url=url,
        report_to="none",
        save_strategy="no",
        use_cpu=True,
    )
    recipe.update(keys)
    path = tmp_path / "served.yaml"
    path.write_text(json.dumps(recipe))  # (JSON is YAML)
    return str(path)


def test_no_server_is_one_line_before_any_work(tmp_path, tiny_model_dir, corpus, capsys):
    url = f"http://127.0.0.1:{free_port()}"
    recipe = causal_recipe(tmp_path, tiny_model_dir, corpus, url)
    capsys.readouterr()
    assert main(["distill", recipe]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no teacher server answers at " + url in err[0], err
    assert "lmkd serve-teacher" in err[0]
    assert not (tmp_path / "out").exists()  # nothing was started


def test_a_served_run_end_to_end_from_the_command_line(
    tmp_path, tiny_model_dir, corpus, server, capsys, monkeypatch
):
    srv, url = server
    recipe = causal_recipe(
        tmp_path, tiny_model_dir, corpus, url, teacher_top_k=8, teacher_logprob_dtype="bfloat16"
    )
    asked = []
    encode = served_server.encode_binary
    monkeypatch.setattr(
        served_server,
        "encode_binary",
        lambda rows, k, vocab, dtype: asked.append((k, dtype)) or encode(rows, k, vocab, dtype),
    )
    assert main(["distill", recipe]) == 0
    results = json.loads((tmp_path / "out" / "distill_results.json").read_text())
    assert results["train_loss"] > 0 and srv.scorer.batches >= 1 and set(asked) == {(8, "bfloat16")}
    card = (tmp_path / "out" / "README.md").read_text()
    assert f"teacher: `served at {url} (lmkd, top-8)`" in card and "word-level KD" in card


def test_a_server_of_another_vocabulary_is_refused_in_one_line(
    tmp_path, tokenizer, corpus, causal_teacher
):
    other = train_tokenizer([r["target"] for r in corpus], vocab_size=200)
    srv, url = serve_in_thread(causal_teacher, tokenizer=other)
    try:
        client = served.ServedTeacher(url)
        with pytest.raises(LmkdError, match="has another tokenizer") as e:
            client.check(tokenizer, len(tokenizer))
        assert "\n" not in str(e.value)
        client.check(other, None)  # its own tokenizer passes the fingerprint
        with pytest.raises(LmkdError, match="output rows but the student 299"):
            client.check(None, 299)
    finally:
        srv.shutdown()
        srv.server_close()


@pytest.mark.parametrize(
    "keys,message",
    [
        (dict(kd_loss="mse"), "a served top-k teacher does not send"),
        (dict(teacher_model_name_or_path="t"), "does not combine with teacher_model_name_or_path"),
        (dict(logit_cache="c"), "does not combine with logit_cache"),
        (dict(teacher_server="triton"), "unknown teacher_server 'triton'"),
        (dict(teacher_top_k=0), "teacher_top_k must be an integer >= 1"),
        (dict(teacher_logprob_dtype="float8"), "unknown teacher_logprob_dtype 'float8'; choose"),
        (dict(teacher_server_url="gpu-box:8000"), "must start with http://"),
        (dict(teacher_server_url="http://a:1,b:2"), "got 'b:2'"),
    ],
)
def test_served_settings_are_checked_when_the_config_is_built(tmp_path, keys, message):
    base = dict(teacher_server_url="http://127.0.0.1:1")
    with pytest.raises(LmkdError, match=message):
        config(tmp_path, **dict(base, **keys))


# ---- vLLM's and SGLang's wire formats (fake servers answering from the tiny teacher) ------------


class FakeEngine(BaseHTTPRequestHandler):
    """vLLM's /v1/models, /tokenize and /v1/completions (prompt_logprobs) and SGLang's
    /get_model_info and /generate (input_top_logprobs), answered from ``self.server.teacher``."""

    protocol_version = "HTTP/1.1"

    def log_message(self, *a):
        pass

    def send(self, status, body):
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):  # noqa: N802
        if self.path == "/v1/models":
            self.send(200, {"object": "list", "data": [{"id": "tiny", "object": "model"}]})
        else:
            self.send(200, {"model_path": "tiny", "is_generation": True})

    def top(self, ids, k):
        with torch.no_grad():
            lp = torch.log_softmax(self.server.teacher(torch.tensor([ids])).logits[0].float(), -1)
        return [None] + [lp[j].topk(k) for j in range(len(ids) - 1)], lp

    def do_POST(self):  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        tok = self.server.tokenizer
        if self.path == "/tokenize":
            return self.send(200, {"tokens": tok(body["prompt"])["input_ids"], "count": 1})
        if self.path == "/v1/completions":
            k = body["prompt_logprobs"]
            if k > 20:  # vLLM's default --max-logprobs
                return self.send(
                    400,
                    {
                        "object": "error",
                        "message": f"Requested prompt logprobs of {k}, which is greater than "
                        "max allowed: 20",
                        "type": "BadRequestError",
                        "param": "prompt_logprobs",
                        "code": 400,
                    },
                )
            choices = []
            for i, ids in enumerate(body["prompt"]):
                tops, lp = self.top(ids, k)
                plp = [None]
                for j, t in enumerate(tops[1:]):
                    entry = {
                        str(int(a)): {"logprob": float(v), "rank": r + 1, "decoded_token": "x"}
                        for r, (v, a) in enumerate(zip(*t))
                    }
                    nxt = ids[j + 1]  # vLLM adds the prompt's own token, with its rank
                    entry.setdefault(str(nxt), {"logprob": float(lp[j, nxt]), "rank": 999})
                    plp.append(entry)
                choices.append({"index": i, "text": "", "prompt_logprobs": plp})
            return self.send(200, {"object": "text_completion", "choices": choices})
        # SGLang /generate
        if "text" in body:  # the probe: its tokens, as input_token_logprobs
            ids = tok(body["text"])["input_ids"]
            return self.send(
                200, {"meta_info": {"input_token_logprobs": [[None, t, None] for t in ids]}}
            )
        out = []
        for ids in body["input_ids"]:
            tops, _ = self.top(ids, body["top_logprobs_num"])
            rows = [None] + [[[float(v), int(a), None] for v, a in zip(*t)] for t in tops[1:]]
            out.append({"text": "", "meta_info": {"input_top_logprobs": rows}})
        return self.send(200, out)


@pytest.fixture()
def fake_engine(causal_teacher, tokenizer):
    srv = ThreadingHTTPServer(("127.0.0.1", 0), FakeEngine)
    srv.teacher, srv.tokenizer = load_model(causal_teacher).eval(), tokenizer
    threading.Thread(target=srv.serve_forever, args=(0.05,), daemon=True).start()
    yield f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()
    srv.server_close()


@pytest.mark.parametrize("engine", ["vllm", "sglang"])
def test_vllm_and_sglang_answers_give_the_lmkd_servers_batch(
    engine, fake_engine, server, tokenizer, corpus
):
    batch = causal_batch(tokenizer, corpus)
    ours = served.ServedTeacher(server[1], "lmkd", top_k=12, logprob_dtype="float32")
    ours.check(tokenizer, len(tokenizer))
    theirs = served.ServedTeacher(fake_engine, engine, top_k=12, logprob_dtype="float32")
    theirs.check(tokenizer, len(tokenizer))
    a = served.served_batch(ours, batch, "causal")
    b = served.served_batch(theirs, batch, "causal")
    assert torch.equal(a[logit_cache.MASK], b[logit_cache.MASK])
    assert torch.equal(a[logit_cache.IDS], b[logit_cache.IDS])
    assert torch.allclose(a[logit_cache.LOGPROBS], b[logit_cache.LOGPROBS], atol=1e-5)
    # the tail: the server's exact log-sum-exp, against log(1 - sum p_k) from the top-k alone
    assert torch.allclose(a[logit_cache.TAIL], b[logit_cache.TAIL], atol=1e-4)


def test_vllms_log_prob_cap_names_the_server_flag(fake_engine, tokenizer, corpus):
    client = served.ServedTeacher(fake_engine, "vllm", top_k=32)
    client.check(tokenizer, len(tokenizer))
    with pytest.raises(LmkdError) as e:
        served.served_batch(client, causal_batch(tokenizer, corpus), "causal")
    line = str(e.value)
    assert "\n" not in line and "vllm serve MODEL --max-logprobs 32" in line, line
    assert "which is greater than max allowed: 20" in line


# ---- several servers: each row to the one its teacher_id names ----------------------------------


def test_teacher_id_routes_each_row_to_its_server(tmp_path, tokenizer, corpus, tiny_model_dir):
    paths = [tiny_model_dir("gpt2", layers=2, seed=s) for s in (1, 7)]
    servers = [serve_in_thread(p) for p in paths]
    scored = [[], []]
    for i, (srv, _) in enumerate(servers):
        score = srv.scorer.score
        srv.scorer.score = lambda rows, k, i=i, f=score: scored[i].extend(rows) or f(rows, k)
    raw = [{"text": r["source"], "teacher_id": i % 3 % 2} for i, r in enumerate(corpus[:12])]
    ds = tokenize(
        datasets.Dataset.from_list(raw), tokenizer, DataArguments(task="causal-lm", train_file="-")
    )
    assert ds["teacher_id"] == [r["teacher_id"] for r in raw]
    url = ",".join(u for _, u in servers)
    try:
        collate = served.TeacherIdCollator(collator_for("causal-lm", tokenizer))
        batch = collate([ds[i] for i in range(6)])
        clients = [served.ServedTeacher(u, top_k=5) for _, u in servers]
        keys = served.served_batch(clients, batch, "causal")
        for row in range(6):  # each row's top-k is its own teacher's
            t = load_model(paths[int(batch["teacher_id"][row])]).eval()
            one = {k: batch[k][row : row + 1] for k in ("input_ids", "attention_mask")}
            ref, _, mask = direct_topk(t, one, "causal", 5)
            assert torch.equal(keys[logit_cache.IDS][row][mask[0]], ref.ids)
        with pytest.raises(LmkdError, match="give the data a teacher_id column"):
            served.served_batch(
                clients, {k: batch[k] for k in ("input_ids", "attention_mask")}, "causal"
            )
        scored[0].clear(), scored[1].clear()
        student = build_model("gpt2", len(tokenizer), seed=3, layers=1)
        trainer = DistillationTrainer(
            model=student,
            args=config(
                tmp_path,
                teacher_server_url=url,
                teacher_top_k=8,
                max_steps=3,
                per_device_train_batch_size=4,
            ),
            train_dataset=ds,
            processing_class=tokenizer,
            data_collator=collator_for("causal-lm", tokenizer),
        )
        trainer.train()
    finally:
        for srv, _ in servers:
            srv.shutdown()
            srv.server_close()
    rows = {tuple(r): t for r, t in zip(ds["input_ids"], ds["teacher_id"])}
    assert scored[0] and scored[1]
    for t in (0, 1):
        assert all(rows[tuple(r["input_ids"])] == t for r in scored[t])
