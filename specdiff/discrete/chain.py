"""A :class:`~specdiff.CategoricalChain` from a masked-diffusion scheduler and a model, small
analytic / random networks, and the exact output laws of the samplers on tiny spaces.

* :class:`MaskedDiffusionChain` - the ancestral sampler of :class:`MaskedDiffusionScheduler`
  driven by any ``model(tokens) -> logits``.
* :class:`LookupDenoiser` - a fixed random "network": a seeded table from every full state
  (masks included) to per-position logits. Exact, deterministic, batch-invariant.
* :class:`MarkovDenoiser` - the exact posterior ``p(x_0^i | unmasked tokens)`` of a
  first-order Markov chain (forward-backward with masks as missing observations): a network
  whose data law is known.
* :func:`exact_baseline_law` / :func:`exact_speculative_law` - the output pmf of the plain
  and the speculative sampler, computed by enumeration with the same step-level functions
  the samplers use (``chain.transition``, :func:`~specdiff.kernels.categorical.step_acceptance_probability`,
  :func:`~specdiff.kernels.categorical.residual_acceptance_probability`).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable

import torch
from torch import Tensor

from ..drafters import Drafter, DraftMemory, as_drafter
from ..kernels.categorical import (
    CategoricalKernel,
    MaskedKernel,
    log_prob,
    residual_acceptance_probability,
    step_acceptance_probability,
)
from .scheduler import MaskedDiffusionScheduler


class MaskedDiffusionChain:
    """Masked-diffusion ancestral sampling as a :class:`~specdiff.CategoricalChain`.

    ``model(tokens)`` (or ``model(tokens, t)`` with ``time_conditioned=True``, ``t`` the
    continuous time per row) returns logits ``(*tokens.shape, vocab_size)``. A time-free
    model (MDLM's default) lets the samplers reuse a prediction while the state is unchanged.
    The number of steps is the scheduler's current grid (``scheduler.set_timesteps``).
    """

    kernel = CategoricalKernel

    def __init__(self, model: Callable, scheduler: MaskedDiffusionScheduler, *, time_conditioned: bool = False):
        self.model = model
        self.scheduler = scheduler
        self.time_conditioned = time_conditioned
        self.predict_calls = 0
        self.predict_rows = 0
        # The scheduler's own law, left unbuilt where it can (not for a subclass's transition).
        self.kernel = MaskedKernel if type(self).transition is MaskedDiffusionChain.transition else CategoricalKernel

    @property
    def num_steps(self) -> int:
        return self.scheduler.num_inference_steps

    @property
    def mask_token_id(self) -> int:
        return self.scheduler.mask_token_id

    def prior(self, batch_size: int, shape: tuple[int, ...], device=None) -> Tensor:
        """The fully masked start state ``(batch_size, *shape)``."""
        return torch.full((batch_size, *shape), self.mask_token_id, dtype=torch.long, device=device)

    def predict(self, x: Tensor, step: Tensor) -> Tensor:
        self.predict_calls += 1
        self.predict_rows += x.shape[0]
        if self.time_conditioned:
            return self.model(x, self.scheduler.timesteps.to(x.device)[step])
        return self.model(x)

    def transition(self, x: Tensor, step: Tensor, prediction: Tensor) -> Tensor:
        return self.scheduler.transition_probs(x, step, prediction)

    def draft_frozen(self, x: Tensor, steps: Tensor, prediction: Tensor, u: Tensor) -> tuple[Tensor, Tensor] | None:
        """The frozen drafter's ``L`` steps in one go (:meth:`MaskedDiffusionScheduler.draft_frozen`);
        ``None`` when a subclass changed :meth:`transition` (then the steps are drafted one by one)."""
        if type(self).transition is not MaskedDiffusionChain.transition:
            return None
        return self.scheduler.draft_frozen(x, steps, prediction, u)


# -- small networks ------------------------------------------------------------------------


def _state_index(x: Tensor, num_states: int) -> Tensor:
    weights = num_states ** torch.arange(x.shape[-1], device=x.device)
    return (x.long() * weights).sum(-1)


def all_states(num_states: int, length: int) -> Tensor:
    """Every sequence of ``length`` ids in ``0..num_states-1``, ``[num_states**length, length]``,
    row ``r`` being the base-``num_states`` digits of ``r`` (least significant first)."""
    r = torch.arange(num_states**length)
    return torch.stack([(r // num_states**i) % num_states for i in range(length)], 1)


class LookupDenoiser:
    """A fixed random network on sequences of ``length`` tokens: logits ``~ N(0, scale²)``
    looked up from the whole state (masks included), seeded. ``zero_fraction`` sets that
    share of logits to ``-inf`` (at least one token per position stays possible), which
    exercises kernels with zero probabilities."""

    def __init__(self, vocab_size: int, length: int, *, seed: int = 0, scale: float = 2.0, zero_fraction: float = 0.0):
        g = torch.Generator().manual_seed(seed)
        self.vocab_size, self.length = vocab_size, length
        n = (vocab_size + 1) ** length
        table = scale * torch.randn(n, length, vocab_size, generator=g, dtype=torch.float64)
        if zero_fraction > 0:
            drop = torch.rand(n, length, vocab_size, generator=g) < zero_fraction
            drop[..., 0] &= ~drop[..., 1:].all(-1)  # keep one finite logit per position
            table = table.masked_fill(drop, float("-inf"))
        self.table = table

    def __call__(self, x: Tensor) -> Tensor:
        return self.table.to(x.device)[_state_index(x, self.vocab_size + 1)]


class MarkovDenoiser:
    """Exact clean-token posterior for data drawn from a Markov chain (initial law ``initial``,
    transition matrix ``transition``): unmasked tokens are observations, masks are missing,
    and ``p(x_0^i | x_t)`` comes from forward-backward. Returns log-probabilities."""

    def __init__(self, initial: Tensor, transition: Tensor):
        self.initial = initial.to(torch.float64)
        self.transition = transition.to(torch.float64)
        self.vocab_size = self.initial.shape[0]

    @classmethod
    def random(cls, vocab_size: int, *, seed: int = 0, scale: float = 2.0) -> MarkovDenoiser:
        """A seeded random chain: initial law and rows of the transition matrix are softmaxes
        of ``N(0, scale²)`` logits (larger ``scale``: more predictable sequences)."""
        g = torch.Generator().manual_seed(seed)
        p = torch.softmax(scale * torch.randn(vocab_size + 1, vocab_size, generator=g, dtype=torch.float64), -1)
        return cls(p[0], p[1:])

    def sample_data(self, n: int, length: int, generator: torch.Generator | None = None) -> Tensor:
        x = torch.empty(n, length, dtype=torch.long)
        x[:, 0] = torch.multinomial(self.initial, n, replacement=True, generator=generator)
        for i in range(1, length):
            x[:, i] = torch.multinomial(self.transition[x[:, i - 1]], 1, generator=generator).squeeze(1)
        return x

    def __call__(self, x: Tensor) -> Tensor:
        v, (b, length) = self.vocab_size, x.shape
        obs = torch.where(
            (x == v)[..., None],
            torch.ones(b, length, v, dtype=torch.float64),
            torch.nn.functional.one_hot(x.clamp(max=v - 1), v).double(),
        )  # evidence e_i(v)
        fwd, bwd = torch.empty(b, length, v, dtype=torch.float64), torch.ones(b, length, v, dtype=torch.float64)
        f = self.initial * obs[:, 0]
        fwd[:, 0] = f = f / f.sum(-1, keepdim=True)
        for i in range(1, length):
            f = (f @ self.transition) * obs[:, i]
            fwd[:, i] = f = f / f.sum(-1, keepdim=True)
        for i in range(length - 2, -1, -1):
            r = self.transition @ (obs[:, i + 1] * bwd[:, i + 1]).unsqueeze(-1)
            bwd[:, i] = r.squeeze(-1) / r.sum((-1, -2)).unsqueeze(-1)
        post = fwd * bwd
        return (post / post.sum(-1, keepdim=True)).log()


class ScaledDrafter(Drafter):
    """A deliberately poor drafter for tests: the target's frozen logits times ``gain``
    (``gain < 0`` favours the tokens the target dislikes)."""

    def __init__(self, gain: float = -3.0):
        self.gain = gain

    def predict(self, x: Tensor, step: Tensor, memory: DraftMemory) -> Tensor:
        return torch.nan_to_num(memory.prediction * self.gain, nan=0.0, posinf=1e4, neginf=-1e4)


# -- exact laws by enumeration ---------------------------------------------------------------


def _joint(probs: Tensor, states: Tensor) -> Tensor:
    """``P(y)`` of every candidate ``y`` in ``states [M, L]`` under one row's product kernel."""
    m = states.shape[0]
    return log_prob(probs.expand(m, *probs.shape), states).exp()


@torch.no_grad()
def exact_baseline_law(chain, x_init: Tensor) -> Tensor:
    """Output pmf of the plain sampler started at ONE state ``x_init [L]``, over
    ``all_states(S, L)`` (S = tokens + MASK). Propagates the law through every step's
    transition matrix ``T_k[x, y] = Π_i transition(x, k)_i(y_i)``."""
    states = all_states(chain.scheduler.num_states, x_init.shape[-1])
    law = torch.zeros(states.shape[0], dtype=torch.float64)
    law[_state_index(x_init, chain.scheduler.num_states)] = 1.0
    for k in range(chain.num_steps):
        step = torch.full((states.shape[0],), k)
        probs = chain.transition(states, step, chain.predict(states, step))
        matrix = torch.ones(states.shape[0], states.shape[0], dtype=torch.float64)
        for i in range(states.shape[1]):
            matrix *= probs[:, i, states[:, i]]
        law = law @ matrix
    return law


@torch.no_grad()
def exact_speculative_law(
    chain, x_init: Tensor, *, window: int, drafter: Drafter | Callable | str | None = None
) -> Tensor:
    """Output pmf of :func:`~specdiff.discrete.speculative_sample_discrete` started at ONE
    state ``x_init [L]``, by enumerating its rounds.

    A round starts from (step n, state x, the state ``ref`` whose target prediction the
    sampler holds, whether it is ``fresh`` = made at x). Drafted steps are enumerated over
    the drafter's kernel J; each is kept with ``step_acceptance_probability`` (forced to 1
    for a fresh first step, as in the sampler); the rejected mass is spread over the
    residual law ``K · residual_acceptance_probability`` (normalised), which is the law of
    the rejection loop, and the next round starts from there with ``ref`` = the state the
    rejected step left from. Requires a time-free chain (the prediction depends on the
    state only), like :class:`LookupDenoiser`.
    """
    if getattr(chain, "time_conditioned", True):
        raise ValueError("exact_speculative_law enumerates a time-free chain (time_conditioned=False)")
    drafter = as_drafter(drafter)
    num_states, length, num_steps = chain.scheduler.num_states, x_init.shape[-1], chain.num_steps
    states = all_states(num_states, length)
    cache: dict[int, Tensor] = {}

    def target(s: int) -> Tensor:  # the target's prediction at state s (a network call)
        if s not in cache:
            cache[s] = chain.predict(states[s : s + 1], torch.zeros(1, dtype=torch.long))[0]
        return cache[s]

    def kernel(s: int, step: int, prediction: Tensor) -> Tensor:
        return chain.transition(states[s : s + 1], torch.tensor([step]), prediction[None])[0]

    start = int(_state_index(x_init, num_states))
    rounds: dict[int, dict[tuple[int, int, bool], float]] = defaultdict(lambda: defaultdict(float))
    rounds[0][(start, start, True)] = 1.0
    law = torch.zeros(states.shape[0], dtype=torch.float64)
    for n in range(num_steps):
        for (x, ref, fresh), mass in rounds.pop(n, {}).items():
            frozen, horizon = target(ref), min(window, num_steps - n)
            depth = {x: mass}  # law of the drafted y_j, all drafted steps so far accepted
            for j in range(horizon):
                step, nxt = n + j, defaultdict(float)
                for y, p in depth.items():
                    exact = j == 0 and fresh
                    memory = DraftMemory(frozen[None], torch.tensor([n - 1 + fresh]), frozen[None], torch.zeros(1))
                    guess = frozen if exact else drafter.predict(states[y : y + 1], torch.tensor([step]), memory)[0]
                    k_probs, j_probs = kernel(y, step, target(y)), kernel(y, step, guess)
                    j_law = _joint(j_probs, states)
                    support = (j_law > 0).nonzero().squeeze(1)
                    m = support.numel()
                    keep = (
                        torch.ones(m, dtype=torch.float64)
                        if exact
                        else step_acceptance_probability(
                            k_probs.expand(m, *k_probs.shape), j_probs.expand(m, *j_probs.shape), states[support]
                        )
                    )
                    for y2, w in zip(support.tolist(), (j_law[support] * keep).tolist()):
                        nxt[y2] += p * w
                    rejected = p * float((j_law[support] * (1 - keep)).sum())
                    if rejected > 0:
                        m_all = states.shape[0]
                        residual = _joint(k_probs, states) * residual_acceptance_probability(
                            k_probs.expand(m_all, *k_probs.shape), j_probs.expand(m_all, *j_probs.shape), states
                        )
                        if residual.sum() <= 0:
                            raise ArithmeticError("rejected mass but an empty residual (K - J)+")
                        residual = residual / residual.sum()
                        for y2 in residual.nonzero().squeeze(1).tolist():
                            w = rejected * float(residual[y2])
                            if step + 1 == num_steps:
                                law[y2] += w
                            else:
                                rounds[step + 1][(y2, y, y2 == y)] += w
                depth = nxt
            for y, p in depth.items():
                if n + horizon == num_steps:
                    law[y] += p
                else:
                    rounds[n + horizon][(y, y, True)] += p
    return law
