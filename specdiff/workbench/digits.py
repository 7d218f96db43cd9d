"""Handwritten-digit data, a small digit classifier and sample-quality metrics.

The bundled models in ``assets/models`` are trained on scikit-learn's bundled
8x8 handwritten digits (1797 images), upsampled to 16x16.  This module holds
everything needed to load that data and to judge generated digits:

* :func:`load_digits_images` -- the images in ``[-1, 1]`` with a fixed split.
* :class:`DigitClassifier` -- a small CNN whose penultimate features feed the
  Fréchet distance and whose softmax confidence tells recognisable digits.
* :func:`frechet_distance`, :func:`digit_fd`, :func:`confident_fraction`.

scikit-learn is only needed to load the data (``pip install specdiff[train]``).
"""

from __future__ import annotations

from typing import Sequence, Tuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config

__all__ = [
    "SPLIT_SEED",
    "TEST_FRACTION",
    "load_digits_images",
    "DigitClassifier",
    "classifier_features",
    "frechet_distance",
    "digit_fd",
    "confident_fraction",
]

#: Seed of the permutation that splits the 1797 digits into train and test.
SPLIT_SEED = 0
#: Fraction of the digits held out as the test split.
TEST_FRACTION = 0.2


def load_digits_images(split: str = "train", size: int = 16) -> Tuple[torch.Tensor, torch.Tensor]:
    """Load scikit-learn's handwritten digits as images in ``[-1, 1]``.

    Args:
        split: ``"train"`` (80%), ``"test"`` (20%) or ``"all"``.  The split is a
            fixed permutation seeded with :data:`SPLIT_SEED`, so it is the same
            on every machine.
        size: side length; the 8x8 originals are resized bilinearly
            (``align_corners=False``).

    Returns:
        ``(images, labels)``: float32 images of shape ``(N, 1, size, size)`` and
        int64 labels of shape ``(N,)``.
    """
    if split not in ("train", "test", "all"):
        raise ValueError(f"split must be 'train', 'test' or 'all', got {split!r}")
    try:
        from sklearn.datasets import load_digits
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(
            "load_digits_images needs scikit-learn; install it with `pip install specdiff[train]`"
        ) from err

    data = load_digits()
    images = torch.as_tensor(data.images, dtype=torch.float32).unsqueeze(1)  # (N,1,8,8), 0..16
    labels = torch.as_tensor(data.target, dtype=torch.int64)
    images = images / 8.0 - 1.0  # 0..16 -> [-1, 1]
    if size != images.shape[-1]:
        images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
    images = images.clamp(-1.0, 1.0)

    if split != "all":
        perm = torch.randperm(len(images), generator=torch.Generator().manual_seed(SPLIT_SEED))
        n_test = int(round(TEST_FRACTION * len(images)))
        idx = perm[:n_test] if split == "test" else perm[n_test:]
        idx = idx.sort().values
        images, labels = images[idx], labels[idx]
    return images.contiguous(), labels


class DigitClassifier(ModelMixin, ConfigMixin):
    """Small CNN for 1x16x16 digits in ``[-1, 1]``.

    Two conv stages (16x16 -> 8x8 -> 4x4), then a fully connected layer to a
    ``feature_dim``-dimensional feature vector (:meth:`features`) and a linear
    head to ``num_classes`` logits (:meth:`forward`).

    Saved and loaded like any diffusers model::

        clf.save_pretrained("digits-classifier")   # config.json + diffusion_pytorch_model.safetensors
        clf = DigitClassifier.from_pretrained("digits-classifier")
    """

    @register_to_config
    def __init__(
        self,
        in_channels: int = 1,
        sample_size: int = 16,
        channels: Sequence[int] = (32, 64),
        feature_dim: int = 64,
        num_classes: int = 10,
        dropout: float = 0.3,
    ):
        super().__init__()
        c1, c2 = channels
        self.conv = nn.Sequential(
            nn.Conv2d(in_channels, c1, 3, padding=1),
            nn.GroupNorm(8, c1),
            nn.SiLU(),
            nn.Conv2d(c1, c1, 3, padding=1),
            nn.GroupNorm(8, c1),
            nn.SiLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(c1, c2, 3, padding=1),
            nn.GroupNorm(8, c2),
            nn.SiLU(),
            nn.Conv2d(c2, c2, 3, padding=1),
            nn.GroupNorm(8, c2),
            nn.SiLU(),
            nn.MaxPool2d(2),
        )
        spatial = sample_size // 4
        self.fc = nn.Sequential(
            nn.Flatten(),
            nn.Dropout(dropout),
            nn.Linear(c2 * spatial * spatial, feature_dim),
            nn.SiLU(),
        )
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(feature_dim, num_classes))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate features, shape ``(N, feature_dim)``."""
        return self.fc(self.conv(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits, shape ``(N, num_classes)``."""
        return self.head(self.features(x))


def _batched(classifier: nn.Module, fn, images: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Apply ``fn`` to ``images`` in eval mode, without grad, batch by batch."""
    param = next(classifier.parameters())
    was_training = classifier.training
    classifier.eval()
    out = []
    try:
        with torch.no_grad():
            for start in range(0, len(images), batch_size):
                batch = images[start : start + batch_size].to(device=param.device, dtype=param.dtype)
                out.append(fn(batch).float().cpu())
    finally:
        classifier.train(was_training)
    return torch.cat(out)


def classifier_features(classifier: DigitClassifier, images: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    """Penultimate classifier features of ``images`` (eval mode, no grad), on CPU."""
    return _batched(classifier, classifier.features, images, batch_size)


def frechet_distance(feats_a, feats_b) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets.

    ``FD = |mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a S_b)^(1/2))`` with sample
    means and (unbiased) covariances of the rows of ``feats_a`` and ``feats_b``
    (arrays or tensors of shape ``(N, D)``).

    The matrix square-root term is computed as ``tr((A S_b A)^(1/2))`` with
    ``A = S_a^(1/2)``, which is a symmetric PSD matrix, so only symmetric
    eigen-decompositions are needed and no imaginary parts can appear;
    tiny negative eigenvalues from round-off are clipped to zero.
    """
    a = _as_float64(feats_a)
    b = _as_float64(feats_b)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"feature sets must be (N, D) with equal D, got {a.shape} and {b.shape}")
    if len(a) < 2 or len(b) < 2:
        raise ValueError("each feature set needs at least two rows")
    mu_a, mu_b = a.mean(axis=0), b.mean(axis=0)
    cov_a = np.cov(a, rowvar=False).reshape(a.shape[1], a.shape[1])
    cov_b = np.cov(b, rowvar=False).reshape(b.shape[1], b.shape[1])

    sqrt_a = _psd_sqrt(cov_a)
    middle = sqrt_a @ cov_b @ sqrt_a
    eig = np.linalg.eigvalsh((middle + middle.T) / 2.0)
    tr_covmean = np.sqrt(np.clip(eig, 0.0, None)).sum()

    diff = mu_a - mu_b
    fd = diff @ diff + np.trace(cov_a) + np.trace(cov_b) - 2.0 * tr_covmean
    return float(max(fd, 0.0))


def digit_fd(
    classifier: DigitClassifier, images_a: torch.Tensor, images_b: torch.Tensor, batch_size: int = 512
) -> float:
    """Fréchet distance between two image sets in the classifier's feature space."""
    return frechet_distance(
        classifier_features(classifier, images_a, batch_size),
        classifier_features(classifier, images_b, batch_size),
    )


def confident_fraction(
    classifier: DigitClassifier, images: torch.Tensor, threshold: float = 0.9, batch_size: int = 512
) -> float:
    """Fraction of ``images`` whose largest softmax probability is at least ``threshold``."""
    logits = _batched(classifier, classifier, images, batch_size)
    conf = logits.softmax(dim=-1).max(dim=-1).values
    return float((conf >= threshold).float().mean())


def _as_float64(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().double().numpy()
    return np.asarray(x, dtype=np.float64)


def _psd_sqrt(mat: np.ndarray) -> np.ndarray:
    """Square root of a symmetric positive semi-definite matrix."""
    eig, vec = np.linalg.eigh((mat + mat.T) / 2.0)
    return (vec * np.sqrt(np.clip(eig, 0.0, None))) @ vec.T
