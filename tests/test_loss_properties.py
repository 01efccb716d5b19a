"""Property tests (hypothesis) over the token losses and their chunked versions: for random
logits of any scale up to 1e4, in float32/float16/bfloat16, under any mask (all-masked included),
every loss is finite and >= 0, its gradient is finite, and the chunked path equals the plain one."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lmkd import losses
from lmkd.losses import chunked

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@st.composite
def cases(draw):
    n = draw(st.integers(1, 6))
    v = draw(st.integers(2, 40))
    scale = draw(st.sampled_from([1e-3, 1.0, 30.0, 1e3, 1e4]))
    seed = draw(st.integers(0, 2**16))
    dtype = draw(st.sampled_from(DTYPES))
    g = torch.Generator().manual_seed(seed)
    s = ((torch.rand(n, v, generator=g) * 2 - 1) * scale).to(dtype)
    t = ((torch.rand(n, v, generator=g) * 2 - 1) * scale).to(dtype)
    mask = torch.rand(n, generator=g) < draw(st.sampled_from([0.0, 0.5, 1.0]))
    loss = draw(st.sampled_from(losses.KD_LOSSES))
    tau = draw(st.sampled_from([0.5, 1.0, 2.0, 8.0]))
    beta = draw(st.sampled_from([0.0, 0.1, 0.5, 0.9, 1.0]))
    return s, t, mask, loss, tau, beta


@settings(max_examples=150, deadline=None)
@given(cases())
def test_losses_finite_nonnegative_with_finite_gradients(case):
    s, t, mask, name, tau, beta = case
    s = s.clone().requires_grad_()
    value = losses.token_kd_loss(s, t, mask, loss=name, temperature=tau, beta=beta)
    value.backward()
    assert torch.isfinite(value) and value >= -1e-4 * max(1.0, float(mask.sum()))
    assert torch.isfinite(s.grad.float()).all()
    if not mask.any():
        assert value.item() == 0.0 and not s.grad.any()


@settings(max_examples=100, deadline=None)
@given(cases())
def test_chunked_equals_plain(case):
    s, t, mask, name, tau, beta = case
    s = s.float()
    t = t.float()
    a = s.clone().requires_grad_()
    b = s.clone().requires_grad_()
    plain = losses.token_kd_loss(a, t, mask, loss=name, temperature=tau, beta=beta)
    fast = chunked.chunked_kd_loss(b, t, mask, loss=name, temperature=tau, beta=beta, chunk_size=2)
    plain.backward()
    fast.backward()
    tol = 1e-4 * max(1.0, plain.abs().item())
    assert abs(plain.item() - fast.item()) <= tol
    assert torch.allclose(
        a.grad, b.grad, atol=1e-5 * max(1.0, a.grad.abs().max().item()), rtol=1e-4
    )
