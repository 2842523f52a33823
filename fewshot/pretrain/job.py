"""``moco_pretrain`` as a tracked, resumable MLflow job: what it logs, and its registered encoder.

The skeleton (resume, the run, history replay, checkpoint, registration) is ``fewshot.jobs``;
this module says what is particular to MoCo. Under torchrun every rank trains; rank 0 logs.
"""

from __future__ import annotations

import os
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any

import torch

from fewshot import augment as aug
from fewshot import plots, tracking
from fewshot.data import MNIST, LabeledDraw, draw_labels, labeled_tensors, load_mnist, to_unit
from fewshot.device import Precision, configure_threads, pick_device
from fewshot.jobs.tracked import JobStart, Registration, TrackedJob
from fewshot.names import MOCO_ENCODER_MODEL
from fewshot.pretrain.checkpoint import DEFAULT_CHECKPOINT_DIR, check_resume_config, load_checkpoint
from fewshot.pretrain.config import EpochCallback, PretrainConfig
from fewshot.pretrain.loop import PretrainResult, init_distributed, pretrain
from fewshot.pretrain.monitor import selection_score

JOB = "moco_pretrain"


def default_run_name(cfg: PretrainConfig) -> str:
    return f"moco-{cfg.arch}-w{cfg.width}-seed{cfg.seed}"


def views_figure(mnist: MNIST, draw: LabeledDraw, spec: aug.ViewSpec, seed: int):
    x = to_unit(mnist.train_images[draw.unlabeled_idx[:8]])
    generator = torch.Generator().manual_seed(seed)
    rows = [x] + [aug.random_view(x, spec, generator) for _ in range(4)]
    return plots.image_grid_figure(rows, ["original"] + [f"view #{i + 1}" for i in range(4)], "MoCo views")


def _setup(cfg: PretrainConfig) -> tuple[int, int]:
    """Join torchrun's process group (if any), check the config, share the CPU threads between ranks."""
    rank, world = init_distributed(cfg.device)
    cfg.validate(world)
    configure_threads()
    if world > 1 and pick_device(cfg.device).type == "cpu":
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    return rank, world


def run_pretrain(
    cfg: PretrainConfig,
    checkpoint_dir: str | Path | None = None,
    run_name: str | None = None,
    resume: str = "auto",
    register: bool = False,
    on_epoch: EpochCallback | None = None,
) -> dict[str, Any]:
    """Pretrain in an MLflow run (rank 0 logs), log the query encoder, optionally register it.

    ``resume`` is ``auto`` (continue the unfinished checkpoint of this run name, if any),
    ``never``, or a checkpoint path. A resumed run continues the same MLflow run; steps
    already logged are not logged again. ``on_epoch`` runs after each epoch is logged.
    """
    rank, world = _setup(cfg)
    start = JobStart.resolve(resume, run_name or default_run_name(cfg), checkpoint_dir, DEFAULT_CHECKPOINT_DIR,
                             load_checkpoint, partial(check_resume_config, cfg), redo_logging=world == 1)  # fmt: skip
    mnist = load_mnist(cfg.data_dir)
    draw = draw_labels(mnist.train_labels, cfg.seed, cfg.labels_per_class, cfg.n_labels)
    if rank != 0:  # workers train; rank 0 logs and writes checkpoints
        result = pretrain(replace(cfg, progress=False), mnist, draw, resume_state=start.state)
        return {"rank": rank, "steps": result.steps}

    def log_fresh(tracker: tracking.Tracker) -> None:
        tracker.log_params({**cfg.params(), "world_size": world, "checkpoint": str(start.checkpoint.resolve()),
                            "n_unlabeled": len(draw.unlabeled_idx),
                            "precision_resolved": Precision.choose(cfg.precision, pick_device(cfg.device)).name})  # fmt: skip
        tracker.log_draw(draw, mnist.source)
        tracker.log_figure(views_figure(mnist, draw, cfg.view_spec(), cfg.seed), "augmentation/views.png")

    with TrackedJob(start, {"job": JOB, "arch": cfg.arch, "seed": cfg.seed}, step_metric="loss") as job:
        job.begin(log_fresh, enumerate(start.state["history"]) if start.state else ())  # epochs whose logging was lost
        result = pretrain(
            cfg, mnist, draw, on_epoch=job.step_logger(on_epoch), checkpoint_path=start.checkpoint,
            checkpoint_extra=job.checkpoint_extra, resume_state=start.state,
        )  # fmt: skip
        return _finish(job, cfg, mnist, draw, result, register)


def _finish(
    job: TrackedJob, cfg: PretrainConfig, mnist: MNIST, draw: LabeledDraw, result: PretrainResult, register: bool
) -> dict[str, Any]:
    """The selection score over the 100 labels, the summary metrics, the encoder logged (and registered)."""
    encoder = result.encoder
    device = pick_device(cfg.device)
    score = selection_score(encoder.to(device), labeled_tensors(mnist, draw, device, with_test=False), cfg.knn_k,
                            cfg.knn_t)  # fmt: skip
    final = result.history[-1]
    summary = {
        "final_knn_val_acc": final["knn_val_acc"],
        "loo_knn_acc": score,
        "wall_seconds": job.elapsed(),
        "steps": result.steps,
    }
    if "knn_test_acc" in final:
        summary["final_knn_test_acc"] = final["knn_test_acc"]
    job.tracker.log_metrics(summary)
    spec = {"kind": "encoder", "arch": cfg.arch, "width": cfg.width, "feature_dim": encoder.feature_dim}
    version_tags = {"knn_val_acc": final["knn_val_acc"], "knn_test_acc": final.get("knn_test_acc", ""),
                    "epochs": cfg.epochs, "run_id": job.run_id}  # fmt: skip
    registration = Registration(MOCO_ENCODER_MODEL, score, version_tags) if register else None
    return {**job.finish(encoder.cpu(), "encoder", spec, registration), **summary}
