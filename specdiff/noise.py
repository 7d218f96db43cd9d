"""Per-sample, per-step randomness, keyed so a sample never depends on its batch or window.

Every draw a sampler consumes is keyed by (sample, step):

* ``noise(rows, steps)``: the step's noise from the caller's generator(s), drawn as a diffusers
  scheduler's ``step`` draws it — ``z ~ N(0, I)`` of the states' shape for a Gaussian kernel, one
  float64 uniform per position for a categorical one. It makes the drafted step, or the plain
  sampler's step: so ``window=1`` reproduces the plain sampler bit for bit. Gaussian noise is
  drawn in float32 (or the states' wider dtype), never in fp16/bf16: the reflection coupling is
  exact for a continuous ``z``, and half-precision draws sit on a coarse grid.
* ``uniform(rows, steps)``: the acceptance uniform ``u`` of the step's coupling test, and
  ``residual_generators(rows, steps)``: a private sub-stream for the step's rejection residual.
  Both come from *companion* generators seeded by a hash of the caller's generator state on
  entry, so they never shift the main stream and are still a function of the caller's generator.

Why keyed draws keep the sampler exact: the decision at step k uses ``u[k]``, independent of the
drafted step (made from ``noise[k]``); a rejected step is committed, so its residual stream is
used once; and a step redrafted after an earlier rejection reuses the same ``noise[k]``, which
is fine because the decision at step k never looks at the randomness of later steps.

Generators follow diffusers' semantics: one ``torch.Generator`` draws step k for the whole batch
as one tensor; a list holds one generator per sample, each drawing its own ``(1, ...)`` tensor.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import torch

GeneratorArg = torch.Generator | Sequence[torch.Generator] | None


def split_generators(generator: GeneratorArg, batch_size: int) -> list[torch.Generator] | None:
    """Validate ``generator`` against the batch; a list must have one entry per sample."""
    if isinstance(generator, Sequence) and not isinstance(generator, torch.Generator):
        if len(generator) != batch_size:
            raise ValueError(
                f"got a list of {len(generator)} generators for a batch of {batch_size} samples; "
                "pass one generator per sample, or a single torch.Generator for the whole batch"
            )
        return list(generator)
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or a list of them; got {type(generator).__name__}")
    return None


def _companion(generator: torch.Generator, purpose: bytes) -> torch.Generator:
    state = generator.get_state().cpu().numpy().tobytes()
    seed = int.from_bytes(hashlib.sha256(purpose + state).digest()[:8], "little")
    return torch.Generator().manual_seed(seed >> 1)


class NoiseStreams:
    """Lazily drawn, step-keyed randomness of a batch ``like`` (see the module docstring).

    ``kind`` is ``"normal"`` (Gaussian noise in ``like``'s dtype) or ``"uniform"`` (float64
    uniforms). Each generator's steps are drawn in increasing order, as soon as any of its
    samples needs them, so its sequence is the plain sampler's; a step is forgotten once every
    sample of the generator has moved past it.
    """

    def __init__(self, generator: GeneratorArg, like: torch.Tensor, kind: str = "normal"):
        batch = like.shape[0]
        per_sample = split_generators(generator, batch)
        if per_sample is None:
            if generator is None:  # seeded from torch's global RNG, so torch.manual_seed repeats runs
                generator = torch.Generator().manual_seed(int(torch.randint(0, 2**62, ())))
            self.groups = [(generator, torch.arange(batch))]
        else:
            self.groups = [(g, torch.tensor([b])) for b, g in enumerate(per_sample)]
        self.group_of = torch.zeros(batch, dtype=torch.long)  # sample -> its generator
        self.slot_of = torch.zeros(batch, dtype=torch.long)  # sample -> its row in that generator's draws
        for gi, (_, rows) in enumerate(self.groups):
            self.group_of[rows], self.slot_of[rows] = gi, torch.arange(len(rows))
        self.uniforms = [_companion(g, b"specdiff-uniforms") for g, _ in self.groups]
        self.residuals = [_companion(g, b"specdiff-residuals") for g, _ in self.groups]
        self.kind, self.shape, self.device = kind, tuple(like.shape[1:]), like.device
        self.dtype = torch.promote_types(like.dtype, torch.float32) if like.is_floating_point() else torch.float64
        self._tables: list[dict[int, tuple]] = [{} for _ in self.groups]
        self._drawn = [0] * len(self.groups)

    def _draw(self, gi: int, step: int) -> tuple:
        generator, rows = self.groups[gi]
        while self._drawn[gi] <= step:
            shape = (len(rows), *self.shape)
            if self.kind == "normal":
                main = torch.randn(shape, generator=generator, device=generator.device, dtype=self.dtype)
            else:
                main = torch.rand(shape, generator=generator, device=generator.device, dtype=torch.float64)
            u = torch.rand(len(rows), generator=self.uniforms[gi], dtype=torch.float64)
            seeds = torch.randint(0, 2**62, (len(rows),), generator=self.residuals[gi])
            self._tables[gi][self._drawn[gi]] = (main.to(self.device), u, seeds)
            self._drawn[gi] += 1
        return self._tables[gi][step]

    def _lookup(self, what: int, rows: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
        rows, steps = rows.cpu(), steps.cpu()
        if len(self.groups) == 1:  # one generator: one gather from the stacked steps
            return self._gather(0, what, steps, self.slot_of[rows])
        groups, out = self.group_of[rows], None
        for gi in groups.unique().tolist():
            at = (groups == gi).nonzero().squeeze(1)
            picked = self._gather(gi, what, steps[at], self.slot_of[rows[at]])
            if out is None:
                out = picked.new_empty((len(rows), *picked.shape[1:]))
            out[at.to(out.device)] = picked
        return out

    def _gather(self, gi: int, what: int, steps: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        lo, hi = int(steps.min()), int(steps.max())
        table = torch.stack([self._draw(gi, k)[what] for k in range(lo, hi + 1)])  # [step, slot, ...]
        return table[(steps - lo).to(table.device), slots.to(table.device)]

    def noise(self, rows: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
        """The step noise of ``steps[i]`` for sample ``rows[i]``: ``[len(rows), *shape]``."""
        return self._lookup(0, rows, steps)

    def uniform(self, rows: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
        """Acceptance uniforms ``[len(rows)]`` (float64, CPU)."""
        return self._lookup(1, rows, steps)

    def residual_generators(self, rows: torch.Tensor, steps: torch.Tensor) -> list[torch.Generator]:
        """The private sub-streams of the rejection residuals of (``rows[i]``, ``steps[i]``)."""
        return [torch.Generator().manual_seed(int(s)) for s in self._lookup(2, rows, steps).tolist()]

    def forget_before(self, n: torch.Tensor) -> None:
        """Drop the draws of steps that every sample of a generator has moved past."""
        n = n.cpu()
        for gi, (_, rows) in enumerate(self.groups):
            oldest = int(n[rows].min())
            for k in [k for k in self._tables[gi] if k < oldest]:
                del self._tables[gi][k]
