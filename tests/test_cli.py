"""The `specdiff` command: the main job end to end on tiny models, one-line errors, help,
the summary a newcomer reads, and multi-process generation (issue 11 §2, §4)."""

import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DDPMPipeline,
    DDPMScheduler,
    EulerAncestralDiscreteScheduler,
    PNDMScheduler,
    UNet2DModel,
)
from PIL import Image

from specdiff.cli import main

ROOT = Path(__file__).resolve().parent.parent


def tiny_pipeline(path, scheduler_cls=DDPMScheduler):
    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       norm_num_groups=4)
    DDPMPipeline(unet=unet, scheduler=scheduler_cls(num_train_timesteps=100)).save_pretrained(path)
    return path


def fails_with(capsys, argv, *expected):
    """``argv`` stops with exit status 2 and ONE line on stderr (no traceback) containing ``expected``."""
    with pytest.raises(SystemExit) as err:
        main(argv)
    assert err.value.code == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("specdiff: error:"), lines
    for text in expected:
        assert text in lines[0], lines[0]
    return lines[0]


def test_generate_writes_grids_arrays_stats_and_a_readable_summary(tmp_path, capsys):
    model = tiny_pipeline(tmp_path / "model")
    out = tmp_path / "out"
    assert main(["generate", "--model", str(model), "--num-images", "3", "--steps", "20", "--window", "4",
                 "--out", str(out), "--compare", "--no-progress"]) == 0
    report = json.loads((out / "stats.json").read_text())
    assert report["num_steps"] == 20 and report["seeds"] == [0, 1, 2]
    assert report["plain"]["target_calls"] == 20 and report["speculative"]["target_calls"] <= 20
    assert np.load(out / "speculative.npy").shape == np.load(out / "baseline.npy").shape == (3, 1, 8, 8)
    printed = capsys.readouterr().out
    # A table plain vs speculative in words a newcomer knows; the ratios say which way they go.
    for words in ("plain sampler", "speculative", "network calls", "wall-clock", "fewer network calls"):
        assert words in printed
    assert "steps/round" not in printed and " rows" not in printed
    assert any(f"{how} the plain sampler" in printed for how in ("faster than", "slower than", "about as fast as"))
    wrote = printed.strip().splitlines()[-1]
    for name in ("speculative.png", "baseline.png", "speculative.npy", "baseline.npy", "stats.json"):
        assert str(out / name) in wrote
    # Grids are upscaled: three 8x8 images would be a 19x19 grid.
    assert min(Image.open(out / "speculative.png").size) >= 128


def test_compare_uses_the_plain_sampler_of_the_same_scheduler(tmp_path):
    """Euler ancestral: DDPMPipeline would be another sampler; with --window 1 the speculative
    run IS the plain sampler, so both arrays must be the same images."""
    model = tiny_pipeline(tmp_path / "model", EulerAncestralDiscreteScheduler)
    out = tmp_path / "out"
    assert main(["generate", "--model", str(model), "--num-images", "2", "--steps", "10", "--window", "1",
                 "--out", str(out), "--compare", "--no-progress"]) == 0
    np.testing.assert_array_equal(np.load(out / "speculative.npy"), np.load(out / "baseline.npy"))


def test_ddim_needs_eta_and_the_error_names_the_flag(tmp_path, capsys):
    model = tiny_pipeline(tmp_path / "model", DDIMScheduler)
    fails_with(capsys, ["generate", "--model", str(model), "--out", str(tmp_path / "o"), "--no-progress"],
               "deterministic", "--eta 1.0")
    out = tmp_path / "ok"
    assert main(["generate", "--model", str(model), "--eta", "1.0", "--num-images", "2", "--steps", "10",
                 "--out", str(out), "--no-progress"]) == 0
    assert json.loads((out / "stats.json").read_text())["eta"] == 1.0
    fails_with(capsys, ["generate", "--eta", "0.5", "--out", str(tmp_path / "o"), "--no-progress"], "--eta",
               "DDPMScheduler")


def test_bfloat16_runs_end_to_end(tmp_path):
    model = tiny_pipeline(tmp_path / "model")
    out = tmp_path / "out"
    assert main(["generate", "--model", str(model), "--dtype", "bfloat16", "--num-images", "2", "--steps", "6",
                 "--out", str(out), "--no-progress"]) == 0
    images = np.load(out / "speculative.npy")
    assert images.dtype == np.float32 and images.shape == (2, 1, 8, 8) and np.isfinite(images).all()


def test_progress_bars_are_labelled_counted_in_steps_and_silenced(tmp_path, capsys):
    model = tiny_pipeline(tmp_path / "model")
    argv = ["generate", "--model", str(model), "--num-images", "2", "--steps", "6", "--window", "3", "--compare"]
    assert main(argv + ["--out", str(tmp_path / "a")]) == 0
    err = capsys.readouterr().err
    assert "speculative (images 0-1)" in err and "plain (images 0-1)" in err
    assert err.count("6/6") >= 2 and "12/12" not in err  # steps per image for both samplers
    assert main(argv + ["--out", str(tmp_path / "b"), "--no-progress"]) == 0
    assert capsys.readouterr().err == ""  # not even "Loading pipeline components"


def test_generate_from_the_bundled_masked_diffusion_model_compares_plain_and_cached(tmp_path, capsys):
    model = ROOT / "assets" / "models" / "digits-mdm"
    out = tmp_path / "out"
    assert main(["generate", "--model", str(model), "--num-images", "2", "--steps", "16", "--window", "4",
                 "--out", str(out), "--compare", "--no-progress", "--drafter", "model"]) == 0
    report = json.loads((out / "stats.json").read_text())
    assert report["plain"]["target_calls"] == 16
    assert report["cached"]["target_calls"] <= 16
    assert report["speculative"]["draft_calls"] > 0
    assert "plain, cached" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("device", "expected"),
    [("banana", "is not a device"), pytest.param("cuda", "no CUDA GPU", marks=pytest.mark.skipif(
        torch.cuda.is_available(), reason="this machine has a GPU"))],
)
def test_unusable_device_is_one_line(tmp_path, capsys, device, expected):
    fails_with(capsys, ["generate", "--device", device, "--out", str(tmp_path)], expected, "--device cpu")


def test_too_many_steps_is_one_line(tmp_path, capsys):
    fails_with(capsys, ["generate", "--steps", "5000", "--out", str(tmp_path), "--no-progress"],
               "trained with 1000 steps", "--steps 1000")


def test_missing_model_folder_is_one_line(tmp_path, capsys):
    fails_with(capsys, ["generate", "--model", str(tmp_path / "nope"), "--out", str(tmp_path / "o")], "not found")


def test_a_mistyped_relative_path_with_a_slash_is_not_taken_for_a_hub_id(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models" / "digits-ddpm").mkdir(parents=True)
    line = fails_with(capsys, ["generate", "--model", "models/digit-ddpm", "--out", "o"], "not found", "digits-ddpm")
    assert "Hub" not in line


def test_a_hub_id_offline_says_so_in_one_line(tmp_path, monkeypatch, capsys):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.chdir(tmp_path)
    fails_with(capsys, ["generate", "--model", "google/ddpm-cifar10-32", "--out", "o", "--no-progress"],
               "no folder of that name here", "no network", "Pass a diffusers pipeline folder")


def test_a_deterministic_scheduler_is_refused_with_the_reason(tmp_path, capsys):
    model = tiny_pipeline(tmp_path / "model", PNDMScheduler)
    fails_with(capsys, ["generate", "--model", str(model), "--out", str(tmp_path / "o"), "--no-progress"],
               "deterministic")


@pytest.mark.parametrize("window", ["0", "-2"])
def test_non_positive_window_is_refused(tmp_path, window, capsys):
    with pytest.raises(SystemExit) as err:
        main(["generate", "--window", window, "--out", str(tmp_path)])
    assert err.value.code == 2
    assert "must be positive" in capsys.readouterr().err


def test_unwritable_output_folder_is_refused(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    fails_with(capsys, ["generate", "--out", str(blocker / "sub")], "cannot write to output folder")


def test_options_a_model_kind_would_ignore_are_refused(tmp_path, capsys):
    """Text-only options on an image model, and --dtype on masked-diffusion models (which run in
    float32), would be silently ignored: they stop with the fix instead."""
    fails_with(capsys, ["generate", "--prompt", "hello", "--block-size", "4", "--out", str(tmp_path)],
               "--prompt, --block-size", "for text models only", "drop them")
    fails_with(capsys, ["generate", "--model", str(ROOT / "assets" / "models" / "digits-mdm"), "--dtype", "float16",
                        "--out", str(tmp_path), "--no-progress"], "--dtype float16", "float32", "drop --dtype")


def test_probe_reports_a_model_it_cannot_load_in_one_line(tmp_path, capsys):
    fails_with(capsys, ["probe", "--model", str(tmp_path / "nope"), "--steps", "2"], "probe: could not load")


def test_ddim_with_trailing_spacing_does_not_claim_the_law_of_diffusers_step(tmp_path, capsys):
    """diffusers' DDIM step() with "trailing" spacing jumps past the next timestep; specdiff takes the
    correct step, so the summary must not say the two samplers share a law."""
    model = tiny_pipeline(tmp_path / "model", DDIMScheduler)
    config = json.loads((model / "scheduler" / "scheduler_config.json").read_text())
    (model / "scheduler" / "scheduler_config.json").write_text(json.dumps({**config, "timestep_spacing": "trailing"}))
    argv = ["generate", "--model", str(model), "--eta", "1.0", "--num-images", "1", "--steps", "6", "--window", "2",
            "--no-progress"]
    assert main([*argv, "--out", str(tmp_path / "trailing")]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "plain loop's law differs" in text and "exactly the plain sampler's distribution" not in text
    assert json.loads((tmp_path / "trailing" / "stats.json").read_text())["same_law_as_plain"] is False
    (model / "scheduler" / "scheduler_config.json").write_text(json.dumps(config))  # "leading": the same law
    assert main([*argv, "--out", str(tmp_path / "leading")]) == 0
    assert "exactly the plain sampler's distribution" in " ".join(capsys.readouterr().out.split())


COMMANDS = ["generate", "analytic", "bench", "train-digits", "probe", "selfcheck"]


def test_the_help_test_covers_every_command():
    from specdiff.cli import build_parser

    assert sorted(build_parser()._subparsers._group_actions[0].choices) == sorted(COMMANDS)


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as err:
        main([command, "--help"])
    assert err.value.code == 0
    assert "usage:" in capsys.readouterr().out


def test_generate_help_shows_defaults_and_explains_every_option(capsys):
    from specdiff.cli import build_parser

    generate = build_parser()._subparsers._group_actions[0].choices["generate"]
    undocumented = [a.dest for a in generate._actions if not a.help]
    assert undocumented == []
    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    text = capsys.readouterr().out

    def option_help(flag):  # the help of one option, from its line to the next option's, on one line
        start = re.search(rf"\n  {re.escape(flag)}\s", text).start()
        end = text.find("\n  -", start + 1)
        return " ".join(text[start:end if end > 0 else None].split())

    expected = {"--window L": "auto", "--num-images N": "16", "--batch-size N": "16", "--steps N": "1000",
                "--drafter {picard,frozen,model}": "picard", "--seed SEED": "0",
                "--length N": "the model's positions left after the prompt; 128 without one"}
    for flag, default in expected.items():
        assert option_help(flag).endswith(f"(default: {default})"), option_help(flag)
    for flag in ("--eta", "--dtype", "--batch-size", "--device"):
        assert flag in text


def test_version(capsys):
    with pytest.raises(SystemExit) as err:
        main(["--version"])
    assert err.value.code == 0
    assert capsys.readouterr().out.startswith("specdiff 0.")


def test_analytic_demo_reports_speed_and_exactness(capsys):
    assert main(["analytic", "--steps", "200", "--samples", "300", "--window", "8", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "speedup" in printed and "same law not rejected" in printed


def test_two_processes_make_exactly_the_images_of_one(tmp_path, torchrun_generate):
    """The seeds' batches are split between processes (accelerate's PartialState, gloo on CPU);
    rank 0 gathers them: one and two processes give the same arrays, bit for bit."""
    launch, finish = torchrun_generate
    runs = {n: launch(n, "--num-images", "4", "--batch-size", "2", "--steps", "12", "--window", "4",
                      "--out", str(tmp_path / f"p{n}")) for n in (1, 2)}  # both at once: mostly start-up time
    results = {}
    for n, run in runs.items():
        assert finish(run).count("Wrote ") == 1  # only rank 0 reports
        out = tmp_path / f"p{n}"
        results[n] = json.loads((out / "stats.json").read_text()), np.load(out / "speculative.npy")
    (one, images_one), (two, images_two) = results[1], results[2]
    assert one["processes"] == 1 and two["processes"] == 2
    assert {b["process"] for b in two["speculative"]["batches"]} == {0, 1}
    np.testing.assert_array_equal(images_one, images_two)


# -- the sampler on the command line (issue 20, item 1) and the stochastic switch (item 6) -------------


def test_scheduler_by_name_runs_that_sampler_and_compares_with_its_own_plain_loop(tmp_path, capsys):
    """--scheduler euler-a on a DDPM model: with --window 1 the speculative run IS diffusers' plain loop
    of the chosen scheduler, so both arrays are the same images; stats.json says which scheduler ran."""
    model = tiny_pipeline(tmp_path / "model")
    out = tmp_path / "out"
    assert main(["generate", "--model", str(model), "--scheduler", "euler-a", "--num-images", "2", "--steps", "8",
                 "--window", "1", "--out", str(out), "--compare", "--no-progress"]) == 0
    np.testing.assert_array_equal(np.load(out / "speculative.npy"), np.load(out / "baseline.npy"))
    report = json.loads((out / "stats.json").read_text())
    assert report["scheduler"] == "EulerAncestralDiscreteScheduler" and report["scheduler_choice"] == "euler-a"
    assert "chosen with --scheduler euler-a" in " ".join(capsys.readouterr().out.split())
    # The default is the model's own scheduler, and it differs: another sampler, other images.
    assert main(["generate", "--model", str(model), "--num-images", "2", "--steps", "8", "--window", "1",
                 "--out", str(tmp_path / "own"), "--no-progress"]) == 0
    assert json.loads((tmp_path / "own" / "stats.json").read_text())["scheduler"] == "DDPMScheduler"
    assert not np.array_equal(np.load(out / "speculative.npy"), np.load(tmp_path / "own" / "speculative.npy"))


def test_scheduler_options_reach_the_scheduler(tmp_path):
    model = tiny_pipeline(tmp_path / "model")
    out = tmp_path / "out"
    assert main(["generate", "--model", str(model), "--scheduler", "dpmpp-2m-sde", "--karras-sigmas",
                 "--num-images", "1", "--steps", "6", "--window", "3", "--out", str(out), "--no-progress"]) == 0
    assert json.loads((out / "stats.json").read_text())["scheduler"] == "DPMSolverMultistepScheduler"
    from specdiff.cli import _chosen_scheduler, build_parser

    args = build_parser().parse_args(["generate", "--scheduler", "dpmpp-2m-sde", "--karras-sigmas", "--steps", "6"])
    chosen, options, _ = _chosen_scheduler(DDPMScheduler(num_train_timesteps=100), args)
    assert chosen.config.use_karras_sigmas and chosen.config.algorithm_type == "sde-dpmsolver++"
    assert chosen.config.num_train_timesteps == 100 and options == {}
    args = build_parser().parse_args(["generate", "--scheduler", "ddim", "--eta", "0.5"])
    chosen, options, _ = _chosen_scheduler(DDPMScheduler(), args)
    assert type(chosen) is DDIMScheduler and options == {"eta": 0.5}


@pytest.mark.parametrize(("argv", "expected"), [
    (["--scheduler", "k-lms"], ("--scheduler k-lms", "unknown sampler", "ddpm, ddim, euler-a, dpmpp-2m-sde")),
    (["--scheduler", "euler"], ("--scheduler euler", "deterministic", "euler-a")),
    (["--scheduler", "flow-sde"], ("flow-matching models", "DDPMScheduler", "euler-a")),
    (["--scheduler", "ddim"], ("--scheduler ddim needs --eta",)),
    (["--scheduler", "ddpm", "--karras-sigmas"], ("--karras-sigmas does not apply to --scheduler ddpm",)),
    (["--karras-sigmas"], ("--karras-sigmas", "add --scheduler NAME")),
    (["--scheduler", "euler-a", "--eta", "1.0"], ("--eta", "chosen scheduler is EulerAncestralDiscreteScheduler")),
])
def test_a_bad_sampler_choice_is_one_line_naming_the_fix(tmp_path, capsys, argv, expected):
    fails_with(capsys, ["generate", *argv, "--steps", "4", "--out", str(tmp_path), "--no-progress"], *expected)


def test_karras_sigmas_that_repeat_timesteps_are_one_line_naming_the_fix(tmp_path, capsys):
    """On the bundled model's cosine schedule, Karras sigmas map several steps to one timestep (12 steps:
    8 distinct), and diffusers' own DPM-Solver loop then runs past the end of its sigmas (IndexError) at
    every step count: --compare ended in a traceback, and without it the summary claimed the law of a
    plain loop that cannot run. Now it is one line naming the fix, before anything is sampled."""
    fails_with(capsys, ["generate", "--scheduler", "dpmpp-2m-sde", "--karras-sigmas", "--steps", "12",
                        "--out", str(tmp_path), "--no-progress"],
               "--karras-sigmas", "8 distinct timesteps for 12 steps", "drop --karras-sigmas")
    assert not any(tmp_path.iterdir())


def test_replay_with_a_window_is_one_line_naming_the_fix(tmp_path, capsys):
    """--replay runs the recorded schedule; a --window beside it was ignored, and stats.json recorded it."""
    fails_with(capsys, ["generate", "--replay", str(tmp_path / "stats.json"), "--window", "8", "--out",
                        str(tmp_path / "o"), "--no-progress"], "--replay", "drop --window 8")


def test_a_refused_deterministic_scheduler_runs_through_the_stochastic_switch(tmp_path, capsys):
    model = tiny_pipeline(tmp_path / "model", PNDMScheduler)
    argv = ["generate", "--model", str(model), "--num-images", "2", "--steps", "8", "--window", "2", "--no-progress"]
    fails_with(capsys, [*argv, "--out", str(tmp_path / "o")], "deterministic", "--stochastic")
    assert main([*argv, "--stochastic", "--out", str(tmp_path / "ok"), "--compare"]) == 0
    report = json.loads((tmp_path / "ok" / "stats.json").read_text())
    assert report["scheduler"] == "DDPMScheduler" and report["scheduler_choice"] == "stochastic"
    text = " ".join(capsys.readouterr().out.split())
    assert "stochastic sibling of PNDMScheduler" in text and "a different sampler" in text


def test_stochastic_ddim_takes_eta_one_or_the_eta_given(tmp_path):
    model = tiny_pipeline(tmp_path / "model", DDIMScheduler)
    argv = ["generate", "--model", str(model), "--num-images", "1", "--steps", "6", "--no-progress", "--stochastic"]
    assert main([*argv, "--out", str(tmp_path / "a")]) == 0
    assert "eta=1.0" in json.loads((tmp_path / "a" / "stats.json").read_text())["scheduler_note"]
    assert main([*argv, "--eta", "0.4", "--out", str(tmp_path / "b")]) == 0
    assert "eta=0.4" in json.loads((tmp_path / "b" / "stats.json").read_text())["scheduler_note"]


def test_sampler_options_on_masked_and_text_models_are_refused(tmp_path, capsys):
    fails_with(capsys, ["generate", "--model", "digits-mdm", "--scheduler", "ddpm", "--out", str(tmp_path),
                        "--no-progress"], "--scheduler", "masked-diffusion", "drop them")
    fails_with(capsys, ["generate", "--model", "text", "--stochastic", "--eta", "0.5", "--out", str(tmp_path),
                        "--no-progress"], "--stochastic, --eta", "text models", "drop them")


@pytest.mark.parametrize("flags", [["--coupling", "maximal"], ["--verify", "block"]])
def test_coupling_and_verification_reach_the_image_sampler_and_keep_window_one_plain(tmp_path, flags):
    """--coupling/--verify choose how drafted steps are kept; at --window 1 the images are the plain
    loop's (the rule is never used), and at --window 4 the run goes through the chosen rule."""
    model = tiny_pipeline(tmp_path / "model")
    common = ["generate", "--model", str(model), "--steps", "12", "--num-images", "2", "--batch-size", "2",
              "--no-progress", *flags]
    assert main([*common, "--window", "1", "--compare", "--out", str(tmp_path / "one")]) == 0
    one = np.load(tmp_path / "one" / "speculative.npy")
    assert np.array_equal(one, np.load(tmp_path / "one" / "baseline.npy"))
    assert main([*common, "--window", "4", "--out", str(tmp_path / "four")]) == 0
    assert np.load(tmp_path / "four" / "speculative.npy").shape == one.shape


def test_coupling_and_verification_flags_are_refused_for_masked_models(tmp_path, capsys):
    fails_with(capsys, ["generate", "--model", "digits-mdm", "--verify", "block", "--coupling", "maximal",
                        "--out", str(tmp_path), "--no-progress"], "--coupling, --verify block", "drop them")


# -- new-user rough edges (issue 20, item 6) ----------------------------------------------------------


def test_bundled_models_resolve_by_name_or_checkout_path_from_any_folder(tmp_path, monkeypatch):
    from specdiff.cli import resolve_model
    from specdiff.paths import asset

    monkeypatch.chdir(tmp_path)
    assert resolve_model("text") == resolve_model("assets/models/stdlib-text") == str(asset("models", "stdlib-text"))
    assert resolve_model("digits") == str(asset("models", "digits-ddpm"))
    assert resolve_model("digits-mdm") == str(asset("models", "digits-mdm"))
    (tmp_path / "text").mkdir()
    assert resolve_model("text") == "text"  # a folder here wins
    assert resolve_model("assets/models/nope") == "assets/models/nope"


def test_the_masked_model_runs_by_its_readme_path_from_another_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["generate", "--model", "assets/models/digits-mdm", "--num-images", "1", "--steps", "4",
                 "--window", "2", "--out", "o", "--no-progress"]) == 0
    assert (tmp_path / "o" / "speculative.npy").exists()


def test_a_text_model_without_the_text_extra_is_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "transformers", None)  # as if not installed: import raises ImportError
    fails_with(capsys, ["generate", "--model", "text", "--out", str(tmp_path), "--no-progress"],
               "pip install 'specdiff[text]'")


def test_a_prompt_longer_than_the_text_models_positions_is_refused(tmp_path, capsys):
    fails_with(capsys, ["generate", "--model", "text", "--prompt", "Return the ", "--length", "120", "--steps", "4",
                        "--out", str(tmp_path), "--no-progress"], "need 131 positions", "has 128",
               "--length 117 or less")
    fails_with(capsys, ["generate", "--model", "text", "--prompt", "x" * 128, "--steps", "4", "--out", str(tmp_path),
                        "--no-progress"], "128 tokens", "shorten --prompt")


def test_the_text_length_defaults_to_the_positions_left_after_the_prompt(tmp_path):
    out = tmp_path / "out"
    assert main(["generate", "--model", "text", "--prompt", "Return the ", "--steps", "4", "--window", "2",
                 "--num-images", "1", "--out", str(out), "--no-progress"]) == 0
    assert json.loads((out / "stats.json").read_text())["length"] == 117


def test_the_masked_verdict_is_against_the_cached_sampler_when_it_is_faster():
    from specdiff.cli import summary

    def run(calls, wall):
        return {"target_calls": calls, "wall_clock_s": wall}

    report = {"num_steps": 16, "num_images": 2, "batch_size": 2, "processes": 1, "device": "cpu", "drafter": "frozen",
              "window": 4, "plain": run(16, 7.0), "cached": run(10, 1.0),
              "speculative": {**run(8, 2.0), "acceptance_rate": 0.9}}
    text = " ".join(summary(report).split())
    assert "2.0x slower than the cached plain sampler" in text and "1.2x fewer network calls" in text
    report["cached"] = run(6, 3.0)  # slower than speculative, fewer calls
    text = " ".join(summary(report).split())
    assert "1.3x more network calls and was 1.5x faster than the cached plain sampler" in text
    report["cached"] = run(10, 9.0)  # the plain sampler is the fastest baseline
    assert "3.5x faster than the plain sampler" in " ".join(summary(report).split())


def test_bench_from_a_wheel_writes_under_outputs_and_needs_the_bench_extra(monkeypatch, capsys):
    from specdiff import cli
    from specdiff.workbench import bench

    seen = []
    monkeypatch.setattr(bench, "main", lambda argv: seen.append(argv) or 0)
    monkeypatch.setattr(cli, "_installed", lambda: True)
    assert main(["bench", "analytic", "--quick"]) == 0
    assert main(["bench", "analytic", "--out", "mine"]) == 0
    assert main(["bench", "report"]) == 0
    assert seen == [["analytic", "--quick", "--out", str(Path("outputs") / "bench")], ["analytic", "--out", "mine"],
                    ["report"]]
    monkeypatch.setattr(cli, "_installed", lambda: False)  # a checkout: the results stay in assets/bench
    assert main(["bench", "analytic"]) == 0 and seen[-1] == ["analytic"]
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else real(name, *a))
    fails_with(capsys, ["bench", "analytic"], "matplotlib", "pip install 'specdiff[bench]'")


def test_torch_is_not_capped():
    import tomllib

    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    for dep in deps:
        if dep.startswith(("torch", "torchvision")):
            assert "<" not in dep, dep


def test_a_default_run_that_ran_the_plain_loop_is_never_called_slower():
    """Issue 20: with the default window, a run too short (or a batch too large) for speculation to pay
    runs the plain loop: the same calls and images as the plain sampler. Its wall-clock differs from the
    plain sampler's only by timing noise, and the summary says what happened rather than "1.1x slower";
    a run within 5% of the plain sampler's time is "about as fast"."""
    from specdiff.cli import summary

    def run(calls, wall, **more):
        return {"target_calls": calls, "wall_clock_s": wall, **more}

    plain_loop = {"batches": [{"chosen_windows": [1] * 25}], "acceptance_rate": 0.0}
    report = {"num_steps": 25, "num_images": 1, "batch_size": 1, "processes": 1, "device": "cpu", "drafter": "picard",
              "window": "auto", "plain": run(25, 1.60), "speculative": run(25, 1.80, **plain_loop)}
    text = " ".join(summary(report).split())
    assert "slower" not in text and "ran the plain loop" in text and "same network calls and the same images" in text
    speculated = {"batches": [{"chosen_windows": [3, 3, 3, 2, 1]}], "acceptance_rate": 0.8}
    report["speculative"] = run(12, 1.62, **speculated)
    text = " ".join(summary(report).split())
    assert "2.1x fewer network calls and was about as fast as the plain sampler" in text and "slower" not in text
    report["speculative"] = run(12, 2.0, **speculated)  # a real loss is still said plainly
    assert "1.2x slower than the plain sampler" in " ".join(summary(report).split())


def test_a_run_that_paid_the_one_time_calibration_says_so_with_and_without_it():
    """Issue 20: the first default run of a batch size on a machine pays the automatic window's calibration,
    once (later runs reuse it). The summary gives the wall-clock ratio with it and without it, so a first
    run is never reported only as slower when the calibration, not the sampler, cost the difference."""
    from specdiff.cli import summary

    speculated = {"batches": [{"chosen_windows": [3, 3, 3, 2, 1], "calibration_seconds": 0.5}],
                  "acceptance_rate": 0.8}
    report = {"num_steps": 12, "num_images": 1, "batch_size": 1, "processes": 1, "device": "cpu", "drafter": "picard",
              "window": "auto", "plain": {"target_calls": 12, "wall_clock_s": 1.6},
              "speculative": {"target_calls": 5, "wall_clock_s": 1.9, **speculated}}
    text = " ".join(summary(report).split())
    assert "1.2x slower than the plain sampler in wall-clock time" in text
    assert "0.5 s of it was the automatic window's one-time calibration" in text
    assert "without it, 1.1x faster" in text and "later runs on this machine reuse it" in text
    speculated["batches"][0]["calibration_seconds"] = 0.0
    assert "calibration" not in " ".join(summary(report).split())
