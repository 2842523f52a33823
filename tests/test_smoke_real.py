"""End to end on the real MNIST (../shared/data) with a tiny budget, in a fresh process."""

from pathlib import Path

from mlflow.tracking import MlflowClient

from tests.conftest import run_cli


def test_baseline_end_to_end_on_real_mnist(real_data_dir: Path, tracking_store: str) -> None:
    proc = run_cli(
        "entrypoints.baseline", "--model", "cnn", "--epochs", "20", "--data-dir", str(real_data_dir),
        "--run-name", "smoke", env={"MLFLOW_TRACKING_URI": tracking_store},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    client = MlflowClient(tracking_uri=tracking_store)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED" and runs[0].info.run_name == "smoke"
    matrix = client.download_artifacts(runs[0].info.run_id, "evaluation/test_confusion_matrix.csv")
    counts = [int(v) for row in Path(matrix).read_text().splitlines()[1:] for v in row.split(",")[1:]]
    assert sum(counts) == 10_000  # the full test set, not 100 images
    assert runs[0].data.metrics["test_top1"] > 0.4  # far above chance after 20 full-batch epochs
