"""lmkd compress (issue 19): head pruning that really removes heads, int8 / CTranslate2 / ONNX Runtime
exports whose outputs agree with the fp32 model, a report whose numbers are `lmkd evaluate`'s.

Tiny models trained a few dozen steps (so greedy outputs are not one repeated token), offline."""

from __future__ import annotations

import json
import os

import pytest
import torch

from lmkd import engines, generation, pruning
from lmkd.cli import main
from lmkd.modeling import count_parameters, load_model, load_tokenizer

ct2 = pytest.importorskip("ctranslate2")
ort = pytest.importorskip("onnxruntime")


def _train(model, tokenizer, rows, steps: int, lr: float = 3e-3, seed: int = 0, classify: bool = False):
    """A few dozen AdamW steps on ``rows`` so the model's argmax means something."""
    torch.manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    for step in range(steps):
        batch = [rows[(step * 16 + i) % len(rows)] for i in range(16)]
        if classify:
            enc = tokenizer([r["text"] for r in batch], padding=True, truncation=True, max_length=32,
                            return_tensors="pt")
            enc["labels"] = torch.tensor([r["label"] for r in batch])
        else:
            enc = tokenizer([r["source"] for r in batch], text_target=[r["target"] for r in batch], padding=True,
                            truncation=True, max_length=32, return_tensors="pt")
            enc["labels"][enc["labels"] == tokenizer.pad_token_id] = -100
        loss = model(**enc).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    return model.eval()


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tokenizer, corpus):
    """Saved tiny seq2seq models trained briefly: a BART student (d 32), a larger BART teacher, a
    T5 (head pruning), and a BERT classifier; plus test/train files."""
    from lmkd.scratch import build_model

    root = tmp_path_factory.mktemp("compress")
    out = {"root": str(root)}
    for name, arch, kw, steps in (("student", "bart", dict(d_model=32, layers=2), 80),
                                  ("teacher", "bart", dict(d_model=64, layers=2), 80),
                                  ("t5", "t5", dict(d_model=32, layers=2, heads=4), 80)):
        model = build_model(arch, len(tokenizer), dropout=0.0, **kw)
        _train(model, tokenizer, corpus[64:], steps)
        model.save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
        out[name] = str(root / name)
    rows = [{"text": r["source"], "label": int(len(r["source"].split()) > 8)} for r in corpus]
    bert = build_model("bert", len(tokenizer), kind="classification", d_model=32, layers=2, dropout=0.0)
    _train(bert, tokenizer, rows[64:], 40, classify=True)
    bert.save_pretrained(root / "bert")
    tokenizer.save_pretrained(root / "bert")
    out["bert"] = str(root / "bert")
    for name, data in (("test", corpus[:24]), ("train", corpus[64:]), ("cls", rows[:24])):
        (root / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in data))
        out[name] = str(root / f"{name}.jsonl")
    return out


def _forced_ids(model, tokenizer, sources, n=8):
    """Greedy token ids of exactly ``n`` new tokens per source (EOS held off): comparable position by position."""
    out = []
    for s in sources:
        enc = tokenizer([s], return_tensors="pt", truncation=True, max_length=64)
        with torch.inference_mode():
            ids = model.generate(**enc, num_beams=1, do_sample=False, min_new_tokens=n, max_new_tokens=n)
        out.append(ids[0, 1:].tolist())
    return out


# ---- head pruning ---------------------------------------------------------------------------------


def _batches(model, tokenizer, rows, n=2):
    for i in range(n):
        chunk = rows[i * 16:(i + 1) * 16]
        enc = tokenizer([r["source"] for r in chunk], text_target=[r["target"] for r in chunk], padding=True,
                        truncation=True, max_length=32, return_tensors="pt")
        enc["labels"][enc["labels"] == tokenizer.pad_token_id] = -100
        yield dict(enc)


def test_head_importance_is_the_gate_gradient(trained, corpus):
    """Michel et al.'s |dL/d xi_h|, computed with real gates on the heads' outputs, equals the
    importance lmkd reads off the output projections' weight gradients."""
    model = load_model(trained["t5"], kind="seq2seq").eval()
    tok = load_tokenizer(trained["t5"])
    batch = next(_batches(model, tok, corpus[64:], 1))
    ours = pruning.head_importance(model, [batch])
    groups = pruning.attention_groups(model)
    gates, hooks = {}, []
    for name, module in (x for g in groups.values() for x in g):
        gate = gates[name] = torch.ones(module.n_heads, requires_grad=True)

        def gated(_, args, gate=gate, heads=module.n_heads):  # the heads' outputs times their gates
            x = args[0]
            return ((x.reshape(*x.shape[:-1], heads, -1) * gate[:, None]).reshape(x.shape),)

        hooks.append(module.o.register_forward_pre_hook(gated))
    model(**batch).loss.backward()
    for h in hooks:
        h.remove()
    for name, gate in gates.items():
        torch.testing.assert_close(ours[name], gate.grad.abs().double(), rtol=1e-4, atol=1e-7)
    assert any(v.max() > 0 for v in ours.values())


def test_pruned_heads_are_gone_and_the_model_reloads_with_plain_transformers(trained, corpus, tmp_path):
    from transformers import AutoModelForSeq2SeqLM

    model = load_model(trained["t5"], kind="seq2seq").eval()
    tok = load_tokenizer(trained["t5"])
    original = load_model(trained["t5"], kind="seq2seq").eval()
    cfg = model.config
    before = count_parameters(model)
    importance = pruning.head_importance(model, _batches(model, tok, corpus[64:]))
    kept = pruning.prune_heads(model, 2, importance)
    modules = sum(len(g) for g in pruning.attention_groups(model).values())
    assert modules == 6  # 2 encoder self, 2 decoder self, 2 cross
    # q, k, v lose 2 heads' rows, o their columns; layer 0's relative bias (one per stack) 2 columns
    removed = modules * 4 * cfg.d_model * 2 * cfg.d_kv + 2 * cfg.relative_attention_num_buckets * 2
    assert count_parameters(model) == before - removed
    assert model.config.num_heads == 2 and all(len(v) == 2 for v in kept.values())
    # the kept heads are the most important of their group (self-attention: summed over the stack)
    for group in pruning.attention_groups(original).values():
        total = sum(importance[n] for n, _ in group)
        assert sorted(kept[group[0][0]]) == sorted(torch.topk(total, 2).indices.tolist())
    # the pruned model computes what the original computes with the removed heads' outputs zeroed
    with torch.no_grad():
        for group in pruning.attention_groups(original).values():
            for name, m in group:
                for h in range(m.n_heads):
                    if h not in kept[name]:
                        m.o.weight[:, h * m.key_value_proj_dim:(h + 1) * m.key_value_proj_dim] = 0
    batch = next(_batches(model, tok, corpus, 1))
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, original(**batch).logits, rtol=1e-4, atol=1e-5)
    model.save_pretrained(tmp_path / "p")
    reloaded = AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "p").eval()  # plain transformers
    assert count_parameters(reloaded) == before - removed
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**batch).logits, model(**batch).logits)
