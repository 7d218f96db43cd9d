"""ASD, autospeculative decoding (Hu, Das, Sadigh, Anari, "Diffusion Models are Secretly
Exchangeable: Parallelizing DDPMs via Autospeculation", ICML 2025, arXiv 2505.03983): the
exact peer of the benchmark, reconstructed from the paper (its public code could not be read).

The paper's view. Reparametrised as stochastic localisation, ``y_s = s x_0 + B_s`` with
``s = SNR = a/(1 - a)`` and ``y = sqrt(a)/(1 - a) x`` (``a`` the cumulative alpha), a DDPM step
with the posterior ("fixed_small") variance is the increment

    y_{s'} = y_s + (s' - s) m(y_s) + sqrt(s' - s) z,      m = E[x_0 | y_s] (the x0 prediction),

and given x_0 the increments are independent with a shared drift: exchangeable. So the law of a
*later* increment seen from the current state is the one the oracle gives *now*, and the oracle's
mean at the anchor is a draft for every future step: no draft model ("autospeculation").

One ASD iteration from the committed state x at step n (one row per sample, samples ragged):

    1. anchor  m_hat = prediction at (x, n): a target call, unless the last verify made it
    2. draft   y_0 = x, y_{j+1} = mean(y_j, n + j; m_hat) + std z_{n+j},  j < L
               (L = every remaining step, "unbounded", or ``spec_len``)
    3. verify  ONE batched target call on y_1 .. y_L (the target mean of each drafted step)
    4. accept  step 0 is exact (its draft mean is the target's); steps 1 .. L-1 in order by the
               reflection maximal coupling; the first rejected step is replaced by its reflection;
               drafts after it are dropped. If all L are kept, y_L's prediction is the next anchor.

In the DDPM coordinates of a specdiff chain the draft of step 2 is the chain's own kernel with its
x0 prediction frozen at the anchor (``tests/test_asd.py`` checks this against the increments
above), so ASD runs on any :class:`specdiff.GaussianChain`; it *is* the paper's algorithm where
the chain's prediction is the x0 prediction of a fixed-variance DDPM step (a diffusers
``SchedulerChain``'s default), and an exact sampler with an anchor-frozen draft elsewhere.

Against specdiff's round (:mod:`specdiff.round`): the same kernel, the same reflection coupling,
the same keyed noise (so ``spec_len=1`` is the plain sampler bit for bit). The frozen drafter
also freezes x0; what differs is the anchor and the length: after a rejection specdiff drafts
from the last prediction it has (made one step earlier, at the state the rejected step left)
and verifies the first step in the same call, one sequential call per round, while ASD spends a
call on the new state so that its first step is exact, two sequential calls per iteration; and
ASD drafts every remaining step (rows grow with the steps left) where specdiff bounds the
window, or chooses it from the measured latency curve.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from ..kernels import GaussianKernel, kernel_for
from ..noise import GeneratorArg, NoiseStreams
from ..sampler import predict


@dataclass
class ASDResult:
    sample: Tensor
    target_calls: int = 0  # sequential batched target calls (anchor calls + verify calls)
    target_rows: int = 0  # states evaluated, over all samples
    max_rows: int = 0  # the largest target batch (memory)
    iterations: int = 0
    anchor_calls: int = 0  # calls spent on a fresh anchor after a rejection (or at the start)
    proposed: int = 0  # drafted steps put to the coupling test (up to the first rejection)
    accepted: int = 0
    per_sample_target_calls: list[int] = field(default_factory=list)

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / max(self.proposed, 1)

    @property
    def stats(self) -> ASDResult:
        """The counts under the names of :class:`specdiff.SpeculativeStats` (benchmarks read either)."""
        return self


def asd_draft(chain, x: Tensor, k: Tensor, m_hat: Tensor, z: Tensor) -> tuple[Tensor, tuple[Tensor, Tensor]]:
    """ASD's proposal: ``y_0 = x``, ``y_{j+1} = mean(y_j, k_j; m_hat) + std_j z_j`` for every row of
    ``z`` (``[L, rows, ...]``; ``k[j]`` the steps of ``y_j``), the kernel's own step with the prediction
    frozen at the anchor. Returns ``y`` (``[L + 1, rows, ...]``) and the draft laws ``(mean, std)``."""
    y, law_D = [x], []
    for j in range(len(z)):
        law_D.append(GaussianKernel.law(chain, y[j], k[j].to(x.device), m_hat, m_hat))
        y.append(GaussianKernel.draw(law_D[-1], z[j], x))
    return torch.stack(y), tuple(torch.stack(part) for part in zip(*law_D))


@torch.no_grad()
def asd_sample(chain, x_init: Tensor, *, spec_len: int | None = None, generator: GeneratorArg = None,
               max_rows: int | None = None) -> ASDResult:
    """Autospeculative decoding of ``chain`` from ``x_init`` (module docstring).

    ``spec_len=None`` drafts every remaining step (the paper's unbounded speculation), an integer
    at most that many; ``generator`` one ``torch.Generator`` or one per sample, drawn exactly as
    :func:`specdiff.sample_baseline` draws them; ``max_rows`` splits a call into micro-batches
    (still one sequential call)."""
    if spec_len is not None and (isinstance(spec_len, bool) or not isinstance(spec_len, int) or spec_len < 1):
        raise ValueError(
            f"spec_len must be a positive integer, or None to speculate to the last step; got {spec_len!r}"
        )
    if max_rows is not None and (isinstance(max_rows, bool) or not isinstance(max_rows, int) or max_rows < 1):
        raise ValueError(f"max_rows must be a positive integer, or None for one batch per call; got {max_rows!r}")
    if kernel_for(chain, x_init) is not GaussianKernel or not x_init.is_floating_point():
        raise TypeError("ASD needs a Gaussian chain with floating-point states (its increments are Gaussian)")
    if getattr(chain, "uses_previous_prediction", False):
        raise ValueError("ASD needs a one-step kernel; this chain's step also uses the previous prediction (multistep)")
    kernel, N, B, dev = GaussianKernel, chain.num_steps, x_init.shape[0], x_init.device
    noise = NoiseStreams(generator, x_init, kernel.noise)
    out = ASDResult(sample=x_init)
    calls = torch.zeros(B, dtype=torch.long)

    def target(x: Tensor, step: Tensor, sample: Tensor) -> Tensor:
        cap = max_rows or x.shape[0]
        parts = [predict(chain, x[s:s + cap], step[s:s + cap], sample[s:s + cap]) for s in range(0, x.shape[0], cap)]
        out.target_calls, out.target_rows = out.target_calls + 1, out.target_rows + x.shape[0]
        out.max_rows = max(out.max_rows, min(cap, x.shape[0]))
        calls[sample.unique()] += 1
        return torch.cat(parts) if len(parts) > 1 else parts[0].clone()

    x, n = x_init.clone(), torch.zeros(B, dtype=torch.long)
    m_hat, known = None, torch.zeros(B, dtype=torch.bool)  # known: m_hat[b] is the prediction at (x[b], n[b])
    while (ids := (n < N).nonzero().squeeze(1)).numel():
        out.iterations += 1
        # 1. Anchor: the oracle's mean at the committed state (the drafts' drift).
        fresh = ids[~known[ids]]
        if fresh.numel():
            new = target(x[fresh.to(dev)], n[fresh], fresh)
            m_hat = new.new_zeros((B, *new.shape[1:])) if m_hat is None else m_hat
            m_hat[fresh.to(dev)] = new.to(m_hat.dtype)
            out.anchor_calls += 1
        m, d = len(ids), ids.to(dev)
        L = (N - n[ids]).clamp(max=spec_len or N)
        span = int(L.max())
        j = torch.arange(span + 1)[:, None]
        k = (n[ids] + j).clamp(max=N - 1)  # the step of y_j (clamped past a sample's L: computed, ignored)
        z = noise.noise(ids.repeat(span), k[:span].flatten()).view(span, m, *x.shape[1:])

        # 2. Draft every step from the anchor's prediction, each with its own keyed noise.
        y, law_D = asd_draft(chain, x[d], k, m_hat[d], z)

        # 3. Verify: one batched call on y_1 .. y_L (not past the last step).
        need = (j >= 1) & (j <= L) & (n[ids] + j < N)
        pred_T = m_hat[d].new_zeros((span + 1, m, *m_hat.shape[1:]))
        pred_T[0] = m_hat[d]
        if need.any():
            pred_T[need.to(dev)] = target(y[need.to(dev)], k[need], ids.expand(span + 1, m)[need]).to(m_hat.dtype)

        # 4. Accept steps 1 .. L-1 in order; step 0 is exact.
        test = (j[1:span] < L) if span > 1 else torch.zeros(0, m, dtype=torch.bool)
        accept = torch.ones(span, m, dtype=torch.bool)
        jr, ir = test.nonzero(as_tuple=True)
        jr = jr + 1
        if len(jr):
            jd, idv = jr.to(dev), ir.to(dev)
            law_T = kernel.law(chain, y[jd, idv], k[jr, ir].to(dev), pred_T[jd, idv], pred_T[jd, idv])
            law_Dr = tuple(part[jd, idv] for part in law_D)
            accept[jr, ir] = kernel.accept(
                law_Dr, law_T, y[jd + 1, idv], z[jd, idv], noise.uniform(ids[ir], k[jr, ir])
            ).cpu()
        accept &= j[:span] < L  # positions past L never count as kept
        kept = accept.cumprod(0).sum(0)  # length of the accepted prefix (0 .. L)
        whole = kept == L
        tested = (j[1:span] <= kept) & (j[1:span] < L) if span > 1 else test
        out.proposed += int(tested.sum())
        out.accepted += int((tested & accept[1:]).sum())

        # Commit y_L (all kept) or the first rejected step replaced by its reflection.
        i = torch.arange(m).to(dev)
        x_new = y[L.to(dev), i]
        rejected = (~whole).nonzero().squeeze(1)
        if rejected.numel():
            r, rd = kept[rejected], rejected.to(dev)
            law_Tr = kernel.law(
                chain, y[r.to(dev), rd], k[r, rejected].to(dev), pred_T[r.to(dev), rd], pred_T[r.to(dev), rd]
            )
            x_fix, _ = kernel.correct(tuple(part[r.to(dev), rd] for part in law_D), law_Tr, y[r.to(dev) + 1, rd],
                                      z[r.to(dev), rd], lambda: None)
            x_new = x_new.index_put((rd,), x_fix)
        x[d] = x_new
        n[ids] = n[ids] + torch.where(whole, L, kept + 1)
        known[ids] = whole & (n[ids] < N)
        m_hat[d] = torch.where(whole.to(dev).view(-1, *[1] * (x.ndim - 1)), pred_T[L.to(dev), i], m_hat[d])
        noise.forget_before(n)
    out.sample, out.per_sample_target_calls = x, calls.tolist()
    return out
