"""Δ-probe: how fast will speculative sampling be on this model, before a long run?

:func:`probe` runs the plain sampler once and, at every probed step ``k`` and lag ``j``
(the drafted step sits ``j`` steps after the prediction the drafter starts from), measures

    Δ_{k,j} = (m_D(x_k) − m_T(x_k)) / σ_k,    acceptance a_{k,j} = 2Φ(−‖Δ_{k,j}‖/2)

(the largest acceptance any coupling can reach, which the reflection coupling attains). It
then predicts, per window L, the expected sequential target calls, rows and wall-clock of
the speculative sampler by dynamic programming over (step, root exact or drafted) with
those acceptances (steps taken as independent), and the plain sampler's
``num_steps * t(batch)``. ``specdiff probe`` prints the table.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .calibration import measure_latency
from .drafters import DraftMemory, as_drafter
from .kernels import GaussianKernel
from .noise import NoiseStreams
from .sampler import _check_chain, predict
from .window import LatencyCurve


@dataclass
class ProbeReport:
    """Per-step ‖Δ‖ and acceptance by drafter and lag, and predicted cost by window."""

    num_steps: int
    batch_size: int
    steps: list[int]
    lags: list[int]
    delta_norm: dict[str, list[list[float]]]  # drafter -> [probed step][lag - 1], mean over the batch
    acceptance: dict[str, list[list[float]]]
    predictions: dict[str, list[dict]] = field(default_factory=dict)  # drafter -> one dict per window
    latency: dict[int, float] = field(default_factory=dict)
    seconds_per_drafted_step: dict[str, float] = field(default_factory=dict)

    def best(self, drafter: str | None = None, by: str = "wall_speedup") -> dict:
        rows = [r for name, rs in self.predictions.items() if drafter in (None, name) for r in rs]
        return max(rows, key=lambda r: r[by])

    def to_dict(self) -> dict:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}

    def table(self) -> str:
        lines = ["| drafter | window | mean acceptance | target calls | rows | calls speedup | wall-clock speedup |",
                 "|" + " --- |" * 7]
        for name, rows in self.predictions.items():
            for r in rows:
                lines.append(f"| {name} | {r['window']} | {r['acceptance']:.3f} | {r['target_calls']:.0f} "
                             f"| {r['rows']:.0f} | {r['call_speedup']:.2f}x | {r['wall_speedup']:.2f}x |")
        return "\n".join(lines)


@torch.no_grad()
def probe(chain, x_init: Tensor, *, drafters: dict | None = None, windows=(1, 2, 4, 8, 16, 32),
          generator=None, every: int = 1, latency: dict[int, float] | None = None) -> ProbeReport:
    """Run the plain sampler on ``x_init`` and measure Δ for each drafter (``{"frozen": None}``
    by default; values as ``speculative_sample``'s ``drafter=``) at lags ``1..max(windows)``
    on every ``every``-th step; predict calls and wall-clock per window. ``latency``
    (``{rows: seconds}``) skips the latency measurement."""
    _check_chain(chain, x_init)
    if every < 1 or not windows or min(windows) < 1:
        raise ValueError("every and every window must be positive integers")
    drafters = {name: as_drafter(d) for name, d in (drafters or {"frozen": None}).items()}
    num_steps, batch, lags = chain.num_steps, x_init.shape[0], list(range(1, max(windows) + 1))
    noise, rows = NoiseStreams(generator, x_init), torch.arange(batch)
    history: list[Tensor] = []  # target predictions of the last max-lag steps, newest last
    delta = {name: [] for name in drafters}
    spent = {name: 0.0 for name in drafters}
    x, probed = x_init, []
    for k in range(num_steps):
        step = torch.full((batch,), k, dtype=torch.long, device=x.device)
        prediction = predict(chain, x, step, rows)
        mean_t, std = GaussianKernel.law(chain, x, step, prediction, history[-1] if history else prediction)
        if k % every == 0 and k > 0:
            probed.append(k)
            for name, drafter in drafters.items():
                started = time.perf_counter()
                delta[name].append(_deltas(chain, drafter, x, k, history, mean_t, std, lags))
                spent[name] += time.perf_counter() - started
        history = (history + [prediction])[-(len(lags) + 1):]
        x = (mean_t + std * noise.noise(rows, torch.full((batch,), k))).to(x_init.dtype)
        noise.forget_before(torch.full((batch,), k + 1))
    if latency is None:
        sizes = sorted({batch * k for k in (1, 2, 3, 5, 9, 17, 33, 65) if k <= max(windows) + 1}
                       | {batch * (max(windows) + 1)})
        latency = measure_latency(chain, x_init, sizes)
    curve = LatencyCurve(latency)
    report = ProbeReport(num_steps, batch, probed, lags,
                         delta_norm={n: [d.mean(1).tolist() for d in v] for n, v in delta.items()},
                         acceptance={n: [_acceptance(d).mean(1).tolist() for d in v] for n, v in delta.items()},
                         latency=dict(latency))
    for name, drafter in drafters.items():
        per_step = spent[name] / max(len(probed) * len(lags), 1)
        report.seconds_per_drafted_step[name] = per_step
        accept = _acceptance_grid(delta[name], probed, num_steps, len(lags), frozen=not drafter.network_calls)
        base = num_steps * curve(batch)
        report.predictions[name] = []
        for window in windows:
            calls, rows_, seconds = _expected_cost(accept, window, batch, curve, per_step)
            report.predictions[name].append({
                "window": window, "target_calls": calls, "rows": rows_, "seconds": seconds,
                "call_speedup": num_steps / calls, "wall_speedup": base / seconds,
                "acceptance": float(accept[1:, :window].mean()) if window > 1 else 1.0})
    return report


def _deltas(chain, drafter, x, k, history, mean_t, std, lags) -> Tensor:
    """‖Δ‖ ``[lag, batch]`` of drafted step k from the prediction made j steps earlier (NaN: none yet)."""
    batch, device = x.shape[0], x.device
    usable = [j for j in lags if j <= len(history)]
    out = torch.full((len(lags), batch), float("nan"), dtype=torch.float64)
    if not usable:
        return out
    count = len(usable)
    xs = x.repeat(count, *[1] * (x.ndim - 1))
    step = torch.full((count * batch,), k, dtype=torch.long, device=device)
    memory = DraftMemory(prediction=torch.cat([history[-j] for j in usable]),
                    step=torch.tensor([k - j for j in usable], device=device).repeat_interleave(batch),
                    previous=torch.cat([history[-j - 1] if j < len(history) else history[-j] for j in usable]),
                    sample=torch.arange(batch, device=device).repeat(count))
    guess = drafter.predict(xs, step, memory).to(memory.prediction.dtype)
    mean_d, _ = GaussianKernel.law(chain, xs, step, guess, memory.previous)
    gap = ((mean_d - mean_t.repeat(count, *[1] * (x.ndim - 1))) / std.repeat(count, *[1] * (x.ndim - 1)))
    out[: count] = gap.flatten(1).double().norm(dim=1).view(count, batch).cpu()
    return out  # [lag, batch]


def _acceptance(delta_norm: Tensor) -> Tensor:
    return torch.erfc(delta_norm / (2 * math.sqrt(2)))  # 2 Φ(-‖Δ‖/2)


def _acceptance_grid(deltas, probed, num_steps, max_lag, frozen) -> Tensor:
    """Acceptance ``a[k, j]`` for every step and lag (filled in from the nearest probed
    step; unmeasured lags of early steps take the step's largest measured one)."""
    grid = torch.ones(num_steps, max_lag + 1, dtype=torch.float64)
    if not probed:
        return grid
    measured = _acceptance(torch.stack(deltas)).mean(2)  # [probed, lag], mean over the batch
    measured = torch.where(measured.isnan(), torch.nan_to_num(measured, nan=1.0).cummin(1).values, measured)
    index = torch.bucketize(torch.arange(num_steps), torch.tensor(probed)).clamp(max=len(probed) - 1)
    grid[:, 1:] = measured[index]
    if not frozen:  # an independent drafter does not care how old the last target prediction is
        grid[:, 1:] = grid[:, 1:2]
    return grid


def _expected_cost(accept: Tensor, window: int, batch: int, latency, per_step: float):
    """Expected (target calls, rows, seconds) of a run, backwards over (step n, exact root?).

    A round from n drafts ``span`` steps; it stops at the first rejection (position j,
    probability ``S_j (1 - a_j)``, next root drafted at n+j+1) or accepts all
    (probability ``S_span``, next root exact at n+span)."""
    n_steps, a = accept.shape[0], accept.tolist()
    cost = [[(0.0, 0.0, 0.0)] * 2 for _ in range(n_steps + 1)]  # [n][fresh] -> (calls, rows, seconds)
    for n in range(n_steps - 1, -1, -1):
        span = min(window, n_steps - n)
        for fresh in (0, 1):
            rows = batch * (span + (0 if fresh else 1) - (1 if n + span >= n_steps else 0))
            total = [float(rows > 0), rows, (latency(rows) if rows else 0.0) + per_step * span]
            survive = 1.0
            for j in range(span):
                # position j drafts step n+j from the prediction made at n (exact root) or n-1
                p = 1.0 if (fresh and j == 0) else a[n + j][j + 1 - fresh]
                nxt = cost[n + j + 1][0]
                for i in range(3):
                    total[i] += survive * (1 - p) * nxt[i]
                survive *= p
            for i in range(3):
                total[i] += survive * cost[n + span][1][i]
            cost[n][fresh] = tuple(total)
    calls, rows, seconds = cost[0][1]
    return calls + 1, rows + batch, seconds + latency(batch)  # plus the warm-up call at the root


def probe_pipeline(pipe, *, num_inference_steps: int = 1000, batch_size: int = 1, seed: int = 0,
                   draft_unet=None, windows=(1, 2, 4, 8, 16, 32), every: int = 1) -> ProbeReport:
    """:func:`probe` on a DDPM-style diffusers pipeline (``unet`` + a supported stochastic scheduler)."""
    from .schedulers.speculative import SpeculativeScheduler

    scheduler = pipe.scheduler
    if not isinstance(scheduler, SpeculativeScheduler):
        scheduler = SpeculativeScheduler.from_scheduler(scheduler)
    scheduler.set_timesteps(num_inference_steps)
    unet = pipe.unet
    chain = scheduler.chain(lambda x, t: unet(x, t).sample)
    size = unet.config.sample_size
    size = (size, size) if isinstance(size, int) else tuple(size)
    x = torch.randn(batch_size, unet.config.in_channels, *size, generator=torch.Generator().manual_seed(seed),
                    dtype=unet.dtype).to(unet.device) * scheduler.init_noise_sigma
    drafters = {"frozen": None}
    if draft_unet is not None:
        drafters["draft model"] = chain.drafter(lambda x, t: draft_unet(x, t).sample)
    return probe(chain, x, drafters=drafters, windows=windows, generator=torch.Generator().manual_seed(seed + 1),
                 every=every)
