"""The first training step of the fused CE+KD loss: the LM-head check runs on a one-row slice, so
no (tokens x vocabulary) tensor exists at step 1 either, and the loss still equals the plain path's;
and ``kd_chunk_size: auto`` (plain where the full logits fit comfortably, chunked otherwise)."""

import copy

import datasets
import pytest
import torch
from torch.overrides import TorchFunctionMode

from lmkd import DistillationConfig, DistillationTrainer
from lmkd.core.errors import LmkdError
from lmkd.data.collators import collator_for
from lmkd.data.dataset import DataArguments
from lmkd.data.tokenizing import tokenize
from lmkd.losses.chunk_forms import (
    ACCELERATOR_CHUNK_RANGE,
    ACCELERATOR_CHUNK_SHARE,
    CHUNK_TEMPORARIES,
    auto_chunk_size,
)
from lmkd.losses.chunked import Head
from lmkd.models.scratch import build_model
from lmkd.train import objective
from lmkd.train.kd_path import FIT_SHARE, PLAIN_PEAK_LOGITS, choose_kd_path
from lmkd.train.lm_head import PROBE_POSITIONS

CHUNK = 8


class WidestVocabTensor(TorchFunctionMode):
    """Records the most rows of any tensor a torch function returns whose last dimension is ``vocab``."""

    def __init__(self, vocab: int):
        super().__init__()
        self.vocab, self.rows = vocab, 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.dim() >= 1 and t.shape[-1] == self.vocab:
                self.rows = max(self.rows, t.numel() // self.vocab)
        return out


def _trainer(student, teacher, tokenizer, tmp_path, **kw):
    args = DistillationConfig(
        output_dir=str(tmp_path / "out"),
        report_to="none",
        use_cpu=True,
        kd_alpha=0.5,
        save_strategy="no",
        **kw,
    )
    return DistillationTrainer(
        model=student, args=args, teacher_model=teacher, processing_class=tokenizer
    )


def _step(trainer, model, batch):
    model.zero_grad()
    loss = trainer.compute_loss(model, batch)
    loss.backward()
    return loss.detach(), {
        n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None
    }


@pytest.mark.parametrize("arch,task", [("gpt2", "causal-lm"), ("marian", "translation")])
def test_first_step_never_makes_full_logits(tokenizer, corpus, tmp_path, arch, task):
    teacher = build_model(arch, len(tokenizer), seed=1, layers=1, dropout=0.0)
    student = build_model(arch, len(tokenizer), seed=2, layers=1, dropout=0.0)
    student.train()
    rows = sorted(corpus, key=lambda r: -len(r["source"]))[
        :8
    ]  # the longest rows: N >> PROBE_POSITIONS
    raw = [
        {"source": r["source"], "target": r["source"]}
        if task == "translation"
        else {"text": r["source"]}
        for r in rows
    ]
    ds = tokenize(
        datasets.Dataset.from_list(raw), tokenizer, DataArguments(task=task, train_file="-")
    )
    batch = collator_for(task, tokenizer, student)([ds[i] for i in range(len(ds))])
    n_positions = batch["labels"].numel()
    assert n_positions > 4 * PROBE_POSITIONS  # a full (N, V) tensor would stand out

    plain = _trainer(copy.deepcopy(student), teacher, tokenizer, tmp_path, kd_chunk_size=0)
    ref_loss, ref_grads = _step(plain, plain.model, batch)
    with WidestVocabTensor(
        len(tokenizer)
    ) as seen:  # the plain path does make them: the probe sees them
        _step(plain, plain.model, batch)
    assert seen.rows >= n_positions - len(ds)

    lean = _trainer(student, teacher, tokenizer, tmp_path, kd_chunk_size=CHUNK)
    with WidestVocabTensor(len(tokenizer)) as seen:
        loss, grads = _step(lean, student, batch)  # the first step: both heads are checked here
    assert isinstance(lean.loss_objective.fused_head, Head) and isinstance(
        lean.loss_objective.teacher_head, Head
    )
    assert 0 < seen.rows <= max(PROBE_POSITIONS, CHUNK), (seen.rows, n_positions)
    assert torch.allclose(loss, ref_loss, rtol=1e-5), (loss, ref_loss)
    for n in ref_grads:
        assert torch.allclose(grads[n], ref_grads[n], rtol=1e-4, atol=1e-6), n


# ---- kd_chunk_size: auto -------------------------------------------------------------------------


def test_auto_path_plain_only_when_the_full_logits_fit_comfortably():
    n, v = 2048, 128_000
    need = PLAIN_PEAK_LOGITS * n * v * 4  # bytes of the plain path's peak, ~12.6 GB here
    assert choose_kd_path(n, v, "cuda", free_bytes=int(need / FIT_SHARE))[0] == 0
    chunk, line = choose_kd_path(n, v, "cuda", free_bytes=int(need / FIT_SHARE) - 1)
    assert chunk == -1 and line.startswith("kd path: chunked")
    chunk, line = choose_kd_path(1024, 32_000, "cuda", free_bytes=140 * 2**30)
    assert chunk == 0 and line == "kd path: plain (full logits 1.5 GB of 140.0 GB free)"
    # on CPU the chunked/fused loss is the faster one too: chunked whatever the free memory
    assert choose_kd_path(8, 100, "cpu", free_bytes=2**40)[0] == -1


@pytest.mark.parametrize("free_gb,expected", [(1000.0, 0), (0.001, -1)])
def test_auto_choice_is_made_once_and_gives_the_same_loss(
    tokenizer, corpus, tmp_path, monkeypatch, caplog, free_gb, expected
):
    teacher = build_model("gpt2", len(tokenizer), seed=1, layers=1, dropout=0.0)
    student = build_model("gpt2", len(tokenizer), seed=2, layers=1, dropout=0.0)
    student.train()
    ds = tokenize(
        datasets.Dataset.from_list([{"text": r["source"]} for r in corpus[:6]]),
        tokenizer,
        DataArguments(task="causal-lm", train_file="-"),
    )
    batch = collator_for("causal-lm", tokenizer, student)([ds[i] for i in range(6)])
    plain = _trainer(copy.deepcopy(student), teacher, tokenizer, tmp_path, kd_chunk_size=0)
    ref_loss, ref_grads = _step(plain, plain.model, batch)

    # as on a GPU with free_gb free (the device is faked, the batch still runs on CPU)
    calls = []

    def on_gpu(positions, vocab, device, free_bytes=None):
        calls.append((positions, vocab))
        return choose_kd_path(positions, vocab, "cuda", free_bytes=int(free_gb * 2**30))

    monkeypatch.setattr(objective, "choose_kd_path", on_gpu)
    auto = _trainer(student, teacher, tokenizer, tmp_path)
    assert auto.args.kd_chunk_size == "auto"  # the default
    with caplog.at_level("INFO", logger="lmkd.train.objective"):
        for _ in range(2):
            loss, grads = _step(auto, student, batch)
            assert torch.allclose(loss, ref_loss, rtol=1e-5), (loss, ref_loss)
            for n in ref_grads:
                assert torch.allclose(grads[n], ref_grads[n], rtol=1e-4, atol=1e-6), n
    assert calls == [(batch["labels"].numel(), len(tokenizer))]
    assert auto.loss_objective.chunk == expected
    assert sum(r.message.startswith("kd path: ") for r in caplog.records) == 1
    # the fused head is only checked (and used) on the chunked path
    assert (auto.loss_objective.fused_head is None) == (expected == 0)


@pytest.mark.parametrize(
    "given,kept", [("auto", "auto"), ("AUTO", "auto"), ("-1", -1), (0, 0), ("64", 64)]
)
def test_kd_chunk_size_values(tmp_path, given, kept):
    assert DistillationConfig(output_dir=str(tmp_path), kd_chunk_size=given).kd_chunk_size == kept


@pytest.mark.parametrize("bad", ["-2", "big", 1.5, -3])
def test_kd_chunk_size_bad_values(tmp_path, bad):
    with pytest.raises(LmkdError, match="kd_chunk_size must be auto, -1"):
        DistillationConfig(output_dir=str(tmp_path), kd_chunk_size=bad)


def test_accelerator_chunks_are_sized_to_free_memory():
    v = 128_000
    free = 120 * 2**30  # an H200's free memory, injected (no GPU needed)
    per_chunk = int(free * ACCELERATOR_CHUNK_SHARE) // (
        4 * CHUNK_TEMPORARIES
    )  # logits per chunk, ~107M
    assert (
        auto_chunk_size(v, None, "cuda", free_bytes=free) == per_chunk // v == 838
    )  # 5 chunks at N = 4096
    lo, hi = ACCELERATOR_CHUNK_RANGE
    assert auto_chunk_size(v, None, "cuda", free_bytes=10**15) == hi // v
    assert auto_chunk_size(v, None, "cuda", free_bytes=1) == lo // v
    assert auto_chunk_size(v, 100, "cuda", free_bytes=free) == 100  # a given size wins
    assert (
        auto_chunk_size(v, None, "cpu") == (1 << 20) // v
    )  # CPU: unchanged (measured fastest there)
