"""A fresh host loads `models:/fewshot-moco-encoder@champion` over HTTP and runs `linear_eval`
on it; another fresh host builds results.md from the server with `report`. Neither has
anything local but its own folder: the model comes from S3 through the tracking server."""

from __future__ import annotations

import re

import pytest
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from tests.scaleout.stack import Stack

MODEL = "fewshot-moco-encoder"


@pytest.fixture
def champion_version(machine, client: MlflowClient) -> str:
    """The champion's version; registered here by a short pretraining when the registry has none
    (this file run alone; in the full group the DDP and HPO tests registered it already)."""
    try:
        return client.get_model_version_by_alias(MODEL, "champion").version
    except MlflowException:
        pass
    host = machine("pretrain-host", "scaleout-champion")
    job = host.python("entrypoints.moco_pretrain", "--data-dir", str(host.data_dir), "--width", "4", "--epochs", "1",
                      "--batch-size", "32", "--moco-k", "64", "--no-progress", "--no-knn-test", "--register")  # fmt: skip
    out = job.wait(timeout=300)
    assert job.proc.returncode == 0, out[-3000:]
    return client.get_model_version_by_alias(MODEL, "champion").version


def test_a_fresh_host_probes_the_champion_and_another_reports(stack: Stack, machine, client, champion_version):
    host_d = machine("eval-host-d", "scaleout-eval")
    job = host_d.python("tests.scaleout.champion_host", str(host_d.data_dir))
    out = job.wait(timeout=300)
    assert job.proc.returncode == 0, out[-3000:]
    assert "loaded models:/fewshot-moco-encoder@champion: features (2, " in out
    workflow_id = re.search(r"workflow run ([0-9a-f]{32})", out).group(1)
    workflow = client.get_run(workflow_id)
    probe = client.get_run(workflow.data.tags["step.linear_eval-linear-draw0"])
    assert probe.info.status == "FINISHED"
    assert probe.data.tags["encoder_model"] == MODEL and probe.data.tags["encoder_version"] == champion_version

    host_e = machine("report-host-e", "scaleout-eval")
    job = host_e.python("entrypoints.report", "--parent-run-id", workflow_id, "--out-dir", ".")
    out = job.wait(timeout=300)
    assert job.proc.returncode == 0, out[-3000:]
    results = (host_e.folder / "results.md").read_text()
    row = next(line for line in results.splitlines() if line.startswith("| MoCo + linear |"))
    assert row.split(" | ")[1].startswith(f"{100 * probe.data.metrics['test_top1']:.2f}"), row
    report_id = re.search(r"report run ([0-9a-f]{32})", out).group(1)
    experiment_id = client.get_run(report_id).info.experiment_id
    assert f"mlflow/{experiment_id}/{report_id}/artifacts/results.md" in stack.bucket_keys("mlflow/")
    for host in (host_d, host_e):
        assert not (host.folder / "mlruns").exists(), "nothing is stored on a client host"
