"""Masked (absorbing-state) diffusion scheduler: the MDLM / MD4 ancestral kernel.

Tokens are integers ``0 .. vocab_size - 1``; the MASK token is ``vocab_size`` (the last id,
as in diffusers' VQ-Diffusion scheduler). Time runs from ``t = 1`` (every position masked)
to ``t = 0`` (clean), and ``α_t`` is the probability that a position is still clean at time
``t``: ``α_1 = 0``, ``α_0 = 1``.

One step from ``t`` to ``s < t``, per position, independently given the network output
(Sahoo et al. 2024, eq. 7; Shi et al. 2024, §4):

    unmasked position:  copied
    masked position:    MASK     w.p.  (1 - α_s) / (1 - α_t)
                        token v  w.p.  (α_s - α_t) / (1 - α_t) · μ_v,   μ = softmax(logits / temperature)

The network never predicts MASK (its logit, when present, is dropped). The last step ends
at ``s = 0`` where ``α_s = 1`` exactly, so it unmasks every remaining position: the chain
needs no separate "noise removal" rule, and its output never contains MASK.

Sampling uses one float64 uniform per position and the inverse CDF of that position's
law (:func:`sample_categorical`); ``step`` draws the uniforms with ``torch.rand`` from the
caller's generator(s) exactly as :func:`specdiff.discrete.sample_baseline_discrete` does,
so a plain loop over ``step`` and the library's samplers agree token for token.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils import BaseOutput
from torch import Tensor

from ..kernels.categorical import masked_transition, sample_categorical, softmax_rows
from ..noise import GeneratorArg, split_generators

ALPHA_SCHEDULES = ("linear", "cosine")
#: ``draft_frozen`` draws at most this many probabilities at once (the CDF's scratch stays small
#: for large vocabularies); whole steps at a time, so the draws are the same for any value.
DRAFT_CHUNK_ELEMENTS = 1 << 22


@dataclass
class MaskedDiffusionSchedulerOutput(BaseOutput):
    """``prev_sample``: tokens after the step. ``pred_original_sample``: the most likely
    clean tokens under the model (``argmax μ`` at masked positions, the token elsewhere)."""

    prev_sample: Tensor
    pred_original_sample: Tensor | None = None


def alpha(t: Tensor, schedule: str) -> Tensor:
    """``α_t`` (probability of being clean at time ``t``), exactly 0 at t=1 and 1 at t=0."""
    t = torch.as_tensor(t, dtype=torch.float64)
    if schedule == "linear":
        a = 1 - t
    elif schedule == "cosine":  # MD4's cosine schedule: α_t = 1 - cos(π/2 (1 - t))
        a = 1 - torch.cos(0.5 * math.pi * (1 - t))
    else:
        raise ValueError(f"alpha_schedule must be one of {ALPHA_SCHEDULES}, got {schedule!r}")
    # Pin the endpoints: cos(π/2) is 6e-17 in float64, and the last step must unmask everything.
    a = torch.where(t >= 1, torch.zeros_like(a), a)
    return torch.where(t <= 0, torch.ones_like(a), a).clamp(0, 1)


def draw_uniforms(shape: tuple[int, ...], generator: GeneratorArg, device=None) -> Tensor:
    """The per-position float64 uniforms of one step, with diffusers' generator semantics:
    one generator draws the whole ``shape``; a list draws one ``(1, *shape[1:])`` per sample."""
    per_sample = split_generators(generator, shape[0])
    if per_sample is not None:
        return torch.cat(
            [torch.rand((1, *shape[1:]), generator=g, device=g.device, dtype=torch.float64) for g in per_sample]
        ).to(device)
    gen_device = generator.device if isinstance(generator, torch.Generator) else "cpu"
    return torch.rand(shape, generator=generator, device=gen_device, dtype=torch.float64).to(device)


class MaskedDiffusionScheduler(SchedulerMixin, ConfigMixin):
    """Ancestral sampler of masked diffusion (MDLM / MD4), diffusers-style.

    Args:
        vocab_size: number of real tokens; the MASK id is ``vocab_size``.
        alpha_schedule: ``"linear"`` (``α_t = 1 - t``) or ``"cosine"`` (``α_t = 1 - cos(π(1-t)/2)``).
        temperature: ``μ = softmax(logits / temperature)``; ``0`` means argmax (greedy tokens,
            still unmasked at random times).
        num_inference_steps: default grid size used before ``set_timesteps`` is called.

    ``timesteps`` are the continuous times ``t_k = 1 - k / N``, k = 0..N-1, at which the
    model is evaluated; step k goes from ``t_k`` to ``t_{k+1}`` (``t_N = 0``). A time-free
    model (MDLM's default) simply ignores them.
    """

    order = 1
    init_noise_sigma = 1.0

    @register_to_config
    def __init__(
        self,
        vocab_size: int = 8,
        alpha_schedule: str = "linear",
        temperature: float = 1.0,
        num_inference_steps: int = 64,
    ):
        if vocab_size < 1:
            raise ValueError(f"vocab_size must be >= 1, got {vocab_size}")
        if alpha_schedule not in ALPHA_SCHEDULES:
            raise ValueError(f"alpha_schedule must be one of {ALPHA_SCHEDULES}, got {alpha_schedule!r}")
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 = argmax), got {temperature}")
        self.set_timesteps(num_inference_steps)

    @property
    def mask_token_id(self) -> int:
        return self.config.vocab_size

    @property
    def num_states(self) -> int:
        """Tokens plus MASK: the size of the last axis of :meth:`transition_probs`."""
        return self.config.vocab_size + 1

    def set_timesteps(self, num_inference_steps: int, device: str | torch.device | None = None) -> None:
        """Uniform grid of ``num_inference_steps`` steps from t = 1 to t = 0."""
        if not isinstance(num_inference_steps, int) or num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be a positive integer, got {num_inference_steps!r}")
        self.num_inference_steps = num_inference_steps
        times = torch.linspace(1, 0, num_inference_steps + 1, dtype=torch.float64)
        times[0], times[-1] = 1.0, 0.0
        self.times = times  # t_0 .. t_N (float64, CPU)
        self.alphas = alpha(times, self.config.alpha_schedule)  # α at t_0 .. t_N
        self.timesteps = times[:-1].to(device or "cpu")
        # (1 - α_s) / (1 - α_t) of every step, computed once: a sampler looks it up at every step.
        self._stay = {torch.device("cpu"): (1 - self.alphas[1:]) / (1 - self.alphas[:-1])}

    def scale_model_input(self, sample: Tensor, timestep=None) -> Tensor:
        return sample

    # -- the kernel -------------------------------------------------------------------------

    def stay_masked_probability(self, step_index: Tensor) -> Tensor:
        """``(1 - α_s) / (1 - α_t)`` of step ``step_index`` (per row, float64)."""
        return self.stay_table(torch.device("cpu"))[self._checked_steps(step_index).cpu()]

    def _checked_steps(self, step_index) -> Tensor:
        k = torch.as_tensor(step_index, dtype=torch.long)
        if k.numel() and (int(k.min()) < 0 or int(k.max()) >= self.num_inference_steps):
            raise IndexError(f"step index out of range [0, {self.num_inference_steps}): {k.tolist()}")
        return k

    def stay_table(self, device: torch.device) -> Tensor:
        """``stay_masked_probability`` of every step, on ``device`` (a lookup table kept per device,
        indexed by step without checks: the samplers' hot path)."""
        if device not in self._stay:
            self._stay[device] = self._stay[torch.device("cpu")].to(device)
        return self._stay[device]

    def scores(self, model_output: Tensor) -> Tensor:
        """The clean-token scores ``s`` with ``μ = softmax(s)`` per position (float64, MASK logit
        dropped): ``logits / temperature``, or at temperature 0 ``log one_hot(argmax)``, whose
        softmax is that one-hot exactly."""
        logits = model_output.to(torch.float64)
        v = self.config.vocab_size
        if logits.shape[-1] == v + 1:  # a MASK logit: dropped (SUBS "zero masking probability")
            logits = logits[..., :v]
        elif logits.shape[-1] != v:
            raise ValueError(f"model output has {logits.shape[-1]} classes; expected {v} tokens (or {v + 1} with MASK)")
        temperature = self.config.temperature
        if temperature == 0:
            return torch.nn.functional.one_hot(logits.argmax(-1), v).to(torch.float64).log()
        return logits if temperature == 1 else logits / temperature

    def clean_probabilities(self, model_output: Tensor) -> Tensor:
        """``μ``: the model's law of the clean token per position (float64), MASK excluded."""
        return softmax_rows(self.scores(model_output))

    def scores_for(self, sample: Tensor, model_output: Tensor) -> Tensor:
        """:meth:`scores`, checked to hold one position per position of ``sample``."""
        scores = self.scores(model_output)
        if scores.shape[:-1] != sample.shape:
            raise ValueError(f"model output {tuple(model_output.shape)} does not match sample {tuple(sample.shape)}")
        return scores

    def transition_probs(self, sample: Tensor, step_index: Tensor, model_output: Tensor) -> Tensor:
        """Next-state law of every position, shape ``(*sample.shape, vocab_size + 1)``, float64.

        ``step_index`` holds one step per row (``LongTensor[B]``) or a single int.
        """
        batch = sample.shape[0]
        k = self._checked_steps(step_index).reshape(-1).expand(batch)
        stay = self.stay_table(sample.device)[k.to(sample.device)]
        mu = softmax_rows(self.scores_for(sample, model_output))
        return masked_transition(sample, stay, mu)

    def draft_frozen(
        self, sample: Tensor, step_indices: Tensor, model_output: Tensor, u: Tensor
    ) -> tuple[Tensor, Tensor]:
        """``L`` consecutive steps under ONE model output (the frozen-target drafter), at once.

        ``step_indices [L, B]``, ``u [L, *sample.shape]`` (step j's per-position uniforms).
        Returns ``states [L + 1, *sample.shape]`` (``states[0] = sample``, ``states[j + 1]``
        drawn from ``states[j]`` at ``step_indices[j]`` with ``u[j]``) and ``probs [L, ...,
        num_states]`` (``probs[j] = transition_probs(states[j], step_indices[j], model_output)``),
        bit for bit what ``L`` sequential ``transition_probs`` + ``sample_categorical`` calls give.
        """
        k = self._checked_steps(step_indices).to(sample.device)
        mu = softmax_rows(self.scores_for(sample, model_output))
        states, probs = self.draft_states(sample, self.stay_table(sample.device)[k], mu, u)
        copied = states[:-1] != self.mask_token_id  # those positions follow the copy law: a one-hot on their token
        probs.masked_fill_(copied.unsqueeze(-1), 0.0)
        at = copied.nonzero(as_tuple=True)
        probs[(*at, states[:-1][at].long())] = 1.0
        return states, probs

    @staticmethod
    def draft_states(sample: Tensor, stay: Tensor, mu: Tensor, u: Tensor) -> tuple[Tensor, Tensor]:
        """The states of :meth:`draft_frozen` from ``stay [L, B]`` (the steps' probabilities of
        staying masked) and ``μ``, and the masked law of every step (``[L, ..., num_states]``;
        where a position is already unmasked its copy law replaces it in ``transition_probs``).

        Why it can be vectorised: given ``μ``, the law of a masked position at step j depends on
        the step only, and an unmasked one is copied. So every step's draw is made as if the
        position were still masked, and a position takes the token of its first draw that is not
        MASK (later draws would have copied it).
        """
        mask = v = mu.shape[-1]
        stay = stay.view(*stay.shape, *[1] * sample.ndim)  # [L, B, 1, ..., 1]
        probs = torch.empty((stay.shape[0], *sample.shape, v + 1), dtype=torch.float64, device=sample.device)
        torch.mul(1 - stay, mu, out=probs[..., :v])  # the masked law of transition_probs, every step
        probs[..., v:] = stay
        chunk = max(1, DRAFT_CHUNK_ELEMENTS // max(probs[0].numel(), 1))
        draws = [sample_categorical(probs[a : a + chunk], u[a : a + chunk]) for a in range(0, len(probs), chunk)]
        draws = draws[0] if len(draws) == 1 else torch.cat(draws)
        hit8 = (draws != mask).to(torch.uint8)
        first = hit8.argmax(0, keepdim=True)  # the first draw that unmasks (argmax: first max)
        token = draws.gather(0, first)
        states = torch.where(hit8.cummax(0).values.bool() & (sample == mask), token, sample)
        return torch.cat([sample[None], states.to(sample.dtype)]), probs

    def index_for_timestep(self, timestep, batch: int) -> Tensor:
        """Step indices (``LongTensor[B]``) of ``timestep``: a value of ``self.timesteps``
        (scalar or one per row)."""
        t = torch.as_tensor(timestep, dtype=torch.float64).reshape(-1).cpu()
        match = t[:, None] == self.timesteps.cpu()[None, :]
        if not match.any(1).all():
            raise ValueError(
                f"timestep {t.tolist()} is not on the grid set by set_timesteps({self.num_inference_steps}); "
                "pass values taken from scheduler.timesteps"
            )
        return match.int().argmax(1).expand(batch) if t.numel() == 1 else match.int().argmax(1)

    def step(
        self,
        model_output: Tensor,
        timestep: float | Tensor,
        sample: Tensor,
        generator: GeneratorArg = None,
        return_dict: bool = True,
    ) -> MaskedDiffusionSchedulerOutput | tuple:
        """One ancestral step from ``timestep`` to the next grid time.

        Args:
            model_output: logits ``(*sample.shape, vocab_size)`` (a trailing MASK logit is dropped).
            timestep: an entry of ``self.timesteps`` (or one per row).
            sample: integer tokens ``(B, ...)`` with MASK = ``vocab_size``.
            generator: a ``torch.Generator`` or a list with one per sample.
        """
        k = self.index_for_timestep(timestep, sample.shape[0])
        probs = self.transition_probs(sample, k, model_output)
        u = draw_uniforms(tuple(sample.shape), generator, device=sample.device)
        prev_sample = sample_categorical(probs, u).to(sample.dtype)
        mu = self.clean_probabilities(model_output)
        masked = sample == self.mask_token_id
        x0 = torch.where(masked, mu.argmax(-1).to(sample.dtype), sample)
        if not return_dict:
            return (prev_sample, x0)
        return MaskedDiffusionSchedulerOutput(prev_sample=prev_sample, pred_original_sample=x0)

    # -- training side ----------------------------------------------------------------------

    def add_noise(
        self, original_samples: Tensor, timesteps: Tensor, generator: torch.Generator | None = None
    ) -> Tensor:
        """Forward process ``q(x_t | x_0)``: mask each position independently w.p. ``1 - α_t``;
        ``timesteps`` are continuous times in [0, 1], one per row."""
        t = torch.as_tensor(timesteps, dtype=torch.float64).reshape(-1).expand(original_samples.shape[0])
        keep = alpha(t, self.config.alpha_schedule).to(original_samples.device)
        keep = keep.view(-1, *[1] * (original_samples.ndim - 1))
        u = torch.rand(original_samples.shape, generator=generator, dtype=torch.float64).to(original_samples.device)
        return torch.where(u < keep, original_samples, torch.full_like(original_samples, self.mask_token_id))

    def elbo_weight(self, timesteps: Tensor) -> Tensor:
        """``-α'_t / (1 - α_t)``: weight of the masked-token cross-entropy at time ``t`` in the
        continuous-time ELBO (MDLM eq. 10, MD4 eq. 5)."""
        t = torch.as_tensor(timesteps, dtype=torch.float64)
        if self.config.alpha_schedule == "linear":
            return 1 / t
        half_pi = 0.5 * math.pi
        return half_pi * torch.sin(half_pi * (1 - t)) / torch.cos(half_pi * (1 - t)).clamp_min(1e-12)

    def __len__(self) -> int:
        return self.num_inference_steps
