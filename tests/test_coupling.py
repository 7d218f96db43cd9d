"""The reflection maximal coupling (the README's "How it works"): forced outcomes, exact law, maximal acceptance."""

import math

import pytest
import torch
from scipy import stats as sps

from specdiff import acceptance_probability, reflection_coupling

# Significance. The parametrised law test below runs 6 cases x 5 KS tests: each KS test is at
# ALPHA / 30 (Bonferroni), so the family of all 30 is at ALPHA = 1e-3. The acceptance-rate checks
# use Z_SE = 4 standard errors: two-sided level 2(1 - Phi(4)) = 6.3e-5 per case, 3.8e-4 for the
# 6 cases. Seeds are fixed, so every outcome is deterministic.
ALPHA = 1e-3
DIMS, GAPS = [1, 256], [0.3, 1.0, 2.5]
LAW_CASES = len(DIMS) * len(GAPS)
Z_SE = 4.0


def _draw(n, dim, gap, seed, dtype=torch.float64):
    """n rows: draft N(m_D, s²I), target N(m_T, s²I) with ‖m_D - m_T‖ / s = gap."""
    g = torch.Generator().manual_seed(seed)
    std = torch.rand(n, generator=g, dtype=dtype) + 0.5
    mean_t = torch.randn(n, dim, generator=g, dtype=dtype)
    direction = torch.randn(n, dim, generator=g, dtype=dtype)
    direction /= direction.norm(dim=1, keepdim=True)
    mean_d = mean_t + gap * std[:, None] * direction
    z = torch.randn(n, dim, generator=g, dtype=dtype)
    u = torch.rand(n, generator=g, dtype=dtype)
    return mean_d + std[:, None] * z, mean_d, mean_t, std, u, z


def test_equal_means_always_accept_and_return_the_draft_unchanged():
    x_d, m_d, _, std, _, _ = _draw(1000, 16, 0.0, seed=0)
    u = torch.full((1000,), 1 - 1e-12, dtype=torch.float64)  # the least favourable uniforms
    x, accepted = reflection_coupling(x_d, m_d, m_d.clone(), std, u)
    assert accepted.all()
    assert torch.equal(x, x_d)


def test_huge_gap_always_reflects_through_the_bisecting_hyperplane():
    x_d, m_d, m_t, std, u, z = _draw(1000, 16, 1e3, seed=1)
    x, accepted = reflection_coupling(x_d, m_d, m_t, std, u)
    assert not accepted.any()
    e = (m_d - m_t) / (m_d - m_t).norm(dim=1, keepdim=True)
    expected = m_t + std[:, None] * (z - 2 * (e * z).sum(1, keepdim=True) * e)
    torch.testing.assert_close(x, expected)
    # The reflection is an isometry of the noise: ‖x - m_T‖ = ‖x_D - m_D‖.
    torch.testing.assert_close((x - m_t).norm(dim=1), (x_d - m_d).norm(dim=1))


@pytest.mark.parametrize("dim", DIMS)
@pytest.mark.parametrize("gap", GAPS)
def test_output_has_the_target_law_and_acceptance_is_two_phi_minus_half_gap(dim, gap):
    n = 20_000
    x_d, m_d, m_t, std, u, z = _draw(n, dim, gap, seed=10 * dim + int(10 * gap))
    x, accepted = reflection_coupling(x_d, m_d, m_t, std, u, noise=z)

    # Acceptance rate vs 1 - TV = 2Φ(-‖Δ‖/2), within Z_SE standard errors.
    p = 2 * sps.norm.cdf(-gap / 2)
    torch.testing.assert_close(acceptance_probability(m_d, m_t, std), torch.full((n,), p, dtype=torch.float64))
    se = math.sqrt(p * (1 - p) / n)
    assert abs(accepted.double().mean().item() - p) < Z_SE * se

    # Pathwise (not only in law): the decision is log u <= min(0, -<z, Δ> - ½‖Δ‖²), an accepted
    # row keeps the draft bit for bit, a rejected row is the target mean plus σ times the noise
    # reflected through the hyperplane orthogonal to Δ. All recomputed here in float64.
    # (Reflecting every row, accepted or not, keeps the law of x: only these checks catch it.)
    delta = (m_d - m_t) / std[:, None]
    log_r = -(z * delta).sum(1) - 0.5 * delta.square().sum(1)
    assert torch.equal(accepted, torch.log(u) <= log_r.clamp(max=0.0))
    assert 0 < int(accepted.sum()) < n  # both branches are exercised
    assert torch.equal(x[accepted], x_d[accepted])
    e = delta / delta.norm(dim=1, keepdim=True)
    reflected = m_t + std[:, None] * (z - 2 * (e * z).sum(1, keepdim=True) * e)
    torch.testing.assert_close(x[~accepted], reflected[~accepted], rtol=0, atol=1e-12)

    # Law: (x - m_T)/std must be N(0, I): KS on the gap direction and random directions,
    # Bonferroni-corrected, and the squared norm against chi2(dim).
    w = (x - m_t) / std[:, None]
    e = (m_d - m_t) / (m_d - m_t).norm(dim=1, keepdim=True)
    g = torch.Generator().manual_seed(99)
    dirs = torch.randn(4, dim, generator=g, dtype=torch.float64)
    projections = [(w * e).sum(1)] + [w @ (d / d.norm()) for d in dirs]
    p_values = [sps.kstest(pr.numpy(), "norm").pvalue for pr in projections]
    p_values.append(sps.kstest(w.square().sum(1).numpy(), sps.chi2(dim).cdf).pvalue)
    assert min(p_values) > ALPHA / (LAW_CASES * len(p_values)), p_values


def test_reflecting_every_row_keeps_the_law_but_fails_the_pathwise_checks():
    """Negative control for the pathwise checks above: an implementation that returns the
    reflection on every row (correct flags) has the target law, yet breaks x == x_D on acceptance."""
    n, dim, gap = 2000, 4, 1.0
    x_d, m_d, m_t, std, u, z = _draw(n, dim, gap, seed=11)
    _, accepted = reflection_coupling(x_d, m_d, m_t, std, u, noise=z)
    delta = (m_d - m_t) / std[:, None]
    e = delta / delta.norm(dim=1, keepdim=True)
    broken = m_t + std[:, None] * (z - 2 * (e * z).sum(1, keepdim=True) * e)
    assert accepted.any() and not torch.equal(broken[accepted], x_d[accepted])


def test_resampling_instead_of_reflecting_is_biased_and_detected():
    """The classic bug (fresh target draw on rejection) fails the same law test."""
    n, dim, gap = 20_000, 4, 1.0
    x_d, m_d, m_t, std, u, z = _draw(n, dim, gap, seed=5)
    _, accepted = reflection_coupling(x_d, m_d, m_t, std, u, noise=z)
    fresh = m_t + std[:, None] * torch.randn(n, dim, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    broken = torch.where(accepted[:, None], x_d, fresh)
    e = (m_d - m_t) / (m_d - m_t).norm(dim=1, keepdim=True)
    w = ((broken - m_t) / std[:, None] * e).sum(1)
    assert sps.kstest(w.numpy(), "norm").pvalue < ALPHA


def test_float16_inputs_are_coupled_in_float32_and_returned_in_float16():
    x_d, m_d, m_t, std, u, z = _draw(2000, 64, 0.5, seed=7, dtype=torch.float32)
    x16, acc16 = reflection_coupling(x_d.half(), m_d.half(), m_t.half(), std.half(), u, noise=z.half())
    x32, acc32 = reflection_coupling(x_d, m_d, m_t, std, u, noise=z)
    assert x16.dtype == torch.float16 and torch.isfinite(x16).all()
    assert (acc16 == acc32).float().mean() > 0.99  # only borderline u may flip under fp16 inputs
    same = acc16 & acc32
    torch.testing.assert_close(x16[same].float(), x32[same], atol=2e-2, rtol=1e-2)


def test_zero_std_rows_are_deterministic_and_accept_only_equal_means():
    m_t = torch.randn(3, 5, dtype=torch.float64)
    m_d = m_t.clone()
    m_d[1] += 1e-9  # any difference at all must be rejected when the step has no noise
    std = torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64)
    u = torch.full((3,), 0.5, dtype=torch.float64)
    x, accepted = reflection_coupling(m_d + std[:, None] * 0.3, m_d, m_t, std, u)
    assert accepted.tolist() == [True, False, True]
    assert torch.equal(x[:2], m_t[:2])
    assert torch.isfinite(x).all()


def test_gap_below_float_resolution_accepts_without_dividing_by_it():
    x_d, m_d, _, std, u, _ = _draw(100, 8, 0.0, seed=8)
    m_t = m_d + 1e-200
    x, accepted = reflection_coupling(x_d, m_d, m_t, std, torch.full_like(u, 0.999999))
    assert accepted.all() and torch.isfinite(x).all()


def test_std_must_be_one_value_per_row():
    x = torch.zeros(4, 3)
    with pytest.raises(ValueError, match="one value per row"):
        reflection_coupling(x, x, x, torch.ones(4, 3), torch.rand(4))


def test_the_coupling_refuses_a_shared_or_out_of_range_uniform():
    x = torch.zeros(3, 2)
    with pytest.raises(ValueError, match="one independent uniform"):
        reflection_coupling(x, x, x + 0.1, 1.0, torch.tensor(0.5))  # one u for three rows
    with pytest.raises(ValueError, match="one independent uniform"):
        reflection_coupling(x, x, x + 0.1, 1.0, torch.tensor([0.1, 1.5, 0.3]))


@pytest.mark.parametrize("bad", [-0.5, float("nan")])
def test_a_negative_or_nan_std_is_an_error_not_a_deterministic_step(bad):
    """A sign bug in a chain's transition must not pass as sigma = 0 (output m_T, accepted only
    for equal means): the sampler names the problem."""
    from specdiff import speculative_sample
    from specdiff.testing import GaussianMixtureDDPM

    chain = GaussianMixtureDDPM.random(dim=2, num_steps=20)
    transition = chain.transition
    chain.transition = lambda x, step, prediction: (
        transition(x, step, prediction)[0], torch.full((len(x),), bad, dtype=torch.float64)
    )
    # NaN: the drafted states are NaN, so the verify call's NaN check may speak first
    expected = (ValueError, FloatingPointError) if math.isnan(bad) else ValueError
    with pytest.raises(expected, match="negative or NaN std|NaN"):
        speculative_sample(chain, chain.sample_prior(2, torch.Generator().manual_seed(0)), window=4,
                           generator=torch.Generator().manual_seed(1))
    x = torch.zeros(3, 2)  # the public coupling too (the reviewer's case: -1 gave m_T, NaN gave NaN samples)
    with pytest.raises(ValueError, match="negative or NaN"):
        reflection_coupling(x, x, x + 0.1, bad, torch.full((3,), 0.5))
