"""HPO in one process: config checks, folds, no test leakage, nesting with threads, run states,
resume, and the champion/challenger rule across two MoCo studies (real Optuna, MLflow, torch)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import optuna
import pytest
import torch
from mlflow import MlflowClient

from fewshot.data import IDX_FILES, draw_labels, load_mnist
from fewshot.errors import UserError
from fewshot.hpo import Budget, HpoConfig, open_storage, run_hpo
from fewshot.hpo.folds import LabeledSet, make_splits
from fewshot.hpo.targets import Outcome
from fewshot.hpo.trials import TrialRunner
from fewshot.tracking import start_run
from tests.hpo_helpers import load, storage_url, study_runs, write_encoder_checkpoint
from tests.synthetic import idx_bytes

FAST_LINEAR = {"target": "linear", "budget": "12", "folds": 3, "pruner": "none"}


@pytest.fixture(scope="module")
def encoder_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_encoder_checkpoint(tmp_path_factory.mktemp("encoder") / "encoder.pt")


def test_budget_and_config_checks() -> None:
    assert Budget.parse("3", "moco") == Budget(epochs=3)
    assert Budget.parse("2min", "moco") == Budget(minutes=2.0)
    assert Budget.parse("", "linear") == Budget(epochs=100)
    for text, target in [("2min", "linear"), ("abc", "moco"), ("0", "baseline")]:
        with pytest.raises(UserError, match="--budget"):
            Budget.parse(text, target)
    with pytest.raises(UserError, match="--folds 1"):
        HpoConfig(folds=1).validate()
    with pytest.raises(UserError, match="--study-name"):
        HpoConfig(study_name="bad name; drop table").validate()


def test_folds_are_stratified_and_cover_the_labels(synthetic_data_dir: Path) -> None:
    mnist = load_mnist(synthetic_data_dir)
    labeled = LabeledSet.from_draw(mnist, draw_labels(mnist.train_labels, 0), torch.device("cpu"))
    splits = make_splits(labeled, 5, seed=0)
    assert len(splits) == 5
    assert sorted(torch.cat([s.val for s in splits]).tolist()) == list(range(100))
    for split in splits:
        assert np.bincount(labeled.y[split.val].numpy(), minlength=10).tolist() == [2] * 10
        assert not set(split.train.tolist()) & set(split.val.tolist())
    (only,) = make_splits(labeled, 0, seed=0)
    assert (len(only.train), len(only.val)) == (75, 25)
    with pytest.raises(UserError, match="--folds 11"):
        make_splits(labeled, 11, seed=0)


def _corrupt_test_set(src: Path, dst: Path) -> Path:
    """A copy of the data whose test images are noise and test labels shuffled."""
    shutil.copytree(src, dst)
    rng = np.random.default_rng(7)
    mnist = load_mnist(src)
    images = rng.integers(0, 256, size=tuple(mnist.test_images.shape), dtype=np.uint8)
    labels = rng.permutation(mnist.test_labels.numpy()).astype(np.uint8)
    import gzip

    (dst / (IDX_FILES["test_images"] + ".gz")).write_bytes(gzip.compress(idx_bytes(images)))
    (dst / (IDX_FILES["test_labels"] + ".gz")).write_bytes(gzip.compress(idx_bytes(labels)))
    return dst


def test_no_test_set_leakage(synthetic_data_dir: Path, tracking_store: str, encoder_path: Path, tmp_path: Path) -> None:
    """Corrupting the test set changes the winner's report-only test score, never a trial value."""
    corrupt = _corrupt_test_set(synthetic_data_dir, tmp_path / "corrupt")
    results = {}
    for name, data in [("clean", synthetic_data_dir), ("corrupt", corrupt)]:
        cfg = HpoConfig(**FAST_LINEAR, n_trials=4, study_name=name, data_dir=str(data), encoder=str(encoder_path))
        results[name] = run_hpo(cfg, echo=lambda *_: None)
    trials = {n: load(n, storage_url(tracking_store)).trials for n in results}
    assert [t.value for t in trials["clean"]] == [t.value for t in trials["corrupt"]]
    assert [t.params for t in trials["clean"]] == [t.params for t in trials["corrupt"]]
    assert [t.intermediate_values for t in trials["clean"]] == [t.intermediate_values for t in trials["corrupt"]]
    clean, noisy = results["clean"].test_metrics["test_top1"], results["corrupt"].test_metrics["test_top1"]
    assert clean != noisy, "the test set is read, for the winner's report only"
    assert results["clean"].best_value == results["corrupt"].best_value


def test_nesting_with_two_threads(synthetic_data_dir: Path, tracking_store: str, encoder_path: Path) -> None:
    cfg = HpoConfig(**{**FAST_LINEAR, "pruner": "median"}, n_trials=6, n_jobs=2, study_name="threads",
                    data_dir=str(synthetic_data_dir), encoder=str(encoder_path))  # fmt: skip
    result = run_hpo(cfg, echo=lambda *_: None)
    runs = study_runs("threads")
    parents = [r for r in runs if r.data.tags.get("job") == "hpo"]
    children = [r for r in runs if r.data.tags.get("job") == "hpo-trial"]
    assert [p.info.run_id for p in parents] == [result.parent_run_id]
    study = load("threads", storage_url(tracking_store))
    assert len(children) == len(study.trials) >= 6
    expected = {"COMPLETE": "FINISHED", "PRUNED": "KILLED", "FAIL": "FAILED"}
    for child in children:
        assert child.data.tags["mlflow.parentRunId"] == result.parent_run_id
        assert child.info.status == expected[child.data.tags["optuna.trial_state"]]
    assert sorted(int(c.data.tags["optuna.trial_number"]) for c in children) == [t.number for t in study.trials]
    artifacts = {a.path for a in MlflowClient().list_artifacts(result.parent_run_id, "hpo")}
    for name in ("trials.csv", "optimization_history.png", "param_importances.png", "parallel_coordinate.png",
                 "slice.png", "best.json"):  # fmt: skip
        assert f"hpo/{name}" in artifacts
    parent = MlflowClient().get_run(result.parent_run_id)
    assert parent.data.metrics["best_value"] == study.best_value
    assert parent.data.tags["test_metrics"].startswith("report-only")


class ScriptedTarget:
    """A target whose outcome is set by the trial number: complete, pruned, failed."""

    name = "scripted"
    measure = "score"

    def suggest(self, trial: optuna.Trial) -> dict:
        return {"x": trial.suggest_float("x", 0, 1)}

    def evaluate(self, params: dict, report, log_step) -> Outcome:
        number = self.number
        report(0, 0.5)
        if number == 1:
            raise optuna.TrialPruned("scripted")
        if number == 2:
            raise RuntimeError("scripted failure")
        return Outcome(0.75)


def test_child_run_status_follows_the_trial_state(tracking_store: str) -> None:
    target = ScriptedTarget()
    storage = open_storage(storage_url(tracking_store))
    study = optuna.create_study(direction="maximize", storage=storage, study_name="states")
    with start_run("states-parent", tags={"optuna.study_name": "states", "job": "hpo"}) as parent:
        runner = TrialRunner(target, parent.run_id, "states", storage)
        for number in range(3):
            target.number = number
            study.optimize(runner, n_trials=1, catch=(RuntimeError,))
    by_trial = {
        int(r.data.tags["optuna.trial_number"]): r
        for r in study_runs("states")
        if r.data.tags.get("job") == "hpo-trial"
    }
    assert [(by_trial[i].info.status, by_trial[i].data.tags["optuna.trial_state"]) for i in range(3)] == [
        ("FINISHED", "COMPLETE"), ("KILLED", "PRUNED"), ("FAILED", "FAIL"),
    ]  # fmt: skip
    assert [t.state.name for t in study.trials] == ["COMPLETE", "PRUNED", "FAIL"]
    assert all(r.data.tags["mlflow.parentRunId"] == parent.run_id for r in by_trial.values())


def test_resume_reaches_the_study_total(synthetic_data_dir: Path, tracking_store: str, encoder_path: Path) -> None:
    common = dict(**FAST_LINEAR, study_name="resume", data_dir=str(synthetic_data_dir), encoder=str(encoder_path))
    first = run_hpo(HpoConfig(**common, n_trials=2), echo=lambda *_: None)
    second = run_hpo(HpoConfig(**common, n_trials=4), echo=lambda *_: None)
    third = run_hpo(HpoConfig(**common, n_trials=4), echo=lambda *_: None)
    assert (first.trials_run, second.trials_run, third.trials_run) == (2, 2, 0)
    study = load("resume", storage_url(tracking_store))
    assert [t.number for t in study.trials] == [0, 1, 2, 3]
    parents = {r.info.run_id for r in study_runs("resume") if r.data.tags.get("job") == "hpo"}
    assert parents == {first.parent_run_id, second.parent_run_id, third.parent_run_id}
    with pytest.raises(UserError, match="folds '3' \\(now '0'\\)"):
        run_hpo(HpoConfig(**{**common, "folds": 0}, n_trials=5), echo=lambda *_: None)


def test_champion_and_challenger_across_two_moco_studies(synthetic_data_dir: Path, tracking_store: str) -> None:
    """Study A registers the champion; study B (same seed, so the same best score, not better)
    registers a challenger and leaves the champion where it was."""
    tiny = {"batch_size": 32, "bn_splits": 4, "max_steps_per_epoch": 1}
    common = dict(target="moco", n_trials=2, budget="2", data_dir=str(synthetic_data_dir), moco_overrides=tiny,
                  pruner="none")  # fmt: skip
    a = run_hpo(HpoConfig(**common, study_name="moco-a"), echo=lambda *_: None)
    b = run_hpo(HpoConfig(**common, study_name="moco-b"), echo=lambda *_: None)
    assert a.registered is not None and b.registered is not None
    assert a.registered[1] == "champion" and b.registered[1] == "challenger"
    client = MlflowClient()
    assert str(client.get_model_version_by_alias("fewshot-moco-encoder", "champion").version) == str(a.registered[0])
    tags = client.get_model_version("fewshot-moco-encoder", str(b.registered[0])).tags
    assert tags["study"] == "moco-b" and tags["trial"] == str(b.best_trial)
    assert float(tags["val_score"]) == pytest.approx(b.best_value, abs=1e-6)
    assert float(tags["test_top1"]) == pytest.approx(b.test_metrics["test_top1"], abs=1e-6)
    assert tags["val_measure"] == "loo_knn_accuracy" and "report-only" in tags["test_score"]
    assert client.get_run(tags["source_run"]).data.tags["optuna.study_name"] == "moco-b"
    again = run_hpo(HpoConfig(**common, study_name="moco-b"), echo=lambda *_: None)  # resumed, nothing to run
    assert again.registered == b.registered  # not registered twice
