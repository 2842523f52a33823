import torch

from fewshot import augment as aug
from fewshot.evaluate import topk_accuracy


def _digit_batch(n: int = 16) -> torch.Tensor:
    x = torch.zeros(n, 1, 28, 28)
    x[:, :, 6:22, 12:16] = 1.0  # a vertical bar: "1"
    x[:, :, 6:9, 8:16] = 1.0  # a flag on the left top: breaks left-right symmetry
    return x


def test_identity_affine_is_exact() -> None:
    x = torch.rand(3, 1, 28, 28)
    zero = torch.zeros(3)
    theta = aug.affine_matrices(zero, torch.ones(3), zero, torch.zeros(3, 2))
    assert torch.allclose(aug.warp(x, theta), x, atol=1e-5)


def test_random_affine_is_per_image_and_seeded() -> None:
    x = _digit_batch()
    a = aug.random_affine(x, aug.AffineSpec(), torch.Generator().manual_seed(0))
    b = aug.random_affine(x, aug.AffineSpec(), torch.Generator().manual_seed(0))
    assert torch.equal(a, b)
    assert not torch.allclose(a[0], a[1])  # each image its own parameters
    assert a.shape == x.shape and a.min() >= 0 and a.max() <= 1


def test_no_horizontal_flip_in_views() -> None:
    x = _digit_batch(64)
    flipped = x.flip(-1)
    g = torch.Generator().manual_seed(0)
    view = aug.random_view(x, aug.ViewSpec(crop_scale=(0.9, 1.0), jitter=0, blur_probability=0), g)
    closer_to_original = ((view - x).abs().mean((1, 2, 3)) < (view - flipped).abs().mean((1, 2, 3))).float().mean()
    assert closer_to_original == 1.0


def test_offline_expansion_counts() -> None:
    x = _digit_batch(4)
    y = torch.arange(4)
    xs, ys = aug.offline_expand(x, y, torch.Generator().manual_seed(0), copies=10)
    assert xs.shape[0] == 4 + 4 * 10 * len(aug.REPORT_TRANSFORMS) and torch.equal(ys[:4], y)
    assert (ys[4:44] == y.repeat_interleave(10)).all()


def test_erase_and_elastic_keep_range() -> None:
    x = _digit_batch()
    g = torch.Generator().manual_seed(0)
    erased = aug.random_erase(x, probability=1.0, max_fraction=0.5, generator=g)
    assert (erased <= x).all() and (erased < x).any()
    warped = aug.elastic(x, alpha=2.0, sigma=4.0, generator=g)
    assert warped.shape == x.shape and not torch.allclose(warped, x)


def test_crossbar_adds_a_short_horizontal_bar_across_the_middle_stroke_only() -> None:
    x = _digit_batch(200)  # stroke in columns 12-15
    barred = aug.crossbar(x, probability=0.5, generator=torch.Generator().manual_seed(0))
    added = barred - x
    changed = (added > 0).flatten(1).any(1)
    assert (added >= 0).all() and barred.max() <= 1  # ink added, none taken, still in [0, 1]
    assert 60 < int(changed.sum()) < 140  # about half the images
    rows = (added[changed] > 0).any(dim=3).squeeze(1)  # (n, 28): rows the bar touches
    cols = (added[changed] > 0).any(dim=2).squeeze(1)
    assert not rows[:, :11].any() and not rows[:, 19:].any()  # near mid-height
    assert (rows.sum(1) <= 4).all()  # a bar, 1-2 pixels thick (anti-aliased edges)
    touches = cols[:, 11] | cols[:, 16]  # the bar meets the stroke (columns 12-15, already inked)
    assert touches.all() and not cols[:, :4].any() and not cols[:, 24:].any()
    assert torch.equal(aug.crossbar(x, 0.5, torch.Generator().manual_seed(0)), barred)  # seeded
    assert torch.equal(aug.crossbar(x, 0.0, torch.Generator().manual_seed(0)), x)


def test_topk_on_hand_made_logits() -> None:
    logits = torch.tensor([[0.9, 0.05, 0.05], [0.1, 0.2, 0.7], [0.3, 0.6, 0.1], [0.2, 0.2, 0.6]])
    targets = torch.tensor([0, 1, 0, 2])
    acc = topk_accuracy(logits, targets, ks=(1, 2, 3, 5))
    assert acc[1] == 0.5  # rows 0 and 3
    assert acc[2] == 1.0  # row 1's 0.2 is second, row 2's 0.3 is second
    assert acc[3] == 1.0 and acc[5] == 1.0  # k beyond the number of classes counts every row
