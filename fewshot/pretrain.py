"""MoCo pretraining on the unlabeled pool: config, loop, kNN monitor, checkpoints, resume.

``pretrain`` is the pure-python API (no MLflow): the HPO objective calls it with an
``on_epoch`` callback that may raise to prune. ``run_pretrain`` (below)
wraps it in an MLflow run.
"""

from __future__ import annotations

import inspect
import math
import os
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from fewshot import augment as aug
from fewshot.checkpoints import check_same_settings, load_checked, resolve_resume, save_atomic
from fewshot.data import MNIST, LabeledDraw, to_unit
from fewshot.device import Precision, check_precision, pick_device, precision_context
from fewshot.errors import TrainingDiverged, UserError
from fewshot.evaluate import extract_features, knn_scores
from fewshot.interrupts import StopAtStepBoundary
from fewshot.moco import MoCo, average_buffers, check_queue, cosine_momentum, distributed, warmup_cosine_lr
from fewshot.models import ENCODERS, build_encoder

CHECKPOINT_FORMAT = "fewshot-moco-checkpoint"
CHECKPOINT_VERSION = 1

# Two-view augmentations. "digits" keeps the digit legible: mild crops that can also zoom
# out (area up to 1.2 moves the digit around), rotation and shear of a handwriting's size,
# elastic strokes, contrast jitter. "naive" is the calibration prototype's SimCLR-like recipe.
VIEW_PRESETS: dict[str, aug.ViewSpec] = {
    "digits": aug.ViewSpec(
        crop_scale=(0.5, 1.2), rotation=15.0, shear=10.0, jitter=0.4, blur_probability=0.2, blur_sigma=1.0,
        elastic_alpha=30.0, elastic_sigma=4.0,
    ),
    "naive": aug.ViewSpec(crop_scale=(0.3, 1.0), rotation=10.0, shear=0.0, jitter=0.4, blur_probability=0.5),
}  # fmt: skip
M_SCHEDULES = ("cosine", "constant")
Metrics = dict[str, float]
EpochCallback = Callable[[int, Metrics], None]


@dataclass
class PretrainConfig:
    """Everything that shapes a MoCo pretraining run; ``validate`` checks it at the door."""

    arch: str = "digit"
    width: int = 32
    epochs: int = 4
    batch_size: int = 256
    lr: float = 0.06
    weight_decay: float = 5e-4
    warmup_epochs: float = 0.5
    moco_k: int = 4096
    moco_m: float = 0.99
    m_schedule: str = "cosine"
    moco_t: float = 0.2
    moco_dim: int = 128
    mlp: bool = True
    symmetric: bool = False
    bn_splits: int = 8
    augment: str = "digits"
    augment_strength: float = 1.0
    knn_k: int = 20
    knn_t: float = 0.1
    knn_test: bool = True
    seed: int = 0
    data_dir: str | None = None
    labels_per_class: int | None = 10
    n_labels: int | None = None
    device: str = "auto"
    precision: str = "auto"  # auto: bf16 autocast where the device does bf16 natively, else fp32 (fewshot.device)
    checkpoint_minutes: float = 10.0
    max_steps_per_epoch: int = 0  # 0: the whole pool each epoch (benchmarks and tests cut it)
    progress: bool = True

    def validate(self, world_size: int = 1) -> None:
        def need(ok: bool, message: str) -> None:
            if not ok:
                raise UserError(message)

        need(self.arch in ENCODERS, f"--arch {self.arch}: unknown encoder; choose one of {', '.join(ENCODERS)}")
        need(1 <= self.width <= 512, f"--width {self.width}: must be between 1 and 512")
        need(1 <= self.epochs <= 10000, f"--epochs {self.epochs}: must be between 1 and 10000")
        need(2 <= self.batch_size <= 65536, f"--batch-size {self.batch_size}: must be between 2 and 65536")
        need(math.isfinite(self.lr) and 0 < self.lr <= 10, f"--lr {self.lr}: must be a positive number up to 10")
        need(0 <= self.weight_decay <= 1, f"--weight-decay {self.weight_decay}: must be between 0 and 1")
        need(0 <= self.warmup_epochs < self.epochs or self.warmup_epochs == 0,
             f"--warmup-epochs {self.warmup_epochs}: must be >= 0 and below --epochs {self.epochs}")  # fmt: skip
        need(16 <= self.moco_k <= 1_000_000, f"--moco-k {self.moco_k}: must be between 16 and 1000000")
        need(0 <= self.moco_m < 1, f"--moco-m {self.moco_m}: must be in [0, 1) (0.99 or 0.999 are usual)")
        need(self.m_schedule in M_SCHEDULES, f"--m-schedule {self.m_schedule}: choose one of {', '.join(M_SCHEDULES)}")
        need(0.01 <= self.moco_t <= 10, f"--moco-t {self.moco_t}: must be between 0.01 and 10 (0.07-0.2 are usual)")
        need(2 <= self.moco_dim <= 4096, f"--moco-dim {self.moco_dim}: must be between 2 and 4096")
        need(self.bn_splits >= 1, f"--bn-splits {self.bn_splits}: must be >= 1")
        if world_size == 1:
            need(
                self.batch_size % self.bn_splits == 0,
                f"--bn-splits {self.bn_splits}: must divide --batch-size {self.batch_size}",
            )
        need(self.augment in VIEW_PRESETS, f"--augment {self.augment}: choose one of {', '.join(VIEW_PRESETS)}")
        need(0 <= self.augment_strength <= 3, f"--augment-strength {self.augment_strength}: must be between 0 and 3")
        need(1 <= self.knn_k <= 1000, f"--knn-k {self.knn_k}: must be between 1 and 1000")
        need(0 < self.knn_t <= 10, f"--knn-t {self.knn_t}: must be in (0, 10]")
        need(self.checkpoint_minutes >= 0, f"--checkpoint-minutes {self.checkpoint_minutes}: must be >= 0")
        need(self.max_steps_per_epoch >= 0, f"max_steps_per_epoch {self.max_steps_per_epoch}: must be >= 0")
        check_precision(self.precision)
        check_queue(self.moco_k, self.batch_size, world_size, self.symmetric)

    def view_spec(self) -> aug.ViewSpec:
        return VIEW_PRESETS[self.augment].scaled(self.augment_strength)

    def params(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if k != "progress"}

    # settings a resumed run must share with its checkpoint (the rest may change)
    RESUME_KEYS = (
        "arch", "width", "epochs", "batch_size", "lr", "weight_decay", "warmup_epochs", "moco_k", "moco_m",
        "m_schedule", "moco_t", "moco_dim", "mlp", "symmetric", "bn_splits", "augment", "augment_strength",
        "seed", "labels_per_class", "n_labels", "max_steps_per_epoch", "precision",
    )  # fmt: skip


@dataclass
class PretrainResult:
    encoder: nn.Module  # the query backbone (no projection head), a plain build_encoder module
    history: list[Metrics] = field(default_factory=list)
    model: MoCo | None = None
    steps: int = 0
    wall_seconds: float = 0.0


@dataclass
class Labeled:
    """The labeled images the kNN monitor uses: 75 train (the bank), 25 val, the test set."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    x_test: torch.Tensor | None
    y_test: torch.Tensor | None


def labeled_for_monitor(mnist: MNIST, draw: LabeledDraw, device: torch.device, with_test: bool) -> Labeled:
    return Labeled(
        x_train=to_unit(mnist.train_images[draw.train_idx], device),
        y_train=mnist.train_labels[draw.train_idx].to(device),
        x_val=to_unit(mnist.train_images[draw.val_idx], device),
        y_val=mnist.train_labels[draw.val_idx].to(device),
        x_test=to_unit(mnist.test_images, device) if with_test else None,
        y_test=mnist.test_labels.to(device) if with_test else None,
    )


# ---------------------------------------------------------------- kNN monitor


@torch.no_grad()
def knn_accuracy(
    encoder: nn.Module, bank_x, bank_y, query_x, query_y, k: int, t: float, precision: Precision | None = None
) -> float:
    """Weighted cosine kNN top-1; the features under ``precision``, the votes in fp32."""
    was_training = encoder.training
    with precision_context(precision):
        bank = extract_features(encoder, bank_x).float()
        query = extract_features(encoder, query_x).float()
    encoder.train(was_training)
    scores = knn_scores(bank, bank_y, query, k=k, temperature=t)
    return float((scores.argmax(1) == query_y).float().mean())


@torch.no_grad()
def loo_knn_accuracy(features: torch.Tensor, labels: torch.Tensor, k: int = 20, t: float = 0.1) -> float:
    """Leave-one-out weighted cosine kNN over a small labeled set (each image voted on by the others)."""
    f = F.normalize(features.float(), dim=1)
    sim = f @ f.T
    sim.fill_diagonal_(-math.inf)
    k = min(k, f.shape[0] - 1)
    top, idx = sim.topk(k, dim=1)
    votes = torch.zeros(f.shape[0], int(labels.max()) + 1, device=f.device)
    votes.scatter_add_(1, labels[idx], (top / t).exp())
    return float((votes.argmax(1) == labels).float().mean())


def selection_score(encoder: nn.Module, labeled: Labeled, k: int = 20, t: float = 0.1) -> float:
    """The registry score: leave-one-out kNN over the 100 labeled images (never the test set)."""
    x = torch.cat([labeled.x_train, labeled.x_val])
    y = torch.cat([labeled.y_train, labeled.y_val])
    return loo_knn_accuracy(extract_features(encoder, x), y, k, t)


# ---------------------------------------------------------------- checkpoints


def rng_state() -> dict[str, Any]:
    """Python, NumPy and torch global RNG states in torch.load(weights_only=True)-safe types."""
    np_state = np.random.get_state()
    py_state = random.getstate()
    return {
        "python": [py_state[0], list(py_state[1]), py_state[2]],
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    npy = state["numpy"]
    np.random.set_state((npy[0], np.array(npy[1], dtype=np.uint32), npy[2], npy[3], npy[4]))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(state: dict[str, Any], path: str | Path) -> None:
    save_atomic(state, path)


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load and check a MoCo checkpoint; one-line UserError when missing or corrupt."""
    return load_checked(
        path, CHECKPOINT_FORMAT, CHECKPOINT_VERSION,
        ("encoder_spec", "encoder_state", "moco_state", "optimizer", "epoch", "step", "config"), "MoCo",
        "; pass a checkpoint written by moco_pretrain (checkpoints/moco/<run name>/last.pt) or --resume never",
    )  # fmt: skip


def check_resume_config(cfg: PretrainConfig, state: dict[str, Any]) -> None:
    check_same_settings(state["config"], cfg, PretrainConfig.RESUME_KEYS)


def encoder_from_checkpoint(state: dict[str, Any]) -> nn.Module:
    """A plain backbone rebuilt from a checkpoint's ``encoder_spec`` and ``encoder_state``."""
    spec = state["encoder_spec"]
    encoder = build_encoder(spec["arch"], spec["width"])
    encoder.load_state_dict(state["encoder_state"])
    return encoder.eval()


def plain_encoder(model: MoCo, arch: str, width: int) -> nn.Module:
    """The query backbone as a plain build_encoder module (split-BN back to BatchNorm2d), on CPU."""
    encoder = build_encoder(arch, width)
    encoder.load_state_dict({k: v.detach().float().cpu() for k, v in model.backbone_q.state_dict().items()})
    return encoder.eval()


# ---------------------------------------------------------------- the loop


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


def _rank_world() -> tuple[int, int]:
    return (dist.get_rank(), dist.get_world_size()) if distributed() else (0, 1)


def _aug_seed(seed: int, epoch: int, rank: int) -> int:
    return (seed * 1_000_003 + epoch * 7919 + rank * 104_729 + 1) % (2**63)


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
    initialised process group) it trains with DDP and shuffle-BN.
    """
    rank, world = _rank_world()
    cfg.validate(world)
    device = pick_device(cfg.device)
    if device.type == "cuda" and distributed():
        device = torch.device("cuda", torch.cuda.current_device())
    cuda = device.type == "cuda"
    precision = Precision.choose(cfg.precision, device)
    torch.manual_seed(cfg.seed)
    order_gen = torch.Generator(device=device).manual_seed(cfg.seed)
    aug_gen = torch.Generator(device=device).manual_seed(_aug_seed(cfg.seed, 0, rank))
    init_gen = torch.Generator().manual_seed(cfg.seed)

    pool = mnist.train_images[draw.unlabeled_idx].to(device)  # uint8, 47 MB at most
    labeled = labeled_for_monitor(mnist, draw, device, cfg.knn_test)
    n = pool.shape[0]
    global_batch = cfg.batch_size * world
    steps_per_epoch = n // global_batch
    if steps_per_epoch < 1:
        raise UserError(
            f"--batch-size {cfg.batch_size}: larger than the unlabeled pool ({n} images over {world} process(es)); "
            f"pass a smaller --batch-size (at most {n // world})"
        )
    if cfg.max_steps_per_epoch:
        steps_per_epoch = min(steps_per_epoch, cfg.max_steps_per_epoch)
    total_steps = steps_per_epoch * cfg.epochs
    warmup_steps = int(round(cfg.warmup_epochs * steps_per_epoch))

    backbone = build_encoder(cfg.arch, cfg.width)
    model = MoCo(
        backbone, dim=cfg.moco_dim, k=cfg.moco_k, temperature=cfg.moco_t, mlp=cfg.mlp, symmetric=cfg.symmetric,
        bn_splits=1 if world > 1 else cfg.bn_splits, generator=init_gen,
    ).to(device)  # fmt: skip
    # channels-last where the convolutions run bf16 (CUDA, a bf16 CPU); the CPU fp32 path stays NCHW
    memory_format = torch.channels_last if cuda or precision.bf16 else torch.contiguous_format
    model = model.to(memory_format=memory_format)
    optimizer = torch.optim.SGD(model.query_parameters(), lr=cfg.lr, momentum=0.9, weight_decay=cfg.weight_decay)
    spec = cfg.view_spec()

    start_epoch, step, history = 0, 0, []
    mid_epoch: dict[str, Any] | None = None
    if resume_state is not None:
        check_resume_config(cfg, resume_state)
        model.load_state_dict(resume_state["moco_state"])
        optimizer.load_state_dict(resume_state["optimizer"])
        order_gen.set_state(resume_state["generators"]["order"])
        set_rng_state(resume_state["rng"])
        history = list(resume_state["history"])
        step = resume_state["step"]
        start_epoch = resume_state["epoch"]
        mid_epoch = resume_state.get("mid_epoch")
        if mid_epoch is not None and world == 1:
            aug_gen.set_state(resume_state["generators"]["augment"])
        elif mid_epoch is not None:
            mid_epoch = None  # mid-epoch state is single-process only; redo the epoch
            step = start_epoch * steps_per_epoch

    net: nn.Module = model
    if world > 1:
        ddp = nn.parallel.DistributedDataParallel
        # the queue and BN statistics are kept in step by the code (all-gathered keys, averaged
        # statistics at epoch ends), not re-broadcast at every forward
        no_sync = ("forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(ddp).parameters
                   else "broadcast_buffers")  # fmt: skip
        net = ddp(model, device_ids=[device.index] if cuda else None, **{no_sync: False})

    def checkpoint(epoch: int, mid: dict[str, Any] | None) -> None:
        if checkpoint_path is None or rank != 0:
            return
        state = {
            "format": CHECKPOINT_FORMAT,
            "version": CHECKPOINT_VERSION,
            "encoder_spec": {"arch": cfg.arch, "width": cfg.width},
            "encoder_state": {k: v.detach().cpu() for k, v in model.backbone_q.state_dict().items()},
            "moco_state": {k: v.detach().cpu() for k, v in model.state_dict().items()},
            "optimizer": optimizer.state_dict(),
            "scheduler": {
                "kind": "warmup-cosine",
                "step": step,
                "total_steps": total_steps,
                "warmup_steps": warmup_steps,
            },
            "generators": {"order": order_gen.get_state().cpu(), "augment": aug_gen.get_state().cpu()},
            "rng": rng_state(),
            "epoch": epoch,  # the epoch to run next (or, with mid_epoch, the one in progress)
            "step": step,
            "mid_epoch": mid,
            "finished": epoch >= cfg.epochs and mid is None,
            "history": history,
            "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in cfg.params().items()},
            **(checkpoint_extra or {}),
        }
        save_checkpoint(state, checkpoint_path)
        if on_checkpoint is not None:
            on_checkpoint(Path(checkpoint_path))

    started = time.perf_counter()
    last_checkpoint = time.monotonic()
    bar = tqdm(total=total_steps, initial=step, desc="moco", disable=not cfg.progress or rank != 0, dynamic_ncols=True)
    # Ctrl-C / SIGTERM: finish the step, write a mid-epoch checkpoint, then stop (one process only)
    with StopAtStepBoundary(enabled=world == 1) as stop:
        for epoch in range(start_epoch, cfg.epochs):
            if mid_epoch is not None:
                order = mid_epoch["order"].to(device)
                first_step = mid_epoch["step_in_epoch"]
                sums = dict(mid_epoch["sums"])
                mid_epoch = None
            else:
                order = torch.randperm(n, generator=order_gen, device=device)
                aug_gen.manual_seed(_aug_seed(cfg.seed, epoch, rank))
                first_step = 0
                sums = {"loss": 0.0, "acc": 0.0, "steps": 0, "seconds": 0.0, "augment_seconds": 0.0}
            model.train()
            check_every = 25 if cuda else 1  # a host sync per check; every step is free on CPU
            running = torch.zeros(2, device=device)  # loss and contrastive top-1 since the last check
            epoch_t0 = time.perf_counter()

            for i in range(first_step, steps_per_epoch):
                t0 = time.perf_counter()
                idx = order[i * global_batch + rank * cfg.batch_size : i * global_batch + (rank + 1) * cfg.batch_size]
                x1, x2 = aug.two_views(to_unit(pool[idx]), spec, aug_gen)
                if not cuda:
                    sums["augment_seconds"] += time.perf_counter() - t0
                x1 = x1.contiguous(memory_format=memory_format)
                x2 = x2.contiguous(memory_format=memory_format)
                lr = warmup_cosine_lr(cfg.lr, step, total_steps, warmup_steps)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                progress = step / max(1, total_steps - 1)
                m = cosine_momentum(cfg.moco_m, progress) if cfg.m_schedule == "cosine" else cfg.moco_m
                with precision.autocast():  # InfoNCE, its logits and the queue stay fp32 (fewshot.moco)
                    loss, logits = net(x1, x2, m, order_gen)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                step += 1
                running[0] += loss.detach().float()
                running[1] += (logits.detach().argmax(1) == 0).float().mean()
                sums["steps"] += 1
                if sums["steps"] % check_every == 0 or i + 1 == steps_per_epoch:
                    _drain(running, sums, cfg, epoch, step)
                bar.update(1)
                if step % 10 == 0 and not cuda:
                    bar.set_postfix(
                        loss=f"{sums['loss'] / sums['steps']:.3f}",
                        ips=f"{global_batch / (time.perf_counter() - t0):.0f}",
                    )
                minutes = cfg.checkpoint_minutes
                due = minutes > 0 and time.monotonic() - last_checkpoint >= minutes * 60
                if (due or stop.requested is not None) and i + 1 < steps_per_epoch and world == 1:
                    _drain(running, sums, cfg, epoch, step)
                    seconds = sums["seconds"] + time.perf_counter() - epoch_t0
                    checkpoint(
                        epoch, {"order": order.cpu(), "step_in_epoch": i + 1, "sums": {**sums, "seconds": seconds}}
                    )
                    last_checkpoint = time.monotonic()
                    stop.raise_if_requested()
            if cuda:
                torch.cuda.synchronize(device)
            sums["seconds"] += time.perf_counter() - epoch_t0
            average_buffers(model)
            model.eval()
            metrics = {
                "loss": sums["loss"] / sums["steps"],
                "contrastive_acc": sums["acc"] / sums["steps"],
                "lr": lr,
                "moco_m": m,
                "images_per_s": sums["steps"] * global_batch / max(sums["seconds"], 1e-9),
                "knn_val_acc": knn_accuracy(
                    model.backbone_q,
                    labeled.x_train,
                    labeled.y_train,
                    labeled.x_val,
                    labeled.y_val,
                    cfg.knn_k,
                    cfg.knn_t,
                    precision,
                ),
            }
            if not cuda:
                metrics["augment_share"] = sums["augment_seconds"] / max(sums["seconds"], 1e-9)
            if labeled.x_test is not None:
                metrics["knn_test_acc"] = knn_accuracy(
                    model.backbone_q,
                    labeled.x_train,
                    labeled.y_train,
                    labeled.x_test,
                    labeled.y_test,
                    cfg.knn_k,
                    cfg.knn_t,
                    precision,
                )
            if evaluate is not None:
                t_eval = time.perf_counter()
                metrics.update(evaluate(epoch, model.backbone_q))
                metrics["evaluate_s"] = time.perf_counter() - t_eval
            metrics["elapsed_s"] = time.perf_counter() - started
            history.append(metrics)
            bar.set_postfix(loss=f"{metrics['loss']:.3f}", knn_val=f"{metrics['knn_val_acc']:.3f}")
            if on_epoch is not None:
                on_epoch(epoch, metrics)
            checkpoint(epoch + 1, None)
            last_checkpoint = time.monotonic()
            stop.raise_if_requested()
    bar.close()
    model.eval()
    return PretrainResult(
        encoder=plain_encoder(model, cfg.arch, cfg.width),
        history=history,
        model=model,
        steps=step,
        wall_seconds=time.perf_counter() - started,
    )


# ---------------------------------------------------------------- the MLflow job

RESUME_CHOICES = ("auto", "never")
REGISTERED_MODEL = "fewshot-moco-encoder"


def default_run_name(cfg: PretrainConfig) -> str:
    return f"moco-{cfg.arch}-w{cfg.width}-seed{cfg.seed}"


def checkpoint_file(checkpoint_dir: str | Path | None, run_name: str) -> Path:
    return Path(checkpoint_dir or "checkpoints/moco") / run_name / "last.pt"


def init_distributed(device: str) -> tuple[int, int]:
    """Under torchrun (WORLD_SIZE > 1): join the process group, gloo on CPU, nccl on CUDA."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 or distributed():
        return _rank_world()
    cuda = pick_device(device).type == "cuda"
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend="nccl" if cuda else "gloo")
    return dist.get_rank(), dist.get_world_size()


def views_figure(mnist: MNIST, draw: LabeledDraw, spec: aug.ViewSpec, seed: int):
    from fewshot import plots

    x = to_unit(mnist.train_images[draw.unlabeled_idx[:8]])
    generator = torch.Generator().manual_seed(seed)
    rows = [x] + [aug.random_view(x, spec, generator) for _ in range(4)]
    return plots.image_grid_figure(rows, ["original"] + [f"view #{i + 1}" for i in range(4)], "MoCo views")


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
    from fewshot import tracking
    from fewshot.data import draw_labels, load_mnist
    from fewshot.device import configure_threads

    rank, world = init_distributed(cfg.device)
    cfg.validate(world)
    configure_threads()
    if world > 1 and pick_device(cfg.device).type == "cpu":
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    run_name = run_name or default_run_name(cfg)
    path = checkpoint_file(checkpoint_dir, run_name)
    state = resolve_resume(resume, path, load_checkpoint, redo_logging=world == 1)
    if state is not None:
        check_resume_config(cfg, state)
        if resume not in RESUME_CHOICES:
            path = Path(resume)
    mnist = load_mnist(cfg.data_dir)
    draw = draw_labels(mnist.train_labels, cfg.seed, cfg.labels_per_class, cfg.n_labels)
    if rank != 0:  # workers train; rank 0 logs and writes checkpoints
        result = pretrain(replace(cfg, progress=False), mnist, draw, resume_state=state)
        return {"rank": rank, "steps": result.steps}

    run_id = state.get("mlflow_run_id") if state else None
    if run_id is not None:
        tracking.configure()
        if not tracking.run_exists(run_id):
            raise UserError(f"--resume: the checkpoint's MLflow run {run_id} is not in this tracking store; "
                            "point MLFLOW_TRACKING_URI at the store it came from or pass --resume never")  # fmt: skip
    tags = {"job": "moco_pretrain", "arch": cfg.arch, "seed": cfg.seed}
    started = time.perf_counter()
    with tracking.start_run(run_name=run_name, run_id=run_id, tags=tags) as tracker:
        already = tracking.logged_steps(tracker.run_id, "loss") if run_id else set()
        if state is None:
            tracker.log_params({**cfg.params(), "world_size": world, "checkpoint": str(path.resolve()),
                                "n_unlabeled": len(draw.unlabeled_idx),
                                "precision_resolved": Precision.choose(cfg.precision, pick_device(cfg.device)).name})  # fmt: skip
            tracker.log_draw(draw, mnist.source)
            tracker.log_figure(views_figure(mnist, draw, cfg.view_spec(), cfg.seed), "augmentation/views.png")
        else:
            tracker.set_tags({"resumed_from_step": state["step"]})
            tracker.log_new_steps(enumerate(state["history"]), already)  # epochs whose logging was lost

        result = pretrain(
            cfg, mnist, draw, on_epoch=tracker.new_step_logger(already, on_epoch), checkpoint_path=path,
            checkpoint_extra={"mlflow_run_id": tracker.run_id}, resume_state=state,
        )  # fmt: skip
        encoder = result.encoder
        device = pick_device(cfg.device)
        labeled = labeled_for_monitor(mnist, draw, device, with_test=False)
        score = selection_score(encoder.to(device), labeled, cfg.knn_k, cfg.knn_t)
        final = result.history[-1]
        summary = {
            "final_knn_val_acc": final["knn_val_acc"],
            "loo_knn_acc": score,
            "wall_seconds": time.perf_counter() - started,
            "steps": result.steps,
        }
        if "knn_test_acc" in final:
            summary["final_knn_test_acc"] = final["knn_test_acc"]
        tracker.log_metrics(summary)
        tracker.log_checkpoint(path)
        spec = {"kind": "encoder", "arch": cfg.arch, "width": cfg.width, "feature_dim": encoder.feature_dim}
        model_uri = tracker.log_torch_model(encoder.cpu(), "encoder", spec=spec)
        out: dict[str, Any] = {"run_id": tracker.run_id, "model_uri": model_uri, "checkpoint": str(path), **summary}
        if register:
            version, alias = tracking.register_model_version(
                model_uri, REGISTERED_MODEL, score,
                {"knn_val_acc": final["knn_val_acc"], "knn_test_acc": final.get("knn_test_acc", ""),
                 "epochs": cfg.epochs, "run_id": tracker.run_id},
            )  # fmt: skip
            tracker.set_tags({"registered_version": version, "registered_alias": alias})
            out.update(version=version, alias=alias)
    return out
