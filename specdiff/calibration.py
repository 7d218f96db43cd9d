"""Machine calibration for the automatic window: what a target call on ``b`` rows costs, and what a
round costs outside the network, on this machine.

The policy (:mod:`specdiff.window`) is arithmetic on these numbers; this module measures them.

* **Measured once, then frozen.** Each point ``t(b)`` of a model, device, dtype and row shape (the
  :func:`latency_key`) is measured once and cached in memory and in ``latency.json`` under
  ``$SPECDIFF_CACHE_DIR`` (default ``~/.cache/specdiff``). A cached point is never re-measured or
  replaced implicitly (no timing check at the start of a run), so the windows of a seed, hence its
  samples, are the same in every run and every process on a machine. ``AutoWindow(recalibrate=True)``
  (or :func:`calibrate` with ``recalibrate=True``) measures the run's points again and replaces them.
* **Bounded by the run it serves.** A run measures only the points of its own :func:`plan`: batch sizes
  ``B * k`` no larger than its own largest verify call (``B * (min(max_window, steps) + 1)``, and
  ``max_rows``), with at most ``share`` (40%) of the rows the plain sampler would evaluate
  (``B * steps``), the dry run (priced as ``DRY_ROWS`` calls on ``B`` rows) included. Since a batched
  call never costs more per row than a smaller one, the time it spends is at most about that share
  of the plain sampler's network time. The two smallest sizes come
  first, and when they show no batching gain the run measures nothing more (:func:`measure_curve`). A run
  too short to afford three points measures nothing, and its window prices every row at the cost of
  one (so it takes ``L = 1``: the plain sampler's cost). The plan depends on counts only (batch, steps,
  window), so a run uses the same points every time; a longer run of the same model adds the
  points it affords to the cache without changing those a shorter run uses.
* The curve is the fastest of three interleaved sweeps (load on a shared machine only adds time, and
  the first call at a new number of rows sets up its kernels: it is never the measurement), timed in
  the calling thread's CPU time on one CPU thread (:func:`_clock`: time other processes held the core
  is not the network's cost),
  and never priced above proportional to rows from its smallest point (a call of ``k b`` rows never
  costs more than ``k`` calls of ``b`` rows): a burst of load while measuring cannot make speculation
  look more expensive than a device with no batching gain at all.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable
from contextlib import contextmanager, nullcontext
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

GRID = (1, 2, 3, 5, 9, 17, 33, 65, 129)  # batch multiples measured (the window's rows are B * (L + 1 - pi))
SHARE = 0.4  # the most rows a run may measure, as a share of the plain sampler's B * steps
DRY_STEPS, DRY_WINDOWS = 12, (2, 6)  # the dry run: 6 + 2 rounds with a free target, one sweep
DRY_ROWS = 4  # ... priced as 4 calls on B rows (a round outside the network costs under half a call)
MIN_POINTS = 3  # fewer points say nothing about a batch's gain: measure none
MIN_SWEEPS = MAX_SWEEPS = 3  # each size is timed 3 times (the first call warms it up), the fastest kept
NO_GAIN = 0.9  # a batched call within 10% of the smallest call's cost per row shows no gain worth a window

_MEMORY_CACHE: dict[str, dict[int, float]] = {}


@dataclass
class Calibration:
    """What a run knows of the machine: ``latency`` (``{rows: seconds}``), ``outside`` (``(c, h)``: seconds
    of a round outside the network, per round and per drafted step), where they came from, and what
    measuring cost this run (0 when cached)."""

    latency: dict[int, float] = field(default_factory=dict)
    outside: tuple[float, float] = (0.0, 0.0)
    source: str = "none"
    seconds: float = 0.0
    rows: int = 0


def plan(batch: int, max_window: int, num_steps: int, max_rows: int | None = None,
         share: float = SHARE) -> tuple[list[int], int]:
    """``(sizes, sweeps)`` a run of ``batch`` samples and ``num_steps`` steps may measure (module docstring):
    counts only, so the same run always plans the same points. ``([], 0)``: too short to calibrate."""
    top = min(max_window, num_steps) + 1  # the largest verify call: B * (L + 1) rows
    sizes = sorted({batch * k for k in GRID if k < top} | {batch * top})
    if max_rows is not None:  # calls are split at max_rows: larger sizes cost proportionally
        sizes = [b for b in sizes if b <= max_rows]
    budget = share * batch * num_steps - 1 - DRY_ROWS * batch  # less the dry run (measure_outside)
    chosen: list[int] = []
    for b in sizes:
        if MIN_SWEEPS * (sum(chosen) + b) > budget:
            break
        chosen.append(b)
    if len(chosen) < MIN_POINTS:
        return [], 0
    return chosen, min(MAX_SWEEPS, int(budget // sum(chosen)))


_OPEN_BAR: ContextVar[Callable | None] = ContextVar("specdiff_calibration_progress", default=None)
_BAR: ContextVar = ContextVar("specdiff_calibration_bar", default=None)


@contextmanager
def progress_to(open_bar: Callable | None):
    """A calibration measured inside shows its network calls on ``open_bar(total)`` (a tqdm-like bar;
    the sampler passes its own ``progress``): ``None`` shows nothing."""
    token = _OPEN_BAR.set(open_bar)
    try:
        yield
    finally:
        _OPEN_BAR.reset(token)


def _calls_bar(total: int):
    open_bar = _OPEN_BAR.get()
    bar = open_bar(total) if open_bar is not None else None
    if bar is None:
        return nullcontext()

    @contextmanager
    def showing():
        token = _BAR.set(bar)
        try:
            with bar:
                yield
        finally:
            _BAR.reset(token)

    return showing()


def _tick() -> None:
    bar = _BAR.get()
    if bar is not None:
        bar.update(1)


def calibrate(chain, x_init: Tensor, drafter=None, *, max_window: int = 32, max_rows: int | None = None,
              latency: dict[int, float] | None = None, outside: tuple[float, float] | None = None,
              cache: bool = True, recalibrate: bool = False, share: float = SHARE,
              per_sample: bool = False) -> Calibration:
    """The calibration of a run of ``chain`` from ``x_init``: given values, else cached points, else
    measured (the run's :func:`plan`), its network calls shown on the caller's bar (:func:`progress_to`).
    ``per_sample``: the run draws from one generator per sample (a round's bookkeeping costs more)."""
    started = time.perf_counter()
    sizes, sweeps = plan(x_init.shape[0], max_window, chain.num_steps, max_rows, share)
    if not sizes and latency is None:  # too short to calibrate: nothing to look up (no cache, no key)
        return Calibration(outside=tuple(outside) if outside is not None else (0.0, 0.0))
    key, stable = latency_key(chain, x_init)
    persist = stable and cache
    out = Calibration(source="given" if latency is not None else "none")
    known = {} if recalibrate or latency is not None else _cached(key, persist)
    missing = [b for b in sizes if b not in known] if latency is None else []
    with _calls_bar(sweeps * len(missing) + 1) if missing else nullcontext():  # sweeps, dry run
        if latency is not None:
            out.latency = dict(latency)
        elif sizes:
            out.source = "memory cache" if all(b in _MEMORY_CACHE.get(key, {}) for b in sizes) else "disk cache"
            if missing:
                known, out.rows = measure_curve(chain, x_init, sizes, known, sweeps)
                out.source = "measured"
                _store(key, known, persist, replace=recalibrate)
            _MEMORY_CACHE.setdefault(key, {}).update({b: known[b] for b in sizes})
            out.latency = {b: known[b] for b in sizes}
        if outside is not None:
            out.outside = tuple(outside)
        elif batching_gain(out.latency):  # else the window is 1 whatever a round costs: nothing to measure
            out.outside = _outside(chain, x_init, drafter, key, persist, max_window, recalibrate, out, per_sample)
    if out.rows:
        out.seconds = time.perf_counter() - started
    return out


def _outside(chain, x_init: Tensor, drafter, key: str, persist: bool, max_window: int, recalibrate: bool,
             out: Calibration, per_sample: bool = False) -> tuple[float, float]:
    """``(c, h)`` of a round outside the network: cached, else the dry run (:func:`measure_outside`)."""
    from .drafters import as_drafter

    drafter = as_drafter(drafter)
    okey = f"{key}|batch={x_init.shape[0]}|outside|{type(drafter).__name__}"  # a round's cost grows with B
    okey += "|per-sample" if per_sample else ""  # ... and with a generator per sample (a stream each)
    known = {} if recalibrate else _cached(okey, persist)
    if set(known) != {0, 1}:
        c, h = measure_outside(chain, x_init, drafter, windows=(2, max(2, min(DRY_WINDOWS[1], max_window))),
                               steps=DRY_STEPS, repeats=1, per_sample=per_sample)
        _tick()
        known = {0: c, 1: h}
        out.rows += 1
        _store(okey, known, persist, replace=True)
    _MEMORY_CACHE[okey] = dict(known)
    return known[0], known[1]


def measure_curve(chain, x_init: Tensor, sizes: list[int], known: dict[int, float],
                  sweeps: int) -> tuple[dict[int, float], int]:
    """``(points, rows measured)``: ``known`` completed with the points of ``sizes`` it lacks, in two
    stages. The two smallest sizes come first; when the second shows no batching gain
    (:func:`batching_gain`), the larger sizes are not measured but recorded proportional to rows from
    it, an upper bound on them since a batched call never costs more per row than a smaller one (the
    window then takes ``L = 1``). The decision reads frozen points only, so a run that finds them
    cached makes the same one."""
    points, rows = dict(known), 0

    def measure(stage: list[int]) -> None:
        nonlocal rows
        missing = [b for b in stage if b not in points]
        if missing:
            points.update(measure_latency(chain, x_init, missing, sweeps))
            rows += max(MIN_SWEEPS, sweeps) * sum(missing)

    head, rest = sizes[:2], sizes[2:]
    measure(head)
    if batching_gain({b: points[b] for b in head}):
        measure(rest)
    else:
        points.update({b: points[head[1]] * b / head[1] for b in rest if b not in points})
    return points, rows


def batching_gain(latency: dict[int, float]) -> bool:
    """Whether some point of the curve costs less per row than ``NO_GAIN`` times its smallest: else
    verifying extra rows saves too little for a window to beat the plain sampler by the policy's margin
    (at acceptance 0.9, a window of 2 must cost under 0.86 of a step per row to be 10% faster), and
    the window stays 1."""
    if len(latency) < 2:
        return False
    smallest = min(latency)
    return min(t / b for b, t in latency.items()) < NO_GAIN * latency[smallest] / smallest


def _cached(key: str, persist: bool) -> dict[int, float]:
    known = dict(_MEMORY_CACHE.get(key, {}))
    if persist:
        known = {**_read_disk(key), **known}  # a point is measured once: memory and disk hold the same value
    return known


def _store(key: str, points: dict[int, float], persist: bool, replace: bool) -> None:
    if replace:
        _MEMORY_CACHE[key] = dict(points)
    else:
        _MEMORY_CACHE[key] = {**points, **_MEMORY_CACHE.get(key, {})}
    if persist:
        _write_disk(key, points, replace)


# ----------------------------------------------------------------------------------------
# Keys and the disk cache


def _cache_dir() -> Path:
    root = os.environ.get("SPECDIFF_CACHE_DIR")
    if root:
        return Path(root)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "specdiff"


def _read_disk(key: str) -> dict[int, float]:
    try:
        data = json.loads((_cache_dir() / "latency.json").read_text())
        return {int(b): float(t) for b, t in data.get(key, {}).items()}
    except (OSError, ValueError, AttributeError):
        return {}


def _write_disk(key: str, points: dict[int, float], replace: bool = False) -> None:
    """Add ``points`` to the key's record; points already there are kept unless ``replace`` (another
    process may have measured them first: the file keeps one value per point)."""
    path = _cache_dir() / "latency.json"
    try:
        data = json.loads(path.read_text()) if path.exists() else {}
        old = {} if replace else data.get(key, {})
        merged = {str(b): t for b, t in points.items()} | old
        data[key] = dict(sorted(merged.items(), key=lambda item: int(item[0])))
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(data, indent=1))
        tmp.replace(path)
    except (OSError, ValueError):
        pass  # a read-only home must not stop sampling: the curve stays in memory


def _find_module(obj, depth: int = 2):
    """The torch module behind a chain or a model function (for the latency cache key)."""
    if isinstance(obj, torch.nn.Module):
        return obj
    if depth < 0 or obj is None:
        return None
    candidates = [getattr(obj, name, None) for name in ("model", "unet", "transformer", "model_fn", "__self__")]
    closure = getattr(obj, "__closure__", None) or ()
    candidates += [_cell_contents(cell) for cell in closure]
    candidates += [v for k, v in getattr(obj, "__dict__", {}).items() if not k.startswith("_")]  # e.g. a denoiser
    for candidate in candidates:
        found = _find_module(candidate, depth - 1)
        if found is not None:
            return found
    return None


def _cell_contents(cell):
    try:
        return cell.cell_contents
    except ValueError:  # a closure variable not bound yet
        return None


def latency_key(chain, x_init: Tensor) -> tuple[str, bool]:
    """``(key, stable)``: stable keys name the architecture (class and parameter count) and
    may be cached on disk; otherwise the key is the chain's class (memory only: a new chain
    object of the same kind, as a pipeline builds per call, keeps its calibration, so its
    windows and samples repeat). A wrapper that keeps the wrapped chain in ``.chain`` times the
    same network."""
    while "chain" in getattr(chain, "__dict__", {}):
        chain = chain.__dict__["chain"]
    shape = "x".join(map(str, x_init.shape[1:]))
    where = f"{x_init.device}|{x_init.dtype}|{shape}|threads={torch.get_num_threads()}"
    explicit = getattr(chain, "latency_key", None)
    if isinstance(explicit, str):
        return f"{explicit}|{where}", True
    module = _find_module(chain)
    if module is not None:
        params = sum(p.numel() for p in module.parameters())
        dtype = next(module.parameters()).dtype if params else ""
        return f"{type(module).__name__}:{params}:{dtype}|{type(chain).__name__}|{where}", True
    return f"{type(chain).__module__}.{type(chain).__qualname__}|{where}", False


# ----------------------------------------------------------------------------------------
# Measurements


def _clock(device: torch.device) -> Callable[[], float]:
    """The clock of a measurement. On a CPU with one torch thread the network runs in the calling
    thread, and its CPU time is its cost without the time other processes held the core: on a shared
    machine, descheduling inflated single wall-clock calls by up to 2x, which froze a false "no
    batching gain" (or a false gain) into the cache. Elsewhere (a GPU, several CPU threads) wall-clock."""
    if device.type == "cpu" and torch.get_num_threads() == 1:
        return time.thread_time
    return time.perf_counter


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


_SAMPLER: dict = {}  # the sampler's entry points, registered by specdiff.sampler when it is imported


def register_sampler(predict, sample) -> None:
    """Called once by :mod:`specdiff.sampler` at import: its network call (``predict``) and
    ``speculative_sample``, which the measurements below use. The sampler imports this module (through
    the window policy) and not the other way round, so the dry run's re-entry into the sampler is no
    import cycle."""
    _SAMPLER.update(predict=predict, sample=sample)


def measure_latency(chain, x_init: Tensor, sizes: list[int], repeats: int = 5) -> dict[int, float]:
    """Synchronised time (:func:`_clock`) of ``chain.predict`` on ``b`` rows (copies of ``x_init``'s rows
    at step 0) for each ``b`` in ``sizes``: the fastest of ``repeats`` sweeps (at least
    ``MIN_SWEEPS``), taken in turn. The first call at a new number of rows sets up its kernels
    (lazy initialisation, per-shape setup: 2x a warm call for the bundled UNet on a CPU), and load on
    a shared machine only ever adds time, in bursts that hit some calls and not others: the fastest
    call of each size is the one that measures the model, so neither the cold first sweep nor bursts
    in up to ``repeats - 1`` sweeps bend the curve."""
    predict = _SAMPLER["predict"]
    batch = x_init.shape[0]
    inputs = {}
    for b in sizes:
        index = torch.arange(b) % batch
        inputs[b] = (x_init[index], torch.zeros(b, dtype=torch.long, device=x_init.device), index)
    times, clock = {b: [] for b in sizes}, _clock(x_init.device)
    with torch.no_grad():
        for _ in range(max(MIN_SWEEPS, repeats)):
            for b in sizes:
                _synchronize(x_init.device)
                started = clock()
                predict(chain, *inputs[b])
                _synchronize(x_init.device)
                times[b].append(clock() - started)
                _tick()
    return {b: min(t) for b, t in times.items()}


def measure_outside(chain, x_init: Tensor, drafter=None, windows: tuple[int, int] = (2, 8), steps: int = 32,
                    repeats: int = 2, per_sample: bool = False) -> tuple[float, float]:
    """``(c, h)``: seconds a round spends outside the target call, per round and per drafted step.

    A dry run of the sampler on the first ``steps`` steps of ``chain`` whose target is free (its
    prediction at ``x_init``, repeated), at two windows, fastest of ``repeats``: what is left is
    drafting, the coupling and the driver's bookkeeping. Its randomness is its own (seed 0, or seeds
    0..B-1 with ``per_sample``: one generator per sample, as the run draws, costs a round 1.3 ms more
    at batch 1 and 2-4 ms more at batch 8 for the bundled UNet's chain on a CPU); the caller's
    generators are not touched.

    The dry run re-enters the sampler: ``sample`` is ``speculative_sample`` (registered by the sampler,
    :func:`register_sampler`), called from inside the sampler's own window resolution when a run
    calibrates. Its window here is an integer, so the dry run calibrates nothing and cannot recurse
    further."""
    predict, sample = _SAMPLER["predict"], _SAMPLER["sample"]  # the dry run re-enters the sampler here
    with torch.no_grad():  # one row's prediction serves every row of the dry run
        first = predict(chain, x_init[:1], torch.zeros(1, dtype=torch.long, device=x_init.device),
                        torch.zeros(1, dtype=torch.long))
    dry, clock = _FreeTarget(chain, first, min(steps, chain.num_steps)), _clock(x_init.device)
    per_round = []
    for window in windows:
        window = min(window, dry.num_steps)
        best = math.inf
        for _ in range(repeats):
            started = clock()
            generator = ([torch.Generator().manual_seed(i) for i in range(x_init.shape[0])] if per_sample
                         else torch.Generator().manual_seed(0))
            out = sample(dry, x_init, window=window, drafter=drafter,  # an int window: no calibration inside
                         generator=generator, max_rows=None)
            best = min(best, (clock() - started) / max(out.stats.rounds, 1))
        per_round.append((window, best))
    (l1, t1), (l2, t2) = per_round
    h = max((t2 - t1) / (l2 - l1), 0.0) if l2 != l1 else 0.0
    return max(t1 - h * l1, 0.0), h


class _FreeTarget:
    """``chain`` cut to its first ``steps`` steps, with a target that costs nothing (one stored
    prediction, repeated): what a round costs besides the network (:func:`measure_outside`)."""

    uses_sample_index = False

    def __init__(self, chain, prediction: Tensor, steps: int):
        self.chain, self.prediction, self.num_steps = chain, prediction, steps

    def __getattr__(self, name):
        return getattr(self.__dict__["chain"], name)

    def predict(self, x: Tensor, step: Tensor) -> Tensor:
        return self.prediction.expand(x.shape[0], *self.prediction.shape[1:])
