"""lmkd compress (issue 19): head pruning that really removes heads, int8 / CTranslate2 / ONNX Runtime
exports whose outputs agree with the fp32 model, a report whose numbers are `lmkd evaluate`'s.

Tiny models trained a few dozen steps (so greedy outputs are not one repeated token), offline."""

from __future__ import annotations

import json
import os

import pytest
import torch

from lmkd.cli import main
from lmkd.compress import pruning
from lmkd.models import engines, generation, loop_rules
from lmkd.models.loading import load_model, load_tokenizer
from lmkd.models.size import count_parameters

ct2 = pytest.importorskip("ctranslate2")
ort = pytest.importorskip("onnxruntime")


def _spread(model, std: float = 0.15, seed: int = 0):
    """``model`` with its weight matrices drawn with std ``std`` (HF's 0.02 gives a tiny model whose
    greedy output is the same for every input): different inputs get different outputs, and the
    argmax has margins that float32 rounding does not flip -- a fixed, deterministic model to compare
    exports on without training one (a few hundred steps still gave one output for every input)."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                torch.nn.init.normal_(p, std=std)
    return model.eval()


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tokenizer, corpus):
    """Saved tiny models: a BART student (d 32), a wider BART teacher, a T5 (head pruning) and a BERT
    classifier; test and train files (translation, classification)."""
    from lmkd.models.scratch import build_model

    root = tmp_path_factory.mktemp("compress")
    out = {"root": str(root)}
    for name, arch, kind, kw in (
        ("student", "bart", None, dict(d_model=32, layers=2)),
        ("teacher", "bart", None, dict(d_model=64, layers=2)),
        ("t5", "t5", None, dict(d_model=32, layers=2, heads=4)),
        ("bert", "bert", "classification", dict(d_model=32, layers=2)),
    ):
        model = _spread(build_model(arch, len(tokenizer), kind=kind, dropout=0.0, **kw))
        model.save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
        out[name] = str(root / name)
    rows = [{"text": r["source"], "label": int(len(r["source"].split()) > 8)} for r in corpus]
    for name, data in (
        ("test", corpus[:24]),
        ("train", corpus[64:]),
        ("cls", rows[:24]),
        ("cls_train", rows[64:]),
    ):
        (root / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in data))
        out[name] = str(root / f"{name}.jsonl")
    return out


def _forced_ids(model, tokenizer, sources, n=8):
    """Greedy token ids of exactly ``n`` new tokens per source (EOS held off): comparable position by position."""
    out = []
    for s in sources:
        enc = tokenizer([s], return_tensors="pt", truncation=True, max_length=64)
        with torch.inference_mode():
            ids = model.generate(
                **enc, num_beams=1, do_sample=False, min_new_tokens=n, max_new_tokens=n
            )
        out.append(ids[0, 1:].tolist())
    return out


# ---- head pruning ---------------------------------------------------------------------------------


def _batches(model, tokenizer, rows, n=2):
    for i in range(n):
        chunk = rows[i * 16 : (i + 1) * 16]
        enc = tokenizer(
            [r["source"] for r in chunk],
            text_target=[r["target"] for r in chunk],
            padding=True,
            truncation=True,
            max_length=32,
            return_tensors="pt",
        )
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


def test_pruned_heads_are_gone_and_the_model_reloads_with_plain_transformers(
    trained, corpus, tmp_path
):
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
                        m.o.weight[:, h * m.key_value_proj_dim : (h + 1) * m.key_value_proj_dim] = 0
    batch = next(_batches(model, tok, corpus, 1))
    with torch.no_grad():
        torch.testing.assert_close(
            model(**batch).logits, original(**batch).logits, rtol=1e-4, atol=1e-5
        )
    model.save_pretrained(tmp_path / "p")
    reloaded = AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "p").eval()  # plain transformers
    assert count_parameters(reloaded) == before - removed
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**batch).logits, model(**batch).logits)


# ---- exports agree with the fp32 model ------------------------------------------------------------


def _next_tokens(served, tok, enc, prefixes):
    """The token an exported model picks after each fp32 prefix (no compounding of earlier flips):
    teacher-forced argmax for a PyTorch model, a one-token continuation of the prefix for CTranslate2."""
    if engines.is_torch(served):
        with torch.no_grad():
            return served(**enc, decoder_input_ids=prefixes).logits.argmax(-1)
    n = prefixes.shape[1]
    sources, targets = [], []
    for i in range(prefixes.shape[0]):
        ids = enc["input_ids"][i][enc["attention_mask"][i].bool()].tolist()
        for t in range(n):
            sources.append(tok.convert_ids_to_tokens(ids))
            targets.append(tok.convert_ids_to_tokens(prefixes[i, 1 : 1 + t].tolist()))
    res = served.translator.translate_batch(
        sources, target_prefix=targets, beam_size=1, max_decoding_length=n, min_decoding_length=n
    )
    picked = [tok.convert_tokens_to_ids(r.hypotheses[0][len(p)]) for r, p in zip(res, targets)]
    return torch.tensor(picked).reshape(prefixes.shape)


@pytest.mark.parametrize(
    "fmt,min_agree", [("ct2-float32", 1.0), ("ct2-int8", 0.8), ("torch-int8", 0.9)]
)
def test_exported_seq2seq_models_agree_with_fp32(trained, corpus, tmp_path, fmt, min_agree):
    """CTranslate2 float32 gives the PyTorch model's greedy outputs on every test row; the int8
    models pick the fp32 model's next token at most positions of its greedy outputs."""
    engines.export(trained["student"], str(tmp_path / fmt), fmt, "seq2seq")
    fp32, tok = (
        load_model(trained["student"], kind="seq2seq").eval(),
        load_tokenizer(trained["student"]),
    )
    served, stok = engines.load(str(tmp_path / fmt), "seq2seq")
    sources = [r["source"] for r in corpus[:24]]
    ref = generation.generate_texts(
        fp32, tok, sources, num_beams=1, max_new_tokens=16, progress=False
    )
    assert len(set(ref)) >= 10, ref  # the model says different things to different inputs
    ours = generation.generate_texts(
        served, stok, sources, num_beams=1, max_new_tokens=16, progress=False
    )
    if min_agree == 1.0:
        assert ours == ref
    enc = tok(sources, return_tensors="pt", padding=True)
    with torch.no_grad():  # 12 greedy tokens each (EOS held off), then the token after every prefix
        greedy = fp32.generate(
            **enc, num_beams=1, do_sample=False, min_new_tokens=13, max_new_tokens=13
        )[:, :13]
        expected = fp32(**enc, decoder_input_ids=greedy[:, :-1]).logits.argmax(-1)
    assert torch.equal(
        expected, greedy[:, 1:]
    )  # (the check itself: fp32 continues its own prefixes)
    agree = (_next_tokens(served, stok, enc, greedy[:, :-1]) == expected).float().mean().item()
    assert agree >= min_agree, agree
    # what evaluate reports: the fp32 parameter count, the engine's weights file
    assert engines.parameters(served) == count_parameters(fp32)
    weights = {"ct2-float32": "model.bin", "ct2-int8": "model.bin", "torch-int8": "model_int8.pt"}[
        fmt
    ]
    assert engines.weights_bytes(str(tmp_path / fmt)) == os.path.getsize(tmp_path / fmt / weights)
    # int8: CTranslate2 quantises embeddings too, torch's dynamic quantisation only nn.Linear (this
    # tiny model's 300 x 32 embeddings stay float32 -- and the tied LM head gets an int8 copy)
    ratio = engines.weights_bytes(str(tmp_path / fmt)) / engines.weights_bytes(trained["student"])
    assert {"ct2-float32": 0.8 < ratio < 1.2, "ct2-int8": ratio < 0.5, "torch-int8": ratio < 0.8}[
        fmt
    ], ratio


def test_a_closed_engine_opens_again_on_its_next_call(trained, corpus, tmp_path):
    engines.export(trained["student"], str(tmp_path / "ct2"), "ct2-int8", "seq2seq")
    served, stok = engines.load(str(tmp_path / "ct2"), "seq2seq")
    sources = [r["source"] for r in corpus[:6]]
    first = generation.generate_texts(
        served, stok, sources, num_beams=2, max_new_tokens=12, progress=False
    )
    served.close()
    assert served._engine is None
    assert (
        generation.generate_texts(
            served, stok, sources, num_beams=2, max_new_tokens=12, progress=False
        )
        == first
    )
    engines.export(trained["bert"], str(tmp_path / "onnx"), "onnx-int8", "classification")
    clf, ctok = engines.load(str(tmp_path / "onnx"), "classification")
    enc = ctok(sources, return_tensors="pt", padding=True)
    logits = clf(**enc).logits
    clf.close()
    assert clf._engine is None and torch.equal(clf(**enc).logits, logits)


def test_ctranslate2_converts_the_studys_pre_ln_mbart_exactly(tokenizer, corpus, tmp_path):
    """The study's from-scratch teacher and students are pre-LN mBART whose decoder starts at </s>:
    CTranslate2 float32 gives the PyTorch model's greedy and beam outputs on every row."""
    from lmkd.models.scratch import build_model

    model = _spread(build_model("mbart", len(tokenizer), dropout=0.0, d_model=32, layers=2))
    model.save_pretrained(tmp_path / "mbart")
    tokenizer.save_pretrained(tmp_path / "mbart")
    engines.export(str(tmp_path / "mbart"), str(tmp_path / "ct2"), "ct2-float32", "seq2seq")
    fp32, tok = (
        load_model(str(tmp_path / "mbart"), kind="seq2seq").eval(),
        load_tokenizer(str(tmp_path / "mbart")),
    )
    served, stok = engines.load(str(tmp_path / "ct2"), "seq2seq")
    sources = [r["source"] for r in corpus[:16]]
    for beams in (1, 3):
        ref = generation.generate_texts(
            fp32, tok, sources, num_beams=beams, max_new_tokens=12, progress=False
        )
        assert len(set(ref)) >= 6, ref
        assert (
            generation.generate_texts(
                served, stok, sources, num_beams=beams, max_new_tokens=12, progress=False
            )
            == ref
        )


@pytest.mark.parametrize("fmt,min_rows", [("onnx", 1.0), ("onnx-int8", 0.75), ("torch-int8", 0.75)])
def test_exported_classifier_predictions_agree_with_fp32(trained, tmp_path, fmt, min_rows):
    engines.export(trained["bert"], str(tmp_path / fmt), fmt, "classification")
    fp32, tok = (
        load_model(trained["bert"], kind="classification").eval(),
        load_tokenizer(trained["bert"]),
    )
    served, stok = engines.load(str(tmp_path / fmt), "classification")
    texts = [json.loads(line)["text"] for line in open(trained["cls"])]
    ref = generation.classify(fp32, tok, texts, progress=False)
    ours = generation.classify(served, stok, texts, progress=False)
    assert len(set(ref)) == 2, ref
    assert sum(a == b for a, b in zip(ours, ref)) / len(ref) >= min_rows
    if fmt == "onnx":  # the same graph: the same logits up to float rounding
        enc = tok(texts[:4], return_tensors="pt", padding=True)
        torch.testing.assert_close(served(**enc).logits, fp32(**enc).logits, rtol=1e-4, atol=1e-5)


# ---- lmkd compress: the report, and its numbers are lmkd evaluate's -------------------------------

EVAL = ["--num-beams", "2", "--max-new-tokens", "12", "--batch-size", "8"]


def _evaluate(path, data, task, out):
    assert (
        main(
            [
                "evaluate",
                "--model",
                path,
                "--data",
                data,
                "--task",
                task,
                "--speed-samples",
                "0",
                "--output",
                out,
            ]
            + EVAL
        )
        == 0
    )
    with open(out) as f:
        return json.load(f)["models"]["student"]


def test_compress_translation_report_equals_evaluate_on_each_saved_model(trained, tmp_path, capsys):
    out = tmp_path / "out"
    argv = [
        "compress",
        "--model",
        trained["student"],
        "--teacher",
        trained["teacher"],
        "--data",
        trained["test"],
        "--train",
        trained["train"],
        "--task",
        "translation",
        "--output",
        str(out),
        "--decoder-layers",
        "0",
        "--finetune-steps",
        "4",
        "--train-batch-size",
        "8",
        "--speed-samples",
        "4",
        "--repeats",
        "1",
    ] + EVAL
    assert main(argv) == 0
    printed = capsys.readouterr().out
    result = json.loads((out / "compress.json").read_text())
    models = result["models"]
    assert list(models) == ["student", "pruned", "pruned-ft", "torch-int8", "ct2-int8", "teacher"]
    assert (
        "## Against the fp32 student" in (out / "compress.md").read_text() and "ct2-int8" in printed
    )
    student = models["student"]["size"]["parameters"]
    # one decoder layer of two dropped: the pruned model is smaller by exactly that layer
    full = load_model(trained["student"], kind="seq2seq")
    layer = count_parameters(full.model.decoder.layers[1])
    assert (
        models["pruned"]["size"]["parameters"]
        == student - layer
        == models["pruned-ft"]["size"]["parameters"]
    )
    assert (
        models["ct2-int8"]["size"]["parameters"] == student - layer
    )  # exported from the fine-tuned model
    assert result["compress"]["pruning"]["layer_map"] == {"encoder": [0, 1], "decoder": [0]}
    assert [s["step"] for s in result["compress"]["steps"]] == [
        "drop layers",
        "fine-tune",
        "export",
        "export",
    ]
    # every saved model, scored again by lmkd evaluate alone: the same quality and size
    for label in ("pruned", "pruned-ft", "torch-int8", "ct2-int8"):
        path = models[label]["path"]
        assert path == str(out / label) and os.path.isdir(path)
        alone = _evaluate(path, trained["test"], "translation", str(tmp_path / f"{label}.json"))
        assert alone["quality"] == models[label]["quality"], label
        assert alone["size"] == models[label]["size"], label
    # the fine-tune changed the weights; vs_student is computed from the rows
    vs = result["compress"]["vs_student"]["ct2-int8"]
    assert (
        vs["bytes_ratio"]
        == models["ct2-int8"]["size"]["bytes_on_disk"] / models["student"]["size"]["bytes_on_disk"]
    )
    assert vs["speedup_per_token"] == (
        models["student"]["speed"]["ms_per_token"] / models["ct2-int8"]["speed"]["ms_per_token"]
    )
    assert (
        vs["bleu_difference"]
        == models["ct2-int8"]["quality"]["bleu"] - models["student"]["quality"]["bleu"]
    )
    assert (
        models["ct2-int8"]["vs_teacher"]["retained_%"]["bleu"] is None
        or models["teacher"]["quality"]["bleu"] > 0
    )


def test_compress_classifier_exports_to_onnx_runtime(trained, tmp_path):
    out = tmp_path / "cls"
    assert (
        main(
            [
                "compress",
                "--model",
                trained["bert"],
                "--data",
                trained["cls"],
                "--task",
                "classification",
                "--output",
                str(out),
                "--layers",
                "0",
                "--speed-samples",
                "4",
                "--repeats",
                "1",
            ]
        )
        == 0
    )
    result = json.loads((out / "compress.json").read_text())
    assert list(result["models"]) == ["student", "pruned", "torch-int8", "onnx-int8"]
    assert os.path.isfile(out / "onnx-int8" / "model.onnx")
    alone = _evaluate(
        str(out / "onnx-int8"), trained["cls"], "classification", str(tmp_path / "o.json")
    )
    assert alone["quality"] == result["models"]["onnx-int8"]["quality"]
    assert alone["size"] == result["models"]["onnx-int8"]["size"]


def test_compress_model_is_callable_from_python_and_prunes_t5_heads(trained, tmp_path):
    """What the study's compress stage calls: the rows come back, with head pruning of a T5."""
    from lmkd.compress.run import compress_model

    result = compress_model(
        trained["t5"],
        trained["test"],
        "translation",
        str(tmp_path / "t5"),
        train=trained["train"],
        prune_heads=3,
        importance_rows=16,
        exports=["ct2-float32"],
        num_beams=1,
        max_new_tokens=8,
        speed_samples=0,
    )
    rows = result["models"]
    assert list(rows) == ["student", "pruned", "ct2-float32"]
    # CTranslate2 runs the pruned T5 (head size d_kv apart from d_model / heads) as PyTorch does
    assert result["predictions"]["ct2-float32"] == result["predictions"]["pruned"]
    assert result["predictions"]["pruned"] != result["predictions"]["student"]
    assert len(set(result["predictions"]["pruned"])) >= 3
    cfg = load_model(trained["t5"], kind="seq2seq").config
    per_head = 4 * cfg.d_model * cfg.d_kv  # q, k, v rows and o columns of one head
    removed = 6 * 3 * per_head + 2 * cfg.relative_attention_num_buckets * 3
    assert rows["pruned"]["size"]["parameters"] == rows["student"]["size"]["parameters"] - removed
    assert load_model(rows["pruned"]["path"], kind="seq2seq").config.num_heads == 1
    assert all(len(v) == 1 for v in result["compress"]["pruning"]["heads"]["kept"].values())


def test_compress_help_has_examples(capsys):
    with pytest.raises(SystemExit) as e:
        main(["compress", "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    assert "examples:" in text and "lmkd compress --model" in text and "--prune-heads" in text
    assert all(fmt in text for fmt in engines.FORMATS)


def test_evaluate_scores_a_ctranslate2_directory_not_written_by_lmkd(trained, tmp_path):
    """A directory of CTranslate2's own converter (plus the tokenizer): lmkd evaluate runs it and
    scores what lmkd's own export of the same model scores."""
    import ctranslate2.converters

    plain = tmp_path / "plain"
    ctranslate2.converters.TransformersConverter(trained["t5"]).convert(
        str(plain), quantization="float32"
    )
    load_tokenizer(trained["t5"]).save_pretrained(plain)
    engines.export(trained["t5"], str(tmp_path / "ours"), "ct2-float32", "seq2seq")
    a = _evaluate(str(plain), trained["test"], "translation", str(tmp_path / "a.json"))
    b = _evaluate(str(tmp_path / "ours"), trained["test"], "translation", str(tmp_path / "b.json"))
    assert a["quality"] == b["quality"] and a["size"]["bytes_on_disk"] == b["size"]["bytes_on_disk"]
    assert a["size"]["parameters"] is None  # not recorded by CTranslate2's converter


# ---- causal LMs: CTranslate2 Generator and int8 exports of GPT-2 / Llama --------------------------

CAUSAL_ARCHS = ("gpt2", "llama")


def _train_causal(model, tokenizer, texts, steps: int = 150, lr: float = 3e-3):
    """A few seconds of plain next-token training (batches of 16, 48 tokens): a model with real
    preferences (perplexity far below the vocabulary's), different greedy outputs for different
    prompts, some of them ending in EOS, and argmax margins int8 mostly keeps."""
    torch.manual_seed(0)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    for step in range(steps):
        chunk = texts[(step * 16) % len(texts) :][:16]
        enc = tokenizer(chunk, return_tensors="pt", padding=True, truncation=True, max_length=48)
        model(
            **enc, labels=enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
        ).loss.backward()
        opt.step()
        opt.zero_grad()
    return model.eval()


@pytest.fixture(scope="module")
def causal(tmp_path_factory, tokenizer, corpus):
    """Saved tiny GPT-2 and Llama (d 32, 2 layers, trained 150 steps on the train rows) and a
    causal-lm test file of other rows."""
    from lmkd.models.scratch import build_model

    root = tmp_path_factory.mktemp("causal")
    out = {"root": str(root)}
    for arch in CAUSAL_ARCHS:
        model = build_model(arch, len(tokenizer), dropout=0.0, d_model=32, layers=2)
        _train_causal(model, tokenizer, [r["source"] for r in corpus[64:]])
        model.save_pretrained(root / arch)
        tokenizer.save_pretrained(root / arch)
        out[arch] = str(root / arch)
    (root / "lm.jsonl").write_text(
        "".join(json.dumps({"text": r["source"]}) + "\n" for r in corpus[:24])
    )
    out["test"] = str(root / "lm.jsonl")
    (root / "lm_train.jsonl").write_text(
        "".join(json.dumps({"text": r["source"]}) + "\n" for r in corpus[64:96])
    )
    out["train"] = str(root / "lm_train.jsonl")
    out["texts"] = [r["source"] for r in corpus[:24]]
    return out


def _left_padded_prompts(tok, texts, lengths=(3, 7, 5, 9, 4, 6, 8, 2)):
    """A batch of prompts of different lengths (each text's first tokens), padded on the left as lmkd
    pads causal generation batches."""
    rows = [tok(t)["input_ids"][:n] for t, n in zip(texts, lengths)]
    return loop_rules.pad_batch(rows, tok.pad_token_id, left=True, device="cpu")


@pytest.mark.parametrize("arch", CAUSAL_ARCHS)
def test_ct2_float32_causal_lm_gives_pytorch_perplexity_and_greedy_tokens(causal, tmp_path, arch):
    """A float32 CTranslate2 Generator of a GPT-2 / Llama: evaluate's perplexity (score_batch: the
    first token not scored, nothing prepended) equals the PyTorch model's, position by position; its
    forward pass gives the same logits; greedy decoding gives HF's ids token for token, EOS and the
    padding after it included."""
    import ctranslate2.converters
    import datasets

    from lmkd.data.dataset import DataArguments
    from lmkd.evaluate.fidelity import token_batches
    from lmkd.evaluate.run import evaluate_models

    out = str(tmp_path / "ct2")
    engines.export(causal[arch], out, "ct2-float32", "causal")
    assert json.loads(open(os.path.join(out, engines.EXPORT_FILE)).read())["kind"] == "causal"
    fp32, tok = load_model(causal[arch], kind="causal").eval(), load_tokenizer(causal[arch])
    served, _ = engines.load(out, "causal")
    assert isinstance(served, engines.CT2Causal) and not engines.is_torch(served)
    plain = str(
        tmp_path / "plain"
    )  # a Generator directory of CTranslate2's own converter, plus the tokenizer
    ctranslate2.converters.TransformersConverter(causal[arch]).convert(
        plain, quantization="float32"
    )
    tok.save_pretrained(plain)
    result = evaluate_models(
        {"fp32": causal[arch], "ct2": out, "plain": plain},
        causal["test"],
        "causal-lm",
        batch_size=4,
        speed_samples=0,
        device="cpu",
        progress=False,
    )
    a, b = result["models"]["fp32"], result["models"]["ct2"]
    assert a["fidelity"]["tokens"] == b["fidelity"]["tokens"] > 200
    assert b["quality"]["perplexity"] == pytest.approx(a["quality"]["perplexity"], rel=1e-4)
    assert result["models"]["plain"]["quality"] == b["quality"]
    assert a["quality"]["perplexity"] < 150  # a model that has learnt something (uniform: 300)
    assert b["size"]["parameters"] == count_parameters(fp32)
    # position by position, on a right-padded batch, and the forward pass's logits
    args = DataArguments(
        task="causal-lm", train_file=causal["test"], source_column="text", target_column=None
    )
    batch = next(
        token_batches(datasets.Dataset.from_dict({"text": causal["texts"][:6]}), tok, args, 6)
    )
    with torch.no_grad():
        logits = fp32(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    ref = torch.log_softmax(logits[:, :-1], -1).gather(-1, batch["input_ids"][:, 1:, None])[..., 0]
    real = batch["attention_mask"][:, 1:].bool()
    ours = served.token_log_probs(batch["input_ids"], batch["attention_mask"])
    torch.testing.assert_close(ours[real], ref[real], rtol=1e-4, atol=1e-4)
    assert torch.all(ours[~real] == 0)
    mask = batch["attention_mask"].bool()
    got = served(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    torch.testing.assert_close(got[mask], logits[mask], rtol=1e-4, atol=1e-4)
    assert torch.all(got[~mask] == 0)
    ids, att = _left_padded_prompts(tok, causal["texts"])
    got = served(
        input_ids=ids, attention_mask=att
    ).logits  # left padding: each row's logits where its tokens are
    for i, real in enumerate(att.bool()):
        with torch.no_grad():
            torch.testing.assert_close(
                got[i, real], fp32(input_ids=ids[i, real][None]).logits[0], rtol=1e-4, atol=1e-4
            )
        assert torch.all(got[i, ~real] == 0)
    # greedy continuations of left-padded prompts
    with torch.no_grad():
        expected = fp32.generate(
            input_ids=ids, attention_mask=att, do_sample=False, num_beams=1, max_new_tokens=10
        )
    got = served.generate(ids, attention_mask=att, max_new_tokens=10)
    assert (
        len({tuple(r) for r in expected[:, ids.shape[1] :].tolist()}) >= 5
    )  # different prompts, different outputs
    assert torch.equal(got, expected)
    assert (expected[:, ids.shape[1] :] == tok.eos_token_id).any(
        -1
    ).sum() >= 2  # rows that stopped at EOS
    # EOS held off until exactly 10 new tokens (min_new_tokens)
    with torch.no_grad():
        expected = fp32.generate(
            input_ids=ids,
            attention_mask=att,
            do_sample=False,
            num_beams=1,
            max_new_tokens=10,
            min_new_tokens=10,
        )
    assert torch.equal(
        served.generate(ids, attention_mask=att, max_new_tokens=10, min_new_tokens=10), expected
    )
    assert expected.shape[1] == ids.shape[1] + 10


@pytest.mark.parametrize(
    "arch,fmt",
    [("gpt2", "ct2-int8"), ("llama", "ct2-int8"), ("gpt2", "torch-int8"), ("llama", "torch-int8")],
)
def test_int8_causal_lm_exports_stay_close_to_fp32(causal, tmp_path, arch, fmt):
    """int8 exports: perplexity within 10% of the fp32 model's, the fp32 argmax at most positions,
    and smaller files; GPT-2's Conv1D layers are quantised (made nn.Linear first), not only its head."""
    out = str(tmp_path / fmt)
    engines.export(causal[arch], out, fmt, "causal")
    fp32, tok = load_model(causal[arch], kind="causal").eval(), load_tokenizer(causal[arch])
    served, _ = engines.load(out, "causal")
    enc = tok(causal["texts"][:12], return_tensors="pt", padding=True)
    with torch.no_grad():
        ref = fp32(**enc).logits
        got = served(**enc).logits
    mask = enc["attention_mask"].bool()
    agree = (got.argmax(-1)[mask] == ref.argmax(-1)[mask]).float().mean().item()
    assert agree >= {"ct2-int8": 0.8, "torch-int8": 0.9}[fmt], agree
    from lmkd.evaluate.run import evaluate_models

    result = evaluate_models(
        {"fp32": causal[arch], "int8": out},
        causal["test"],
        "causal-lm",
        batch_size=8,
        speed_samples=0,
        device="cpu",
        progress=False,
    )
    a, b = (result["models"][k]["quality"]["perplexity"] for k in ("fp32", "int8"))
    assert b == pytest.approx(a, rel=0.1) and b != a
    ratio = engines.weights_bytes(out) / engines.weights_bytes(causal[arch])
    # CTranslate2 quantises the embeddings too; torch only the linear layers (this tiny model's 300 x 32
    # embedding -- and GPT-2's 256 x 32 position table -- stay float32)
    assert ratio < {"ct2-int8": 0.5, "torch-int8": 0.8}[fmt], ratio
    if (
        fmt == "torch-int8"
    ):  # every linear layer: GPT-2's 4 Conv1D per block, Llama's 7 projections, the head
        from torch.ao.nn.quantized.dynamic import Linear as QuantisedLinear
        from transformers.pytorch_utils import Conv1D

        assert not any(isinstance(m, (Conv1D, torch.nn.Linear)) for m in served.modules())
        assert (
            sum(isinstance(m, QuantisedLinear) for m in served.modules())
            == 2 * (4 if arch == "gpt2" else 7) + 1
        )


def test_compress_causal_lm_report_equals_evaluate_on_each_saved_model(causal, tmp_path, capsys):
    """`lmkd compress --task causal-lm` on a GPT-2 (a layer dropped, a short KD fine-tune from its fp32
    self as teacher, default exports torch-int8 and ct2-int8) and from Python on a Llama: every saved
    model, scored again
    by `lmkd evaluate` alone, has the report's perplexity and size; the CTranslate2 rows have
    perplexity but no fidelity ("–")."""
    from lmkd.compress.run import compress_model

    out = tmp_path / "gpt2"
    assert (
        main(
            [
                "compress",
                "--model",
                causal["gpt2"],
                "--teacher",
                causal["gpt2"],
                "--data",
                causal["test"],
                "--task",
                "causal-lm",
                "--output",
                str(out),
                "--layers",
                "0",
                "--train",
                causal["train"],
                "--finetune-steps",
                "2",
                "--train-batch-size",
                "8",
                "--speed-samples",
                "4",
                "--repeats",
                "1",
            ]
            + EVAL
        )
        == 0
    )
    assert "ct2-int8" in capsys.readouterr().out
    result = json.loads((out / "compress.json").read_text())
    models = result["models"]
    assert list(models) == ["student", "pruned", "pruned-ft", "torch-int8", "ct2-int8", "teacher"]
    assert result["compress"]["pruning"]["layer_map"] == {"layers": [0]}
    assert [(s["step"], s.get("from")) for s in result["compress"]["steps"]] == [
        ("drop layers", None),
        ("fine-tune", None),
        ("export", "pruned-ft"),
        ("export", "pruned-ft"),
    ]
    assert (
        models["pruned-ft"]["quality"] != models["pruned"]["quality"]
    )  # the fine-tune changed the weights
    assert models["student"]["fidelity"]["top1_agreement"] == 100.0
    assert "top1_agreement" in models["torch-int8"]["fidelity"]
    assert (
        "top1_agreement" not in models["ct2-int8"]["fidelity"]
    )  # log-probs of the tokens only: no fidelity
    assert models["ct2-int8"]["fidelity"]["tokens"] == models["pruned-ft"]["fidelity"]["tokens"]
    assert models["ct2-int8"]["quality"]["perplexity"] == pytest.approx(
        models["pruned-ft"]["quality"]["perplexity"], rel=0.1
    )
    assert models["ct2-int8"]["speed"]["latency_ms"] > 0
    md = (out / "compress.md").read_text()
    assert (
        "| ct2-int8 | " in md and " – | – |" in md
    )  # no top-1 agreement / KL for the engine's row
    vs = result["compress"]["vs_student"]["ct2-int8"]
    assert vs["perplexity_difference"] == (
        models["ct2-int8"]["quality"]["perplexity"] - models["student"]["quality"]["perplexity"]
    )
    for label in ("pruned", "pruned-ft", "torch-int8", "ct2-int8"):
        alone = _evaluate(
            models[label]["path"], causal["test"], "causal-lm", str(tmp_path / f"{label}.json")
        )
        assert alone["quality"] == models[label]["quality"], label
        assert alone["size"] == models[label]["size"], label
    result = compress_model(
        causal["llama"],
        causal["test"],
        "causal-lm",
        str(tmp_path / "llama"),
        layers=[1],
        speed_samples=0,
        batch_size=8,
    )
    models = result["models"]
    assert list(models) == ["student", "pruned", "torch-int8", "ct2-int8"]
    for label in ("pruned", "ct2-int8"):
        alone = _evaluate(
            models[label]["path"], causal["test"], "causal-lm", str(tmp_path / f"l-{label}.json")
        )
        assert alone["quality"] == models[label]["quality"], label
    assert models["ct2-int8"]["quality"]["perplexity"] == pytest.approx(
        models["pruned"]["quality"]["perplexity"], rel=0.1
    )


def test_causal_lm_ctranslate2_cannot_convert_is_one_line_exit_2(
    causal, tokenizer, tmp_path, capsys
):
    """A causal architecture lmkd does not export to CTranslate2, a Llama the converter would get wrong
    (head size apart from hidden / heads) and head pruning of a GPT-2: one line each, exit 2, nothing
    written."""
    from transformers import GPTNeoConfig, GPTNeoForCausalLM, LlamaForCausalLM

    from lmkd.models.scratch import model_config

    neo = GPTNeoForCausalLM(
        GPTNeoConfig(
            vocab_size=len(tokenizer),
            hidden_size=32,
            num_layers=2,
            num_heads=4,
            attention_types=[[["global"], 2]],
            max_position_embeddings=64,
        )
    )
    config = model_config("llama", len(tokenizer), d_model=32, layers=1)
    config.head_dim = 16  # 4 heads of 16 in a hidden size of 32
    wide = LlamaForCausalLM(config)
    for name, model in (("neo", neo), ("wide", wide)):
        model.save_pretrained(tmp_path / name)
        tokenizer.save_pretrained(tmp_path / name)
    cases = [
        (["--model", str(tmp_path / "neo")], "'gpt_neo' causal LM is not supported"),
        (
            ["--model", str(tmp_path / "wide"), "--export", "ct2-int8"],
            "head size 16 is not hidden size / heads",
        ),
        (
            ["--model", causal["gpt2"], "--prune-heads", "1"],
            "cannot prune attention heads of a 'gpt2'",
        ),
    ]
    capsys.readouterr()  # (what saving the models printed)
    for extra, message in cases:
        assert (
            main(
                [
                    "compress",
                    "--data",
                    causal["test"],
                    "--task",
                    "causal-lm",
                    "--output",
                    str(tmp_path / "out"),
                ]
                + extra
            )
            == 2
        )
        err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
        assert len(err) == 1 and message in err[0] and "Traceback" not in err[0], err
        assert not os.path.exists(tmp_path / "out")
