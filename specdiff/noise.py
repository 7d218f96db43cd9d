"""Per-sample, per-step noise streams.

Every Gaussian a sampler consumes is keyed by (sample, step): ``z[b, k]`` is the k-th
draw of sample b's stream, whatever the window, the batch around it or the rejections
before it. Redrafting a step after a rejection therefore reuses the same ``z`` (exact:
the decision at step k never looks at ``z`` of later steps).

Generators follow diffusers' semantics:

* one ``torch.Generator`` for the whole batch: step k's noise is drawn as one tensor of
  the batch's shape, exactly as a diffusers scheduler's ``step`` draws it;
* a list with one generator per sample: each sample draws its own ``(1, *shape)``
  tensor, so a sample does not depend on the batch it is in.

The acceptance uniforms come from a *companion* stream seeded by a hash of the caller's
generator state on entry. The Gaussian stream is thus consumed exactly as the plain
sampler consumes it (``window=1`` reproduces it bit for bit), the uniforms never shift
it, and all randomness is still a function of the caller's generator(s).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import torch

GeneratorArg = torch.Generator | Sequence[torch.Generator] | None


def _companion(generator: torch.Generator) -> torch.Generator:
    state = generator.get_state().cpu().numpy().tobytes()
    seed = int.from_bytes(hashlib.sha256(b"specdiff-uniforms" + state).digest()[:8], "little")
    return torch.Generator().manual_seed(seed >> 1)


def split_generators(generator: GeneratorArg, batch_size: int) -> list[torch.Generator] | None:
    """Validate ``generator`` against the batch; a list must have one entry per sample."""
    if isinstance(generator, Sequence) and not isinstance(generator, torch.Generator):
        if len(generator) != batch_size:
            raise ValueError(
                f"got a list of {len(generator)} generators for a batch of {batch_size} samples; "
                "pass one generator per sample, or a single torch.Generator for the whole batch"
            )
        return list(generator)
    return None


class NoiseStreams:
    """Lazily drawn, step-keyed Gaussian noise and acceptance uniforms for a batch.

    ``gaussian(rows, steps)`` returns the noise of ``steps[i]`` for sample ``rows[i]``;
    ``uniform(rows, steps)`` the matching acceptance uniform. Streams are drawn in step
    order and forgotten once every sample of a group has moved past them.
    """

    def __init__(self, generator: GeneratorArg, like: torch.Tensor):
        batch_size = like.shape[0]
        per_sample = split_generators(generator, batch_size)
        if per_sample is None:
            if generator is None:
                # No generator given: seed one from torch's global RNG (diffusers' default
                # also draws from it), so torch.manual_seed still makes runs repeatable.
                seed = int(torch.randint(0, 2**62, (), generator=None))
                generator = torch.Generator(device="cpu").manual_seed(seed)
            self.groups = [(generator, list(range(batch_size)))]
        else:
            self.groups = [(g, [b]) for b, g in enumerate(per_sample)]
        self.group_of = torch.empty(batch_size, dtype=torch.long)
        self.slot_of = torch.empty(batch_size, dtype=torch.long)
        for gi, (_, rows) in enumerate(self.groups):
            for slot, b in enumerate(rows):
                self.group_of[b], self.slot_of[b] = gi, slot
        self.companions = [_companion(g) for g, _ in self.groups]
        self.shape, self.dtype, self.device = tuple(like.shape[1:]), like.dtype, like.device
        self._z: list[dict[int, torch.Tensor]] = [{} for _ in self.groups]
        self._u: list[dict[int, torch.Tensor]] = [{} for _ in self.groups]
        self._drawn = [0] * len(self.groups)

    def _draw_until(self, gi: int, step: int) -> None:
        generator, rows = self.groups[gi]
        shape = (len(rows), *self.shape)
        while self._drawn[gi] <= step:
            k = self._drawn[gi]
            z = torch.randn(shape, generator=generator, device=generator.device, dtype=self.dtype)
            self._z[gi][k] = z.to(self.device)
            self._u[gi][k] = torch.rand(len(rows), generator=self.companions[gi], dtype=torch.float64)
            self._drawn[gi] += 1

    def _lookup(self, table: list[dict[int, torch.Tensor]], rows: torch.Tensor, steps: torch.Tensor):
        out = []
        for b, k in zip(rows.tolist(), steps.tolist()):
            gi, slot = int(self.group_of[b]), int(self.slot_of[b])
            self._draw_until(gi, k)
            out.append(table[gi][k][slot])
        return torch.stack(out)

    def gaussian(self, rows: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
        return self._lookup(self._z, rows, steps)

    def uniform(self, rows: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
        return self._lookup(self._u, rows, steps)

    def forget_before(self, steps: torch.Tensor) -> None:
        """Drop noise no sample can need again (every row of a group is past it)."""
        for gi, (_, rows) in enumerate(self.groups):
            oldest = int(steps[rows].min())
            for table in (self._z[gi], self._u[gi]):
                for k in [k for k in table if k < oldest]:
                    del table[k]
