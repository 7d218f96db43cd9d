"""Reproducible, bounded defaults for the automatic window (issue 20): a run's window schedule is
recorded and replays it bit for bit; every run starts from the same policy state; a cached
calibration is never re-measured implicitly (same seed, same samples, process after process); the
calibration a run measures is bounded by the run; and ``SpeculativeStats.merge``."""

import itertools
import time

import pytest
import torch

import specdiff.calibration as calibration_module
from specdiff import speculative_sample
from specdiff.calibration import plan
from specdiff.stats import SpeculativeStats
from specdiff.testing import GaussianMixtureDDPM
from specdiff.window import AutoWindow, LatencyCurve, ReplayWindow


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SPECDIFF_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(calibration_module, "_MEMORY_CACHE", {})


def mixture(steps=80, batch=3, key=None):
    chain = GaussianMixtureDDPM.random(dim=2, num_steps=steps, seed=4)
    if key is not None:
        chain.latency_key = key
    return chain, chain.sample_prior(batch, torch.Generator().manual_seed(0))


def gens(batch, seed=7):
    return [torch.Generator().manual_seed(seed + i) for i in range(batch)]


FLAT = {1: 0.01, 64: 0.01, 4096: 0.01}  # a device with spare capacity: long windows
CPU = {1: 1.0, 2: 1.6, 4: 2.0, 8: 2.9, 17: 5.3, 33: 8.8}  # the bundled UNet on a CPU (issue 10)
STEEP = {1: 0.01, 2: 0.013, 4: 0.02, 8: 0.04, 16: 0.09, 64: 0.5}  # a busy CPU: short windows


def test_a_runs_window_schedule_replays_it_bit_for_bit_whatever_the_calibration():
    """Two runs of one seed under deliberately different (fake) latency calibrations choose different
    windows; each run's recorded schedule, passed back as ``window=``, gives that run's arrays exactly."""
    chain, x = mixture()
    runs = {name: speculative_sample(chain, x, window=AutoWindow(max_window=16, latency=curve, outside=(1e-3, 1e-4)),
                                     drafter="picard", generator=gens(3))
            for name, curve in (("flat", FLAT), ("steep", STEEP))}
    flat, steep = runs["flat"].stats, runs["steep"].stats
    assert flat.windows != steep.windows and max(flat.windows) > max(steep.windows)
    assert flat.proposed > flat.accepted  # rejections: the reflected steps depend on the windows
    for out in runs.values():
        for schedule in (out.stats.windows, out.stats):  # the list, or the stats object itself
            replay = speculative_sample(chain, x, window=schedule, drafter="picard", generator=gens(3))
            assert torch.equal(replay.sample, out.sample)
            assert replay.stats.windows == out.stats.windows and replay.stats.target_calls == out.stats.target_calls
    assert not torch.equal(runs["flat"].sample, runs["steep"].sample)


def test_a_replayed_schedule_from_another_run_is_refused_with_a_clear_error():
    chain, x = mixture()
    out = speculative_sample(chain, x, window=AutoWindow(max_window=16, latency=STEEP, outside=(1e-3, 1e-4)),
                             generator=gens(3))
    windows = out.stats.windows
    with pytest.raises(ValueError, match="needs more"):
        speculative_sample(chain, x, window=windows[:-1], generator=gens(3))
    with pytest.raises(ValueError, match="finished after"):
        speculative_sample(chain, x, window=windows + [4], generator=gens(3))
    with pytest.raises(ValueError, match="run of 3 samples; this run has 2"):
        speculative_sample(chain, x[:2], window=out.stats, generator=gens(2))
    other, _ = mixture(steps=60)
    with pytest.raises(ValueError, match="run of 80 steps; this run has 60"):
        speculative_sample(other, x, window=out.stats, generator=gens(3))
    with pytest.raises(ValueError, match="recorded from another run"):  # the list alone: caught as it diverges
        speculative_sample(other, x, window=windows, generator=gens(3))
    for bad in ([], [2, 0], [1.5], [True]):
        with pytest.raises(ValueError, match="non-empty list of positive integers"):
            ReplayWindow(bad)


def test_one_auto_window_object_gives_a_seed_the_same_windows_every_run():
    """Issue 20: an AutoWindow reused across runs carried the last run's acceptance into the next."""
    chain, x = mixture()
    policy = AutoWindow(max_window=16, latency=CPU, outside=(0.05, 0.01), prior_acceptance=0.99)
    first = speculative_sample(chain, x, window=policy, drafter="picard", generator=gens(3))
    second = speculative_sample(chain, x, window=policy, drafter="picard", generator=gens(3))
    assert len(set(first.stats.windows)) > 1
    assert second.stats.windows == first.stats.windows and torch.equal(second.sample, first.sample)


class FakeClock:
    """``time.perf_counter`` of a machine where every call of ``b`` rows takes ``cost(b)`` seconds."""

    def __init__(self, chain, cost):
        self.now, real = 0.0, chain.predict

        def predict(x, step):
            self.now += cost(x.shape[0])
            return real(x, step)

        chain.predict = predict

    def __call__(self):
        return self.now


def test_a_cached_calibration_is_never_re_measured_so_a_seed_repeats_across_processes(monkeypatch):
    """Issue 20: a later process re-checked the cache, found the machine 1.5x off (here it is loaded:
    every call 3x slower, large ones 6x) and recalibrated, so the same seed gave other images. Two
    "processes" (the in-memory cache cleared, the disk cache kept) must choose the same windows."""
    chain, x = mixture(steps=200, batch=1, key="two-processes")
    quiet = FakeClock(chain, lambda b: 0.01 * (1 + 0.05 * b))
    monkeypatch.setattr(calibration_module.time, "perf_counter", quiet)
    monkeypatch.setattr(calibration_module, "_clock", lambda device: calibration_module.time.perf_counter)
    first = speculative_sample(chain, x, window="auto", drafter="picard", generator=gens(1))
    assert first.stats.calibration_rows > 0 and len(set(first.stats.windows)) > 1

    monkeypatch.setattr(calibration_module, "_MEMORY_CACHE", {})  # a new process, same disk cache
    loaded = FakeClock(chain, lambda b: 0.03 * (1 + 0.05 * b) * (2 if b > 4 else 1))
    monkeypatch.setattr(calibration_module.time, "perf_counter", loaded)
    monkeypatch.setattr(calibration_module, "_clock", lambda device: calibration_module.time.perf_counter)
    second = speculative_sample(chain, x, window="auto", drafter="picard", generator=gens(1))
    assert second.stats.calibration_rows == 0 and "disk cache" in second.stats.window_choice
    assert second.stats.windows == first.stats.windows and torch.equal(second.sample, first.sample)

    monkeypatch.setattr(calibration_module, "_MEMORY_CACHE", {})  # asked for: measured again, and replaced
    policy = AutoWindow(recalibrate=True)
    third = speculative_sample(chain, x, window=policy, drafter="picard", generator=gens(1))
    assert third.stats.calibration_rows > 0 and policy.source == "measured"
    assert policy.latency.points[2] == pytest.approx(0.03 * 1.1)
    assert calibration_module._read_disk(calibration_module.latency_key(chain, x)[0])[2] == pytest.approx(0.03 * 1.1)


def test_a_longer_run_adds_points_without_changing_the_windows_of_a_shorter_one():
    """The points a run uses depend on its counts only; a longer run measures more of them (once),
    and the shorter run still finds exactly its own."""
    chain, x = mixture(steps=60, batch=1, key="plans")
    short = speculative_sample(chain, x, window="auto", generator=gens(1))
    long_chain, _ = mixture(steps=400, batch=1, key="plans")
    long = speculative_sample(long_chain, x, window="auto", generator=gens(1))
    assert long.stats.calibration_rows > 0  # the points the short run could not afford
    again = speculative_sample(chain, x, window="auto", generator=gens(1))
    assert again.stats.calibration_rows == 0
    assert again.stats.windows == short.stats.windows and torch.equal(again.sample, short.sample)


@pytest.mark.parametrize("steps, batch, max_window", [(10, 1, 32), (40, 1, 32), (100, 2, 8), (400, 3, 32),
                                                      (20, 64, 32)])
def test_the_calibration_a_run_measures_is_bounded_by_the_run(steps, batch, max_window):
    """Issue 20: the calibration cost 27x the run at batch 256, 20 steps. Every network call of a run
    (calibration included) is recorded: the calibration's rows are at most a share (0.4) of the plain
    sampler's (batch x steps), none of its calls is larger than the run's largest possible verify
    call, stats report them, and a run too short to afford three sizes measures nothing (window 1)."""
    chain, x = mixture(steps=steps, batch=batch, key=f"bounded-{steps}-{batch}")
    rows, real = [], chain.predict
    chain.predict = lambda x, step: rows.append(x.shape[0]) or real(x, step)
    out = speculative_sample(chain, x, window=AutoWindow(max_window=max_window), generator=gens(batch))
    measured = rows[: len(rows) - out.stats.target_calls]  # the run's own calls come last
    assert sum(measured) == out.stats.calibration_rows <= calibration_module.SHARE * batch * steps
    assert max(measured, default=0) <= batch * (min(max_window, steps) + 1)
    sizes, _ = plan(batch, max_window, steps)
    if not sizes:
        assert measured == [] and set(out.stats.windows) == {1} and out.stats.calibration_seconds == 0
    else:
        assert out.stats.calibration_seconds > 0 and len(sizes) >= 3


def test_a_curve_measured_under_bursts_of_load_is_never_priced_above_proportional_to_rows():
    """Load that hit the large batch sizes while measuring cannot make a batch of k rows cost more
    than k single-row calls; and past its largest point the curve keeps the cost per row of that point."""
    burst = LatencyCurve({1: 1.0, 2: 1.2, 4: 30.0, 8: 2.0})
    assert burst(4) == pytest.approx(4.0) and burst(8) == pytest.approx(8.0) and burst(2) == pytest.approx(1.2)
    grid = [burst(b / 4) for b in range(1, 100)]
    assert all(a <= b for a, b in itertools.pairwise(grid))
    assert LatencyCurve({1: 1.0, 9: 2.0})(18) == pytest.approx(4.0)


def test_merge_adds_two_batches_stats():
    chain, x = mixture(steps=50, batch=3)
    a = speculative_sample(chain, x[:2], window=8, generator=gens(2)).stats
    b = speculative_sample(chain, x[2:], window=AutoWindow(max_window=4, latency=FLAT, outside=(0, 0)),
                           generator=gens(1, seed=9)).stats
    merged = a.merge(b)
    assert (merged.batch_size, merged.num_steps, merged.window) == (3, 50, 8)
    for name in ("target_calls", "target_rows", "proposed", "accepted", "rounds", "prefix_rows"):
        assert getattr(merged, name) == getattr(a, name) + getattr(b, name)
    assert merged.per_sample_target_calls == a.per_sample_target_calls + b.per_sample_target_calls
    assert merged.proposed_by_position == [p + (b.proposed_by_position[j] if j < 4 else 0)
                                           for j, p in enumerate(a.proposed_by_position)]
    assert sum(merged.committed_per_round) == sum(a.committed_per_round) + sum(b.committed_per_round)
    assert merged.windows == a.windows + b.windows
    assert merged.wall_clock == pytest.approx(a.wall_clock + b.wall_clock)
    assert merged.acceptance_rate == pytest.approx((a.accepted + b.accepted) / (a.proposed + b.proposed))
    assert merged.to_dict()["batch_size"] == 3
    with pytest.raises(ValueError, match="50 and 10 steps"):
        a.merge(SpeculativeStats(num_steps=10, batch_size=1, window=1))
    with pytest.raises(TypeError, match="SpeculativeStats"):
        a.merge({"target_calls": 1})


def test_a_run_its_automatic_window_keeps_at_one_is_the_window_one_run_bit_for_bit():
    """Too short to calibrate (or priced out of speculation): L = 1 in every round, run as the plain
    loop; the samples are the speculative sampler's at window 1, and the recorded schedule replays it."""
    chain, x = mixture(steps=12, batch=3)
    policy = AutoWindow()
    auto = speculative_sample(chain, x, window=policy, drafter="picard", generator=gens(3))
    assert policy.runs_plain(3) and auto.stats.windows == [1] * 12 and auto.stats.target_calls == 12
    one = speculative_sample(chain, x, window=1, drafter="picard", generator=gens(3))
    replay = speculative_sample(chain, x, window=auto.stats.windows, drafter="picard", generator=gens(3))
    assert torch.equal(auto.sample, one.sample) and torch.equal(replay.sample, one.sample)
    assert auto.stats.committed_per_round == [0, 36] and "L=1 x12" in auto.stats.window_choice
    calls = []
    busy = speculative_sample(chain, x, window=AutoWindow(), generator=gens(3), callback=calls.append)
    assert torch.equal(busy.sample, one.sample) and len(calls) == 12  # a callback needs the rounds: the loop


def test_generate_replay_reproduces_a_runs_images_on_another_machines_cache(tmp_path, monkeypatch, capsys):
    """``specdiff generate --replay stats.json``: each batch runs the schedule it ran in the recorded
    run, so the images are the same bit for bit even where the calibration differs (here: none)."""
    import json

    import numpy as np

    from specdiff.cli import CLIError, main

    # A calibration with a batching gain (not this shared CPU's timing of the moment, which may show none).
    monkeypatch.setattr(calibration_module, "measure_latency", lambda chain, x, sizes, repeats=3:
                        {b: 0.05 + 0.002 * b for b in sizes})
    monkeypatch.setattr(calibration_module, "measure_outside", lambda *a, **k: (1e-3, 1e-4))
    args = ["generate", "--num-images", "2", "--batch-size", "2", "--steps", "60", "--no-progress"]
    assert main([*args, "--out", str(tmp_path / "first")]) == 0
    recorded = json.loads((tmp_path / "first" / "stats.json").read_text())
    windows = recorded["speculative"]["batches"][0]["chosen_windows"]
    assert max(windows) > 1  # a calibrated run: the schedule is not the plain one
    monkeypatch.setenv("SPECDIFF_CACHE_DIR", str(tmp_path / "other-machine"))
    monkeypatch.setattr(calibration_module, "_MEMORY_CACHE", {})
    assert main([*args, "--out", str(tmp_path / "replay"), "--replay", str(tmp_path / "first" / "stats.json")]) == 0
    report = json.loads((tmp_path / "replay" / "stats.json").read_text())
    assert report["window"] == f"replay of {tmp_path / 'first' / 'stats.json'}"
    replayed = report["speculative"]["batches"][0]
    assert replayed["chosen_windows"] == windows and replayed["calibration_rows"] == 0
    first, again = (np.load(tmp_path / name / "speculative.npy") for name in ("first", "replay"))
    assert np.array_equal(first, again)
    capsys.readouterr()
    bad = [*args, "--seed", "5", "--out", str(tmp_path / "bad"), "--replay", str(tmp_path / "first" / "stats.json")]
    try:
        code = main(bad)
    except CLIError as err:
        code = err.code
    assert code == 2 and "no batch of seeds [5, 6]" in capsys.readouterr().err


@pytest.mark.parametrize("device", ["no batching gain", "batching gain"])
def test_a_calibration_that_finds_no_batching_gain_stops_after_two_sizes(monkeypatch, device):
    """Issue 20: at batch 8 on a CPU the calibration measured every size and the dry run, found no
    window worth taking, and the run paid 1.22x the plain sampler. Now the two smallest sizes come
    first; when the second saves under 10% per row on the first, nothing more is measured
    (no larger size, no dry run), the larger sizes are recorded proportional to rows, and the run is
    the plain loop. A second run reads the same frozen points and decides the same, measuring nothing."""
    per_row = {"no batching gain": lambda b: 1.0 * b, "batching gain": lambda b: 1.0 + 0.1 * b}[device]
    asked, dry_runs = [], []
    monkeypatch.setattr(calibration_module, "measure_latency", lambda chain, x, sizes, repeats=3:
                        asked.append(list(sizes)) or {b: per_row(b) for b in sizes})
    monkeypatch.setattr(calibration_module, "measure_outside", lambda *a, **k: dry_runs.append(1) or (1e-4, 1e-5))
    chain, x = mixture(steps=400, batch=2, key="two-stage")
    sizes, sweeps = plan(2, 8, 400)
    out = speculative_sample(chain, x, window=AutoWindow(max_window=8), generator=gens(2))
    assert asked[0] == sizes[:2]
    if device == "no batching gain":
        assert asked == [sizes[:2]] and dry_runs == [] and set(out.stats.windows) == {1}
        assert out.stats.calibration_rows == sweeps * sum(sizes[:2])
    else:
        assert asked == [sizes[:2], sizes[2:]] and dry_runs == [1] and max(out.stats.windows) > 1
        assert out.stats.calibration_rows == sweeps * sum(sizes) + 1
    cached = calibration_module._MEMORY_CACHE
    (key, curve), = ((k, v) for k, v in cached.items() if "|outside|" not in k)
    assert curve == {b: pytest.approx(per_row(b)) for b in sizes}  # measured or an upper bound on it
    asked.clear()
    again = speculative_sample(chain, x, window=AutoWindow(max_window=8), generator=gens(2))
    assert asked == [] and again.stats.calibration_rows == 0 and again.stats.windows == out.stats.windows
    assert torch.equal(again.sample, out.sample)


def test_the_first_call_at_a_new_batch_size_never_decides_the_curve(monkeypatch):
    """Issue 20: measured on the bundled UNet (CPU, 1 thread), the first call at a new number of rows
    costs more than the next ones (2 rows: 34 ms, then 17 ms; the kernels are set up per shape). A
    calibration of one sweep timed each size once, cold, after a warm-up call at the smallest size
    only: t(2) came out at twice t(1), "no batching gain" was frozen in the cache, and the default never
    left L = 1 at batch 1 on a machine where 9 rows cost 3 calls of 1. Each size is now timed at least
    twice and the fastest call kept, so the cold call is never the measurement."""
    chain, x = mixture(steps=100, batch=1, key="cold-shapes")
    clock, seen, real = [0.0], set(), chain.predict

    def predict(rows, step):  # warm cost 1 + 0.1 b (a batching gain), the first call of a size +1
        clock[0] += 1.0 + 0.1 * len(rows) + (0.0 if len(rows) in seen else 1.0)
        seen.add(len(rows))
        return real(rows, step)

    monkeypatch.setattr(chain, "predict", predict)
    monkeypatch.setattr(calibration_module.time, "perf_counter", lambda: clock[0])
    monkeypatch.setattr(calibration_module, "_clock", lambda device: calibration_module.time.perf_counter)
    sizes, sweeps = plan(1, 32, 100)
    assert sweeps >= 2
    out = speculative_sample(chain, x, window=AutoWindow(), generator=gens(1))
    (curve,) = (v for k, v in calibration_module._MEMORY_CACHE.items() if "|outside|" not in k)
    assert curve == {b: pytest.approx(1.0 + 0.1 * b) for b in sizes}  # the warm cost of every size
    assert out.stats.calibration_rows == sweeps * sum(sizes) + 1  # no separate warm-up call; the dry run


def test_the_calibration_shows_its_network_calls_on_the_runs_progress_bar():
    """Issue 20: the calibration was silent. A run that measures one shows it on the caller's progress:
    a bar "calibrating the window" counting its network calls (the sweeps, then the dry run),
    then the
    sampling bar; a run that finds its calibration cached opens no calibration bar."""
    bars = []

    class Bar:
        def __init__(self, total, desc="", unit=""):
            self.total, self.desc, self.unit, self.n = total, desc, unit, 0
            bars.append(self)

        def update(self, n):
            self.n += n

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    chain, x = mixture(steps=400, batch=2, key="progress")
    calls, real = [], chain.predict
    chain.predict = lambda rows, step: calls.append(rows.shape[0]) or real(rows, step)
    out = speculative_sample(chain, x, window=AutoWindow(max_window=8), generator=gens(2), progress=Bar)
    calibration_calls = len(calls) - out.stats.target_calls
    assert out.stats.calibration_rows > 0 and calibration_calls > 0
    assert [(b.desc, b.unit) for b in bars] == [("calibrating the window", "call"), ("", "")]  # then the steps
    sizes, sweeps = plan(2, 8, 400)
    assert bars[0].n == calibration_calls == bars[0].total == sweeps * len(sizes) + 1  # sweeps, dry run
    assert bars[1].n == bars[1].total == 2 * 400
    bars.clear()
    speculative_sample(chain, x, window=AutoWindow(max_window=8), generator=gens(2), progress=Bar)
    assert [b.desc for b in bars] == [""]
    # A callable that takes only total= (the documented signature) still works: no label passed.
    opened = []
    speculative_sample(chain, x, window=AutoWindow(max_window=8, recalibrate=True), generator=gens(2),
                       progress=lambda total: opened.append(total) or Bar(total))
    assert len(opened) == 2 and opened[0] == sweeps * len(sizes) + 1


def test_on_one_cpu_thread_the_calibration_does_not_count_time_the_core_was_held_elsewhere(monkeypatch):
    """Issue 20: on the shared 2-core CPU, a calibration taken while other processes held the core timed
    their turns into single calls (up to 2x) and froze a false "no batching gain" at batch 1. With one
    torch thread the network runs in the calling thread, and the calibration times that thread's CPU
    time: a call that waits (here: sleeps 30 ms, as a descheduled process does) costs only its work."""
    chain = GaussianMixtureDDPM.random(dim=2, num_steps=10)
    x = chain.sample_prior(1, torch.Generator().manual_seed(0))
    real = chain.predict
    monkeypatch.setattr(chain, "predict", lambda rows, step: time.sleep(0.03) or real(rows, step))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert calibration_module._clock(x.device) is time.thread_time
        assert max(calibration_module.measure_latency(chain, x, [1, 2], repeats=3).values()) < 0.01
    finally:
        torch.set_num_threads(threads)
    if threads > 1:  # several threads (or a GPU): wall-clock, waiting included
        assert calibration_module._clock(x.device) is time.perf_counter
        assert min(calibration_module.measure_latency(chain, x, [1, 2], repeats=3).values()) >= 0.03


@pytest.mark.parametrize("per_sample", [False, True])
def test_the_dry_run_draws_as_the_run_does_one_generator_or_one_per_sample(monkeypatch, per_sample):
    """A round's bookkeeping with one generator per sample (what the pipelines get from a list of
    generators) cost 2.9 ms against 1.6 ms at batch 1, and 5-8 ms against 3 ms at batch 8, on the bundled
    UNet's chain; the dry run drew from one generator and priced every run at the cheaper cost. It now
    draws as the run does, and the two are cached apart."""
    asked = []
    real = calibration_module.measure_outside
    monkeypatch.setattr(calibration_module, "measure_outside",
                        lambda *a, **k: asked.append(k.get("per_sample")) or real(*a, **k))
    monkeypatch.setattr(calibration_module, "measure_latency", lambda chain, x, sizes, repeats=3:
                        {b: 1.0 + 0.1 * b for b in sizes})
    chain, x = mixture(steps=400, batch=2, key="dry-run-generators")
    generator = gens(2) if per_sample else torch.Generator().manual_seed(7)
    speculative_sample(chain, x, window=AutoWindow(max_window=8), generator=generator)
    assert asked == [per_sample]
    keys = [k for k in calibration_module._MEMORY_CACHE if "|outside|" in k]
    assert len(keys) == 1 and keys[0].endswith("|per-sample") == per_sample
