"""Δ-probe (specdiff.probe): its acceptance is the coupling's 2Φ(−‖Δ‖/2), and its predicted
calls and rows per sample match what the speculative sampler then does."""

import math

import pytest
import torch

from specdiff import ModelDrafter, speculative_sample
from specdiff.cli import main as cli_main
from specdiff.probe import _expected_cost, probe
from specdiff.testing import GaussianMixtureDDPM

FLAT = {1: 1.0, 10**6: 1.0}  # a latency curve where any batch costs one call: skips the measurement


def shifted(chain, shift):
    model = GaussianMixtureDDPM(chain.means + shift, chain.scale, chain.weights, chain.num_steps, chain.prediction_type)
    return ModelDrafter(model.predict)


def test_a_drafter_equal_to_the_target_has_zero_delta_and_full_acceptance():
    chain = GaussianMixtureDDPM.random(dim=3, num_steps=40)
    x = chain.sample_prior(8, torch.Generator().manual_seed(0))
    report = probe(chain, x, drafters={"exact": ModelDrafter(chain.predict)}, windows=(1, 4),
                   generator=torch.Generator().manual_seed(1), latency=FLAT)
    assert max(max(row) for row in report.delta_norm["exact"]) < 1e-9
    calls = {r["window"]: r["target_calls"] for r in report.predictions["exact"]}
    assert calls == {1: pytest.approx(40), 4: pytest.approx(11)}  # warm-up + ceil(40 / 4) rounds


def test_acceptance_is_the_maximal_coupling_probability_of_the_measured_delta():
    chain = GaussianMixtureDDPM.random(dim=4, num_steps=50)
    x = chain.sample_prior(1, torch.Generator().manual_seed(0))
    report = probe(chain, x, windows=(4,), generator=torch.Generator().manual_seed(1), latency=FLAT)
    for deltas, accepts in zip(report.delta_norm["frozen"], report.acceptance["frozen"]):
        for d, a in zip(deltas, accepts):
            if not math.isnan(d):
                assert a == pytest.approx(2 * 0.5 * math.erfc(d / 2 / math.sqrt(2)))
    staleness = [sum(col) / len(col) for col in zip(*report.delta_norm["frozen"][10:])]
    assert staleness == sorted(staleness)  # older frozen predictions are further from the target


def test_expected_cost_with_certain_acceptance_counts_rounds_and_rows():
    accept = torch.ones(10, 5, dtype=torch.float64)
    calls, rows, seconds = _expected_cost(accept, 4, 2, lambda b: 1.0, 0.0)
    assert calls == 1 + 3  # warm-up, then rounds of 4, 4, 2 steps
    assert rows == 2 * (1 + 4 + 4 + 1)  # exact roots: y_1..y_L, never the final state
    assert seconds == calls


@pytest.mark.parametrize("drafter", ["frozen", "shifted"])
def test_predicted_calls_and_rows_match_the_sampler(drafter):
    chain = GaussianMixtureDDPM.random(dim=4, num_steps=200)
    draft = None if drafter == "frozen" else shifted(chain, 0.3)
    x = chain.sample_prior(64, torch.Generator().manual_seed(0))
    report = probe(chain, x, drafters={drafter: draft}, windows=(4, 16), generator=torch.Generator().manual_seed(1),
                   latency=FLAT)
    n = 400
    x = chain.sample_prior(n, torch.Generator().manual_seed(5))
    for predicted in report.predictions[drafter]:
        out = speculative_sample(chain, x, window=predicted["window"], drafter=draft,
                                 generator=[torch.Generator().manual_seed(i) for i in range(n)])
        calls = sum(out.stats.per_sample_target_calls) / n  # a sample's calls = its batch-1 latency
        assert predicted["target_calls"] == pytest.approx(calls, rel=0.08)
        assert predicted["rows"] / 64 == pytest.approx(out.stats.target_rows / n, rel=0.08)


def test_probe_command_prints_a_table_per_window(capsys, tmp_path):
    assert cli_main(["probe", "--steps", "12", "--windows", "1,4", "--json", str(tmp_path / "probe.json")]) == 0
    out = capsys.readouterr().out
    assert "| frozen | 4 |" in out and "best fixed window" in out
    assert (tmp_path / "probe.json").exists()


def test_probe_command_rejects_bad_windows():
    with pytest.raises(SystemExit, match="--windows must be comma-separated integers"):
        cli_main(["probe", "--windows", "4,x"])
