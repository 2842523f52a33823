import copy

import pytest
import torch
import torch.nn.functional as F

from fewshot.device import place
from fewshot.errors import UserError
from fewshot.models import ReportCNN, TwoMapReadout, build_classifier, build_encoder, with_feature_grid


@pytest.mark.parametrize("name, n_params", [("mlp1", 477_898), ("mlp2", 109_770), ("cnn", 168_074)])
def test_classifier_shapes_and_sizes(name: str, n_params: int) -> None:
    model = build_classifier(name).eval()
    out = model(torch.rand(4, 1, 28, 28))
    assert out.shape == (4, 10)
    assert sum(p.numel() for p in model.parameters()) == n_params


def test_report_cnn_layout() -> None:
    cnn = ReportCNN()
    convs = [m for m in cnn.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [c.out_channels for c in convs] == [32, 64, 128]
    linears = [m for m in cnn.modules() if isinstance(m, torch.nn.Linear)]
    assert [(lin.in_features, lin.out_features) for lin in linears] == [(512, 128), (128, 64), (64, 10)]
    bns = [m for m in cnn.modules() if isinstance(m, torch.nn.BatchNorm1d | torch.nn.BatchNorm2d)]
    assert len(bns) == 5


@pytest.mark.parametrize("arch, dim", [("digit", 64), ("resnet18", 512), ("resnet50", 2048)])
def test_encoders_expose_feature_dim(arch: str, dim: int) -> None:
    encoder = build_encoder(arch, width=16).eval()
    assert encoder.feature_dim == dim
    assert encoder(torch.rand(2, 1, 28, 28)).shape == (2, dim)


def test_unknown_names() -> None:
    with pytest.raises(UserError, match="--model vgg"):
        build_classifier("vgg")
    with pytest.raises(UserError, match="--arch"):
        build_encoder("vit")


@pytest.mark.parametrize("arch", ["digit", "resnet18"])
def test_a_feature_grid_widens_the_pooled_features_with_the_same_weights(arch: str) -> None:
    torch.manual_seed(0)
    encoder = build_encoder(arch, 8).eval()
    gridded = with_feature_grid(encoder, 2)
    assert with_feature_grid(encoder, 1) is encoder
    x = torch.rand(3, 1, 28, 28)
    with torch.no_grad():
        plain, wide = encoder(x), gridded(x)
    assert wide.shape == (3, 4 * encoder.feature_dim) and gridded.feature_dim == 4 * encoder.feature_dim
    assert encoder(x).shape == plain.shape  # the original is untouched
    before, after = encoder.state_dict(), gridded.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert not torch.allclose(wide.view(3, -1, 4)[..., 0], wide.view(3, -1, 4)[..., 3])  # cells differ
    with pytest.raises(UserError, match="--feature-grid"):
        with_feature_grid(gridded, 2)
    with pytest.raises(UserError, match="--feature-grid"):
        with_feature_grid(torch.nn.Linear(3, 3), 2)


@pytest.mark.parametrize("name", ["cnn", "mlp1"])
def test_place_makes_convolutions_channels_last_without_changing_outputs(name: str) -> None:
    torch.manual_seed(0)
    model = build_classifier(name).eval()
    plain = copy.deepcopy(model)
    assert place(model, "cpu") is model, "moved in place, as nn.Module.to"
    for parameter in model.parameters():
        if parameter.dim() == 4:
            assert parameter.is_contiguous(memory_format=torch.channels_last)
    x = torch.rand(16, 1, 28, 28)
    with torch.no_grad():
        assert torch.allclose(model(x), plain(x), atol=1e-5)
        # its weights load into a model built the usual way, with the same outputs
        rebuilt = build_classifier(name).eval()
        rebuilt.load_state_dict(model.state_dict())
        assert torch.allclose(rebuilt(x), plain(x), atol=1e-5)


def test_two_maps_append_the_finer_map_pooled_to_the_same_grid() -> None:
    torch.manual_seed(0)
    encoder = build_encoder("digit", 8).eval()
    read = with_feature_grid(encoder, 2, maps=2)
    assert isinstance(read, TwoMapReadout) and read.feature_dim == (32 + 16) * 4
    x = torch.rand(3, 1, 28, 28)
    with torch.no_grad():
        features = read(x)
        finer = encoder.body[:14](x)  # through the 14x14 blocks, before the last max-pool
        last = encoder.body[:-2](x)  # the 7x7 map, before the global pool
    assert finer.shape[-1] == 14 and last.shape[-1] == 7
    expected = torch.cat([F.adaptive_avg_pool2d(last, 2).flatten(1), F.adaptive_avg_pool2d(finer, 2).flatten(1)], 1)
    assert torch.allclose(features, expected, atol=1e-6)
    assert torch.allclose(features[:, :128], with_feature_grid(encoder, 2)(x), atol=1e-6)  # the last map as grid 2
    assert read.state_dict().keys() == encoder.state_dict().keys()  # weights load into it by the encoder's names
    assert with_feature_grid(encoder, 1, maps=2)(x).shape == (3, 48)
    with pytest.raises(UserError, match="--feature-maps 2"):
        with_feature_grid(build_encoder("resnet18"), 2, maps=2)
    with pytest.raises(UserError, match="--feature-maps 3"):
        with_feature_grid(encoder, 2, maps=3)
