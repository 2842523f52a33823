import gzip
from pathlib import Path

import numpy as np
import pytest
import torch

from fewshot.data import IDX_FILES, draw_labels, find_idx_folder, load_mnist, read_idx, to_unit
from fewshot.errors import UserError
from tests.synthetic import idx_bytes, write_mnist_folder


def test_loads_gzip_and_raw_identically(tmp_path: Path) -> None:
    gz = load_mnist(write_mnist_folder(tmp_path / "gz", compress=True))
    raw = load_mnist(write_mnist_folder(tmp_path / "raw", compress=False))
    assert gz.train_images.dtype == torch.uint8 and gz.train_images.shape == (600, 28, 28)
    assert gz.test_images.shape == (200, 28, 28) and gz.train_labels.dtype == torch.int64
    assert torch.equal(gz.train_images, raw.train_images) and torch.equal(gz.test_labels, raw.test_labels)


def test_finds_torchvision_layout(tmp_path: Path) -> None:
    write_mnist_folder(tmp_path / "MNIST" / "raw")
    assert find_idx_folder(tmp_path) == tmp_path / "MNIST" / "raw"
    assert load_mnist(tmp_path).train_images.shape[0] == 600


def test_data_dir_from_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_mnist_folder(tmp_path)
    monkeypatch.setenv("FEWSHOT_DATA_DIR", str(tmp_path))
    assert load_mnist(None).source == str(tmp_path.resolve())


def test_header_values_round_trip(tmp_path: Path) -> None:
    array = np.arange(2 * 28 * 28, dtype=np.uint8).reshape(2, 28, 28)
    path = tmp_path / "x-idx3-ubyte"
    path.write_bytes(idx_bytes(array))
    assert np.array_equal(read_idx(path, 2051).numpy(), array)


@pytest.mark.parametrize(
    "corrupt, message",
    [
        (lambda b: b[:-100], "truncated"),
        (lambda b: b"\x00\x00\x09\x01" + b[4:], "wrong magic"),
        (lambda b: b[:5], "too short"),
    ],
)
def test_bad_files_give_one_clear_error(tmp_path: Path, corrupt, message: str) -> None:
    folder = write_mnist_folder(tmp_path, compress=False)
    target = folder / IDX_FILES["train_images"]
    target.write_bytes(corrupt(target.read_bytes()))
    with pytest.raises(UserError, match=message):
        load_mnist(folder)


def test_corrupt_gzip(tmp_path: Path) -> None:
    folder = write_mnist_folder(tmp_path)
    target = folder / (IDX_FILES["test_labels"] + ".gz")
    target.write_bytes(gzip.compress(b"x" * 100)[:30])
    with pytest.raises(UserError, match="gzip"):
        load_mnist(folder)


def test_missing_files_name_the_option_and_files(tmp_path: Path) -> None:
    folder = write_mnist_folder(tmp_path)
    (folder / (IDX_FILES["test_images"] + ".gz")).unlink()
    with pytest.raises(UserError) as info:
        load_mnist(folder)
    text = str(info.value)
    assert "--data-dir" in text and all(stem in text for stem in IDX_FILES.values())


def test_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="no such directory"):
        load_mnist(tmp_path / "nope")


def test_balanced_draw_is_seeded_stratified_and_disjoint(synthetic_data_dir: Path) -> None:
    mnist = load_mnist(synthetic_data_dir)
    draw = draw_labels(mnist.train_labels, seed=3, labels_per_class=10)
    labeled = draw.labeled_idx
    assert labeled.numel() == 100 and draw.train_idx.numel() == 75 and draw.val_idx.numel() == 25
    assert torch.bincount(mnist.train_labels[labeled], minlength=10).tolist() == [10] * 10
    val_counts = torch.bincount(mnist.train_labels[draw.val_idx], minlength=10)
    assert val_counts.min() >= 2 and val_counts.max() <= 3  # stratified: 2.5 per class
    assert set(labeled.tolist()).isdisjoint(draw.unlabeled_idx.tolist())
    assert labeled.numel() + draw.unlabeled_idx.numel() == mnist.train_labels.numel()
    again = draw_labels(mnist.train_labels, seed=3, labels_per_class=10)
    other = draw_labels(mnist.train_labels, seed=4, labels_per_class=10)
    assert torch.equal(again.train_idx, draw.train_idx) and again.digest == draw.digest
    assert other.digest != draw.digest


def test_plain_random_draw(synthetic_data_dir: Path) -> None:
    mnist = load_mnist(synthetic_data_dir)
    draw = draw_labels(mnist.train_labels, seed=0, labels_per_class=None, n_labels=40)
    assert draw.labeled_idx.numel() == 40 and draw.val_idx.numel() == 10


def test_bad_draws(synthetic_data_dir: Path) -> None:
    labels = load_mnist(synthetic_data_dir).train_labels
    with pytest.raises(UserError, match="--labels-per-class"):
        draw_labels(labels, seed=0, labels_per_class=1)
    with pytest.raises(UserError, match="class"):
        draw_labels(labels, seed=0, labels_per_class=500)


def test_to_unit_range() -> None:
    x = to_unit(torch.tensor([[[0, 255] * 14] * 28], dtype=torch.uint8))
    assert x.shape == (1, 1, 28, 28) and x.min() == 0 and x.max() == 1


def test_real_mnist_shapes(real_data_dir: Path) -> None:
    mnist = load_mnist(real_data_dir)
    assert mnist.train_images.shape == (60000, 28, 28) and mnist.test_images.shape == (10000, 28, 28)
    draw = draw_labels(mnist.train_labels, seed=0)
    assert draw.unlabeled_idx.numel() == 59900
