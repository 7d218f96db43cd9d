"""The benchmark page: markdown tables of the saved results (``assets/bench/*.json``).

``python -m specdiff.workbench.bench report`` prints them; ``... report --write`` writes
``docs/benchmarks.md`` (a fixed introduction, then the tables), which a test keeps equal to the
saved results.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..paths import docs_page
from ..window import AutoWindow

DOCS = docs_page("benchmarks.md")

INTRODUCTION = """# Benchmarks

Every figure below is in `assets/bench/*.json` (with plots beside them) and is written to this page by
`python -m specdiff.workbench.bench report --write`; each table names the command that measured it.
"Speedup" is sequential target calls of the plain sampler over ours (the latency unit); rows
evaluated is the compute unit. CPU timings come from a shared 2-core machine and are indicative; on a
GPU, where a batch of `window` rows costs about as much as one, the call speedup is the relevant figure.
Sample quality is reported beside speed where it was measured; it is not evidence of exactness (the
tests are).

"""


def _report_digits(d: dict) -> list[str]:
    env = d["environment"]
    one = env["threads"] == 1  # one thread: CPU time is what wall-clock would be on an idle core
    lines = [f"Bundled digits DDPM, {d['num_steps']} steps, batch 1, same seeds, {env['processor']} CPU, "
             f"{env['threads']} thread{'s' if env['threads'] > 1 else ''}, "
             f"median of {d['repeats']} interleaved repeats (`{d['command']}`)"
             + ("; the machine is shared, so the process's CPU time (what wall-clock would be on an idle core) is "
                "shown too:" if one else ", all the machine's cores:"), "",
             "| sampler | window | sequential target calls | rows / image | largest batch | acceptance "
             "| wall-clock s (min-max) | fewer calls | wall-clock speedup | paired by seed |"
             + (" CPU-time speedup |" if one else ""),
             "|" + " --- |" * (11 if one else 10)]
    for r in d["summary"]:
        acc = "" if r["acceptance_rate"] is None else f"{r['acceptance_rate']:.3f}"
        lines.append(f"| {r['sampler']} | {r['window']} | {r['target_calls']:.0f} | {r['target_rows']:.0f} "
                     f"| {r['max_rows_per_call']} | {acc} | {r['wall_clock_s']:.2f} ({r['wall_clock_min_s']:.2f}-"
                     f"{r['wall_clock_max_s']:.2f}) | {r['call_speedup']:.2f}x | {r['wall_clock_speedup']:.2f}x "
                     f"| {r['wall_clock_speedup_paired']:.2f}x |" + (f" {r['cpu_speedup']:.2f}x |" if one else ""))
    lines += ["", "Wall-clock speedup: plain median / sampler median; paired by seed: the median over seeds of "
              "plain / sampler on the same seed."]
    if "unet_latency_s" in d:  # what caps the speedup on this device: a batch of rows against one row
        t = {int(b): v for b, v in d["unet_latency_s"].items()}
        lines += ["", "One UNet call on b rows (the automatic window's calibration): "
                  + ", ".join(f"t({b})/t(1) = {v / t[1]:.1f}" for b, v in sorted(t.items()) if b > 1)
                  + f", t(1) = {1e3 * t[1]:.1f} ms."]
        lines += ["", "What that curve allows: the wall-clock speedup of the best window over single-row calls if the "
                  "round cost nothing outside the network, `max_L rate(L) * t(1)` (the automatic window's rate, at "
                  "one acceptance for every drafted step): "
                  + ", ".join(f"{speedup:.1f}x (L = {window}) at acceptance {a}" for a, (speedup, window)
                              in ((a, _ceiling(t, a)) for a in (0.95, 0.965, 0.98, 0.99))) + "."]
    lines += [""] + _report_positions(d["latency_batch1"])
    q = d["quality"]
    lines += ["", f"Quality over {q['samples']} images per sampler (image i: seed 10000 + i for every sampler; "
              "two-sample test in classifier features against the plain sampler, family-wise alpha = 0.001). "
              "The shared seeds couple each sampler's images to the plain ones, so the test is conservative: "
              "it is a quality check, not evidence of exactness (the approximate ParaDiGMS passes it too; "
              "exactness is shown by the test suite's law tests, with independent seeds):", "",
              "| sampler | window | digit FD vs held-out | confidence >= 0.9 | two-sample min p "
              "| no difference detected at this n |",
              "|" + " --- |" * 6]
    for r in q["rows"]:
        p = f"{r['two_sample_min_p']:.3f}" if "two_sample_min_p" in r else ""
        lines.append(f"| {r['sampler']} | {r['window']} | {r['fd_vs_test']:.2f} | {r['confident_fraction_0.9']:.1%} "
                     f"| {p} | {r.get('same_law', '')} |")
    return lines + [""]


def _ceiling(latency: dict[int, float], acceptance: float, max_window: int = 32) -> tuple[float, int]:
    """``(speedup, window)``: the best window's committed steps per second over one row's, at zero
    cost outside the network (the automatic window's rate with ``c = h = 0``)."""
    rates = AutoWindow(max_window, latency=latency, outside=(0.0, 0.0)).rates(1, [acceptance] * max_window)
    best = max(range(max_window), key=rates.__getitem__)
    return rates[best] * latency[1], best + 1


def _report_positions(latency: list[dict], positions: int = 8) -> list[str]:
    """Acceptance by window position (0 = the round's first drafted step) per drafter, over the repeats."""
    totals = {}
    for r in latency:
        if "proposed_by_position" in r:
            acc, prop = totals.setdefault((r["sampler"], r["window"]), ([0] * positions, [0] * positions))
            for j, (a, p) in enumerate(
                    zip(r["accepted_by_position"][:positions], r["proposed_by_position"][:positions])):
                acc[j], prop[j] = acc[j] + a, prop[j] + p
    lines = ["Acceptance by window position (position 0 follows a rejection unless the previous round was fully "
             "accepted), over the timed runs:", "",
             "| sampler | window | " + " | ".join(f"j={j}" for j in range(positions)) + " |",
             "|" + " --- |" * (positions + 2)]
    for (sampler, window), (acc, prop) in totals.items():
        cells = [f"{a / p:.3f}" if p else "" for a, p in zip(acc, prop)]
        lines.append(f"| {sampler} | {window} | " + " | ".join(cells) + " |")
    return lines


def _report_churn(d: dict) -> list[str]:
    windows = sorted({r["window"] for r in d["rows"]})
    cell = {(r["drafter"], r["window"]): r for r in d["rows"]}
    lines = [f"Churn protocol ({d['protocol']}); drafted steps per target call per trajectory (acceptance), "
             f"{d['rows'][0]['trajectories']} trajectories (`{d['command']}`):", "",
             "| drafter | " + " | ".join(f"L={w}" for w in windows) + " |", "|" + " --- |" * (len(windows) + 1)]
    for drafter in dict.fromkeys(r["drafter"] for r in d["rows"]):
        lines.append(f"| {drafter} | " + " | ".join(
            f"{cell[drafter, w]['steps_per_call']:.2f} ({cell[drafter, w]['acceptance_rate']:.2f})" for w in windows)
            + " |")
    same = all(r["same_law"] for r in d["rows"])
    return lines + ["", f"Every setting passes the two-sample test against the plain sampler: {same}.", ""]


def _report_discrete_latency(d: dict) -> list[str]:
    env, curve = d["environment"], d.get("latency_s", {})
    lines = [f"Masked diffusion (bundled digits model), {d['num_steps']} steps, wall-clock against the cached sampler, "
             f"{env['threads']} thread{'s' if env['threads'] > 1 else ''}, median of interleaved repeats "
             f"(`{d['command']}`); network = time inside the "
             "model's forward, outside = the rest of the run (per round: per step for the cached sampler); ceiling = "
             "the speedup if only the network cost time:", "",
             "| batch | sampler | sequential target calls | rows | wall-clock s (min-max) | network s "
             "| outside ms / round | wall-clock vs cached | CPU time vs cached | ceiling |", "|" + " --- |" * 10]
    for r in d["summary"]:
        per = r["outside_s"] * 1e3 / d["num_steps"] if r["sampler"] == "cached" else r["outside_per_round_ms"]
        lines.append(f"| {r['batch']} | {r['sampler']} | {r['target_calls']:.0f} | {r['target_rows']:.0f} "
                     f"| {r['wall_clock_s']:.3f} ({r['wall_clock_min_s']:.3f}-{r['wall_clock_max_s']:.3f}) "
                     f"| {r['network_s']:.3f} | {per:.2f} | {r['wall_clock_vs_cached']:.2f}x "
                     f"| {r['cpu_vs_cached']:.2f}x "
                     f"| {r['ceiling_vs_cached']:.2f}x |")
    if curve:
        lines += ["", f"One network call on b rows (batch-1 states, {d.get('latency_statistic', 'median')}): "
                  + ", ".join(f"t({b}) = {t * 1e3:.1f} ms" for b, t in curve.items()) + "."]
    for b in d.get("round_breakdown", []):
        lines += ["", f"Batch {b['batch']}, speculative auto, {b['rounds_per_run']:.1f} rounds per run, ms per round: "
                  + ", ".join(f"{name} {ms:.2f}" for name, ms in b["ms_per_round"].items()) + "."]
    return lines + [""]


def _report_overhead(d: dict) -> list[str]:
    lines = [f"Loop overhead, bundled digits DDPM, {d['num_steps']} steps, batch {d['batch_size']}, 1 thread: median "
             f"of {d.get('repeats', 1)} interleaved unprofiled runs; hot spots from one more run under cProfile "
             f"(`{d['command']}`):", "",
             "| drafter | window | wall-clock s | in UNet forwards s | outside the network | top own-time hot spots |",
             "|" + " --- |" * 6]
    for r in d["rows"]:
        hot = ", ".join(f"`{name}` {t:.2f}s" for name, t in r["hot_spots_own_time_s"][:3])
        lines.append(f"| {r['drafter']} | {r['window']} | {r['wall_clock_s']:.2f} | {r['network_s']:.2f} "
                     f"| {r['outside_network_fraction']:.1%} | {hot} |")
    return lines + [""]


def _runs(out: Path, name: str) -> list[Path]:
    """``name.json`` (1 thread), then ``name_threads<N>.json`` by N."""
    runs = [out / f"{name}.json"] + sorted(out.glob(f"{name}_threads*.json"), key=lambda p: (len(p.name), p.name))
    return [p for p in runs if p.exists()]


def report(out: Path) -> str:
    """Markdown tables of the results under ``out`` (what the README shows)."""
    lines = []
    for path in _runs(out, "digits"):
        lines += _report_digits(json.loads(path.read_text()))
    if (out / "churn.json").exists():
        lines += _report_churn(json.loads((out / "churn.json").read_text()))
    for path in _runs(out, "discrete_latency"):
        lines += _report_discrete_latency(json.loads(path.read_text()))
    if (out / "overhead.json").exists():
        lines += _report_overhead(json.loads((out / "overhead.json").read_text()))
    if (out / "analytic.json").exists():
        a = json.loads((out / "analytic.json").read_text())
        dims = sorted({r["dim"] for r in a["rows"]})
        windows = sorted({r["window"] for r in a["rows"]})
        cell = {(r["dim"], r["window"]): r for r in a["rows"]}
        lines += [f"Analytic mixture, {a['num_steps']} DDPM steps, {a['rows'][0]['samples']} samples, frozen drafter: "
                  f"speedup in sequential calls (acceptance) (`{a['command']}`):", "",
                  "| dim | " + " | ".join(f"L={w}" for w in windows) + " |", "|" + " --- |" * (len(windows) + 1)]
        for dim in dims:
            lines.append(f"| {dim} | " + " | ".join(
                f"{cell[dim, w]['speedup']:.2f}x ({cell[dim, w]['acceptance_rate']:.2f})" for w in windows) + " |")
        same = all(r["same_law"] for r in a["rows"])
        lines += ["", f"Every setting passes the two-sample test against the plain sampler: {same}.", ""]
    if (out / "discrete.json").exists():
        d = json.loads((out / "discrete.json").read_text())
        lines += [f"Bundled digits masked-diffusion model, {d['args']['num_samples']} samples per row, {d['device']} "
                  f"(`{d['command']}`):", "",
                  "| steps | sampler | window | target calls / sample | vs plain | vs cached | acceptance "
                  "| same law as plain |", "|" + " --- |" * 8]
        for r in d["runs"]:
            name = r["sampler"] + (f" ({r['drafter']})" if r.get("drafter") else "")
            acc = f"{r['acceptance_rate']:.3f}" if "acceptance_rate" in r else ""
            same = r["same_law_as_plain"]["passed"] if "same_law_as_plain" in r else ""
            vs_cached = f"{r['speedup_calls_vs_cached']:.2f}x" if "speedup_calls_vs_cached" in r else ""
            lines.append(f"| {r['num_steps']} | {name} | {r['window'] or ''} | {r['target_calls_per_sample']:.1f} "
                         f"| {r['speedup_calls_vs_plain']:.2f}x | {vs_cached} | {acc} | {same} |")
        lines.append("")
    return "\n".join(lines)


def render_docs(out: Path) -> str:
    """The whole benchmark page: the introduction, then :func:`report`'s tables."""
    return INTRODUCTION + "<!-- bench-report -->\n" + report(out).strip() + "\n<!-- /bench-report -->\n"
