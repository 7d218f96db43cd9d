"""Benchmark: speculative vs plain ULA (:mod:`specdiff.langevin`) on two workloads.

    python -m specdiff.workbench.bench_langevin       # writes assets/bench/langevin.json + the docs/langevin.md table

* ``mlp``: an expensive potential, ``log π(x) = -|x|²/2 - f(x)`` with ``f`` a random 3-hidden-layer
  MLP (width ``--width``), one chain (batch 1), ``--steps`` steps, per step size; the speculative
  runs use ``specdiff.langevin.sample``'s defaults (window 16, Picard drafter) and two other drafters.
* ``logistic``: Bayesian logistic regression on scikit-learn's breast-cancer data (30 standardised
  features and an intercept, N(0, 1) prior), ``--chains`` chains, preconditioned by the Laplace
  approximation's covariance; drafters: frozen, Picard, and the Laplace Gaussian as a surrogate.

Each row: sequential gradient evaluations (batched calls; the plain loop makes one per step),
wall-clock on this machine, acceptance, ESS (ArviZ's bulk ESS when installed, else batch means;
median and minimum over coordinates, pooled over chains) and ESS per sequential evaluation. Every
run of a workload uses the same seed; speculative and plain runs have the
same law (ULA's) but different paths, so their ESS differ by estimation noise as well.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time
from pathlib import Path

import torch

from .. import langevin
from ..paths import docs_page
from .results import write_between

MARK_START, MARK_END = "<!-- bench_langevin:start -->", "<!-- bench_langevin:end -->"


def ess(draws: torch.Tensor) -> tuple[torch.Tensor, str]:
    """Per-coordinate ESS of ``[chains, draws, d]`` and the estimator's name."""
    try:
        import arviz
    except ImportError:
        return langevin.batch_means_ess(draws).flatten(), "batch means"
    data = arviz.convert_to_dataset({"x": draws.double().numpy()})
    return torch.as_tensor(arviz.ess(data, method="bulk")["x"].values).flatten(), "arviz bulk"


def run(name: str, log_prob, init, generators, **kwargs) -> dict:
    started = time.perf_counter()
    out = langevin.sample(log_prob, init, generator=generators(), **kwargs)
    seconds = time.perf_counter() - started
    values, method = ess(out.draws)
    s = out.stats
    return {
        "run": name, "window": kwargs.get("window", 16), "sequential_gradient_evaluations": s.target_calls,
        "gradient_rows": s.target_rows, "draft_calls": s.draft_calls, "acceptance": round(s.acceptance_rate, 4),
        "wall_clock_s": round(seconds, 3), "ess_min": round(float(values.min()), 1),
        "ess_median": round(float(values.median()), 1), "ess_method": method,
        "ess_median_per_sequential_evaluation": round(float(values.median()) / s.target_calls, 4),
        "ess_min_per_sequential_evaluation": round(float(values.min()) / s.target_calls, 4),
    }


def mlp_energy(dim: int, width: int, seed: int = 0) -> torch.nn.Module:
    """A random MLP ``f: R^dim -> R`` (SiLU, 3 hidden layers, 1/√fan-in weights), frozen."""
    g = torch.Generator().manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Linear(dim, width), torch.nn.SiLU(), torch.nn.Linear(width, width),
                              torch.nn.SiLU(), torch.nn.Linear(width, width), torch.nn.SiLU(),
                              torch.nn.Linear(width, 1))
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p.shape[-1]) if p.ndim == 2 else torch.zeros_like(p))
    return net.requires_grad_(False)


def bench_mlp(args) -> dict:
    net = mlp_energy(args.dim, args.width)

    def log_prob(x):
        return -x.square().sum(1) / 2 - net(x).squeeze(1)

    init = torch.zeros(1, args.dim)
    rows = []
    for h in args.step_sizes:
        common = {"step_size": h, "num_steps": args.steps, "burn_in": args.steps // 10}

        def gens():
            return [torch.Generator().manual_seed(args.seed)]

        plain = run("plain ULA", log_prob, init, gens, window=1, **common)
        rows.append({"step_size": h, **plain})
        for name, extra in [("speculative (defaults: window 16, Picard)", {}),
                            ("speculative, frozen drafter", {"drafter": "frozen"}),
                            ("speculative, surrogate N(0, I) (the MLP left out)",
                             {"drafter": langevin.SurrogateDrafter(draft_grad=lambda x: -x)})]:
            r = run(name, log_prob, init, gens, **extra, **common)
            r["fewer_sequential_evaluations"] = round(plain["sequential_gradient_evaluations"]
                                                      / r["sequential_gradient_evaluations"], 2)
            r["wall_clock_speedup"] = round(plain["wall_clock_s"] / r["wall_clock_s"], 2)
            rows.append({"step_size": h, **r})
    return {"workload": f"MLP energy: -|x|²/2 - f(x), d={args.dim}, 3 hidden layers of {args.width}, 1 chain, "
                        f"{args.steps} steps (burn-in {args.steps // 10})", "rows": rows}


def breast_cancer() -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_breast_cancer

    data = load_breast_cancer()
    x = torch.as_tensor(data.data, dtype=torch.float64)
    x = (x - x.mean(0)) / x.std(0)
    return torch.cat([torch.ones(len(x), 1, dtype=torch.float64), x], 1), torch.as_tensor(data.target,
                                                                                           dtype=torch.float64)


def bench_logistic(args) -> dict:
    features, labels = breast_cancer()

    def log_prob(w):  # Bernoulli likelihood with logits X w, N(0, I) prior; w: [chains, 31]
        logits = w @ features.T
        return (labels * logits - torch.nn.functional.softplus(logits)).sum(1) - w.square().sum(1) / 2

    # Laplace approximation: Newton's method to the mode (the posterior is log-concave).
    w = torch.zeros(features.shape[1], dtype=torch.float64)
    for _ in range(30):
        p = torch.sigmoid(features @ w)
        grad = features.T @ (labels - p) - w
        hessian = features.T @ (features * (p * (1 - p))[:, None]) + torch.eye(len(w), dtype=torch.float64)
        w = w + torch.linalg.solve(hessian, grad)
    covariance = torch.linalg.inv(hessian)
    covariance = (covariance + covariance.T) / 2
    g = torch.Generator().manual_seed(args.seed)
    init = w + torch.randn(args.chains, len(w), generator=g, dtype=torch.float64) @ torch.linalg.cholesky(covariance).T
    common = {"step_size": args.logistic_step, "num_steps": args.steps, "burn_in": args.steps // 10,
              "preconditioner": covariance}

    def gens():  # one for all chains (a list costs more per step)
        return torch.Generator().manual_seed(args.seed)

    plain = run("plain ULA", log_prob, init, gens, window=1, **common)
    rows = [plain]
    h = args.logistic_step
    for name, extra in [("speculative (defaults: window 16, Picard)", {}),
                        ("speculative, frozen drafter", {"drafter": "frozen"}),
                        ("speculative, Laplace surrogate",
                         {"drafter": langevin.SurrogateDrafter.gaussian(w, hessian)})]:
        r = run(name, log_prob, init, gens, **extra, **common)
        r["fewer_sequential_evaluations"] = round(plain["sequential_gradient_evaluations"]
                                                  / r["sequential_gradient_evaluations"], 2)
        r["wall_clock_speedup"] = round(plain["wall_clock_s"] / r["wall_clock_s"], 2)
        rows.append(r)
    rows = [{"step_size": h, **r} for r in rows]
    if args.nuts:
        rows.append(nuts_row(log_prob, w, args, plain))
    return {"workload": f"Bayesian logistic regression, breast cancer (569 x 30 + intercept), {args.chains} chains, "
                        f"{args.steps} steps (burn-in {args.steps // 10}), h={args.logistic_step}, Laplace-covariance "
                        "preconditioner", "rows": rows}


def nuts_row(log_prob, start: torch.Tensor, args, plain: dict) -> dict:
    """pyro's NUTS on the same posterior, for context on ESS per second: a different chain (exact for the
    posterior, with its own tuning), one chain of ``args.steps`` draws after as many warm-up steps. Every
    gradient evaluation of NUTS is sequential; they are counted by wrapping the potential."""
    try:
        from pyro.infer import MCMC, NUTS
    except ImportError:
        raise SystemExit("--nuts runs pyro's NUTS: pip install pyro-ppl") from None

    calls = [0]

    def potential(params):
        calls[0] += 1
        return -log_prob(params["w"][None])[0]

    torch.manual_seed(args.seed)  # pyro draws from torch's global generator
    mcmc = MCMC(NUTS(potential_fn=potential), num_samples=args.steps, warmup_steps=args.steps,
                initial_params={"w": start.clone()}, disable_progbar=True)
    started = time.perf_counter()
    mcmc.run()
    seconds = time.perf_counter() - started
    values, method = ess(mcmc.get_samples()["w"][None])
    return {"step_size": "adaptive", "run": "pyro NUTS (a different, exact chain; 1 chain, warm-up included)",
            "window": None, "sequential_gradient_evaluations": calls[0], "acceptance": "-",
            "wall_clock_s": round(seconds, 3), "ess_min": round(float(values.min()), 1),
            "ess_median": round(float(values.median()), 1), "ess_method": method,
            "ess_median_per_sequential_evaluation": round(float(values.median()) / calls[0], 4),
            "fewer_sequential_evaluations": round(plain["sequential_gradient_evaluations"] / calls[0], 2),
            "wall_clock_speedup": round(plain["wall_clock_s"] / seconds, 2)}


def markdown(results: dict) -> str:
    lines = [(f"Measured by `{results['command']}` on {results['machine']} ({results['threads']} torch thread(s)); "
              f"ESS: {results['ess_method']}, median (min) over coordinates."), ""]
    for block in results["workloads"]:
        lines += [f"**{block['workload']}**", "",
                  ("| h | run | sequential gradient evaluations | fewer than plain | wall-clock (s) "
                   "| wall-clock speedup | acceptance | ESS median (min) | ESS median / sequential evaluation |"),
                  "|---|---|---|---|---|---|---|---|---|"]
        for r in block["rows"]:
            lines.append(f"| {r['step_size']} | {r['run']} | {r['sequential_gradient_evaluations']} | "
                         f"{r.get('fewer_sequential_evaluations', 1.0)}x | {r['wall_clock_s']} | "
                         f"{r.get('wall_clock_speedup', 1.0)}x | {r['acceptance']} | "
                         f"{r['ess_median']} ({r['ess_min']}) | "
                         f"{r['ess_median_per_sequential_evaluation']} |")
        lines.append("")
    return "\n".join(lines)


def write_doc(path: Path, table: str) -> None:
    write_between(path, (MARK_START, MARK_END), table)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Benchmark speculative vs plain ULA (specdiff.langevin)")
    p.add_argument("--workloads", nargs="+", default=["mlp", "logistic"], choices=["mlp", "logistic"])
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--dim", type=int, default=16, help="MLP energy: state dimension")
    p.add_argument("--width", type=int, default=1024, help="MLP energy: hidden width")
    p.add_argument("--step-sizes", type=float, nargs="+", default=[0.02, 0.05, 0.1], help="MLP energy: ULA step sizes")
    p.add_argument("--chains", type=int, default=8, help="logistic regression: chains")
    p.add_argument("--logistic-step", type=float, default=0.1, help="logistic regression: h (preconditioned)")
    p.add_argument("--nuts", action="store_true",
                   help="logistic regression: pyro's NUTS beside it, for context (needs pyro-ppl)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None, help="JSON results (default assets/bench/langevin.json)")
    p.add_argument("--doc", type=Path, default=docs_page("langevin.md"),
                   help="markdown file whose results block is rewritten ('-' to skip)")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    blocks = []
    if "mlp" in args.workloads:
        blocks.append(bench_mlp(args))
    if "logistic" in args.workloads:
        blocks.append(bench_logistic(args))
    results = {
        "command": "python -m specdiff.workbench.bench_langevin" + (" " + " ".join(argv) if argv else ""),
        "machine": f"{platform.processor() or platform.machine()}, {platform.system()}", "threads": args.threads,
        "torch": torch.__version__, "ess_method": blocks[0]["rows"][0]["ess_method"], "workloads": blocks,
    }
    out = args.out or results("langevin.json")
    Path(out).write_text(json.dumps(results, indent=2) + "\n")
    if str(args.doc) != "-":
        write_doc(args.doc, markdown(results))
    return results


if __name__ == "__main__":
    import sys

    main(sys.argv[1:])
