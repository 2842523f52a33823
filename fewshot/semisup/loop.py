"""The semi-supervised training loop (no MLflow): build, restore, one step, end-of-window metrics.

Each step draws a labeled batch (weak view) and an unlabeled batch seen twice, weakly and strongly
augmented (``fewshot.semisup.fixmatch`` turns them into the loss). The unlabeled pool's true labels
are only ever read by the ``Monitor`` (pseudo-label accuracy, logged for people to look at).
``train_semisup`` is the plain API (the benchmark, the HPO target and the ``semisup`` probe call
it); ``fewshot.semisup.job.run_semisup`` wraps it in a tracked, resumable MLflow run.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from fewshot import augment as aug
from fewshot.checkpoints import check_same_settings, load_checked
from fewshot.data import NUM_CLASSES, to_unit
from fewshot.device import Precision
from fewshot.errors import TrainingDiverged, UserError
from fewshot.jobs.loop import CheckpointWriter, StepBoundary, config_for_checkpoint
from fewshot.models import EncoderClassifier
from fewshot.names import SEMISUP_CHECKPOINT_FORMAT, SEMISUP_CHECKPOINT_VERSION
from fewshot.semisup.config import EvalCallback, Metrics, SemisupConfig
from fewshot.semisup.data import SemisupData
from fewshot.semisup.fixmatch import PseudoLabeler, StepOutput, consistency_loss, fixmatch_lr
from fewshot.semisup.model import EMA, evaluate_model, make_optimizer, model_spec, with_clean_batchnorm
from fewshot.semisup.neighbours import NeighbourSmoother, build_smoother

DEFAULT_CHECKPOINT_DIR = "checkpoints/semisup"  # <dir>/<run name>/last.pt


class Monitor:
    """Running sums over one evaluation window: losses, mask rate and, from the pool's true labels
    (never used for training), pseudo-label accuracy and a (true, pseudo-label) confusion matrix."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.reset()

    def reset(self) -> None:
        self.sums = torch.zeros(6, device=self.device)  # sup, unsup, masked, seen, correct masked, correct all
        self.steps = 0
        self.confusion = torch.zeros(NUM_CLASSES * NUM_CLASSES, dtype=torch.long, device=self.device)

    @torch.no_grad()
    def add(self, out: StepOutput, true_labels: torch.Tensor | None) -> None:
        p = out.pseudo
        self.sums[0] += out.sup_loss.float()
        self.sums[1] += out.unsup_loss.float()
        self.sums[2] += p.mask.sum()
        self.sums[3] += p.mask.numel()
        if true_labels is not None:
            hit = (p.targets == true_labels).float()
            self.sums[4] += (hit * p.mask).sum()
            self.sums[5] += hit.sum()
            chosen = p.mask.bool()
            flat = true_labels[chosen] * NUM_CLASSES + p.targets[chosen]
            self.confusion += torch.bincount(flat, minlength=NUM_CLASSES * NUM_CLASSES)
        self.steps += 1

    def metrics(self, with_labels: bool) -> Metrics:
        sup, unsup, masked, seen, correct_masked, correct_all = self.sums.tolist()
        steps = max(self.steps, 1)
        out = {"sup_loss": sup / steps, "unsup_loss": unsup / steps, "mask_rate": masked / max(seen, 1)}
        if with_labels:
            out["pseudo_acc"] = correct_masked / masked if masked else float("nan")
            out["pseudo_acc_all"] = correct_all / max(seen, 1)
        return out


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load and check a semi-supervised checkpoint; one-line UserError when missing or corrupt."""
    return load_checked(
        path, SEMISUP_CHECKPOINT_FORMAT, SEMISUP_CHECKPOINT_VERSION,
        ("model_spec", "model", "optimizer", "labeler", "generator", "step", "history", "config"),
        "semi-supervised",
    )  # fmt: skip


def check_resume_config(cfg: SemisupConfig, state: dict[str, Any]) -> None:
    check_same_settings(state["config"], cfg, SemisupConfig.RESUME_KEYS)


@dataclass
class SemisupResult:
    model: EncoderClassifier  # the scored model (EMA when --ema > 0; clean batch-norm statistics), eval mode
    online: EncoderClassifier
    history: list[Metrics] = field(default_factory=list)
    steps: int = 0
    train_seconds: float = 0.0
    pseudo_confusion: torch.Tensor | None = None  # last window's (true, pseudo-label) counts, monitoring only


def _pool_order(seed: int, epoch: int, n: int, device: torch.device) -> torch.Tensor:
    """The pool's order in one pass: a function of (seed, epoch) only, so a resume needs no stored order."""
    generator = torch.Generator().manual_seed((seed * 1_000_003 + epoch * 7919 + 17) % (2**63))
    return torch.randperm(n, generator=generator).to(device)


class SemisupTrainer:
    """One semi-supervised run's live state and its phases: build (the constructor), ``restore``,
    ``train_step``, ``window_metrics`` (the end of an evaluation window) and ``checkpoint_state``."""

    def __init__(
        self, cfg: SemisupConfig, data: SemisupData, model: EncoderClassifier, build_graph: bool = True
    ) -> None:
        cfg.validate()
        if cfg.refit:  # the head warm-up (prepare_model) kept the 75/25 split; training sees all labels
            data = data.with_validation_in_training()
        self.cfg, self.data, self.model = cfg, data, model
        self.device = data.x_train.device
        self.cuda = self.device.type == "cuda"
        self.precision = Precision.choose(cfg.precision, self.device)
        n_pool = data.pool.shape[0]
        self.unlabeled_batch = cfg.unlabeled_batch
        if n_pool < self.unlabeled_batch:
            raise UserError(
                f"--batch-size {cfg.batch_size} x --mu {cfg.mu} = {self.unlabeled_batch}: more than the unlabeled "
                f"pool ({n_pool})"
            )
        self.steps_per_pass = n_pool // self.unlabeled_batch
        self.total = cfg.total_steps(n_pool)
        counts = torch.bincount(data.y_train, minlength=NUM_CLASSES).float()
        p_target = (counts + 1) / (counts + 1).sum()  # the labeled frequencies, smoothed (uniform for a balanced draw)
        self.labeler = PseudoLabeler(cfg, p_target, n_pool, self.device)
        self.optimizer = make_optimizer(cfg, model)
        self.ema = EMA(model, cfg.ema) if cfg.ema > 0 else None
        self.generator = torch.Generator(device=self.device).manual_seed(cfg.seed)
        self.weak, self.strong = cfg.weak_spec(), cfg.strong_spec()
        self.monitor = Monitor(self.device)
        self.with_labels = data.pool_labels is not None
        self.step, self.history, self.seconds = 0, [], 0.0
        self._scored: tuple[int, EncoderClassifier] | None = None  # (step, its clean-statistics copy)
        self._order, self._order_epoch = torch.empty(0, dtype=torch.long), -1
        if cfg.graph_k > 0 and build_graph:  # a resume brings the graph and memory in its checkpoint
            self._build_smoother()

    def _build_smoother(self) -> None:
        """The neighbour graph from the model as it starts (the MoCo encoder); its minutes count as training."""
        started = time.perf_counter()
        data, cfg = self.data, self.cfg
        self.labeler.smoother = build_smoother(
            self.model.encoder, data.pool, data.x_train, data.y_train, cfg.graph_k, cfg.graph_alpha, self.precision
        )
        self.seconds += time.perf_counter() - started

    def restore(self, state: dict[str, Any]) -> None:
        """Continue a checkpoint's state; the run then reproduces the uninterrupted one."""
        check_resume_config(self.cfg, state)
        self.model.load_state_dict(state["model"])
        if self.ema is not None:
            self.ema.model.load_state_dict(state["ema"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.labeler.load_state_dict(state["labeler"])
        if self.cfg.graph_k > 0:
            saved_graph = state["labeler"].get("smoother")
            if saved_graph is None:  # a checkpoint older than --graph-k (its config does not name it)
                raise UserError(
                    "--resume: the checkpoint was made without --graph-k; rerun with --graph-k 0 or start fresh"
                )
            self.labeler.smoother = NeighbourSmoother.from_state(saved_graph, self.cfg.graph_alpha, self.device)
        self.generator.set_state(state["generator"])
        self.step, self.history = state["step"], list(state["history"])
        self.seconds = state.get("train_seconds", 0.0)

    @property
    def evaluated(self) -> EncoderClassifier:
        """The model trained for scoring: the EMA model when there is one."""
        return self.ema.model if self.ema is not None else self.model

    def scored_model(self) -> EncoderClassifier:
        """What is scored and returned: ``evaluated``, or with ``cfg.bn_recalibration`` its copy with
        batch-norm statistics of clean pool images (training goes on with its own)."""
        if self.cfg.bn_recalibration <= 0:
            return self.evaluated  # mid-run this may be the online model: its mode is left alone
        # the last evaluation and the returned model are the same step's: one recalibration serves both
        if self._scored is None or self._scored[0] != self.step:
            clean = with_clean_batchnorm(self.evaluated, self.data.pool, self.cfg.bn_recalibration, self.precision)
            self._scored = (self.step, clean)
        return self._scored[1]

    def checkpoint_state(self) -> dict[str, Any]:
        ema = self.ema
        return {
            "model_spec": model_spec(self.model),
            "model": {k: v.detach().cpu() for k, v in self.model.state_dict().items()},
            "ema": {k: v.detach().cpu() for k, v in ema.model.state_dict().items()} if ema is not None else None,
            "optimizer": self.optimizer.state_dict(),
            "labeler": self.labeler.state_dict(),
            "generator": self.generator.get_state().cpu(),
            "step": self.step,
            "finished": self.step >= self.total,
            "history": self.history,
            "train_seconds": self.seconds,
        }

    def _positions(self) -> torch.Tensor:
        """This step's unlabeled images: the next slice of the pass's pool order."""
        epoch, i = divmod(self.step, self.steps_per_pass)
        if epoch != self._order_epoch:
            self._order, self._order_epoch = (
                _pool_order(self.cfg.seed, epoch, self.data.pool.shape[0], self.device),
                epoch,
            )
        return self._order[i * self.unlabeled_batch : (i + 1) * self.unlabeled_batch]

    def train_step(self) -> float:
        """One optimizer step (labeled weak view, unlabeled weak and strong views); returns its lr."""
        cfg, data, model, generator = self.cfg, self.data, self.model, self.generator
        positions = self._positions()
        labeled = torch.randint(data.x_train.shape[0], (cfg.batch_size,), generator=generator, device=self.device)
        x_l = data.x_train[labeled]
        if cfg.bar > 0:
            x_l = aug.crossbar(x_l, cfg.bar, generator)
        x_l = aug.random_affine(x_l, self.weak, generator)
        u = to_unit(data.pool[positions])
        u_weak = aug.random_affine(u, self.weak, generator)
        u_strong = aug.random_view(u, self.strong, generator)
        lr = fixmatch_lr(cfg.lr, self.step, self.total)
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group["lr_ratio"]
        teacher = self.ema.model if (self.ema is not None and cfg.targets == "ema") else model
        with self.precision.autocast():  # losses, pseudo-labels and the EMA stay fp32
            out = consistency_loss(
                model, teacher, x_l, data.y_train[labeled], u_weak, u_strong, positions, self.labeler, cfg.lambda_u
            )
        self.optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        self.optimizer.step()
        self.step += 1
        if self.ema is not None:
            self.ema.update(model, self.step)
        self.monitor.add(out, data.pool_labels[positions] if self.with_labels else None)
        return lr

    def window_metrics(self, lr: float, window_seconds: float, window_steps: int) -> Metrics:
        """The end of an evaluation window: its monitor sums, the evaluated model's validation (and
        test, with ``eval_test``) top-1, the thresholds and alignment in use, speed."""
        cfg, data = self.cfg, self.data
        metrics = self.monitor.metrics(self.with_labels)
        if not (math.isfinite(metrics["sup_loss"]) and math.isfinite(metrics["unsup_loss"])):
            raise TrainingDiverged(
                f"semi-supervised training diverged by step {self.step} (loss {metrics['sup_loss']} + "
                f"{metrics['unsup_loss']}); lower --lr (now {cfg.lr})"
            )
        scored = self.scored_model()
        metrics["val_acc"], metrics["val_loss"], _ = evaluate_model(scored, data.x_val, data.y_val, self.precision)
        if cfg.eval_test and data.x_test is not None:
            metrics["test_acc"], _, _ = evaluate_model(scored, data.x_test, data.y_test, self.precision)
        thresholds = self.labeler.thresholds()
        if isinstance(thresholds, torch.Tensor):
            metrics["threshold_min"] = float(thresholds.min())
            metrics["threshold_mean"] = float(thresholds.mean())
        if cfg.dist_align:
            metrics["p_model_max"] = float(self.labeler.p_model.max())
            metrics["p_model_min"] = float(self.labeler.p_model.min())
        metrics.update(
            lr=lr, step=self.step, unlabeled_per_s=window_steps * self.unlabeled_batch / max(window_seconds, 1e-9),
            train_seconds=self.seconds,
        )  # fmt: skip
        return metrics


def _shown(metrics: Metrics) -> dict[str, str]:
    shown = {"val": f"{metrics['val_acc']:.3f}", "mask": f"{metrics['mask_rate']:.2f}"}
    if "test_acc" in metrics:
        shown["test"] = f"{metrics['test_acc']:.4f}"
    return shown


def train_semisup(
    cfg: SemisupConfig,
    data: SemisupData,
    model: EncoderClassifier,
    on_eval: EvalCallback | None = None,
    checkpoint_path: str | Path | None = None,
    checkpoint_extra: dict[str, Any] | None = None,
    resume_state: dict[str, Any] | None = None,
) -> SemisupResult:
    """Train ``model`` (built by ``build_model``, head warmed up or not) on ``data``.

    Every ``cfg.eval_every`` steps (and at the end) the evaluated model (EMA if any) is scored on
    the validation split (and the test set when present and ``cfg.eval_test``), the window's
    monitor metrics are added, ``on_eval(step, metrics)`` runs (whatever it raises propagates),
    and then, with ``checkpoint_path``, the full state is written atomically. ``resume_state``
    (from ``load_checkpoint``) continues such a state and reproduces the uninterrupted run.
    """
    trainer = SemisupTrainer(cfg, data, model, build_graph=resume_state is None)
    if resume_state is not None:
        trainer.restore(resume_state)
    path = Path(checkpoint_path) if checkpoint_path is not None else None
    writer = CheckpointWriter(path, SEMISUP_CHECKPOINT_FORMAT, SEMISUP_CHECKPOINT_VERSION,
                              config_for_checkpoint(cfg.params()), checkpoint_extra or {})  # fmt: skip
    model.train()
    last_confusion: torch.Tensor | None = None
    progress_bar = tqdm(total=trainer.total, initial=trainer.step, desc="semisup", disable=not cfg.progress,
                        dynamic_ncols=True)  # fmt: skip
    window_start, window_steps = time.perf_counter(), 0
    # Ctrl-C / SIGTERM: finish the step, write a checkpoint, then stop
    with StepBoundary() as boundary:
        while trainer.step < trainer.total:
            lr = trainer.train_step()
            window_steps += 1
            progress_bar.update(1)
            if trainer.step % cfg.eval_every == 0 or trainer.step == trainer.total:
                if trainer.cuda:
                    torch.cuda.synchronize(trainer.device)
                window_seconds = time.perf_counter() - window_start
                trainer.seconds += window_seconds
                metrics = trainer.window_metrics(lr, window_seconds, window_steps)
                trainer.history.append(metrics)
                last_confusion = trainer.monitor.confusion.view(NUM_CLASSES, NUM_CLASSES).cpu().clone()
                trainer.monitor.reset()
                progress_bar.set_postfix(_shown(metrics))
                if on_eval is not None:
                    on_eval(trainer.step, metrics)
                writer.write(trainer.checkpoint_state())
                window_start, window_steps = time.perf_counter(), 0
            elif boundary.checkpoint_due():  # the window's monitor metrics restart on resume; training does not
                trainer.seconds += time.perf_counter() - window_start
                writer.write(trainer.checkpoint_state())
            boundary.stop_if_requested()
    progress_bar.close()
    model.eval()
    final = trainer.scored_model().eval()
    confusion = last_confusion if trainer.with_labels else None
    return SemisupResult(final, model, trainer.history, trainer.step, trainer.seconds, confusion)
