"""The quality-at-equal-calls benchmark (issue 20, item 4): its measuring function counts the calls
the plain samplers really make, its speculative runs at window 1 are the plain images bit for bit,
and the table in docs/quality.md is the rendering of the saved results."""

import json
from pathlib import Path

import pytest
import torch
from diffusers import DDPMScheduler, UNet2DModel

from specdiff.workbench import bench_quality
from specdiff.workbench.bench_quality import SAMPLERS, sample

ROOT = Path(__file__).resolve().parents[1]
STOCHASTIC = [name for name, (_, stochastic) in SAMPLERS.items() if stochastic]


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       norm_num_groups=4).eval()
    # the bundled model's schedule, on 100 training steps
    return unet, DDPMScheduler(num_train_timesteps=100, beta_schedule="squaredcos_cap_v2", clip_sample=True)


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_plain_calls_are_the_network_calls_made(tiny, name):
    unet, base = tiny
    for steps in (4, 7):
        run = sample(unet, base, name, steps, n=3, seed0=1)
        assert run.calls == steps and run.rows == steps  # one call of the whole batch per step
        assert run.images.shape == (3, 1, 8, 8) and 0 <= run.images.min() and run.images.max() <= 1


@pytest.mark.parametrize("name", STOCHASTIC)
def test_speculative_at_window_1_is_the_plain_sampler_bit_for_bit(tiny, name):
    unet, base = tiny
    plain = sample(unet, base, name, 9, n=3, seed0=5)
    spec = sample(unet, base, name, 9, n=3, window=1, seed0=5)
    assert torch.equal(spec.images, plain.images)
    assert spec.calls == 9 and spec.rows == 9
    other = sample(unet, base, name, 9, n=3, seed0=6)  # the seeds matter: not a constant output
    assert not torch.equal(other.images, plain.images)


@pytest.mark.parametrize("name", STOCHASTIC)
def test_speculative_calls_are_the_mean_per_image_calls(tiny, name):
    unet, base = tiny
    run = sample(unet, base, name, 12, n=4, window=4, seed0=2)
    # every image takes at least ceil(12 / 4) = 3 calls and at most 12; rows are at least the steps
    assert 3 <= run.calls <= 12 and run.rows >= 12
    assert 0 <= run.acceptance <= 1


def test_deterministic_solvers_are_refused_a_window(tiny):
    unet, base = tiny
    with pytest.raises(ValueError, match="deterministic"):
        sample(unet, base, "dpmpp-2m", 5, n=2, window=4)


def test_the_quality_page_is_the_saved_results():
    """docs/quality.md's table is exactly what `python -m specdiff.workbench.bench_quality --table` renders."""
    result = json.loads((ROOT / "assets" / "bench" / "quality.json").read_text())
    text = (ROOT / "docs" / "quality.md").read_text()
    start, end = bench_quality.MARKERS
    assert bench_quality.DOCS == ROOT / "docs" / "quality.md"
    assert result["complete"], "the saved run is partial: rerun it with --resume"
    assert text[text.index(start) + len(start):text.index(end)] == "\n" + bench_quality.table(result) + "\n"
    stepped = {(r["sampler"], r["kind"]) for r in result["rows"]}
    assert {(name, "plain") for name in SAMPLERS} <= stepped  # every plain sampler ran
    assert {(name, "speculative") for name in STOCHASTIC} <= stepped
