"""Δ-probe (specdiff.probe): its acceptance is the coupling's 2Φ(−‖Δ‖/2), and its predicted
calls and rows per sample match what the speculative sampler then does."""

import math

import pytest
import torch
from test_cli import fails_with, tiny_pipeline

from specdiff import ModelDrafter, acceptance_probability, speculative_sample
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


def test_the_reported_acceptance_agrees_with_the_reported_delta_and_staleness_grows_with_lag():
    """Consistency of the report's two fields (batch 1: acceptance = 2Φ(-‖Δ‖/2) of the same Δ) and
    the frozen drafter's staleness; the independent recomputation of both is the next test."""
    chain = GaussianMixtureDDPM.random(dim=4, num_steps=50)
    x = chain.sample_prior(1, torch.Generator().manual_seed(0))
    report = probe(chain, x, windows=(4,), generator=torch.Generator().manual_seed(1), latency=FLAT)
    for deltas, accepts in zip(report.delta_norm["frozen"], report.acceptance["frozen"]):
        for d, a in zip(deltas, accepts):
            if not math.isnan(d):
                assert a == pytest.approx(2 * 0.5 * math.erfc(d / 2 / math.sqrt(2)))
    staleness = [sum(col) / len(col) for col in zip(*report.delta_norm["frozen"][10:])]
    assert staleness == sorted(staleness)  # older frozen predictions are further from the target


class Recording(GaussianMixtureDDPM):
    """The mixture, recording every state and step its network sees (the probe's plain run)."""

    def predict(self, x, step):
        self.seen.append((x.clone(), step.clone()))
        return super().predict(x, step)


def test_probed_delta_and_acceptance_match_an_independent_recomputation():
    """Δ recomputed outside the probe: the frozen draft of step k at lag j is the transition of
    x_k with the target's prediction made at step k - j; the acceptance is the coupling's
    acceptance_probability of the two means, never the probe's own formula."""
    base = GaussianMixtureDDPM.random(dim=4, num_steps=50)
    chain = Recording(base.means, base.scale, base.weights, base.num_steps)
    chain.seen = []
    x = chain.sample_prior(3, torch.Generator().manual_seed(0))
    report = probe(chain, x, windows=(4,), generator=torch.Generator().manual_seed(1), latency=FLAT)
    states = {int(step[0]): state for state, step in chain.seen[: chain.num_steps]}  # one call per step (frozen)
    assert sorted(states) == list(range(chain.num_steps))
    checked = 0
    for k in (5, 20, 48):
        x_k, step = states[k].double(), torch.full((3,), k)
        mean_t, std = chain.transition(x_k, step, chain.predict(x_k, step))
        row = report.steps.index(k)
        for lag in (1, 2, 4):
            back = torch.full((3,), k - lag)
            mean_d, _ = chain.transition(x_k, step, chain.predict(states[k - lag].double(), back))
            delta = ((mean_d - mean_t) / std[:, None]).norm(dim=1)
            assert report.delta_norm["frozen"][row][lag - 1] == pytest.approx(delta.mean().item(), rel=1e-9, abs=1e-12)
            expected = acceptance_probability(mean_d, mean_t, std).mean().item()
            assert report.acceptance["frozen"][row][lag - 1] == pytest.approx(expected, rel=1e-9, abs=1e-12)
            checked += 0 < expected < 0.999  # cases where Δ matters, not all-accept
    assert checked >= 3


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


def test_probe_takes_the_sampler_options_of_generate(capsys):
    assert cli_main(["probe", "--steps", "10", "--windows", "1,4", "--scheduler", "euler-a"]) == 0
    assert "chosen with --scheduler euler-a" in capsys.readouterr().out
    assert cli_main(["probe", "--steps", "10", "--windows", "1,4", "--scheduler", "ddim", "--eta", "1.0"]) == 0
    fails_with(capsys, ["probe", "--steps", "10", "--scheduler", "nope"], "unknown sampler", "euler-a")


def test_probe_runs_a_deterministic_model_through_the_stochastic_switch(tmp_path, capsys):
    from diffusers import PNDMScheduler

    tiny_pipeline(tmp_path / "m", PNDMScheduler)
    argv = ["probe", "--model", str(tmp_path / "m"), "--steps", "8", "--windows", "1,2"]
    fails_with(capsys, argv, "deterministic", "--stochastic")
    assert cli_main([*argv, "--stochastic"]) == 0
    assert "stochastic sibling of PNDMScheduler" in capsys.readouterr().out


def test_probe_on_a_text_to_image_folder_is_one_paragraph_not_a_traceback(tmp_path, capsys):
    from diffusers import PNDMScheduler
    from test_pipeline_stable_diffusion import sd_pipe

    sd_pipe(PNDMScheduler()).save_pretrained(tmp_path / "sd")
    capsys.readouterr()  # saving shows transformers' "Writing model shards" bar
    fails_with(capsys, ["probe", "--model", str(tmp_path / "sd"), "--steps", "4"],
                      "is a StableDiffusionPipeline", "specdiff probe takes unconditional image pipelines")
