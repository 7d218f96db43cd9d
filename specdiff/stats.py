"""Accounting returned by every speculative run (never printed by the library)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass
class SpeculativeStats:
    """What a speculative run cost, next to what the plain sampler would cost.

    * ``target_calls``: sequential batched target-network calls (the latency unit; the
      plain sampler makes ``num_steps``). Includes the warm-up call.
    * ``target_rows``: states evaluated by the target over all calls (the compute unit).
    * ``draft_calls``: sequential drafter-network calls (0 for the frozen drafter).
    * ``proposed`` / ``accepted``: drafted steps put to the coupling test / accepted.
      Steps whose target prediction was already known are exact by construction and
      count in neither.
    * ``committed_per_round[c]``: number of (sample, round) pairs that committed c steps.
    * ``per_sample_target_calls[b]``: calls in which sample b had at least one row.
    * ``peak_rows``: the most states evaluated in one network call (after the ``max_rows`` cap);
      ``peak_memory``: the peak device memory allocated during the run, in bytes (CUDA only).
    * ``prefix_rows`` / ``prefix_rows_possible``: the rows verified, and the rows that would have been
      without skipping unchanged states (a time-free chain), at the positions up to each round's first
      rejection. They depend on the randomness of committed steps only, so a window policy may steer
      by them; ``target_rows``, ``target_calls`` and ``per_sample_target_calls`` also count rows
      after the first rejection, whose skipping on a time-free chain depends on the noise of steps
      a later round redrafts, so a policy must not.
    * ``chosen_windows`` (also ``windows``): the window of each round (constant unless the window is
      automatic; the largest any sample ran, clamped at the last steps). Every live sample runs the
      round's window, so this list is the run's whole schedule: ``window=stats.windows`` replays it
      bit for bit (:class:`specdiff.window.ReplayWindow`). ``window_choice``: how an automatic window
      chose it (its policy's ``describe()``).
    * ``calibration_seconds`` / ``calibration_rows``: what measuring the machine cost this run (the
      automatic window's calibration, :mod:`specdiff.calibration`; 0 when cached), included in
      ``wall_clock``.
    """

    num_steps: int
    batch_size: int
    window: int
    target_calls: int = 0
    target_rows: int = 0
    draft_calls: int = 0
    proposed: int = 0
    accepted: int = 0
    rounds: int = 0
    residual_draws: int = 0
    prefix_rows: int = 0
    prefix_rows_possible: int = 0
    committed_per_round: list[int] = field(default_factory=list)
    proposed_by_position: list[int] = field(default_factory=list)
    accepted_by_position: list[int] = field(default_factory=list)
    per_sample_target_calls: list[int] = field(default_factory=list)
    per_sample_proposed: list[int] = field(default_factory=list)
    per_sample_accepted: list[int] = field(default_factory=list)
    wall_clock: float | None = None
    max_rows: int | None = None
    peak_rows: int = 0
    peak_memory: int | None = None
    chosen_windows: list[int] = field(default_factory=list)
    window_choice: str | None = None
    calibration_seconds: float = 0.0
    calibration_rows: int = 0

    def __post_init__(self):
        b, w = self.batch_size, self.window
        self.committed_per_round = self.committed_per_round or [0] * (w + 1)
        self.proposed_by_position = self.proposed_by_position or [0] * w
        self.accepted_by_position = self.accepted_by_position or [0] * w
        self.per_sample_target_calls = self.per_sample_target_calls or [0] * b
        self.per_sample_proposed = self.per_sample_proposed or [0] * b
        self.per_sample_accepted = self.per_sample_accepted or [0] * b

    @property
    def windows(self) -> list[int]:
        """The run's window schedule, one window per round: pass it back as ``window=`` to replay the run."""
        return list(self.chosen_windows)

    def merge(self, other: SpeculativeStats) -> SpeculativeStats:
        """The stats of two runs of the same chain (e.g. two batches of seeds run one after the other),
        as one: counts and times add, per-sample lists join (``self``'s samples first), per-position
        lists add, peaks take the larger. ``chosen_windows`` joins both schedules (replay each run
        from its own stats: a schedule belongs to its batch)."""
        if not isinstance(other, SpeculativeStats):
            raise TypeError(f"merge takes another SpeculativeStats; got {type(other).__name__}")
        if other.num_steps != self.num_steps:
            raise ValueError(f"cannot merge runs of {self.num_steps} and {other.num_steps} steps")

        def add(a: list[int], b: list[int]) -> list[int]:
            return [x + y for x, y in zip(a + [0] * (len(b) - len(a)), b + [0] * (len(a) - len(b)))]

        def larger(a, b):
            return b if a is None else a if b is None else max(a, b)

        return SpeculativeStats(
            num_steps=self.num_steps,
            batch_size=self.batch_size + other.batch_size,
            window=max(self.window, other.window),
            **{name: getattr(self, name) + getattr(other, name) for name in (
                "target_calls", "target_rows", "draft_calls", "proposed", "accepted", "rounds", "residual_draws",
                "prefix_rows", "prefix_rows_possible", "per_sample_target_calls", "per_sample_proposed",
                "per_sample_accepted", "chosen_windows", "calibration_seconds", "calibration_rows")},
            **{name: add(getattr(self, name), getattr(other, name)) for name in (
                "committed_per_round", "proposed_by_position", "accepted_by_position")},
            wall_clock=None if self.wall_clock is None or other.wall_clock is None else
            self.wall_clock + other.wall_clock,
            max_rows=None if None in (self.max_rows, other.max_rows) else max(self.max_rows, other.max_rows),
            peak_rows=max(self.peak_rows, other.peak_rows),
            peak_memory=larger(self.peak_memory, other.peak_memory),
            window_choice="\n".join(c for c in (self.window_choice, other.window_choice) if c) or None,
        )

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.proposed if self.proposed else 1.0

    @property
    def speedup(self) -> float:
        """Plain sampler's sequential calls over ours: ``num_steps / target_calls``."""
        return self.num_steps / max(self.target_calls, 1)

    @property
    def per_sample_speedup(self) -> list[float]:
        return [self.num_steps / max(c, 1) for c in self.per_sample_target_calls]

    @property
    def mean_committed_per_round(self) -> float:
        rounds = sum(self.committed_per_round)
        return sum(c * n for c, n in enumerate(self.committed_per_round)) / max(rounds, 1)

    def to_dict(self) -> dict:
        out = asdict(self)
        out.update(
            acceptance_rate=self.acceptance_rate,
            speedup=self.speedup,
            per_sample_speedup=self.per_sample_speedup,
            mean_committed_per_round=self.mean_committed_per_round,
        )
        return out

    def summary(self) -> str:
        """One line for humans (callers print it; the library never does)."""
        return (
            f"{self.num_steps} denoising steps in {self.target_calls} sequential network calls "
            f"(speedup {self.speedup:.2f}x over the plain sampler's calls; {self.target_rows} states evaluated, "
            f"{self.draft_calls} draft-model calls), {self.acceptance_rate:.1%} of drafted steps accepted, "
            f"{self.mean_committed_per_round:.2f} steps committed per call"
        )
