import math

import pytest
import torch
from torch import nn

from fewshot.errors import TrainingDiverged, UserError
from fewshot.train import EarlyStopping, FitConfig, fit


def test_early_stopping_counts_patience_and_min_delta() -> None:
    model = nn.Linear(2, 2)
    stopper = EarlyStopping(patience=2, min_delta=0.1)
    assert stopper.update(0, 1.0, model)
    assert not stopper.update(1, 0.95, model)  # better, but by less than min_delta
    assert not stopper.should_stop
    assert not stopper.update(2, 0.99, model)
    assert stopper.should_stop and stopper.best_epoch == 0 and stopper.best_loss == 1.0


def test_early_stopping_uses_the_best_not_the_mean() -> None:
    # the report stopped on the running mean of all validation losses; we keep the minimum
    model = nn.Linear(2, 2)
    stopper = EarlyStopping(patience=3)
    for epoch, loss in enumerate([5.0, 4.0, 0.5, 0.6, 0.7]):
        stopper.update(epoch, loss, model)
    assert stopper.best_epoch == 2 and not stopper.should_stop


def test_patience_zero_never_stops() -> None:
    stopper = EarlyStopping(patience=0)
    for epoch in range(50):
        stopper.update(epoch, 1.0 + epoch, nn.Linear(1, 1))
    assert not stopper.should_stop


def _toy_data(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(60, 4, generator=g)
    y = (x[:, 0] > 0).long()
    return x, y


def test_fit_restores_best_weights_and_is_deterministic() -> None:
    x, y = _toy_data()
    results = []
    for _ in range(2):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
        cfg = FitConfig(epochs=30, lr=0.05, batch_size=16, patience=5, progress=False)
        result = fit(model, (x[:40], y[:40]), (x[40:], y[40:]), cfg, torch.Generator().manual_seed(1))
        results.append((result, model))
    (r1, m1), (r2, m2) = results
    assert [h["val_loss"] for h in r1.history] == [h["val_loss"] for h in r2.history]
    assert all(torch.equal(a, b) for a, b in zip(m1.state_dict().values(), m2.state_dict().values(), strict=True))
    best = min(h["val_loss"] for h in r1.history)
    assert math.isclose(r1.best_val_loss, best)
    with torch.no_grad():
        restored = nn.functional.cross_entropy(m1(x[40:]), y[40:]).item()
    assert math.isclose(restored, best, rel_tol=1e-5)


def test_fit_resume_matches_uninterrupted_run() -> None:
    x, y = _toy_data()
    cfg = FitConfig(epochs=12, lr=0.05, batch_size=16, progress=False)

    def fresh() -> nn.Module:
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))

    full = fit(fresh(), (x[:40], y[:40]), (x[40:], y[40:]), cfg, torch.Generator().manual_seed(1))
    saved: dict = {}

    def keep(state: dict) -> None:
        if state["epoch"] == 4:
            saved.update(state)

    class Killed(Exception):
        pass

    def kill(epoch: int, metrics: dict) -> None:
        if epoch == 6:
            raise Killed

    with pytest.raises(Killed):
        fit(fresh(), (x[:40], y[:40]), (x[40:], y[40:]), cfg, torch.Generator().manual_seed(1), on_epoch=kill,
            on_checkpoint=keep)  # fmt: skip
    resumed = fit(fresh(), (x[:40], y[:40]), (x[40:], y[40:]), cfg, torch.Generator(), resume_state=saved)
    assert [h["val_loss"] for h in resumed.history] == [h["val_loss"] for h in full.history]


def test_divergence_is_reported() -> None:
    x, y = _toy_data()
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    with torch.no_grad():
        model[0].weight.fill_(float("nan"))
    with pytest.raises(TrainingDiverged, match="--lr"):
        fit(model, (x, y), (x, y), FitConfig(epochs=3, progress=False), torch.Generator())


@pytest.mark.parametrize(
    "field, value", [("optimizer", "rmsprop"), ("lr", -1.0), ("epochs", 0), ("batch_size", 0), ("patience", -1)]
)
def test_config_validation(field: str, value) -> None:
    cfg = FitConfig(**{field: value})
    with pytest.raises(UserError, match=field.replace("_", "-")):
        cfg.validate()
