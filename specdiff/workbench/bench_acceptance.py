"""Where speculation's drafts are rejected, on the bundled digits model, batch 1: DDPM, Euler ancestral and
DPM++ 2M SDE at short schedules (docs/acceptance.md).

    python -m specdiff.workbench.bench_acceptance map  [--steps 25 50 100] [--seeds 16]
    python -m specdiff.workbench.bench_acceptance runs [--samplers ddpm ...] [--steps 25 50 100] [--seeds 16]
                                                       [--windows 4 8 16 32] [--drafters frozen picard]
                                                       [--spaces sample epsilon v_prediction]
                                                       [--verify step|block] [--tail-window T]
    python -m specdiff.workbench.bench_acceptance table

``map``: along plain trajectories (one per seed), the acceptance probability of a frozen draft of step ``k``
made from the target's prediction ``d`` steps earlier (the lag: a drafted window's position ``j`` has lag
``j`` after a fully accepted round, ``j + 1`` after a rejection), for each prediction space the draft holds
constant (eps, x0, v), for linear extrapolation in it and for x0 mixed with the eps-held x0; and the bundled
draft model at the drafted state. With one std ``s`` for both laws, the reflection coupling accepts with
probability ``1 - TV = 2 Phi(-|m_D - m_T| / (2 s))``, so the map has no sampling noise of its own: only the
trajectories' (a state a window drafts is near the plain chain's, not on it). No speculative run, ``steps``
calls per seed.

``runs``: the speculative sampler itself: sequential calls per image and the measured acceptance by
position in the window and by step (from the sampler's stats after every round, through its callback).
``--drafters`` also takes ``picard-reachN`` (:class:`PicardReach`); ``--tail-window T`` runs window ``T`` in
the last fifth of the schedule (:class:`TailWindow`).

Results merge into ``assets/bench/acceptance.json`` (``--out``), keyed by part; ``table`` prints
docs/acceptance.md's tables from it.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

import torch
from diffusers import DDPMPipeline, UNet2DModel

from ..drafters import PicardDrafter
from ..kernels.gaussian import acceptance_probability
from ..paths import asset, results
from ..sampler import sample_baseline, speculative_sample
from ..schedulers import SpeculativeScheduler
from ..schedulers.base import output_from, output_to
from ..schedulers.names import scheduler_from_name
from .results import environment

SAMPLERS = ("ddpm", "euler-a", "dpmpp-2m-sde")
SPACES = ("epsilon", "sample", "v_prediction")  # what a frozen draft holds constant across the window
MAX_LAG = 32


def load():
    """The bundled digits UNet (eval mode) and its scheduler."""
    ddpm = DDPMPipeline.from_pretrained(asset("models", "digits-ddpm"))
    return ddpm.unet.eval(), ddpm.scheduler


def speculative_scheduler(name: str, base, steps: int, **options) -> SpeculativeScheduler:
    scheduler = SpeculativeScheduler.from_scheduler(scheduler_from_name(name, base), **options)
    scheduler.set_timesteps(steps)
    return scheduler


def latents(unet, seed: int) -> torch.Tensor:
    size, channels = unet.config.sample_size, unet.config.in_channels
    return torch.randn(1, channels, size, size, generator=torch.Generator().manual_seed(seed))


# -- map: acceptance of a held prediction, by step and lag, along plain trajectories -------------------------

def trajectory(model, scheduler: SpeculativeScheduler, x_init: torch.Tensor, generator: torch.Generator):
    """A plain run's states ``x_k`` and the raw model outputs at them, one per step (batch 1);
    ``model(x, t)`` returns the network's output."""
    states, outputs = [], []

    def model_fn(x, t):
        out = model(x, t)
        outputs.append(out)
        return out

    chain = scheduler.chain(model_fn, frozen_prediction="model_output")
    plain_predict = chain.predict

    def predict(x, step, sample=None):
        states.append(x.clone())
        return plain_predict(x, step)

    chain.predict = predict
    sample_baseline(chain, x_init, generator)
    return chain.adapter, torch.cat(states), torch.cat(outputs)


def _mean(adapter, x, step, output, previous_output, x_prev):
    """The steps' ``(mean, std)`` at rows ``x`` (steps ``step``) from model outputs (and, for a multistep
    chain, the previous step's outputs at ``x_prev``)."""
    pred = adapter.prediction(output, x, step)
    prev = None
    if adapter.uses_previous_prediction:
        prev = adapter.prediction(previous_output, x_prev, step - 1)
    return adapter.transition(x, step, pred, prev)


def variants() -> dict:
    """name -> (space held, extrapolation beta, mixing weight of the eps-held x0)."""
    out = {s: (s, 0.0, 0.0) for s in SPACES}
    out.update({f"{s}+extrap{b:g}": (s, b, 0.0) for s in ("epsilon", "sample") for b in (0.5, 1.0)})
    out.update({f"sample+eps{g:g}": ("sample", 0.0, g) for g in (0.1, 0.25, 0.5)})
    return out


def draft_model_map(adapter, xs: torch.Tensor, outs: torch.Tensor, draft_outs: torch.Tensor) -> list:
    """``acc[k]``: acceptance probability of step ``k`` drafted by an independent draft model at the drafted
    state itself (its outputs ``draft_outs`` at ``xs``; no lag: it sees the state, at a draft call's cost)."""
    n = len(xs)
    steps = torch.arange(n)
    mean_t, std = _mean(adapter, xs, steps, outs, outs.roll(1, 0), xs.roll(1, 0))
    prev = torch.cat([outs[:1], draft_outs[:-1]])  # a drafted window's previous is the draft before it
    mean_d, _ = _mean(adapter, xs, steps, draft_outs, prev, xs.roll(1, 0))
    std = std.flatten()
    acc = acceptance_probability(mean_d, mean_t, std.clamp(min=1e-30))
    return [None if k == 0 or float(std[k]) == 0 else float(acc[k]) for k in range(n)]


def lag_map(adapter, xs: torch.Tensor, outs: torch.Tensor, max_lag: int = MAX_LAG) -> dict:
    """``acc[variant][k][d - 1]``: acceptance probability of step ``k`` drafted from lag ``d``.

    ``sample+epsG``: the x0 held, mixed with weight ``G`` with the x0 that the held eps gives at the
    drafted state, ``(1 - G) x0_m + G (x - sigma eps_m) / alpha`` (it needs the state the prediction was
    made at: not a function a drafter can compute from what the round hands it today)."""
    n = len(xs)
    steps = torch.arange(n)
    held = {s: output_to(adapter, s, outs, xs, steps) for s in SPACES}
    result = {name: [[None] * max_lag for _ in range(n)] for name in variants()}
    for k in range(1, n):
        lags = min(max_lag, k)
        src = k - torch.arange(1, lags + 1)
        here = torch.full((lags,), k)
        x = xs[k].expand(lags, *xs.shape[1:])
        x_prev = xs[k - 1].expand(lags, *xs.shape[1:])
        mean_t, std = _mean(adapter, xs[k : k + 1], here[:1], outs[k : k + 1], outs[k - 1 : k], xs[k - 1 : k])
        s = float(std.flatten()[0])
        if s == 0:
            continue
        for name, (space, beta, mix) in variants().items():
            value = held[space][src]
            if beta:
                back = held[space][(src - 1).clamp(min=0)]
                d = (k - src).view(-1, *[1] * (xs.ndim - 1)).to(value.dtype)
                value = torch.where((src > 0).view_as(d), value + beta * d * (value - back), value)
            out_d = output_from(adapter, space, value, x, here)
            prev_d = output_from(adapter, space, value, x_prev, here - 1)
            if mix:
                eps = held["epsilon"][src]
                out_d = (1 - mix) * out_d + mix * output_from(adapter, "epsilon", eps, x, here)
                prev_d = (1 - mix) * prev_d + mix * output_from(adapter, "epsilon", eps, x_prev, here - 1)
            if adapter.uses_previous_prediction:  # a drafted window's previous is the draft before it
                prev_d[0] = outs[k - 1]
            mean_d, _ = _mean(adapter, x, here, out_d, prev_d, x_prev)
            acc = acceptance_probability(mean_d, mean_t.expand_as(mean_d), s)
            for d in range(lags):
                result[name][k][d] = float(acc[d])
    return result


def simulated_calls(acc: list[list], window: int, rng: torch.Generator, draws: int = 200) -> float:
    """Sequential calls per image that a frozen drafter with these acceptance probabilities would make
    (steps accepted independently; a model of the sampler, checked against ``runs``)."""
    n = len(acc)
    total = 0
    for _ in range(draws):
        k, lag0, calls = 0, 0, 1  # lag of position 0: 0 when fresh (exact), 1 after a rejection
        while k < n:
            calls += 1
            done = 0
            for j in range(min(window, n - k)):
                lag = lag0 + j
                p = 1.0 if lag == 0 or acc[k + j][lag - 1] is None else acc[k + j][lag - 1]
                if float(torch.rand((), generator=rng)) >= p:
                    done, lag0 = j + 1, 1
                    break
            else:
                done, lag0 = min(window, n - k), 0
            k += done
        total += calls - (1 if lag0 == 0 else 0)  # the last round's verify of the final state is not made
    return total / draws


def run_map(steps_list, seeds: int, samplers=SAMPLERS, draft_model: bool = True) -> dict:
    unet, base = load()
    draft = UNet2DModel.from_pretrained(asset("models", "digits-draft")).eval() if draft_model else None
    rows = []
    for name in samplers:
        for steps in steps_list:
            scheduler = speculative_scheduler(name, base, steps)
            sums = None
            count = None
            for seed in range(seeds):
                adapter, xs, outs = trajectory(lambda x, t: unet(x, t).sample, scheduler, latents(unet, seed),
                                               torch.Generator().manual_seed(100 + seed))
                m = lag_map(adapter, xs, outs)
                if draft is not None:  # one value per step, whatever the lag
                    every = torch.arange(len(xs))
                    draft_outs = draft(adapter.scale_model_input(xs, every), adapter.model_timesteps(every, xs.device))
                    by_step = draft_model_map(adapter, xs, outs, draft_outs.sample)
                    m["draft model"] = [[p] * MAX_LAG for p in by_step]
                if sums is None:
                    sums = {v: [[0.0] * MAX_LAG for _ in range(steps)] for v in m}
                    count = [[0] * MAX_LAG for _ in range(steps)]
                for v, table in m.items():
                    for k, row in enumerate(table):
                        for d, p in enumerate(row):
                            if p is not None:
                                sums[v][k][d] += p
                                if v == SPACES[0]:
                                    count[k][d] += 1
            mean = {v: [[(t[k][d] / count[k][d]) if count[k][d] else None for d in range(MAX_LAG)]
                        for k in range(steps)] for v, t in sums.items()}
            rng = torch.Generator().manual_seed(0)
            simulated = {v: {w: simulated_calls(table, w, rng) for w in (4, 8, 16, 32)} for v, table in mean.items()}
            rows.append({"sampler": name, "steps": steps, "seeds": seeds, "acceptance": mean,
                         "simulated_calls": simulated})
    return {"rows": rows}


# -- runs: the speculative sampler, acceptance by position and by step ------------------------------------

class PicardReach(PicardDrafter):
    """The Picard drafter, its same-step predictions used only up to ``reach`` steps past the target's last
    prediction (the held x0 beyond): "Picard for the first redrafted steps, frozen beyond"."""

    def __init__(self, reach: int):
        self.reach = reach

    def predict(self, x, step, memory):
        if memory.same_step is None:
            return memory.prediction
        near = memory.has_same_step & (step - memory.step <= self.reach)
        return torch.where(near.view(-1, *[1] * (memory.prediction.ndim - 1)), memory.same_step, memory.prediction)


def as_bench_drafter(name: str):
    """``frozen``, ``picard`` or ``picard-reachN`` (:class:`PicardReach`)."""
    if name.startswith("picard-reach"):
        return PicardReach(int(name.removeprefix("picard-reach")))
    return name


class StepTally:
    """Per-step proposed/accepted counts of a batch-1 run, from the stats after each round."""

    def __init__(self, steps: int):
        self.proposed, self.accepted = [0] * steps, [0] * steps
        self.n, self.seen = 0, (0, 0)

    def __call__(self, info: dict) -> None:
        stats = info["stats"]
        n_new = int(info["step"][0])
        proposed, accepted = stats.proposed - self.seen[0], stats.accepted - self.seen[1]
        committed = n_new - self.n
        if proposed:
            rejected = accepted < proposed
            # the tested positions are consecutive steps ending at the rejected one (or the last committed)
            last = self.n + committed - 1
            first = last - proposed + 1
            for k in range(first, last + 1):
                self.proposed[k] += 1
                self.accepted[k] += not (rejected and k == last)
        self.n, self.seen = n_new, (stats.proposed, stats.accepted)


class TailWindow:
    """A per-step window: ``window`` before the last fifth of the schedule, ``tail`` in it (where the
    map puts most rejections). A deterministic function of the steps done, read from the run's counts
    (batch 1: the steps committed so far), so the sampler stays exact."""

    def __init__(self, window: int, tail: int, steps: int):
        self.window, self.tail, self.cut = window, tail, steps - steps // 5
        self.max_window = max(window, tail)

    def choose(self, stats, live: int) -> int:
        done = sum(c * count for c, count in enumerate(stats.committed_per_round))
        return self.window if done < self.cut else self.tail


def run_runs(samplers, steps_list, seeds: int, windows, drafters, spaces, verify: str = "step",
             tail_window: int | None = None) -> list[dict]:
    unet, base = load()
    rows = []
    for name in samplers:
        for steps in steps_list:
            for space in spaces:
                if name == "dpmpp-2m-sde" and space != "sample":
                    continue  # DPM-Solver++ carries x0 (its next step needs the previous one)
                scheduler = speculative_scheduler(name, base, steps, frozen_prediction=space)
                chain = scheduler.chain(lambda x, t: unet(x, t).sample)
                for drafter in drafters:
                    for window in windows:
                        calls, rows_evaluated, pos_p, pos_a = [], 0, [0] * window, [0] * window
                        step_p, step_a = [0] * steps, [0] * steps
                        started = time.perf_counter()
                        for seed in range(seeds):
                            tally = StepTally(steps)
                            policy = window if tail_window is None else TailWindow(window, tail_window, steps)
                            out = speculative_sample(chain, latents(unet, seed), window=policy,
                                                     drafter=as_bench_drafter(drafter),
                                                     generator=torch.Generator().manual_seed(100 + seed),
                                                     callback=tally, verify=verify)
                            calls.append(out.stats.target_calls)
                            rows_evaluated += out.stats.target_rows
                            for j in range(window):
                                pos_p[j] += out.stats.proposed_by_position[j]
                                pos_a[j] += out.stats.accepted_by_position[j]
                            for k in range(steps):
                                step_p[k] += tally.proposed[k]
                                step_a[k] += tally.accepted[k]
                        mean = sum(calls) / seeds
                        sd = (sum((c - mean) ** 2 for c in calls) / max(seeds - 1, 1)) ** 0.5
                        rows.append({"sampler": name, "steps": steps, "space": space, "drafter": drafter,
                                     "verify": verify, "window": window, "tail_window": tail_window,
                                     "seeds": seeds, "calls": mean,
                                     "calls_sd": sd, "calls_per_seed": calls, "rows": rows_evaluated / seeds,
                                     "speedup": steps / mean, "proposed_by_position": pos_p,
                                     "accepted_by_position": pos_a, "proposed_by_step": step_p,
                                     "accepted_by_step": step_a, "seconds": time.perf_counter() - started})
                        print(f"{name} {steps} {space} {drafter} {verify} w{window}: {mean:.1f} calls "
                              f"({steps / mean:.2f}x)", flush=True)
    return rows


def run_key(r: dict) -> tuple:
    return (r["sampler"], r["steps"], r["space"], r["drafter"], r.get("verify", "step"), r["window"],
            r.get("tail_window"))


STORED_LAGS = (1, 4)


def compact(row: dict) -> dict:
    """A map row as stored: acceptance at a few lags (3 decimals), and where the calls go (simulated
    from every lag, window 32): as mapped, with the last fifth of the schedule free, with only it costing."""
    if "calls_where" in row:
        return row
    table, steps = row["acceptance"]["sample"], row["steps"]
    cut = steps - steps // 5
    rng = torch.Generator().manual_seed(0)
    where = {"as_mapped": simulated_calls(table, 32, rng),
             "tail_free": simulated_calls([t if k < cut else [1.0] * MAX_LAG for k, t in enumerate(table)], 32, rng),
             "tail_only": simulated_calls([[1.0] * MAX_LAG if k < cut else t for k, t in enumerate(table)], 32, rng)}
    acceptance = {v: {str(d): [None if t[d - 1] is None else round(t[d - 1], 3) for t in row["acceptance"][v]]
                      for d in STORED_LAGS} for v in SPACES}
    return {**row, "acceptance": acceptance, "calls_where": where,
            "simulated_calls": {v: {str(w): round(c, 2) for w, c in calls.items()}
                                for v, calls in row["simulated_calls"].items()}}


def merge(out: Path, part: str, result, command: str) -> None:
    data = json.loads(out.read_text()) if out.exists() else {}
    data["environment"] = environment()
    data["commands"] = [c for c in data.get("commands", []) if c != command] + [command]
    if part == "map":
        old = {(r["sampler"], r["steps"]): r for r in data.get("map", {}).get("rows", [])}
        old.update({(r["sampler"], r["steps"]): compact(r) for r in result["rows"]})
        data["map"] = {"rows": list(old.values())}
    else:
        old = {run_key(r): r for r in data.get("runs", [])}
        old.update({run_key(r): r for r in result})
        data["runs"] = list(old.values())
    out.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(data, indent=1)  # then each list of numbers on one line: a diffable, smaller file
    out.write_text(re.sub(r"\[[-0-9.eE,\snul]*\]", lambda m: " ".join(m.group(0).split()), text))


BINS = 10  # the schedule is shown in tenths (first tenth = the noisiest steps)


def _tenths(values: list, steps: int, weights: list | None = None) -> list:
    """Mean of ``values`` (``None`` skipped) over each tenth of the schedule (weighted by ``weights``)."""
    out = []
    for b in range(BINS):
        lo, hi = b * steps // BINS, (b + 1) * steps // BINS
        pairs = [(v, 1 if weights is None else weights[k]) for k, v in enumerate(values[lo:hi], lo)
                 if v is not None and (weights is None or weights[k])]
        total = sum(w for _, w in pairs)
        out.append(sum(v * w for v, w in pairs) / total if total else None)
    return out


def _cell(p) -> str:
    return "–" if p is None else f"{p:.2f}"


def tables(result: dict) -> str:
    """docs/acceptance.md's tables from the results file."""
    lines = []
    runs = result.get("runs", [])
    plain = [r for r in runs if r.get("verify", "step") == "step" and r.get("tail_window") is None]
    if plain:
        windows = sorted({r["window"] for r in plain})
        lines += ["Sequential target calls per image (speed-up over the plain sampler's steps), x0 held, "
                  "mean over seeds:", "",
                  "| sampler | steps | drafter | " + " | ".join(f"window {w}" for w in windows) + " |",
                  "| --- " * (3 + len(windows)) + "|"]
        keys = sorted({(r["sampler"], r["steps"], r["drafter"]) for r in plain if r["space"] == "sample"},
                      key=lambda t: (SAMPLERS.index(t[0]), t[1], t[2]))
        by = {(r["sampler"], r["steps"], r["drafter"], r["space"], r["window"]): r for r in plain}
        for name, steps, drafter in keys:
            cells = []
            for w in windows:
                r = by.get((name, steps, drafter, "sample", w))
                cells.append("" if r is None else f"{r['calls']:.1f} ({r['speedup']:.1f}×)")
            lines.append(f"| {name} | {steps} | {drafter} | " + " | ".join(cells) + " |")
        lines += ["", "Measured acceptance by position in the window (accepted / tested drafted steps), window 16:", "",
                  "| sampler | steps | drafter | " + " | ".join(f"j={j}" for j in range(8)) + " |",
                  "| --- " * 11 + "|"]
        for name, steps, drafter in keys:
            r = by.get((name, steps, drafter, "sample", 16))
            if r is None:
                continue
            rates = [a / p if p else None for a, p in zip(r["accepted_by_position"], r["proposed_by_position"])]
            lines.append(f"| {name} | {steps} | {drafter} | " + " | ".join(_cell(x) for x in rates[:8]) + " |")
        lines += ["", "Measured acceptance by step, in tenths of the schedule (first = noisiest), window 16; last "
                  "column: rejections per image in the last fifth (each ends a round: about one call):", "",
                  "| sampler | steps | drafter | " + " | ".join(f"{b + 1}" for b in range(BINS))
                  + " | rejections, last fifth / all |", "| --- " * (BINS + 4) + "|"]
        for name, steps, drafter in keys:
            r = by.get((name, steps, drafter, "sample", 16))
            if r is None:
                continue
            proposed, accepted = r["proposed_by_step"], r["accepted_by_step"]
            rates = [a / p if p else None for a, p in zip(accepted, proposed)]
            rejected = [(p - a) / r["seeds"] for a, p in zip(accepted, proposed)]
            tail = sum(rejected[steps - steps // 5 :])
            lines.append(f"| {name} | {steps} | {drafter} | "
                         + " | ".join(_cell(x) for x in _tenths(rates, steps, proposed))
                         + f" | {tail:.1f} / {sum(rejected):.1f} |")
    others = [r for r in runs if r not in plain or r["space"] != "sample"]
    if others:
        lines += ["", "Variants, each beside the same sampler, steps, drafter and window with x0 held and step "
                  "verification (calls per image; rows: states the target evaluated per image):", "",
                  "| sampler | steps | drafter | held | verify | window | calls | rows |", "| --- " * 8 + "|"]
        cases = {(r["sampler"], r["steps"], r["drafter"], r["window"]) for r in others}
        shown = others + [r for r in plain if r["space"] == "sample"
                          and (r["sampler"], r["steps"], r["drafter"], r["window"]) in cases]
        for r in sorted(shown, key=lambda r: (SAMPLERS.index(r["sampler"]), r["steps"], r["drafter"], r["window"],
                                              r["space"] != "sample", r["space"], r.get("verify", "step"),
                                              r.get("tail_window") or 0)):
            window = str(r["window"]) if r.get("tail_window") is None else f"{r['window']}, {r['tail_window']} in " \
                "the last fifth"
            rows = f"{r['rows']:.0f}" if "rows" in r else ""
            lines.append(f"| {r['sampler']} | {r['steps']} | {r['drafter']} | {r['space']} | {r.get('verify', 'step')} "
                         f"| {window} | {r['calls']:.1f} ({r['speedup']:.1f}×) | {rows} |")
    maps = result.get("map", {}).get("rows", [])
    if maps:
        lines += ["", "Where the calls go (simulated from the map, x0 held, window 32): calls per image as mapped, "
                  "with every step of the last fifth accepted, and with every step *before* the last fifth "
                  "accepted (the floor the last fifth sets):", "",
                  "| sampler | steps | as mapped | last fifth free | only the last fifth costs |", "| --- " * 5 + "|"]
        for row in sorted(maps, key=lambda r: (SAMPLERS.index(r["sampler"]), r["steps"])):
            where = row["calls_where"]
            lines.append(f"| {row['sampler']} | {row['steps']} | {where['as_mapped']:.1f} | {where['tail_free']:.1f} "
                         f"| {where['tail_only']:.1f} |")
    if maps:
        ordered = sorted(maps, key=lambda r: (SAMPLERS.index(r["sampler"]), r["steps"]))
        lines += ["", f"Map: calls per image a frozen drafter would make at window 32 (simulated from the map, "
                  f"{maps[0]['seeds']} plain trajectories each), by what the draft holds constant:", "",
                  "| held | " + " | ".join(f"{r['sampler']} {r['steps']}" for r in ordered) + " |",
                  "| --- " * (len(ordered) + 1) + "|"]
        for variant in ordered[0]["simulated_calls"]:
            cells = [r["simulated_calls"].get(variant, {}).get("32") for r in ordered]
            lines.append(f"| {variant} | " + " | ".join("–" if c is None else f"{c:.1f}" for c in cells) + " |")
        shown = [r for r in ordered if r["steps"] == 50] or ordered
        lines += ["", f"Map: acceptance of a held prediction at lag 1 (a window's first drafted step) and lag 4, by "
                  f"tenth of the schedule (first = noisiest), {shown[0]['steps']} steps:", "",
                  "| sampler | steps | held | lag | " + " | ".join(f"{b + 1}" for b in range(BINS)) + " |",
                  "| --- " * (BINS + 4) + "|"]
        for row in shown:
            for variant, by_lag in row["acceptance"].items():
                for lag in STORED_LAGS:
                    cells = _tenths(by_lag[str(lag)], row["steps"])
                    lines.append(f"| {row['sampler']} | {row['steps']} | {variant} | {lag} | "
                                 + " | ".join(_cell(c) for c in cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("part", choices=("map", "runs", "table"))
    parser.add_argument("--samplers", nargs="+", default=list(SAMPLERS), choices=SAMPLERS)
    parser.add_argument("--steps", type=int, nargs="+", default=[25, 50, 100])
    parser.add_argument("--seeds", type=int, default=16)
    parser.add_argument("--windows", type=int, nargs="+", default=[4, 8, 16, 32])
    parser.add_argument("--drafters", nargs="+", default=["frozen", "picard"])
    parser.add_argument("--spaces", nargs="+", default=["sample"], choices=SPACES)
    parser.add_argument("--verify", default="step", choices=("step", "block"))
    parser.add_argument("--tail-window", type=int, default=None,
                        help="the window in the last fifth of the schedule (--windows: before it)")
    parser.add_argument("--out", type=Path, default=results("acceptance.json"))
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    command = "python -m specdiff.workbench.bench_acceptance " + " ".join(argv if argv is not None else sys.argv[1:])
    if args.part == "map":
        with torch.no_grad():
            merge(args.out, "map", run_map(args.steps, args.seeds, args.samplers), command)
    elif args.part == "runs":
        merge(args.out, "runs", run_runs(args.samplers, args.steps, args.seeds, args.windows, args.drafters,
                                         args.spaces, args.verify, args.tail_window), command)
    print(tables(json.loads(args.out.read_text())))


if __name__ == "__main__":
    main()
