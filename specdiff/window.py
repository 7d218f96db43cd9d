"""Choosing the window L: a fixed integer, or a policy that looks at the past only.

``speculative_sample(chain, x_init, window=...)`` takes an int, ``"auto"``, a past run's schedule
(``stats.windows``, replayed by :class:`ReplayWindow`) or a :class:`WindowPolicy`. The driver calls
:func:`resolve_window` once, then
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
``t``, ``c`` and ``h`` come from :mod:`specdiff.calibration` (this module only does the arithmetic):
each measured once per model, device, dtype and row shape (and drafter and batch, for ``c, h``), within a
budget bounded by the run, cached in memory and in a small JSON file under the user's cache
directory, and never re-measured unless asked (``recalibrate=True``); ``a_j`` and ``f`` are
estimated from the run's own accept/reject and row counts (exponential forgetting, shrinkage
towards a prior), starting from the prior in every run. So the windows, hence the samples, are a
function of the seeds, the batch and that cached calibration: the same seed gives the same images
run after run and process after process on a machine (timings never steer a run), and
``stats.windows`` replays them on any machine (bit for bit where the network computes the same numbers).
"""

from __future__ import annotations

import bisect
from collections import Counter
from typing import Protocol, runtime_checkable

from torch import Tensor

from .calibration import SHARE, calibrate
from .stats import SpeculativeStats


@runtime_checkable
class WindowPolicy(Protocol):
    """Chooses the window of each round from the past. ``max_window`` bounds it (the run's
    stats are sized by it)."""

    max_window: int

    def choose(self, stats: SpeculativeStats, live: int) -> int:
        """L for the next round, from the run so far (``live``: samples still running). Steer by
        the rounds, acceptance counts and ``prefix_rows`` only (see :class:`SpeculativeStats`)."""


WINDOW_FORMS = "a positive integer (1 = plain sampler), 'auto', a list of windows (a replay) or a WindowPolicy"


def window_error(window) -> ValueError:
    """The one message for a window that is none of the accepted forms."""
    return ValueError(f"window must be {WINDOW_FORMS}; got {window!r}")


def resolve_window(window, chain=None, x_init: Tensor | None = None, drafter=None,
                   max_rows: int | None = None, per_sample: bool = False) -> int | WindowPolicy:
    """An int (checked), or a policy bound to ``chain``/``x_init`` (and the run's ``drafter``):
    ``"auto"`` -> :class:`AutoWindow`; a list of windows or a run's :class:`SpeculativeStats` ->
    :class:`ReplayWindow` (the run's schedule, replayed)."""
    if isinstance(window, str):
        if window != "auto":
            raise window_error(window)
        window = AutoWindow()
    elif isinstance(window, (list, tuple, SpeculativeStats)):
        window = ReplayWindow(window)
    if isinstance(window, WindowPolicy) and not isinstance(window, (int, str)):
        if not isinstance(window.max_window, int) or window.max_window < 1:
            raise ValueError(
                f"{type(window).__name__}.max_window must be a positive integer; got {window.max_window!r}"
            )
        if hasattr(window, "bind") and chain is not None and x_init is not None:
            if isinstance(window, AutoWindow):
                window.bind(chain, x_init, drafter, max_rows, per_sample=per_sample)
            else:
                window.bind(chain, x_init, drafter)
        return window
    if not isinstance(window, int) or isinstance(window, bool) or window < 1:
        raise window_error(window)
    return window


class ReplayWindow:
    """The windows of a past run, round by round: ``speculative_sample(..., window=stats.windows)`` (or
    ``window=stats``) reproduces that run's samples bit for bit, on any machine whose network computes the
    same numbers (device type, dtype, kernels), from the same chain,
    ``x_init``, drafter and generators. The schedule is fixed before the run (it reads nothing of
    it), so the law is exact whatever the list; a schedule recorded from another run (other batch,
    steps, seeds or drafter) is refused as soon as it disagrees with this one."""

    def __init__(self, windows):
        expected = {}
        if isinstance(windows, SpeculativeStats):
            expected = {"batch": windows.batch_size, "steps": windows.num_steps}
            windows = windows.windows
        windows = list(windows)
        if not windows or any(not isinstance(w, int) or isinstance(w, bool) or w < 1 for w in windows):
            raise ValueError(
                "a replayed window schedule must be a non-empty list of positive integers, one per round "
                f"(a run's stats.windows); got {windows!r}"
            )
        self.windows, self.expected, self.max_window = windows, expected, max(windows)

    def bind(self, chain, x_init: Tensor, drafter=None) -> None:
        got = {"batch": x_init.shape[0], "steps": chain.num_steps}
        for name, value in self.expected.items():
            if got[name] != value:
                raise ValueError(
                    f"the replayed stats are from a run of {value} {'samples' if name == 'batch' else 'steps'}; this "
                    f"run has {got[name]}: replay a run with the same batch, steps, seeds and drafter"
                )

    def choose(self, stats: SpeculativeStats, live: int) -> int:
        self._check(stats)
        if stats.rounds >= len(self.windows):
            raise ValueError(
                f"the replayed schedule has {len(self.windows)} rounds and this run needs more: it was recorded "
                "from another run (batch, steps, seeds, drafter or x_init differ)"
            )
        return self.windows[stats.rounds]

    def finish(self, stats: SpeculativeStats) -> None:
        """After the run: every round of the schedule was used, as recorded."""
        self._check(stats)
        if stats.rounds != len(self.windows):
            raise ValueError(
                f"the replayed schedule has {len(self.windows)} rounds and this run finished after {stats.rounds}: "
                "it was recorded from another run (batch, steps, seeds, drafter or x_init differ)"
            )

    def _check(self, stats: SpeculativeStats) -> None:
        r = stats.rounds - 1  # the last round: the sampler records the window it ran (clamped at the end)
        if r >= 0 and stats.windows[r] != self.windows[r]:
            raise ValueError(
                f"round {r + 1} of the replayed schedule ran window {stats.windows[r]}, recorded {self.windows[r]}: "
                "the schedule was recorded from another run (batch, steps, seeds, drafter or x_init differ)"
            )

    def describe(self) -> str:
        return f"replayed window schedule ({len(self.windows)} rounds, max {self.max_window})"

    def __repr__(self) -> str:
        return f"ReplayWindow({len(self.windows)} rounds)"


# ----------------------------------------------------------------------------------------
# Batch-latency curve t(b)


class LatencyCurve:
    """Seconds of one target call as a function of its rows: piecewise linear through the
    measured points (made non-decreasing by pooling adjacent violators, and never above proportional
    to rows from the smallest point: ``k b`` rows cost at most ``k`` calls of ``b``), and beyond the
    largest point proportional to rows at its cost per row (an upper bound: a larger batch does not
    cost more per row), so rows it has not measured are never priced as a bargain."""

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
            ts = [total / count for total, count in blocks for _ in range(count)]
            self._sorted = (bs, [min(t, ts[0] * b / bs[0]) for b, t in zip(bs, ts)])
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
        return ts[-1] * rows / bs[-1]


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
        recalibrate: measure this run's calibration again and replace the cached one (a cached
            calibration is otherwise never re-measured: :mod:`specdiff.calibration`).
        share: the most rows the calibration may measure, as a share of the plain sampler's
            ``batch * steps`` (a run that cannot afford three batch sizes measures none and runs ``L = 1``).
        margin: a window above 1 is taken only where its expected rate beats the plain sampler's
            (``L = 1``) by this fraction. The calibration and the acceptance estimate err by about
            that much on a shared CPU, and the default must not be slower than the plain sampler;
            0 takes any window the model predicts faster.

    Every run starts from the same state (``bind`` forgets the last run), so an object reused across
    runs gives a seed the same windows every time.
    """

    def __init__(self, max_window: int = 32, *, prior_acceptance: float = 0.9, prior_weight: float = 4.0,
                 memory: float = 0.95, latency: dict[int, float] | None = None,
                 outside: tuple[float, float] | None = None, cache: bool = True, tolerance: float = 0.03,
                 recalibrate: bool = False, share: float = SHARE, margin: float = 0.1):
        if not isinstance(max_window, int) or isinstance(max_window, bool) or max_window < 1:
            raise ValueError(f"max_window must be a positive integer; got {max_window!r}")
        if not 0 < prior_acceptance < 1:
            raise ValueError(f"prior_acceptance must be in (0, 1); got {prior_acceptance!r}")
        if not 0 <= tolerance < 1:
            raise ValueError(f"tolerance must be in [0, 1); got {tolerance!r}")
        if not 0 <= share <= 1:
            raise ValueError(f"share must be in [0, 1] (of the plain sampler's rows); got {share!r}")
        if not 0 <= margin:
            raise ValueError(f"margin must be >= 0 (a fraction of the plain sampler's rate); got {margin!r}")
        self.max_window, self.tolerance, self.margin = max_window, tolerance, margin
        self.prior_acceptance, self.prior_weight, self.memory = prior_acceptance, prior_weight, memory
        self.given = (latency, outside)
        self.cache, self.recalibrate, self.share = cache, recalibrate, share
        self.latency = LatencyCurve(latency)
        self.source = "given" if latency is not None else "none"
        self.per_round, self.per_step = outside if outside is not None else (0.0, 0.0)  # c, h (seconds)
        self.calibration_seconds, self.calibration_rows = 0.0, 0
        self.skips_repeats = True  # rows may be skipped (a time-free chain); bind() says False for a timed one
        self.reset()

    def reset(self) -> None:
        """Forget the last run (acceptance, rows, windows chosen): every run starts from the prior."""
        self.chosen: Counter[int] = Counter()
        self._seen = (0, [0] * self.max_window, [0] * self.max_window)
        self._acc = [0.0] * self.max_window
        self._prop = [0.0] * self.max_window
        self._rows = [0.0, 0.0]  # decayed sums of the rounds' verified and possible rows (stats.prefix_rows)
        self._rows_seen = (0, 0)
        self._live = 0

    # -- binding (the calibration lives in specdiff.calibration) ---------------------------
    def bind(self, chain, x_init: Tensor, drafter=None, max_rows: int | None = None, per_sample: bool = False) -> None:
        """Start a run of ``chain`` from ``x_init``: forget the last run (:meth:`reset`) and take the
        machine's calibration for it (:func:`specdiff.calibration.calibrate`: given, cached, or measured
        within the run's budget; ``per_sample``: the run draws from one generator per sample, whose
        bookkeeping the dry run then measures)."""
        self.reset()
        self._batch = x_init.shape[0]
        # Only a time-free chain verifies fewer rows than drafted (unchanged states); on a timed one,
        # fewer rows happen at the last steps only (windows clamped there), which must not shrink f.
        self.skips_repeats = not getattr(chain, "time_conditioned", True)
        latency, outside = self.given
        found = calibrate(chain, x_init, drafter, max_window=self.max_window, max_rows=max_rows, latency=latency,
                          outside=outside, cache=self.cache, recalibrate=self.recalibrate, share=self.share,
                          per_sample=per_sample)
        self.latency, self.source = LatencyCurve(found.latency), found.source
        self.per_round, self.per_step = found.outside
        self.calibration_seconds, self.calibration_rows = found.seconds, found.rows

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
        pad = [0] * self.max_window
        self._seen = (stats.rounds, (acc + pad)[: self.max_window], (prop + pad)[: self.max_window])

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

    def runs_plain(self, live: int) -> bool:
        """Will this run take ``L = 1`` in every round, whatever happens? True on a time-conditioned chain
        whose first choice is 1: a round of one step from an exact root proposes nothing, so the
        acceptance stays at the prior, the row share at 1, the live count at ``live``, and the choice
        at 1. The sampler then runs the plain loop (the same samples bit for bit, without the round's
        bookkeeping). Call after :meth:`bind`."""
        return not self.skips_repeats and not self._prop[0] and self.best_window(live) == 1

    def best_window(self, live: int) -> int:
        return self._best(self.rates(live))

    def _best(self, rates: list[float]) -> int:
        if max(rates) < (1 + self.margin) * rates[0]:  # not clearly faster than the plain sampler
            return 1
        good = max((1 - self.tolerance) * max(rates), rates[0])  # and never slower than the plain sampler
        return 1 + max(w for w, rate in enumerate(rates) if rate >= good)

    def describe(self) -> str:
        """Which windows were chosen and why (for the CLI)."""
        a = self.acceptance()
        pooled = sum(a) / len(a)
        b = getattr(self, "_batch", 0) or self._live or 1  # the run's batch (live samples thin out at the end)
        t1 = self.latency(b) if self.latency.points else float("nan")
        curve = ", ".join(f"t({k}B)={self.latency(k * b) / t1:.1f}" for k in (2, 5, 9, 17, 33)
                          if k <= self.max_window + 1)
        used = ", ".join(f"L={w} x{n}" for w, n in sorted(self.chosen.items())) or "none yet"
        return (f"auto window (max {self.max_window}): rounds {used}; chosen to maximise expected committed steps "
                f"per second, E[C|L]/(t(rows)+c+h*L), with acceptance ~{pooled:.3f} (position 0: {a[0]:.3f}), "
                f"latency t(B)={t1 * 1e3:.1f} ms for B={b} rows and t(kB)/t(B): {curve} ({self.source}), "
                f"verified rows {self.row_fraction():.0%} of L + 1 per sample, "
                f"outside the network {self.per_round * 1e3:.2f} ms per round + {self.per_step * 1e3:.2f} ms per "
                f"drafted step (dry run); calibration this run: {self.calibration_rows} rows, "
                f"{self.calibration_seconds:.2f} s")

    def __repr__(self) -> str:
        return f"AutoWindow(max_window={self.max_window})"


def _expected_committed(accept: list[float], window: int, exact_root: bool = False) -> tuple[float, float]:
    """``(E[C], P(whole window accepted))`` for one round with per-position acceptance."""
    expected, survive = 0.0, 1.0
    for j in range(window):
        expected += survive
        survive *= 1.0 if (j == 0 and exact_root) else accept[min(j, len(accept) - 1)]
    return expected, survive
