"""The `specdiff` command: the main job end to end on a tiny model, and clear errors."""

import json
from pathlib import Path

import pytest
import torch
from diffusers import DDPMPipeline, DDPMScheduler, PNDMScheduler, UNet2DModel

from specdiff.cli import main


def tiny_pipeline(path, scheduler_cls=DDPMScheduler):
    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       norm_num_groups=4)
    DDPMPipeline(unet=unet, scheduler=scheduler_cls(num_train_timesteps=100)).save_pretrained(path)
    return path


def test_generate_writes_a_grid_and_stats_and_compares_with_the_plain_sampler(tmp_path, capsys):
    model = tiny_pipeline(tmp_path / "model")
    out = tmp_path / "out"
    assert main(["generate", "--model", str(model), "--num-images", "3", "--steps", "20", "--window", "4",
                 "--out", str(out), "--compare", "--no-progress"]) == 0
    report = json.loads((out / "stats.json").read_text())
    assert (out / "speculative.png").stat().st_size > 0 and (out / "baseline.png").stat().st_size > 0
    assert report["speculative"]["num_steps"] == 20 and report["plain"]["target_calls"] == 20
    assert report["speculative"]["target_calls"] <= 20
    printed = capsys.readouterr().out
    assert "target calls" in printed and "wall-clock" in printed


def test_generate_from_the_bundled_masked_diffusion_model_compares_plain_and_cached(tmp_path, capsys):
    model = Path(__file__).resolve().parent.parent / "assets" / "models" / "digits-mdm"
    out = tmp_path / "out"
    assert main(["generate", "--model", str(model), "--num-images", "2", "--steps", "16", "--window", "4",
                 "--out", str(out), "--compare", "--no-progress", "--drafter", "model"]) == 0
    report = json.loads((out / "stats.json").read_text())
    assert report["plain"]["target_calls"] == 16
    assert report["cached"]["target_calls"] <= 16
    assert report["speculative"]["draft_calls"] > 0
    assert "cached:" in capsys.readouterr().out


def test_unknown_model_path_is_a_clear_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as err:
        main(["generate", "--model", str(tmp_path / "nope"), "--out", str(tmp_path / "o")])
    assert err.value.code == 2
    assert "does not exist" in capsys.readouterr().err


def test_a_deterministic_scheduler_is_refused_with_the_reason(tmp_path, capsys):
    model = tiny_pipeline(tmp_path / "model", PNDMScheduler)
    with pytest.raises(SystemExit) as err:
        main(["generate", "--model", str(model), "--out", str(tmp_path / "o"), "--no-progress"])
    assert err.value.code == 2
    assert "deterministic" in capsys.readouterr().err


@pytest.mark.parametrize("window", ["0", "-2"])
def test_non_positive_window_is_refused(tmp_path, window, capsys):
    with pytest.raises(SystemExit) as err:
        main(["generate", "--window", window, "--out", str(tmp_path)])
    assert err.value.code == 2
    assert "must be positive" in capsys.readouterr().err


def test_unwritable_output_folder_is_refused(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(SystemExit) as err:
        main(["generate", "--out", str(blocker / "sub")])
    assert err.value.code == 2
    assert "cannot write to output folder" in capsys.readouterr().err


def test_analytic_demo_reports_speed_and_exactness(capsys):
    assert main(["analytic", "--steps", "200", "--samples", "300", "--window", "8", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "speedup" in printed and "same law not rejected" in printed
