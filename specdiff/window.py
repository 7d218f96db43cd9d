"""Choosing the window L: a fixed integer, or a policy that looks at the past only.

``speculative_sample(chain, x_init, window=...)`` takes an int, ``"auto"`` or a
:class:`WindowPolicy`. The driver calls :func:`resolve_window` once, then
``policy.choose(stats, live)`` before every round. The law of the output never depends on the
policy as long as L is a function of the randomness of committed steps only: the noise of step
k is keyed by (sample, k) and reused when a later round redrafts step k, so L must not read the
drafts a round discarded after its first rejection (see ``SpeculativeStats.prefix_rows`` for the
row counts a policy may use).

:class:`AutoWindow` (``window="auto"``) maximises the expected committed steps per second.
With per-position acceptance ``a_j`` (position 0 is the root of a round that follows a
rejection; after a fully accepted round the root is exact, ``a_0 = 1``), a round of
window L commits ``C = min(L, first rejection + 1)`` steps per sample, so

    E[C | L] = sum_{k=0}^{L-1} prod_{j<k} a_j.

A fully accepted round leaves the next root exact, so the fraction of rounds that start
exact is the stationary ``pi = p_n / (1 - p_f + p_n)`` of that two-state chain
(``p_f``, ``p_n``: probability of accepting the whole window from an exact / a drafted
root). A round verifies at most ``L + 1 - pi`` rows per live sample, fewer when the driver
skips states whose prediction it already has (a time-free masked-diffusion chain verifies
only the drafted states that changed); ``f``, the observed share of those rows actually
verified, is fitted to the rows of the run's rounds up to their first rejections (1 before any,
and 1 on a time-conditioned chain, where only the windows clamped at the last steps verify fewer
rows). So for ``B`` live samples

    rate(L) = B * E[C | L] / (t(f * B * (L + 1 - pi)) + c + h * L),

and the policy takes the largest ``L`` whose rate is within ``tolerance`` (3%) of the best (the
rate is flat near its maximum, and a larger window makes fewer sequential calls) and at least
the rate of ``L = 1``,
where ``t(b)`` is the measured latency of one target call on ``b`` rows and ``c + h L`` the
time of a round outside the target call (drafting, coupling, bookkeeping), measured by a short
dry run of the sampler with a free target.
``t``, ``c`` and ``h`` are measured once per model, device, dtype and row shape (and drafter,
for ``c, h``), cached in memory and in a small JSON file under the user's cache directory, and
never changed during a run; ``a_j`` and ``f`` are estimated from the run's own accept/reject
and row counts (exponential forgetting, shrinkage towards a prior). So the windows, hence the
samples, are a function of the seeds, the batch and that cached calibration: the same seed
gives the same images run after run on a machine (timings never steer a run).
"""

from __future__ import annotations

import bisect
import json
import math
import os
import time
from collections import Counter
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor

from .stats import SpeculativeStats


@runtime_checkable
class WindowPolicy(Protocol):
    """Chooses the window of each round from the past. ``max_window`` bounds it (the run's
    stats are sized by it)."""

    max_window: int

    def choose(self, stats: SpeculativeStats, live: int) -> int:
        """L for the next round, from the run so far (``live``: samples still running). Steer by
        the rounds, acceptance counts and ``prefix_rows`` only (see :class:`SpeculativeStats`)."""


def resolve_window(window, chain=None, x_init: Tensor | None = None, drafter=None) -> int | WindowPolicy:
    """An int (checked), or a policy bound to ``chain``/``x_init`` (and the run's ``drafter``):
    ``"auto"`` -> :class:`AutoWindow`."""
    if isinstance(window, str):
        if window != "auto":
            raise ValueError(f"window must be a positive integer, 'auto' or a WindowPolicy; got {window!r}")
        window = AutoWindow()
    if isinstance(window, WindowPolicy) and not isinstance(window, (int, str)):
        if not isinstance(window.max_window, int) or window.max_window < 1:
            raise ValueError(f"{type(window).__name__}.max_window must be a positive integer; got {window.max_window!r}")
        if hasattr(window, "bind") and chain is not None and x_init is not None:
            window.bind(chain, x_init, drafter)
        return window
    if not isinstance(window, int) or isinstance(window, bool) or window < 1:
        raise ValueError(
            f"window must be a positive integer (1 = plain sampler), 'auto' or a WindowPolicy; got {window!r}"
        )
    return window


# ----------------------------------------------------------------------------------------
# Batch-latency curve t(b)


class LatencyCurve:
    """Seconds of one target call as a function of its rows: piecewise linear through the
    measured points (made non-decreasing by pooling adjacent violators), linear beyond the largest."""

    def __init__(self, points: dict[int, float] | None = None):
        self.points = {int(b): float(t) for b, t in (points or {}).items()}
        self._sorted = None

    def _table(self):
        if self._sorted is None:  # the closest non-decreasing curve (pool adjacent violators): a noisy
            bs, blocks = sorted(self.points), []  # point is averaged with its neighbours, not carried on
            for b in bs:
                blocks.append([self.points[b], 1])
                while len(blocks) > 1 and blocks[-2][0] / blocks[-2][1] > blocks[-1][0] / blocks[-1][1]:
                    total, count = blocks.pop()
                    blocks[-1][0] += total
                    blocks[-1][1] += count
            self._sorted = (bs, [total / count for total, count in blocks for _ in range(count)])
        return self._sorted

    def __call__(self, rows: float) -> float:
        if not self.points:
            return max(rows, 1.0)  # unknown: proportional to rows (the CPU worst case)
        bs, ts = self._sorted or self._table()
        if rows <= bs[0]:
            return ts[0]
        i = bisect.bisect_left(bs, rows)  # the first measured size >= rows (called ~32 times a round)
        if i < len(bs):
            b0, b1, t0, t1 = bs[i - 1], bs[i], ts[i - 1], ts[i]
            return t0 + (t1 - t0) * (rows - b0) / (b1 - b0)
        if len(bs) == 1:
            return ts[0] * rows / bs[0]
        slope = max((ts[-1] - ts[-2]) / (bs[-1] - bs[-2]), 0.0)
        return ts[-1] + slope * (rows - bs[-1])


def _cache_dir() -> Path:
    root = os.environ.get("SPECDIFF_CACHE_DIR")
    if root:
        return Path(root)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "specdiff"


_MEMORY_CACHE: dict[str, dict[int, float]] = {}


def _find_module(obj, depth: int = 2):
    """The torch module behind a chain or a model function (for the latency cache key)."""
    if isinstance(obj, torch.nn.Module):
        return obj
    if depth < 0 or obj is None:
        return None
    candidates = [getattr(obj, name, None) for name in ("model", "unet", "transformer", "model_fn", "__self__")]
    closure = getattr(obj, "__closure__", None) or ()
    candidates += [_cell_contents(cell) for cell in closure]
    candidates += [v for k, v in getattr(obj, "__dict__", {}).items() if not k.startswith("_")]  # e.g. a denoiser
    for candidate in candidates:
        found = _find_module(candidate, depth - 1)
        if found is not None:
            return found
    return None


def _cell_contents(cell):
    try:
        return cell.cell_contents
    except ValueError:  # a closure variable not bound yet
        return None


def latency_key(chain, x_init: Tensor) -> tuple[str, bool]:
    """``(key, stable)``: stable keys name the architecture (class and parameter count) and
    may be cached on disk; otherwise the key is the chain's class (memory only: a new chain
    object of the same kind, as a pipeline builds per call, keeps its calibration, so its
    windows and samples repeat). A wrapper that keeps the wrapped chain in ``.chain`` times the
    same network."""
    while "chain" in getattr(chain, "__dict__", {}):
        chain = chain.__dict__["chain"]
    shape = "x".join(map(str, x_init.shape[1:]))
    where = f"{x_init.device}|{x_init.dtype}|{shape}|threads={torch.get_num_threads()}"
    explicit = getattr(chain, "latency_key", None)
    if isinstance(explicit, str):
        return f"{explicit}|{where}", True
    module = _find_module(chain)
    if module is not None:
        params = sum(p.numel() for p in module.parameters())
        dtype = next(module.parameters()).dtype if params else ""
        return f"{type(module).__name__}:{params}:{dtype}|{type(chain).__name__}|{where}", True
    return f"{type(chain).__module__}.{type(chain).__qualname__}|{where}", False


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def measure_latency(chain, x_init: Tensor, sizes: list[int], repeats: int = 5) -> dict[int, float]:
    """Synchronised wall-clock of ``chain.predict`` on ``b`` rows (copies of ``x_init``'s rows
    at step 0) for each ``b`` in ``sizes``: the fastest of ``repeats`` sweeps, taken in turn.
    Load on a shared machine only ever adds time, and bursts of it hit some calls and not
    others: the fastest call of each size is the one that measures the model, so bursts in up to
    ``repeats - 1`` sweeps do not bend the curve."""
    from .sampler import predict  # late: the sampler imports this module

    batch = x_init.shape[0]
    inputs = {}
    for b in sizes:
        index = torch.arange(b) % batch
        inputs[b] = (x_init[index], torch.zeros(b, dtype=torch.long, device=x_init.device), index)
    times = {b: [] for b in sizes}
    with torch.no_grad():
        predict(chain, *inputs[sizes[0]])  # warm-up: kernels, caches, lazy initialisation
        for _ in range(repeats):
            for b in sizes:
                _synchronize(x_init.device)
                started = time.perf_counter()
                predict(chain, *inputs[b])
                _synchronize(x_init.device)
                times[b].append(time.perf_counter() - started)
    return {b: min(t) for b, t in times.items()}


def measure_outside(chain, x_init: Tensor, drafter=None, windows: tuple[int, int] = (2, 8), steps: int = 48,
                    repeats: int = 2) -> tuple[float, float]:
    """``(c, h)``: seconds a round spends outside the target call, per round and per drafted step.

    A dry run of the sampler on the first ``steps`` steps of ``chain`` whose target is free (its
    prediction at ``x_init``, repeated), at two windows, fastest of ``repeats``: what is left is
    drafting, the coupling and the driver's bookkeeping. Its randomness is its own (seed 0); the
    caller's generators are not touched."""
    from .sampler import predict, speculative_sample  # late: the sampler imports this module

    with torch.no_grad():  # one row's prediction serves every row of the dry run
        first = predict(chain, x_init[:1], torch.zeros(1, dtype=torch.long, device=x_init.device),
                        torch.zeros(1, dtype=torch.long))
    dry = _FreeTarget(chain, first, min(steps, chain.num_steps))
    per_round = []
    for window in windows:
        window = min(window, dry.num_steps)
        best = math.inf
        for _ in range(repeats):
            started = time.perf_counter()
            out = speculative_sample(dry, x_init, window=window, drafter=drafter,
                                     generator=torch.Generator().manual_seed(0), max_rows=None)
            best = min(best, (time.perf_counter() - started) / max(out.stats.rounds, 1))
        per_round.append((window, best))
    (l1, t1), (l2, t2) = per_round
    h = max((t2 - t1) / (l2 - l1), 0.0) if l2 != l1 else 0.0
    return max(t1 - h * l1, 0.0), h


class _FreeTarget:
    """``chain`` cut to its first ``steps`` steps, with a target that costs nothing (one stored
    prediction, repeated): what a round costs besides the network (:func:`measure_outside`)."""

    uses_sample_index = False

    def __init__(self, chain, prediction: Tensor, steps: int):
        self.chain, self.prediction, self.num_steps = chain, prediction, steps

    def __getattr__(self, name):
        return getattr(self.__dict__["chain"], name)

    def predict(self, x: Tensor, step: Tensor) -> Tensor:
        return self.prediction.expand(x.shape[0], *self.prediction.shape[1:])


# ----------------------------------------------------------------------------------------
# The policy


class AutoWindow:
    """The window that maximises expected committed steps per second (module docstring).

    Args:
        max_window: the largest window considered.
        prior_acceptance, prior_weight: Beta-style prior on the per-step acceptance
            (``prior_weight`` pseudo-observations), used before the run has data.
        memory: per-round decay of the acceptance counts (older rounds count less, since
            acceptance drifts along a trajectory).
        latency: a known curve (``{rows: seconds}``); skips the measurement.
        outside: known ``(c, h)``, seconds of a round outside the target call per round and per
            drafted step; skips the dry run that measures them.
        cache: keep measured curves in a JSON file under ``$SPECDIFF_CACHE_DIR`` (default
            ``~/.cache/specdiff``); memory-only when False or when the folder is not writable.
        tolerance: take the largest window whose expected rate is within this fraction of the
            best. The rate is flat near its maximum, flatter than the noise of a measured
            latency curve, and a larger window makes fewer sequential calls; 0 = the argmax.
    """

    def __init__(self, max_window: int = 32, *, prior_acceptance: float = 0.9, prior_weight: float = 4.0,
                 memory: float = 0.95, latency: dict[int, float] | None = None,
                 outside: tuple[float, float] | None = None, cache: bool = True, tolerance: float = 0.03):
        if not isinstance(max_window, int) or isinstance(max_window, bool) or max_window < 1:
            raise ValueError(f"max_window must be a positive integer; got {max_window!r}")
        if not 0 < prior_acceptance < 1:
            raise ValueError(f"prior_acceptance must be in (0, 1); got {prior_acceptance!r}")
        if not 0 <= tolerance < 1:
            raise ValueError(f"tolerance must be in [0, 1); got {tolerance!r}")
        self.max_window, self.tolerance = max_window, tolerance
        self.prior_acceptance, self.prior_weight, self.memory = prior_acceptance, prior_weight, memory
        self.latency = LatencyCurve(latency)
        self.measured = latency is not None
        self.cache = cache
        self.source = "given" if latency is not None else "none"
        self.per_round, self.per_step = outside if outside is not None else (0.0, 0.0)  # c, h (seconds)
        self.outside_known = outside is not None
        self.chosen: Counter[int] = Counter()
        self._seen = (0, [0] * max_window, [0] * max_window)
        self._acc = [0.0] * max_window
        self._prop = [0.0] * max_window
        self._rows = [0.0, 0.0]  # decayed sums of the rounds' verified and possible rows (stats.prefix_rows)
        self._rows_seen = (0, 0)
        self.skips_repeats = True  # rows may be skipped (a time-free chain); bind() says False for a timed one
        self._live = 0

    # -- binding and measurement ---------------------------------------------------------
    def bind(self, chain, x_init: Tensor, drafter=None) -> None:
        """Measure ``t(b)`` and ``(c, h)`` for this model/device/dtype/shape (and drafter) unless known or cached."""
        # Only a time-free chain verifies fewer rows than drafted (unchanged states); on a timed one,
        # fewer rows happen at the last steps only (windows clamped there), which must not shrink f.
        self.skips_repeats = not getattr(chain, "time_conditioned", True)
        key, stable = latency_key(chain, x_init)
        if not self.outside_known:
            from .drafters import as_drafter

            drafter = as_drafter(drafter)
            self._bind_outside(chain, x_init, drafter, f"{key}|outside|{type(drafter).__name__}", stable)
        if self.measured:
            return
        batch = x_init.shape[0]
        sizes = sorted({batch * k for k in (1, 2, 3, 5, 9, 17, 33, 65) if k <= self.max_window + 1}
                       | {batch * (self.max_window + 1)})
        known = dict(_MEMORY_CACHE.get(key, {}))
        self.source = "memory cache"
        if stable and self.cache and not all(b in known for b in sizes):
            known.update(self._read_disk(key))
            self.source = "disk cache"
            ends = sorted({sizes[0], sizes[-1]})
            if all(b in known for b in sizes) and not _still_true(known, measure_latency(chain, x_init, ends, 3)):
                known = {}  # the machine changed (or the cache was measured under load): measure again
        missing = [b for b in sizes if b not in known]
        if missing:
            known.update(measure_latency(chain, x_init, missing))
            self.source = "measured"
            if stable and self.cache:
                self._write_disk(key, known)
        _MEMORY_CACHE[key] = known
        self.latency = LatencyCurve({b: known[b] for b in sizes})
        self.measured = True

    def _bind_outside(self, chain, x_init: Tensor, drafter, key: str, stable: bool) -> None:
        known = _MEMORY_CACHE.get(key) or (self._read_disk(key) if stable and self.cache else {})
        if set(known) != {0, 1}:
            c, h = measure_outside(chain, x_init, drafter)
            known = {0: c, 1: h}
            if stable and self.cache:
                self._write_disk(key, known)
        _MEMORY_CACHE[key] = known
        self.per_round, self.per_step = known[0], known[1]
        self.outside_known = True

    @staticmethod
    def _read_disk(key: str) -> dict[int, float]:
        try:
            data = json.loads((_cache_dir() / "latency.json").read_text())
            return {int(b): float(t) for b, t in data.get(key, {}).items()}
        except (OSError, ValueError, AttributeError):
            return {}

    @staticmethod
    def _write_disk(key: str, curve: dict[int, float]) -> None:
        path = _cache_dir() / "latency.json"
        try:
            data = json.loads(path.read_text()) if path.exists() else {}
            data[key] = {str(b): t for b, t in sorted(curve.items())}
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(data, indent=1))
            tmp.replace(path)
        except (OSError, ValueError):
            pass  # a read-only home must not stop sampling: the curve stays in memory

    # -- the policy ----------------------------------------------------------------------
    def choose(self, stats: SpeculativeStats, live: int) -> int:
        self._update_rows(stats)
        self._update_acceptance(stats)
        self._live = live
        window = self._best(self.rates(live))
        self.chosen[window] += 1
        return window

    def _update_rows(self, stats: SpeculativeStats) -> None:
        """Fold the rows of the rounds since the last choice into the share ``f`` (their positions up
        to each first rejection only: later drafts hold the noise of steps not committed yet)."""
        seen_verified, seen_possible = self._rows_seen
        verified, possible = stats.prefix_rows - seen_verified, stats.prefix_rows_possible - seen_possible
        if possible:
            self._rows = [self.memory * self._rows[0] + verified, self.memory * self._rows[1] + possible]
        self._rows_seen = (stats.prefix_rows, stats.prefix_rows_possible)

    def row_fraction(self) -> float:
        """``f``: the share of the rows a round could verify (``L + 1 - pi`` per sample) that rounds did
        verify, up to their first rejections (1 before any, and always 1 on a time-conditioned chain)."""
        verified, possible = self._rows
        if possible <= 0 or not self.skips_repeats:
            return 1.0
        return min(max(verified / possible, 1.0 / (self.max_window + 1)), 1.0)

    def _update_acceptance(self, stats: SpeculativeStats) -> None:
        acc = list(stats.accepted_by_position)[: self.max_window]
        prop = list(stats.proposed_by_position)[: self.max_window]
        _, acc_seen, prop_seen = self._seen
        for j in range(len(acc)):
            self._acc[j] = self.memory * self._acc[j] + acc[j] - acc_seen[j]
            self._prop[j] = self.memory * self._prop[j] + prop[j] - prop_seen[j]
        self._seen = (stats.rounds, acc + [0] * (self.max_window - len(acc)), prop + [0] * (self.max_window - len(prop)))

    def acceptance(self) -> list[float]:
        """Estimated acceptance per window position (position 0: a drafted root)."""
        pooled = (sum(self._acc) + self.prior_weight * self.prior_acceptance) / (sum(self._prop) + self.prior_weight)
        shrink = self.prior_weight
        return [(a + shrink * pooled) / (p + shrink) for a, p in zip(self._acc, self._prop)]

    def rates(self, live: int, accept: list[float] | None = None) -> list[float]:
        """``rate(L)`` of the module docstring for L = 1..max_window: expected committed steps per second."""
        a = self.acceptance() if accept is None else accept
        out, share = [], self.row_fraction()
        latency, per_round, per_step = self.latency, self.per_round, self.per_step  # runs every round
        drafted, exact, p_n, p_f = 0.0, 0.0, 1.0, 1.0  # E[C] and P(whole window) from a drafted / exact root
        for window in range(1, self.max_window + 1):
            j = window - 1
            drafted, exact = drafted + p_n, exact + p_f
            p_n, p_f = p_n * a[j], p_f * (1.0 if j == 0 else a[j])
            pi = p_n / (1 - p_f + p_n) if (1 - p_f + p_n) > 0 else 1.0
            committed = pi * exact + (1 - pi) * drafted
            seconds = latency(share * live * (window + 1 - pi)) + per_round + per_step * window
            out.append(live * committed / max(seconds, 1e-12))
        return out

    def expected_rate(self, window: int, live: int, accept: list[float] | None = None) -> float:
        return self.rates(live, accept)[window - 1]

    def best_window(self, live: int) -> int:
        return self._best(self.rates(live))

    def _best(self, rates: list[float]) -> int:
        good = max((1 - self.tolerance) * max(rates), rates[0])  # and never slower than the plain sampler
        return 1 + max(w for w, rate in enumerate(rates) if rate >= good)

    def describe(self) -> str:
        """Which windows were chosen and why (for the CLI)."""
        a = self.acceptance()
        pooled = sum(a) / len(a)
        b = self._live or 1
        t1 = self.latency(b) if self.latency.points else float("nan")
        curve = ", ".join(f"t({k}B)={self.latency(k * b) / t1:.1f}" for k in (2, 5, 9, 17, 33)
                          if k <= self.max_window + 1)
        used = ", ".join(f"L={w} x{n}" for w, n in sorted(self.chosen.items())) or "none yet"
        return (f"auto window (max {self.max_window}): rounds {used}; chosen to maximise expected committed steps "
                f"per second, E[C|L]/(t(rows)+c+h*L), with acceptance ~{pooled:.3f} (position 0: {a[0]:.3f}), "
                f"latency t(B)={t1 * 1e3:.1f} ms for B={b} live rows and t(kB)/t(B): {curve} ({self.source}), "
                f"verified rows {self.row_fraction():.0%} of L + 1 per sample, "
                f"outside the network {self.per_round * 1e3:.2f} ms per round + {self.per_step * 1e3:.2f} ms per "
                f"drafted step (dry run)")

    def __repr__(self) -> str:
        return f"AutoWindow(max_window={self.max_window})"


def _still_true(cached: dict[int, float], check: dict[int, float], tolerance: float = 1.5) -> bool:
    """Does a quick measurement agree with a cached curve (its shape, and its level within ``tolerance``)?"""
    (b0, t0), *rest = sorted(check.items())
    ratio = t0 / cached[b0]
    if not 1 / tolerance < ratio < tolerance:
        return False
    return all(1 / tolerance < (t / t0) / (cached[b] / cached[b0]) < tolerance for b, t in rest)


def _expected_committed(accept: list[float], window: int, exact_root: bool = False) -> tuple[float, float]:
    """``(E[C], P(whole window accepted))`` for one round with per-position acceptance."""
    expected, survive = 0.0, 1.0
    for j in range(window):
        expected += survive
        survive *= 1.0 if (j == 0 and exact_root) else accept[min(j, len(accept) - 1)]
    return expected, survive
