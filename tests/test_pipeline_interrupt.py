"""``pipe._interrupt = True`` set from ``callback_on_step_end`` stops a speculative pipeline after
that round, as diffusers' loops skip the steps left once it is set: the output is the states the
run had committed (what the callback saw) and the stats of the rounds that ran; the next call runs
to the end."""

from __future__ import annotations

import pytest
import torch
from test_pipeline_max_rows import PIPELINES

STOP_AFTER = 2  # rounds


def stopper(seen):
    def callback(pipe, step_index, timestep, kwargs):
        seen.append(kwargs["latents"])
        if len(seen) == STOP_AFTER:
            pipe._interrupt = True
        return kwargs

    return callback


@pytest.mark.parametrize("name", ["ddpm", "stable-diffusion", "stable-diffusion-xl", "sd3", "flux"])
def test_interrupt_from_the_callback_stops_after_its_round(name):
    pipe, call = PIPELINES[name]()
    pipe.set_progress_bar_config(disable=True)
    call = {**call, "output_type": "pt"} if name == "ddpm" else call
    seen = []
    out = pipe(generator=torch.Generator().manual_seed(0), window=2, drafter="frozen",
               callback_on_step_end=stopper(seen), **call)
    assert len(seen) == STOP_AFTER and out.stats.rounds == STOP_AFTER
    want = seen[-1] if name != "ddpm" else (seen[-1] / 2 + 0.5).clamp(0, 1)  # the DDPM pipeline's "pt" images
    assert torch.equal(out.images, want), "the output is the committed states of the last round run"
    full = pipe(generator=torch.Generator().manual_seed(0), window=2, drafter="frozen", **call)
    assert full.stats.rounds > STOP_AFTER, "the next call starts uninterrupted"


def test_an_interrupt_after_the_last_round_ends_the_run_as_usual():
    pipe, call = PIPELINES["ddpm"]()
    pipe.set_progress_bar_config(disable=True)
    steps = call["num_inference_steps"]

    def at_the_end(pipe, step_index, timestep, kwargs):
        pipe._interrupt = bool((kwargs["steps"] == steps).all())
        return kwargs

    def run(**kwargs):  # the automatic window: its stats (window_choice) are written when the run ends
        return pipe(generator=torch.Generator().manual_seed(0), window="auto", **call, **kwargs)

    late = run(callback_on_step_end=at_the_end, callback_on_step_end_tensor_inputs=["latents", "steps"])
    full = run()
    assert torch.equal(late.images, full.images) and late.stats.rounds == full.stats.rounds
    assert (late.stats.window_choice or "").startswith("auto window"), late.stats.window_choice
