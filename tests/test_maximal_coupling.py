"""The Γ-maximal Gaussian kernel (specdiff/kernels/maximal.py): forced outcomes, acceptance 1 - TV,
the one-step law q, the residual's exact law (equal and unequal std), and the whole sampler.

Significance. Every law check is a KS test; the one-step checks of a test are Bonferroni-corrected
inside the test to family-wise ALPHA = 1e-3; the whole-sampler checks use
:func:`specdiff.testing.two_sample_test` at family-wise ALPHA. Acceptance-rate checks allow Z_SE = 4
standard errors (two-sided 6.3e-5 each). Seeds are fixed: every outcome is deterministic.
"""

import itertools
import math

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler
from scipy import stats as sps
from test_sampler import Shifted  # a deliberately imperfect draft model: the mixture with moved means

from specdiff import SpeculativeScheduler, sample_baseline, speculative_sample
from specdiff.kernels import CategoricalKernel, GaussianKernel, MaximalKernel, kernel_for, maximal
from specdiff.testing import GaussianMixtureDDPM, two_sample_test

ALPHA = 1e-3
Z_SE = 4.0


# -- one step -------------------------------------------------------------------------------------


def _generators(n, seed):
    return lambda: [torch.Generator().manual_seed(seed * 100_003 + i) for i in range(n)]


def couple(m_d, m_t, s_d, s_t, z, u, seed=0):
    """One coupled step per row, as the round runs it: the draft ``m_D + σ_D z`` is kept when
    ``accept`` says so, else ``correct`` (on the rejected rows only) draws the residual."""
    y = m_d + s_d * z
    accepted = MaximalKernel.accept((m_d, s_d), (m_t, s_t), y, z, u)
    x = y.clone()
    rej = (~accepted).nonzero().squeeze(1)
    draws = torch.zeros(len(y), dtype=torch.long)
    if rej.numel():
        fixed, used = MaximalKernel.correct((m_d[rej], s_d[rej]), (m_t[rej], s_t[rej]), y[rej], z[rej],
                                            _generators(len(rej), seed))
        x[rej], draws[rej] = fixed, used
    return x, accepted, draws


def _equal_std_case(n, dim, gap, seed):
    g = torch.Generator().manual_seed(seed)
    std = (torch.rand(n, generator=g, dtype=torch.float64) + 0.5)[:, None]
    m_t = torch.randn(n, dim, generator=g, dtype=torch.float64)
    direction = torch.randn(n, dim, generator=g, dtype=torch.float64)
    m_d = m_t + gap * std * direction / direction.norm(dim=1, keepdim=True)
    z = torch.randn(n, dim, generator=g, dtype=torch.float64)
    u = torch.rand(n, generator=g, dtype=torch.float64)
    return m_d, m_t, std, z, u


def residual_cdf_closed_form(t, gap):
    """CDF of ``(φ(t) - φ(t - gap))+ / TV``, straight from Φ (scipy): ``(Φ(t) - Φ(t - gap)) / TV``
    for ``t < gap/2``, 1 above."""
    tv = sps.norm.cdf(gap / 2) - sps.norm.cdf(-gap / 2)
    return np.where(t < gap / 2, (sps.norm.cdf(t) - sps.norm.cdf(t - gap)) / tv, 1.0)


def test_equal_means_always_accept_and_keep_the_draft():
    m_d, _, std, z, _ = _equal_std_case(1000, 16, 0.0, seed=0)
    u = torch.full((1000,), 1 - 1e-12, dtype=torch.float64)  # the least favourable uniforms
    x, accepted, _ = couple(m_d, m_d.clone(), std, std, z, u)
    assert accepted.all() and torch.equal(x, m_d + std * z)


def test_huge_gap_always_rejects_and_keeps_the_orthogonal_noise():
    m_d, m_t, std, z, u = _equal_std_case(2000, 16, 1e3, seed=1)
    x, accepted, draws = couple(m_d, m_t, std, std, z, u)
    assert not accepted.any() and (draws == 1).all()
    w = (x - m_t) / std
    e = (m_d - m_t) / (m_d - m_t).norm(dim=1, keepdim=True)
    # The orthogonal part of the output is the draft's (pathwise); along e it is a fresh residual
    # draw, which for gap 1000 is N(0, 1) truncated at 500: the target's own law.
    torch.testing.assert_close(w - (w * e).sum(1, keepdim=True) * e, z - (z * e).sum(1, keepdim=True) * e)
    assert sps.kstest((w * e).sum(1).numpy(), "norm").pvalue > ALPHA


@pytest.mark.parametrize("dim, gap", [(1, 0.3), (1, 2.5), (64, 0.3), (64, 1.0), (64, 2.5)])
def test_equal_std_acceptance_law_and_residual(dim, gap):
    n = 12_000
    m_d, m_t, std, z, u = _equal_std_case(n, dim, gap, seed=10 * dim + int(10 * gap))
    x, accepted, _ = couple(m_d, m_t, std, std, z, u)
    p = 2 * sps.norm.cdf(-gap / 2)  # 1 - TV, as for reflection
    assert abs(accepted.double().mean().item() - p) < Z_SE * math.sqrt(p * (1 - p) / n)
    assert torch.equal(x[accepted], (m_d + std * z)[accepted])  # an accepted row is the draft, bit for bit
    w = (x - m_t) / std
    e = (m_d - m_t) / (m_d - m_t).norm(dim=1, keepdim=True)
    # The output is N(m_T, σ²I): along e, along fixed directions orthogonal to e, and ‖w‖² ~ χ²(d).
    p_values = [sps.kstest((w * e).sum(1).numpy(), "norm").pvalue]
    if dim > 1:
        g = torch.Generator().manual_seed(99)
        for _ in range(3):
            d = torch.randn(dim, generator=g, dtype=torch.float64)
            d = d - (e * d).sum(1, keepdim=True) * e  # per row, orthogonal to that row's e
            p_values.append(sps.kstest(((w * d).sum(1) / d.norm(dim=1)).numpy(), "norm").pvalue)
    p_values.append(sps.kstest(w.square().sum(1).numpy(), sps.chi2(dim).cdf).pvalue)
    # The residual alone: t = <w, e> of the rejected rows has the CDF of (φ(t) - φ(t - gap))+ / TV.
    t = (w * e).sum(1)[~accepted].numpy()
    assert len(t) > 1000
    p_values.append(sps.kstest(t, lambda v: residual_cdf_closed_form(v, gap)).pvalue)
    assert min(p_values) > ALPHA / len(p_values), p_values


def test_residual_1d_matches_the_closed_form_cdf_at_every_scale():
    """The inverse-CDF draw is exact where Φ(t) - Φ(t - 2h) cancels (h -> 0: a Rayleigh law) and in
    the far tail (large h): KS of 10 000 draws against the closed form, Bonferroni over 6 gaps; and
    the sampler's own CDF against scipy's."""
    gaps = [2e-8, 2e-4, 0.1, 1.0, 5.0, 40.0]
    p_values = []
    for i, gap in enumerate(gaps):
        u = 1 - torch.rand(10_000, generator=torch.Generator().manual_seed(i), dtype=torch.float64)
        t = maximal.residual_1d(torch.full((10_000,), gap / 2, dtype=torch.float64), u)
        assert torch.isfinite(t).all() and (t <= gap / 2).all()
        p_values.append(sps.kstest(t.numpy(), lambda v, g=gap: residual_cdf_closed_form(v, g)).pvalue)
        if gap >= 1e-3:  # below, the closed form itself cancels (the reason for the series)
            grid = torch.linspace(-6, gap / 2, 50, dtype=torch.float64)
            ours = maximal.residual_cdf(grid, torch.tensor(gap / 2, dtype=torch.float64)).numpy()
            np.testing.assert_allclose(ours, residual_cdf_closed_form(grid.numpy(), gap), rtol=1e-9, atol=1e-12)
    assert min(p_values) > ALPHA / len(gaps), p_values


def test_residual_1d_of_a_row_does_not_depend_on_the_other_rows():
    """Each row's Newton iteration stops on its own: bits alone == bits in a mixed batch (gaps from
    1e-9 to 100, uniforms down to 2**-53 and up to 1)."""
    g = torch.Generator().manual_seed(7)
    h = torch.cat([10 ** (torch.rand(60, generator=g, dtype=torch.float64) * 11 - 9), torch.tensor([1.0, 1.0])])
    u = torch.cat([1 - torch.rand(60, generator=g, dtype=torch.float64), torch.tensor([2.0**-53, 1.0])])
    together = maximal.residual_1d(h, u)
    alone = torch.cat([maximal.residual_1d(h[i : i + 1], u[i : i + 1]) for i in range(len(h))])
    assert torch.equal(together, alone) and torch.isfinite(together).all() and (together <= h).all()


def test_per_element_std_shared_by_draft_and_target_uses_the_one_dimensional_residual():
    """A diagonal covariance shared by both: the whitened decomposition; the law is N(m_T, diag σ²)."""
    n, dim = 20_000, 8
    m_d, m_t, _, z, u = _equal_std_case(n, dim, 1.0, seed=3)
    std = torch.rand(n, dim, generator=torch.Generator().manual_seed(4), dtype=torch.float64) + 0.2
    x, accepted, draws = couple(m_d, m_t, std, std, z, u)
    assert 0 < int(accepted.sum()) < n and (draws[~accepted] == 1).all()
    w = (x - m_t) / std
    p_values = [sps.kstest(w[:, i].numpy(), "norm").pvalue for i in range(dim)]
    p_values.append(sps.kstest(w.square().sum(1).numpy(), sps.chi2(dim).cdf).pvalue)
    assert min(p_values) > ALPHA / len(p_values), p_values


# -- unequal std: the residual by rejection from the target ---------------------------------------


def residual_cdf_1d_unequal(x, m_d, s_d, m_t, s_t):
    """CDF of ``(q - p)+ / TV`` in one dimension, closed form: {q > p} is bounded by the roots of
    log q - log p (a quadratic), and on each interval the mass is a difference of Φ's."""
    a = 0.5 / s_d**2 - 0.5 / s_t**2  # log q - log p = a y² + b y + c
    b = m_t / s_t**2 - m_d / s_d**2
    c = -0.5 * m_t**2 / s_t**2 + 0.5 * m_d**2 / s_d**2 + math.log(s_d / s_t)
    roots = np.roots([a, b, c]) if a != 0 else np.array([-c / b])
    edges = [-np.inf, *sorted(r.real for r in roots if abs(r.imag) < 1e-12), np.inf]
    q, p = sps.norm(m_t, s_t), sps.norm(m_d, s_d)

    def mass(lo, hi):
        return (q.cdf(hi) - q.cdf(lo)) - (p.cdf(hi) - p.cdf(lo))

    positive = []
    for lo, hi in itertools.pairwise(edges):
        mid = hi - 1 if lo == -np.inf else (lo + 1 if hi == np.inf else 0.5 * (lo + hi))
        if q.logpdf(mid) > p.logpdf(mid):
            positive.append((lo, hi))
    tv = sum(mass(lo, hi) for lo, hi in positive)
    x = np.asarray(x, dtype=np.float64)
    total = np.zeros_like(x)
    for lo, hi in positive:
        total += np.where(x > lo, mass(lo, np.minimum(np.maximum(x, lo), hi)), 0.0)
    return total / tv, tv


@pytest.mark.parametrize("m_d, s_d, s_t", [(0.3, 1.0, 1.4), (1.0, 0.5, 0.6), (0.0, 1.3, 1.0)])
def test_unequal_std_one_step_law_acceptance_and_residual_in_one_dimension(m_d, s_d, s_t):
    n, m_t = 20_000, -0.2
    g = torch.Generator().manual_seed(int(100 * (m_d + s_d + s_t)))
    z = torch.randn(n, 1, generator=g, dtype=torch.float64)
    u = torch.rand(n, generator=g, dtype=torch.float64)
    md, mt = torch.full((n, 1), m_d, dtype=torch.float64), torch.full((n, 1), m_t, dtype=torch.float64)
    sd, st = torch.full((n, 1), s_d, dtype=torch.float64), torch.full((n, 1), s_t, dtype=torch.float64)
    x, accepted, draws = couple(md, mt, sd, st, z, u, seed=5)
    _, tv = residual_cdf_1d_unequal(0.0, m_d, s_d, m_t, s_t)
    assert abs(accepted.double().mean().item() - (1 - tv)) < Z_SE * math.sqrt(tv * (1 - tv) / n)
    assert torch.equal(x[accepted], (md + sd * z)[accepted])
    rejected = x[~accepted, 0].numpy()
    assert len(rejected) > 1500 and (draws[~accepted] >= 1).all()
    # Proposals per rejected step: geometric with mean 1/TV (Z_SE standard errors).
    k = draws[~accepted].double()
    assert abs(k.mean().item() - 1 / tv) < Z_SE * math.sqrt((1 - tv) / tv**2 / len(k))
    p_values = [
        sps.kstest(x[:, 0].numpy(), sps.norm(m_t, s_t).cdf).pvalue,  # one step: law q exactly
        sps.kstest(rejected, lambda v: residual_cdf_1d_unequal(v, m_d, s_d, m_t, s_t)[0]).pvalue,  # (q - p)+ / TV
    ]
    assert min(p_values) > ALPHA / len(p_values), p_values


@pytest.mark.parametrize("per", ["row", "element"])
def test_unequal_std_one_step_law_in_several_dimensions(per):
    n, dim = 20_000, 6
    g = torch.Generator().manual_seed(21)
    m_t = torch.randn(n, dim, generator=g, dtype=torch.float64)
    m_d = m_t + 0.3 * torch.randn(n, dim, generator=g, dtype=torch.float64)
    width = dim if per == "element" else 1
    s_t = 0.5 + torch.rand(n, width, generator=g, dtype=torch.float64)
    s_d = s_t * torch.exp(0.2 * torch.randn(n, width, generator=g, dtype=torch.float64))
    z = torch.randn(n, dim, generator=g, dtype=torch.float64)
    u = torch.rand(n, generator=g, dtype=torch.float64)
    x, accepted, _ = couple(m_d, m_t, s_d, s_t, z, u, seed=6)
    assert 2000 < int((~accepted).sum()) < n - 2000
    w = (x - m_t) / s_t
    p_values = [sps.kstest(w[:, i].numpy(), "norm").pvalue for i in range(dim)]
    p_values.append(sps.kstest(w.square().sum(1).numpy(), sps.chi2(dim).cdf).pvalue)
    assert min(p_values) > ALPHA / len(p_values), p_values


def test_a_deterministic_side_is_never_accepted_against_a_random_one():
    m = torch.zeros(4, 3, dtype=torch.float64)
    zero, one = torch.zeros(4, 1, dtype=torch.float64), torch.ones(4, 1, dtype=torch.float64)
    z, u = torch.randn(4, 3, dtype=torch.float64), torch.full((4,), 0.5, dtype=torch.float64)
    x, accepted, _ = couple(m, m + 1.0, zero, one, z, u)  # point-mass draft: the residual is q itself
    assert not accepted.any() and torch.isfinite(x).all()
    x, accepted, _ = couple(m, m + 1.0, one, zero, z, u)  # point-mass target: its mean
    assert not accepted.any() and torch.equal(x, m + 1.0)
    x, accepted, _ = couple(m, m.clone(), zero, zero, z, u)  # both deterministic, same mean
    assert accepted.all()


def test_bad_std_is_a_clear_error():
    m, z, u = torch.zeros(2, 3), torch.zeros(2, 3), torch.full((2,), 0.5, dtype=torch.float64)
    with pytest.raises(ValueError, match="negative or NaN"):
        MaximalKernel.accept((m, torch.full((2, 1), -1.0)), (m, torch.ones(2, 1)), m, z, u)
    # A NaN law (a draft past the first rejection, verified anyway) fails its test; committed, it is an error.
    nan_std = torch.tensor([[1.0], [float("nan")]])
    assert MaximalKernel.accept((m, torch.ones(2, 1)), (m, nan_std), m, z, u).tolist() == [True, False]
    with pytest.raises(ValueError, match="negative or NaN"):
        MaximalKernel.correct((m, torch.ones(2, 1)), (m + 1, nan_std), m, z, _generators(2, 0))
    mixed = torch.tensor([[0.0, 1.0, 1.0], [1.0, 1.0, 1.0]])
    with pytest.raises(ValueError, match="deterministic"):
        MaximalKernel.accept((m, mixed), (m, mixed), m, z, u)


def test_the_rejection_residual_stops_with_an_error_at_its_cap(monkeypatch):
    monkeypatch.setattr(maximal, "MAX_RESIDUAL_PROPOSALS", 16)
    m, s_d, s_t = torch.zeros(1, 2, dtype=torch.float64), torch.ones(1, 1, dtype=torch.float64), None
    s_t = torch.full((1, 1), 1 + 1e-9, dtype=torch.float64)  # TV ~ 1e-9: no proposal survives in 16
    with pytest.raises(RuntimeError, match="MAX_RESIDUAL_PROPOSALS"):
        MaximalKernel.correct((m, s_d), (m, s_t), m, m, _generators(1, 0))


# -- selection ------------------------------------------------------------------------------------


def test_kernel_selection_by_coupling():
    chain, x = GaussianMixtureDDPM.random(dim=2, num_steps=10), torch.zeros(2, 2)
    assert kernel_for(chain, x) is GaussianKernel
    assert kernel_for(chain, x, "reflection") is GaussianKernel
    assert kernel_for(chain, x, "maximal") is MaximalKernel
    with pytest.raises(ValueError, match="coupling must be one of"):
        kernel_for(chain, x, "Reflection")

    # The reflection kernel itself refuses draft and target std that differ, naming the fix.
    m, z, u = torch.zeros(2, 3), torch.zeros(2, 3), torch.full((2,), 0.5, dtype=torch.float64)
    with pytest.raises(ValueError, match="coupling='maximal'"):
        GaussianKernel.accept((m, torch.ones(2, 1)), (m, torch.full((2, 1), 2.0)), m, z, u)
    with pytest.raises(ValueError, match="coupling must be one of"):
        SpeculativeScheduler.from_scheduler(DDPMScheduler(), coupling="gamma")

    class Tokens:
        kernel = CategoricalKernel

    assert kernel_for(Tokens(), torch.zeros(2, 3, dtype=torch.long), "maximal") is CategoricalKernel
    with pytest.raises(ValueError, match="Γ-maximal"):
        kernel_for(Tokens(), torch.zeros(2, 3, dtype=torch.long), "reflection")


# -- the whole sampler on the analytic mixture ----------------------------------------------------

N_SAMPLES, STEPS, MIN_REJECTED = 1200, 50, 1000


class LearnedStd(GaussianMixtureDDPM):
    """The mixture chain with a std that depends on the prediction, per element (a stand-in for a
    learned variance): a valid Markov chain, whose draft and target kernels have different std."""

    kernel = MaximalKernel

    def transition(self, x, step, prediction):
        mean, std = super().transition(x, step, prediction)
        return mean, std.view(-1, *[1] * (x.ndim - 1)) * torch.exp(0.4 * torch.tanh(prediction.to(mean.dtype)))


def prior(chain, n, seed, dtype=torch.float32):
    return chain.sample_prior(n, torch.Generator().manual_seed(seed)).to(dtype)


@pytest.fixture(scope="module")
def mixture():
    return GaussianMixtureDDPM.random(dim=2, components=4, num_steps=STEPS, seed=1)


@pytest.fixture(scope="module")
def short():
    """For the pathwise (bit-for-bit) checks: fewer steps."""
    return GaussianMixtureDDPM.random(dim=2, components=4, num_steps=20, seed=1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_whole_sampler_has_the_plain_law_under_the_maximal_coupling(mixture, dtype):
    x = prior(mixture, N_SAMPLES, 11, dtype)
    reference = sample_baseline(mixture, x, torch.Generator().manual_seed(12))
    out = speculative_sample(mixture, x, window=8, drafter=Shifted(mixture, 0.3), coupling="maximal",
                             generator=torch.Generator().manual_seed(13))
    assert out.sample.dtype == dtype
    result = two_sample_test(out.sample, reference, alpha=ALPHA)
    assert result.passed, str(result)
    rejected = out.stats.proposed - out.stats.accepted
    # one residual draw per rejected random step (the last, deterministic step has none)
    assert rejected >= out.stats.residual_draws >= MIN_REJECTED, out.stats.summary()


def test_the_whole_sampler_law_test_detects_a_fresh_draw_on_rejection(mixture, monkeypatch):
    """Negative control at the same setting: a fresh target draw on rejection (instead of the
    residual) is biased, and the same check must see it."""
    noise = torch.Generator().manual_seed(14)

    def fresh(law_draft, law_target, y, z, generators):
        mean, std = law_target
        x = mean + std * torch.randn(y.shape, generator=noise, dtype=mean.dtype)
        return x.to(y.dtype), torch.ones(len(y), dtype=torch.long)

    monkeypatch.setattr(MaximalKernel, "correct", staticmethod(fresh))
    x = prior(mixture, N_SAMPLES, 11)
    reference = sample_baseline(mixture, x, torch.Generator().manual_seed(12))
    out = speculative_sample(mixture, x, window=8, drafter=Shifted(mixture, 0.3), coupling="maximal",
                             generator=torch.Generator().manual_seed(13))
    assert not two_sample_test(out.sample, reference, alpha=ALPHA).passed


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_whole_sampler_with_unequal_std_has_the_plain_law(mixture, dtype):
    chain = LearnedStd(mixture.means, mixture.scale, mixture.weights, STEPS)
    x = prior(chain, N_SAMPLES, 21, dtype)
    reference = sample_baseline(chain, x, torch.Generator().manual_seed(22))
    out = speculative_sample(chain, x, window=8, drafter=Shifted(chain, 0.3),
                             generator=torch.Generator().manual_seed(23))
    result = two_sample_test(out.sample, reference, alpha=ALPHA)
    assert result.passed, str(result)
    rejected = out.stats.proposed - out.stats.accepted
    assert rejected >= MIN_REJECTED and out.stats.residual_draws >= rejected, out.stats.summary()
    with pytest.raises(ValueError, match="coupling='maximal'"):
        speculative_sample(chain, x, window=8, coupling="reflection")


@pytest.mark.parametrize("coupling", ["reflection", "maximal"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_window_one_is_the_plain_sampler_bit_for_bit(short, coupling, dtype):
    mixture = short
    x = prior(mixture, 64, 31, dtype)
    plain = sample_baseline(mixture, x, torch.Generator().manual_seed(32))
    out = speculative_sample(mixture, x, window=1, coupling=coupling, generator=torch.Generator().manual_seed(32))
    assert torch.equal(out.sample, plain)
    chain = LearnedStd(mixture.means, mixture.scale, mixture.weights, mixture.num_steps)
    plain = sample_baseline(chain, x, torch.Generator().manual_seed(33))
    if coupling == "maximal":
        out = speculative_sample(chain, x, window=1, coupling=coupling, generator=torch.Generator().manual_seed(33))
        assert torch.equal(out.sample, plain)


@pytest.mark.parametrize("learned", [False, True])
def test_a_sample_does_not_depend_on_its_batch(short, learned):
    """Keyed randomness: sample i with its own generator gives the same bits alone and in a batch,
    rejections (and their residual draws) included."""
    mixture = short
    chain = LearnedStd(mixture.means, mixture.scale, mixture.weights, mixture.num_steps) if learned else mixture
    x = prior(chain, 6, 41)
    seeds = [50 + i for i in range(6)]
    batch = speculative_sample(chain, x, window=6, drafter=Shifted(chain, 0.5), coupling="maximal",
                               generator=[torch.Generator().manual_seed(s) for s in seeds])
    assert batch.stats.residual_draws > 0
    for i in (0, 3, 5):
        alone = speculative_sample(chain, x[i : i + 1], window=6, drafter=Shifted(chain, 0.5), coupling="maximal",
                                   generator=[torch.Generator().manual_seed(seeds[i])])
        assert torch.equal(alone.sample[0], batch.sample[i])
