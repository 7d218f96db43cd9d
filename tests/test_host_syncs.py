"""GPU readiness without a GPU: whole speculative samples on the simulated CUDA device
(:func:`specdiff.syncs.count_syncs`), with the host <-> device synchronisations of every round
counted and held to a constant independent of the window and the batch.

On the simulated device the sampler takes its CUDA path (its ``.to(device)`` moves, its
``device.type == "cuda"`` branches) on CPU values, and an op mixing a device tensor with a host
array raises, as CUDA does: so these runs also prove the round never mixes devices.

What is counted (see :mod:`specdiff.syncs`): ``reads`` (the host reads a device value: ``item``,
``bool``, ``int``/``float``, ``tolist``, ``cpu``, ``torch.equal``, and data-dependent shapes:
``nonzero``, boolean indexing, ...) and ``copies`` (blocking host -> device copies, a host index
tensor indexing a device tensor). Both make the host wait for the device's queue.
"""

from __future__ import annotations

from collections import Counter

import pytest
import torch

import specdiff.calibration as window_module  # the calibration (moved out of specdiff.window)
import specdiff.sampler as sampler_module
from specdiff import sample_baseline, speculative_sample
from specdiff.discrete import MaskedDiffusionChain, MaskedDiffusionScheduler
from specdiff.syncs import SimulatedDeviceError, count_syncs
from specdiff.testing import GaussianMixtureDDPM

# The bounds the current round achieves, per round (the driver loop's own included), for every
# configuration below: measured, then asserted (tests fail if a change adds synchronisations).
# READS: the host reads device values; COPIES: blocking host -> device copies (index tensors the
# round keeps on the host on purpose, moved when the device needs them).
# Gaussian: 2 in every round (the accept decisions with the finiteness flags; the kernel's std
# checks). Categorical: 6 in every round, up to 5 more in a round with a rejection (the residual's
# built laws and the time-free unchanged-state check). Copies: at most 19 a round, also with one
# generator per sample (the noise crosses to the device in one copy per lookup).
MAX_READS = {"gaussian": 2, "categorical": 11}
MAX_COPIES = {"gaussian": 19, "categorical": 19}
LOOP_READS, LOOP_COPIES = 3, 6  # per iteration of the categorical residual's rejection loop
MAX_PER_SITE = 2  # times one call site fires in a round


class DeviceLogits:
    """A tiny categorical network computed on its input's device: per-token embeddings, a
    per-position bias and the mean embedding of the whole state (so it depends on every token).
    Its tables move to a device once (a network's weights live there)."""

    def __init__(self, vocab: int, length: int, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.tables = (torch.randn(vocab + 1, vocab, generator=g, dtype=torch.float64),
                       torch.randn(length, vocab, generator=g, dtype=torch.float64))
        self.placed = {}

    def __call__(self, x):
        if x.device not in self.placed:
            self.placed[x.device] = tuple(t.to(x.device) for t in self.tables)
        embed, position = self.placed[x.device]
        e = embed[x]
        return 2 * e + position + e.mean(1, keepdim=True)


V, LENGTH = 4, 8


def gaussian(steps=16):
    return GaussianMixtureDDPM.random(dim=3, num_steps=steps)


def categorical(steps=24):
    scheduler = MaskedDiffusionScheduler(vocab_size=V, num_inference_steps=steps)
    return MaskedDiffusionChain(DeviceLogits(V, LENGTH), scheduler)


def start(kind, chain, batch):
    if kind == "gaussian":
        return chain.sample_prior(batch, torch.Generator().manual_seed(0))
    return torch.full((batch, LENGTH), V)


def generators(batch, ragged):
    """``ragged``: one generator per sample, so samples accept differently and run out of step."""
    if ragged:
        return [torch.Generator().manual_seed(100 + i) for i in range(batch)]
    return torch.Generator().manual_seed(7)


def prepare_latency(monkeypatch, cache_dir) -> None:
    """``window="auto"`` with a prepared latency curve and outside cost (no timing on a shared CPU)."""
    monkeypatch.setenv("SPECDIFF_CACHE_DIR", str(cache_dir))
    monkeypatch.setattr(window_module, "_MEMORY_CACHE", {})
    monkeypatch.setattr(window_module, "measure_latency",
                        lambda chain, x, sizes, repeats=5: {b: 1e-3 * (1 + b / 64) for b in sizes})
    monkeypatch.setattr(window_module, "measure_outside", lambda chain, x, drafter=None, **kw: (1e-4, 1e-5))
    # these runs are too short to afford a calibration (they would run plain): plan one as a long run would
    monkeypatch.setattr(window_module, "plan", lambda batch, *args, **kw: ([batch * k for k in (1, 2, 3, 5, 9)], 1))


@pytest.fixture
def prepared_latency(monkeypatch, tmp_path):
    prepare_latency(monkeypatch, tmp_path)


def measure(monkeypatch, kind, window, batch, ragged=False, steps=None):
    """Run one speculative sample on the simulated device; returns (the syncs of each round, the
    number outside rounds, the output, its sample on the host, the counter)."""
    chain = (gaussian if kind == "gaussian" else categorical)(*([steps] if steps else []))
    x = start(kind, chain, batch)
    rounds = []
    run_round = sampler_module.speculative_round

    def counted_round(*args, **kwargs):
        before = len(count.events)
        out = run_round(*args, **kwargs)
        rounds.append(count.events[before:])
        return out

    monkeypatch.setattr(sampler_module, "speculative_round", counted_round)
    with count_syncs(simulate="cuda") as count:
        x_dev = x.to("cuda")
        start_mark = count.mark()
        out = speculative_sample(chain, x_dev, window=window, generator=generators(batch, ragged), max_rows=None)
        end_mark = count.mark()
        sample = out.sample.cpu()
    monkeypatch.setattr(sampler_module, "speculative_round", run_round)
    in_rounds = sum(len(r) for r in rounds)
    outside = end_mark - start_mark - in_rounds
    return rounds, outside, out, sample, count


def in_residual_loop(event) -> bool:
    """The categorical residual's rejection loop (``sample_residual``): its iterations are data-dependent."""
    return "(sample_residual)" in event.site


def split(events):
    """(reads, blocking copies) outside the residual loop, (reads, copies) inside it, its iterations."""
    loop = [e for e in events if in_residual_loop(e)]
    rest = [e for e in events if not in_residual_loop(e)]
    kinds = Counter(e.kind for e in rest)
    loop_reads = sum(e.kind != "h2d" for e in loop)
    iterations = sum(e.kind == "d2h" and e.op == "to(cpu)" for e in loop)
    return kinds["d2h"] + kinds["shape"], kinds["h2d"], loop_reads, len(loop) - loop_reads, iterations


CONFIGS = [(kind, window, batch, ragged) for kind in ("gaussian", "categorical")
           for window, batch, ragged in [(2, 1, False), (8, 16, False), ("auto", 16, True)]]


@pytest.mark.parametrize("kind,window,batch,ragged", CONFIGS)
def test_syncs_per_round_are_bounded_independently_of_window_and_batch(monkeypatch, prepared_latency, kind, window,
                                                                       batch, ragged):
    rounds, _, out, _, _ = measure(monkeypatch, kind, window, batch, ragged)
    assert out.stats.rounds == len(rounds) > 1
    reads, copies, loop_reads, loop_copies, iterations = zip(*(split(r) for r in rounds))
    assert max(reads) <= MAX_READS[kind], (kind, window, batch, reads)
    # The residual's rejection loop syncs a constant number of times per iteration; its iterations
    # are few (each draws twice the proposals of the last), and not a function of the window.
    assert all(r <= LOOP_READS * i for r, i in zip(loop_reads, iterations)), (loop_reads, iterations)
    assert all(c <= LOOP_COPIES * i for c, i in zip(loop_copies, iterations)), (loop_copies, iterations)
    assert max(copies) <= MAX_COPIES[kind], (kind, window, batch, copies)
    # No call site fires more than a constant number of times per round: nothing syncs per
    # drafted position or per sample (the residual loop counted per iteration, above).
    for events in rounds:
        sites = Counter((e.site, e.kind) for e in events if not in_residual_loop(e))
        assert max(sites.values()) <= MAX_PER_SITE, sites


# With one generator per sample the step noise is gathered on the host and crosses to the device
# in one copy per lookup, whatever the number of generators.
@pytest.mark.parametrize("kind", ["gaussian", "categorical"])
def test_copies_with_per_sample_generators_do_not_grow_with_the_batch(monkeypatch, kind):
    rounds, *_ = measure(monkeypatch, kind, 8, 8, True)
    copies = [split(r)[1] for r in rounds]
    assert max(copies) <= MAX_COPIES[kind], copies


@pytest.mark.parametrize("kind", ["gaussian", "categorical"])
def test_the_simulated_device_computes_the_cpu_sample_bit_for_bit(monkeypatch, kind):
    _, _, _, on_device, _ = measure(monkeypatch, kind, 4, 3, True, steps=10)
    chain = (gaussian if kind == "gaussian" else categorical)(10)
    on_cpu = speculative_sample(chain, start(kind, chain, 3), window=4, generator=generators(3, True), max_rows=None)
    assert torch.equal(on_device, on_cpu.sample)
    plain = sample_baseline(chain, start(kind, chain, 3), generators(3, True))
    with count_syncs(simulate="cuda"):
        one = speculative_sample(chain, start(kind, chain, 3).to("cuda"), window=1, generator=generators(3, True),
                                 max_rows=None).sample.cpu()
    assert torch.equal(one, plain)


# -- the counter itself --------------------------------------------------------------------------


def test_each_kind_of_synchronisation_is_counted_once_at_its_line():
    with count_syncs(simulate="cuda") as syncs:
        x = torch.arange(6.0).to("cuda")  # h2d
        host = torch.tensor([0, 2])
        assert x.device.type == "cuda" and (x * 2).device.type == "cuda"
        x.sum().item()  # d2h
        bool((x > 2).any())  # d2h
        int(x[1])  # d2h
        x.tolist()  # d2h
        x.cpu()  # d2h
        x.nonzero()  # shape
        x[x > 2]  # shape (boolean index)
        torch.where(x > 2)  # shape (nonzero)
        x[host]  # h2d (a host index)
        torch.equal(x, x)  # d2h
        assert x.to("cuda") is x and x.new_zeros(3).device.type == "cuda"
        host.sum().item()  # host bookkeeping: nothing
        torch.arange(3, device=x.device) + 1  # made on the device: nothing
    assert syncs.by_kind() == {"d2h": 6, "shape": 3, "h2d": 2}, syncs.table()
    assert all("test_host_syncs.py" in e.site for e in syncs.events)
    assert syncs.total == 11 and "tolist" in syncs.table()


def test_the_simulated_device_refuses_what_cuda_refuses():
    with count_syncs(simulate="cuda"):
        x = torch.ones(3).to("cuda")
        with pytest.raises(SimulatedDeviceError, match="same device"):
            x + torch.ones(3)
        x + torch.tensor(2.0)  # a 0-dim host tensor is a scalar: allowed
        with pytest.raises(TypeError, match="numpy"):
            x.numpy()


def test_nested_counters_each_count_a_synchronisation_once():
    with count_syncs(simulate="cuda") as outer:
        x = torch.ones(3).to("cuda")
        with count_syncs(simulate="cuda") as inner:
            x.sum().item()
            x[torch.tensor([0])]
            torch.ones(2).to("cuda")
    assert inner.by_kind() == {"d2h": 1, "h2d": 2} and outer.by_kind() == {"d2h": 1, "h2d": 3}


def test_count_syncs_without_simulation_counts_nothing_on_the_cpu():
    with count_syncs() as syncs:
        torch.ones(3).sum().item()
    assert syncs.total == 0
    with pytest.raises(ValueError, match="simulate"), count_syncs(simulate="mps"):
        pass


def main():  # the table of the report: python tests/test_host_syncs.py
    import tempfile

    mp = pytest.MonkeyPatch()
    prepare_latency(mp, tempfile.mkdtemp())
    configs = CONFIGS + [(kind, 8, 16, True) for kind in ("gaussian", "categorical")]
    for kind, window, batch, ragged in configs:
        rounds, outside, _, _, count = measure(mp, kind, window, batch, ragged)
        reads, copies, loop_reads, loop_copies, iterations = zip(*(split(r) for r in rounds))
        print(f"{kind:12} window={window!s:5} batch={batch:3} ragged={ragged!s:5} rounds={len(rounds):3}  "
              f"reads/round max {max(reads)} mean {sum(reads) / len(rounds):.2f}; copies/round max {max(copies)} mean "
              f"{sum(copies) / len(rounds):.2f}; residual loop: {sum(iterations)} iterations, {sum(loop_reads)} reads, "
              f"{sum(loop_copies)} copies; outside rounds {outside}")
        print(count.table(per=len(rounds), events=[e for r in rounds for e in r]))


if __name__ == "__main__":
    main()
