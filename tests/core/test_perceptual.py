"""LPIPS built from explicitly resolved weights, and the pretrained-weights registry it resolves them through.

No ImageNet weights exist here, so the tests write a torchvision-format VGG16 checkpoint of random weights under the
exact file name torchvision uses, in a temporary TORCH_HOME, and check that exactly those weights end up in LPIPS.
"""

import time

import pytest
import torch
import torchvision

from ldm_core import pretrained
from ldm_core.losses import perceptual
from ldm_core.losses.autoencoder import AutoencoderLossConfig, build_autoencoder_loss
from ldm_core.losses.perceptual import VGG16_SLICES, build_lpips, load_vgg16_features
from ldm_core.models.discriminator import DiscriminatorConfig
from ldm_core.pretrained import MissingPretrainedWeights
from tests.core.torch_home import use_torch_home

VGG_FILE = "vgg16-397923af.pth"


@pytest.fixture(scope="module")
def vgg_home(tmp_path_factory):
    """A TORCH_HOME holding a random VGG16 `features` checkpoint (~58 MB); returns (home, state dict, the VGG)."""
    home = tmp_path_factory.mktemp("torch_home")
    torch.manual_seed(1234)
    vgg = torchvision.models.vgg16(weights=None).features.eval()
    state = {f"features.{k}": v for k, v in vgg.state_dict().items()}
    ckpt_dir = home / "hub" / "checkpoints"
    ckpt_dir.mkdir(parents=True)
    torch.save(state, ckpt_dir / VGG_FILE)
    return home, state, vgg


@pytest.fixture(scope="module")
def lpips_model(vgg_home):
    home, _, _ = vgg_home
    with pytest.MonkeyPatch.context() as mp:
        use_torch_home(mp, home)
        return build_lpips(download=False)


@pytest.fixture
def empty_home(tmp_path, monkeypatch):
    return use_torch_home(monkeypatch, tmp_path / "empty_torch_home")


def reference_lpips(vgg: torch.nn.Sequential, lin: list[torch.Tensor], x: torch.Tensor, y: torch.Tensor):
    """LPIPS written out from the paper on a plain torchvision VGG16 `features`: no lpips code involved.

    d(x, y) = Σ_l mean_hw Σ_c w_l,c (f̂_l(x) − f̂_l(y))²,  f̂ = channel-unit-normalized relu{1_2,2_2,3_3,4_3,5_3}.
    """
    shift = torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1)
    scale = torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1)

    def feats(img):
        h, out = (img - shift) / scale, []
        for i, layer in enumerate(vgg):
            h = layer(h)
            if i + 1 in [end for _, end in VGG16_SLICES]:
                out.append(h / (h.pow(2).sum(1, keepdim=True).sqrt() + 1e-10))
        return out

    total = 0
    for w, fx, fy in zip(lin, feats(x), feats(y)):
        total = total + ((fx - fy) ** 2 * w.view(1, -1, 1, 1)).sum(1).mean((1, 2))
    return total  # (B,)


def test_loads_exactly_the_resolved_weights(vgg_home, lpips_model):
    _, state, _ = vgg_home
    net_state = lpips_model.net.state_dict()
    assert len(net_state) == 26  # 13 convs of VGG16 × (weight, bias)
    for key, value in net_state.items():  # e.g. slice3.12.weight <- features.12.weight
        _, index, kind = key.split(".")
        assert torch.equal(value, state[f"features.{index}.{kind}"]), key
    assert torch.equal(getattr(lpips_model.net.slice5, "28").bias, state["features.28.bias"])

    lin_file = torch.load(pretrained.expected_path("lpips_vgg_linear"), map_location="cpu", weights_only=True)
    for k in range(5):
        assert torch.equal(getattr(lpips_model, f"lin{k}").model[-1].weight, lin_file[f"lin{k}.model.1.weight"])


def test_distance_matches_a_reference_computation(vgg_home, lpips_model):
    _, _, vgg = vgg_home
    lin = [
        w
        for _, w in sorted(
            torch.load(pretrained.expected_path("lpips_vgg_linear"), map_location="cpu", weights_only=True).items()
        )
    ]
    torch.manual_seed(0)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    y = (x + 0.3 * torch.randn_like(x)).clamp(-1, 1)
    with torch.no_grad():
        ours = lpips_model(x, y).flatten()
        ref = reference_lpips(vgg, lin, x, y)
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-6)
    assert (ours > 0).all()
    assert torch.equal(lpips_model(x, x).flatten(), torch.zeros(2))


def test_frozen_but_differentiable_in_its_input(lpips_model):
    assert not any(p.requires_grad for p in lpips_model.parameters())
    assert not lpips_model.training
    torch.manual_seed(0)
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    y = (torch.rand(1, 3, 32, 32) * 2 - 1).requires_grad_(True)
    lpips_model(x, y).sum().backward()
    assert y.grad is not None and y.grad.abs().sum() > 0
    assert all(p.grad is None for p in lpips_model.parameters())
    # train mode changes nothing (no dropout in the linear layers)
    lpips_model.train()
    try:
        torch.testing.assert_close(lpips_model(x, y), lpips_model(x, y), rtol=0, atol=0)
    finally:
        lpips_model.eval()


def test_checkpoint_with_classifier_keys_is_accepted_and_missing_features_are_named(vgg_home, lpips_model):
    _, state, _ = vgg_home
    before = {k: v.clone() for k, v in lpips_model.net.state_dict().items()}
    load_vgg16_features(lpips_model, {**state, "classifier.6.bias": torch.zeros(1000)})
    assert all(torch.equal(v, before[k]) for k, v in lpips_model.net.state_dict().items())
    partial = {k: v for k, v in state.items() if k != "features.17.weight"}
    with pytest.raises(ValueError, match=r"features\.17\.weight"):
        load_vgg16_features(lpips_model, partial, source="some.pth")


def test_missing_weights_name_the_file_the_directory_and_the_url(empty_home):
    t0 = time.monotonic()
    with pytest.raises(MissingPretrainedWeights) as info:
        build_lpips(download=False)
    message = str(info.value)
    assert VGG_FILE in message
    assert str(empty_home) in message
    assert "https://download.pytorch.org/models/vgg16-397923af.pth" in message
    assert info.value.path == empty_home / VGG_FILE
    assert time.monotonic() - t0 < 1.0, "must fail before building the network"


def test_download_fails_fast_when_the_host_is_unreachable(empty_home, monkeypatch):
    # A loopback port nobody listens on: a refused connection, on any machine, without touching the internet.
    spec = pretrained.PRETRAINED["vgg16"]
    dead = pretrained.PretrainedFile(spec.filename, "https://127.0.0.1:9/vgg16-397923af.pth", spec.used_for)
    monkeypatch.setitem(pretrained.PRETRAINED, "vgg16", dead)
    t0 = time.monotonic()
    with pytest.raises(MissingPretrainedWeights, match="vgg16-397923af.pth") as info:
        build_lpips(download=True)
    assert time.monotonic() - t0 < 10.0
    assert "cannot connect" in str(info.value) and str(empty_home) in str(info.value)
    assert not (empty_home / VGG_FILE).exists()


def test_download_fails_fast_without_network(empty_home):
    url = pretrained.PRETRAINED["vgg16"].url
    if pretrained._reachable(url, 3.0)[0]:
        pytest.skip("the download host is reachable here: the test would download 528 MB")
    t0 = time.monotonic()
    with pytest.raises(MissingPretrainedWeights, match="vgg16-397923af.pth"):
        pretrained.resolve("vgg16", download=True)
    assert time.monotonic() - t0 < 10.0


def test_status_lists_every_component_with_its_path(vgg_home, monkeypatch, tmp_path):
    home, _, _ = vgg_home
    ckpt_dir = use_torch_home(monkeypatch, home)
    rows = {row.name: row for row in pretrained.status()}
    assert set(rows) == set(pretrained.PRETRAINED)
    assert rows["vgg16"].path == ckpt_dir / VGG_FILE and rows["vgg16"].present
    assert rows["lpips_vgg_linear"].present  # ships inside the lpips package
    assert rows["lpips_vgg_linear"].path.parts[-3:] == ("weights", "v0.1", "vgg.pth")
    assert pretrained.resolve("vgg16", download=False) == ckpt_dir / VGG_FILE

    empty = use_torch_home(monkeypatch, tmp_path / "nothing")
    rows = {row.name: row for row in pretrained.status()}
    assert rows["vgg16"] == (rows["vgg16"].name, empty / VGG_FILE, False, rows["vgg16"].used_for)


def test_torch_hub_set_dir_is_honoured(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "_hub_dir", None)
    torch.hub.set_dir(str(tmp_path / "custom_hub"))
    assert pretrained.hub_checkpoint_dir() == tmp_path / "custom_hub" / "checkpoints"


def test_build_autoencoder_loss_uses_lpips_when_weights_are_present(lpips_model, monkeypatch):
    # build_lpips itself is tested above; reuse its result rather than build VGG16 once more (2 CPU cores)
    calls = []
    monkeypatch.setattr(perceptual, "build_lpips", lambda download: calls.append(download) or lpips_model)
    loss, available = build_autoencoder_loss(AutoencoderLossConfig(), DiscriminatorConfig(ndf=8), download=False)
    assert calls == [False]
    assert available and loss.has_perceptual and loss.perceptual is lpips_model
    assert not any(k.startswith("perceptual") for k in loss.state_dict())  # frozen VGG stays out of checkpoints
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    y = x.flip(-1)
    _, logs = loss.generator_loss(x, y, torch.zeros(()), step=0, last_layer=None)
    assert logs["lpips"] > 0


def test_missing_weights_error_survives_pickling(empty_home):
    import pickle

    with pytest.raises(MissingPretrainedWeights) as info:
        pretrained.resolve("vgg16", download=False)
    copy = pickle.loads(pickle.dumps(info.value))
    assert str(copy) == str(info.value) and copy.path == info.value.path
