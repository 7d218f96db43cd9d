"""The ``specdiff`` command line (also ``python -m specdiff``).

  specdiff generate       generate images with the speculative sampler (the main job)
  specdiff analytic       exactness and speed on an analytic model (no files, no network)
  specdiff probe          ‖Δ‖ and acceptance per step, predicted calls and speedup per window
  specdiff bench          the benchmarks (results in assets/bench/)
  specdiff train-digits   retrain the digits DDPM, draft UNet and classifier
  specdiff selfcheck      exactness, syncs, memory and timing on this machine's device (run it first on a GPU)

``generate`` on several devices: ``accelerate launch --num_processes N -m specdiff generate ...``
splits the batches of seeds between the processes; rank 0 writes one grid and one stats file.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
import textwrap
import time
import warnings
from contextlib import contextmanager
from pathlib import Path

from .cli_support import CLIError, combine_records, loading_bars
from .cli_support import replayed_windows as _replayed
from .paths import asset

DEFAULT_MODEL = asset("models", "digits-ddpm")
DEFAULT_DRAFT = asset("models", "digits-draft")
# --model by name: the bundled models of the installed package (specdiff.assets), from any folder.
BUNDLED = {"digits": "digits-ddpm", "digits-draft": "digits-draft", "digits-mdm": "digits-mdm", "masked": "digits-mdm",
           "digits-ddpm": "digits-ddpm", "text": "stdlib-text", "stdlib-text": "stdlib-text"}
PASSTHROUGH = {"bench": "specdiff.workbench.bench", "train-digits": "specdiff.workbench.train_digits",
               "selfcheck": "specdiff.selfcheck"}
DTYPES = ("float32", "float16", "bfloat16")


# -- argument types ---------------------------------------------------------------------------


def _positive(kind):
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a positive {kind.__name__}, got {text!r}") from None
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be positive, got {text}")
        return value

    return parse


def _window(text: str):
    """A positive int, or "auto" (passed through to the sampler, which picks the window)."""
    return text if text == "auto" else _positive(int)(text)


def _eta(text: str) -> float:
    value = float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1] (1.0 = DDPM's noise level), got {text}")
    return value


# -- checks that need the environment ---------------------------------------------------------


def _writable(folder: Path) -> Path:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / ".specdiff-write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as err:
        raise CLIError(f"cannot write to output folder {folder} ({err.strerror}); pass --out to a writable folder")
    return folder


def _device(name: str, state):
    """``--device`` as a torch.device that exists here (``auto``: the accelerate process's device)."""
    import torch

    if name == "auto":
        return state.device
    try:
        device = torch.device(name)
    except RuntimeError:
        raise CLIError(f"--device {name} is not a device; use --device cpu, auto, cuda, cuda:1, mps, ...") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise CLIError(f"--device {name}: torch sees no CUDA GPU here; use --device cpu (or auto)")
        if device.index is None and state.num_processes > 1:
            device = torch.device("cuda", state.local_process_index)  # one GPU per process
        if (device.index or 0) >= torch.cuda.device_count():
            raise CLIError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) here")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise CLIError(f"--device {name}: MPS is not available here; use --device cpu (or auto)")
    elif device.type != "cpu":
        try:
            torch.empty(0, device=device)
        except Exception as err:  # any other backend torch knows by name but cannot use here
            raise CLIError(
                f"--device {name} is not usable here ({str(err).splitlines()[0]}); use --device cpu"
            ) from None
    return device


def _is_masked(model: str) -> bool:
    index = Path(model) / "model_index.json"
    return index.exists() and "MaskedDiffusion" in index.read_text()


def _missing_model(model: str) -> CLIError:
    """The error for a --model that is no folder here, with what the nearest existing folder holds."""
    path = Path(model).expanduser().absolute()
    parent = path.parent
    while not parent.exists():
        parent = parent.parent
    entries = sorted(p.name for p in parent.iterdir() if p.is_dir() and not p.name.startswith("."))[:8]
    near = f"; {parent} holds: {', '.join(entries)}" if entries else ""
    return CLIError(f"model folder {model} not found ({path} does not exist{near}); pass a diffusers pipeline folder")


def _looks_like_hub_id(model: str) -> bool:
    """``org/name``, and not a path whose first folder exists here (then it is a mistyped path)."""
    return bool(re.fullmatch(r"[\w.-]+/[\w.-]+", model)) and not model.startswith(".") and not Path(
        model.split("/")[0]
    ).is_dir()


def resolve_model(model: str) -> str:
    """``--model`` as given when it exists here; else a bundled model by name (``digits``, ``digits-mdm``,
    ``text``, ...) or by its path in a checkout (``assets/models/NAME``), found in the installed package."""
    if Path(model).expanduser().exists():
        return model
    name = model.removeprefix("./").removeprefix("assets/models/").rstrip("/")
    if name in BUNDLED:
        return str(asset("models", BUNDLED[name]))
    return model


def _check_name(name: str):
    """The sampler of ``--scheduler NAME`` (checked before anything is loaded)."""
    from .schedulers.names import sampler

    try:
        return sampler(name)
    except ValueError as err:
        raise CLIError(f"--scheduler {name}: {_first_line(err)}") from None


# The sampler's config options on the command line (config entry -> flag).
SAMPLER_FLAGS = {"use_karras_sigmas": "--karras-sigmas", "churn": "--churn"}


def _chosen_scheduler(scheduler, args):
    """The scheduler that ``--scheduler NAME`` or ``--stochastic`` asks for (default: ``scheduler``, the
    model's own), the step options to run it with (DDIM's eta) and a note on the change (or None)."""
    from .schedulers.names import config_options, scheduler_from_name, stochastic_sibling

    given = {key: value for key, value in (("use_karras_sigmas", args.karras_sigmas or None), ("churn", args.churn))
             if value is not None}
    eta = {} if args.eta is None else {"eta": args.eta}
    if args.scheduler is None:
        if given:
            raise CLIError(f"{', '.join(SAMPLER_FLAGS[k] for k in given)}: an option of a sampler chosen by name; "
                           "add --scheduler NAME")
        if not args.stochastic:
            return scheduler, eta, None
        try:
            with _quiet_diffusers():
                sibling = stochastic_sibling(scheduler, **eta)
        except ValueError as err:
            raise CLIError(f"--stochastic: {_first_line(err)}") from None
        return sibling.scheduler, sibling.options, sibling.note
    name = args.scheduler
    entry = _check_name(name)
    takes = config_options(name)
    bad = [SAMPLER_FLAGS[k] for k in given if k not in takes]
    if bad:
        options = f"; it takes {', '.join(SAMPLER_FLAGS[k] for k in takes)}" if takes else ""
        raise CLIError(f"{', '.join(bad)} does not apply to --scheduler {name} ({entry.class_name}{options})")
    if "eta" in entry.step_options and args.eta is None:
        raise CLIError(f"--scheduler {name} needs --eta in (0, 1]: at eta = 0 DDIM is deterministic, with nothing "
                       "to speculate on (--eta 1.0 is DDPM's posterior noise on the DDIM timesteps)")
    try:
        with _quiet_diffusers():
            chosen = scheduler_from_name(name, scheduler, **given)
    except ValueError as err:
        raise CLIError(f"--scheduler {name}: {_first_line(err)}") from None
    if given.get("use_karras_sigmas"):  # diffusers' loop fails on a schedule whose steps share a timestep
        trial = type(chosen).from_config(chosen.config)
        trial.set_timesteps(args.steps)
        distinct, steps = len(set(trial.timesteps.tolist())), len(trial.timesteps)
        if distinct < steps:
            raise CLIError(f"--karras-sigmas on this model's {chosen.config.get('beta_schedule', '')} noise schedule "
                           f"gives {distinct} distinct timesteps for {steps} steps, and diffusers' "
                           f"{type(chosen).__name__} cannot step through repeated ones: drop --karras-sigmas "
                           "(or use a model with a linear or scaled_linear schedule)")
    return chosen, eta, f"{type(chosen).__name__} ({entry.title}), chosen with --scheduler {name}"


@contextmanager
def _quiet_diffusers():
    """diffusers logs hub and loading warnings (several lines each) before raising; the CLI reports one line."""
    from diffusers.utils import logging

    level = logging.get_verbosity()
    logging.set_verbosity_error()
    try:
        yield
    finally:
        logging.set_verbosity(level)




def _load_from_hub(model: str, **kwargs):
    from diffusers import DiffusionPipeline

    try:
        with _quiet_diffusers():
            return DiffusionPipeline.from_pretrained(model, **kwargs)
    except Exception as err:
        text = str(err)
        offline = any(s in text for s in ("connect", "not fully cached", "outgoing traffic", "offline", "Network"))
        why = "the Hugging Face Hub cannot be reached (no network) and it is not in the local cache" if offline else (
            f"the Hugging Face Hub has no pipeline {model} ({text.splitlines()[0][:160]})"
        )
        raise CLIError(
            f"--model {model}: no folder of that name here ({Path.cwd()}), and {why}. Pass a diffusers pipeline "
            "folder (or omit --model for the bundled digits model), or run once with network access to download it"
        ) from None


# -- loading ----------------------------------------------------------------------------------


def load_image_pipeline(model: str, command: str, loaded=None, **kwargs):
    """The plain diffusers pipeline of ``--model`` (a folder or a hub id) if it is an unconditional image
    pipeline (a unet and a scheduler); anything else stops with one paragraph saying what ``command`` takes.
    ``loaded``: the pipeline, already loaded."""
    plain = loaded if loaded is not None else _load_pipeline(model, **kwargs)
    if not (hasattr(plain, "unet") and hasattr(plain, "scheduler")) or hasattr(plain, "text_encoder"):
        also = " and masked-diffusion and text models" if command == "generate" else ""
        raise CLIError(
            f"{model} is a {type(plain).__name__}; specdiff {command} takes unconditional image pipelines (a unet "
            f"and a scheduler, like DDPMPipeline){also}. A text-to-image pipeline's network needs the prompt: "
            "sample it from Python with its speculative pipeline (README, 'Use it in diffusers')"
        )
    return plain


def _load_pipeline(model: str, **kwargs):
    from diffusers import DiffusionPipeline

    local = Path(model).expanduser()
    if local.is_dir():
        if not (local / "model_index.json").exists():
            raise CLIError(f"{model} is a folder but not a diffusers pipeline (it has no model_index.json)")
        try:
            with _quiet_diffusers():
                plain = DiffusionPipeline.from_pretrained(local, **kwargs)
        except Exception as err:
            raise CLIError(f"could not load a diffusers pipeline from {model}: {_first_line(err)}") from None
    elif _looks_like_hub_id(model):
        plain = _load_from_hub(model, **kwargs)
    else:
        raise _missing_model(model)
    return plain


def _eta_hint(err: Exception) -> str:
    return "; on the command line: --eta 1.0" if "eta" in str(err) else ""


class ImageJob:
    """A DDPM-style image pipeline (unet + a supported stochastic scheduler): the speculative
    pipeline, and the plain sampler of the SAME scheduler (diffusers' step loop) to compare with."""

    kind = "image"
    baselines = ("plain",)

    def __init__(self, args, device):
        import torch

        from .pipelines import SpeculativeDDPMPipeline
        from .pipelines.speculative_utils import DTYPE_KEY

        dtype = {DTYPE_KEY: getattr(torch, args.dtype)}
        plain = load_image_pipeline(args.model, "generate", **dtype)
        scheduler, options, self.scheduler_note = _chosen_scheduler(plain.scheduler, args)
        base = type(getattr(scheduler, "base_scheduler", scheduler)).__name__
        # diffusers' DDIM step() with "trailing"/"linspace" spacing jumps past the next scheduled
        # timestep; specdiff takes the correct step there, so the plain loop's law differs.
        self.same_law = "DDIM" not in base or scheduler.config.get("timestep_spacing", "leading") == "leading"
        if args.eta is not None and "DDIM" not in base:
            whose = "this model's" if scheduler is plain.scheduler else "the chosen"
            raise CLIError(f"--eta is DDIM's noise level, but {whose} scheduler is {base}; drop --eta")
        plain.scheduler = scheduler
        options = {**options, "coupling": args.coupling, "verify": args.verify}
        try:
            self.pipe = SpeculativeDDPMPipeline.from_pipe(plain, **options)
        except (ValueError, TypeError) as err:
            raise CLIError(f"{args.model}: {_first_line(err)}{_eta_hint(err)}") from None
        self.scheduler = type(self.pipe.scheduler.base_scheduler).__name__
        trained = self.pipe.scheduler.base_scheduler.config.get("num_train_timesteps")
        if trained and args.steps > trained:
            raise CLIError(f"--steps {args.steps}: this model was trained with {trained} steps; pass --steps {trained} "
                           "or fewer")
        self.pipe.to(device)
        self.draft = {} if args.drafter == "model" else {"drafter": args.drafter}
        if args.drafter == "model":
            from diffusers import UNet2DModel

            path = _existing(args.draft_model or DEFAULT_DRAFT, "draft model")
            self.draft = {"draft_unet": UNet2DModel.from_pretrained(path, **dtype).to(device)}

    def speculative(self, seeds, args, progress):
        out = self.pipe(batch_size=len(seeds), generator=_generators(seeds), num_inference_steps=args.steps,
                        window=_replayed(args, seeds), max_rows=args.max_rows, output_type="pt", **self.draft)
        return out.images, out.stats.to_dict()

    def plain(self, name, seeds, args, progress):
        """diffusers' own loop: one network call and one ``scheduler.step`` per step."""
        import torch
        from diffusers.utils.torch_utils import randn_tensor
        from tqdm.auto import tqdm

        from .pipelines.speculative_utils import images_from_samples
        from .schedulers import PlainStepWarning

        pipe, scheduler = self.pipe, self.pipe.scheduler  # step() is the wrapped scheduler's (with its eta)
        unet, generator = pipe.unet, _generators(seeds)
        size = unet.config.sample_size
        size = (size, size) if isinstance(size, int) else tuple(size)
        scheduler.set_timesteps(args.steps)
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", PlainStepWarning)  # the plain loop is the point here
            x = randn_tensor((len(seeds), unet.config.in_channels, *size), generator=generator,
                             device=pipe._execution_device, dtype=unet.dtype) * scheduler.init_noise_sigma
            for t in tqdm(scheduler.timesteps, desc=progress, unit="step", disable=progress is None):
                noise_pred = unet(scheduler.scale_model_input(x, t), t).sample
                x = scheduler.step(noise_pred, t, x, generator=generator).prev_sample
        calls = len(scheduler.timesteps)
        return images_from_samples(x, "pt", pipe), {"target_calls": calls, "target_rows": calls * len(seeds)}

    def set_progress(self, desc):
        self.pipe.set_progress_bar_config(desc=desc, disable=desc is None)


class MaskedJob:
    """A masked (discrete) diffusion model: the plain sampler is the same pipeline with
    ``window=None``, and the cached plain sampler (MDLM's) is reported too."""

    kind = "masked"
    baselines = ("plain", "cached")

    def __init__(self, args, device):
        from .pipelines import SpeculativeMaskedDiffusionPipeline

        if args.eta is not None:
            raise CLIError("--eta is for DDIM image models; masked diffusion has no eta: drop --eta")
        _refuse_sampler_choice(args, "masked-diffusion")
        if args.dtype != "float32":
            raise CLIError(f"--dtype {args.dtype}: masked-diffusion models run in float32 here; drop --dtype")
        try:
            with _quiet_diffusers():
                self.pipe = SpeculativeMaskedDiffusionPipeline.from_pretrained(args.model).to(device)
        except Exception as err:
            raise CLIError(f"could not load the masked-diffusion model {args.model}: {_first_line(err)}") from None
        self.draft = {} if args.drafter == "model" else {"drafter": args.drafter}
        if args.drafter == "model":
            from .discrete.model import MaskedDiffusionTransformer

            path = _existing(args.draft_model or Path(args.model) / "drafter", "draft model")
            weights = path / "transformer" if (path / "transformer").is_dir() else path  # a pipeline or a model
            self.draft = {"drafter": MaskedDiffusionTransformer.from_pretrained(weights).to(device)}

    def speculative(self, seeds, args, progress):
        out = self.pipe(batch_size=len(seeds), generator=_generators(seeds), num_inference_steps=args.steps,
                        window=_replayed(args, seeds), max_rows=args.max_rows, output_type="pt", **self.draft)
        return out.images, out.stats.to_dict()

    def plain(self, name, seeds, args, progress):
        out = self.pipe(batch_size=len(seeds), generator=_generators(seeds), num_inference_steps=args.steps,
                        window=None, cache=name == "cached", output_type="pt")
        return out.images, {"target_calls": out.stats.target_calls, "target_rows": out.stats.target_rows}

    def set_progress(self, desc):
        self.pipe.set_progress_bar_config(desc=desc, disable=desc is None)


def _refuse_sampler_choice(args, kind: str) -> None:
    given = [flag for flag, value in (("--scheduler", args.scheduler), ("--stochastic", args.stochastic),
                                      ("--eta", args.eta), ("--karras-sigmas", args.karras_sigmas),
                                      ("--churn", args.churn), ("--coupling", getattr(args, "coupling", None)),
                                      ("--verify block", getattr(args, "verify", "step") == "block")) if value]
    if given:
        raise CLIError(f"{', '.join(given)}: for image models (a diffusers scheduler); {kind} models sample with "
                       "their masked-diffusion scheduler: drop them")


def _first_line(err: Exception) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0]


def _existing(path, what: str) -> Path:
    path = Path(path)
    if not path.exists():
        raise CLIError(f"{what} {path} does not exist; pass --draft-model or use --drafter frozen")
    return path


def _generators(seeds):
    """One generator per image: an image depends only on its seed (and its batch's seeds)."""
    import torch

    return [torch.Generator().manual_seed(s) for s in seeds]


def load_job(args, device):
    """The generation job for ``--model`` (the place to dispatch new model kinds)."""
    if _is_masked(args.model):
        return MaskedJob(args, device)
    return ImageJob(args, device)


# -- running and reporting --------------------------------------------------------------------


def _save_grid(images, path: Path) -> None:
    """A grid of NCHW images in [0, 1], upscaled (nearest) so that small images are visible."""
    import torch
    from torchvision.utils import make_grid, save_image

    images = torch.as_tensor(images).float().cpu()
    grid = make_grid(images, nrow=max(1, math.ceil(len(images) ** 0.5)), padding=1, pad_value=1.0)
    scale = max(1, 128 // max(images.shape[-2:]))
    save_image(torch.nn.functional.interpolate(grid[None], scale_factor=scale, mode="nearest")[0], path)


def _run(job, sampler: str, batches, args, rank_shows: bool) -> list[dict]:
    """``sampler`` on this process's batches of seeds; one record per batch."""
    records = []
    for seeds in batches:
        desc = f"{sampler} (images {seeds[0] - args.seed}-{seeds[-1] - args.seed})" if rank_shows else None
        job.set_progress(desc)
        started = time.perf_counter()
        try:
            if sampler == "speculative":
                images, stats = job.speculative(seeds, args, desc)
            else:
                images, stats = job.plain(sampler, seeds, args, desc)
        except ValueError as err:  # bad settings the pipeline refuses (window, steps, ...)
            raise CLIError(_first_line(err)) from None
        records.append({"seeds": list(seeds), "images": images.float().cpu().numpy(), "stats": stats,
                        "wall_clock_s": time.perf_counter() - started})
    return records


def _ratio_text(plain: float, spec: float, what: str, worse: str = "slower", same: str | None = None) -> str:
    if same is not None and abs(spec - plain) <= 0.05 * plain:  # within timing noise
        return same
    if spec <= plain:
        return f"{plain / spec:.1f}x {what}"
    return f"{spec / plain:.1f}x {worse}"


def summary(report: dict) -> str:
    """The table printed after a run, for someone who never heard of speculative sampling."""
    spec, steps = report["speculative"], report["num_steps"]
    names = ["plain"] + (["cached"] if "cached" in report else []) + ["speculative"]
    labels = {"plain": "plain sampler", "cached": "plain, cached", "speculative": "speculative"}
    batches = math.ceil(report["num_images"] / report["batch_size"])
    on = f"{report['processes']} processes" if report["processes"] > 1 else report["device"]
    lines = [
        (f"{report['num_images']} images, {steps} denoising steps each, in {batches} batch(es) of up to "
         f"{report['batch_size']}, on {on}."),
        "",
    ]
    width = max(len(labels[n]) for n in names) + 2
    lines.append(f"{'':<26}" + "".join(f"{labels[n]:>{width}}" for n in names))
    calls = {n: report[n]["target_calls"] if n in report else steps * math.ceil(batches / report["processes"])
             for n in names}
    lines.append(f"{'network calls (in turn)':<26}" + "".join(f"{calls[n]:>{width}}" for n in names))
    walls = {n: f"{report[n]['wall_clock_s']:.1f} s" if n in report else "(not run)" for n in names}
    lines.append(f"{'wall-clock':<26}" + "".join(f"{walls[n]:>{width}}" for n in names))
    lines.append("")
    # The verdict is against the fastest baseline that ran (the cached sampler, when it beat the plain one).
    ran = [n for n in names if n != "speculative" and n in report]
    best = min(ran, key=lambda n: report[n]["wall_clock_s"], default="plain")
    against = {"plain": "the plain sampler", "cached": "the cached plain sampler (the fastest baseline here)"}[best]
    windows = [w for batch in spec.get("batches", []) for w in batch.get("chosen_windows", [])]
    plain_loop = report["window"] == "auto" and bool(windows) and set(windows) == {1}
    calibration = sum(batch.get("calibration_seconds", 0.0) for batch in spec.get("batches", []))
    once = (f"{calibration:.1f} s of it was the automatic window's one-time calibration (later runs on this machine "
            "reuse it)")
    if plain_loop:  # the automatic window kept L = 1: the plain loop itself ran, so time differs by noise only
        verdict = ("The automatic window found no gain for this batch and step count on this machine, so the "
                   "speculative sampler ran the plain loop: the same network calls and the same images as the plain "
                   "sampler")
        if "plain" in report:
            verdict += f" (wall-clock {spec['wall_clock_s']:.1f} s against {report['plain']['wall_clock_s']:.1f} s)"
        verdict += f". {once}." if calibration > 0 else "."  # the sentence starts with the seconds
    else:
        made = _ratio_text(calls[best], spec["target_calls"], "fewer network calls", "more network calls")
        verdict = f"Speculative sampling made {made}"
        if ran:
            faster = _ratio_text(report[best]["wall_clock_s"], spec["wall_clock_s"], "faster than",
                                 "slower than", same="about as fast as")
            verdict += f" and was {faster} {against} in wall-clock time."
            if calibration > 0:  # paid once per machine, model and batch size: say what the sampler itself did
                without = _ratio_text(report[best]["wall_clock_s"], spec["wall_clock_s"] - calibration, "faster",
                                      "slower", same="about as fast")
                verdict += f" {once}; without it, {without}."
        else:
            verdict += " (add --compare to time the plain sampler on the same seeds)."
    lines.append(verdict)
    drafter = {"frozen": "reusing the network's last prediction", "picard": "reusing the network's latest "
               "predictions", "model": "with a small draft model"}.get(report["drafter"], report["drafter"])
    window = report["window"]
    if window == "auto":
        chosen = [w for batch in spec.get("batches", []) for w in batch.get("chosen_windows", [])]
        window = max(chosen, default="auto")
    lines.append(
        f"The plain sampler calls the network once per step. The speculative one guesses up to {window} "
        f"steps ahead ({drafter}), checks them all in one batched call and keeps "
        f"{100 * spec['acceptance_rate']:.0f}% of the guesses; a rejected guess is replaced by an exact draw. "
        + ("The images have exactly the plain sampler's distribution." if report.get("same_law_as_plain", True) else
           "The images have exactly the law of the correct DDIM step between scheduled timesteps; diffusers' DDIM "
           "step() with this model's timestep spacing jumps past the next timestep, so the plain loop's law differs "
           "(see the README, 'Use it in diffusers').")
    )
    if report.get("scheduler_note"):
        lines.append(f"Sampler: {report['scheduler_note']}.")
    if ran and not plain_loop and spec["wall_clock_s"] > 1.05 * report[best]["wall_clock_s"]:
        lines.append("Here a batched call costs more than the calls it saves; speculation pays on devices with "
                     "spare parallel capacity (a GPU) and with many small steps.")
    text = "\n".join(textwrap.fill(line, 100) if len(line) > 100 else line for line in lines)
    choice = next((b["window_choice"] for b in spec.get("batches", []) if b.get("window_choice")), None)
    return text + (f"\nWindow: {choice}." if choice else "")  # one line: the policy's own account


def cmd_generate(args) -> int:
    import torch
    from accelerate import PartialState

    # accelerate runs CPU processes together (gloo) only when told they are CPU processes.
    gpu = torch.cuda.is_available() or torch.backends.mps.is_available()
    state = PartialState(cpu=args.device == "cpu" or (args.device == "auto" and not gpu))
    code = _generate(args, state)
    # Every process leaves together and tears its process group down: a process that exits while the
    # group is alive can abort in gloo's teardown (seen as SIGABRT under torchrun). Errors skip this and
    # propagate, so torchrun stops the others instead of leaving them at a barrier.
    state.wait_for_everyone()
    state.destroy_process_group()
    return code


def _generate(args, state) -> int:
    import numpy as np
    from accelerate.utils import gather_object
    from diffusers.utils import logging as diffusers_logging

    from .workbench.text_cli import generate_text, is_text_model

    if getattr(args, "replay", None) and args.window != "auto":
        raise CLIError(f"--replay runs the window schedule recorded in {args.replay}: drop --window {args.window}")
    device = _device(args.device, state)
    args.model = resolve_model(args.model)
    if args.draft_model:
        args.draft_model = resolve_model(args.draft_model)
    if args.scheduler is not None:
        _check_name(args.scheduler)
    if is_text_model(args.model):
        if args.dtype != "float32":
            raise CLIError(f"--dtype {args.dtype}: text models run in float32 here; drop --dtype")
        _refuse_sampler_choice(args, "text")
        try:
            import transformers  # noqa: F401
        except ImportError:
            raise CLIError(f"{args.model} is a text model, which needs the text extra (transformers): "
                           "pip install 'specdiff[text]'") from None
        return generate_text(argparse.Namespace(**{**vars(args), "device": str(device)}), state)
    text_only = [flag for flag, value in (("--prompt", args.prompt), ("--length", args.length),
                                          ("--block-size", args.block_size)) if value is not None]
    if text_only:
        raise CLIError(f"{', '.join(text_only)}: for text models only, and {args.model} is an image or "
                       "masked-diffusion model; drop them")
    out = _writable(Path(args.out)) if state.is_main_process else Path(args.out)
    shows = state.is_main_process and not args.no_progress
    bars_were_on = diffusers_logging.is_progress_bar_enabled()
    if not shows:
        diffusers_logging.disable_progress_bar()  # "Loading pipeline components..."
    try:
        job = load_job(args, device)
        seeds = list(range(args.seed, args.seed + args.num_images))
        batches = [seeds[i:i + args.batch_size] for i in range(0, len(seeds), args.batch_size)]
        samplers = ["speculative"] + (list(job.baselines) if args.compare else [])
        with state.split_between_processes(batches) as mine:
            # Untimed warm-up (2 steps): one-time start-up costs would otherwise count against the first sampler.
            _run(job, "plain", mine[:1], argparse.Namespace(**{**vars(args), "steps": 2}), False)
            local = {name: _run(job, name, mine, args, shows) for name in samplers}
        gathered = {name: gather_object([(state.process_index, r) for r in local[name]]) for name in samplers}
    finally:
        if bars_were_on:
            diffusers_logging.enable_progress_bar()
    if not state.is_main_process:
        return 0

    window = f"replay of {args.replay}" if args.replay else args.window
    report = {"model": str(args.model), "num_steps": args.steps, "window": window, "drafter": args.drafter,
              "eta": args.eta, "dtype": args.dtype, "device": str(device), "processes": state.num_processes,
              "num_images": args.num_images, "batch_size": args.batch_size, "seeds": seeds,
              "same_law_as_plain": getattr(job, "same_law", True)}
    if job.kind == "image":
        report.update(scheduler=job.scheduler, scheduler_choice=args.scheduler or ("stochastic" if args.stochastic
                      else "model"), scheduler_note=job.scheduler_note)
    written = []
    for name in samplers:
        pairs = sorted(gathered[name], key=lambda p: p[1]["seeds"][0])
        report[name] = combine_records([r for _, r in pairs], [k for k, _ in pairs])
        images = np.concatenate([r["images"] for _, r in pairs])
        if name in ("speculative", "plain"):
            stem = "speculative" if name == "speculative" else "baseline"
            np.save(out / f"{stem}.npy", images)
            _save_grid(images, out / f"{stem}.png")
            written += [out / f"{stem}.png", out / f"{stem}.npy"]
    (out / "stats.json").write_text(json.dumps(report, indent=2))
    print(summary(report))
    print("\nWrote " + ", ".join(str(p) for p in written + [out / "stats.json"]))
    return 0


def cmd_analytic(args) -> int:
    """Exactness and speed on the analytic Gaussian-mixture DDPM (no network, no files)."""
    import torch

    from . import sample_baseline, speculative_sample
    from .testing import GaussianMixtureDDPM, two_sample_test

    chain = GaussianMixtureDDPM.random(dim=args.dim, num_steps=args.steps)
    x = chain.sample_prior(args.samples, torch.Generator().manual_seed(args.seed))
    base = sample_baseline(chain, x, torch.Generator().manual_seed(args.seed + 1))
    out = speculative_sample(chain, x, window=args.window, generator=torch.Generator().manual_seed(args.seed + 2),
                             progress=not args.no_progress)
    print(f"analytic mixture, dim {args.dim}, {args.steps} DDPM steps, window {args.window}, {args.samples} samples")
    print(f"speculative: {out.stats.summary()}")
    print(f"exactness vs plain sampler: {two_sample_test(out.sample, base)}")
    return 0


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("specdiff")
    except Exception:  # a checkout that is not installed
        from . import __version__

        return __version__


class _HelpFormatter(argparse.HelpFormatter):
    """Shows each option's default, unless it has none or its help already says it."""

    def _get_help_string(self, action):
        text = action.help or ""
        shown = action.default is not None and action.default is not False and action.default != argparse.SUPPRESS
        if shown and "default" not in text:  # (0 is shown: `0 in (None, False)` would hide it)
            text += " (default: %(default)s)"
        return text


def build_parser() -> argparse.ArgumentParser:
    formatter = _HelpFormatter
    parser = argparse.ArgumentParser(prog="specdiff", description="Exact speculative sampling for diffusion models.",
                                     epilog="Run 'specdiff COMMAND --help' for a command's options.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    gen = sub.add_parser(
        "generate", formatter_class=formatter, help="generate images with the speculative sampler",
        description="Generate images with the speculative sampler and, with --compare, with the plain sampler "
                    "on the same seeds. Writes speculative.png/.npy, stats.json (and baseline.png/.npy). On N "
                    "devices: accelerate launch --num_processes N -m specdiff generate ...",
    )
    gen.add_argument("--model", default=str(DEFAULT_MODEL), metavar="PATH",
                     help="diffusers pipeline folder, Hugging Face hub id (org/name), or a bundled model by name "
                          "(digits, digits-mdm, text); default: the bundled digits DDPM")
    gen.add_argument("--num-images", type=_positive(int), metavar="N", default=16, help="how many images")
    gen.add_argument("--batch-size", type=_positive(int), metavar="N", default=16,
                     help="images sampled together; with an integer --window an image depends only on its seed "
                          "and batch, never on the number of processes")
    gen.add_argument("--steps", type=_positive(int), metavar="N", default=1000, help="denoising steps per image")
    gen.add_argument("--window", type=_window, metavar="L", default="auto",
                     help="steps guessed ahead per network call: an integer (1 = plain sampler), or auto (chosen "
                          "before every call from the measured cost of a batch and the acceptance so far)")
    gen.add_argument("--max-rows", type=_window, metavar="N", default="auto",
                     help="the most states per network call of the speculative sampler (larger calls run as exact "
                          "micro-batches: the same images, less memory); auto: no cap on CPU, fitted to free memory "
                          "on CUDA")
    gen.add_argument("--replay", metavar="STATS_JSON", default=None,
                     help="replay the window schedule of each batch from a stats.json this command wrote: the same "
                          "images bit for bit (same model, seeds, batch size, steps and drafter), on any machine whose "
                          "network computes the same numbers (device type, dtype, kernels)")
    gen.add_argument("--drafter", choices=["picard", "frozen", "model"], default="picard",
                     help="who guesses: picard reuses the network's prediction of the same step from the last call "
                          "where there is one, else its last prediction (free); frozen only the last prediction "
                          "(free); model runs --draft-model")
    gen.add_argument("--coupling", choices=["reflection", "maximal"], default=None,
                     help="image models: how a drafted step is kept or corrected (default: reflection, or Γ-maximal "
                          "for a learned variance); the law is the same")
    gen.add_argument("--verify", choices=["step", "block"], default="step",
                     help="image models: test drafted steps one by one, or cut the window jointly (block "
                          "verification); the law is the same")
    gen.add_argument("--draft-model", default=None, metavar="PATH",
                     help="draft model folder for --drafter model (default: the bundled digits draft UNet, or the "
                          "masked model's drafter/ subfolder)")
    gen.add_argument("--dtype", choices=DTYPES, default="float32", help="precision of the networks")
    gen.add_argument("--seed", type=int, default=0, help="image i uses torch.Generator().manual_seed(seed + i)")
    gen.add_argument("--device", default="auto",
                     help="cpu, cuda, cuda:1, mps, ...; auto: the GPU if there is one (one per process under "
                          "accelerate launch), else cpu")
    gen.add_argument("--out", default="outputs/generate", metavar="FOLDER", help="output folder")
    gen.add_argument("--compare", action="store_true",
                     help="also run the plain sampler (same scheduler, same seeds) and time both")
    gen.add_argument("--no-progress", action="store_true", help="no progress bars")
    gen.add_argument("--prompt", default=None, help="text models: the text to continue (kept fixed)")
    gen.add_argument("--length", type=_positive(int), default=None, metavar="N",
                     help="text models: tokens to generate (default: the model's positions left after the prompt; "
                          "128 without one)")
    gen.add_argument("--block-size", type=_positive(int), default=None, metavar="N",
                     help="text models: generate in semi-autoregressive blocks of N tokens (default: one block)")
    add_sampler_arguments(gen)
    gen.set_defaults(func=cmd_generate)

    ana = sub.add_parser("analytic", formatter_class=formatter,
                         help="exactness and speed on the analytic Gaussian-mixture model",
                         description="Speculative vs plain sampling of a Gaussian-mixture DDPM whose exact denoiser "
                                     "is known: speedup, acceptance and a two-sample test of exactness.")
    ana.add_argument("--dim", type=_positive(int), default=2, help="data dimension")
    ana.add_argument("--steps", type=_positive(int), default=1000, help="DDPM steps")
    ana.add_argument("--window", type=_positive(int), default=16, help="steps guessed ahead per network call")
    ana.add_argument("--samples", type=_positive(int), default=2000, help="samples per sampler")
    ana.add_argument("--seed", type=int, default=0, help="random seed")
    ana.add_argument("--no-progress", action="store_true", help="no progress bar")
    ana.set_defaults(func=cmd_analytic)

    # Listed here for 'specdiff --help'; main() hands their arguments (and --help) to their own parsers.
    sub.add_parser("bench", help="run the benchmarks (results in assets/bench/); see 'specdiff bench --help'")
    sub.add_parser("train-digits",
                   help="retrain the digits DDPM, draft UNet and classifier; see 'specdiff train-digits --help'")
    sub.add_parser("selfcheck",
                   help="check exactness, syncs, memory and timing on this device; see 'specdiff selfcheck --help'")
    probe = sub.add_parser("probe", formatter_class=formatter,
                           help="predict acceptance and speedup per window from one short plain run")
    add_probe_arguments(probe).set_defaults(func=run_probe)
    return parser


def add_sampler_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Which sampler runs an image model (generate and probe): docs/cli-schedulers.md."""
    from .schedulers.names import SAMPLERS, config_options

    group = parser.add_argument_group("sampler", "which sampler runs an image model (default: the model's own "
                                      "scheduler); the names and their options: docs/cli-schedulers.md")
    choice = group.add_mutually_exclusive_group()
    choice.add_argument("--scheduler", metavar="NAME", default=None,
                        help=f"a sampler by name, built from the model's scheduler config (its noise schedule): "
                             f"{', '.join(SAMPLERS)}")
    choice.add_argument("--stochastic", action="store_true",
                        help="run the stochastic sibling of the model's deterministic scheduler (Euler -> Euler "
                             "ancestral, DPM++ 2M -> DPM++ 2M SDE, PNDM -> DDPM, DDIM -> DDIM with --eta or 1.0, flow "
                             "Euler -> stochastic sampling): a different sampler, whose images do not have the "
                             "deterministic sampler's law")
    group.add_argument("--eta", type=_eta, default=None,
                       help="DDIM's noise level in (0, 1] (DDIM only; 1.0 = DDPM's posterior noise)")
    takes = {key: [n for n in SAMPLERS if key in config_options(n)] for key in SAMPLER_FLAGS}
    group.add_argument("--karras-sigmas", action="store_true",
                       help=f"Karras sigmas (with --scheduler {' or '.join(takes['use_karras_sigmas'])})")
    group.add_argument("--churn", type=_positive(float), default=None,
                       help=f"noise level of specdiff's flow SDE (with --scheduler {' or '.join(takes['churn'])}; "
                            "default 0.5)")
    return parser


def add_probe_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--model", default=str(asset("models", "digits-ddpm")),
                        help="diffusers pipeline folder, hub id, or a bundled model by name (digits)")
    parser.add_argument("--steps", type=int, default=1000, help="denoising steps of the plain trajectory")
    parser.add_argument("--batch-size", type=int, default=1, help="trajectories probed together")
    parser.add_argument("--windows", default="1,2,4,8,16,32", help="comma-separated windows to predict")
    parser.add_argument("--every", type=int, default=1, help="probe every k-th step")
    parser.add_argument("--draft-model", default=None, help="also probe this draft UNet folder")
    parser.add_argument("--seed", type=int, default=0, help="seed of the plain trajectory")
    parser.add_argument("--json", default=None, help="write the full report here")
    return add_sampler_arguments(parser)


def run_probe(args) -> int:
    """``specdiff probe``: Δ, acceptance and predicted speedup per window for a diffusers model."""
    from diffusers import UNet2DModel

    from .schedulers import SpeculativeScheduler

    try:
        windows = tuple(int(w) for w in args.windows.split(","))
    except ValueError:
        raise SystemExit(f"specdiff probe: error: --windows must be comma-separated integers; got {args.windows!r}")
    if args.steps < 1 or args.batch_size < 1 or args.every < 1 or min(windows) < 1:
        raise SystemExit("specdiff probe: error: --steps, --batch-size, --every and every window must be positive")
    args.model = resolve_model(args.model)
    if args.scheduler is not None:
        _check_name(args.scheduler)
    try:
        with loading_bars(shown=False):
            loaded = _load_pipeline(args.model)
    except CLIError as err:
        said = (err.message if err.message.startswith("could not load")
                else f"could not load {args.model}: {err.message}")
        raise CLIError(f"probe: {said}") from None
    pipe = load_image_pipeline(args.model, "probe", loaded=loaded)
    try:
        with _quiet_diffusers():
            draft = UNet2DModel.from_pretrained(resolve_model(args.draft_model)) if args.draft_model else None
    except Exception as err:
        raise CLIError(f"probe: could not load the draft model {args.draft_model}: {_first_line(err)}") from None
    scheduler, options, note = _chosen_scheduler(pipe.scheduler, args)
    try:
        pipe.scheduler = SpeculativeScheduler.from_scheduler(scheduler, **options)
    except (ValueError, TypeError) as err:
        raise CLIError(f"probe: {args.model}: {_first_line(err)}{_eta_hint(err)}") from None
    pipe.set_progress_bar_config(disable=True)
    from .probe import probe_pipeline

    report = probe_pipeline(pipe, num_inference_steps=args.steps, batch_size=args.batch_size, seed=args.seed,
                            draft_unet=draft, windows=windows, every=args.every)
    print(f"{args.model}: {args.steps} steps, batch {args.batch_size}; predicted from one plain trajectory "
          f"(calls and rows per sample; wall-clock from the measured batch latency)")
    if note:
        print(f"Sampler: {note}.")
    print(report.table())
    best = report.best()
    print(f"best fixed window: {best['window']} ({best['wall_speedup']:.2f}x wall-clock, "
          f"{best['call_speedup']:.2f}x fewer sequential calls); window='auto' re-chooses it every round")
    if args.json:
        Path(args.json).write_text(json.dumps(report.to_dict(), indent=1))
    return 0


def _installed() -> bool:
    """True when specdiff runs from an installed wheel (its assets are not a checkout's)."""
    from .paths import checkout

    return checkout() is None


def _bench_argv(argv: list[str]) -> list[str]:
    """``specdiff bench``'s arguments: from a wheel the results go to ./outputs/bench unless --out says
    otherwise (never into the installed package); the plots need the bench extra."""
    if any(a in ("-h", "--help") for a in argv) or "report" in argv:
        return argv  # report only reads the saved results
    from importlib.util import find_spec

    missing = [name for name in ("matplotlib", "sklearn") if find_spec(name) is None]
    if missing:
        raise CLIError(f"specdiff bench needs {' and '.join(missing)} (the bench extra): pip install 'specdiff[bench]'")
    if _installed() and not any(a == "--out" or a.startswith("--out=") for a in argv):
        argv = [*argv, "--out", str(Path("outputs") / "bench")]
    return argv


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv and argv[0] in PASSTHROUGH:
            from importlib import import_module

            rest = _bench_argv(argv[1:]) if argv[0] == "bench" else argv[1:]
            status = import_module(PASSTHROUGH[argv[0]]).main(rest)
            return status if isinstance(status, int) else 0  # train-digits returns its summary
        args = build_parser().parse_args(argv)
        return args.func(args)
    except CLIError as err:
        print(f"specdiff: error: {err.message}", file=sys.stderr)
        raise


if __name__ == "__main__":
    sys.exit(main())
