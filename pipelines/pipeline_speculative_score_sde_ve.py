"""SpeculativeScoreSdeVePipeline: a drop-in ``ScoreSdeVePipeline`` that samples speculatively.

Same components (``unet``: the score model ``unet(x, sigma).sample``; ``scheduler``: a
``ScoreSdeVeScheduler``) and call as diffusers' ``ScoreSdeVePipeline``, plus ``window`` and a
drafter. With ``correct_steps=0`` (predictor only) the images have exactly the law of
``ScoreSdeVePipeline``'s, and with ``window=1`` they are the same images for the same generator.

diffusers' corrector (``step_correct``) sizes its step from the batch-averaged norms of the score
and of the very noise it adds: its step is not a Gaussian with a fixed std, so no exact
verification can follow it, and a scheduler with ``correct_steps > 0`` is refused unless
``corrector_step_size=`` is passed, which runs a *different* corrector: Song & Ermon's annealed
Langevin step with a fixed step size (:class:`specdiff.langevin.ScoreSdeVeChain`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import PIL.Image
import torch
from diffusers import DiffusionPipeline, ScoreSdeVeScheduler, UNet2DModel
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor
from torch import Tensor

from specdiff.drafters import Drafter
from specdiff.langevin import ScoreSdeVeChain
from specdiff.pipelines.speculative_utils import check_generators, progress_for, rule_options, speculative_from_pipe
from specdiff.sampler import speculative_sample
from specdiff.schedulers import SpeculativeScheduler
from specdiff.stats import SpeculativeStats


@dataclass
class SpeculativeScoreSdeVePipelineOutput(BaseOutput):
    """``images`` as ``ScoreSdeVePipeline`` returns them, and the run's :class:`specdiff.SpeculativeStats`."""

    images: list[PIL.Image.Image] | np.ndarray | torch.Tensor
    stats: SpeculativeStats | None = None


class _AllButLast:
    """The chain without its last step (the last predictor step): the pipeline returns that step's
    mean, not a draw, so the speculative sampler runs the steps before it."""

    def __init__(self, chain: ScoreSdeVeChain):
        self.chain, self.num_steps = chain, chain.num_steps - 1
        self.kernel, self.affine = chain.kernel, chain.affine

    def predict(self, x: Tensor, step: Tensor) -> Tensor:
        return self.chain.predict(x, step)

    def transition(self, x: Tensor, step: Tensor, prediction: Tensor):
        return self.chain.transition(x, step, prediction)

    def transition_affine(self, step: Tensor, prediction: Tensor):
        return self.chain.transition_affine(step, prediction)


class SpeculativeScoreSdeVePipeline(DiffusionPipeline):
    r"""Unconditional image generation with the score SDE (variance exploding), sampled speculatively
    (De Bortoli et al. 2025).

    Args:
        unet ([`UNet2DModel`]): the score model, ``unet(x, sigma).sample`` (the *target*).
        scheduler ([`ScoreSdeVeScheduler`]): its noise levels; ``correct_steps > 0`` needs
            ``corrector_step_size=`` at the call (see the module's docstring).
    """

    model_cpu_offload_seq = "unet"

    def __init__(self, unet: UNet2DModel, scheduler: ScoreSdeVeScheduler):
        super().__init__()
        if not isinstance(scheduler, ScoreSdeVeScheduler):
            raise TypeError(f"scheduler must be a ScoreSdeVeScheduler; got {type(scheduler).__name__}")
        self.register_modules(unet=unet, scheduler=scheduler)

    @classmethod
    def from_pipe(cls, pipeline, **kwargs):
        """From a ``ScoreSdeVePipeline`` (or any pipeline with ``unet`` and a ``ScoreSdeVeScheduler``),
        sharing its components in their dtype."""
        given = [k for k in SpeculativeScheduler.options() if k in kwargs]
        if given:
            raise ValueError(f"{given} are options of the call here (the scheduler stays a ScoreSdeVeScheduler): "
                             "pass them to pipe(...)")
        return speculative_from_pipe(super().from_pipe, pipeline, kwargs)

    def _chain(self, num_inference_steps: int, corrector_step_size: float | None) -> ScoreSdeVeChain:
        correct_steps = int(self.scheduler.config.correct_steps)
        if correct_steps and corrector_step_size is None:
            raise ValueError(
                f"the scheduler has correct_steps={correct_steps}: diffusers' step_correct sizes its step from the "
                "batch's score and noise norms, which no exact verification can follow. Pass corrector_step_size= "
                "(a fixed annealed-Langevin corrector, alpha_i = corrector_step_size * sigma_i^2 / sigma_min^2: a "
                "different corrector from diffusers'), or a scheduler with correct_steps=0")
        if not correct_steps and corrector_step_size is not None:
            raise ValueError("corrector_step_size= sizes the corrector, but the scheduler has correct_steps=0: set "
                             "scheduler correct_steps > 0 (e.g. ScoreSdeVeScheduler.from_config(config, "
                             "correct_steps=1)) or drop corrector_step_size")
        unet = self.unet
        return ScoreSdeVeChain(self.scheduler, lambda x, sigma: unet(x, sigma).sample, num_inference_steps,
                               corrector_steps=correct_steps, corrector_step_size=corrector_step_size)

    @staticmethod
    def _drafter(drafter, chain: ScoreSdeVeChain):
        if callable(drafter) and not isinstance(drafter, Drafter):
            score = drafter  # a draft score model, called as the target is: (x, sigma)

            def draft(x: Tensor, step: Tensor) -> Tensor:
                out = score(x, chain.sigma_in[step.cpu()].to(x.device))
                return getattr(out, "sample", out)

            return draft
        return drafter

    @torch.no_grad()
    def __call__(
        self,
        batch_size: int = 1,
        num_inference_steps: int = 2000,
        generator: torch.Generator | list[torch.Generator] | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        window: int | str = "auto",
        drafter: str | Callable | None = None,
        corrector_step_size: float | None = None,
        max_rows: int | str | None = "auto",
        verify: str | None = None,
        coupling: str | None = None,
    ) -> SpeculativeScoreSdeVePipelineOutput | tuple:
        r"""Generate images.

        Args:
            batch_size, num_inference_steps, generator, output_type ("pil", "np" or "pt"),
            return_dict: as in ``ScoreSdeVePipeline``. A list of generators gives each image its own
                noise, independent of the batch.
            window: steps drafted per round, or ``"auto"``; 1 is the plain sampler.
            drafter: ``None``/``"frozen"`` (reuse the target's last score), ``"picard"``, or a cheaper
                score model called as the target is, ``drafter(x, sigma)`` (a ``UNet2DModel`` works).
            corrector_step_size: needed when the scheduler has ``correct_steps > 0``: runs a fixed-step
                annealed-Langevin corrector instead of diffusers' ``step_correct`` (a different
                corrector; see the module's docstring).
            max_rows: the most states per network call; larger calls run as exact micro-batches.
            verify: ``"step"`` (the default: each drafted step tested in order) or ``"block"`` (block
                verification, the window cut jointly; see docs/block-verification.md).
            coupling: ``"reflection"`` (the default) or ``"maximal"`` (Γ-maximal). Like ``verify``, it
                changes acceptance only, never the images' law.

        Returns:
            ``SpeculativeScoreSdeVePipelineOutput(images, stats)``, or ``(images, stats)``. As in
            ``ScoreSdeVePipeline``, the images are the mean of the last predictor step, clamped to [0, 1].
        """
        if output_type not in ("pil", "np", "pt"):
            raise ValueError(f"output_type must be 'pil', 'np' or 'pt'; got {output_type!r}")
        check_generators(generator, batch_size)
        size = self.unet.config.sample_size
        size = (size, size) if isinstance(size, int) else tuple(size)
        shape = (batch_size, self.unet.config.in_channels, *size)
        chain = self._chain(num_inference_steps, corrector_step_size)
        # The initial noise exactly as ScoreSdeVePipeline draws it (on the CPU, then moved).
        sample = randn_tensor(shape, generator=generator) * self.scheduler.init_noise_sigma
        sample = sample.to(self._execution_device, self.unet.dtype)

        head = _AllButLast(chain)
        output = speculative_sample(
            head, sample, window=window, drafter=self._drafter(drafter, chain), generator=generator,
            max_rows=max_rows, progress=progress_for(self, head.num_steps), **rule_options(verify, coupling),
        )  # fmt: skip
        # The last predictor step's mean, step_pred's prev_sample_mean: x + d² s(x, σ).
        last = torch.full((batch_size,), head.num_steps, dtype=torch.long)
        x = output.sample
        stats = output.stats
        cap = stats.max_rows or batch_size  # the run's row cap holds for this call too
        score = torch.cat([chain.predict(x[s : s + cap], last[s : s + cap]) for s in range(0, batch_size, cap)])
        mean, _ = chain.transition(x, last, score)
        # The last step's call counted as the plain pipeline counts it: one call per step.
        stats.num_steps, stats.target_calls, stats.target_rows = chain.num_steps, stats.target_calls + 1, \
            stats.target_rows + batch_size
        stats.peak_rows = max(stats.peak_rows, min(batch_size, cap))
        stats.per_sample_target_calls = [c + 1 for c in stats.per_sample_target_calls]
        images = mean.clamp(0, 1)
        if output_type != "pt":
            images = images.cpu().permute(0, 2, 3, 1).float().numpy()
            if output_type == "pil":
                images = self.numpy_to_pil(images)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (images, output.stats)
        return SpeculativeScoreSdeVePipelineOutput(images=images, stats=output.stats)
