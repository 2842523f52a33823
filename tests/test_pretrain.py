"""The pretraining loop: validation, checkpoints, resume, the MLflow job and its CLI."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import mlflow
import pytest
import torch
from mlflow.tracking import MlflowClient

from fewshot.data import draw_labels, load_mnist
from fewshot.errors import TrainingDiverged, UserError
from fewshot.models import build_encoder
from fewshot.pretrain import PretrainConfig, encoder_from_checkpoint, load_checkpoint, loo_knn_accuracy, pretrain
from fewshot.pretrain.job import run_pretrain
from fewshot.pretrain.loop import _drain
from tests.conftest import PROJECT_ROOT, run_cli, run_group

TIMING = ("images_per_s", "elapsed_s", "augment_share", "evaluate_s")


def tiny(data_dir: Path, **changes) -> PretrainConfig:
    cfg = PretrainConfig(
        width=4, epochs=3, batch_size=32, moco_k=96, bn_splits=4, max_steps_per_epoch=3, progress=False,
        data_dir=str(data_dir), checkpoint_minutes=0, warmup_epochs=0.5,
    )  # fmt: skip
    return replace(cfg, **changes)


@pytest.fixture(scope="module")
def data(synthetic_data_dir):
    mnist = load_mnist(str(synthetic_data_dir))
    return mnist, draw_labels(mnist.train_labels, 0)


def without_timing(history: list[dict[str, float]]) -> list[dict[str, float]]:
    return [{k: v for k, v in row.items() if k not in TIMING} for row in history]


@pytest.mark.parametrize(
    ("change", "option"),
    [
        ({"moco_k": 8}, "--moco-k"),
        ({"moco_k": 40}, "--moco-k 40"),  # smaller than a batch of 64
        ({"moco_m": 1.0}, "--moco-m"),
        ({"moco_t": 0.0}, "--moco-t"),
        ({"lr": -1.0}, "--lr"),
        ({"lr": float("nan")}, "--lr"),
        ({"epochs": 0}, "--epochs"),
        ({"batch_size": 1}, "--batch-size"),
        ({"arch": "vgg"}, "--arch vgg"),
        ({"bn_splits": 3}, "--bn-splits 3"),
        ({"augment": "flips"}, "--augment"),
        ({"positive": "neighbour"}, "--positive neighbour"),
        ({"positive": "nearest", "nearest_k": 0}, "--nearest-k 0"),
        ({"positive": "nearest", "nearest_k": 4096}, "--nearest-k 4096"),  # no negatives would be left
    ],
)
def test_bad_settings_are_refused_naming_the_option(change, option):
    cfg = replace(PretrainConfig(batch_size=64), **change)
    with pytest.raises(UserError, match=option):
        cfg.validate()


def test_pretrain_reports_epochs_and_returns_a_plain_encoder(data, tmp_path):
    mnist, draw = data
    seen = []
    result = pretrain(tiny(tmp_path, epochs=2), mnist, draw, on_epoch=lambda e, m: seen.append((e, m)))
    assert [e for e, _ in seen] == [0, 1]
    for _, metrics in seen:
        assert {"loss", "contrastive_acc", "lr", "moco_m", "images_per_s", "knn_val_acc", "knn_test_acc"} <= set(
            metrics
        )
        assert 0 < metrics["loss"] < 20
    assert type(result.encoder) is type(build_encoder("digit", 4))
    assert not any("Split" in type(m).__name__ for m in result.encoder.modules())
    assert result.encoder(torch.rand(3, 1, 28, 28)).shape == (3, result.encoder.feature_dim)
    assert result.steps == 6 and len(result.history) == 2


def test_nearest_positives_train_another_encoder_from_the_same_start(data, tmp_path):
    own_key = pretrain(tiny(tmp_path, epochs=1, positive="key"), *data)
    nearest = pretrain(tiny(tmp_path, epochs=1, positive="nearest", nearest_k=1), *data)
    assert 0 < nearest.history[-1]["loss"] < 20
    assert own_key.history[-1]["loss"] != nearest.history[-1]["loss"]
    state, other = own_key.encoder.state_dict(), nearest.encoder.state_dict()
    assert any(not torch.equal(state[name], other[name]) for name in state)
    five = pretrain(tiny(tmp_path, epochs=1, positive="nearest", nearest_k=5), *data)
    assert five.history[-1]["loss"] not in (own_key.history[-1]["loss"], nearest.history[-1]["loss"])


def test_on_epoch_exceptions_propagate(data, tmp_path):
    class Pruned(Exception):
        pass

    def prune(epoch, metrics):
        raise Pruned

    with pytest.raises(Pruned):
        pretrain(tiny(tmp_path), *data, on_epoch=prune)


def test_same_seed_same_numbers_and_resume_reproduces_the_uninterrupted_run(data, tmp_path):
    mnist, draw = data
    cfg = tiny(tmp_path)
    reference = pretrain(cfg, mnist, draw)
    again = pretrain(cfg, mnist, draw)
    assert without_timing(again.history) == without_timing(reference.history)

    # killed after the second epoch's metrics, before its checkpoint: resume redoes epoch 2
    path = tmp_path / "a" / "last.pt"

    def kill_at_epoch_1(epoch, metrics):
        if epoch == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        pretrain(cfg, mnist, draw, on_epoch=kill_at_epoch_1, checkpoint_path=path)
    state = load_checkpoint(path)
    assert state["epoch"] == 1 and not state["finished"]
    resumed = pretrain(cfg, mnist, draw, checkpoint_path=path, resume_state=state)
    assert without_timing(resumed.history) == without_timing(reference.history)
    assert resumed.steps == reference.steps

    # killed mid-epoch right after a time-based checkpoint
    path = tmp_path / "b" / "last.pt"
    calls = []

    def kill_after_mid_epoch_checkpoint(p):
        calls.append(p)
        state = torch.load(p, weights_only=True)
        if state["mid_epoch"] is not None and state["epoch"] == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        pretrain(replace(cfg, checkpoint_minutes=1e-9), mnist, draw, checkpoint_path=path, on_checkpoint=kill_after_mid_epoch_checkpoint)  # fmt: skip
    state = load_checkpoint(path)
    assert state["mid_epoch"]["step_in_epoch"] == 1
    resumed = pretrain(replace(cfg, checkpoint_minutes=1e-9), mnist, draw, resume_state=state)
    assert without_timing(resumed.history) == without_timing(reference.history)
    for key, value in reference.encoder.state_dict().items():
        assert torch.equal(value, resumed.encoder.state_dict()[key]), key


def test_checkpoint_contract(data, tmp_path):
    path = tmp_path / "last.pt"
    result = pretrain(tiny(tmp_path, epochs=1), *data, checkpoint_path=path, checkpoint_extra={"mlflow_run_id": "abc"})
    state = torch.load(path, weights_only=True)  # only safe types
    assert state["format"] == "fewshot-moco-checkpoint" and state["version"] == 1
    assert state["encoder_spec"] == {"arch": "digit", "width": 4}
    assert state["mlflow_run_id"] == "abc" and state["finished"] and state["step"] == 3
    assert "queue" in state["moco_state"] and "queue_ptr" in state["moco_state"]
    assert not any(k.startswith(("head", "0.", "projection")) for k in state["encoder_state"])
    encoder = encoder_from_checkpoint(state)
    x = torch.rand(4, 1, 28, 28)
    assert torch.allclose(encoder(x), result.encoder(x))


def test_missing_or_corrupt_checkpoints_are_refused(tmp_path):
    with pytest.raises(UserError, match="no such checkpoint"):
        load_checkpoint(tmp_path / "nope.pt")
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="not a readable checkpoint"):
        load_checkpoint(bad)
    torch.save({"format": "something-else"}, bad)
    with pytest.raises(UserError, match="not a fewshot MoCo checkpoint"):
        load_checkpoint(bad)


def test_nan_loss_stops_with_a_message():
    sums = {"loss": 0.0, "acc": 0.0}
    with pytest.raises(TrainingDiverged, match="lower --lr"):
        _drain(torch.tensor([float("nan"), 0.0]), sums, PretrainConfig(), epoch=0, step=5)


def test_loo_knn_accuracy():
    features = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]])
    assert loo_knn_accuracy(features, torch.tensor([0, 0, 1, 1]), k=1) == 1.0
    assert loo_knn_accuracy(features, torch.tensor([0, 1, 0, 1]), k=1) == 0.0


def test_mlflow_run_resumes_the_same_run_without_duplicate_steps_and_registers(
    synthetic_data_dir, tracking_store, tmp_path
):
    cfg = tiny(synthetic_data_dir, epochs=3)

    def kill(epoch, metrics):
        if epoch == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_pretrain(cfg, checkpoint_dir=tmp_path / "ck", run_name="r", on_epoch=kill)
    client = MlflowClient()
    (killed,) = client.search_runs([client.get_experiment_by_name("fewshot").experiment_id])
    assert killed.info.status == "KILLED"
    out = run_pretrain(cfg, checkpoint_dir=tmp_path / "ck", run_name="r", register=True)
    assert out["run_id"] == killed.info.run_id
    run = client.get_run(out["run_id"])
    assert run.info.status == "FINISHED"
    for key in ("loss", "knn_val_acc", "contrastive_acc", "lr", "moco_m", "images_per_s", "knn_test_acc"):
        assert sorted(m.step for m in client.get_metric_history(out["run_id"], key)) == [0, 1, 2], key
    version = client.get_model_version_by_alias("fewshot-moco-encoder", "champion")
    assert version.tags["run_id"] == out["run_id"] and "knn_test_acc" in version.tags and version.tags["epochs"] == "3"
    assert float(version.tags["val_score"]) == pytest.approx(out["loo_knn_acc"], abs=1e-6)

    # the logged encoder loads in a fresh process with plain mlflow.pytorch.load_model
    code = (
        "import mlflow, torch; m = mlflow.pytorch.load_model('models:/fewshot-moco-encoder@champion'); "
        "print(tuple(m(torch.rand(2, 1, 28, 28)).shape))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300,
        env={**__import__("os").environ, "MLFLOW_TRACKING_URI": tracking_store},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().endswith("(2, 16)")

    # a finished checkpoint is not resumed: `auto` starts a new run
    again = run_pretrain(replace(cfg, epochs=1), checkpoint_dir=tmp_path / "ck2", run_name="r")
    assert again["run_id"] != out["run_id"]


def test_diverged_run_is_marked_failed(synthetic_data_dir, tracking_store, tmp_path):
    def diverge(epoch, metrics):
        raise TrainingDiverged("MoCo loss became nan")

    with pytest.raises(TrainingDiverged):
        run_pretrain(tiny(synthetic_data_dir, epochs=1), checkpoint_dir=tmp_path, run_name="d", on_epoch=diverge)
    client = MlflowClient()
    (run,) = client.search_runs([client.get_experiment_by_name("fewshot").experiment_id])
    assert run.info.status == "FAILED"


def test_cli_bad_input_is_one_line_and_leaves_no_running_run(synthetic_data_dir, tracking_store, tmp_path):
    common = ["--data-dir", str(synthetic_data_dir), "--width", "4", "--checkpoint-dir", str(tmp_path)]
    for args, needle in (
        (["--moco-k", "8"], "--moco-k 8"),
        (["--resume", str(tmp_path / "missing.pt")], "no such checkpoint"),
    ):
        done = run_cli("entrypoints.moco_pretrain", *common, *args, env={"MLFLOW_TRACKING_URI": tracking_store})
        assert done.returncode == 2, done.stderr
        lines = [line for line in done.stderr.strip().splitlines() if line.startswith("error:")]
        assert len(lines) == 1 and needle in lines[0], done.stderr
    mlflow.set_tracking_uri(tracking_store)
    experiment = MlflowClient().get_experiment_by_name("fewshot")
    if experiment is not None:
        assert not [r for r in MlflowClient().search_runs([experiment.experiment_id]) if r.info.status == "RUNNING"]


def test_torchrun_entry_point_runs_on_cpu(synthetic_data_dir, tracking_store, tmp_path):
    env = {**__import__("os").environ, "MLFLOW_TRACKING_URI": tracking_store, "OMP_NUM_THREADS": "1"}
    env.pop("MLFLOW_RUN_ID", None)
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        "-m", "entrypoints.moco_pretrain", "--data-dir", str(synthetic_data_dir), "--width", "4", "--epochs", "1",
        "--batch-size", "16", "--moco-k", "64", "--checkpoint-dir", str(tmp_path), "--no-progress", "--no-knn-test",
    ]  # fmt: skip
    done = run_group(cmd, timeout=300, cwd=PROJECT_ROOT, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    client = MlflowClient(tracking_store)
    (run,) = client.search_runs([client.get_experiment_by_name("fewshot").experiment_id])
    assert run.info.status == "FINISHED" and run.data.params["world_size"] == "2"
