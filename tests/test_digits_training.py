"""Tests for the bundled digit models: data, metrics, training script, shipped classifier."""

from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("sklearn")

from diffusers import DDPMPipeline, UNet2DModel  # noqa: E402

from specdiff.workbench import train_digits as train  # noqa: E402
from specdiff.workbench.digits import (  # noqa: E402
    DigitClassifier,
    confident_fraction,
    frechet_distance,
    load_digits_images,
)

SHIPPED_CLASSIFIER = Path(__file__).resolve().parents[1] / "assets" / "models" / "digits-classifier"


def test_digit_splits_are_disjoint_deterministic_and_in_range():
    x_train, y_train = load_digits_images("train")
    x_test, y_test = load_digits_images("test")
    x_all, _ = load_digits_images("all")
    assert x_train.shape[1:] == (1, 16, 16) and x_test.shape[1:] == (1, 16, 16)
    assert len(x_train) + len(x_test) == len(x_all) == 1797
    assert abs(len(x_test) / len(x_all) - 0.2) < 0.01
    assert x_all.min() >= -1.0 and x_all.max() <= 1.0
    assert set(y_test.tolist()) == set(range(10))
    # no test image also appears in the train split
    train_rows = {tuple(r) for r in x_train.flatten(1).numpy().round(5).tolist()}
    overlap = sum(tuple(r) in train_rows for r in x_test.flatten(1).numpy().round(5).tolist())
    assert overlap <= 2  # sklearn's digits hold a couple of exact duplicates
    x_again, y_again = load_digits_images("test")
    assert torch.equal(x_again, x_test) and torch.equal(y_again, y_test)


def test_frechet_distance_is_zero_for_identical_feature_sets():
    feats = torch.randn(500, 8, generator=torch.Generator().manual_seed(0))
    assert frechet_distance(feats, feats) == pytest.approx(0.0, abs=1e-8)


def test_frechet_distance_matches_closed_form_for_mean_shifted_identity_gaussians():
    # Same whitened samples (identity sample covariance) shifted by mu: FD = |mu|^2 exactly.
    rng = np.random.default_rng(0)
    z = rng.standard_normal((2000, 4))
    z -= z.mean(axis=0)
    # whiten so that the (unbiased) sample covariance is exactly the identity
    cov = np.cov(z, rowvar=False)
    eig, vec = np.linalg.eigh(cov)
    z = z @ vec @ np.diag(eig**-0.5) @ vec.T
    previous = 0.0
    for scale in (0.5, 1.0, 2.0):
        mu = scale * np.array([1.0, -2.0, 0.5, 0.0])
        fd = frechet_distance(z, z + mu)
        assert fd == pytest.approx(float(mu @ mu), rel=1e-6)
        assert fd > previous
        previous = fd


def test_frechet_distance_approaches_closed_form_for_independent_gaussian_samples():
    g = torch.Generator().manual_seed(1)
    a = torch.randn(20000, 3, generator=g)
    b = torch.randn(20000, 3, generator=g) + torch.tensor([1.0, 0.0, -1.0])
    assert frechet_distance(a, b) == pytest.approx(2.0, abs=0.05)


def test_confident_fraction_counts_images_above_threshold():
    class Fixed(DigitClassifier):
        def forward(self, x):  # confident on the first half of the batch only
            logits = torch.zeros(len(x), 10)
            logits[: len(x) // 2, 3] = 20.0
            return logits

    clf = Fixed()
    images = torch.zeros(8, 1, 16, 16)
    assert confident_fraction(clf, images, threshold=0.9, batch_size=8) == pytest.approx(0.5)


def test_train_smoke_run_saves_loadable_diffusers_folders(tmp_path):
    out = tmp_path / "models"
    summary = train.main(
        ["--out", str(out), "--iters", "3", "--seed", "0", "--threads", "1",
         "--eval-samples", "0", "--metric-repeats", "1"]
    )
    assert summary["ddpm"]["iters"] == summary["draft"]["iters"] == summary["classifier"]["iters"] == 3
    assert (out / "README.md").exists() and (out / "training_summary.json").exists()

    pipe = DDPMPipeline.from_pretrained(out / "digits-ddpm")
    pipe.set_progress_bar_config(disable=True)
    images = pipe(batch_size=2, num_inference_steps=2, generator=torch.Generator().manual_seed(0),
                  output_type="np").images
    assert images.shape == (2, 16, 16, 1) and np.isfinite(images).all()

    draft = UNet2DModel.from_pretrained(out / "digits-draft")
    assert draft.config.sample_size == 16
    big_params = sum(p.numel() for p in pipe.unet.parameters())
    draft_params = sum(p.numel() for p in draft.parameters())
    assert big_params >= 5 * draft_params
    with torch.no_grad():
        eps = draft(torch.randn(2, 1, 16, 16), torch.tensor([10, 500])).sample
    assert eps.shape == (2, 1, 16, 16)

    clf = DigitClassifier.from_pretrained(out / "digits-classifier")
    logits = clf(torch.zeros(3, 1, 16, 16))
    assert logits.shape == (3, 10) and clf.features(torch.zeros(3, 1, 16, 16)).shape == (3, 64)

    # resuming the ddpm stage adds iterations; --only eval samples and scores the pipeline
    quick = ["--out", str(out), "--iters", "1", "--metric-repeats", "1"]
    summary = train.main([*quick, "--only", "ddpm", "--resume", "--eval-samples", "0"])
    assert summary["ddpm"]["iters"] == 4 and len(summary["ddpm"]["phases"]) == 2
    summary = train.main([*quick, "--only", "eval", "--eval-samples", "3", "--eval-steps", "2"])
    assert 0.0 <= summary["eval"]["confident_fraction_0.9"] <= 1.0
    assert summary["eval"]["digit_fd_vs_test"] >= 0.0
    assert len(summary["commands"]) == 3


def test_train_only_stage_reproduces_the_same_weights(tmp_path):
    args = ["--iters", "2", "--seed", "3", "--eval-samples", "0", "--metric-repeats", "1", "--only", "classifier"]
    train.main(["--out", str(tmp_path / "a"), *args])
    train.main(["--out", str(tmp_path / "b"), *args])
    a = DigitClassifier.from_pretrained(tmp_path / "a" / "digits-classifier")
    b = DigitClassifier.from_pretrained(tmp_path / "b" / "digits-classifier")
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)


@pytest.mark.skipif(not SHIPPED_CLASSIFIER.exists(), reason="no shipped classifier in assets/models")
def test_shipped_classifier_reaches_97_percent_on_test_split():
    clf = DigitClassifier.from_pretrained(SHIPPED_CLASSIFIER).eval()
    x_test, y_test = load_digits_images("test")
    with torch.no_grad():
        accuracy = (clf(x_test).argmax(-1) == y_test).float().mean().item()
    assert accuracy >= 0.97
