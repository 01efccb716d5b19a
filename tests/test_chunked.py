"""lmkd.losses.chunked: the chunked and fused-linear CE+KD losses give the plain losses' values and
gradients (every divergence, masks incl. all-masked, chunk sizes that do and do not divide N,
head bias / extra bias / logit scale / soft-capping), and DistillationTrainer's default path
equals its plain path."""

import copy

import datasets
import pytest
import torch

from lmkd import DistillationConfig, DistillationTrainer, losses
from lmkd.data.collators import collator_for
from lmkd.data.dataset import DataArguments
from lmkd.data.tokenizing import tokenize
from lmkd.losses.chunked import (
    Head,
    chunked_cross_entropy,
    chunked_distill_loss,
    chunked_kd_loss,
)
from lmkd.losses.fused import fused_linear_distill_loss
from lmkd.losses.topk import TopK, topk_kd_loss
from lmkd.models.scratch import build_model
from lmkd.train.lm_head import PROBE_POSITIONS

B, T, V, H = 3, 7, 13, 6  # N = 21 positions
CHUNKS = [1, 4, 7, 21, 1000]  # 4 does not divide 21, 7 does; 1000 > N


def _data(seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    s = (torch.randn(B, T, V, generator=g) * 3).to(dtype)
    t = (torch.randn(B, T, V, generator=g) * 3).to(dtype)
    mask = torch.rand(B, T, generator=g) > 0.3
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[~mask] = -100
    return s, t, mask, labels


def _grad(fn, x):
    x = x.detach().clone().requires_grad_()
    out = fn(x)
    out.backward()
    return out.detach(), x.grad


MASKS = {"some": lambda m: m, "none": lambda m: None, "all-masked": lambda m: torch.zeros_like(m)}


@pytest.mark.parametrize("loss", losses.KD_LOSSES)
@pytest.mark.parametrize("temperature", [1.0, 2.5])
@pytest.mark.parametrize("mask_kind", list(MASKS))
def test_chunked_kd_equals_plain(loss, temperature, mask_kind):
    s, t, mask, _ = _data()
    mask = MASKS[mask_kind](mask)
    ref, ref_g = _grad(
        lambda x: losses.token_kd_loss(x, t, mask, loss=loss, temperature=temperature, beta=0.3), s
    )
    for cs in CHUNKS:
        got, got_g = _grad(
            lambda x: chunked_kd_loss(
                x, t, mask, loss=loss, temperature=temperature, beta=0.3, chunk_size=cs
            ),
            s,
        )
        assert torch.allclose(got, ref, rtol=1e-5, atol=1e-5), (cs, got, ref)
        assert torch.allclose(got_g, ref_g, rtol=1e-5, atol=1e-6), (cs, (got_g - ref_g).abs().max())
    if mask_kind == "all-masked":
        assert got.item() == 0.0 and torch.count_nonzero(got_g) == 0


@pytest.mark.parametrize("beta", [0.0, 0.1, 0.9, 1.0])
def test_chunked_jsd_betas(beta):
    s, t, mask, _ = _data(1)
    ref, ref_g = _grad(lambda x: losses.generalized_jsd(x, t, mask, beta=beta, temperature=2.0), s)
    got, got_g = _grad(
        lambda x: chunked_kd_loss(x, t, mask, loss="jsd", beta=beta, temperature=2.0, chunk_size=5),
        s,
    )
    assert torch.allclose(got, ref, rtol=1e-5) and torch.allclose(got_g, ref_g, atol=1e-6)


def test_chunked_kd_extreme_logits_and_half_inputs():
    s, t, mask, _ = _data(2)
    s[0, 0, 0], t[0, 1, 3] = 1e4, -1e4
    for dtype in (torch.float32, torch.bfloat16):
        s_, t_ = s.to(dtype), t.to(dtype)
        ref, ref_g = _grad(lambda x: losses.forward_kl(x, t_, mask, temperature=2.0), s_)
        got, got_g = _grad(
            lambda x: chunked_kd_loss(x, t_, mask, temperature=2.0, chunk_size=4), s_
        )
        assert torch.isfinite(got) and got_g.dtype == dtype
        assert torch.allclose(got, ref, rtol=1e-5)
        assert torch.allclose(
            got_g.float(), ref_g.float(), atol=1e-2 if dtype == torch.bfloat16 else 1e-6
        )


@pytest.mark.parametrize("cs", CHUNKS)
def test_chunked_cross_entropy_equals_plain(cs):
    s, _, _, labels = _data(3)
    ref, ref_g = _grad(lambda x: losses.cross_entropy(x, labels), s)
    got, got_g = _grad(lambda x: chunked_cross_entropy(x, labels, chunk_size=cs), s)
    assert torch.allclose(got, ref, rtol=1e-5) and torch.allclose(got_g, ref_g, atol=1e-6)
    all_ignored = torch.full_like(labels, -100)
    got, got_g = _grad(lambda x: chunked_cross_entropy(x, all_ignored, chunk_size=cs), s)
    assert got.item() == 0.0 and torch.count_nonzero(got_g) == 0


def _plain_combined(x, t, labels, mask, w_ce, w_kd, loss, temperature, vocab=None):
    s_kd, t_kd = (x[..., :vocab], t[..., :vocab]) if vocab else (x, t)
    return w_ce * losses.cross_entropy(x, labels) + w_kd * losses.token_kd_loss(
        s_kd, t_kd, mask, loss=loss, temperature=temperature, beta=0.4
    )


@pytest.mark.parametrize("loss", losses.KD_LOSSES)
def test_combined_ce_kd_with_vocab_slicing(loss):
    """The trainer's objective w_ce * CE + w_kd * KD in one pass, KD on the first 10 columns only."""
    s, t, mask, labels = _data(4)
    ref, ref_g = _grad(
        lambda x: _plain_combined(x, t, labels, mask, 0.3, 0.05, loss, 2.0, vocab=10), s
    )
    x = s.clone().requires_grad_()
    got, ce, kd = chunked_distill_loss(
        x,
        t,
        labels,
        mask,
        loss=loss,
        temperature=2.0,
        beta=0.4,
        ce_weight=0.3,
        kd_weight=0.05,
        kd_vocab=10,
        chunk_size=4,
    )
    (got * 2).backward()  # a non-unit upstream gradient is applied
    assert torch.allclose(got, ref, rtol=1e-5)
    assert torch.allclose(x.grad, 2 * ref_g, atol=1e-6)
    assert torch.allclose(ce, losses.cross_entropy(s, labels), rtol=1e-5)
    assert not ce.requires_grad and not kd.requires_grad


HEADS = {
    "plain": dict(),
    "bias": dict(bias=True),
    "extra-bias+scale": dict(bias=True, extra=True, scale=0.0625),
    "softcap": dict(softcap=3.0),
    "all": dict(bias=True, extra=True, scale=1.7, softcap=2.0),
}


@pytest.mark.parametrize("name", list(HEADS))
@pytest.mark.parametrize("loss", losses.KD_LOSSES)
def test_fused_linear_equals_plain(name, loss):
    cfg = HEADS[name]
    g = torch.Generator().manual_seed(5)
    hidden = torch.randn(B, T, H, generator=g)
    weight = torch.randn(V, H, generator=g)
    bias = torch.randn(V, generator=g) if cfg.get("bias") else None
    extra = torch.randn(1, V, generator=g) if cfg.get("extra") else None
    _, t, mask, labels = _data(6)

    def plain(h, w, b):
        head = Head(w, b, extra, cfg.get("scale", 1.0), cfg.get("softcap"))
        return _plain_combined(head.logits(h), t, labels, mask, 0.4, 0.1, loss, 1.5)

    params = [hidden, weight] + ([bias] if bias is not None else [])
    ref_params = [p.clone().requires_grad_() for p in params]
    ref = plain(ref_params[0], ref_params[1], ref_params[2] if bias is not None else None)
    ref.backward()
    for cs in (4, 7, 100):
        ps = [p.clone().requires_grad_() for p in params]
        head = Head(
            ps[1],
            ps[2] if bias is not None else None,
            extra,
            cfg.get("scale", 1.0),
            cfg.get("softcap"),
        )
        got, _, _ = fused_linear_distill_loss(
            ps[0],
            head,
            t,
            labels,
            mask,
            loss=loss,
            temperature=1.5,
            beta=0.4,
            ce_weight=0.4,
            kd_weight=0.1,
            chunk_size=cs,
        )
        got.backward()
        assert torch.allclose(got, ref, rtol=1e-5), (cs, got, ref)
        for p, r in zip(ps, ref_params):
            assert torch.allclose(p.grad, r.grad, rtol=1e-4, atol=1e-5), (
                cs,
                (p.grad - r.grad).abs().max(),
            )


def test_fused_linear_all_masked_gives_zero():
    hidden = torch.randn(B, T, H, requires_grad=True)
    weight = torch.randn(V, H, requires_grad=True)
    _, t, mask, _ = _data(7)
    got, _, _ = fused_linear_distill_loss(
        hidden, Head(weight), t, torch.full((B, T), -100), torch.zeros_like(mask), chunk_size=4
    )
    got.backward()
    assert got.item() == 0.0
    assert torch.count_nonzero(hidden.grad) == 0 and torch.count_nonzero(weight.grad) == 0


def _topk(t, mask, k):
    lp = torch.log_softmax(t[mask].float(), -1)
    top, ids = lp.topk(k, -1)
    tail = torch.logsumexp(lp.scatter(1, ids, float("-inf")), -1)
    return TopK(ids, top, tail)


@pytest.mark.parametrize("loss", ["forward_kl", "reverse_kl", "jsd"])
def test_topk_full_vocab_equals_full_kd_and_chunked_equals_plain(loss):
    s, t, mask, _ = _data(8)
    full = _topk(t, mask, V)
    assert torch.isneginf(full.tail).all()
    ref, ref_g = _grad(
        lambda x: losses.token_kd_loss(x, t, mask, loss=loss, temperature=2.0, beta=0.3), s
    )
    got, got_g = _grad(
        lambda x: topk_kd_loss(x, full, mask, loss=loss, temperature=2.0, beta=0.3), s
    )
    assert torch.allclose(got, ref, rtol=1e-5) and torch.allclose(got_g, ref_g, atol=1e-6)
    for k in (1, 4, V):
        small = _topk(t, mask, k)
        ref, ref_g = _grad(
            lambda x: topk_kd_loss(x, small, mask, loss=loss, temperature=2.0, beta=0.3), s
        )
        for cs in (3, 100):
            got, got_g = _grad(
                lambda x: chunked_kd_loss(
                    x, small, mask, loss=loss, temperature=2.0, beta=0.3, chunk_size=cs
                ),
                s,
            )
            assert torch.allclose(got, ref, rtol=1e-5), (k, cs)
            assert torch.allclose(got_g, ref_g, atol=1e-6), (k, cs, (got_g - ref_g).abs().max())
        if k < V:  # the tail bucket is a real bucket: the loss is not the full one
            assert torch.isfinite(small.tail).all()


def test_topk_loss_is_zero_for_the_teacher_itself():
    _, t, mask, _ = _data(9)
    small = _topk(t, mask, 3)
    assert abs(topk_kd_loss(t, small, mask).item()) < 1e-5
    assert topk_kd_loss(t * 0, small, mask).item() > 0.1


# ---- DistillationTrainer: the default path equals the plain one ------------------------------


def _trainer(student, teacher, tokenizer, tmp_path, **kw):
    args = DistillationConfig(
        output_dir=str(tmp_path / "out"),
        report_to="none",
        use_cpu=True,
        kd_alpha=0.4,
        kd_temperature=2.0,
        save_strategy="no",
        **kw,
    )
    return DistillationTrainer(
        model=student, args=args, teacher_model=teacher, processing_class=tokenizer
    )


def _loss_and_grads(trainer, model, batch):
    model.zero_grad()
    loss = trainer.compute_loss(model, batch)
    loss.backward()
    return loss.detach(), {
        n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None
    }


@pytest.mark.parametrize(
    "arch,task,kd_loss",
    [
        ("gpt2", "causal-lm", "forward_kl"),
        ("marian", "translation", "jsd"),
        ("llama", "causal-lm", "reverse_kl"),
        ("t5", "translation", "mse"),
    ],
)
def test_trainer_default_path_equals_plain(tokenizer, corpus, tmp_path, arch, task, kd_loss):
    teacher = build_model(arch, len(tokenizer), seed=1, layers=2, dropout=0.0)
    student = build_model(arch, len(tokenizer), seed=2, layers=1, dropout=0.0)
    student.train()
    if task == "translation":
        raw = [{"source": r["source"], "target": r["target"]} for r in corpus[:6]]
    else:
        raw = [{"text": r["source"]} for r in corpus[:6]]
    ds = tokenize(
        datasets.Dataset.from_list(raw), tokenizer, DataArguments(task=task, train_file="-")
    )
    batch = collator_for(task, tokenizer, student)([ds[i] for i in range(6)])

    plain = _trainer(
        copy.deepcopy(student), teacher, tokenizer, tmp_path, kd_chunk_size=0, kd_loss=kd_loss
    )
    ref_loss, ref_grads = _loss_and_grads(plain, plain.model, batch)
    lean = _trainer(student, teacher, tokenizer, tmp_path, kd_chunk_size=5, kd_loss=kd_loss)
    for step in ("probe", "fused"):
        loss, grads = _loss_and_grads(lean, student, batch)
        assert torch.allclose(loss, ref_loss, rtol=1e-5), (step, loss, ref_loss)
        assert grads.keys() == ref_grads.keys()
        for n in grads:
            assert torch.allclose(grads[n], ref_grads[n], rtol=1e-4, atol=1e-6), (step, n)
        assert isinstance(lean.loss_objective.fused_head, Head), (
            step
        )  # the check passed: the fused path is on
        assert isinstance(lean.loss_objective.teacher_head, Head), (
            step
        )  # and the teacher's logits come per chunk
    # eval mode: real logits come back (prediction_step needs them), same loss
    student.eval()
    with torch.no_grad():
        loss, out = lean.compute_loss(student, batch, return_outputs=True)
    assert out.logits.stride()[-1] == 1 and out.logits.abs().sum() > 0


def test_trainer_falls_back_when_logits_are_transformed(tokenizer, corpus, tmp_path, caplog):
    """A model that changes its logits after the head (unknown to lmkd) is caught by the first-batch
    check: the chunked path on the real logits is used, with the same loss as the plain path."""
    teacher = build_model("gpt2", len(tokenizer), seed=1, layers=1, dropout=0.0)
    student = build_model("gpt2", len(tokenizer), seed=2, layers=1, dropout=0.0)
    forward = student.forward

    def scaled(*a, **k):
        out = forward(*a, **k)
        out.logits = out.logits * 0.5
        return out

    student.forward = scaled
    student.train()
    ds = tokenize(
        datasets.Dataset.from_list([{"text": r["source"]} for r in corpus[:4]]),
        tokenizer,
        DataArguments(task="causal-lm", train_file="-"),
    )
    batch = collator_for("causal-lm", tokenizer, student)([ds[i] for i in range(4)])
    plain = _trainer(student, teacher, tokenizer, tmp_path, kd_chunk_size=0)
    ref_loss, ref_grads = _loss_and_grads(plain, student, batch)
    lean = _trainer(student, teacher, tokenizer, tmp_path)
    with caplog.at_level("INFO", logger="lmkd.train.objective"):
        for _ in range(2):
            loss, grads = _loss_and_grads(lean, student, batch)
            assert torch.allclose(loss, ref_loss, rtol=1e-5)
            for n in grads:
                assert torch.allclose(grads[n], ref_grads[n], rtol=1e-4, atol=1e-6), n
    assert lean.loss_objective.fused_head is False
    assert sum("fused linear KD loss off" in r.message for r in caplog.records) == 1


@pytest.mark.parametrize("loss", ["forward_kl", "reverse_kl", "jsd"])
def test_topk_when_the_students_tail_underflows(loss):
    """A student so sure of its top tokens that its tail mass is below float32's normal range
    (the chunked path then switches to the exact log-sum-exp for those rows)."""
    s, t, mask, _ = _data(10)
    small = _topk(t, mask, 3)
    s = s.clone()
    s[mask] = s[mask].scatter(1, small.ids, 120.0)  # tail mass ~ V * e^-120 < 1e-30
    ref, ref_g = _grad(lambda x: topk_kd_loss(x, small, mask, loss=loss, beta=0.3), s)
    got, got_g = _grad(
        lambda x: chunked_kd_loss(x, small, mask, loss=loss, beta=0.3, chunk_size=4), s
    )
    assert torch.isfinite(ref) and torch.allclose(got, ref, rtol=1e-5)
    assert torch.allclose(got_g, ref_g, atol=1e-6)


def test_minus_infinity_teacher_logits():
    """A teacher that bans tokens (-inf logits): 0 * log 0 counts as 0 in both paths."""
    s, t, mask, _ = _data(11)
    t[0, :, 3] = float("-inf")
    ref, ref_g = _grad(lambda x: losses.forward_kl(x, t, mask, temperature=2.0), s)
    got, got_g = _grad(lambda x: chunked_kd_loss(x, t, mask, temperature=2.0, chunk_size=4), s)
    assert (
        torch.isfinite(got)
        and torch.allclose(got, ref, rtol=1e-5)
        and torch.allclose(got_g, ref_g, atol=1e-6)
    )


@pytest.mark.parametrize("hidden_weight", [0.0, 1.0])
def test_teacher_forward_at_its_floor(tokenizer, corpus, tmp_path, hidden_weight):
    """One teacher forward per step, without autograd, without a KV cache, and with hidden states only
    when a feature loss needs them; its logits are computed per chunk (never whole)."""
    teacher = build_model("gpt2", len(tokenizer), seed=1, layers=2, dropout=0.0)
    teacher.config.output_hidden_states = (
        True  # a saved config asking for them must not cost anything
    )
    student = build_model("gpt2", len(tokenizer), seed=2, layers=1, dropout=0.0)
    student.train()
    ds = tokenize(
        datasets.Dataset.from_list([{"text": r["source"]} for r in corpus[:4]]),
        tokenizer,
        DataArguments(task="causal-lm", train_file="-"),
    )
    batch = collator_for("causal-lm", tokenizer, student)([ds[i] for i in range(4)])
    trainer = _trainer(
        student, teacher, tokenizer, tmp_path, hidden_weight=hidden_weight, layer_map="-1:-1"
    )
    seen = []
    forward = teacher.forward

    def spy(*a, **k):
        out = forward(*a, **k)
        seen.append(
            (
                torch.is_grad_enabled(),
                out.hidden_states is not None,
                out.past_key_values is not None,
                tuple(out.logits.shape),
            )
        )
        return out

    teacher.forward = spy
    for _ in range(
        2
    ):  # the first step checks the teacher's head on a slice, then both compute logits per chunk
        trainer.compute_loss(student, batch).backward()
    assert len(seen) == 3
    assert all(not grad and not cache for grad, _, cache, _ in seen)
    assert all(hidden == (hidden_weight > 0) for _, hidden, _, _ in seen)
    b, t = batch["input_ids"].shape
    assert seen[0][3] == (
        1,
        min(t, PROBE_POSITIONS),
        len(tokenizer),
    )  # the check: one row, a few positions
    assert (
        seen[1][3] == seen[2][3] == (b, t, 1)
    )  # the training forwards: no (B, T, V) teacher logits


# ---- top-K + sampled tail (cache-logits --tail-samples) ----------------------------------------


def _topk_sampled(t, mask, k, m, seed=0):
    """The top-K of ``t`` plus ``m`` draws per position from its distribution outside the top-K,
    drawn here with torch.multinomial exactly as lmkd.teacher.logit_cache does."""
    from lmkd.teacher.logit_cache_writer import teacher_topk

    class _Teacher:  # what teacher_topk needs of a causal LM: logits of shape (1, N + 1, V)
        def __call__(self, **kw):
            return type(
                "O", (), {"logits": torch.cat([t[mask].float(), t[mask][:1].float()]).unsqueeze(0)}
            )

    n = int(mask.sum())
    batch = {
        "input_ids": torch.zeros(1, n + 1, dtype=torch.long),
        "attention_mask": torch.ones(1, n + 1, dtype=torch.long),
    }
    return TopK(
        *teacher_topk(_Teacher(), "causal", batch, k, m, torch.Generator().manual_seed(seed))
    )


def test_tail_samples_come_from_outside_the_topk_with_their_logprobs():
    _, t, mask, _ = _data(10)
    tk = _topk_sampled(t, mask, 4, 500)
    lp = torch.log_softmax(t[mask].float(), -1)
    assert tk.sample_ids.shape == (int(mask.sum()), 500)
    assert not (tk.sample_ids.unsqueeze(-1) == tk.ids.unsqueeze(1)).any()  # never a top-K id
    assert torch.equal(tk.sample_logprobs, lp.gather(1, tk.sample_ids))
    # frequencies follow the teacher's tail distribution (500 draws: within 0.1 of the probability)
    row = 0
    freq = torch.bincount(tk.sample_ids[row], minlength=V).float() / 500
    p_tail = lp[row].exp().scatter(0, tk.ids[row], 0.0)
    assert (freq - p_tail / p_tail.sum()).abs().max() < 0.1


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_sampled_tail_chunked_equals_plain(temperature):
    s, t, mask, _ = _data(11)
    tk = _topk_sampled(t, mask, 3, 5)
    ref, ref_g = _grad(lambda x: topk_kd_loss(x, tk, mask, temperature=temperature), s)
    for cs in (2, 100):
        got, got_g = _grad(
            lambda x: chunked_kd_loss(x, tk, mask, temperature=temperature, chunk_size=cs), s
        )
        assert torch.allclose(got, ref, rtol=1e-5) and torch.allclose(got_g, ref_g, atol=1e-6), cs
    # and the fused-linear path, logits from hidden states and a head
    g = torch.Generator().manual_seed(12)
    hidden, weight = torch.randn(B, T, H, generator=g), torch.randn(V, H, generator=g)
    ref, ref_g = _grad(
        lambda w: topk_kd_loss(hidden @ w.T, tk, mask, temperature=temperature), weight
    )
    w = weight.clone().requires_grad_()
    got = fused_linear_distill_loss(
        hidden,
        Head(w),
        tk,
        None,
        mask,
        loss="forward_kl",
        temperature=temperature,
        ce_weight=0.0,
        chunk_size=4,
    )[0]
    got.backward()
    assert torch.allclose(got, ref, rtol=1e-5) and torch.allclose(w.grad, ref_g, atol=1e-5)


def test_sampled_tail_gradient_is_unbiased_and_bucket_is_not():
    """At tau = 1 the average gradient over independent tail draws is the full-vocabulary KD
    gradient; the tail bucket's gradient differs from it by a fixed amount (its bias)."""
    s, t, mask, _ = _data(13)
    _, full_g = _grad(lambda x: losses.token_kd_loss(x, t, mask), s)
    _, bucket_g = _grad(lambda x: topk_kd_loss(x, _topk(t, mask, 3), mask), s)
    draws = [
        _grad(lambda x: topk_kd_loss(x, _topk_sampled(t, mask, 3, 4, seed=i), mask), s)[1]
        for i in range(400)
    ]
    mean_g = torch.stack(draws).mean(0)
    sem = torch.stack(draws).std(0) / 400**0.5
    # unbiased: the mean's deviation is the size of its standard error (chi^2 per degree of freedom
    # ~1; a biased estimator gives >> 1) -- tokens of tiny probability may never be drawn, so no
    # per-entry bound
    assert ((mean_g - full_g) ** 2).sum() / (sem**2).sum() < 2.0
    rel = ((mean_g - full_g).norm() / full_g.norm()).item()
    bias = ((bucket_g - full_g).norm() / full_g.norm()).item()
    assert rel < 0.01 and bias > 10 * rel  # the bucket's error is systematic, not noise


def test_sampled_tail_loss_estimates_the_full_kl():
    s, t, mask, _ = _data(14)
    full = losses.token_kd_loss(s, t, mask).item()
    est = [topk_kd_loss(s, _topk_sampled(t, mask, 2, 8, seed=i), mask).item() for i in range(300)]
    mean = sum(est) / len(est)
    sd = (sum((e - mean) ** 2 for e in est) / (len(est) - 1)) ** 0.5
    assert abs(mean - full) < 5 * sd / len(est) ** 0.5 + 1e-4
    bucket = topk_kd_loss(s, _topk(t, mask, 2), mask).item()
    assert (
        bucket < full - 10 * sd / len(est) ** 0.5
    )  # the bucket KL is a lower bound, strictly below here


def test_sampled_tail_falls_back_to_the_bucket_for_other_divergences():
    s, t, mask, _ = _data(15)
    tk = _topk_sampled(t, mask, 3, 6)
    plain = TopK(tk.ids, tk.logprobs, tk.tail)
    for loss in ("reverse_kl", "jsd"):
        a = topk_kd_loss(s, tk, mask, loss=loss, beta=0.3)
        b = topk_kd_loss(s, plain, mask, loss=loss, beta=0.3)
        assert torch.equal(a, b)
