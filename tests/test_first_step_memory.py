"""The first training step of the fused CE+KD loss: the LM-head check runs on a one-row slice, so
no (tokens x vocabulary) tensor exists at step 1 either, and the loss still equals the plain path's."""

import copy

import datasets
import pytest
import torch
from torch.overrides import TorchFunctionMode

from lmkd import DistillationConfig, DistillationTrainer
from lmkd.data import DataArguments, collator_for, tokenize
from lmkd.losses.chunked import Head
from lmkd.objective import PROBE_POSITIONS
from lmkd.scratch import build_model

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
    args = DistillationConfig(output_dir=str(tmp_path / "out"), report_to="none", use_cpu=True, kd_alpha=0.5,
                              save_strategy="no", **kw)
    return DistillationTrainer(model=student, args=args, teacher_model=teacher, processing_class=tokenizer)


def _step(trainer, model, batch):
    model.zero_grad()
    loss = trainer.compute_loss(model, batch)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("arch,task", [("gpt2", "causal-lm"), ("marian", "translation")])
def test_first_step_never_makes_full_logits(tokenizer, corpus, tmp_path, arch, task):
    teacher = build_model(arch, len(tokenizer), seed=1, layers=1, dropout=0.0)
    student = build_model(arch, len(tokenizer), seed=2, layers=1, dropout=0.0)
    student.train()
    rows = sorted(corpus, key=lambda r: -len(r["source"]))[:8]  # the longest rows: N >> PROBE_POSITIONS
    raw = [{"source": r["source"], "target": r["source"]} if task == "translation" else {"text": r["source"]}
           for r in rows]
    ds = tokenize(datasets.Dataset.from_list(raw), tokenizer, DataArguments(task=task, train_file="-"))
    batch = collator_for(task, tokenizer, student)([ds[i] for i in range(len(ds))])
    n_positions = batch["labels"].numel()
    assert n_positions > 4 * PROBE_POSITIONS  # a full (N, V) tensor would stand out

    plain = _trainer(copy.deepcopy(student), teacher, tokenizer, tmp_path, kd_chunk_size=0)
    ref_loss, ref_grads = _step(plain, plain.model, batch)
    with WidestVocabTensor(len(tokenizer)) as seen:  # the plain path does make them: the probe sees them
        _step(plain, plain.model, batch)
    assert seen.rows >= n_positions - len(ds)

    lean = _trainer(student, teacher, tokenizer, tmp_path, kd_chunk_size=CHUNK)
    with WidestVocabTensor(len(tokenizer)) as seen:
        loss, grads = _step(lean, student, batch)  # the first step: both heads are checked here
    assert isinstance(lean.loss_objective.fused_head, Head) and isinstance(lean.loss_objective.teacher_head, Head)
    assert 0 < seen.rows <= max(PROBE_POSITIONS, CHUNK), (seen.rows, n_positions)
    assert torch.allclose(loss, ref_loss, rtol=1e-5), (loss, ref_loss)
    for n in ref_grads:
        assert torch.allclose(grads[n], ref_grads[n], rtol=1e-4, atol=1e-6), n
