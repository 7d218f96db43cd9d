"""SpeculativeMaskedDiffusionPipeline on a tiny random transformer, the training script and
the benchmark on tiny configurations, and the bundled digits model."""

import json
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch

from specdiff.discrete import MaskedDiffusionScheduler
from specdiff.discrete.model import MaskedDiffusionTransformer
from specdiff.pipelines.pipeline_speculative_masked_diffusion import SpeculativeMaskedDiffusionPipeline
from specdiff.stats import SpeculativeStats

BUNDLED = Path(__file__).resolve().parents[1] / "assets" / "models" / "digits-mdm"


def tiny_pipeline(seed=0):
    torch.manual_seed(seed)
    transformer = MaskedDiffusionTransformer(
        vocab_size=4, sample_size=4, hidden_size=16, num_layers=1, num_heads=2
    ).eval()
    pipe = SpeculativeMaskedDiffusionPipeline(transformer, MaskedDiffusionScheduler(vocab_size=4))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_window_one_equals_the_plain_scheduler_loop():
    pipe = tiny_pipeline()
    kw = {"batch_size": 3, "num_inference_steps": 12, "output_type": "latent"}
    plain = pipe(window=None, generator=torch.Generator().manual_seed(0), **kw)
    cached = pipe(window=None, cache=True, generator=torch.Generator().manual_seed(0), **kw)
    spec = pipe(window=1, generator=torch.Generator().manual_seed(0), **kw)
    assert torch.equal(plain.sequences, spec.sequences) and torch.equal(plain.sequences, cached.sequences)
    assert isinstance(spec.stats, SpeculativeStats) and isinstance(plain.stats, SpeculativeStats)
    assert plain.stats.target_calls == 12 and cached.stats.target_rows <= plain.stats.target_rows


def test_outputs_types_tuple_and_model_drafter():
    pipe = tiny_pipeline()
    out = pipe(batch_size=2, num_inference_steps=8, window=4, generator=torch.Generator().manual_seed(1))
    assert len(out.images) == 2 and isinstance(out.images[0], PIL.Image.Image) and out.images[0].size == (4, 4)
    assert out.sequences.shape == (2, 16) and (out.sequences < 4).all()
    arr = pipe(batch_size=2, num_inference_steps=8, output_type="np", generator=torch.Generator().manual_seed(1)).images
    assert isinstance(arr, np.ndarray) and arr.shape == (2, 4, 4, 1) and 0 <= arr.min() and arr.max() <= 1
    images, sequences, stats = pipe(batch_size=2, num_inference_steps=8, output_type="pt", return_dict=False)
    assert images.shape == (2, 1, 4, 4) and sequences.shape == (2, 16) and stats.num_steps == 8
    torch.manual_seed(5)
    small = MaskedDiffusionTransformer(vocab_size=4, sample_size=4, hidden_size=8, num_layers=1, num_heads=1).eval()
    drafted = pipe(batch_size=2, num_inference_steps=8, window=4, drafter=small, output_type="latent")
    assert drafted.stats.draft_calls > 0


def test_progress_bar_can_be_disabled(capsys):
    pipe = tiny_pipeline()
    pipe(batch_size=1, num_inference_steps=5, window=2, output_type="latent")
    pipe(batch_size=1, num_inference_steps=5, window=None, output_type="latent")
    assert capsys.readouterr().err == ""
    pipe.set_progress_bar_config(disable=False)
    pipe(batch_size=1, num_inference_steps=5, window=2, output_type="latent")
    assert "5/5" in capsys.readouterr().err  # the enabled bar counts committed steps


def test_generator_list_makes_samples_batch_independent_and_save_load_round_trips(tmp_path):
    pipe = tiny_pipeline()

    def gens():
        return [torch.Generator().manual_seed(s) for s in (3, 4, 5)]

    batch = pipe(batch_size=3, num_inference_steps=10, window=4, generator=gens(), output_type="latent").sequences
    alone = pipe(
        batch_size=1,
        num_inference_steps=10,
        window=4,
        generator=[torch.Generator().manual_seed(4)],
        output_type="latent",
    )
    assert torch.equal(alone.sequences[0], batch[1])
    pipe.save_pretrained(tmp_path)
    loaded = SpeculativeMaskedDiffusionPipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    again = loaded(batch_size=3, num_inference_steps=10, window=4, generator=gens(), output_type="latent").sequences
    assert torch.equal(again, batch)


def test_training_script_and_benchmark_run_on_a_tiny_config(tmp_path):
    from specdiff.workbench import bench_discrete as bench
    from specdiff.workbench import train_mdm as train

    result = train.main(
        [
            "--out",
            str(tmp_path / "m"),
            "--iterations",
            "2",
            "--batch-size",
            "8",
            "--hidden-size",
            "16",
            "--num-layers",
            "1",
            "--num-heads",
            "2",
            "--levels",
            "4",
            "--log-every",
            "1",
        ]
    )
    assert result["iterations"] == 2 and np.isfinite(result["test_elbo_nats_per_token"])
    pipe = SpeculativeMaskedDiffusionPipeline.from_pretrained(tmp_path / "m")
    assert pipe.scheduler.config.vocab_size == 4
    out = tmp_path / "bench.json"
    bench.main(
        [
            "--model",
            str(tmp_path / "m"),
            "--steps",
            "6",
            "--windows",
            "3",
            "--num-samples",
            "8",
            "--batch-size",
            "4",
            "--latency-samples",
            "1",
            "--out",
            str(out),
        ]
    )
    record = json.loads(out.read_text())
    spec = next(r for r in record["runs"] if r["sampler"] == "speculative")
    assert {"target_calls_per_sample", "speedup_calls_vs_cached", "same_law_as_plain"} <= set(spec)
    assert out.with_suffix(".png").exists()


def looks_like_digits(images) -> tuple[bool, str]:
    """The bundled digit classifier's verdict on 8x8 grey images in [0, 1] (N, 8, 8, 1): at least
    half classified with probability >= 0.9, over at least 6 different classes. Measured on 32
    samples of the bundled model (64 steps): 72% confident, 10 classes; on the same pixels
    shuffled 22%, on uniform grey levels 22%, on the samples rotated 90 degrees 88% but all "4"."""
    import torch.nn.functional as F

    from specdiff.workbench.digits import DigitClassifier

    classifier = DigitClassifier.from_pretrained(BUNDLED.parent / "digits-classifier").eval()
    x = torch.as_tensor(np.asarray(images), dtype=torch.float32).permute(0, 3, 1, 2)
    x = F.interpolate(x * 2 - 1, size=16, mode="bilinear", align_corners=False)  # as the classifier was trained
    with torch.no_grad():
        probs = classifier(x).softmax(1)
    confident = probs.max(1).values >= 0.9
    classes = probs.argmax(1)[confident].unique().numel()
    verdict = confident.double().mean().item() >= 0.5 and classes >= 6
    return verdict, f"{confident.double().mean().item():.0%} confident, {classes} classes"


@pytest.mark.skipif(not (BUNDLED / "model_index.json").exists(), reason="bundled model not trained yet")
def test_bundled_digits_model_loads_and_samples_digits():
    pipe = SpeculativeMaskedDiffusionPipeline.from_pretrained(BUNDLED)
    pipe.set_progress_bar_config(disable=True)
    n = 32
    out = pipe(batch_size=n, num_inference_steps=64, window=4, output_type="np",
               generator=[torch.Generator().manual_seed(i) for i in range(n)])
    assert out.images.shape == (n, 8, 8, 1)
    assert (out.sequences < pipe.scheduler.config.vocab_size).all()
    ok, why = looks_like_digits(out.images)
    assert ok, f"the samples do not look like digits to the bundled classifier: {why}"
    # The check can fail: the same pixels in a shuffled order, or rotated a quarter turn, are refused.
    shuffled = out.images.reshape(n, 64, 1)[:, np.random.default_rng(0).permutation(64)].reshape(n, 8, 8, 1)
    assert not looks_like_digits(shuffled)[0]
    assert not looks_like_digits(np.rot90(out.images, axes=(1, 2)).copy())[0]


def test_the_bench_command_hands_the_discrete_benchmark_a_file_and_its_quick_flag(tmp_path, monkeypatch):
    """`python -m specdiff.workbench.bench discrete [--quick]` (and `make bench`) must reach a run
    of bench_discrete that parses its arguments and writes a file, not the results folder."""
    from specdiff.workbench import bench, bench_discrete

    seen = []
    monkeypatch.setattr(bench_discrete, "main", lambda argv: seen.append(bench_discrete.parse_args(argv)))
    assert bench.main(["discrete", "--quick", "--out", str(tmp_path)]) == 0
    (args,) = seen
    assert args.quick and args.out == tmp_path / "discrete.json"
    assert bench_discrete.parse_args([]).model.is_dir()  # the bundled model, wherever the command runs from


def test_the_default_window_is_automatic_and_cache_with_a_window_is_refused():
    pipe = tiny_pipeline()
    out = pipe(batch_size=2, num_inference_steps=16, output_type="latent", generator=torch.Generator().manual_seed(3))
    assert out.stats.window_choice.startswith("auto window")  # the fast setting is the default
    again = pipe(batch_size=2, num_inference_steps=16, output_type="latent", generator=torch.Generator().manual_seed(3))
    assert torch.equal(out.sequences, again.sequences)  # and reproducible from the seed
    with pytest.raises(ValueError, match="pass window=None"):
        pipe(batch_size=1, num_inference_steps=4, cache=True)


def test_the_plain_loop_hands_its_callback_a_copy_of_the_state():
    pipe = tiny_pipeline()
    kw = {"batch_size": 2, "num_inference_steps": 10, "window": None, "output_type": "latent"}
    plain = pipe(generator=torch.Generator().manual_seed(4), **kw)
    meddled = pipe(generator=torch.Generator().manual_seed(4), callback=lambda d: d["x"].fill_(0), **kw)
    assert torch.equal(plain.sequences, meddled.sequences)
