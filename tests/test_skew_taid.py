"""Skew KL / skew reverse KL (DistiLLM) and TAID (issue 18): each loss against a numpy reference with
temperature and masking, its limits, its gradient, TAID's schedule, the config's refusals, and a
3-step DistillationTrainer run with each."""

import math

import datasets
import numpy as np
import pytest
import torch

from lmkd import DistillationConfig, DistillationTrainer, LmkdError, losses
from lmkd.data.collators import collator_for
from lmkd.data.dataset import DataArguments
from lmkd.data.tokenizing import tokenize
from lmkd.models.loading import load_model

TAU = 2.0


def _np_softmax(z):
    z = z - z.max(-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(-1, keepdims=True)


def _np_kl(a, b):
    return (a * (np.log(a) - np.log(b))).sum(-1)


def _inputs(seed=0, shape=(3, 5, 11)):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(*shape, generator=g, dtype=torch.float64) * 2
    t = torch.randn(*shape, generator=g, dtype=torch.float64) * 2
    mask = torch.rand(shape[:-1], generator=g) > 0.3
    return s, t, mask


def _reference(name, s, t, mask, tau, alpha=0.1, taid_t=0.5):
    """The summed, tau^2-scaled loss over the masked rows, in numpy float64."""
    sm, tm = s[mask].numpy(), t[mask].numpy()
    q, p = _np_softmax(sm / tau), _np_softmax(tm / tau)
    if name == "skew_kl":
        rows = _np_kl(p, alpha * p + (1 - alpha) * q)
    elif name == "skew_reverse_kl":
        rows = _np_kl(q, (1 - alpha) * p + alpha * q)
    else:  # taid: the target interpolates the logits
        target = _np_softmax(((1 - taid_t) * sm + taid_t * tm) / tau)
        rows = _np_kl(target, q)
    return rows.sum() * tau**2


@pytest.mark.parametrize("alpha", [0.1, 0.5, 0.9])
@pytest.mark.parametrize("name", ["skew_kl", "skew_reverse_kl"])
def test_skew_losses_match_numpy(name, alpha):
    s, t, mask = _inputs()
    got = losses.token_kd_loss(s, t, mask, loss=name, temperature=TAU, skew_alpha=alpha)
    assert got.item() == pytest.approx(_reference(name, s, t, mask, TAU, alpha=alpha), rel=1e-10)
    # positions outside the mask do not count, whatever their logits
    s2 = s.clone()
    s2[~mask] = 1e4
    assert losses.token_kd_loss(
        s2, t, mask, loss=name, temperature=TAU, skew_alpha=alpha
    ).item() == pytest.approx(got.item(), rel=1e-12)


@pytest.mark.parametrize("taid_t", [0.2, 0.4, 0.75])
def test_taid_matches_numpy(taid_t):
    s, t, mask = _inputs(1)
    got = losses.token_kd_loss(s, t, mask, loss="taid", temperature=TAU, taid_t=taid_t)
    assert got.item() == pytest.approx(
        _reference("taid", s, t, mask, TAU, taid_t=taid_t), rel=1e-10
    )


def test_limits():
    s, t, mask = _inputs(2)
    fwd, rev = losses.forward_kl(s, t, mask, TAU), losses.reverse_kl(s, t, mask, TAU)
    # skew 0 is the plain KL: forward for skew_kl, reverse for skew_reverse_kl
    assert losses.skew_kl(s, t, mask, 0.0, TAU).item() == pytest.approx(fwd.item(), rel=1e-12)
    assert losses.skew_reverse_kl(s, t, mask, 0.0, TAU).item() == pytest.approx(
        rev.item(), rel=1e-12
    )
    # ... and continuous there (no special case hides a jump)
    assert losses.skew_kl(s, t, mask, 1e-7, TAU).item() == pytest.approx(fwd.item(), rel=1e-5)
    assert losses.skew_reverse_kl(s, t, mask, 1e-7, TAU).item() == pytest.approx(
        rev.item(), rel=1e-5
    )
    # skew 1: KL of a distribution with itself
    assert losses.skew_kl(s, t, mask, 1.0, TAU).item() == 0.0
    assert losses.skew_kl(s, t, mask, 1 - 1e-9, TAU).item() == pytest.approx(0.0, abs=1e-6)
    # the skewed KL lies between 0 and the plain one (convexity of KL in its second argument)
    assert 0 < losses.skew_kl(s, t, mask, 0.3, TAU).item() < fwd.item()
    # TAID at t = 1 is the forward KL (value and gradient); at t = 0 the student is its own target
    a, b = s.clone().requires_grad_(), s.clone().requires_grad_()
    taid1, f = losses.taid_kl(a, t, mask, 1.0, TAU), losses.forward_kl(b, t, mask, TAU)
    taid1.backward(), f.backward()
    assert taid1.item() == pytest.approx(f.item(), rel=1e-12) and torch.allclose(
        a.grad, b.grad, atol=1e-12
    )
    c = s.clone().requires_grad_()
    zero = losses.taid_kl(c, t, mask, 0.0, TAU)
    zero.backward()
    assert zero.item() == pytest.approx(0.0, abs=1e-12) and c.grad.abs().max() < 1e-12


@pytest.mark.parametrize("name", ["skew_kl", "skew_reverse_kl"])
def test_skew_gradcheck(name):
    s, t, mask = _inputs(3, shape=(2, 3, 5))
    fn = getattr(losses, name)
    assert torch.autograd.gradcheck(
        lambda a, b: fn(a, b, mask, 0.3, TAU), (s.requires_grad_(), t.requires_grad_())
    )


def test_taid_gradients():
    s, t, mask = _inputs(4, shape=(2, 3, 5))
    # the teacher side is differentiable as written (gradcheck); the student's side of the target is
    # detached, so d loss / d z_s = tau * (q - p_t) per masked row (the CE gradient towards a fixed target)
    assert torch.autograd.gradcheck(
        lambda b: losses.taid_kl(s, b, mask, 0.6, TAU), (t.clone().requires_grad_(),)
    )
    z = s.clone().requires_grad_()
    losses.taid_kl(z, t, mask, 0.6, TAU).backward()
    q = torch.softmax(s / TAU, -1)
    target = torch.softmax((0.4 * s + 0.6 * t) / TAU, -1)
    expected = torch.where(mask[..., None], TAU * (q - target), torch.zeros_like(q))
    assert torch.allclose(z.grad, expected, atol=1e-12)


def test_half_precision_and_all_masked():
    s, t, mask = _inputs(5)
    for name in losses.PLAIN_KD_LOSSES:
        half = losses.token_kd_loss(
            s.bfloat16(), t.bfloat16(), mask, loss=name, temperature=TAU, taid_t=0.5
        )
        assert half.dtype == torch.float32 and torch.isfinite(half)
        z = s.clone().requires_grad_()
        none = losses.token_kd_loss(
            z, t, torch.zeros_like(mask), loss=name, temperature=TAU, taid_t=0.5
        )
        none.backward()
        assert none.item() == 0.0 and z.grad.abs().max() == 0


def test_taid_linear_schedule():
    sched = losses.TaidSchedule(0.4, 1.0, adaptive=False)
    assert [sched.at(k, 10) for k in (0, 5, 10, 20)] == pytest.approx([0.4, 0.7, 1.0, 1.0])
    assert sched.at(3, 0) == 0.4  # max_steps unknown: t_start


def test_taid_adaptive_schedule_follows_the_recurrence():
    """Against the recurrence of TAID's Algorithm 1 written out by hand."""
    alpha, beta, n = 0.6, 0.5, 8
    step_losses = [4.0, 3.0, 2.5, 2.4, 2.4, 1.0, 0.9, 0.9]
    sched = losses.TaidSchedule(0.1, 0.9, adaptive=True, alpha=alpha, beta=beta)
    got = []
    for k, loss in enumerate(step_losses):
        got.append(sched.at(k, n))
        (
            sched.observe(loss + 0.5),
            sched.observe(loss - 0.5),
        )  # two micro-batches per step: their mean counts
    t, m, prev, want = 0.1, 0.0, None, [0.1]
    for k in range(1, n):
        loss = step_losses[k - 1]
        grow = 0.0
        if prev is not None:
            m = beta * m + (1 - beta) * (prev - loss) / prev
            grow = alpha * (1 / (1 + math.exp(-m))) * (1 - t)
        t = min(0.9, max(0.1 + 0.8 * k / n, t + grow))
        prev = loss
        want.append(t)
    assert got == pytest.approx(want, rel=1e-12)
    assert all(g >= 0.1 + 0.8 * k / n - 1e-12 for k, g in enumerate(got))  # never behind linear
    assert any(
        g > 0.1 + 0.8 * k / n + 1e-6 for k, g in enumerate(got[2:], 2)
    )  # and ahead of it here


@pytest.mark.parametrize(
    "kw,message",
    [
        (dict(skew_alpha=1.0), "skew_alpha must be in [0, 1)"),
        (dict(skew_alpha=-0.1), "skew_alpha must be in [0, 1)"),
        (dict(taid_t_start=0.8, taid_t_end=0.5), "taid_t_start <= taid_t_end"),
        (dict(taid_schedule="cosine"), "unknown taid_schedule"),
        (dict(taid_beta=1.0), "taid_beta in [0, 1)"),
        (dict(kd_loss="taid", kd_chunk_size=-1), "kd_chunk_size: 0"),
        (dict(kd_loss="skew_kl", kd_chunk_size=256), "kd_chunk_size: 0"),
        (dict(kd_loss="skew_reverse_kl", logit_cache="/nonexistent"), "logit_cache"),
        (
            dict(
                kd_loss="skew",
            ),
            "choose one of forward_kl, reverse_kl, jsd, mse, skew_kl, skew_reverse_kl, taid",
        ),
    ],
)
def test_config_refuses(tmp_path, kw, message):
    with pytest.raises(LmkdError) as e:
        DistillationConfig(output_dir=str(tmp_path), use_cpu=True, **kw)
    assert message in str(e.value) and "\n" not in str(e.value)


def state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def make_dataset(rows, tokenizer):
    raw = [{"source": r["source"], "target": r["target"]} for r in rows]
    return tokenize(
        datasets.Dataset.from_list(raw),
        tokenizer,
        DataArguments(task="translation", train_file="-"),
    )


def _config(tmp_path, **kw):
    base = dict(
        output_dir=str(tmp_path / "out"),
        per_device_train_batch_size=4,
        learning_rate=3e-3,
        max_steps=3,
        report_to="none",
        save_strategy="no",
        logging_steps=1,
        use_cpu=True,
        kd_alpha=0.5,
        kd_temperature=2.0,
        seed=0,
        disable_tqdm=True,
        warmup_steps=0,
    )
    base.update(kw)
    return DistillationConfig(**base)


@pytest.mark.parametrize(
    "name,extra",
    [("skew_kl", {}), ("skew_reverse_kl", {}), ("taid", {"taid_schedule": "linear"}), ("taid", {})],
    ids=["skew_kl", "skew_reverse_kl", "taid-linear", "taid-adaptive"],
)
def test_trainer_three_steps(tiny_model_dir, tokenizer, corpus, tmp_path, name, extra):
    teacher = load_model(tiny_model_dir("marian"), kind="seq2seq")
    # a student of other weights (a make_student copy starts with KD terms of ~1e-6, float32 noise)
    student = load_model(tiny_model_dir("marian", seed=1, layers=2), kind="seq2seq")
    ds = make_dataset(corpus[:12], tokenizer)
    collator = collator_for("translation", tokenizer, student, seed=0)
    args = _config(tmp_path, kd_loss=name, skew_alpha=0.2, taid_t_start=0.3, **extra)
    trainer = DistillationTrainer(
        model=student,
        args=args,
        teacher_model=teacher,
        train_dataset=ds,
        processing_class=tokenizer,
        data_collator=collator,
    )

    # the KD term the trainer computes is the loss of lmkd.losses on the two models' logits, taken apart
    batch = collator([ds[i] for i in range(4)])
    teacher.eval(), student.eval()
    with torch.no_grad():
        got = DistillationTrainer(
            model=student,
            args=_config(
                tmp_path, kd_loss=name, skew_alpha=0.2, kd_alpha=1.0, taid_t_start=0.3, **extra
            ),
            teacher_model=teacher,
            processing_class=tokenizer,
        ).compute_loss(student, batch)
        s, t = student(**batch).logits.double(), teacher(**batch).logits.double()
    mask = batch["labels"] != -100
    want = _reference(name, s, t, mask, 2.0, alpha=0.2, taid_t=0.3) / int(
        mask.sum()
    )  # eval: t = t_start
    assert got.item() == pytest.approx(want, rel=1e-4)

    s0, t0 = state(student), state(teacher)
    trainer.train()
    assert (
        trainer.loss_objective.chunk == 0
    )  # kd_chunk_size auto took the plain path (CPU would be chunked)
    assert any(not torch.equal(v, student.state_dict()[k]) for k, v in s0.items()), (
        "student did not change"
    )
    assert all(torch.equal(v, teacher.state_dict()[k]) for k, v in t0.items()), "teacher changed"
    logged = [h for h in trainer.state.log_history if "loss_kd" in h]
    assert len(logged) == 3 and all(
        math.isfinite(h["loss_kd"]) and h["loss_kd"] > 0 for h in logged
    )
    if name == "taid":
        ts = [h["taid_t"] for h in logged]
        linear = [0.3 + 0.7 * k / 3 for k in range(3)]
        if extra.get("taid_schedule") == "linear":
            assert ts == pytest.approx(linear, abs=1e-6)
        else:  # adaptive: never behind linear
            assert all(a >= b - 1e-6 for a, b in zip(ts, linear)) and ts[0] == pytest.approx(0.3)
    else:
        assert all("taid_t" not in h for h in logged)


# ---- against DistiLLM's own code (github jongwooko/distillm, distillm/losses.py) -------------------


def _distillm_skewed(logits, teacher_logits, labels, lam, reverse):
    """DistiLLM's ``skewed_forward_kl`` / ``skewed_reverse_kl`` (distillm/losses.py, as its finetune.py
    calls them with ``lam=args.skew_alpha``), restated: a mean over the positions whose label is not -100,
    no temperature.  The forward one returns the cross-entropy ``-sum_k p log(lam p + (1 - lam) q)``."""
    p = torch.softmax(teacher_logits.float(), -1)
    q = torch.softmax(logits.float(), -1)
    if reverse:
        mixed = (1 - lam) * p + lam * q
        x = (q * torch.log(mixed) - q * torch.log_softmax(logits.float(), -1)).sum(-1)
    else:
        mixed = lam * p + (1 - lam) * q
        x = (p * torch.log(mixed)).sum(-1)
    mask = (labels != -100).float()
    return -(x * mask).sum() / mask.sum()


@pytest.mark.parametrize("lam", [0.1, 0.5])
@pytest.mark.parametrize("name", ["skew_kl", "skew_reverse_kl"])
def test_skew_losses_against_distillm(name, lam):
    """Ours is DistiLLM's objective: the same gradient, and the same value except that DistiLLM's forward
    skew returns the cross-entropy, which exceeds the KL by the teacher's entropy (a constant of the
    student).  lmkd returns the KL itself, so identical distributions give 0 (the limit the tests use)."""
    g = torch.Generator().manual_seed(3)
    s = (torch.randn(2, 6, 13, generator=g) * 2).requires_grad_(True)
    t = torch.randn(2, 6, 13, generator=g) * 2
    labels = torch.where(torch.rand(2, 6, generator=g) > 0.3, 1, -100)
    mask = labels != -100
    theirs = _distillm_skewed(s, t, labels, lam, reverse=name == "skew_reverse_kl")
    ours = losses.token_kd_loss(s, t, mask, loss=name, temperature=1.0, skew_alpha=lam) / mask.sum()
    p = torch.softmax(t[mask], -1)
    entropy = -(p * torch.log(p)).sum(-1).mean()
    offset = entropy if name == "skew_kl" else 0.0
    assert ours.item() == pytest.approx((theirs - offset).item(), rel=1e-5, abs=1e-6)
    (g_theirs,) = torch.autograd.grad(theirs, s)
    (g_ours,) = torch.autograd.grad(ours, s)
    assert torch.allclose(g_ours, g_theirs, atol=1e-6)
