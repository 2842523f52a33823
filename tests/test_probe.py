"""The probes on synthetic digits: frozen weights stay bit-identical, heads fold, seeds repeat."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fewshot.data import draw_labels, labeled_tensors, load_mnist
from fewshot.linear_head import (
    FeatureSet,
    FrozenEncoderHead,
    L2Normalize,
    cached_features,
    fold,
    new_head,
    train_linear_head,
)
from fewshot.probe import (
    PROBES,
    FrozenWeightsChanged,
    ProbeContext,
    ProbeSettings,
    check_unchanged,
    freeze,
    run_probe,
)
from fewshot.train import FitConfig
from tests.encoders import same_weights, tiny_encoder


@pytest.fixture(scope="module")
def setup(synthetic_data_dir: Path) -> dict:
    mnist = load_mnist(synthetic_data_dir)
    draw = draw_labels(mnist.train_labels, seed=0, labels_per_class=10)
    encoder = tiny_encoder(seed=5)
    features = cached_features(encoder, mnist, draw, torch.device("cpu"))
    return {"mnist": mnist, "draw": draw, "features": features, "images": labeled_tensors(mnist, draw, "cpu")}


def _context(setup: dict, encoder: torch.nn.Module, settings: ProbeSettings, seed: int = 0) -> ProbeContext:
    return ProbeContext(
        encoder=encoder, features=setup["features"], images=setup["images"], settings=settings,
        generator=torch.Generator().manual_seed(seed), device=torch.device("cpu"), mnist=setup["mnist"],
        draw=setup["draw"],
    )  # fmt: skip


def test_cached_features_cover_the_draw_and_the_test_set(setup: dict) -> None:
    features = setup["features"]
    assert features.train.shape == (75, 32) and features.val.shape == (25, 32) and features.test.shape == (200, 32)
    assert torch.equal(features.y_train, setup["mnist"].train_labels[setup["draw"].train_idx])


@pytest.mark.parametrize("augment", [False, True])
def test_linear_probe_leaves_the_encoder_bit_identical(setup: dict, augment: bool) -> None:
    encoder = tiny_encoder(seed=5)
    loaded = tiny_encoder(seed=5)  # an independent copy of what was loaded
    settings = ProbeSettings(fit=FitConfig(epochs=4, lr=1e-2, progress=False), augment=augment)
    result = run_probe("linear", _context(setup, encoder, settings))
    assert same_weights(encoder, loaded)  # weights and batch-norm running statistics
    assert not any(p.requires_grad for p in encoder.parameters()) and not encoder.training
    assert result.frozen and result.fit.epochs_run == 4
    assert result.test_scores.shape == (200, 10)
    # the classifier (encoder + folded head) reproduces the probe's scores from images
    with torch.no_grad():
        assert torch.allclose(result.classifier(setup["images"].x_test), result.test_scores, atol=1e-4)


def test_the_refit_trains_on_all_labels_and_keeps_the_validation_scores_held_out(setup: dict) -> None:
    fit_cfg = FitConfig(epochs=30, lr=1e-2, progress=False)
    early, refitted = (
        run_probe("linear", _context(setup, tiny_encoder(seed=5), ProbeSettings(fit=fit_cfg, refit=refit)))
        for refit in (False, True)
    )
    # the reported validation scores are the early-stopped head's, which never saw those labels
    assert torch.equal(early.val_scores, refitted.val_scores)
    assert not torch.equal(early.test_scores, refitted.test_scores)
    features = setup["features"]
    with torch.no_grad():
        val_fit = [(r.head(features.val).argmax(1) == features.y_val).float().mean().item() for r in (early, refitted)]
    assert val_fit[1] > val_fit[0]  # the refitted head learned the 25 validation images too
    everything = features.all_labels()
    assert everything.train.shape[0] == 100 and everything.val.shape[0] == 0


def test_the_frozen_check_catches_moving_batch_norm_statistics(setup: dict) -> None:
    encoder = tiny_encoder(seed=5)
    snapshot = freeze(encoder)
    check_unchanged(encoder, snapshot)
    encoder.train()  # the mistake the protocol guards against: BN in train mode updates its statistics
    with torch.no_grad():
        encoder(setup["images"].x_train)
    with pytest.raises(FrozenWeightsChanged, match="running_mean"):
        check_unchanged(encoder, snapshot)


def test_frozen_wrapper_keeps_batch_norm_in_eval_mode() -> None:
    encoder = tiny_encoder()
    model = FrozenEncoderHead(encoder, torch.nn.Linear(32, 10))
    model.train()
    assert model.head.training and not encoder.training


def test_folding_the_standardisation_into_the_head() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(50, 6, generator=g) * torch.tensor([1.0, 10, 0.1, 3, 1, 5]) + 4
    head = new_head(x, standardize=True, generator=g)
    with torch.no_grad():
        head[1].bias.normal_(generator=g)
        folded = fold(head)
        assert isinstance(folded, torch.nn.Linear)
        assert torch.allclose(folded(x), head(x), atol=1e-4)


@pytest.mark.parametrize("standardize", [True, False])
def test_folding_keeps_the_l2_normalisation_in_front(standardize: bool) -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(50, 6, generator=g) * torch.tensor([1.0, 10, 0.1, 3, 1, 5]) + 4
    head = new_head(x, standardize=standardize, generator=g, normalize=True)
    with torch.no_grad():
        head[-1].bias.normal_(generator=g) if not standardize else head[1][1].bias.normal_(generator=g)
        folded = fold(head)
        assert isinstance(folded[0], L2Normalize) and isinstance(folded[1], torch.nn.Linear) and len(folded) == 2
        assert torch.allclose(folded(x), head(x), atol=1e-4)
        assert torch.allclose(folded(3 * x), folded(x), atol=1e-5)  # only the direction of a feature counts
        plain = fold(new_head(x, standardize, g))
        assert not torch.allclose(plain(3 * x), plain(x))  # without it, the scale counts


@pytest.mark.parametrize("optimizer", ["adam", "adamw", "sgd", "adadelta", "adagrad", "lbfgs"])
def test_head_training_is_seeded_and_learns(setup: dict, optimizer: str) -> None:
    features: FeatureSet = setup["features"]
    lr = {"adadelta": 1.0, "lbfgs": 0.5}.get(optimizer, 1e-2)
    cfg = FitConfig(optimizer=optimizer, lr=lr, epochs=30, progress=False)
    heads = [train_linear_head(features, cfg, True, torch.Generator().manual_seed(3))[0] for _ in range(2)]
    assert torch.equal(heads[0].weight, heads[1].weight)
    with torch.no_grad():
        train_acc = (heads[0](features.train).argmax(1) == features.y_train).float().mean().item()
    assert train_acc > 0.5  # chance is 0.1


def test_knn_probe_uses_the_training_bank(setup: dict) -> None:
    settings = ProbeSettings(knn_k=3, knn_temperature=0.07)
    result = run_probe("knn", _context(setup, tiny_encoder(seed=5), settings))
    assert result.head.bank.shape == (75, 32) and result.fit is None
    assert result.val_scores.shape == (25, 10) and (result.test_scores >= 0).all()
    with torch.no_grad():
        assert torch.allclose(result.classifier(setup["images"].x_test[:20]), result.test_scores[:20], atol=1e-4)


def test_finetune_trains_a_copy_with_a_smaller_encoder_lr(setup: dict) -> None:
    encoder = tiny_encoder(seed=5)
    lrs: list[float] = []
    settings = ProbeSettings(fit=FitConfig(epochs=3, lr=1e-2, progress=False), encoder_lr_ratio=0.1)
    ctx = _context(setup, encoder, settings)
    ctx.on_epoch = lambda epoch, metrics: lrs.append(metrics["lr"])
    result = run_probe("finetune", ctx)
    assert same_weights(encoder, tiny_encoder(seed=5))  # the loaded encoder did not move
    assert not same_weights(result.classifier.encoder, encoder)  # its fine-tuned copy did
    assert not result.frozen and result.test_scores.shape == (200, 10)
    assert max(lrs) <= 1e-3 + 1e-12  # group 0 is the encoder: lr * 0.1 at the one-cycle peak


def test_finetune_refit_retrains_on_all_labels_after_the_held_out_fit(setup: dict) -> None:
    fit_cfg = FitConfig(epochs=3, lr=1e-2, progress=False)
    results = {}
    for refit in (False, True):
        encoder = tiny_encoder(seed=5)
        epochs: list[int] = []
        ctx = _context(setup, encoder, ProbeSettings(fit=fit_cfg, refit=refit))
        ctx.on_epoch = lambda epoch, metrics, epochs=epochs: epochs.append(epoch)
        results[refit] = (run_probe("finetune", ctx), epochs)
        assert same_weights(encoder, tiny_encoder(seed=5))
    (plain, plain_epochs), (refitted, refit_epochs) = results[False], results[True]
    assert plain_epochs == refit_epochs == [0, 1, 2]  # the logged curves are of the held-out fit only
    assert torch.equal(plain.val_scores, refitted.val_scores)  # validation scores come before the refit
    assert not torch.allclose(plain.test_scores, refitted.test_scores)  # the test scores come after it
    assert not same_weights(plain.classifier.encoder, refitted.classifier.encoder)


def test_finetune_tta_scores_average_warped_copies_and_keep_the_classifiers_own(setup: dict) -> None:
    settings = ProbeSettings(fit=FitConfig(epochs=2, lr=1e-2, progress=False), tta_views=4)
    result = run_probe("finetune", _context(setup, tiny_encoder(seed=5), settings))
    x_test = setup["images"].x_test
    with torch.no_grad():
        own = result.classifier(x_test)
    assert result.plain_test_scores is not None and torch.allclose(own, result.plain_test_scores, atol=1e-5)
    assert not torch.allclose(result.test_scores, result.plain_test_scores, atol=1e-3)
    assert torch.allclose(result.test_scores.exp().sum(1), torch.ones(len(x_test)), atol=1e-4)  # log mean softmax


def test_the_probe_registry_is_open() -> None:
    assert set(PROBES) >= {"linear", "knn", "finetune"}
