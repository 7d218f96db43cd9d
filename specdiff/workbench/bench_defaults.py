"""Benchmark: the default settings against the plain sampler, side by side, calibration included.

    python -m specdiff.workbench.bench_defaults                      # the full grid (slow on a CPU)
    python -m specdiff.workbench.bench_defaults --steps 10 25 50 --batches 1 --loads quiet

On the bundled digits DDPM, for every (load, steps, batch) cell: ``DDPMPipeline`` and
``SpeculativeDDPMPipeline`` with nothing set (automatic window, Picard drafter) on the same seeds,
interleaved, at least ``--repeats`` times and until the plain runs add up to ``--min-seconds``; the
wall-clock ratio speculative / plain per cell (median of the paired ratios), the same ratio in this
process's CPU time (what other tenants of a shared machine add to the wall-clock, waiting for a core,
it leaves out), the first run's ratio (the one that pays the calibration, estimated with less noise as
the later runs' median plus the calibration it paid: later runs find it cached and run the same
windows), sequential calls, the calibration each cell paid and the windows it ran. Each load
cell starts with an empty calibration cache (a private folder; the user's cache is never
touched), so its first run pays its whole calibration, measured in that condition, as a first run on
a new machine would. ``loaded``: a
background process this benchmark starts (``--load-processes`` busy matrix loops, one thread
each) and stops when the condition ends. Writes ``assets/bench/defaults.json`` and the table in
``docs/defaults.md`` (``--table`` re-renders it from the JSON).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from .. import calibration
from ..paths import asset, docs_page, results
from .results import write_between

# A busy process on one core; it stops by itself when the benchmark that started it is gone (killed, say).
LOAD = ("import os, sys, torch\ntorch.set_num_threads(1)\na, parent = torch.randn(384, 384), int(sys.argv[1])\n"
        "while os.getppid() == parent:\n    for _ in range(100):\n        a = (a @ a).tanh()\n")


def _start_load(processes: int) -> list[subprocess.Popen]:
    return [subprocess.Popen([sys.executable, "-c", LOAD, str(os.getpid())], stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
            for _ in range(processes)]


def _stop_load(procs: list[subprocess.Popen]) -> None:
    for proc in procs:  # only the processes this benchmark started
        proc.terminate()
        proc.wait(timeout=30)


def run_grid(steps: list[int], batches: list[int], loads: list[str], repeats: int, load_processes: int,
             min_seconds: float = 0.0, max_repeats: int = 25) -> dict:
    from diffusers import DDPMPipeline

    from ..pipelines import SpeculativeDDPMPipeline

    plain = DDPMPipeline.from_pretrained(asset("models", "digits-ddpm"))
    plain.set_progress_bar_config(disable=True)
    spec = SpeculativeDDPMPipeline.from_pipe(plain)
    spec.set_progress_bar_config(disable=True)

    def gens(batch: int, seed: int):
        return [torch.Generator().manual_seed(1000 * seed + i) for i in range(batch)]

    def timed(pipe, batch: int, steps: int, seed: int):
        started, cpu = time.perf_counter(), time.process_time()
        out = pipe(batch_size=batch, generator=gens(batch, seed), num_inference_steps=steps, output_type="pt")
        return time.perf_counter() - started, time.process_time() - cpu, out

    with torch.no_grad():  # warm-up (kernels, allocator) outside every cell
        plain(batch_size=1, generator=gens(1, 0), num_inference_steps=2, output_type="pt")
    cells = []
    for load in loads:
        cache = tempfile.TemporaryDirectory(prefix="specdiff-bench-cache-")
        previous = os.environ.get("SPECDIFF_CACHE_DIR")
        os.environ["SPECDIFF_CACHE_DIR"] = cache.name
        procs = _start_load(load_processes) if load == "loaded" else []
        try:
            if procs:
                time.sleep(2.0)  # let the load start
            for n in steps:
                for batch in batches:
                    calibration._MEMORY_CACHE.clear()  # an empty cache: each cell's first run pays its calibration
                    os.environ["SPECDIFF_CACHE_DIR"] = tempfile.mkdtemp(dir=cache.name)
                    plain_s, spec_s, plain_cpu, spec_cpu, stats = [], [], [], [], []
                    load_before = os.getloadavg()[0]  # other tenants of a shared machine load it too
                    r = 0
                    while r < repeats or (sum(plain_s) < min_seconds and r < max_repeats):
                        order = ("plain", "spec") if r % 2 == 0 else ("spec", "plain")
                        for name in order:
                            seconds, cpu, out = timed(plain if name == "plain" else spec, batch, n, r)
                            if name == "plain":
                                plain_s.append(seconds)
                                plain_cpu.append(cpu)
                            else:
                                spec_s.append(seconds)
                                spec_cpu.append(cpu)
                                stats.append(out.stats)
                        r += 1
                    ratio = statistics.median(s / p for s, p in zip(spec_s, plain_s))
                    first = stats[0]
                    cells.append({
                        "load": load, "steps": n, "batch": batch, "repeats": r,
                        "plain_s": statistics.median(plain_s), "default_s": statistics.median(spec_s),
                        "ratio": ratio, "plain_runs": plain_s, "default_runs": spec_s,
                        "plain_cpu": plain_cpu, "default_cpu": spec_cpu,
                        "ratio_cpu": statistics.median(s / p for s, p in zip(spec_cpu, plain_cpu)),
                        "ratio_first": spec_s[0] / plain_s[0],  # the run that paid the calibration, alone
                        # ... estimated: the later runs (same windows, calibration cached) plus what it paid
                        "ratio_first_est": _first({"plain_runs": plain_s, "default_runs": spec_s,
                                                   "calibration_s": first.calibration_seconds}),
                        "target_calls": statistics.median(s.target_calls for s in stats),
                        "call_speedup": n / statistics.median(s.target_calls for s in stats),
                        "calibration_s": sum(s.calibration_seconds for s in stats),
                        "calibration_rows": sum(s.calibration_rows for s in stats),
                        "max_window": max(first.windows), "windows": first.windows,
                        "load_average": [round(load_before, 2), round(os.getloadavg()[0], 2)],
                    })
                    print(f"{load:6s} steps {n:5d} batch {batch:3d}: {ratio:.2f}x plain wall-clock "
                          f"(cpu {cells[-1]['ratio_cpu']:.2f}, first {cells[-1]['ratio_first_est']:.2f}), "
                          f"{cells[-1]['call_speedup']:.1f}x fewer calls, calibration "
                          f"{cells[-1]['calibration_s']:.2f} s / {cells[-1]['calibration_rows']} rows", flush=True)
        finally:
            _stop_load(procs)
            if previous is None:
                os.environ.pop("SPECDIFF_CACHE_DIR", None)
            else:
                os.environ["SPECDIFF_CACHE_DIR"] = previous
            cache.cleanup()
    return {"benchmark": "defaults", "environment": {
        "torch": torch.__version__, "threads": torch.get_num_threads(), "machine": platform.machine(),
        "processor": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
        "date": time.strftime("%Y-%m-%d")},
        "load_processes": load_processes, "cells": cells}


def table(result: dict) -> str:
    """The markdown table: one row per (load, steps), one column per batch; ratio = default / plain."""
    cells = result["cells"]
    batches = sorted({c["batch"] for c in cells})
    env = result["environment"]
    intro = (f"Default settings (`SpeculativeDDPMPipeline`, nothing set) against `DDPMPipeline`, bundled digits "
             f"DDPM, {env['threads']} thread(s), {env['processor']}, torch {env['torch']}, {env['date']} "
             f"(`{result.get('command', 'python -m specdiff.workbench.bench_defaults')}`). Each cell: wall-clock "
             "ratio default / plain (median of the interleaved pairs; 1.00 = as fast, below 1 = faster), the same "
             "ratio in CPU time (cpu: without the time spent waiting for a core that other processes hold), and "
             "the first run's (first: the one that paid the calibration; the later runs, which run the same "
             "windows, plus the calibration it paid), then sequential calls saved and the largest window run. "
             "Each cell starts with an empty calibration cache.")
    loads = [x for c in cells for x in c.get("load_average", [])]
    if loads:
        intro += (f" The machine's 1-minute load average (other tenants included) ranged {min(loads):.1f}-"
                  f"{max(loads):.1f} over the cells that record it, on {env.get('cpus', '?')} cores.")
    lines = [intro, "",
             "| load | steps | " + " | ".join(f"batch {b}" for b in batches) + " |",
             "|" + " --- |" * (len(batches) + 2)]
    for load in dict.fromkeys(c["load"] for c in cells):
        for n in sorted({c["steps"] for c in cells if c["load"] == load}):
            row = []
            for b in batches:
                c = next((c for c in cells if (c["load"], c["steps"], c["batch"]) == (load, n, b)), None)
                if c is None:
                    row.append("not run")
                    continue
                extra = [f"cpu {c['ratio_cpu']:.2f}"] if "ratio_cpu" in c else []
                if "ratio_first" in c:
                    extra.append(f"first {_first(c):.2f}")
                row.append(f"{c['ratio']:.2f}" + (f" ({', '.join(extra)})" if extra else "")
                           + f"; {c['call_speedup']:.1f}x calls, L<={c['max_window']}"
                           + (f", calibration {c['calibration_s']:.2f} s" if c["calibration_rows"] else ""))
            lines.append(f"| {load} | {n} | " + " | ".join(row) + " |")
    worst = max(c["ratio"] for c in cells)
    worst_first = max(_first(c) for c in cells)
    lines += ["", f"Worst cell: {worst:.2f}x plain over the repeats, {worst_first:.2f}x for a first run "
              f"({'within' if max(worst, worst_first) <= 1.05 else 'above'} the 1.05 target)."]
    same = [c for c in cells if c["max_window"] == 1 and not c["calibration_rows"]]
    if same:  # both pipelines ran the same plain loop: what is left is timing noise
        spread = [s / p for c in same for s, p in zip(c["default_runs"], c["plain_runs"])]
        cpu = [s / p for c in same if "ratio_cpu" in c for s, p in zip(c["default_cpu"], c["plain_cpu"])]
        lines.append(f"Noise floor: in the {len(same)} cells where both pipelines ran the same plain loop, single "
                     f"pairs ranged {min(spread):.2f}-{max(spread):.2f} in wall-clock"
                     + (f" and {min(cpu):.2f}-{max(cpu):.2f} in CPU time." if cpu else "."))
    return "\n".join(lines)


def _first(cell: dict) -> float:
    """The first run's ratio: the later pairs' median (the same windows, the calibration cached) plus the
    calibration the first paid, over the plain run; less noisy than the first pair alone, which it is
    where there is only one."""
    if "default_runs" not in cell:
        return cell.get("ratio_first", cell["ratio"])
    pairs = [s / p for s, p in zip(cell["default_runs"], cell["plain_runs"])]
    if len(pairs) == 1:  # the one pair paid it
        return pairs[0]
    # the later pairs run the same windows with the calibration cached; the first paid it on top
    return statistics.median(pairs[1:]) + cell["calibration_s"] / statistics.median(cell["plain_runs"])


def _write_docs(result: dict, path: Path) -> None:
    write_between(path, ("<!-- bench_defaults table -->", "<!-- /bench_defaults table -->"), table(result))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m specdiff.workbench.bench_defaults",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, nargs="+", default=[10, 25, 50, 100, 250, 1000])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 64])
    parser.add_argument("--loads", nargs="+", default=["quiet", "loaded"], choices=["quiet", "loaded"])
    parser.add_argument("--repeats", type=int, default=3, help="interleaved plain/default pairs per cell, at least")
    parser.add_argument("--min-seconds", type=float, default=5.0,
                        help="... and more pairs until the plain runs add up to this (short cells are noisy)")
    parser.add_argument("--max-repeats", type=int, default=25, help="the most pairs per cell")
    parser.add_argument("--load-processes", type=int, default=1, help="busy processes of the loaded condition")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--out", type=Path, default=results("defaults.json"))
    parser.add_argument("--docs", type=Path, default=docs_page("defaults.md"))
    parser.add_argument("--table", action="store_true", help="only re-render the table from --out")
    parser.add_argument("--append", action="store_true",
                        help="add the measured cells to those already in --out (same cell: replaced)")
    args = parser.parse_args(argv)
    if args.table:
        result = json.loads(args.out.read_text())
    else:
        if args.threads:
            torch.set_num_threads(args.threads)
        result = run_grid(args.steps, args.batches, args.loads, args.repeats, args.load_processes,
                          args.min_seconds, args.max_repeats)
        result["command"] = "python -m specdiff.workbench.bench_defaults " + " ".join(argv or sys.argv[1:])
        if args.append and args.out.exists():
            old = json.loads(args.out.read_text())
            fresh = {(c["load"], c["steps"], c["batch"]) for c in result["cells"]}
            result["cells"] = [c for c in old["cells"] if (c["load"], c["steps"], c["batch"]) not in fresh] + \
                result["cells"]
            result["command"] = f"{old['command']}; then {result['command']}"
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1))
    _write_docs(result, args.docs)
    print(table(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
