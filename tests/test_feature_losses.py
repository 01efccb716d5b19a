"""Feature and relation losses against references computed another way (explicit loops over
tokens, heads, pairs and triples), their invariances, and padding that never changes them."""

import math

import pytest
import torch

from lmkd import losses
from lmkd.losses import feature as FL
from lmkd.losses import relation as RL

DT = torch.float64


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=gen(seed), dtype=DT)


def orthogonal(n, seed=0):
    q, r = torch.linalg.qr(rand(n, n, seed=seed))
    return q * torch.sign(torch.diagonal(r))  # a Haar-random orthogonal matrix


def pad_mask():
    # 3 sequences of lengths 5, 3, 1 padded to 5
    return torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 0, 0, 0, 0]], dtype=torch.bool)


def scramble_padding(x, mask, seed=9):
    """``x`` with every padded position replaced by large random values."""
    noise = 100 * torch.randn(x.shape, generator=gen(seed), dtype=x.dtype)
    m = mask.reshape(mask.shape + (1,) * (x.dim() - mask.dim()))
    return torch.where(m, x, noise)


def huber(x):
    x = abs(x)
    return 0.5 * x * x if x < 1 else x - 0.5


# ---- hidden states ----------------------------------------------------------------------------


def test_hidden_mse_and_cosine_match_loops():
    s, t, mask = rand(3, 5, 4, seed=1), rand(3, 5, 4, seed=2), pad_mask()
    mse_ref, cos_ref = 0.0, 0.0
    for b in range(3):
        for i in range(5):
            if not mask[b, i]:
                continue
            u, v = s[b, i].tolist(), t[b, i].tolist()
            mse_ref += sum((a - c) ** 2 for a, c in zip(u, v)) / 4
            dot = sum(a * c for a, c in zip(u, v))
            cos_ref += 1 - dot / (
                math.sqrt(sum(a * a for a in u)) * math.sqrt(sum(c * c for c in v))
            )
    assert FL.hidden_mse(s, t, mask).item() == pytest.approx(mse_ref, rel=1e-12)
    assert FL.hidden_cosine(s, t, mask).item() == pytest.approx(cos_ref, rel=1e-12)
    assert FL.hidden_loss(s, t, mask, loss="cosine").item() == pytest.approx(cos_ref, rel=1e-12)
    # no mask = every position
    assert FL.hidden_mse(s, t).item() == pytest.approx(
        ((s - t) ** 2).mean(-1).sum().item(), rel=1e-12
    )


def test_hidden_losses_ignore_padding_and_cosine_ignores_scale():
    s, t, mask = rand(3, 5, 4, seed=1), rand(3, 5, 4, seed=2), pad_mask()
    for fn in (FL.hidden_mse, FL.hidden_cosine):
        ref = fn(s, t, mask)
        assert (
            fn(scramble_padding(s, mask), scramble_padding(t, mask, seed=3), mask).item()
            == ref.item()
        )
    ref = FL.hidden_cosine(s, t, mask).item()
    assert FL.hidden_cosine(3.7 * s, 0.25 * t, mask).item() == pytest.approx(ref, rel=1e-12)
    assert FL.hidden_cosine(s, 5 * s, mask).item() == pytest.approx(0.0, abs=1e-12)
    assert FL.hidden_mse(s, s, mask).item() == 0.0


def test_hint_loss_is_hidden_loss_of_projected_student():
    torch.manual_seed(0)
    proj = torch.nn.Linear(3, 4).double()
    s, t, mask = rand(3, 5, 3, seed=1), rand(3, 5, 4, seed=2), pad_mask()
    for kind in ("mse", "cosine"):
        with torch.no_grad():
            projected = torch.stack(
                [
                    torch.stack([proj.weight @ s[b, i] + proj.bias for i in range(5)])
                    for b in range(3)
                ]
            )
        ref = FL.hidden_loss(projected, t, mask, loss=kind)
        got = FL.hint_loss(s, t, proj, mask, loss=kind)
        assert got.item() == pytest.approx(ref.item(), rel=1e-12)
    # the projection gets a gradient; unequal sizes without one are refused
    FL.hint_loss(s, t, proj, mask).backward()
    assert proj.weight.grad is not None and proj.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="hidden sizes differ"):
        FL.hint_loss(s, t, None, mask)
    # low-precision hidden states go through a float32 projection
    proj32 = torch.nn.Linear(3, 4)
    with torch.no_grad():
        proj32.weight.copy_(proj.weight), proj32.bias.copy_(proj.bias)
    low = FL.hint_loss(s.bfloat16(), t.bfloat16(), proj32, mask)
    assert low.dtype == torch.float32
    assert low.item() == pytest.approx(FL.hint_loss(s, t, proj, mask).item(), rel=3e-2)


def test_all_masked_gives_zero_with_zero_gradient():
    s = rand(2, 3, 4, seed=1).requires_grad_()
    t = rand(2, 3, 4, seed=2)
    mask = torch.zeros(2, 3, dtype=torch.bool)
    loss = FL.hidden_mse(s, t, mask) + FL.hidden_cosine(s, t, mask)
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(s.grad, torch.zeros_like(s))


def test_low_precision_inputs_are_computed_in_float32():
    s, t = rand(2, 3, 8, seed=1), rand(2, 3, 8, seed=2)
    ref = FL.hidden_mse(s.float(), t.float())
    got = FL.hidden_mse(s.bfloat16(), t.bfloat16())
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(ref.item(), rel=2e-2)


# ---- attention maps ---------------------------------------------------------------------------


def attention_maps(b, h, n, mask, seed, causal=False):
    """Softmax rows over the unpadded (and, if causal, past) keys, like a model's attention."""
    logits = 2 * rand(b, h, n, n, seed=seed)
    allowed = mask[:, None, None, :].expand(b, h, n, n).clone()
    if causal:
        allowed &= torch.ones(n, n, dtype=torch.bool).tril()
    return torch.softmax(logits.masked_fill(~allowed, torch.finfo(DT).min), -1)


def attention_reference(s, t, mask, kind):
    """Loop over batch, query, head, key; heads averaged first when the counts differ."""
    if s.shape[1] != t.shape[1]:
        s, t = s.mean(1, keepdim=True), t.mean(1, keepdim=True)
    total = 0.0
    b, h, n, _ = s.shape
    for i in range(b):
        for q in range(n):
            if not mask[i, q]:
                continue
            per_head = []
            for k in range(h):
                acc = 0.0
                for key in range(n):
                    if not mask[i, key]:
                        continue
                    p, r = t[i, k, q, key].item(), s[i, k, q, key].item()
                    acc += (p * math.log(p / r) if p > 0 else 0.0) if kind == "kl" else (r - p) ** 2
                per_head.append(acc)
            total += sum(per_head) / len(per_head)
    return total


@pytest.mark.parametrize("kind", ["kl", "mse"])
@pytest.mark.parametrize("heads", [(2, 2), (2, 4)], ids=["same-heads", "heads-averaged"])
def test_attention_loss_matches_loops(kind, heads):
    mask = pad_mask()
    s = attention_maps(3, heads[0], 5, mask, seed=1)
    t = attention_maps(3, heads[1], 5, mask, seed=2, causal=True)
    ref = attention_reference(s, t, mask, kind)
    assert FL.attention_loss(s, t, mask, loss=kind).item() == pytest.approx(ref, rel=1e-9)
    assert ref > 0


def test_attention_loss_ignores_padded_rows_and_keys():
    mask = pad_mask()
    s, t = attention_maps(3, 2, 5, mask, seed=1), attention_maps(3, 2, 5, mask, seed=2)
    pad_q = mask[:, None, :, None].expand_as(s)
    pad_k = mask[:, None, None, :].expand_as(s)
    keep = pad_q & pad_k
    junk = torch.rand(s.shape, generator=gen(5), dtype=DT)  # padded rows/columns: any values
    for kind in ("kl", "mse"):
        ref = FL.attention_loss(s, t, mask, loss=kind)
        got = FL.attention_loss(
            torch.where(keep, s, junk), torch.where(keep, t, junk.flip(0)), mask, loss=kind
        )
        assert got.item() == pytest.approx(ref.item(), rel=1e-12)
        assert FL.attention_loss(s, s, mask, loss=kind).item() == pytest.approx(0.0, abs=1e-12)


def test_attention_loss_leaves_out_dropped_student_weights():
    """Post-dropout student maps: the comparison is over the keys the student kept, both rows
    renormalised there -- finite, and 0 when the kept part agrees with the teacher."""
    mask = torch.ones(1, 4, dtype=torch.bool)
    t = attention_maps(1, 1, 4, mask, seed=3)
    keep = torch.tensor([1.0, 0.0, 1.0, 1.0], dtype=DT)
    s = t * keep / 0.9  # dropout with p = 0.1 that dropped key 1 in every row
    assert FL.attention_loss(s, t, mask, loss="kl").item() == pytest.approx(0.0, abs=1e-12)
    s2 = attention_maps(1, 1, 4, mask, seed=4) * keep / 0.9
    got = FL.attention_loss(s2, t, mask, loss="kl").item()
    ref = 0.0
    for q in range(4):
        kept = [k for k in range(4) if keep[k]]
        ps = [t[0, 0, q, k].item() for k in kept]
        rs = [s2[0, 0, q, k].item() for k in kept]
        ps = [p / sum(ps) for p in ps]
        rs = [r / sum(rs) for r in rs]
        ref += sum(p * math.log(p / r) for p, r in zip(ps, rs))
    assert math.isfinite(got) and got == pytest.approx(ref, rel=1e-9)


def test_attention_gradient_is_finite_with_zero_weights():
    mask = pad_mask()
    logits = rand(3, 2, 5, 5, seed=1).requires_grad_()
    allowed = mask[:, None, None, :] & torch.ones(5, 5, dtype=torch.bool).tril()
    s = torch.softmax(logits.masked_fill(~allowed, -1e9), -1)
    t = attention_maps(3, 2, 5, mask, seed=2, causal=True)
    FL.attention_loss(s, t, mask).backward()
    assert torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0


# ---- relations --------------------------------------------------------------------------------


def rkd_reference(s, t):
    n = s.shape[0]

    def dist(x, i, j):
        return math.sqrt(sum((a - b) ** 2 for a, b in zip(x[i].tolist(), x[j].tolist())))

    pairs = [(i, j) for i in range(n) for j in range(n) if i != j]
    mu_s = sum(dist(s, i, j) for i, j in pairs) / len(pairs)
    mu_t = sum(dist(t, i, j) for i, j in pairs) / len(pairs)
    d_loss = sum(huber(dist(s, i, j) / mu_s - dist(t, i, j) / mu_t) for i, j in pairs) / len(pairs)

    def cos_at(x, i, j, k):  # angle at vertex j
        u = [a - b for a, b in zip(x[i].tolist(), x[j].tolist())]
        v = [a - b for a, b in zip(x[k].tolist(), x[j].tolist())]
        return sum(a * b for a, b in zip(u, v)) / (
            math.sqrt(sum(a * a for a in u)) * math.sqrt(sum(b * b for b in v))
        )

    triples = [(i, j, k) for i in range(n) for j in range(n) for k in range(n) if i != j and k != j]
    a_loss = sum(huber(cos_at(s, i, j, k) - cos_at(t, i, j, k)) for i, j, k in triples) / len(
        triples
    )
    return d_loss, a_loss


def sp_reference(s, t):
    n = s.shape[0]

    def gram_rows(x):
        g = [
            [sum(a * b for a, b in zip(x[i].tolist(), x[j].tolist())) for j in range(n)]
            for i in range(n)
        ]
        return [[v / math.sqrt(sum(w * w for w in row)) for v in row] for row in g]

    gs, gt = gram_rows(s), gram_rows(t)
    return sum((gs[i][j] - gt[i][j]) ** 2 for i in range(n) for j in range(n)) / n**2


def test_rkd_and_sp_match_loops():
    s, t = rand(5, 3, seed=1), 0.3 * rand(5, 6, seed=2)  # different feature sizes
    d_ref, a_ref = rkd_reference(s, t)
    assert RL.rkd_distance_loss(s, t).item() == pytest.approx(d_ref, rel=1e-10)
    assert RL.rkd_angle_loss(s, t).item() == pytest.approx(a_ref, rel=1e-10)
    assert RL.rkd_loss(s, t).item() == pytest.approx(d_ref + 2 * a_ref, rel=1e-10)
    assert RL.rkd_loss(s, t, distance_weight=3, angle_weight=0).item() == pytest.approx(
        3 * d_ref, rel=1e-10
    )
    assert RL.sp_loss(s, t).item() == pytest.approx(sp_reference(s, t), rel=1e-10)
    # the Huber loss's linear branch is exercised too (distances far apart)
    far = s.clone()
    far[0] += 50
    d_far, _ = rkd_reference(far, t)
    assert RL.rkd_distance_loss(far, t).item() == pytest.approx(d_far, rel=1e-10)


@pytest.mark.parametrize("kind", ["rkd", "sp"])
@pytest.mark.parametrize("pooling", ["mean", "token"])
def test_relation_losses_are_invariant_to_feature_size_rotation_and_scale(kind, pooling):
    mask = pad_mask()
    s, t = rand(3, 5, 4, seed=1), rand(3, 5, 6, seed=2)
    ref = RL.relation_loss(s, t, mask, loss=kind, pooling=pooling).item()
    assert ref > 1e-3
    # rotated by a random orthogonal matrix
    rotated = s @ orthogonal(4, seed=3)
    # embedded into a larger space by a matrix with orthonormal columns (4 -> 9 features)
    embed = orthogonal(9, seed=4)[:, :4].T  # (4, 9), rows orthonormal
    bigger = s @ embed
    for variant in (rotated, bigger, 2.5 * s):
        got = RL.relation_loss(variant, t, mask, loss=kind, pooling=pooling).item()
        assert got == pytest.approx(ref, rel=1e-9, abs=1e-12)
    # and identical relations give 0 whatever the feature sizes
    assert RL.relation_loss(s, bigger, mask, loss=kind, pooling=pooling).item() == pytest.approx(
        0, abs=1e-10
    )


@pytest.mark.parametrize("kind", ["rkd", "sp"])
def test_relation_loss_reductions_and_padding(kind):
    mask = pad_mask()
    s, t = rand(3, 5, 4, seed=1), rand(3, 5, 6, seed=2)
    fn = RL.rkd_loss if kind == "rkd" else RL.sp_loss
    # mean pooling: the loss among the masked means, times the number of examples
    pooled_s = torch.stack([s[b][mask[b]].mean(0) for b in range(3)])
    pooled_t = torch.stack([t[b][mask[b]].mean(0) for b in range(3)])
    got = RL.relation_loss(s, t, mask, loss=kind, pooling="mean").item()
    assert got == pytest.approx(3 * fn(pooled_s, pooled_t).item(), rel=1e-12)
    # token: the sum over sequences of the loss among each sequence's real tokens
    ref = sum(fn(s[b][mask[b]], t[b][mask[b]]).item() for b in range(3))
    assert RL.relation_loss(s, t, mask, loss=kind, pooling="token").item() == pytest.approx(
        ref, rel=1e-12
    )
    for pooling in ("mean", "token"):
        clean = RL.relation_loss(s, t, mask, loss=kind, pooling=pooling).item()
        noisy = RL.relation_loss(
            scramble_padding(s, mask),
            scramble_padding(t, mask, seed=4),
            mask,
            loss=kind,
            pooling=pooling,
        ).item()
        assert noisy == pytest.approx(clean, rel=1e-12)


def test_relation_gradients_are_finite_for_coinciding_points():
    s = rand(4, 3, seed=1)
    s[1] = s[0]  # two identical examples: distance 0, undefined direction
    s.requires_grad_()
    t = rand(4, 5, seed=2)
    (RL.rkd_loss(s, t) + RL.sp_loss(s, t)).backward()
    assert torch.isfinite(s.grad).all() and s.grad.abs().sum() > 0
    # fewer than two examples: nothing to relate, 0
    assert RL.rkd_loss(s[:1], t[:1]).item() == 0.0


def test_masked_mean_pool():
    mask = pad_mask()
    h = rand(3, 5, 4, seed=1)
    got = FL.masked_mean_pool(h, mask)
    for b in range(3):
        assert torch.allclose(got[b], h[b][mask[b]].mean(0))


def test_losses_module_reexports_feature_losses():
    for module in (FL, RL):
        for name in module.__all__:
            assert getattr(losses, name) is getattr(module, name)
    with pytest.raises(ValueError, match="unknown relation loss"):
        losses.relation_loss(rand(2, 3, 4), rand(2, 3, 4), loss="cka")
    with pytest.raises(ValueError, match="unknown attention loss"):
        losses.attention_loss(rand(1, 1, 2, 2), rand(1, 1, 2, 2), loss="l1")
