"""MNIST as uint8 tensors in memory, the seeded 100-label draw, and its labeled images as tensors.

Source order: an explicit folder (``--data-dir`` or ``FEWSHOT_DATA_DIR``) holding
the four IDX files, gzip-compressed or not; else ``./data`` through torchvision's
download.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from sklearn.model_selection import train_test_split

from fewshot.errors import UserError

DATA_DIR_ENV = "FEWSHOT_DATA_DIR"
IDX_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
IMAGE_MAGIC = 2051
LABEL_MAGIC = 2049
MNIST_MEAN = 0.1307
MNIST_STD = 0.3081
NUM_CLASSES = 10


@dataclass(frozen=True)
class MNIST:
    train_images: torch.Tensor  # (60000, 28, 28) uint8
    train_labels: torch.Tensor  # (60000,) int64
    test_images: torch.Tensor  # (10000, 28, 28) uint8
    test_labels: torch.Tensor  # (10000,) int64
    source: str


def _open_idx(path: Path) -> bytes:
    try:
        raw = path.read_bytes()
    except OSError as exc:  # permission denied, a folder named like the file, I/O error
        raise UserError(f"{path}: cannot be read ({exc.strerror or type(exc).__name__}); make it readable "
                        "or point --data-dir at another copy") from exc  # fmt: skip
    if raw[:2] == b"\x1f\x8b":
        try:
            return gzip.decompress(raw)
        except (OSError, EOFError) as exc:
            raise UserError(
                f"{path}: the gzip file is corrupt or truncated ({exc}); replace it with a fresh copy"
            ) from exc
    return raw


def read_idx(path: Path, expected_magic: int) -> torch.Tensor:
    """Read one IDX file (gzip or raw) into a uint8 tensor, validating its header."""
    data = _open_idx(path)
    if len(data) < 8:
        raise UserError(f"{path}: too short to be an IDX file ({len(data)} bytes); replace it with a fresh copy")
    magic = int.from_bytes(data[:4], "big")
    if magic != expected_magic:
        raise UserError(
            f"{path}: wrong magic number {magic} (expected {expected_magic}); "
            "this is not an MNIST IDX file of that kind"
        )
    ndim = data[3]
    header = 4 + 4 * ndim
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    expected = header + int(np.prod(dims))
    if len(data) != expected:
        raise UserError(
            f"{path}: truncated or padded IDX file ({len(data)} bytes, header says {expected}); "
            "replace it with a fresh copy"
        )
    array = np.frombuffer(data, dtype=np.uint8, offset=header).reshape(dims)
    return torch.from_numpy(array.copy())


def _find_file(folder: Path, stem: str) -> Path | None:
    for name in (stem, stem + ".gz"):
        candidate = folder / name
        if candidate.is_file():
            return candidate
    return None


def find_idx_folder(root: Path) -> Path | None:
    """The folder under ``root`` that holds all four IDX files, if any."""
    for folder in (root, root / "MNIST" / "raw", root / "raw"):
        if all(_find_file(folder, stem) for stem in IDX_FILES.values()):
            return folder
    return None


def resolve_data_dir(data_dir: str | os.PathLike | None) -> Path | None:
    chosen = data_dir if data_dir not in (None, "") else os.environ.get(DATA_DIR_ENV) or None
    if chosen is None:
        return None
    path = Path(chosen).expanduser()
    if not path.is_dir():
        raise UserError(f"--data-dir {chosen}: no such directory; point it at a folder holding the MNIST IDX files")
    if not os.access(path, os.R_OK | os.X_OK):
        raise UserError(f"--data-dir {chosen}: permission denied (the folder cannot be listed); make it readable "
                        "or point --data-dir at another copy")  # fmt: skip
    return path


def _load_folder(folder: Path) -> MNIST:
    tensors = {}
    for key, stem in IDX_FILES.items():
        path = _find_file(folder, stem)
        magic = IMAGE_MAGIC if key.endswith("images") else LABEL_MAGIC
        tensors[key] = read_idx(path, magic)
    for split in ("train", "test"):
        images, labels = tensors[f"{split}_images"], tensors[f"{split}_labels"]
        if images.dim() != 3 or images.shape[1:] != (28, 28) or images.shape[0] != labels.shape[0]:
            raise UserError(
                f"{folder}: {split} images {tuple(images.shape)} and labels {tuple(labels.shape)} "
                "do not match MNIST's layout (N x 28 x 28 images, N labels)"
            )
        if int(labels.max()) >= NUM_CLASSES:
            raise UserError(f"{folder}: {split} labels go up to {int(labels.max())}; MNIST labels are 0-9")
    return MNIST(
        train_images=tensors["train_images"],
        train_labels=tensors["train_labels"].long(),
        test_images=tensors["test_images"],
        test_labels=tensors["test_labels"].long(),
        source=str(folder.resolve()),
    )


def _missing_message(where: str) -> str:
    names = ", ".join(IDX_FILES.values())
    return (
        f"MNIST not found {where}: pass --data-dir (or set {DATA_DIR_ENV}) to a folder holding "
        f"the four IDX files ({names}, optionally .gz)"
    )


def load_mnist(data_dir: str | os.PathLike | None = None, download_root: str | os.PathLike = "data") -> MNIST:
    """Load MNIST from a local IDX folder, falling back to torchvision's download."""
    root = resolve_data_dir(data_dir)
    if root is not None:
        folder = find_idx_folder(root)
        if folder is None:
            raise UserError(_missing_message(f"in {root}"))
        return _load_folder(folder)
    download_root = Path(download_root)
    folder = find_idx_folder(download_root)
    if folder is not None:
        return _load_folder(folder)
    return _download(download_root)


def _download(root: Path) -> MNIST:
    from torchvision.datasets import MNIST as TorchvisionMNIST

    try:
        for train in (True, False):
            TorchvisionMNIST(str(root), train=train, download=True)
    except Exception as exc:  # network errors come in many types
        raise UserError(_missing_message(f"locally and the download failed ({type(exc).__name__})")) from exc
    folder = find_idx_folder(root)
    if folder is None:
        raise UserError(_missing_message(f"in {root} after download"))
    return _load_folder(folder)


@dataclass(frozen=True)
class LabeledDraw:
    """Indices into the MNIST training set: the labeled split and the unlabeled pool."""

    train_idx: torch.Tensor
    val_idx: torch.Tensor
    unlabeled_idx: torch.Tensor
    seed: int
    labels_per_class: int | None
    n_labels: int

    @property
    def labeled_idx(self) -> torch.Tensor:
        return torch.cat([self.train_idx, self.val_idx])

    def to_dict(self) -> dict:
        return {
            "seed": self.seed,
            "labels_per_class": self.labels_per_class,
            "n_labels": self.n_labels,
            "train_idx": self.train_idx.tolist(),
            "val_idx": self.val_idx.tolist(),
        }

    @property
    def digest(self) -> str:
        """A short hash identifying the labeled images and their split."""
        payload = json.dumps({"train": self.train_idx.tolist(), "val": self.val_idx.tolist()}).encode()
        return hashlib.sha256(payload).hexdigest()[:16]


def draw_labels(
    labels: torch.Tensor,
    seed: int,
    labels_per_class: int | None = 10,
    n_labels: int | None = None,
    val_fraction: float = 0.25,
) -> LabeledDraw:
    """Seeded labeled draw, split train/validation stratified by class.

    ``labels_per_class`` draws a balanced set; with it set to None, ``n_labels``
    images are drawn uniformly at random (the report's plain draw).
    """
    total = labels.shape[0]
    rng = np.random.default_rng(seed)
    labels_np = labels.numpy()
    if labels_per_class is not None:
        if labels_per_class < 2:
            raise UserError(
                f"--labels-per-class {labels_per_class}: must be at least 2 (one train and one validation image per class)"
            )
        chosen = []
        for digit in range(NUM_CLASSES):
            pool = np.flatnonzero(labels_np == digit)
            if labels_per_class > pool.size:
                raise UserError(f"--labels-per-class {labels_per_class}: class {digit} has only {pool.size} images")
            chosen.append(rng.choice(pool, size=labels_per_class, replace=False))
        labeled = np.concatenate(chosen)
        n = labeled.size
    else:
        if n_labels is None or not 20 <= n_labels <= total // 2:
            raise UserError(f"--n-labels {n_labels}: must be between 20 and {total // 2}")
        labeled = rng.choice(total, size=n_labels, replace=False)
        n = n_labels
    labeled = np.sort(labeled)
    stratify = labels_np[labeled]
    if np.bincount(stratify, minlength=NUM_CLASSES).min() < 2:
        stratify = None  # a plain random draw can miss a class; split without stratifying
    train_idx, val_idx = train_test_split(labeled, test_size=val_fraction, stratify=stratify, random_state=seed)
    mask = np.ones(total, dtype=bool)
    mask[labeled] = False
    return LabeledDraw(
        train_idx=torch.from_numpy(np.sort(train_idx)).long(),
        val_idx=torch.from_numpy(np.sort(val_idx)).long(),
        unlabeled_idx=torch.from_numpy(np.flatnonzero(mask)).long(),
        seed=seed,
        labels_per_class=labels_per_class,
        n_labels=n,
    )


def to_unit(images: torch.Tensor, device: torch.device | str | None = None) -> torch.Tensor:
    """uint8 (N, 28, 28) -> float (N, 1, 28, 28) in [0, 1], the input every model takes.

    Models normalise internally, so augmentation works on [0, 1] images with a black
    background and logged models accept plain pixel intensities.
    """
    x = images.to(device) if device is not None else images
    return (x.float() / 255.0).unsqueeze(1)


@dataclass
class LabeledTensors:
    """A draw's labeled images as [0, 1] tensors on one device: the 75/25 train/validation split and
    the test set (None when left out). The one container every job and probe reads labels from."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    x_test: torch.Tensor | None = None
    y_test: torch.Tensor | None = None

    def all_labels(self) -> LabeledTensors:
        """Train and validation images together as the training set (for a refit); no validation left."""
        x, y = torch.cat([self.x_train, self.x_val]), torch.cat([self.y_train, self.y_val])
        return replace(self, x_train=x, y_train=y, x_val=x[:0], y_val=y[:0])


def labeled_tensors(
    mnist: MNIST, draw: LabeledDraw, device: torch.device | str, with_test: bool = True
) -> LabeledTensors:
    """The draw's labeled split on ``device``, with the test set unless ``with_test`` is false."""
    return LabeledTensors(
        x_train=to_unit(mnist.train_images[draw.train_idx], device),
        y_train=mnist.train_labels[draw.train_idx].to(device),
        x_val=to_unit(mnist.train_images[draw.val_idx], device),
        y_val=mnist.train_labels[draw.val_idx].to(device),
        x_test=to_unit(mnist.test_images, device) if with_test else None,
        y_test=mnist.test_labels.to(device) if with_test else None,
    )
