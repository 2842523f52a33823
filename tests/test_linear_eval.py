"""The linear_eval job end to end on synthetic digits, and its logged classifier in a fresh process."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pytest
from click.testing import CliRunner
from mlflow.tracking import MlflowClient

from entrypoints.linear_eval import main as linear_eval_command
from fewshot import tracking
from fewshot.data import load_mnist, to_unit
from fewshot.encoder_source import resolve_encoder
from fewshot.linear_eval import LinearEvalConfig, run_linear_eval
from fewshot.train import FitConfig
from tests.encoders import ENCODER_NAME, log_encoder, same_weights, tiny_encoder, write_checkpoint

PREDICT = """
import json, sys
import mlflow, numpy as np, torch
model = mlflow.pytorch.load_model(sys.argv[1])
images = torch.from_numpy(np.load(sys.argv[2]))
with torch.no_grad():
    digits = model(images).argmax(1).tolist()
print(json.dumps({"digits": digits, "module": type(model).__module__ + "." + type(model).__name__}))
"""


def _artifacts(client: MlflowClient, run_id: str, path: str = "") -> set[str]:
    found = set()
    for item in client.list_artifacts(run_id, path):
        found |= _artifacts(client, run_id, item.path) if item.is_dir else {item.path}
    return found


def test_registered_champion_linear_probe_logs_everything(
    synthetic_data_dir: Path, tracking_store: str, tmp_path: Path
) -> None:
    encoder = tiny_encoder(seed=7)
    pretrain_run, version, _ = log_encoder(encoder, score=0.8)
    cfg = LinearEvalConfig(data_dir=str(synthetic_data_dir), seed=1,
                           fit=FitConfig(epochs=25, lr=1e-2, progress=False))  # fmt: skip
    result = run_linear_eval(cfg)
    client = MlflowClient()
    run = client.get_run(result["run_id"])
    assert run.info.status == "FINISHED"
    params, tags, metrics = run.data.params, run.data.tags, run.data.metrics
    assert params["encoder_uri"] == f"models:/{ENCODER_NAME}@champion" and params["encoder_version"] == str(version)
    assert params["encoder_run_id"] == pretrain_run and tags["encoder_run_id"] == pretrain_run
    assert params["probe"] == "linear" and params["optimizer"] == "adamw" and params["standardize"] == "True"
    assert params["feature_grid"] == "2" and params["refit"] == "True" and params["normalize"] == "True"
    assert tags["frozen_check"] == "passed" and tags["job"] == "linear_eval"
    for split in ("val", "test"):
        assert all(0 <= metrics[f"{split}_top{k}"] <= 1 for k in range(1, 6))
        assert all(f"{split}_acc_class{d}" in metrics for d in range(10))
    assert metrics["test_top5"] >= metrics["test_top1"] > 0.2  # chance is 0.1
    assert metrics["head_seconds"] < 10
    for name in ("train_loss", "train_acc", "val_loss", "val_acc"):
        assert [m.step for m in client.get_metric_history(run.info.run_id, name)] == list(range(25))
    artifacts = _artifacts(client, run.info.run_id)
    for expected in ("data/labeled_draw.json", "evaluation/test_confusion_matrix.png",
                     "evaluation/test_confusion_matrix.csv", "evaluation/val_confusion_matrix.csv",
                     "evaluation/learning_curves.png", "evaluation/embedding_pca.png"):  # fmt: skip
        assert expected in artifacts
    models = {m.name: m for m in client.search_logged_models(experiment_ids=[run.info.experiment_id])
              if m.source_run_id == run.info.run_id}  # fmt: skip
    assert set(models) == {"head", "classifier"}

    # the classifier predicts digits from 28x28 images in a fresh process
    mnist = load_mnist(synthetic_data_dir)
    images = tmp_path / "test_images.npy"
    np.save(images, to_unit(mnist.test_images).numpy())
    proc = subprocess.run([sys.executable, "-c", PREDICT, result["classifier_uri"], str(images)],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    answer = json.loads(proc.stdout.strip().splitlines()[-1])
    assert answer["module"].startswith("torch.jit."), "a traced module: loading it runs no fewshot code"
    accuracy = float(np.mean(np.array(answer["digits"]) == mnist.test_labels.numpy()))
    assert accuracy == pytest.approx(metrics["test_top1"], abs=1e-6)

    # the classifier's encoder is still the champion's, and can itself be probed again
    again, source = resolve_encoder(result["classifier_uri"])
    assert same_weights(again, encoder) and source.run_id == run.info.run_id


@pytest.mark.parametrize("probe, embedding", [("knn", "tsne"), ("finetune", "pca")])
def test_other_probes_from_a_checkpoint(synthetic_data_dir: Path, tracking_store: str, tmp_path: Path,
                                        probe: str, embedding: str) -> None:  # fmt: skip
    path = write_checkpoint(tmp_path / "moco.pt", tiny_encoder(seed=8))
    cfg = LinearEvalConfig(encoder=str(path), probe=probe, data_dir=str(synthetic_data_dir), embedding=embedding,
                           knn_k=5, fit=FitConfig(epochs=3, lr=1e-2, progress=False))  # fmt: skip
    result = run_linear_eval(cfg)
    run = MlflowClient().get_run(result["run_id"])
    assert run.info.status == "FINISHED" and run.data.params["probe"] == probe
    assert run.data.tags["encoder_source"] == "checkpoint" and len(run.data.tags["encoder_sha256"]) == 64
    assert run.data.params["augment"] == ("strong" if probe == "finetune" else "none")
    assert ("test_plain_top1" in run.data.metrics) == (probe == "finetune")  # fine-tuning reports TTA scores
    assert f"evaluation/embedding_{embedding}.png" in _artifacts(MlflowClient(), run.info.run_id)
    assert 0 <= result["test_top1"] <= result["test_top5"] <= 1


def test_a_probe_reading_two_maps_logs_a_classifier_that_loads_back(
    synthetic_data_dir: Path, tracking_store: str, tmp_path: Path
) -> None:
    encoder = tiny_encoder(seed=9)
    path = write_checkpoint(tmp_path / "moco.pt", encoder)
    cfg = LinearEvalConfig(encoder=str(path), feature_maps=2, data_dir=str(synthetic_data_dir), embedding="none",
                           fit=FitConfig(epochs=5, lr=1e-2, progress=False))  # fmt: skip
    result = run_linear_eval(cfg)
    run = MlflowClient().get_run(result["run_id"])
    assert run.data.params["feature_maps"] == "2" and run.data.params["feature_grid"] == "2"
    model_dir = tracking.fetch_model_files(result["classifier_uri"], str(tmp_path)).local_dir
    spec = json.loads((model_dir / "extra_files" / "spec.json").read_text())
    # 2x2 cells of the last map's 4w channels and of the 14x14 map's 2w channels
    assert spec["feature_maps"] == 2 and spec["feature_dim"] == (encoder.feature_dim + encoder.feature_dim // 2) * 4
    classifier = mlflow.pytorch.load_model(result["classifier_uri"])
    mnist = load_mnist(synthetic_data_dir)
    digits = classifier(to_unit(mnist.test_images)).argmax(1)
    assert float((digits == mnist.test_labels).float().mean()) == pytest.approx(result["test_top1"], abs=1e-6)
    again, _ = resolve_encoder(result["classifier_uri"])  # the spec's feature_dim checked against two maps
    assert same_weights(again, encoder)


@pytest.mark.parametrize(
    "args, option",
    [
        (["--probe", "svm"], "--probe"),
        (["--probe", "knn", "--augment", "online"], "--augment"),
        (["--probe", "finetune", "--optimizer", "lbfgs"], "--optimizer"),
        (["--knn-temperature", "0"], "--knn-temperature"),
        (["--standardize", "maybe"], "--standardize"),
        (["--feature-grid", "5"], "--feature-grid"),
        (["--feature-maps", "3"], "--feature-maps"),
        (["--encoder", "/no/such/moco.pt"], "--encoder"),
    ],
)
def test_bad_options_one_line_no_run(synthetic_data_dir: Path, tracking_store: str, args: list[str],
                                     option: str) -> None:  # fmt: skip
    result = CliRunner().invoke(linear_eval_command, [*args, "--data-dir", str(synthetic_data_dir)])
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and option in lines[0]
    assert len(mlflow.search_runs(search_all_experiments=True)) == 0
