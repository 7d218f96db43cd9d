"""``specdiff selfcheck``: the first command to run on a new machine (GPU or not).

On the chosen device it checks, in a few seconds to a minute:

* **window = 1 is the plain loop, bit for bit**: the Gaussian analytic mixture and a categorical
  masked-diffusion chain, in float32 and in the device's half type (float16 on CUDA/MPS, bfloat16 on CPU);
* **the law**: speculative (window 6) against plain samples of a tiny analytic chain, a two-sample
  test at a stated family-wise level (``ALPHA``), with the number of rejections that gives it power;
* **host syncs per round**: counted (:mod:`specdiff.syncs`; on a CPU, on the simulated CUDA device);
* **max_rows="auto"**: the fitted cap keeps a run's peak memory within the device's (CUDA only);
* **the latency curve** ``t(b)`` of a small network for batch sizes 1..32, and **a timing table**:
  plain against window 8 on the bundled digits UNet (``--quick``: a small MLP network instead).

:func:`selfcheck` returns a :class:`SelfCheckResult`; the CLI prints its :meth:`~SelfCheckResult.table`
and exits non-zero when a check fails.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass, field

import torch

from . import sample_baseline, speculative_sample
from .calibration import measure_latency
from .discrete import LookupDenoiser, MaskedDiffusionChain, MaskedDiffusionScheduler
from .syncs import count_syncs
from .testing import GaussianMixtureDDPM, two_sample_test

ALPHA = 1e-3  # family-wise level of the law check (a correct sampler fails it with probability <= ALPHA)
SIZES = (1, 2, 4, 8, 16, 32)


@dataclass
class Check:
    name: str
    status: str  # "ok", "FAIL" or "n/a"
    detail: str = ""


@dataclass
class SelfCheckResult:
    device: str
    checks: list[Check] = field(default_factory=list)
    latency: dict[int, float] = field(default_factory=dict)  # rows -> seconds of one network call
    timings: list[dict] = field(default_factory=list)  # sampler, window, calls, seconds
    network: str = ""

    @property
    def ok(self) -> bool:
        return all(c.status != "FAIL" for c in self.checks)

    def table(self) -> str:
        width = max(len(c.name) for c in self.checks)
        lines = [f"specdiff selfcheck on {self.device}", ""]
        lines += [f"  {c.status:<4}  {c.name:<{width}}  {c.detail}" for c in self.checks]
        if self.latency:
            t1 = self.latency[min(self.latency)]
            lines += ["", f"latency of one call of {self.network} (rows: ms, ratio to 1 row)"]
            lines += ["  " + "  ".join(f"{b}: {t * 1e3:.2f} ({t / t1:.1f}x)" for b, t in sorted(self.latency.items()))]
        if self.timings:
            plain = self.timings[0]["seconds"]
            lines += ["", f"timing on {self.network} (batch 1)",
                      f"  {'sampler':<12} {'window':>6} {'calls':>6} {'seconds':>9} {'speedup':>8}"]
            lines += [f"  {t['sampler']:<12} {t['window']:>6} {t['calls']:>6} {t['seconds']:>9.3f} "
                      f"{plain / t['seconds']:>7.2f}x" for t in self.timings]
        lines += ["", "all checks passed" if self.ok else "SOME CHECKS FAILED"]
        return "\n".join(lines)


def half_type(device: torch.device) -> torch.dtype:
    """The half-precision type to check on ``device``: bfloat16 on a CPU, float16 elsewhere."""
    return torch.bfloat16 if device.type == "cpu" else torch.float16


def _gens(n: int, offset: int = 0) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(offset + i) for i in range(n)]


def _run(name: str, fn) -> Check:
    """A check that raised is a failure with its error (the rest still run)."""
    try:
        return fn()
    except Exception as err:  # noqa: BLE001 - reported, not swallowed: the check fails with the error
        return Check(name, "FAIL", f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}")


def check_window_one(device: torch.device, dtype: torch.dtype, kind: str, quick: bool) -> Check:
    """``speculative_sample(window=1)`` against ``sample_baseline``: the same tensor."""
    name = f"window=1 == plain loop ({kind}, {str(dtype).replace('torch.', '')})"

    def run():
        batch = 4
        if kind == "gaussian":
            chain = GaussianMixtureDDPM.random(dim=4, num_steps=20 if quick else 60)
            x = chain.sample_prior(batch, torch.Generator().manual_seed(0)).to(device, dtype)
        else:
            network = LookupDenoiser(3, 4, seed=1)
            scheduler = MaskedDiffusionScheduler(vocab_size=3, num_inference_steps=12 if quick else 32)
            chain = MaskedDiffusionChain(lambda tokens: network(tokens).to(dtype), scheduler)
            x = torch.full((batch, 4), 3, device=device)
        plain = sample_baseline(chain, x, _gens(batch))
        spec = speculative_sample(chain, x, window=1, generator=_gens(batch))
        same = torch.equal(plain, spec.sample)
        return Check(name, "ok" if same else "FAIL",
                     f"{chain.num_steps} steps, batch {batch}: " + ("identical" if same else "DIFFERENT samples"))

    return _run(name, run)


def check_law(device: torch.device, quick: bool) -> Check:
    """Speculative (window 6, frozen drafter) against plain samples: a two-sample test at ``ALPHA``."""
    name = "same law as the plain loop"

    def run():
        n = 800 if quick else 3000
        chain = GaussianMixtureDDPM.random(dim=2, num_steps=24, seed=3)
        x = chain.sample_prior(n, torch.Generator().manual_seed(1)).to(device)
        plain = sample_baseline(chain, x, torch.Generator().manual_seed(2))
        out = speculative_sample(chain, x, window=6, generator=torch.Generator().manual_seed(3))
        result = two_sample_test(out.sample.cpu(), plain.cpu(), alpha=ALPHA)
        rejected = out.stats.proposed - out.stats.accepted
        return Check(name, "ok" if result.passed else "FAIL",
                     f"n={n}, window 6, {rejected} rejected drafts: {result}")

    return _run(name, run)


def check_syncs(device: torch.device) -> Check:
    """Host <-> device synchronisations per round of a speculative sample (simulated CUDA on a CPU)."""
    simulate = "cuda" if device.type == "cpu" else None
    name = "host syncs per round" + (" (simulated cuda)" if simulate else "")

    def run():
        chain = GaussianMixtureDDPM.random(dim=4, num_steps=16)
        x = chain.sample_prior(8, torch.Generator().manual_seed(0))
        with count_syncs(simulate=simulate) as syncs:
            x = x.to("cuda" if simulate else device)
            out = speculative_sample(chain, x, window=8, generator=torch.Generator().manual_seed(1), max_rows=None)
        kinds, rounds = syncs.by_kind(), out.stats.rounds
        reads = (kinds["d2h"] + kinds["shape"]) / rounds
        return Check(name, "ok", f"{reads:.1f} reads + {kinds['h2d'] / rounds:.1f} blocking copies per round "
                                 f"(batch 8, window 8, {rounds} rounds, setup included)")

    return _run(name, run)


def check_max_rows(device: torch.device, network) -> Check:
    """``max_rows="auto"`` on CUDA: a cap is fitted and the run's peak memory stays within the device's."""
    name = 'max_rows="auto" within memory'
    if device.type != "cuda":
        return Check(name, "n/a", "CUDA only (no cap on other devices)")

    def run():
        chain, x = network(16)
        out = speculative_sample(chain, x, window=8, generator=torch.Generator().manual_seed(0), max_rows="auto")
        total = torch.cuda.get_device_properties(device).total_memory
        peak, cap = out.stats.peak_memory, out.stats.max_rows
        good = cap is not None and cap >= 1 and peak is not None and peak <= total
        return Check(name, "ok" if good else "FAIL",
                     f"cap {cap} rows, peak {peak / 2**20:.0f} MiB of {total / 2**30:.1f} GiB")

    return _run(name, run)


class _MLPChain(GaussianMixtureDDPM):
    """The analytic mixture plus a small MLP's (scaled-down) output: a network that costs device
    time, with the mixture's acceptance (``--quick``'s timing network). Its weights are plain
    tensors on the device."""

    def __init__(self, width: int, device: torch.device, **kwargs):
        g = torch.Generator().manual_seed(0)
        super().__init__(torch.randn(4, 8, generator=g, dtype=torch.float64) * 0.5, **kwargs)
        shapes = [(width, 9), (width, width), (8, width)]
        self.layers = [((torch.randn(shape, generator=g) / shape[1] ** 0.5).to(device),
                        torch.zeros(shape[0]).to(device)) for shape in shapes]

    def predict(self, x, step):
        h = torch.cat([x.float(), step.to(x.device, torch.float32)[:, None] / self.num_steps], 1)
        for i, (weight, bias) in enumerate(self.layers):
            h = torch.nn.functional.linear(h, weight, bias)
            h = torch.nn.functional.silu(h) if i < len(self.layers) - 1 else h
        return super().predict(x, step) + 1e-3 * h.to(x.dtype)


def _network(device: torch.device, quick: bool):
    """``(description, make(batch) -> (chain, x_init))``: the digits UNet, or ``--quick``'s MLP."""
    if quick:
        def make(batch, steps=50):
            chain = _MLPChain(512, device, num_steps=steps)
            return chain, chain.sample_prior(batch, torch.Generator().manual_seed(0), dtype=torch.float32).to(device)

        return "a 3-layer MLP (width 512) on the analytic mixture, 50 steps", make

    from diffusers import DDPMScheduler, UNet2DModel

    from .paths import asset
    from .schedulers.speculative import SpeculativeScheduler

    unet = UNet2DModel.from_pretrained(asset("models", "digits-ddpm", "unet")).to(device).eval()
    ddpm = DDPMScheduler.from_pretrained(asset("models", "digits-ddpm", "scheduler"))
    scheduler = SpeculativeScheduler.from_scheduler(ddpm)

    def make(batch, steps=250):
        scheduler.set_timesteps(steps)
        chain = scheduler.chain(lambda x, t: unet(x, t).sample)
        size = unet.config.sample_size
        x = torch.randn(batch, unet.config.in_channels, size, size, generator=torch.Generator().manual_seed(0))
        return chain, x.to(device)

    return "the bundled digits UNet (DDPM, 250 steps)", make


def timing(device: torch.device, make, windows=(8,)) -> list[dict]:
    """Plain against speculative sampling at ``windows`` (frozen drafter), batch 1, one warm-up each."""
    rows = []
    chain, x = make(1)
    for label, window in [("plain", 1), *[("speculative", w) for w in windows]]:
        def run(window=window):
            if window == 1:
                return sample_baseline(chain, x, torch.Generator().manual_seed(0), return_stats=True)
            return speculative_sample(chain, x, window=window, generator=torch.Generator().manual_seed(0))

        run()  # warm-up: kernels, caches, lazy initialisation
        started = time.perf_counter()
        out = run()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        rows.append({"sampler": label, "window": window, "calls": out.stats.target_calls,
                     "seconds": time.perf_counter() - started})
    return rows


def selfcheck(device: str | torch.device = "cpu", quick: bool = False) -> SelfCheckResult:
    """Run every check on ``device`` (see the module docstring); never raises for a failed check."""
    device = torch.device(device)
    result = SelfCheckResult(device=_describe(device))
    for dtype in (torch.float32, half_type(device)):
        for kind in ("gaussian", "categorical"):
            result.checks.append(check_window_one(device, dtype, kind, quick))
    result.checks.append(check_law(device, quick))
    result.checks.append(check_syncs(device))
    try:
        result.network, make = _network(device, quick)
    except Exception as err:  # noqa: BLE001 - reported as a failed check
        result.checks.append(Check("load the timing network", "FAIL", f"{type(err).__name__}: {err}"))
        return result
    result.checks.append(check_max_rows(device, make))

    def curve():
        chain, x = make(1)
        result.latency = measure_latency(chain, x, list(SIZES), repeats=2 if quick else 5)
        return Check("latency curve", "ok", f"t(32)/t(1) = {result.latency[32] / result.latency[1]:.1f}")

    result.checks.append(_run("latency curve", curve))

    def timed():
        result.timings = timing(device, make)
        plain, spec = result.timings
        return Check("timing table", "ok", f"window 8: {plain['calls'] / spec['calls']:.1f}x fewer calls, "
                                           f"{plain['seconds'] / spec['seconds']:.2f}x wall-clock")

    result.checks.append(_run("timing table", timed))
    return result


def _describe(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)}, torch {torch.__version__})"
    return f"{device} ({torch.get_num_threads()} threads, torch {torch.__version__})"


def _default_device() -> str:
    if torch.cuda.is_available():
        return "cuda"
    if torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="specdiff selfcheck", description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default=None, help="cuda, cuda:1, mps or cpu (default: the GPU if there is one)")
    parser.add_argument("--quick", action="store_true",
                        help="fewer samples, and a small MLP instead of the digits UNet")
    args = parser.parse_args(argv)
    device = args.device or _default_device()
    try:
        torch.empty(0, device=device)
    except Exception as err:  # noqa: BLE001
        print(f"specdiff selfcheck: error: --device {device} is not usable here ({str(err).splitlines()[0]}); "
              "use --device cpu", file=sys.stderr)
        return 2
    result = selfcheck(device, quick=args.quick)
    print(result.table())
    return 0 if result.ok else 1


if __name__ == "__main__":
    sys.exit(main())
