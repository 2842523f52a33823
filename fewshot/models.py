"""The report's classifiers (MLP1, MLP2, CNN) and encoders for 28x28 digits.

Every model takes float images in [0, 1] of shape (N, 1, 28, 28) and normalises them
itself with MNIST's mean and standard deviation.
"""

from __future__ import annotations

import copy

import torch
import torchvision
from torch import nn

from fewshot.data import MNIST_MEAN, MNIST_STD, NUM_CLASSES
from fewshot.errors import UserError


class Normalize(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - MNIST_MEAN) / MNIST_STD


class MLP(nn.Module):
    """784 pixels, then for each hidden width: linear, ReLU, batch-norm (as the report), then the classes."""

    def __init__(self, hidden: tuple[int, ...], num_classes: int = NUM_CLASSES) -> None:
        super().__init__()
        layers: list[nn.Module] = [Normalize(), nn.Flatten()]
        width = 784
        for size in hidden:
            layers += [nn.Linear(width, size), nn.ReLU(), nn.BatchNorm1d(size)]
            width = size
        self.net = nn.Sequential(*layers, nn.Linear(width, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class MLP1(MLP):
    """784-512-128-64-10 (the report's MLP1)."""

    def __init__(self, num_classes: int = NUM_CLASSES) -> None:
        super().__init__((512, 128, 64), num_classes)


class MLP2(MLP):
    """784-128-64-10 (the report's MLP2)."""

    def __init__(self, num_classes: int = NUM_CLASSES) -> None:
        super().__init__((128, 64), num_classes)


def _conv_bn_relu_pool(c_in: int, c_out: int, padding: int | str) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=padding), nn.BatchNorm2d(c_out), nn.ReLU(), nn.MaxPool2d(2))


class ReportCNN(nn.Module):
    """The report's CNN: three conv-BN-ReLU-pool blocks (32, 64, 128) then 512-128-64-10
    with batch-norm before each hidden ReLU."""

    def __init__(self, num_classes: int = NUM_CLASSES) -> None:
        super().__init__()
        self.features = nn.Sequential(
            Normalize(),
            _conv_bn_relu_pool(1, 32, "same"),  # 28 -> 14
            _conv_bn_relu_pool(32, 64, 0),  # 14 -> 12 -> 6
            _conv_bn_relu_pool(64, 128, 0),  # 6 -> 4 -> 2
            nn.Flatten(),
        )
        self.classifier = nn.Sequential(
            nn.Linear(128 * 2 * 2, 128), nn.BatchNorm1d(128), nn.ReLU(),
            nn.Linear(128, 64), nn.BatchNorm1d(64), nn.ReLU(),
            nn.Linear(64, num_classes),
        )  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


CLASSIFIERS = {"mlp1": MLP1, "mlp2": MLP2, "cnn": ReportCNN}


def build_classifier(name: str) -> nn.Module:
    if name not in CLASSIFIERS:
        raise UserError(f"--model {name}: unknown model; choose one of {', '.join(CLASSIFIERS)}")
    return CLASSIFIERS[name]()


# ---------------------------------------------------------------- encoders


class DigitEncoder(nn.Module):
    """A small conv encoder for 28x28 digits: 3x3 stem, no early max-pool.

    ``width`` scales the channels (32, 64, 128 at width 32); the output is the
    global-average-pooled feature vector of size ``feature_dim``.
    """

    def __init__(self, width: int = 32) -> None:
        super().__init__()
        w = width

        def block(c_in: int, c_out: int) -> list[nn.Module]:
            return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]

        self.body = nn.Sequential(
            Normalize(),
            *block(1, w), *block(w, w),  # 28x28
            nn.MaxPool2d(2),
            *block(w, 2 * w), *block(2 * w, 2 * w),  # 14x14
            nn.MaxPool2d(2),
            *block(2 * w, 4 * w), *block(4 * w, 4 * w),  # 7x7
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )  # fmt: skip
        self.feature_dim = 4 * w

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


class ResNetEncoder(nn.Module):
    """torchvision ResNet adapted to 1x28x28: 3x3 stride-1 stem, no max-pool, no fc."""

    def __init__(self, depth: int) -> None:
        super().__init__()
        factory = {18: torchvision.models.resnet18, 50: torchvision.models.resnet50}[depth]
        net = factory(weights=None)
        net.conv1 = nn.Conv2d(1, 64, 3, stride=1, padding=1, bias=False)
        net.maxpool = nn.Identity()
        self.feature_dim = net.fc.in_features
        net.fc = nn.Identity()
        self.net = nn.Sequential(Normalize(), net)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


ENCODERS = {
    "digit": lambda width: DigitEncoder(width),
    "resnet18": lambda width: ResNetEncoder(18),
    "resnet50": lambda width: ResNetEncoder(50),
}


def build_encoder(arch: str, width: int = 32) -> nn.Module:
    if arch not in ENCODERS:
        raise UserError(f"--arch {arch}: unknown encoder; choose one of {', '.join(ENCODERS)}")
    return ENCODERS[arch](width)


def with_feature_grid(encoder: nn.Module, grid: int, maps: int = 1) -> nn.Module:
    """A copy of ``encoder`` whose final average pool keeps a ``grid`` x ``grid`` map instead of
    one value per channel: features ``grid**2`` times as long, the same weights; each cell
    averages one region of the last map (on the digit encoder's 7x7 map, overlapping 4x4
    windows). ``maps`` 2 also pools the map before the last down-sampling (the digit encoder's
    14x14) to the same grid and appends it (``TwoMapReadout``). ``grid`` and ``maps`` 1 return
    ``encoder`` itself."""
    if maps not in (1, 2):
        raise UserError(f"--feature-maps {maps}: must be 1 (the last map) or 2 (also the one before it)")
    if maps == 2:
        return TwoMapReadout(encoder, grid)
    if grid == 1:
        return encoder
    pools = [m for m in encoder.modules() if isinstance(m, nn.AdaptiveAvgPool2d)]
    if not hasattr(encoder, "feature_dim") or not pools or getattr(encoder, "feature_grid", 1) != 1:
        raise UserError(f"--feature-grid {grid}: the encoder has no global average pool to widen; use 1")
    gridded = copy.deepcopy(encoder)
    pool = [m for m in gridded.modules() if isinstance(m, nn.AdaptiveAvgPool2d)][-1]
    pool.output_size = grid
    gridded.feature_dim = encoder.feature_dim * grid * grid
    gridded.feature_grid = grid
    return gridded


class TwoMapReadout(nn.Module):
    """The digit encoder read at two scales: its last map (7x7) and the map before the last max-pool
    (14x14), each average-pooled to ``grid`` x ``grid`` and flattened, last map first. The finer map
    keeps stroke-level detail the last one has pooled away; for 100 labels it is more input to the
    same linear head, not a new model. Same weights and state_dict keys as the encoder (``body.*``)."""

    def __init__(self, encoder: nn.Module, grid: int) -> None:
        super().__init__()
        body = getattr(encoder, "body", None)
        kinds = [type(m) for m in body] if isinstance(body, nn.Sequential) else []
        if nn.AdaptiveAvgPool2d not in kinds or nn.MaxPool2d not in kinds or getattr(encoder, "feature_grid", 1) != 1:
            raise UserError("--feature-maps 2: only the digit encoder (conv blocks, max-pools, one global pool) has it")
        self.body = copy.deepcopy(body)
        self.pool_at = kinds.index(nn.AdaptiveAvgPool2d)
        self.finer_at = max(i for i, kind in enumerate(kinds[: self.pool_at]) if kind is nn.MaxPool2d)
        finer_channels = [m.out_channels for m in body[: self.finer_at] if isinstance(m, nn.Conv2d)][-1]
        self.grid = grid
        self.feature_dim = (encoder.feature_dim + finer_channels) * grid * grid
        self.feature_grid, self.feature_maps = grid, 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        finer = x
        for index, module in enumerate(self.body):
            if index == self.pool_at:
                break
            if index == self.finer_at:
                finer = x
            x = module(x)
        pooled = [nn.functional.adaptive_avg_pool2d(m, self.grid).flatten(1) for m in (x, finer)]
        return torch.cat(pooled, dim=1)


class EncoderClassifier(nn.Module):
    """An encoder with a linear head: what the probes and semi-supervised training produce."""

    def __init__(self, encoder: nn.Module, num_classes: int = NUM_CLASSES) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(encoder.feature_dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(x))
