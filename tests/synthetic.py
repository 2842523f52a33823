"""Small synthetic digit sets written as real IDX files, so the real loader runs in tests."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np

from fewshot.data import IDX_FILES


def idx_bytes(array: np.ndarray) -> bytes:
    """Serialise a uint8 array in IDX format (magic 0x0800 | ndim, big-endian dims)."""
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    return header + array.astype(np.uint8).tobytes()


def synthetic_digits(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``n`` 28x28 images in 10 learnable classes: class c is a bright bar at an angle and
    place of its own, jittered by a few pixels, on noise."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 10
    rng.shuffle(labels)
    images = rng.integers(0, 40, size=(n, 28, 28)).astype(np.float32)
    yy, xx = np.mgrid[0:28, 0:28]
    for i, c in enumerate(labels):
        angle = np.pi * c / 10
        dy, dx = rng.integers(-2, 3, size=2)
        cy, cx = 14 + dy + (c % 3 - 1) * 3, 14 + dx + (c % 2) * 2 - 1
        distance = np.abs((yy - cy) * np.cos(angle) - (xx - cx) * np.sin(angle))
        along = np.abs((yy - cy) * np.sin(angle) + (xx - cx) * np.cos(angle))
        stroke = (distance < 1.6) & (along < 9 - (c % 4))
        images[i][stroke] = 255
    return images.clip(0, 255).astype(np.uint8), labels.astype(np.uint8)


def write_mnist_folder(folder: Path, n_train: int = 600, n_test: int = 200, compress: bool = True) -> Path:
    """Write the four IDX files (gzip or raw) under ``folder`` and return it."""
    folder.mkdir(parents=True, exist_ok=True)
    train_x, train_y = synthetic_digits(n_train, seed=1)
    test_x, test_y = synthetic_digits(n_test, seed=2)
    arrays = {
        "train_images": train_x,
        "train_labels": train_y,
        "test_images": test_x,
        "test_labels": test_y,
    }
    for key, stem in IDX_FILES.items():
        payload = idx_bytes(arrays[key])
        if compress:
            (folder / (stem + ".gz")).write_bytes(gzip.compress(payload))
        else:
            (folder / stem).write_bytes(payload)
    return folder
