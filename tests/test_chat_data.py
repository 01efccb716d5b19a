"""Chat (``messages``) and prompt/completion rows for causal-LM distillation (lmkd.data.chat): the
labels mask every token but the assistant's, checked token by token against the rendered template
by character offsets; a tokenizer without a template, a template that rewrites earlier turns and
a row without an assistant turn are one-line errors; a student trained on such rows learns the
assistant tokens only (loss by hand) while its teacher stays frozen; and the CLI runs on them."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import datasets
import pytest
import torch

from lmkd import DistillationConfig, DistillationTrainer, LmkdError
from lmkd.core.constants import IGNORE_INDEX
from lmkd.data import chat
from lmkd.data.collators import collator_for
from lmkd.data.dataset import DataArguments
from lmkd.data.tokenizing import PROMPT_LENGTH, tokenize

CORPORA = Path(__file__).resolve().parents[1] / "lmkd" / "corpora"
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CONVERSATION = [
    {"role": "system", "content": "Tu rédiges les résumés des paquets Debian."},
    {"role": "user", "content": "Résume : bibliothèque partagée pour le traitement d'images."},
    {"role": "assistant", "content": "bibliothèque de traitement d'images"},
    {"role": "user", "content": "Et en plus court ?"},
    {"role": "assistant", "content": "outils graphiques"},
]


def _rows(n: int, short: bool = True) -> list[dict]:
    """The first ``n`` rows of the shipped chat corpus (``short``: of at most 400 characters, so
    that no row is cut to a tiny model's 512 positions)."""
    out = []
    with gzip.open(CORPORA / "ddtp_fr_chat.train.jsonl.gz", "rt", encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            if not short or sum(len(m["content"]) for m in row["messages"]) <= 400:
                out.append(row)
            if len(out) == n:
                return out
    return out


@pytest.fixture(scope="module")
def chat_tokenizer_dir(tmp_path_factory):
    """A byte-level BPE tokenizer trained on the shipped chat corpus, with ChatML special tokens
    and template, saved and loaded back (the real loading path)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    texts = [m["content"] for r in _rows(300, short=False) for m in r["messages"]]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(
        texts,
        trainer=trainers.BpeTrainer(
            vocab_size=400,
            special_tokens=["<pad>", "<|im_start|>", "<|im_end|>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        ),
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="<|im_end|>", bos_token="<|im_start|>"
    )
    fast.chat_template = CHATML
    path = tmp_path_factory.mktemp("chat-tokenizer")
    fast.save_pretrained(path)
    assert AutoTokenizer.from_pretrained(path).chat_template == CHATML
    return str(path)


@pytest.fixture(scope="module")
def chat_tokenizer(chat_tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(chat_tokenizer_dir)


@pytest.fixture(scope="module")
def plain_tokenizer(chat_tokenizer_dir, tmp_path_factory):
    """The same tokenizer without a chat template."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(chat_tokenizer_dir)
    tok.chat_template = None
    path = tmp_path_factory.mktemp("plain-tokenizer")
    tok.save_pretrained(path)
    return AutoTokenizer.from_pretrained(path)


def _args(**kw):
    return DataArguments(task="causal-lm", train_file="-", max_source_length=512, **kw)


def _expected(tokenizer, text: str, spans: list[tuple[int, int]]):
    """Ids and labels of ``text`` from the tokenizer's character offsets: a token is learned when
    it starts inside one of ``spans``."""
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    labels = [
        t if any(a <= start < b for a, b in spans) else IGNORE_INDEX
        for t, (start, _) in zip(enc["input_ids"], enc["offset_mapping"])
    ]
    return enc["input_ids"], labels, enc["offset_mapping"]


def _chatml_spans(text: str, messages) -> list[tuple[int, int]]:
    """Each assistant turn in a ChatML rendering: from its content to the next turn's start."""
    spans, cursor = [], 0
    for m in messages:
        at = text.index(m["content"], cursor)
        cursor = at + len(m["content"])
        if m["role"] == "assistant":
            end = text.find("<|im_start|>", cursor)
            spans.append((at, len(text) if end < 0 else end))
    return spans


def test_chat_labels_mask_every_non_assistant_token(chat_tokenizer):
    ds = datasets.Dataset.from_list([{"messages": CONVERSATION}])
    row = tokenize(ds, chat_tokenizer, _args())[0]
    text = chat_tokenizer.apply_chat_template(CONVERSATION, tokenize=False)
    spans = _chatml_spans(text, CONVERSATION)
    ids, labels, offsets = _expected(chat_tokenizer, text, spans)
    assert row["input_ids"] == ids
    assert row["labels"] == labels
    learned = chat_tokenizer.decode([t for t in labels if t != IGNORE_INDEX])
    assert learned == "bibliothèque de traitement d'images<|im_end|>\noutils graphiques<|im_end|>\n"
    masked = chat_tokenizer.decode([t for t, lab in zip(ids, labels) if lab == IGNORE_INDEX])
    for m in CONVERSATION:  # every system / user turn and role marker is masked
        assert (m["content"] in masked) == (m["role"] != "assistant")
    assert masked.count("<|im_start|>assistant\n") == 2
    # the prompt of on-policy KD: every token before the last assistant turn's content
    assert row[PROMPT_LENGTH] == sum(start < spans[-1][0] for start, _ in offsets)
    assert chat_tokenizer.decode(ids[: row[PROMPT_LENGTH]]).endswith("<|im_start|>assistant\n")


def test_prompt_completion_labels_the_completion_only(chat_tokenizer):
    prompt, completion = "Résume : bibliothèque partagée.\nRésumé :", " bibliothèque partagée"
    ds = datasets.Dataset.from_list([{"prompt": prompt, "completion": completion}])
    row = tokenize(ds, chat_tokenizer, _args())[0]
    ids, labels, _ = _expected(chat_tokenizer, prompt + completion, [(len(prompt), 10**6)])
    eos = chat_tokenizer.eos_token_id
    assert row["input_ids"] == ids + [eos]  # EOS ends the completion: the student learns to stop
    assert row["labels"] == labels + [eos]
    assert row[PROMPT_LENGTH] == labels.index(next(t for t in labels if t != IGNORE_INDEX))
    # as messages: the prompt's turns then the completion's, the completion's learned
    listed = datasets.Dataset.from_list(
        [{"prompt": CONVERSATION[:4], "completion": CONVERSATION[4:]}]
    )
    as_chat = tokenize(listed, chat_tokenizer, _args())[0]
    text = chat_tokenizer.apply_chat_template(CONVERSATION, tokenize=False)
    assert (
        as_chat["labels"] == _expected(chat_tokenizer, text, _chatml_spans(text, CONVERSATION))[1]
    )


def test_template_file_renders_rows_of_a_tokenizer_without_one(plain_tokenizer, tmp_path):
    ds = datasets.Dataset.from_list([{"messages": CONVERSATION}])
    with pytest.raises(LmkdError, match="has no chat template") as e:
        tokenize(ds, plain_tokenizer, _args())
    assert "\n" not in str(e.value) and "--chat-template" in str(e.value)
    template = (
        "{% for m in messages %}### {{ m['role'] }}\n{{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}### assistant\n{% endif %}"
    )
    path = tmp_path / "template.jinja"
    path.write_text(template)
    row = tokenize(ds, plain_tokenizer, _args(chat_template=str(path)))[0]
    text = plain_tokenizer.apply_chat_template(CONVERSATION, chat_template=template, tokenize=False)
    spans, cursor = [], 0  # each assistant turn: its content to the next "### " (or the end)
    for m in CONVERSATION:
        at = text.index(m["content"], cursor)
        cursor = at + len(m["content"])
        if m["role"] == "assistant":
            end = text.find("### ", cursor)
            spans.append((at, len(text) if end < 0 else end))
    ids, labels, _ = _expected(plain_tokenizer, text, spans)
    assert (row["input_ids"], row["labels"]) == (ids, labels)
    with pytest.raises(LmkdError, match="no file"):
        _args(chat_template=str(tmp_path / "missing.jinja"))


def test_unstable_template_and_rows_without_an_answer_are_refused(chat_tokenizer, tmp_path):
    # the rendering starts with the number of turns: a prefix of the conversation renders otherwise
    path = tmp_path / "counting.jinja"
    path.write_text("{{ messages | length }} turns\n" + CHATML)
    ds = datasets.Dataset.from_list([{"messages": CONVERSATION}])
    with pytest.raises(chat.TemplateNotPrefixStable, match="not prefix-stable") as e:
        tokenize(ds, chat_tokenizer, _args(chat_template=str(path)))
    assert "\n" not in str(e.value)
    no_answer = datasets.Dataset.from_list([{"messages": CONVERSATION[:2]}])
    with pytest.raises(LmkdError, match="no assistant turn"):
        tokenize(no_answer, chat_tokenizer, _args())


def test_prompt_and_response_for_other_callers(chat_tokenizer):
    prompt, response = chat.prompt_and_response({"messages": CONVERSATION}, chat_tokenizer, _args())
    assert response == CONVERSATION[-1]["content"]
    assert prompt == chat_tokenizer.apply_chat_template(
        CONVERSATION[:-1], tokenize=False, add_generation_prompt=True
    )
    assert chat.prompt_and_response(
        {"prompt": "a", "completion": "b"}, chat_tokenizer, _args()
    ) == (
        "a",
        "b",
    )
    assert chat.row_format(["text", "prompt"], _args()) == chat.TEXT
    assert chat.row_format(["prompt", "completion"], _args()) == chat.PROMPT_COMPLETION


def _models(tokenizer_dir, seeds=(0, 1)):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lmkd.models.scratch import build_model

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    out = []
    for seed, layers in zip(seeds, (2, 1)):
        path = Path(tokenizer_dir).parent / f"gpt2-{seed}"
        build_model("gpt2", len(tok), seed=seed, layers=layers, max_positions=512).save_pretrained(
            path
        )
        tok.save_pretrained(path)
        out.append(str(path))
    return out, [AutoModelForCausalLM.from_pretrained(p) for p in out]


def test_student_learns_assistant_tokens_only_and_teacher_stays_frozen(
    chat_tokenizer, chat_tokenizer_dir, tmp_path
):
    _, (teacher, student) = _models(chat_tokenizer_dir)
    ds = tokenize(datasets.Dataset.from_list(_rows(8)), chat_tokenizer, _args())
    collator = collator_for("causal-lm", chat_tokenizer, student, seed=0)
    args = DistillationConfig(
        output_dir=str(tmp_path / "out"),
        per_device_train_batch_size=4,
        learning_rate=3e-3,
        max_steps=4,
        report_to="none",
        save_strategy="no",
        use_cpu=True,
        kd_alpha=0.4,
        kd_temperature=2.0,
        seed=0,
        disable_tqdm=True,
    )
    trainer = DistillationTrainer(
        model=student,
        args=args,
        teacher_model=teacher,
        train_dataset=ds,
        processing_class=chat_tokenizer,
        data_collator=collator,
    )
    batch = collator([ds[i] for i in range(4)])
    assert PROMPT_LENGTH not in batch and batch["labels"].eq(IGNORE_INDEX).any()
    student.eval()
    with torch.no_grad():
        got = trainer.compute_loss(student, batch)
        s = student(**batch).logits[:, :-1].float()
        t = teacher(**batch).logits[:, :-1].float()
    labels = batch["labels"][:, 1:]
    mask = labels != IGNORE_INDEX  # the assistant tokens (padding and prompts are -100)
    assert 0 < int(mask.sum()) < int(batch["attention_mask"][:, 1:].sum())
    ce = -torch.log_softmax(s[mask], -1).gather(-1, labels[mask][:, None]).mean()
    p_t = torch.log_softmax(t[mask] / 2, -1)
    kd = (p_t.exp() * (p_t - torch.log_softmax(s[mask] / 2, -1))).sum(-1).mean() * 4
    assert torch.allclose(got, 0.6 * ce + 0.4 * kd, rtol=1e-5)

    s0 = {k: v.clone() for k, v in student.state_dict().items()}
    t0 = {k: v.clone() for k, v in teacher.state_dict().items()}
    trainer.train()
    assert any(not torch.equal(v, student.state_dict()[k]) for k, v in s0.items())
    assert all(torch.equal(v, teacher.state_dict()[k]) for k, v in t0.items())


def test_cli_distill_and_evaluate_on_messages(chat_tokenizer, chat_tokenizer_dir, tmp_path, capsys):
    from lmkd.cli import main
    from lmkd.evaluate.fidelity import score_tokens, token_batches

    (teacher, student), _ = _models(chat_tokenizer_dir)
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in _rows(12)))
    common = [
        f"--teacher_model_name_or_path={teacher}",
        "--task=causal-lm",
        f"--train_file={data}",
        "--per_device_train_batch_size=4",
        "--max_steps=2",
        "--report_to=none",
        "--save_strategy=no",
        "--use_cpu=true",
        "--kd_alpha=0.5",
        "--max_source_length=512",
    ]
    out = tmp_path / "out"
    assert (
        main(["distill", f"--student_model_name_or_path={student}", f"--output_dir={out}"] + common)
        == 0
    )
    assert json.loads((out / "distill_results.json").read_text())["train_loss"] > 0
    # on-policy KD: the student continues each row's prompt (before its last assistant turn)
    out2 = tmp_path / "on-policy"
    assert (
        main(
            ["distill", f"--student_model_name_or_path={student}", f"--output_dir={out2}"]
            + common
            + ["--on_policy_fraction=1", "--on_policy_max_new_tokens=4", "--kd_loss=jsd"]
        )
        == 0
    )
    # a tokenizer without a template: one line, exit 2, before any model loads
    import shutil

    from transformers import AutoTokenizer

    plain = tmp_path / "plain-student"
    shutil.copytree(student, plain, ignore=shutil.ignore_patterns("*token*", "*template*"))
    tok = AutoTokenizer.from_pretrained(student)
    tok.chat_template = None
    tok.save_pretrained(plain)
    assert AutoTokenizer.from_pretrained(plain).chat_template is None
    capsys.readouterr()
    assert (
        main(
            ["distill", f"--student_model_name_or_path={plain}", f"--output_dir={tmp_path / 'x'}"]
            + common
        )
        == 2
    )
    err = capsys.readouterr().err.strip()
    assert "has no chat template" in err and len(err.splitlines()) == 1

    # evaluate: perplexity over the assistant tokens only, as computed by hand
    result_path = tmp_path / "eval.json"
    assert (
        main(
            [
                "evaluate",
                "--model",
                str(out),
                "--teacher",
                teacher,
                "--data",
                str(data),
                "--task",
                "causal-lm",
                "--speed-samples",
                "0",
                "--output",
                str(result_path),
                "--max-source-length",
                "512",
            ]
        )
        == 0
    )
    result = json.loads(result_path.read_text())
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out).eval()
    ds = datasets.Dataset.from_list(_rows(12))
    nll, n = 0.0, 0
    for row in ds:
        ids, labels, _ = chat.encode_chat(row["messages"], chat_tokenizer, CHATML)
        with torch.no_grad():
            lp = torch.log_softmax(model(torch.tensor([ids])).logits[0, :-1].float(), -1)
        for pos, label in enumerate(labels[1:]):
            if label != IGNORE_INDEX:
                nll -= float(lp[pos, label])
                n += 1
    assert result["models"]["student"]["fidelity"]["tokens"] == n
    assert result["models"]["student"]["quality"]["perplexity"] == pytest.approx(
        torch.tensor(nll / n).exp().item(), rel=1e-4
    )
    batches = token_batches(ds, chat_tokenizer, _args(), 4)
    assert score_tokens({"m": model}, batches, "causal-lm")["m"]["tokens"] == n


def test_shipped_chat_corpus_tokenises():
    import importlib.util

    script = CORPORA.parents[1] / "benchmarks" / "make_chat_corpus.py"
    spec = importlib.util.spec_from_file_location("make_chat_corpus", script)
    maker = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(maker)  # the script that made the files
    for split, n in maker.LIMITS.items():
        with gzip.open(CORPORA / f"ddtp_fr_chat.{split}.jsonl.gz", "rt", encoding="utf-8") as f:
            rows = [json.loads(line) for line in f]
        assert len(rows) == n
        assert all(r["messages"][-1]["role"] == "assistant" for r in rows)


def test_generate_answers_each_prompt_and_distill_reads_its_conversations(
    chat_tokenizer, chat_tokenizer_dir, tmp_path
):
    from transformers import AutoModelForCausalLM

    from lmkd.cli import main
    from lmkd.teacher.pseudo_target_files import load_generated

    # seed 2: a random teacher whose greedy answers are not blank (seeds 0 and 1 write newlines)
    (teacher, student), _ = _models(chat_tokenizer_dir, seeds=(2, 1))
    rows = _rows(4)
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    out = tmp_path / "generated"
    assert (
        main(
            [
                "generate",
                "--teacher",
                teacher,
                "--data",
                str(data),
                "--output",
                str(out),
                "--num-beams",
                "1",
                "--max-new-tokens",
                "6",
                "--no-progress",
            ]
        )
        == 0
    )
    generated = load_generated(str(out)).to_list()
    model = AutoModelForCausalLM.from_pretrained(teacher).eval()
    for row, got in zip(rows, generated):
        prompt = chat_tokenizer.apply_chat_template(
            row["messages"][:-1], tokenize=False, add_generation_prompt=True
        )
        ids = chat_tokenizer(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            new = model.generate(ids, max_new_tokens=6, do_sample=False, num_beams=1)[
                0, ids.shape[1] :
            ]
        answer = chat_tokenizer.decode(new, skip_special_tokens=True).strip()
        assert answer and got["teacher_target"] == answer
        assert got["teacher_messages"] == row["messages"][:-1] + [
            {"role": "assistant", "content": answer}
        ]
    trained = tmp_path / "seqkd-student"
    assert (
        main(
            [
                "distill",
                f"--student_model_name_or_path={student}",
                f"--output_dir={trained}",
                f"--teacher_model_name_or_path={teacher}",
                "--task=causal-lm",
                f"--train_file={out}",
                "--source_column=teacher_messages",
                "--kd_alpha=0",
                "--max_steps=1",
                "--per_device_train_batch_size=4",
                "--report_to=none",
                "--save_strategy=no",
                "--use_cpu=true",
                "--max_source_length=512",
            ]
        )
        == 0
    )


def test_logit_cache_of_chat_rows_trains_and_cross_tokenizer_is_refused(
    chat_tokenizer_dir, tmp_path, capsys
):
    from lmkd.cli import main
    from lmkd.teacher import logit_cache

    (teacher, student), _ = _models(chat_tokenizer_dir)
    data = tmp_path / "chat.jsonl"
    rows = _rows(8)
    data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    cache = tmp_path / "cache"
    assert (
        main(
            [
                "cache-logits",
                "--teacher",
                teacher,
                "--data",
                str(data),
                "--task",
                "causal-lm",
                "--output",
                str(cache),
                "--top-k",
                "8",
                "--max-source-length",
                "512",
            ]
        )
        == 0
    )
    # every next token of each rendered row is cached (the labels pick the trained ones)
    lengths = [len(chat.encode_chat(r["messages"], _tok(teacher), CHATML)[0]) - 1 for r in rows]
    assert json.loads(capsys.readouterr().out)["positions"] == sum(lengths)
    keys = [
        "distill",
        f"--student_model_name_or_path={student}",
        "--task=causal-lm",
        f"--train_file={data}",
        "--per_device_train_batch_size=4",
        "--max_steps=1",
        "--report_to=none",
        "--save_strategy=no",
        "--use_cpu=true",
        "--kd_alpha=0.5",
        "--max_source_length=512",
    ]
    assert main(keys + [f"--output_dir={tmp_path / 'cached'}", f"--logit_cache={cache}"]) == 0
    assert logit_cache.cache_teacher(str(cache))
    capsys.readouterr()
    assert (
        main(
            keys
            + [
                f"--output_dir={tmp_path / 'cross'}",
                f"--teacher_model_name_or_path={teacher}",
                f"--teacher_tokenizer={teacher}",
                "--kd_loss=uld",
            ]
        )
        == 2
    )
    err = capsys.readouterr().err.strip()
    assert "teacher_tokenizer" in err and "chat" in err and len(err.splitlines()) == 1


def _tok(path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)
