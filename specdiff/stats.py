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
    * ``chosen_windows``: the window of each round (constant unless the window is automatic);
      ``window_choice``: how an automatic window chose it (its policy's ``describe()``).
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

    def __post_init__(self):
        b, w = self.batch_size, self.window
        self.committed_per_round = self.committed_per_round or [0] * (w + 1)
        self.proposed_by_position = self.proposed_by_position or [0] * w
        self.accepted_by_position = self.accepted_by_position or [0] * w
        self.per_sample_target_calls = self.per_sample_target_calls or [0] * b
        self.per_sample_proposed = self.per_sample_proposed or [0] * b
        self.per_sample_accepted = self.per_sample_accepted or [0] * b

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
