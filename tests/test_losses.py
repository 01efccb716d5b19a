"""lmkd.losses against references computed another way, and their limits and numerics."""

import math

import pytest
import torch
import torch.nn.functional as F

from lmkd import losses

torch.manual_seed(0)


def rand_logits(*shape, scale=3.0, dtype=torch.float32):
    return (torch.randn(*shape) * scale).to(dtype)


def test_forward_kl_matches_torch_kl_div():
    s, t = rand_logits(2, 5, 11), rand_logits(2, 5, 11)
    tau = 2.0
    ref = (
        F.kl_div(
            F.log_softmax(s / tau, -1), F.log_softmax(t / tau, -1), reduction="sum", log_target=True
        )
        * tau**2
    )
    assert torch.allclose(losses.forward_kl(s, t, temperature=tau), ref, rtol=1e-5, atol=1e-6)


def test_reverse_kl_is_forward_kl_with_roles_swapped():
    s, t = rand_logits(3, 7, 13), rand_logits(3, 7, 13)
    ref = F.kl_div(F.log_softmax(t, -1), F.log_softmax(s, -1), reduction="sum", log_target=True)
    assert torch.allclose(losses.reverse_kl(s, t), ref, rtol=1e-5)


def test_masking_selects_positions_and_sums():
    s, t = rand_logits(2, 6, 9), rand_logits(2, 6, 9)
    labels = torch.tensor([[1, 2, -100, 3, -100, -100], [4, -100, 5, 6, 7, -100]])
    mask = losses.mask_from_labels(labels)
    per_pos = [
        losses.forward_kl(s[b, i], t[b, i], temperature=1.5)
        for b in range(2)
        for i in range(6)
        if mask[b, i]
    ]
    assert torch.allclose(
        losses.forward_kl(s, t, mask, temperature=1.5), torch.stack(per_pos).sum(), rtol=1e-5
    )


def test_jsd_explicit_formula_and_limits():
    s, t = rand_logits(4, 10), rand_logits(4, 10)
    ps, pt = F.softmax(s, -1), F.softmax(t, -1)
    beta = 0.3
    m = beta * pt + (1 - beta) * ps
    ref = beta * (pt * (pt / m).log()).sum() + (1 - beta) * (ps * (ps / m).log()).sum()
    assert torch.allclose(losses.generalized_jsd(s, t, beta=beta), ref, rtol=1e-5)
    assert torch.equal(losses.generalized_jsd(s, t, beta=0.0), losses.forward_kl(s, t))
    assert torch.equal(losses.generalized_jsd(s, t, beta=1.0), losses.reverse_kl(s, t))
    # beta = 0.5 is the ordinary (symmetric) Jensen-Shannon divergence, bounded by log 2 per row
    js = losses.generalized_jsd(s, t, beta=0.5)
    assert torch.allclose(js, losses.generalized_jsd(t, s, beta=0.5), rtol=1e-5)
    assert js <= 4 * math.log(2) + 1e-6


def test_logit_mse_formula():
    s, t = rand_logits(3, 4, 8), rand_logits(3, 4, 8)
    assert torch.allclose(losses.logit_mse(s, t), ((s - t) ** 2).mean(-1).sum(), rtol=1e-6)


def test_cross_entropy_sum_ignores_minus_100():
    logits = rand_logits(2, 5, 7)
    labels = torch.tensor([[1, 2, -100, 3, 0], [-100, -100, 6, 5, 4]])
    ref = (
        F.cross_entropy(
            logits.reshape(-1, 7), labels.reshape(-1), ignore_index=-100, reduction="mean"
        )
        * 7
    )
    assert torch.allclose(losses.cross_entropy(logits, labels), ref, rtol=1e-5)


@pytest.mark.parametrize("name", losses.KD_LOSSES)
def test_zero_at_identical_logits_and_nonnegative(name):
    s = rand_logits(4, 6, 17)
    assert losses.token_kd_loss(s, s.clone(), loss=name, temperature=2.0).abs() < 1e-5
    t = rand_logits(4, 6, 17)
    assert losses.token_kd_loss(s, t, loss=name, temperature=2.0) > 0


def test_hinton_mix_of_ce_and_kd():
    s, t = rand_logits(2, 4, 9), rand_logits(2, 4, 9)
    labels = torch.tensor([[1, 2, 3, -100], [4, 5, -100, -100]])
    n = 5
    ce = F.cross_entropy(s.reshape(-1, 9), labels.reshape(-1), ignore_index=-100)
    mask = labels != -100
    kd = (
        F.kl_div(
            F.log_softmax(s[mask] / 2, -1),
            F.log_softmax(t[mask] / 2, -1),
            reduction="sum",
            log_target=True,
        )
        * 4
        / n
    )
    got = losses.hinton_loss(s, t, labels, alpha=0.7, temperature=2.0)
    assert torch.allclose(got, 0.3 * ce + 0.7 * kd, rtol=1e-5)


def test_high_temperature_approaches_centered_logit_matching():
    """Hinton 2.1: for tau >> logit scale, tau^2 KL -> (1/2K) ||(z_s - mean) - (z_t - mean)||^2."""
    k = 20
    s, t = rand_logits(k, scale=1.0), rand_logits(k, scale=1.0)
    target = ((s - s.mean()) - (t - t.mean())).pow(2).sum() / (2 * k)
    errs = [
        abs(losses.forward_kl(s.double(), t.double(), temperature=tau).item() - target.item())
        / target.item()
        for tau in (5.0, 50.0, 500.0)
    ]
    assert errs[0] > errs[1] > errs[2]
    assert errs[2] < 1e-2


def test_gradient_at_tau_one_is_cross_entropy_against_teacher_distribution():
    s = rand_logits(5, 12).requires_grad_()
    t = rand_logits(5, 12)
    losses.forward_kl(s, t).backward()
    g_kd = s.grad.clone()
    s.grad = None
    soft_ce = -(F.softmax(t, -1) * F.log_softmax(s, -1)).sum()
    soft_ce.backward()
    assert torch.allclose(g_kd, s.grad, atol=1e-6)
    assert torch.allclose(g_kd, F.softmax(s, -1) - F.softmax(t, -1), atol=1e-6)


@pytest.mark.parametrize("name", losses.KD_LOSSES)
def test_all_masked_gives_zero_loss_and_zero_grad(name):
    s = rand_logits(2, 3, 5).requires_grad_()
    t = rand_logits(2, 3, 5)
    mask = torch.zeros(2, 3, dtype=torch.bool)
    loss = losses.token_kd_loss(s, t, mask, loss=name, temperature=2.0)
    loss.backward()
    assert loss.item() == 0.0
    assert torch.equal(s.grad, torch.zeros_like(s))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", losses.KD_LOSSES)
def test_finite_on_half_precision_and_huge_logits(name, dtype):
    s = rand_logits(3, 50, scale=1e4).clamp(-1e4, 1e4).to(dtype).requires_grad_()
    t = rand_logits(3, 50, scale=1e4).clamp(-1e4, 1e4).to(dtype)
    loss = losses.token_kd_loss(s, t, loss=name, temperature=1.0)
    loss.backward()
    assert torch.isfinite(loss) and loss >= 0
    assert torch.isfinite(s.grad.float()).all()


def test_huge_logits_match_float64_reference():
    s, t = rand_logits(4, 30, scale=1e4), rand_logits(4, 30, scale=1e4)
    ref = F.kl_div(
        F.log_softmax(s.double(), -1),
        F.log_softmax(t.double(), -1),
        reduction="sum",
        log_target=True,
    )
    assert torch.allclose(losses.forward_kl(s, t).double(), ref, rtol=1e-4)


def test_unknown_loss_name():
    with pytest.raises(ValueError, match="unknown KD loss"):
        losses.token_kd_loss(torch.zeros(1, 3), torch.zeros(1, 3), loss="kl2")
