"""A teacher served over HTTP (teacher_server_url): `lmkd serve-teacher`'s server runs in this process
on a free port, with a tiny teacher built from a config; vLLM's and SGLang's wire formats are played
by small fake servers that answer from the same teacher in their documented formats."""

from __future__ import annotations

import copy
import json
import os
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import datasets
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
from lmkd.models.loading import load_model
from lmkd.models.scratch import build_model, train_tokenizer
from lmkd.teacher import logit_cache, served
from lmkd.teacher.served_server import serve_in_thread
from lmkd.train.regimes.on_policy import OnPolicyDistillationTrainer

V = None  # the tokenizer's size, set by the fixtures


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
            client = served.ServedTeacher(url, "lmkd", top_k=k)
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
            if k == len(tokenizer):  # the whole vocabulary: exactly the full-logit KD of the teacher
                full = losses.token_kd_loss(s, t_logits, mask, temperature=2.0)
                assert torch.allclose(a, full, rtol=1e-4), (a, full)
    finally:
        srv.shutdown()
        srv.server_close()
