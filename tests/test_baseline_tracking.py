from pathlib import Path

import mlflow
import pytest
import torch
from click.testing import CliRunner
from mlflow.tracking import MlflowClient

from entrypoints.baseline import main as baseline_command
from fewshot.augment import TTA_SPEC, random_affine
from fewshot.baseline import BaselineConfig, run_baseline
from fewshot.evaluate import predict_logits, predict_tta
from fewshot.models import build_classifier
from fewshot.train import FitConfig
from tests.conftest import run_cli


def _artifact_paths(client: MlflowClient, run_id: str, path: str = "") -> set[str]:
    found = set()
    for item in client.list_artifacts(run_id, path):
        found |= _artifact_paths(client, run_id, item.path) if item.is_dir else {item.path}
    return found


def test_baseline_run_logs_everything(synthetic_data_dir: Path, tracking_store: str) -> None:
    cfg = BaselineConfig(model="cnn", seed=1, data_dir=str(synthetic_data_dir), fit=FitConfig(epochs=4, progress=False))
    result = run_baseline(cfg)
    client = MlflowClient()
    run = client.get_run(result["run_id"])
    assert run.info.status == "FINISHED"
    params = run.data.params
    assert params["model"] == "cnn" and params["augment"] == "online" and params["epochs"] == "4"
    assert params["tta_views"] == "8" and 0 <= run.data.metrics["test_plain_top1"] <= 1
    assert run.data.tags["model"] == "cnn" and run.data.tags["seed"] == "1" and "git_commit" in run.data.tags
    for k in range(1, 6):
        assert 0 <= run.data.metrics[f"test_top{k}"] <= 1
    assert run.data.metrics["test_top5"] >= run.data.metrics["test_top1"]
    assert all(f"test_acc_class{d}" in run.data.metrics for d in range(10))
    history = client.get_metric_history(run.info.run_id, "val_loss")
    assert sorted(m.step for m in history) == [0, 1, 2, 3]
    artifacts = _artifact_paths(client, run.info.run_id)
    for expected in [
        "data/labeled_draw.json",
        "augmentation/grid.png",
        "evaluation/test_confusion_matrix.png",
        "evaluation/test_confusion_matrix.csv",
        "evaluation/learning_curves.png",
        "checkpoints/best.pt",
    ]:
        assert expected in artifacts
    csv = client.download_artifacts(run.info.run_id, "evaluation/test_confusion_matrix.csv")
    rows = Path(csv).read_text().strip().splitlines()
    assert len(rows) == 11 and sum(int(v) for r in rows[1:] for v in r.split(",")[1:]) == 200
    assert run.inputs.dataset_inputs and run.inputs.dataset_inputs[0].dataset.name.startswith("mnist-labels-seed1-")
    logged = [m for m in client.search_logged_models(experiment_ids=[run.info.experiment_id])]
    model = mlflow.pytorch.load_model(f"models:/{logged[0].model_id}")
    assert model(torch.rand(2, 1, 28, 28)).shape == (2, 10)


def test_tta_is_the_mean_softmax_over_the_image_and_its_warped_copies() -> None:
    torch.manual_seed(0)
    model = build_classifier("cnn").eval()
    x = torch.rand(16, 1, 28, 28)
    plain = predict_logits(model, x).softmax(1)
    assert torch.allclose(predict_tta(model, x, 0, torch.Generator().manual_seed(0)).exp(), plain, atol=1e-6)
    warps = torch.Generator().manual_seed(3)
    copies = [predict_logits(model, random_affine(x, TTA_SPEC, warps)).softmax(1) for _ in range(2)]
    tta = predict_tta(model, x, 2, torch.Generator().manual_seed(3))
    assert torch.allclose(tta.exp(), (plain + copies[0] + copies[1]) / 3, atol=1e-6)
    assert not torch.allclose(tta.exp(), plain, atol=1e-3), "the copies are warped"
    assert torch.equal(tta, predict_tta(model, x, 2, torch.Generator().manual_seed(3))), "seeded"
    reused = predict_tta(model, x, 2, torch.Generator().manual_seed(3), plain=predict_logits(model, x))
    assert torch.equal(tta, reused), "given plain logits: the same scores without the extra pass"


def test_same_seed_same_numbers(synthetic_data_dir: Path, tracking_store: str) -> None:
    runs = [
        run_baseline(
            BaselineConfig(
                model="mlp2", seed=2, data_dir=str(synthetic_data_dir), fit=FitConfig(epochs=3, progress=False)
            )
        )  # fmt: skip
        for _ in range(2)
    ]
    assert runs[0]["test_top1"] == runs[1]["test_top1"] and runs[0]["val_top1"] == runs[1]["val_top1"]


@pytest.mark.parametrize(
    "args, option",
    [
        (["--lr", "abc"], "--lr"),
        (["--lr", "-1"], "--lr"),
        (["--model", "vgg"], "--model"),
        (["--labels-per-class", "0"], "--labels-per-class"),
        (["--data-dir", "/definitely/not/here"], "--data-dir"),
        (["--epochs", "0"], "--epochs"),
        (["--augment", "mixup"], "--augment"),
        (["--optimizer", "rmsprop"], "--optimizer"),
    ],
)
def test_bad_parameters_one_line_no_run(args: list[str], option: str, tracking_store: str) -> None:
    result = CliRunner().invoke(baseline_command, args)
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and option in lines[0]
    assert result.exception is None or isinstance(result.exception, SystemExit)
    runs = mlflow.search_runs(search_all_experiments=True)
    assert len(runs) == 0 or (runs["status"] != "RUNNING").all()


def test_bad_parameter_in_a_real_process(tracking_store: str) -> None:
    proc = run_cli("entrypoints.baseline", "--lr", "abc", env={"MLFLOW_TRACKING_URI": tracking_store})
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == ["error: Invalid value for '--lr': 'abc' is not a valid float range."]


def test_missing_data_message(tmp_path: Path, tracking_store: str) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    result = CliRunner().invoke(baseline_command, ["--data-dir", str(empty)])
    assert result.exit_code == 2 and "train-images-idx3-ubyte" in result.stderr and "Traceback" not in result.stderr
    debug = CliRunner().invoke(baseline_command, ["--data-dir", str(empty), "--debug"])
    assert debug.exit_code == 2 and "Traceback" in debug.stderr
