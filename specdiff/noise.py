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
_BLOCK = 32  # steps of a companion stream drawn at once


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
            if len({id(g) for g in per_sample}) < len(per_sample):
                raise ValueError(
                    "the generator list holds the same torch.Generator more than once; the speculative sampler keys "
                    "each sample's randomness to its own generator, so pass distinct ones, e.g. "
                    "[torch.Generator().manual_seed(s) for s in seeds], or a single generator for the whole batch"
                )
            self.groups = [(g, torch.tensor([b])) for b, g in enumerate(per_sample)]
        self.group_of = torch.zeros(batch, dtype=torch.long)  # sample -> its generator
        self.slot_of = torch.zeros(batch, dtype=torch.long)  # sample -> its row in that generator's draws
        for gi, (_, rows) in enumerate(self.groups):
            self.group_of[rows], self.slot_of[rows] = gi, torch.arange(len(rows))
        self.uniforms = [_companion(g, b"specdiff-uniforms") for g, _ in self.groups]
        self.residuals = [_companion(g, b"specdiff-residuals") for g, _ in self.groups]
        self.kind, self.shape, self.device = kind, tuple(like.shape[1:]), like.device
        self.dtype = torch.promote_types(like.dtype, torch.float32) if like.is_floating_point() else torch.float64
        self._plain = per_sample is None  # one generator: a sample's slot is its index
        # Per group, what = 0 (main noise), 1 (uniforms), 2 (residual seeds): the kept steps
        # stacked, [step - first[what], slot, ...], and how many steps each stream has drawn.
        self._tables = [[None, None, None] for _ in self.groups]
        self._first = [[0, 0, 0] for _ in self.groups]
        self._drawn = [[0, 0, 0] for _ in self.groups]

    def _draw(self, gi: int, what: int, step: int) -> torch.Tensor:
        """The stack of stream ``what`` of group ``gi``, drawn up to ``step`` at least."""
        drawn = self._drawn[gi][what]
        if drawn <= step:
            generator, rows = self.groups[gi]
            if what == 0:  # the caller's generator: one step at a time, in order, never ahead
                shape = (len(rows), *self.shape)
                if self.kind == "uniform" and generator.device.type == "cpu":
                    # The CPU generator draws float64 uniforms one element after the other: the
                    # steps at once are the very numbers (and end state) of one draw per step.
                    block = torch.rand((step + 1 - drawn, *shape), generator=generator, dtype=torch.float64)
                else:
                    dist = torch.randn if self.kind == "normal" else torch.rand
                    dtype = self.dtype if self.kind == "normal" else torch.float64
                    block = torch.stack([dist(shape, generator=generator, device=generator.device, dtype=dtype)
                                         for _ in range(drawn, step + 1)])
            else:  # a companion stream: whole blocks of steps (the same numbers as step by step)
                count = -(-(step + 1 - drawn) // _BLOCK) * _BLOCK
                if what == 1:
                    block = torch.rand((count, len(rows)), generator=self.uniforms[gi], dtype=torch.float64)
                else:
                    block = torch.randint(0, 2**62, (count, len(rows)), generator=self.residuals[gi])
            old = self._tables[gi][what]
            self._tables[gi][what] = block if old is None or not len(old) else torch.cat([old, block])
            self._drawn[gi][what] = drawn + len(block)
        return self._tables[gi][what]

    def _lookup(self, what: int, rows: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
        """Stream ``what`` at (``rows``, ``steps``), broadcast together (``[m]`` rows with a
        ``[span, m]`` grid of steps gives ``[span, m, ...]``)."""
        rows = rows if rows.device.type == "cpu" else rows.cpu()
        steps = steps if steps.device.type == "cpu" else steps.cpu()
        if len(self.groups) == 1:
            return self._on_device(what, self._gather(0, what, steps, rows if self._plain else self.slot_of[rows]))
        shape = torch.broadcast_shapes(rows.shape, steps.shape)
        rows, steps = rows.expand(shape).flatten(), steps.expand(shape).flatten()
        groups, out = self.group_of[rows], None
        for gi in groups.unique().tolist():
            at = (groups == gi).nonzero().squeeze(1)
            picked = self._gather(gi, what, steps[at], self.slot_of[rows[at]])
            if out is None:
                out = picked.new_empty((len(rows), *picked.shape[1:]))
            out[at.to(out.device)] = picked
        return self._on_device(what, out.view(*shape, *out.shape[1:]))

    def _on_device(self, what: int, picked: torch.Tensor) -> torch.Tensor:
        """The step noise on the states' device: a CPU generator's draws are kept and gathered on
        the host, and what a lookup picks crosses to the device in one copy (whatever the number of
        generators); uniforms and residual seeds stay on the host."""
        return picked if what != 0 or picked.device == self.device else picked.to(self.device)

    def _gather(self, gi: int, what: int, steps: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        lo, hi = (int(v) for v in torch.aminmax(steps))
        first = self._first[gi][what]
        if lo < first:
            raise RuntimeError(f"step {lo} was forgotten (NoiseStreams.forget_before); its noise is gone")
        table = self._draw(gi, what, hi)
        at = steps - first if first else steps
        if table.device != at.device:
            at, slots = at.to(table.device), slots.to(table.device)
        return table[at, slots]

    def noise(self, rows: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
        """The step noise of ``steps[i]`` for sample ``rows[i]``: ``[len(rows), *shape]`` (or any
        shape ``rows`` and ``steps`` broadcast to, followed by ``shape``)."""
        return self._lookup(0, rows, steps)

    def noise_at(self, step: int) -> torch.Tensor:
        """Every sample's noise at one ``step`` (the plain loop): ``noise(arange(batch), step)``, the same
        numbers, drawn without the per-row gather of a round's ragged lookups."""
        if len(self.groups) == 1:
            batch = len(self.group_of)
            return self.noise(torch.arange(batch), torch.full((batch,), step, dtype=torch.long))
        picked = [self._draw(gi, 0, step)[step - self._first[gi][0]] for gi in range(len(self.groups))]
        return self._on_device(0, torch.cat(picked))

    def uniform(self, rows: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
        """Acceptance uniforms ``[len(rows)]`` (float64, CPU)."""
        return self._lookup(1, rows, steps)

    def residual_seeds(self, rows: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
        """The seeds of :meth:`residual_generators` (int64, CPU; ``rows`` and ``steps`` broadcast)."""
        return self._lookup(2, rows, steps)

    def residual_generators(self, rows: torch.Tensor, steps: torch.Tensor) -> list[torch.Generator]:
        """The private sub-streams of the rejection residuals of (``rows[i]``, ``steps[i]``)."""
        return [torch.Generator().manual_seed(s) for s in self.residual_seeds(rows, steps).tolist()]

    def forget_before(self, n: torch.Tensor) -> None:
        """Drop the draws of steps that every sample of a generator has moved past."""
        n = n if n.device.type == "cpu" else n.cpu()
        for gi, (_, rows) in enumerate(self.groups):
            oldest = int(n.min() if self._plain else n[rows].min())
            for what, table in enumerate(self._tables[gi]):
                first = self._first[gi][what]
                if table is not None and oldest > first:
                    self._tables[gi][what] = table[min(oldest, self._drawn[gi][what]) - first :]
                    self._first[gi][what] = min(oldest, self._drawn[gi][what])
