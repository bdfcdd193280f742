"""Fréchet Inception Distance (Heusel et al. 2017): FID between generated and real images, rFID between
reconstructions and their originals.

The features are those of the standard TF-FID InceptionV3 (2015-12-05 weights) as re-implemented bit-exactly in
PyTorch by torch-fidelity, so values are comparable with published numbers (kl-f8: rFID 0.90 on ImageNet val) when
computed on enough images: FID is biased upwards at small sample sizes, which is why every result carries its n.

The weights file is resolved in one place, :func:`load_inception`, through :mod:`ldm_core.pretrained` (entry
``inception_fid``): when it is absent the metric is "not computed" with the exact file name and directory.
"""

from __future__ import annotations

import numpy as np
import scipy.linalg
import torch

from ldm_core import pretrained
from ldm_core.evaluation.metrics import MetricResult
from ldm_core.pretrained import MissingPretrainedWeights

# The pool3 features of InceptionV3 are what FID is defined on; the smaller taps ('64', '192', '768') exist for
# quick checks and are labelled as such in the result's note.
FEATURE_DIMS = (64, 192, 768, 2048)
DEFAULT_FEATURE_DIM = 2048
WEIGHTS_NAME = "inception_fid"


class FIDUnavailable(RuntimeError):
    """FID cannot be computed here (the weights file or the torch-fidelity package is missing)."""


# Frechet distance ----------------------------------------------------------------------------------------------------


def feature_statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mean (D,), covariance (D, D)) of (N, D) features, in float64 (N − 1 in the denominator)."""
    f = np.asarray(features, dtype=np.float64)
    if f.ndim != 2 or len(f) < 2:
        raise ValueError(f"need at least 2 feature vectors of shape (N, D), got {f.shape}")
    return f.mean(axis=0), np.cov(f, rowvar=False)


def frechet_distance(
    mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray, eps: float = 1e-6
) -> float:
    """Squared Wasserstein-2 distance between N(mu1, sigma1) and N(mu2, sigma2):

        ‖mu1 − mu2‖² + tr(sigma1) + tr(sigma2) − 2·tr((sigma1·sigma2)^½)

    The square root is scipy's ``sqrtm`` (as in the reference FID code). Covariances estimated from fewer samples
    than dimensions are singular; if that makes the root non-finite, ``eps`` is added to both diagonals. The tiny
    imaginary parts that rounding leaves in the root are dropped (they cancel in the trace).
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != (mu1.size, mu1.size):
        raise ValueError(f"shapes disagree: mu {mu1.shape}/{mu2.shape}, sigma {sigma1.shape}/{sigma2.shape}")
    diff = mu1 - mu2
    covmean = scipy.linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
        offset = np.eye(len(mu1)) * eps
        covmean = scipy.linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    tr_covmean = float(np.trace(covmean).real)
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * tr_covmean)


# Inception features --------------------------------------------------------------------------------------------------


class InceptionFeatures:
    """The FID InceptionV3 as a function from uint8 images (N, H, W, 3), any size, to features (N, D).

    torch-fidelity resizes to 299×299 inside the network with TF1's bilinear interpolation, as the original FID did.
    """

    def __init__(self, network: torch.nn.Module, feature_dim: int, device: torch.device, weights_path: str):
        self.network, self.feature_dim, self.device, self.weights_path = network, feature_dim, device, weights_path

    @torch.inference_mode()
    def __call__(self, images: np.ndarray, batch_size: int = 32) -> np.ndarray:
        x = np.asarray(images)
        if x.dtype != np.uint8 or x.ndim != 4 or x.shape[-1] != 3:
            raise ValueError(f"expected uint8 images (N, H, W, 3), got {x.dtype} {x.shape}")
        out = []
        for start in range(0, len(x), batch_size):
            chunk = torch.from_numpy(x[start : start + batch_size]).permute(0, 3, 1, 2).to(self.device)  # (b, 3, H, W)
            (features,) = self.network(chunk)  # (b, D)
            out.append(features.double().cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, self.feature_dim))


def load_inception(
    feature_dim: int = DEFAULT_FEATURE_DIM, download: bool = True, device: str | torch.device = "cpu"
) -> InceptionFeatures:
    """Build the FID InceptionV3 from the registry's weights file (the one place it is resolved).

    Raises :class:`MissingPretrainedWeights` (file name, directory, URL) when the file is absent and cannot be
    downloaded, :class:`FIDUnavailable` when torch-fidelity is not installed.
    """
    if feature_dim not in FEATURE_DIMS:
        raise ValueError(f"feature_dim must be one of {FEATURE_DIMS}, got {feature_dim}")
    path = pretrained.resolve(WEIGHTS_NAME, download=download)
    try:
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
    except ImportError as e:
        raise FIDUnavailable(f"FID needs the 'torch-fidelity' package (pip install torch-fidelity): {e}") from e
    # Given a path, the constructor loads exactly that file (strictly: every tensor must be there) and never
    # downloads; it also freezes the network and puts it in eval mode.
    network = FeatureExtractorInceptionV3(
        "inception-v3-compat", [str(feature_dim)], feature_extractor_weights_path=str(path)
    )
    device = torch.device(device)
    return InceptionFeatures(network.to(device), feature_dim, device, str(path))


def inception_or_reason(
    feature_dim: int = DEFAULT_FEATURE_DIM, download: bool = True, device: str | torch.device = "cpu"
) -> tuple[InceptionFeatures | None, str | None]:
    """(the network, None), or (None, why not): for callers that compute several FIDs and load once."""
    try:
        return load_inception(feature_dim, download, device), None
    except (MissingPretrainedWeights, FIDUnavailable) as e:
        return None, str(e)


def frechet_inception_distance(
    real: np.ndarray,
    fake: np.ndarray,
    *,
    name: str = "fid",
    inception: InceptionFeatures | None = None,
    unavailable_reason: str | None = None,
    feature_dim: int = DEFAULT_FEATURE_DIM,
    download: bool = True,
    device: str | torch.device = "cpu",
) -> MetricResult:
    """FID between two image sets (uint8 (N, H, W, 3)); ``name="rfid"`` for originals vs reconstructions.

    Pass ``inception`` to reuse a loaded network, or ``unavailable_reason`` (from :func:`inception_or_reason`) to
    report it as not computed without trying again. ``n`` is the smaller of the two set sizes.
    """
    n = min(len(real), len(fake))
    if inception is None:
        if unavailable_reason is None:
            inception, unavailable_reason = inception_or_reason(feature_dim, download, device)
        if inception is None:
            return MetricResult.not_computed(name, unavailable_reason)
    if n < 2:
        return MetricResult.not_computed(name, f"needs at least 2 images per set, got {len(real)} and {len(fake)}")
    mu1, sigma1 = feature_statistics(inception(real))
    mu2, sigma2 = feature_statistics(inception(fake))
    note = f"InceptionV3 {inception.feature_dim}-d features" + (
        "" if inception.feature_dim == DEFAULT_FEATURE_DIM else " (not the standard 2048-d pool3: not comparable)"
    )
    if n < inception.feature_dim:
        note += f"; n={n} < {inception.feature_dim} dims: biased upwards, compare only at equal n"
    # a Fréchet distance is ≥ 0; rounding in the matrix root can leave −1e−10 for identical sets
    return MetricResult(name, max(0.0, frechet_distance(mu1, sigma1, mu2, sigma2)), n, note=note)


__all__ = [
    "DEFAULT_FEATURE_DIM",
    "FEATURE_DIMS",
    "FIDUnavailable",
    "InceptionFeatures",
    "feature_statistics",
    "frechet_distance",
    "frechet_inception_distance",
    "inception_or_reason",
    "load_inception",
]
