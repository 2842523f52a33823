"""The MoCo pretraining loop (no MLflow): build, restore, one epoch step by step, end-of-epoch metrics.

``pretrain`` is the plain API: the HPO objective calls it with an ``on_epoch`` callback that may
raise to prune; ``fewshot.pretrain.job.run_pretrain`` wraps it in a tracked, resumable MLflow run.
"""

from __future__ import annotations

import inspect
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from tqdm.auto import tqdm

from fewshot import augment as aug
from fewshot.data import MNIST, LabeledDraw, labeled_tensors, to_unit
from fewshot.device import Precision, pick_device
from fewshot.errors import TrainingDiverged, UserError
from fewshot.jobs.loop import CheckpointWriter, StepBoundary, config_for_checkpoint
from fewshot.moco import MoCo, average_buffers, cosine_momentum, distributed, warmup_cosine_lr
from fewshot.models import build_encoder
from fewshot.names import MOCO_CHECKPOINT_FORMAT, MOCO_CHECKPOINT_VERSION
from fewshot.pretrain.checkpoint import check_resume_config, plain_encoder, rng_state, set_rng_state
from fewshot.pretrain.config import EpochCallback, Metrics, PretrainConfig
from fewshot.pretrain.monitor import knn_accuracy


@dataclass
class PretrainResult:
    encoder: nn.Module  # the query backbone (no projection head), a plain build_encoder module
    history: list[Metrics] = field(default_factory=list)
    model: MoCo | None = None
    steps: int = 0
    wall_seconds: float = 0.0


def _drain(running: torch.Tensor, sums: dict[str, float], cfg: PretrainConfig, epoch: int, step: int) -> None:
    """Move the on-device running loss/accuracy into ``sums``; stop on a NaN or infinite loss."""
    loss_sum, acc_sum = running.tolist()
    if not math.isfinite(loss_sum):
        raise TrainingDiverged(
            f"MoCo loss became {loss_sum} at epoch {epoch + 1}, step {step}; lower --lr (now {cfg.lr}) "
            f"or raise --moco-t (now {cfg.moco_t})"
        )
    sums["loss"] += loss_sum
    sums["acc"] += acc_sum
    running.zero_()


def rank_world() -> tuple[int, int]:
    return (dist.get_rank(), dist.get_world_size()) if distributed() else (0, 1)


def init_distributed(device: str) -> tuple[int, int]:
    """Under torchrun (WORLD_SIZE > 1): join the process group, gloo on CPU, nccl on CUDA."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 or distributed():
        return rank_world()
    cuda = pick_device(device).type == "cuda"
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend="nccl" if cuda else "gloo")
    return dist.get_rank(), dist.get_world_size()


def _aug_seed(seed: int, epoch: int, rank: int) -> int:
    return (seed * 1_000_003 + epoch * 7919 + rank * 104_729 + 1) % (2**63)


def _fresh_sums() -> dict[str, float]:
    return {"loss": 0.0, "acc": 0.0, "steps": 0, "seconds": 0.0, "augment_seconds": 0.0}


class MocoTrainer:
    """One pretraining run's live state and its phases: build (the constructor), ``restore``,
    ``train_epoch`` (``step`` by step), ``epoch_metrics`` and ``checkpoint_state``.

    Under torchrun (an initialised process group) it trains with DDP and shuffle-BN.
    """

    def __init__(self, cfg: PretrainConfig, mnist: MNIST, draw: LabeledDraw) -> None:
        self.rank, self.world = rank_world()
        cfg.validate(self.world)
        device = pick_device(cfg.device)
        if device.type == "cuda" and distributed():
            device = torch.device("cuda", torch.cuda.current_device())
        self.cfg, self.device, self.cuda = cfg, device, device.type == "cuda"
        self.precision = Precision.choose(cfg.precision, device)
        torch.manual_seed(cfg.seed)
        self.order_gen = torch.Generator(device=device).manual_seed(cfg.seed)
        self.aug_gen = torch.Generator(device=device).manual_seed(_aug_seed(cfg.seed, 0, self.rank))
        init_gen = torch.Generator().manual_seed(cfg.seed)

        self.pool = mnist.train_images[draw.unlabeled_idx].to(device)  # uint8, 47 MB at most
        self.labeled = labeled_tensors(mnist, draw, device, cfg.knn_test)
        n = self.pool.shape[0]
        self.global_batch = cfg.batch_size * self.world
        self.steps_per_epoch = n // self.global_batch
        if self.steps_per_epoch < 1:
            raise UserError(
                f"--batch-size {cfg.batch_size}: larger than the unlabeled pool ({n} images over {self.world} "
                f"process(es)); pass a smaller --batch-size (at most {n // self.world})"
            )
        if cfg.max_steps_per_epoch:
            self.steps_per_epoch = min(self.steps_per_epoch, cfg.max_steps_per_epoch)
        self.total_steps = self.steps_per_epoch * cfg.epochs
        self.warmup_steps = int(round(cfg.warmup_epochs * self.steps_per_epoch))

        model = MoCo(
            build_encoder(cfg.arch, cfg.width), dim=cfg.moco_dim, k=cfg.moco_k, temperature=cfg.moco_t, mlp=cfg.mlp,
            symmetric=cfg.symmetric, bn_splits=1 if self.world > 1 else cfg.bn_splits, generator=init_gen,
            positive=cfg.positive, nearest_k=cfg.nearest_k,
        ).to(device)  # fmt: skip
        # channels-last where the convolutions run bf16 (CUDA, a bf16 CPU); the CPU fp32 path stays NCHW
        self.memory_format = torch.channels_last if self.cuda or self.precision.bf16 else torch.contiguous_format
        self.model = model.to(memory_format=self.memory_format)
        self.net: nn.Module = self.model  # the DDP wrapper under torchrun (``distribute``)
        self.optimizer = torch.optim.SGD(
            self.model.query_parameters(), lr=cfg.lr, momentum=0.9, weight_decay=cfg.weight_decay
        )
        self.spec = cfg.view_spec()
        self.start_epoch, self.step, self.history = 0, 0, []
        self.mid_epoch: dict[str, Any] | None = None
        self.lr, self.m = cfg.lr, cfg.moco_m

    def restore(self, state: dict[str, Any]) -> None:
        """Continue a checkpoint's state (mid-epoch ones only in a single process)."""
        check_resume_config(self.cfg, state)
        self.model.load_state_dict(state["moco_state"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.order_gen.set_state(state["generators"]["order"])
        set_rng_state(state["rng"])
        self.history = list(state["history"])
        self.step = state["step"]
        self.start_epoch = state["epoch"]
        self.mid_epoch = state.get("mid_epoch")
        if self.mid_epoch is not None and self.world == 1:
            self.aug_gen.set_state(state["generators"]["augment"])
        elif self.mid_epoch is not None:
            self.mid_epoch = None  # mid-epoch state is single-process only; redo the epoch
            self.step = self.start_epoch * self.steps_per_epoch

    def distribute(self) -> None:
        """Under torchrun: wrap the model in DDP. The queue and BN statistics are kept in step by the
        code (all-gathered keys, averaged statistics at epoch ends), not re-broadcast every forward."""
        if self.world == 1:
            return
        ddp = nn.parallel.DistributedDataParallel
        no_sync = ("forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(ddp).parameters
                   else "broadcast_buffers")  # fmt: skip
        self.net = ddp(self.model, device_ids=[self.device.index] if self.cuda else None, **{no_sync: False})

    def checkpoint_state(self, epoch: int, mid: dict[str, Any] | None) -> dict[str, Any]:
        """The full state; ``epoch`` is the one to run next (or, with ``mid``, the one in progress)."""
        model = self.model
        return {
            "encoder_spec": {"arch": self.cfg.arch, "width": self.cfg.width},
            "encoder_state": {k: v.detach().cpu() for k, v in model.backbone_q.state_dict().items()},
            "moco_state": {k: v.detach().cpu() for k, v in model.state_dict().items()},
            "optimizer": self.optimizer.state_dict(),
            "scheduler": {
                "kind": "warmup-cosine",
                "step": self.step,
                "total_steps": self.total_steps,
                "warmup_steps": self.warmup_steps,
            },  # fmt: skip
            "generators": {"order": self.order_gen.get_state().cpu(), "augment": self.aug_gen.get_state().cpu()},
            "rng": rng_state(),
            "epoch": epoch,
            "step": self.step,
            "mid_epoch": mid,
            "finished": epoch >= self.cfg.epochs and mid is None,
            "history": self.history,
        }

    def step_once(self, order: torch.Tensor, i: int, sums: dict[str, float], running: torch.Tensor) -> float:
        """One optimizer step on the ``i``-th batch of ``order``; returns its start time."""
        cfg, rank = self.cfg, self.rank
        t0 = time.perf_counter()
        idx = order[i * self.global_batch + rank * cfg.batch_size : i * self.global_batch + (rank + 1) * cfg.batch_size]
        x1, x2 = aug.two_views(to_unit(self.pool[idx]), self.spec, self.aug_gen)
        if not self.cuda:
            sums["augment_seconds"] += time.perf_counter() - t0
        x1 = x1.contiguous(memory_format=self.memory_format)
        x2 = x2.contiguous(memory_format=self.memory_format)
        self.lr = warmup_cosine_lr(cfg.lr, self.step, self.total_steps, self.warmup_steps)
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr
        progress = self.step / max(1, self.total_steps - 1)
        self.m = cosine_momentum(cfg.moco_m, progress) if cfg.m_schedule == "cosine" else cfg.moco_m
        with self.precision.autocast():  # InfoNCE, its logits and the queue stay fp32 (fewshot.moco)
            loss, logits = self.net(x1, x2, self.m, self.order_gen)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.step += 1
        running[0] += loss.detach().float()
        running[1] += (logits.detach().argmax(1) == 0).float().mean()
        sums["steps"] += 1
        return t0

    def train_epoch(self, epoch: int, bar: tqdm, boundary: StepBoundary, writer: CheckpointWriter) -> dict[str, float]:
        """One pass over the pool (or the rest of an interrupted one); returns the epoch's sums.
        A checkpoint falls due or a signal arrives mid-epoch: write one, then maybe stop."""
        cfg = self.cfg
        if self.mid_epoch is not None:
            order = self.mid_epoch["order"].to(self.device)
            first_step = self.mid_epoch["step_in_epoch"]
            sums = dict(self.mid_epoch["sums"])
            self.mid_epoch = None
        else:
            order = torch.randperm(self.pool.shape[0], generator=self.order_gen, device=self.device)
            self.aug_gen.manual_seed(_aug_seed(cfg.seed, epoch, self.rank))
            first_step = 0
            sums = _fresh_sums()
        self.model.train()
        check_every = 25 if self.cuda else 1  # a host sync per check; every step is free on CPU
        running = torch.zeros(2, device=self.device)  # loss and contrastive top-1 since the last check
        epoch_t0 = time.perf_counter()
        for i in range(first_step, self.steps_per_epoch):
            t0 = self.step_once(order, i, sums, running)
            if sums["steps"] % check_every == 0 or i + 1 == self.steps_per_epoch:
                _drain(running, sums, cfg, epoch, self.step)
            bar.update(1)
            if self.step % 10 == 0 and not self.cuda:
                bar.set_postfix(loss=f"{sums['loss'] / sums['steps']:.3f}",
                                ips=f"{self.global_batch / (time.perf_counter() - t0):.0f}")  # fmt: skip
            if boundary.checkpoint_due() and i + 1 < self.steps_per_epoch and self.world == 1:
                _drain(running, sums, cfg, epoch, self.step)
                seconds = sums["seconds"] + time.perf_counter() - epoch_t0
                mid = {"order": order.cpu(), "step_in_epoch": i + 1, "sums": {**sums, "seconds": seconds}}
                writer.write(self.checkpoint_state(epoch, mid))
                boundary.written()
                boundary.stop_if_requested()
        if self.cuda:
            torch.cuda.synchronize(self.device)
        sums["seconds"] += time.perf_counter() - epoch_t0
        return sums

    def epoch_metrics(
        self, epoch: int, sums: dict[str, float], evaluate: Callable[[int, nn.Module], Metrics] | None, started: float
    ) -> Metrics:
        """End of an epoch: batch-norm statistics averaged over processes, the epoch's loss and speed,
        kNN accuracy on the validation labels (and the test set with ``knn_test``), ``evaluate``'s own."""
        cfg, labeled, backbone = self.cfg, self.labeled, self.model.backbone_q
        average_buffers(self.model)
        self.model.eval()
        knn_val = knn_accuracy(backbone, labeled.x_train, labeled.y_train, labeled.x_val, labeled.y_val, cfg.knn_k,
                               cfg.knn_t, self.precision)  # fmt: skip
        metrics = {
            "loss": sums["loss"] / sums["steps"],
            "contrastive_acc": sums["acc"] / sums["steps"],
            "lr": self.lr,
            "moco_m": self.m,
            "images_per_s": sums["steps"] * self.global_batch / max(sums["seconds"], 1e-9),
            "knn_val_acc": knn_val,
        }
        if not self.cuda:
            metrics["augment_share"] = sums["augment_seconds"] / max(sums["seconds"], 1e-9)
        if labeled.x_test is not None:
            metrics["knn_test_acc"] = knn_accuracy(backbone, labeled.x_train, labeled.y_train, labeled.x_test,
                                                   labeled.y_test, cfg.knn_k, cfg.knn_t, self.precision)  # fmt: skip
        if evaluate is not None:
            t_eval = time.perf_counter()
            metrics.update(evaluate(epoch, backbone))
            metrics["evaluate_s"] = time.perf_counter() - t_eval
        metrics["elapsed_s"] = time.perf_counter() - started
        return metrics


def pretrain(
    cfg: PretrainConfig,
    mnist: MNIST,
    draw: LabeledDraw,
    on_epoch: EpochCallback | None = None,
    checkpoint_path: str | Path | None = None,
    checkpoint_extra: dict[str, Any] | None = None,
    resume_state: dict[str, Any] | None = None,
    on_checkpoint: Callable[[Path], None] | None = None,
    evaluate: Callable[[int, nn.Module], Metrics] | None = None,
) -> PretrainResult:
    """Pretrain a MoCo encoder on ``draw``'s unlabeled pool and return the query backbone.

    ``on_epoch(epoch, metrics)`` runs after every epoch (metrics hold at least ``loss`` and
    ``knn_val_acc``); whatever it raises propagates (HPO pruning). With ``checkpoint_path``
    the full state is written atomically at every epoch end and every
    ``cfg.checkpoint_minutes``; ``resume_state`` (from ``load_checkpoint``) continues it.
    ``evaluate(epoch, backbone)`` may add metrics of its own (benchmarks probe the frozen
    query backbone with it; its time is logged as ``evaluate_s``). Under torchrun (an
    initialised process group) it trains with DDP and shuffle-BN; rank 0 writes the checkpoints.
    """
    trainer = MocoTrainer(cfg, mnist, draw)
    if resume_state is not None:
        trainer.restore(resume_state)
    trainer.distribute()
    path = Path(checkpoint_path) if checkpoint_path is not None and trainer.rank == 0 else None
    writer = CheckpointWriter(path, MOCO_CHECKPOINT_FORMAT, MOCO_CHECKPOINT_VERSION,
                              config_for_checkpoint(cfg.params()), checkpoint_extra or {}, on_checkpoint)  # fmt: skip
    started = time.perf_counter()
    bar = tqdm(total=trainer.total_steps, initial=trainer.step, desc="moco", disable=not cfg.progress or trainer.rank != 0,
               dynamic_ncols=True)  # fmt: skip
    # Ctrl-C / SIGTERM: finish the step, write a mid-epoch checkpoint, then stop (one process only)
    with StepBoundary(cfg.checkpoint_minutes, enabled=trainer.world == 1) as boundary:
        for epoch in range(trainer.start_epoch, cfg.epochs):
            sums = trainer.train_epoch(epoch, bar, boundary, writer)
            metrics = trainer.epoch_metrics(epoch, sums, evaluate, started)
            trainer.history.append(metrics)
            bar.set_postfix(loss=f"{metrics['loss']:.3f}", knn_val=f"{metrics['knn_val_acc']:.3f}")
            if on_epoch is not None:
                on_epoch(epoch, metrics)
            writer.write(trainer.checkpoint_state(epoch + 1, None))
            boundary.written()
            boundary.stop_if_requested()
    bar.close()
    trainer.model.eval()
    return PretrainResult(
        encoder=plain_encoder(trainer.model, cfg.arch, cfg.width),
        history=trainer.history,
        model=trainer.model,
        steps=trainer.step,
        wall_seconds=time.perf_counter() - started,
    )
