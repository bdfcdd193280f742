"""FID: the Fréchet distance against closed forms and independent computations, and the Inception weights path —
present (a randomly initialised InceptionV3 the test saves under the registry's file name in a temporary TORCH_HOME)
and absent (not computed, naming the file and the directory)."""

import sys

import numpy as np
import pytest
import torch

from ldm_core import pretrained
from ldm_core.evaluation import fid as fid_module
from ldm_core.evaluation.fid import (
    feature_statistics,
    frechet_distance,
    frechet_inception_distance,
    inception_or_reason,
    load_inception,
)
from tests.core.torch_home import use_torch_home

# The 64-d tap right after the stem: the same network, file and code path as the 2048-d pool3 features, but the
# forward pass stops early and the matrix root is 64×64, so the test stays fast on 2 CPU cores.
TEST_FEATURE_DIM = 64


def eig_frechet(mu1, s1, mu2, s2):
    """Independent reference: tr((Σ1Σ2)^½) = Σ √λ of the symmetric PSD matrix Σ1^½ Σ2 Σ1^½ (eigh only, no sqrtm)."""
    w, v = np.linalg.eigh(s1)
    root1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    lam = np.linalg.eigvalsh(root1 @ s2 @ root1)
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.sum(np.sqrt(np.clip(lam, 0, None))))


def test_frechet_distance_of_diagonal_gaussians_is_the_closed_form():
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.normal(size=5), rng.normal(size=5)
    v1, v2 = rng.uniform(0.1, 3, 5), rng.uniform(0.1, 3, 5)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum(v1 + v2 - 2 * np.sqrt(v1 * v2))
    assert frechet_distance(mu1, np.diag(v1), mu2, np.diag(v2)) == pytest.approx(expected, rel=1e-10)
    # 1-d: (μ1 − μ2)² + (σ1 − σ2)²
    assert frechet_distance([1.0], [[4.0]], [3.0], [[9.0]]) == pytest.approx(4.0 + 1.0)


def test_frechet_distance_matches_independent_computations_on_random_features():
    fid_statistics_to_metric = pytest.importorskip(
        "torch_fidelity.metric_fid", reason="torch-fidelity (a declared dependency) is not installed"
    ).fid_statistics_to_metric

    rng = np.random.default_rng(1)
    for n, d in [(200, 16), (40, 64)]:  # full-rank and rank-deficient (n < d) covariances
        a = rng.normal(size=(n, d)) ** 2
        b = rng.normal(size=(n, d)) * 1.3 + 0.2
        (mu1, s1), (mu2, s2) = feature_statistics(a), feature_statistics(b)
        ours = frechet_distance(mu1, s1, mu2, s2)
        assert ours == pytest.approx(eig_frechet(mu1, s1, mu2, s2), rel=1e-6)
        # torch-fidelity's formula uses the eigenvalues of Σ1Σ2 (another route to the same trace)
        theirs = fid_statistics_to_metric({"mu": mu1, "sigma": s1}, {"mu": mu2, "sigma": s2}, False)
        assert ours == pytest.approx(theirs["frechet_inception_distance"], rel=1e-6)
        assert frechet_distance(mu2, s2, mu1, s1) == pytest.approx(ours, rel=1e-8)  # symmetric
        assert frechet_distance(mu1, s1, mu1, s1) == pytest.approx(0.0, abs=1e-6 * np.trace(s1))


def test_missing_inception_weights_make_fid_not_computed_with_file_and_directory(tmp_path, monkeypatch):
    ckpt_dir = use_torch_home(monkeypatch, tmp_path / "empty_home")
    images = np.zeros((4, 32, 32, 3), np.uint8)
    r = frechet_inception_distance(images, images, name="rfid", download=False)
    assert not r.computed and r.value is None and r.name == "rfid"
    assert "weights-inception-2015-12-05-6726825d.pth" in r.reason and str(ckpt_dir) in r.reason
    assert pretrained.PRETRAINED["inception_fid"].url in r.reason
    row = {s.name: s for s in pretrained.status()}["inception_fid"]
    assert row.path == ckpt_dir / "weights-inception-2015-12-05-6726825d.pth" and not row.present
    # loaded once, reported for every FID: the reason is passed on without a second attempt
    inception, reason = inception_or_reason(TEST_FEATURE_DIM, download=False)
    assert inception is None and reason == r.reason
    again = frechet_inception_distance(images, images, unavailable_reason=reason)
    assert not again.computed and again.reason == reason


@pytest.fixture(scope="module")
def random_inception_home(tmp_path_factory):
    """A TORCH_HOME whose hub cache holds a randomly initialised FID InceptionV3 under the registry's file name."""
    FeatureExtractorInceptionV3 = pytest.importorskip(
        "torch_fidelity.feature_extractor_inceptionv3", reason="torch-fidelity (a declared dependency) is not installed"
    ).FeatureExtractorInceptionV3

    class Unloaded(FeatureExtractorInceptionV3):
        def load_state_dict(self, *args, **kwargs):  # keep the random initialisation the constructor made
            return None

    home = tmp_path_factory.mktemp("torch_home")
    ckpt = home / "hub" / "checkpoints" / pretrained.PRETRAINED["inception_fid"].filename
    ckpt.parent.mkdir(parents=True)
    placeholder = home / "placeholder.pth"
    torch.save({}, placeholder)
    torch.manual_seed(0)
    network = Unloaded("random", [str(TEST_FEATURE_DIM)], feature_extractor_weights_path=str(placeholder))
    state = network.state_dict()
    torch.save(state, ckpt)
    return home, state


def test_present_weights_are_the_ones_used_and_fid_is_the_frechet_distance_of_their_features(
    random_inception_home, monkeypatch
):
    home, state = random_inception_home
    ckpt_dir = use_torch_home(monkeypatch, home)
    inception = load_inception(TEST_FEATURE_DIM, download=False)
    assert inception.weights_path == str(ckpt_dir / pretrained.PRETRAINED["inception_fid"].filename)
    loaded = inception.network.state_dict()
    assert loaded.keys() == state.keys()
    assert all(torch.equal(loaded[k], state[k]) for k in state)  # the file's tensors, not a fresh init
    assert not any(p.requires_grad for p in inception.network.parameters())

    # every forward pass runs a 299×299 stem on 2 CPU cores: a handful of images
    rng = np.random.default_rng(3)
    real = rng.integers(0, 256, (5, 32, 32, 3), dtype=np.uint8)
    shifted = np.clip(real.astype(int) + 60, 0, 255).astype(np.uint8)
    features_real, features_fake = inception(real, batch_size=2), inception(shifted)
    assert features_real.shape == (5, TEST_FEATURE_DIM)

    r = frechet_inception_distance(real, shifted, inception=inception)
    (mu1, s1), (mu2, s2) = feature_statistics(features_real), feature_statistics(features_fake)
    assert r.computed and r.name == "fid" and r.n == 5
    # batching (2 vs 32 per pass) does not change the features, hence the same distance
    assert r.value == pytest.approx(eig_frechet(mu1, s1, mu2, s2), rel=1e-5)
    assert r.value > 0
    assert "64-d" in r.note and "not comparable" in r.note  # a non-standard layer says so
    same = frechet_inception_distance(real[:3], real[:3], name="rfid", inception=inception)
    assert same.name == "rfid" and same.value == pytest.approx(0.0, abs=1e-6 * r.value)
    too_few = frechet_inception_distance(real[:1], shifted[:1], inception=inception)
    assert not too_few.computed and "at least 2" in too_few.reason


def test_fid_loads_the_network_itself_when_not_given_one(random_inception_home, monkeypatch):
    home, _ = random_inception_home
    use_torch_home(monkeypatch, home)
    rng = np.random.default_rng(4)
    a = rng.integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    b = rng.integers(0, 128, (3, 32, 32, 3), dtype=np.uint8)
    direct = frechet_inception_distance(a, b, feature_dim=TEST_FEATURE_DIM, download=False)
    assert direct.computed and direct.n == 3
    inception, reason = inception_or_reason(TEST_FEATURE_DIM, download=False)
    assert reason is None
    (mu1, s1), (mu2, s2) = feature_statistics(inception(a)), feature_statistics(inception(b))
    assert direct.value == pytest.approx(eig_frechet(mu1, s1, mu2, s2), rel=1e-5)


def test_without_torch_fidelity_fid_is_not_computed_and_says_which_package(tmp_path, monkeypatch):
    ckpt_dir = use_torch_home(monkeypatch, tmp_path)
    ckpt_dir.mkdir(parents=True)
    torch.save({}, ckpt_dir / pretrained.PRETRAINED["inception_fid"].filename)  # weights present, package absent
    monkeypatch.setitem(sys.modules, "torch_fidelity.feature_extractor_inceptionv3", None)  # import raises
    images = np.zeros((3, 32, 32, 3), np.uint8)
    r = frechet_inception_distance(images, images, download=False)
    assert not r.computed and "torch-fidelity" in r.reason


def test_unknown_feature_layer_is_refused():
    with pytest.raises(ValueError, match="feature_dim"):
        load_inception(100, download=False)
    assert fid_module.DEFAULT_FEATURE_DIM == 2048  # the standard FID layer unless asked otherwise
