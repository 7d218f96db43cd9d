"""Langevin sampling of unnormalized densities, with exact speculative sampling.

The unadjusted Langevin algorithm (ULA) for ``π ∝ exp(log_prob)`` with step sizes ``h_k`` and a
preconditioner ``P = C Cᵀ`` (identity by default):

    x_{k+1} = x_k + h_k P ∇log π_k(x_k) + √(2 h_k) C z_k,      z_k ~ N(0, I)

Every step is Gaussian given the gradient at ``x_k``, with a std fixed by the schedule, so the
speculative round of :mod:`specdiff.round` applies unchanged: the chain below is a
:class:`~specdiff.GaussianChain` whose *prediction* is the gradient. A preconditioned step has
the non-isotropic noise ``√(2h) C z``; the chain runs in whitened coordinates ``y = C⁻¹ x``,
where the step is ``y' = y + h Cᵀ∇log π(C y) + √(2h) z`` (isotropic), the same chain in law and
path. :func:`sample` maps its draws back to ``x``.

What speculative sampling keeps exact is ULA's own law: the draws have the law of the plain ULA
loop with the same step sizes (ULA's bias from the continuous-time Langevin diffusion is ULA's,
not the sampler's; with ``window=1`` the speculative sampler *is* the plain loop, bit for bit).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from .drafters import Drafter, DraftMemory
from .kernels import GaussianKernel
from .noise import GeneratorArg
from .sampler import sample_baseline, speculative_sample
from .stats import SpeculativeStats


def takes_step(fn: Callable) -> bool:
    """Whether ``fn`` is a tempered target: a parameter named ``step``, or two positional
    parameters without defaults (``log_prob(x, step)``)."""
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        return False
    if any(p.name == "step" for p in params):
        return True
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is p.empty]
    return len(positional) >= 2


class _Score:
    """``∇log π_k(x)`` per row from ``log_prob`` (by autograd) or ``grad_log_prob``."""

    def __init__(self, log_prob: Callable | None, grad_log_prob: Callable | None, what: str):
        if (log_prob is None) == (grad_log_prob is None):
            raise ValueError(f"pass exactly one of {what}log_prob (gradient by autograd) and {what}grad_log_prob "
                             f"(the score); got {'both' if log_prob is not None else 'neither'}")
        fn = log_prob if log_prob is not None else grad_log_prob
        if not callable(fn):
            raise TypeError(f"{what}log_prob / {what}grad_log_prob must be callable; got {type(fn).__name__}")
        self.fn, self.autograd, self.what, self.tempered = fn, log_prob is not None, what, takes_step(fn)

    def __call__(self, x: Tensor, step: Tensor) -> Tensor:
        args = (step,) if self.tempered else ()
        if not self.autograd:
            grad = self.fn(x, *args)
        else:
            with torch.enable_grad():  # the samplers run under torch.no_grad
                leaf = x.detach().requires_grad_(True)
                lp = self.fn(leaf, *args)
                if not isinstance(lp, Tensor) or lp.shape != (x.shape[0],):
                    raise ValueError(
                        f"{self.what}log_prob must return one log-density per row, shape ({x.shape[0]},); got "
                        f"{tuple(lp.shape) if isinstance(lp, Tensor) else type(lp).__name__} (sum over the "
                        "state's dimensions, keep the batch)")
                if not lp.requires_grad:
                    raise ValueError(f"{self.what}log_prob's output does not depend on x through torch "
                                     "operations; autograd cannot differentiate it (pass grad_log_prob instead)")
                (grad,) = torch.autograd.grad(lp.sum(), leaf)
        if not isinstance(grad, Tensor) or grad.shape != x.shape:
            raise ValueError(f"{self.what}grad_log_prob must return a tensor of the state's shape "
                             f"{tuple(x.shape)}; got {tuple(grad.shape) if isinstance(grad, Tensor) else grad!r}")
        return grad if grad.dtype == x.dtype else grad.to(x.dtype)


class LangevinChain:
    """ULA for a target ``log_prob(x)`` (or its score ``grad_log_prob(x)``), as a GaussianChain.

    Args:
        log_prob: ``x [B, *dims] -> [B]``, the unnormalized log-density of each row; the gradient
            is taken by autograd. ``log_prob(x, step)`` (``step``: a ``LongTensor[B]``, each row's
            step index) is a tempered/annealed sequence of targets.
        grad_log_prob: ``x [B, *dims] -> [B, *dims]``, the score, instead of ``log_prob`` (also
            ``grad_log_prob(x, step)``).
        step_size: ``h`` (a positive float) or one per step (a sequence of ``num_steps`` values).
        num_steps: the number of ULA steps.
        preconditioner: ``P``, a positive tensor of the state's shape (a diagonal; it may broadcast)
            or, for flat states ``[B, d]``, a symmetric positive definite ``[d, d]`` matrix (a square
            2-D tensor is always read as a matrix).

    The chain's state is the whitened ``y = C⁻¹ x`` (``P = C Cᵀ``; ``y = x`` without a
    preconditioner): start it at ``chain.whiten(x)`` and read ``chain.unwhiten(y)``.
    Its prediction is the whitened score ``Cᵀ ∇log π(C y)``; a step is ``y + h·prediction``
    with std ``√(2h)``.
    """

    kernel = GaussianKernel
    affine = True  # mean = y + h * prediction: the frozen drafter drafts a window at once

    def __init__(self, log_prob: Callable | None = None, *, grad_log_prob: Callable | None = None,
                 step_size: float | Sequence[float] | Tensor, num_steps: int,
                 preconditioner: Tensor | None = None):
        self.score = _Score(log_prob, grad_log_prob, "")
        if not isinstance(num_steps, int) or isinstance(num_steps, bool) or num_steps < 1:
            raise ValueError(f"num_steps must be a positive integer; got {num_steps!r}")
        self.num_steps = num_steps
        h = torch.as_tensor(step_size, dtype=torch.float64).flatten()
        if h.numel() == 1:
            h = h.expand(num_steps).clone()
        if h.numel() != num_steps:
            raise ValueError(f"step_size must be one positive float or one per step ({num_steps} values); "
                             f"got {h.numel()} values")
        if not bool(torch.isfinite(h).all() & (h > 0).all()):
            raise ValueError(f"step_size must be positive and finite; got {step_size!r}")
        self.step_size = h
        self.preconditioner = preconditioner
        self._root = self._matrix = None  # diagonal C, or lower-triangular C (matrix P)
        if preconditioner is not None:
            p = torch.as_tensor(preconditioner)
            if not p.is_floating_point() or not bool(torch.isfinite(p).all()):
                raise ValueError("preconditioner must be a finite floating-point tensor")
            if p.ndim == 2 and p.shape[0] == p.shape[1]:
                if not torch.allclose(p, p.T):
                    raise ValueError("a matrix preconditioner must be symmetric positive definite")
                chol, info = torch.linalg.cholesky_ex(p.double())
                if int(info) != 0:
                    raise ValueError("a matrix preconditioner must be symmetric positive definite "
                                     "(its Cholesky factorisation failed)")
                self._matrix = chol
            else:
                if not bool((p > 0).all()):
                    raise ValueError("a diagonal preconditioner must be positive everywhere")
                self._root = p.double().sqrt()

    # -- coordinates ------------------------------------------------------------------
    def _check_state(self, x: Tensor) -> None:
        if self._matrix is not None and (x.ndim != 2 or x.shape[1] != self._matrix.shape[0]):
            raise ValueError(f"a [{self._matrix.shape[0]}, {self._matrix.shape[0]}] matrix preconditioner needs "
                             f"states [chains, {self._matrix.shape[0]}]; got {tuple(x.shape)}")
        if self._root is not None:
            try:
                torch.broadcast_shapes(self._root.shape, x.shape[1:])
            except RuntimeError:
                raise ValueError(f"the diagonal preconditioner of shape {tuple(self._root.shape)} does not fit "
                                 f"states of shape {tuple(x.shape[1:])} per chain") from None
            if torch.broadcast_shapes(self._root.shape, x.shape[1:]) != x.shape[1:]:
                raise ValueError(f"the diagonal preconditioner of shape {tuple(self._root.shape)} is larger than "
                                 f"a state {tuple(x.shape[1:])}")

    def whiten(self, x: Tensor) -> Tensor:
        """``y = C⁻¹ x``: the chain's state for a point ``x``."""
        self._check_state(x)
        if self._root is not None:
            return (x / self._root.to(x)).to(x.dtype)
        if self._matrix is not None:
            return torch.linalg.solve_triangular(self._matrix.to(x), x.T, upper=False).T.contiguous()
        return x

    def unwhiten(self, y: Tensor) -> Tensor:
        """``x = C y``: the point of a chain state ``y``."""
        if self._root is not None:
            return y * self._root.to(y)
        if self._matrix is not None:
            return y @ self._matrix.to(y).T
        return y

    def _cotransform(self, g: Tensor) -> Tensor:
        """``Cᵀ g``: a gradient in ``x`` as one in ``y``."""
        if self._root is not None:
            return g * self._root.to(g)
        if self._matrix is not None:
            return g @ self._matrix.to(g)
        return g

    def whitened_score(self, score: Callable[[Tensor, Tensor], Tensor], y: Tensor, step: Tensor) -> Tensor:
        """``Cᵀ ∇log π(C y)`` for a score function ``score(x, step)`` (the target's or a drafter's)."""
        return self._cotransform(score(self.unwhiten(y), step))

    # -- the GaussianChain protocol ---------------------------------------------------
    def predict(self, x: Tensor, step: Tensor) -> Tensor:
        """The gradient evaluation (the "network call")."""
        return self.whitened_score(self.score, x, step)

    def _h(self, step: Tensor, like: Tensor) -> Tensor:
        work = torch.promote_types(like.dtype, torch.float32)
        h = self.step_size[step.cpu()].to(device=like.device, dtype=work)
        return h.view(-1, *[1] * (like.ndim - 1))

    def transition(self, x: Tensor, step: Tensor, prediction: Tensor) -> tuple[Tensor, Tensor]:
        h = self._h(step, x)
        return x + h * prediction, (2 * h).sqrt().flatten()

    def transition_affine(self, step: Tensor, prediction: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(shift, scale, std)`` with ``mean = shift + scale * y``, bit for bit ``transition``'s."""
        h = self._h(step, prediction)
        return h * prediction, torch.ones_like(h), (2 * h).sqrt().flatten()


class SurrogateDrafter(Drafter):
    """A cheap approximation of the target as the drafter: ``draft_log_prob(x)`` (gradient by
    autograd) or ``draft_grad(x)`` (also with a ``step`` argument, like the target) — a smaller
    network, a quadratic/Laplace approximation. Exact for any surrogate (only acceptance depends
    on it); it is evaluated once per drafted step, sequentially, so it should cost far less than
    the target. :func:`sample` binds it to the chain; with :func:`~specdiff.speculative_sample`
    call ``bind(chain)`` first (it needs the chain's preconditioner)."""

    network_calls = True

    def __init__(self, draft_log_prob: Callable | None = None, *, draft_grad: Callable | None = None):
        self.score = _Score(draft_log_prob, draft_grad, "draft_")
        self.chain: LangevinChain | None = None

    @classmethod
    def gaussian(cls, mean: Tensor, precision: Tensor) -> SurrogateDrafter:
        """The quadratic surrogate ``log q(x) = -½ (x - mean)ᵀ precision (x - mean)`` for flat states
        ``[B, d]`` (e.g. a Laplace approximation: the mode and the negative Hessian there)."""
        mean, precision = torch.as_tensor(mean), torch.as_tensor(precision)
        if mean.ndim != 1 or precision.shape != (mean.shape[0], mean.shape[0]):
            raise ValueError(f"mean must be [d] and precision [d, d]; got {tuple(mean.shape)} and "
                             f"{tuple(precision.shape)}")

        def draft_grad(x: Tensor) -> Tensor:
            return -(x - mean.to(x)) @ precision.to(x).T

        return cls(draft_grad=draft_grad)

    def bind(self, chain: LangevinChain) -> SurrogateDrafter:
        self.chain = chain
        return self

    def predict(self, x: Tensor, step: Tensor, memory: DraftMemory) -> Tensor:
        if self.chain is None:
            raise RuntimeError("SurrogateDrafter is not bound to a chain: call drafter.bind(chain) before "
                               "speculative_sample (specdiff.langevin.sample binds it)")
        # A non-finite guess (a drafted state far off) is drafted from the frozen prediction by the
        # sampler (exactness never depends on the guess).
        return self.chain.whitened_score(self.score, x, step)

    def __repr__(self) -> str:
        return f"SurrogateDrafter({getattr(self.score.fn, '__name__', self.score.fn)!r})"


class _Recorder:
    """The chain with its gradient evaluations recorded: ``draws[chain, slot]`` receives each state
    the sampler evaluates at a kept step. Which state is the committed one: the round evaluates
    states at steps ``>= n`` only (``n``: the steps committed so far), and every committed state at a
    step ``k < num_steps`` is evaluated (the accepted drafts in their round's verify call, a
    corrected state at the next round's start), after any discarded draft of step ``k``. So the
    last state evaluated at step ``k`` is the committed one; the state after the last step is the
    sampler's output. The plain loop evaluates exactly its states.

    A drafted state far from the chain (a stale gradient on a stiff target) may have a NaN/inf
    gradient: the sampler uses a verified prediction only at committed states, and stops the run
    only if one of those is non-finite (the plain loop fails there too).
    """

    uses_sample_index = True

    def __init__(self, chain: LangevinChain, slots: Tensor, like: Tensor, count: int):
        self.chain, self.slots, self.num_steps = chain, slots, chain.num_steps
        self.kernel, self.affine = chain.kernel, chain.affine
        self.draws = like.new_zeros((like.shape[0], count, *like.shape[1:]))
        self.seen = torch.zeros(like.shape[0], count + 1, dtype=torch.bool)  # the last column: never used

    def predict(self, x: Tensor, step: Tensor, sample: Tensor) -> Tensor:
        slot = self.slots[step.cpu()].to(x.device)
        keep = slot >= 0
        if bool(keep.any()):
            self.draws[sample[keep], slot[keep]] = x[keep]
        self.seen[sample.cpu(), slot.cpu()] = True
        return self.chain.predict(x, step)

    def transition(self, x: Tensor, step: Tensor, prediction: Tensor):
        return self.chain.transition(x, step, prediction)

    def transition_affine(self, step: Tensor, prediction: Tensor):
        return self.chain.transition_affine(step, prediction)

    def finish(self, final: Tensor) -> Tensor:
        last = int(self.slots[self.num_steps])
        if last >= 0:
            self.draws[:, last] = final
            self.seen[:, last] = True
        if not bool(self.seen[:, :-1].all()):
            raise RuntimeError("internal: a kept step was never evaluated; please report it")
        return self.draws


@dataclass
class LangevinResult:
    """``draws``: ``[chains, draws, *dims]``, the states at steps ``draw_steps``; ``final``: the state
    after the last step ``[chains, *dims]``; ``stats``: the run's accounting
    (``stats.target_calls`` = sequential gradient evaluations, batched over chains)."""

    draws: Tensor
    draw_steps: Tensor
    final: Tensor
    stats: SpeculativeStats

    def to_dict(self, var_name: str = "x") -> dict:
        """The draws as ``arviz.from_dict``'s ``posterior`` (numpy, chains × draws × dims)."""
        return {var_name: self.draws.detach().cpu().numpy()}

    def to_inference_data(self, var_name: str = "x"):
        """An ``arviz.InferenceData`` (``pip install 'specdiff[mcmc]'``): ESS, R-hat, plots."""
        return to_arviz(self, var_name)


def to_arviz(result: LangevinResult, var_name: str = "x"):
    """``arviz.from_dict(posterior={var_name: draws})``, with the run's cost in the posterior's attributes."""
    try:
        import arviz
    except ImportError as error:
        raise ImportError("to_arviz needs ArviZ: pip install 'specdiff[mcmc]' (or pip install arviz)") from error
    s = result.stats
    attrs = {"sampler": "specdiff ULA (speculative)" if s.window > 1 else "specdiff ULA (plain)",
             "sequential_gradient_evaluations": s.target_calls, "num_steps": s.num_steps, "window": s.window}
    try:
        data = arviz.from_dict(posterior=result.to_dict(var_name))
    except TypeError:  # ArviZ 1.x: from_dict takes one dict of groups
        data = arviz.from_dict({"posterior": result.to_dict(var_name)})
    data.posterior.attrs.update(attrs)
    return data


def sample(
    log_prob: Callable | None = None,
    init: Tensor | None = None,
    *,
    grad_log_prob: Callable | None = None,
    step_size: float | Sequence[float] | Tensor,
    num_steps: int,
    window: int | str = 16,
    drafter: Drafter | Callable | str | None = "picard",
    burn_in: int = 0,
    thin: int = 1,
    preconditioner: Tensor | None = None,
    generator: GeneratorArg = None,
    max_rows: int | str | None = "auto",
    progress: bool | Callable = False,
) -> LangevinResult:
    """Run ULA from ``init`` (``[chains, *dims]``), speculatively unless ``window=1``.

    The draws are the states after steps ``burn_in + thin, burn_in + 2·thin, ...`` up to
    ``num_steps`` (``(num_steps - burn_in) // thin`` of them). ``window``/``drafter``/``generator``/
    ``max_rows``/``progress`` are :func:`~specdiff.speculative_sample`'s; ``window=1`` runs the plain
    ULA loop (:func:`~specdiff.sample_baseline`), which draws the same numbers from the same
    generator. ``drafter`` may also be a :class:`SurrogateDrafter`. A list of generators, one per
    chain, makes each chain independent of the others (per-chain seeds).
    """
    chain = LangevinChain(log_prob, grad_log_prob=grad_log_prob, step_size=step_size, num_steps=num_steps,
                          preconditioner=preconditioner)
    if not isinstance(init, Tensor) or not init.is_floating_point() or init.ndim < 2 or init.shape[0] < 1:
        raise ValueError(
            f"init must be a floating-point tensor [chains, *dims] with at least one chain; got "
            f"{tuple(init.shape) if isinstance(init, Tensor) else type(init).__name__} (one chain of a "
            "d-dimensional target: init[None], shape [1, d])")
    for name, value, low in (("burn_in", burn_in, 0), ("thin", thin, 1)):
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise ValueError(f"{name} must be an integer >= {low}; got {value!r}")
    count = (num_steps - burn_in) // thin
    if count < 1:
        raise ValueError(f"no draws: burn_in={burn_in} and thin={thin} leave none of the {num_steps} steps")
    draw_steps = burn_in + thin * torch.arange(1, count + 1)
    slots = torch.full((num_steps + 1,), -1, dtype=torch.long)
    slots[draw_steps] = torch.arange(count)
    y0 = chain.whiten(init)
    recorder = _Recorder(chain, slots, y0, count)
    if isinstance(drafter, SurrogateDrafter):
        drafter.bind(chain)
    try:
        if window == 1:
            out = sample_baseline(recorder, y0, generator, progress=progress, return_stats=True)
        else:
            out = speculative_sample(recorder, y0, window=window, drafter=drafter, generator=generator,
                                     max_rows=max_rows, progress=progress)
    except FloatingPointError as err:  # a NaN/inf gradient at a state of the chain (never at a discarded draft)
        raise FloatingPointError(
            f"the gradient of log_prob is NaN/inf at a state of the chain ({err}): ULA diverged or left the "
            "density's support; use a smaller step_size (or a preconditioner), or a log_prob that is finite "
            "everywhere") from None
    draws = recorder.finish(out.sample)
    return LangevinResult(chain.unwhiten(draws.flatten(0, 1)).view(draws.shape), draw_steps,
                          chain.unwhiten(out.sample), out.stats)


class ScoreSdeVeChain:
    """The sampler of diffusers' ``ScoreSdeVePipeline`` as a GaussianChain: per noise level ``i``,
    ``corrector_steps`` annealed-Langevin corrector steps with a *fixed* step size, then one
    predictor step (``ScoreSdeVeScheduler.step_pred``: ``x + d_i² s(x, σ_i) + d_i z`` with
    ``d_i² = σ_i² - σ_{i-1}²``).

    The corrector is Song & Ermon's (2019) annealed Langevin step ``x + (α_i/2) s(x, σ_i) + √α_i z``
    with ``α_i = corrector_step_size · σ_i² / σ_min²``, not diffusers' ``step_correct``: that one sets
    its step size from the norms of the score and of the very noise it adds, averaged over the batch,
    so its step is not a per-sample Gaussian with a fixed std and cannot be verified exactly.

    ``score_model(x, sigma)`` returns the score (``.sample`` of a diffusers ``UNet2DModel`` output is
    taken); ``scheduler`` must have ``set_timesteps``/``set_sigmas`` run for ``num_inference_steps``
    (this constructor runs them). With ``corrector_steps=0`` and ``window=1`` the chain draws the
    very numbers of a loop of ``step_pred`` calls (its ``prev_sample``) from the same generator.
    """

    kernel = GaussianKernel
    affine = True

    def __init__(self, scheduler, score_model: Callable, num_inference_steps: int, *, corrector_steps: int = 0,
                 corrector_step_size: float | None = None):
        if not isinstance(corrector_steps, int) or corrector_steps < 0:
            raise ValueError(f"corrector_steps must be an integer >= 0; got {corrector_steps!r}")
        if corrector_steps and not (isinstance(corrector_step_size, float | int) and corrector_step_size > 0):
            raise ValueError(
                "the corrector needs a fixed corrector_step_size > 0 (α_i = corrector_step_size · σ_i²/σ_min²); "
                "diffusers' step_correct sizes its step from the batch's score and noise norms, which no exact "
                "verification can follow")
        scheduler.set_timesteps(num_inference_steps)
        scheduler.set_sigmas(num_inference_steps)
        self.model, self.num_levels, self.corrector_steps = score_model, num_inference_steps, corrector_steps
        per_level = corrector_steps + 1
        self.num_steps = num_inference_steps * per_level
        coef, std, sigma_in = [], [], []
        sigma_min = float(scheduler.config.sigma_min)
        for i, t in enumerate(scheduler.timesteps):
            sigma_i = scheduler.sigmas[i]  # the model's input at this level (as the pipeline passes it)
            if corrector_steps:
                alpha = torch.tensor(corrector_step_size * float(sigma_i) ** 2 / sigma_min**2, dtype=torch.float32)
                coef += [alpha / 2] * corrector_steps
                std += [alpha.sqrt()] * corrector_steps
            # step_pred's own arithmetic, for a batch of one: the discrete sigma and the one before it
            timestep = t * torch.ones(1)
            index = (timestep * (len(scheduler.timesteps) - 1)).long()
            sigma = scheduler.discrete_sigmas[index]
            adjacent = scheduler.get_adjacent_sigma(index, timestep)
            diffusion = (sigma**2 - adjacent**2) ** 0.5
            coef.append(diffusion[0] ** 2)
            std.append(diffusion[0])
            sigma_in += [sigma_i] * per_level
        self.coef, self.std = torch.stack(coef), torch.stack(std)
        self.sigma_in = torch.stack([torch.as_tensor(v) for v in sigma_in])

    def predict(self, x: Tensor, step: Tensor) -> Tensor:
        out = self.model(x, self.sigma_in[step.cpu()].to(x.device))
        return getattr(out, "sample", out)

    def _per_row(self, table: Tensor, step: Tensor, like: Tensor) -> Tensor:
        return table[step.cpu()].to(like.device).view(-1, *[1] * (like.ndim - 1))

    def transition(self, x: Tensor, step: Tensor, prediction: Tensor) -> tuple[Tensor, Tensor]:
        return x + self._per_row(self.coef, step, x) * prediction, self.std[step.cpu()].to(x.device)

    def transition_affine(self, step: Tensor, prediction: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        coef = self._per_row(self.coef, step, prediction)
        return coef * prediction, torch.ones_like(coef), self.std[step.cpu()].to(prediction.device)


def batch_means_ess(draws: Tensor, batches: int | None = None) -> Tensor:
    """Effective sample size per coordinate of ``draws`` ``[chains, draws, *dims]`` by batch means:
    ``n · var / (b · var(batch means))`` pooled over chains, with ``b = n / batches`` draws per batch
    (``batches`` defaults to ``⌊√n⌋``). A simple estimator for when ArviZ is not installed."""
    if draws.ndim < 2 or draws.shape[1] < 4:
        raise ValueError(f"draws must be [chains, draws, *dims] with at least 4 draws; got {tuple(draws.shape)}")
    chains, n = draws.shape[:2]
    a = batches or max(math.isqrt(n), 2)
    b = n // a
    x = draws[:, : a * b].double().flatten(2)
    var = x.var(dim=(0, 1))
    means = x.view(chains, a, b, -1).mean(2)
    var_means = means.var(dim=(0, 1))
    ess = chains * a * b * var / (b * var_means).clamp_min(torch.finfo(torch.float64).tiny)
    return ess.view(draws.shape[2:])


__all__ = ["LangevinChain", "LangevinResult", "ScoreSdeVeChain", "SurrogateDrafter", "batch_means_ess", "sample",
           "takes_step", "to_arviz"]
