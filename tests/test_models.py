import pytest
import torch

from fewshot.errors import UserError
from fewshot.models import ReportCNN, build_classifier, build_encoder


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
