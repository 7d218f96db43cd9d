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
    ``uniform(rows, steps)`` the matching acceptance uniform. Every sample visits every
    step in increasing order, so drawing step k for the whole batch as soon as any sample
    needs it leaves each generator's sequence unchanged; a step is forgotten once every
    sample has moved past it.
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
            self.generators = [generator]
        else:
            self.generators = per_sample
        self.companions = [_companion(g) for g in self.generators]
        self.shape = (batch_size // len(self.generators), *like.shape[1:])
        self.dtype, self.device = like.dtype, like.device
        self._z: dict[int, torch.Tensor] = {}
        self._u: dict[int, torch.Tensor] = {}
        self._drawn = 0

    def _draw_until(self, step: int) -> None:
        while self._drawn <= step:
            z = [torch.randn(self.shape, generator=g, device=g.device, dtype=self.dtype) for g in self.generators]
            u = [torch.rand(self.shape[0], generator=c, dtype=torch.float64) for c in self.companions]
            self._z[self._drawn] = torch.cat(z).to(self.device)
            self._u[self._drawn] = torch.cat(u)
            self._drawn += 1

    def _lookup(self, table: dict[int, torch.Tensor], rows: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
        rows, steps = rows.cpu(), steps.cpu()
        self._draw_until(int(steps.max()))
        out = table[int(steps[0])].new_empty((len(rows), *table[int(steps[0])].shape[1:]))
        for k in steps.unique().tolist():
            at = (steps == k).nonzero().squeeze(1)
            out[at.to(out.device)] = table[k][rows[at].to(out.device)]
        return out

    def gaussian(self, rows: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
        return self._lookup(self._z, rows, steps)

    def uniform(self, rows: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
        return self._lookup(self._u, rows, steps)

    def forget_before(self, steps: torch.Tensor) -> None:
        """Drop the noise of steps every sample has moved past."""
        oldest = int(steps.min())
        for table in (self._z, self._u):
            for k in [k for k in table if k < oldest]:
                del table[k]
