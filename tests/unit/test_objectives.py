"""passn.objectives: the coverage weight, and every objective as the one weighted CE the step trains
(passn.batches.weighted_loss with the coefficients of DCO, DCOstep, DCOa and Dr. GRPO)."""

import math

import mpmath
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from passn import objectives as obj
from passn.batches import Fixed, OwnCoverage, weighted_loss

budgets = st.integers(min_value=1, max_value=65536)
probs = st.floats(min_value=0.0, max_value=1.0, allow_nan=False)


def exact_F(n: int, p: float) -> float:
    """F(N, p) at 60 digits; p given as a float is taken exactly."""
    mpmath.mp.dps = 60
    p = mpmath.mpf(p)
    log_q = mpmath.log1p(-p) if p < 1 else mpmath.mpf("-inf")
    if p == 1:
        return 1.0 if n == 1 else 0.0
    return float(n * p * mpmath.exp((n - 1) * log_q) / -mpmath.expm1(n * log_q))


# ----------------------------------------------------------------------------------------------
# coverage_weight
# ----------------------------------------------------------------------------------------------


def test_coverage_weight_hand_values():
    # F(2, 1/2) = 2 * 1/2 * 1/2 / (1 - 1/4) = 0.5 / 0.75 = 2/3
    assert obj.coverage_weight(2, 0.5).item() == pytest.approx(2 / 3, rel=1e-15)
    # F(3, 1/2) = 3 * 1/2 * 1/4 / (1 - 1/8) = 0.375 / 0.875 = 3/7
    assert obj.coverage_weight(3, 0.5).item() == pytest.approx(3 / 7, rel=1e-15)
    # F(4, 1/4) = 4 * 1/4 * (3/4)^3 / (1 - (3/4)^4) = (27/64) / (175/256) = 108/175
    assert obj.coverage_weight(4, 0.25).item() == pytest.approx(108 / 175, rel=1e-15)


def test_coverage_weight_matches_math_reference_table():
    # MATH.md section 2: F(64, 0.097) ~ 0.01 and the p where F reaches 0.5 / 0.1 / 0.01 (3 digits).
    assert obj.coverage_weight(64, 0.097).item() == pytest.approx(0.01, abs=5e-4)
    table = {4: (0.328, 0.667, 0.857), 16: (0.080, 0.210, 0.343), 64: (0.0197, 0.0555, 0.097),
             256: (0.0049, 0.0141, 0.025)}
    for n, ps in table.items():
        got = obj.coverage_weight(n, torch.tensor(ps)).tolist()
        for value, target in zip(got, (0.5, 0.1, 0.01)):
            assert value == pytest.approx(target, rel=0.06), (n, ps, got)


def test_coverage_weight_boundaries():
    assert obj.coverage_weight(64, 0.0).item() == 1.0  # F(N, 0) = 1 by definition
    assert obj.coverage_weight(1, 1.0).item() == 1.0  # N = 1 is CE: weight 1 everywhere
    assert obj.coverage_weight(2, 1.0).item() == 0.0  # F(N, 1) = 0 for N > 1
    assert obj.coverage_weight(65536, 1e-300).item() == 1.0


@pytest.mark.parametrize("n", [1, 2, 7, 64, 256, 4096, 65536])
@pytest.mark.parametrize("p", [1e-300, 1e-200, 1e-30, 1e-16, 1e-12, 1e-8, 1e-5, 1e-3, 0.01, 0.1, 0.3, 0.5,
                               0.9, 0.999, 1 - 1e-9, 1 - 1e-16])
def test_coverage_weight_exact_over_whole_range(n, p):
    got = obj.coverage_weight(n, p).item()
    want = exact_F(n, p)
    assert math.isfinite(got)
    if want < 1e-290:  # float64 underflows: zero is the correct rounding
        assert got < 1e-280
    else:
        assert got == pytest.approx(want, rel=1e-12, abs=1e-300)


@pytest.mark.parametrize("n", [1, 4, 64, 65536])
def test_coverage_weight_from_logp_agrees(n):
    p = torch.tensor([1e-300, 1e-20, 1e-6, 0.01, 0.5, 0.99, 1 - 1e-12, 1.0], dtype=torch.float64)
    from_p = obj.coverage_weight(n, p)
    from_logp = obj.coverage_weight_from_logp(n, torch.log(p))
    torch.testing.assert_close(from_logp, from_p, rtol=1e-9, atol=1e-300)


def test_coverage_weight_rejects_bad_inputs():
    with pytest.raises(ValueError, match="budget"):
        obj.coverage_weight(0, 0.5)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        obj.coverage_weight(4, 1.5)
    with pytest.raises(ValueError, match="<= 0"):
        obj.coverage_weight_from_logp(4, torch.tensor([0.1]))


@given(p=probs)
def test_budget_one_is_cross_entropy(p):
    assert obj.coverage_weight(1, p).item() == 1.0


@given(n=budgets)
def test_weight_is_one_at_zero_confidence(n):
    assert obj.coverage_weight(n, 0.0).item() == 1.0


@given(n=st.integers(2, 65536), a=st.floats(1e-12, 1.0), b=st.floats(1e-12, 1.0))
def test_weight_decreases_in_confidence(n, a, b):
    lo, hi = min(a, b), max(a, b)
    f_lo, f_hi = obj.coverage_weight(n, torch.tensor([lo, hi], dtype=torch.float64)).tolist()
    assert f_lo >= f_hi
    assert 0.0 <= f_hi <= f_lo <= 1.0


@given(n=budgets, p=probs)
def test_weight_is_never_nan_or_inf(n, p):
    value = obj.coverage_weight(n, p).item()
    assert math.isfinite(value) and 0.0 <= value <= 1.0


# ----------------------------------------------------------------------------------------------
# log-probs, CE and DCO
# ----------------------------------------------------------------------------------------------


def test_token_logprobs_is_log_softmax_gather():
    torch.manual_seed(0)
    logits = torch.randn(3, 5, 11, dtype=torch.bfloat16)
    targets = torch.randint(0, 11, (3, 5))
    got = obj.token_logprobs(logits, targets)
    assert got.dtype == torch.float32  # bf16 logits are upcast before the softmax
    want = torch.log_softmax(logits.float(), -1).gather(-1, targets[..., None])[..., 0]
    torch.testing.assert_close(got, want)


def test_sequence_logprob_and_ce_respect_the_mask():
    token_logp = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -0.5, -9.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    # row 0: -1 - 2 - 3 = -6; row 1: -0.5 - 0.5 = -1 (the masked -9 is ignored)
    assert obj.sequence_logprob(token_logp, mask).tolist() == [-6.0, -1.0]
    assert obj.ce_loss(token_logp, mask).tolist() == [6.0, 1.0]
    # token mean: 6 / 3 = 2 and 1 / 2 = 0.5
    assert obj.ce_loss(token_logp, mask, "token_mean").tolist() == [2.0, 0.5]
    with pytest.raises(ValueError, match="normalisation"):
        obj.ce_loss(token_logp, mask, "mean")


def test_dco_with_budget_one_equals_ce_exactly():
    torch.manual_seed(1)
    token_logp = torch.log_softmax(torch.randn(4, 6, 9), -1)[..., 0]
    mask = torch.ones(4, 6)
    loss, weight = weighted_loss(token_logp, mask, OwnCoverage(1), 0, "sequence_sum")
    assert torch.equal(weight, torch.ones(4, dtype=torch.float64))
    assert torch.equal(loss, obj.ce_loss(token_logp, mask))
    # and CE's coefficient 1 gives CE itself, bit for bit
    assert torch.equal(weighted_loss(token_logp, mask, Fixed((1.0,) * 4), 0, "sequence_sum")[0], loss)


def test_dco_weight_uses_the_sequence_confidence():
    token_logp = torch.log(torch.tensor([[0.5, 0.5], [0.9, 1.0]], dtype=torch.float64))
    mask = torch.ones(2, 2)
    # p = 0.25 and 0.9; F(4, .25) = 108/175 (hand value above)
    _, weight = weighted_loss(token_logp, mask, OwnCoverage(4), 0, "sequence_sum")
    assert weight[0].item() == pytest.approx(108 / 175, rel=1e-12)
    assert weight[1].item() == pytest.approx(exact_F(4, 0.9), rel=1e-9)


def dco_loss_closed_form(seq_logp_B: torch.Tensor, budget: int) -> torch.Tensor:
    """The oracle: l_DCO^N = -log(1 - (1 - p)^N) through autograd (paper Eq. 3; MATH.md 2b),
    as ``-log1mexp(N * log1mexp(s))``; below s = -50 its asymptote -(s + log N), exact in float64."""
    if budget == 1:
        return -seq_logp_B
    s_mid = seq_logp_B.clamp(min=-50.0, max=-1e-300)  # s = 0: the true gradient F(N, 1) = 0
    closed = -obj.log1mexp(budget * obj.log1mexp(s_mid))
    asymptote = -(seq_logp_B.clamp(max=-50.0) + math.log(budget))
    return torch.where(seq_logp_B < -50.0, asymptote, closed)


def _grads(loss_fn, s):
    s = s.clone().requires_grad_(True)
    loss_fn(s).sum().backward()
    return s.grad


@settings(deadline=None, max_examples=500)
@given(n=budgets, s=st.floats(min_value=-400.0, max_value=-1e-12))
def test_both_dco_forms_have_the_same_gradient(n, s):
    seq_logp = torch.tensor([s], dtype=torch.float64)
    # (a) detached weight times CE; (b) the closed form through autograd
    grad_a = _grads(lambda x: obj.coverage_weight_from_logp(n, x.detach()) * -x, seq_logp)
    grad_b = _grads(lambda x: dco_loss_closed_form(x, n), seq_logp)
    weight = obj.coverage_weight_from_logp(n, seq_logp)
    # dl_CE/ds = -1, so both gradients must equal -F(N, p)
    torch.testing.assert_close(grad_a, -weight, rtol=1e-12, atol=1e-300)
    torch.testing.assert_close(grad_b, -weight, rtol=1e-9, atol=1e-250)


def test_closed_form_is_finite_at_the_ends():
    s = torch.tensor([-1e4, -60.0, -1e-300, 0.0], dtype=torch.float64, requires_grad=True)
    loss = dco_loss_closed_form(s, 64)
    loss.sum().backward()
    assert torch.isfinite(loss).all() and torch.isfinite(s.grad).all()
    assert s.grad[0].item() == -1.0  # far from confident: the CE gradient
    assert s.grad[-1].item() == 0.0  # p = 1: F(64, 1) = 0


def test_dco_step_is_per_row_dco():
    token_logp = torch.log(torch.tensor([[0.5], [0.1]], dtype=torch.float64))
    mask = torch.ones(2, 1)
    loss, weight = weighted_loss(token_logp, mask, OwnCoverage(8), 0, "sequence_sum")
    assert weight.tolist() == pytest.approx([exact_F(8, 0.5), exact_F(8, 0.1)], rel=1e-12)
    assert loss.tolist() == pytest.approx([exact_F(8, 0.5) * math.log(2), exact_F(8, 0.1) * math.log(10)])


def test_dcoa_weight_from_monte_carlo_estimate():
    # 6 of 64 samples correct: p_MC = 0.09375; with N' = 64 the weight is just above 0.01
    weight = obj.dcoa_weights(torch.tensor([0, 6, 64]), 64, budget=64)
    assert weight.tolist() == pytest.approx([1.0, exact_F(64, 6 / 64), 0.0], rel=1e-12)
    token_logp = torch.full((3, 2), -0.5, dtype=torch.float64)
    loss, _ = weighted_loss(token_logp, torch.ones(3, 2), Fixed(tuple(weight.tolist())), 0, "sequence_sum")
    assert loss.tolist() == pytest.approx([1.0, exact_F(64, 6 / 64), 0.0], rel=1e-12)  # CE = 1 each
    with pytest.raises(ValueError):
        obj.dcoa_weights(torch.tensor([65]), 64, budget=64)


# ----------------------------------------------------------------------------------------------
# Dr. GRPO
# ----------------------------------------------------------------------------------------------


def test_group_advantages_subtract_the_mean_without_std():
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0], [1.0, 0.0, 0.0, 0.0]])
    # means 0.5 and 0.25
    assert obj.group_advantages(rewards).tolist() == [[0.5, -0.5, -0.5, 0.5], [0.75, -0.25, -0.25, -0.25]]


def test_batch_balancing_skips_uniform_groups():
    rewards = torch.tensor([[1, 1], [0, 1], [0, 0]])
    assert obj.balanced_groups(rewards).tolist() == [False, True, False]


def test_dr_grpo_gradient_is_advantage_over_group_size():
    token_logp = torch.tensor([[-1.0, -2.0], [-3.0, -4.0]], requires_grad=True)
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    # one prompt, G = 2 rollouts with advantages +-0.5: c = A, summed over tokens
    loss_B, _ = weighted_loss(token_logp, mask, Fixed((0.5, -0.5)), 0, "sequence_sum")
    assert loss_B.tolist() == [1.5, -1.5]  # A * -s: 0.5 * 3 and -0.5 * 3 (no length normalisation)
    step_loss = loss_B.sum() / 2  # the step divides by its S = G = 2 sequences: -J with J = (1/G) sum_i A_i s_i
    step_loss.backward()
    assert token_logp.grad.tolist() == [[-0.25, -0.25], [0.25, 0.0]]
