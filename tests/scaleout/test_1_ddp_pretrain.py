"""`torchrun --nproc_per_node 2 -m entrypoints.moco_pretrain` on one host against the tracking
server: the whole job is killed mid-run and rerun, then the server is killed and restarted while
rank 0 logs. One run holds every epoch once, resumes in place, and its checkpoint and encoder reach
the S3 bucket through the server; the encoder is registered."""

from __future__ import annotations

from pathlib import Path

import torch
from mlflow.tracking import MlflowClient

from tests.scaleout.stack import Machine, Stack

EXPERIMENT = "scaleout-ddp"
MODEL = "fewshot-moco-encoder"
EPOCHS = 6


def pretrain_args(machine: Machine) -> list[str]:
    return ["--data-dir", str(machine.data_dir), "--width", "4", "--epochs", str(EPOCHS), "--batch-size", "16",
            "--moco-k", "64", "--run-name", "moco-ddp", "--checkpoint-minutes", "0", "--no-progress",
            "--no-knn-test", "--register"]  # fmt: skip


def checkpoint_epoch(path: Path) -> int:
    """Epochs finished according to the checkpoint rank 0 wrote last (-1: none yet)."""
    if not path.is_file():
        return -1
    try:
        return int(torch.load(path, map_location="cpu", weights_only=False)["epoch"])
    except Exception:  # replaced while we read it
        return -1


def test_torchrun_resumes_in_the_same_run_and_survives_a_server_restart(stack: Stack, machine, client: MlflowClient):
    host = machine("gpu-host-a", EXPERIMENT)
    checkpoint = host.folder / "checkpoints" / "moco" / "moco-ddp" / "last.pt"
    job = host.torchrun(2, "entrypoints.moco_pretrain", *pretrain_args(host))
    job.wait_for(lambda: checkpoint_epoch(checkpoint) >= 2, poll=0.02)  # epochs are logged before their checkpoint
    job.kill()  # the host dies: every rank and torchrun itself, SIGKILL
    first = job.output()
    killed_at = checkpoint_epoch(checkpoint)
    assert killed_at < EPOCHS, "the job was killed mid-run"
    again = host.torchrun(2, "entrypoints.moco_pretrain", *pretrain_args(host))
    again.wait_for(lambda: checkpoint_epoch(checkpoint) > killed_at, poll=0.02)
    # rank 0 blocks in its next log call (MLflow's client retries) while the server is down
    stack.restart_server(down_seconds=1.0)  # SIGKILL: requests in flight are cut
    out = again.wait(timeout=300)
    assert again.proc.returncode == 0, out[-3000:]
    assert "Traceback" not in first + out, (first + out)[-3000:]

    experiment = client.get_experiment_by_name(EXPERIMENT)
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.status == "FINISHED" and run.data.params["world_size"] == "2"
    assert int(run.data.tags["resumed_from_step"]) > 0, "the rerun continued the checkpoint in the same run"
    steps = sorted(m.step for m in client.get_metric_history(run.info.run_id, "loss"))
    assert steps == list(range(EPOCHS)), f"every epoch logged exactly once: {steps}"

    version = client.get_model_version(MODEL, run.data.tags["registered_version"])
    assert version.run_id == run.info.run_id
    alias = run.data.tags["registered_alias"]
    assert client.get_model_version_by_alias(MODEL, alias).version == version.version
    model_id = version.source.removeprefix("models:/")
    keys = stack.bucket_keys("mlflow/")
    run_prefix = f"mlflow/{experiment.experiment_id}/{run.info.run_id}/artifacts/"
    assert run_prefix + "checkpoints/last.pt" in keys, keys
    encoder_files = [k for k in keys if model_id in k]
    assert any(k.endswith("/MLmodel") for k in encoder_files), keys
    assert not (host.folder / "mlruns").exists(), "nothing is stored on the client host"
