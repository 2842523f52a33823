"""``semisup`` as a tracked, resumable MLflow job: what it logs, and its registered classifier.

The skeleton (resume, the run, history replay, checkpoint, registration) is ``fewshot.jobs``;
this module says what is particular to semi-supervised training.
"""

from __future__ import annotations

from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any

from torch import nn

from fewshot import plots, tracking
from fewshot.data import MNIST, LabeledDraw, draw_labels, load_mnist
from fewshot.device import Precision, configure_threads, pick_device
from fewshot.encoder_source import resolve_encoder
from fewshot.evaluate import confusion_matrix, predict_logits, single_view_metrics, topk_accuracy
from fewshot.jobs.tracked import JobStart, Registration, TrackedJob
from fewshot.models import EncoderClassifier, build_encoder
from fewshot.names import CLASSIFIER_MODEL
from fewshot.semisup.config import RANDOM_INIT, EvalCallback, SemisupConfig
from fewshot.semisup.data import SemisupData, semisup_data
from fewshot.semisup.figures import curves_figure, views_figure
from fewshot.semisup.loop import (
    DEFAULT_CHECKPOINT_DIR,
    SemisupResult,
    check_resume_config,
    load_checkpoint,
    train_semisup,
)
from fewshot.semisup.model import encoder_arch, evaluate_model, final_test_scores, model_spec, prepare_model

JOB = "semisup"


def init_tag(cfg: SemisupConfig) -> str:
    return RANDOM_INIT if cfg.random_init else "moco"


def default_run_name(cfg: SemisupConfig) -> str:
    return f"semisup-{init_tag(cfg)}-seed{cfg.seed}"


def _initial_encoder(cfg: SemisupConfig, state: dict[str, Any] | None) -> tuple[nn.Module | None, dict, dict]:
    """(encoder or None for random init, source params, source tags). A resumed run rebuilds the
    architecture only (the checkpoint holds every weight; the init's provenance is in the run already);
    a fresh one resolves ``--init`` before the run starts, so a bad URI leaves no run behind."""
    if state is not None:
        spec = state["model_spec"]
        return build_encoder(spec["arch"], int(spec["width"])), {}, {}
    if cfg.random_init:
        return None, {}, {}
    encoder, source = resolve_encoder(cfg.init, option="--init")
    return encoder, source.params(), source.tags()


def run_semisup(
    cfg: SemisupConfig,
    checkpoint_dir: str | Path | None = None,
    run_name: str | None = None,
    resume: str = "auto",
    register: bool = True,
    on_eval: EvalCallback | None = None,
) -> dict[str, Any]:
    """Train on one label draw in an MLflow run, log everything, register the classifier.

    ``resume``: ``auto`` (continue this run name's unfinished checkpoint, in the same MLflow
    run), ``never``, or a checkpoint path. With ``register`` the classifier becomes a version of
    ``fewshot-classifier``, champion when its validation top-1 beats the champion's.
    """
    cfg.validate()
    configure_threads()
    device = pick_device(cfg.device)
    start = JobStart.resolve(resume, run_name or default_run_name(cfg), checkpoint_dir, DEFAULT_CHECKPOINT_DIR,
                             load_checkpoint, partial(check_resume_config, cfg))  # fmt: skip
    mnist = load_mnist(cfg.data_dir)
    draw = draw_labels(mnist.train_labels, cfg.seed, cfg.labels_per_class, cfg.n_labels)
    encoder, source_params, source_tags = _initial_encoder(cfg, start.state)
    data = semisup_data(mnist, draw, device)
    tags = {"job": JOB, "init": init_tag(cfg), "seed": cfg.seed, **source_tags}
    with TrackedJob(start, tags, step_metric="val_acc") as job:
        model = prepare_model(replace(cfg, head_warmup=cfg.head_warmup and start.state is None), data, encoder)
        params = {**source_params, "device": str(device),
                  "precision_resolved": Precision.choose(cfg.precision, device).name}  # fmt: skip
        fresh = partial(_log_fresh, cfg=cfg, params=params, model=model, data=data, mnist=mnist, draw=draw,
                        checkpoint=start.checkpoint)  # fmt: skip
        # a resumed run: the evaluations whose logging was lost
        job.begin(fresh, ((int(m["step"]), m) for m in start.state["history"]) if start.state else ())
        result = train_semisup(
            cfg, data, model, on_eval=job.step_logger(on_eval), checkpoint_path=start.checkpoint,
            checkpoint_extra=job.checkpoint_extra, resume_state=start.state,
        )  # fmt: skip
        return _finish(job, cfg, data, result, register)


def _log_fresh(
    tracker: tracking.Tracker, cfg: SemisupConfig, params: dict[str, Any], model: EncoderClassifier,
    data: SemisupData, mnist: MNIST, draw: LabeledDraw, checkpoint: Path,
) -> None:  # fmt: skip
    """A fresh run's params, labeled draw and views; the warmed-up head's validation top-1."""
    arch, width = encoder_arch(model.encoder)
    tracker.log_params({
        **cfg.params(), **params, "model_arch": arch, "model_width": width,
        "n_unlabeled": len(draw.unlabeled_idx), "total_steps": cfg.total_steps(len(draw.unlabeled_idx)),
        "unlabeled_batch": cfg.unlabeled_batch, "checkpoint": str(checkpoint.resolve()),
    })  # fmt: skip
    tracker.log_draw(draw, mnist.source)
    tracker.log_figure(views_figure(data, cfg), "augmentation/views.png")
    if cfg.head_warmup and not cfg.random_init:
        head_val, _, _ = evaluate_model(model, data.x_val, data.y_val)
        tracker.log_metrics({"warmup_head_val_top1": head_val})


def _log_scores(job: TrackedJob, cfg: SemisupConfig, data: SemisupData, result: SemisupResult) -> dict[str, Any]:
    """Validation and test top-k with confusion matrices, the figures and the summary metrics."""
    tracker, classifier = job.tracker, result.model
    title = f"semi-supervised ({init_tag(cfg)} init), seed {cfg.seed}"
    val_logits = predict_logits(classifier, data.x_val)
    test_logits, plain_logits = final_test_scores(classifier, data.x_test, cfg)
    single_view: dict[str, float] = {}  # with TTA, the classifier's own single-view figure beside
    if cfg.tta_views:
        single_view = single_view_metrics(topk_accuracy(plain_logits, data.y_test))
    val_topk = topk_accuracy(val_logits, data.y_val)
    test_topk = topk_accuracy(test_logits, data.y_test)
    tracker.log_evaluation("val", val_topk, confusion_matrix(data.y_val.cpu(), val_logits.argmax(1).cpu()),
                           f"{title}: validation confusion")  # fmt: skip
    tracker.log_evaluation("test", test_topk, confusion_matrix(data.y_test.cpu(), test_logits.argmax(1).cpu()),
                           f"{title}: test confusion")  # fmt: skip
    if result.history:
        tracker.log_figure(curves_figure(result.history, title), "evaluation/learning_curves.png")
    if result.pseudo_confusion is not None:
        tracker.log_figure(
            plots.confusion_figure(result.pseudo_confusion, f"{title}: confident pseudo-labels, last window"),
            "evaluation/pseudo_label_confusion.png",
        )
    final = result.history[-1] if result.history else {}
    summary = {
        "train_seconds": result.train_seconds,
        # training time of earlier sessions (from the checkpoint) plus all of this one
        "wall_seconds": (job.start.state or {}).get("train_seconds", 0.0) + job.elapsed(),
        "final_mask_rate": final.get("mask_rate", float("nan")),
        **single_view,
    }
    if "pseudo_acc" in final:
        summary["final_pseudo_acc"] = final["pseudo_acc"]
    tracker.log_metrics(summary)
    return {"val_top1": val_topk[1], **{f"test_top{k}": v for k, v in test_topk.items()}, **summary}


def _finish(job: TrackedJob, cfg: SemisupConfig, data: SemisupData, result: SemisupResult,
            register: bool) -> dict[str, Any]:  # fmt: skip
    """Scores logged, then the classifier logged and (with ``register``) registered by validation top-1."""
    scores = _log_scores(job, cfg, data, result)
    version_tags = {"job": JOB, "init": init_tag(cfg), "seed": cfg.seed, "run_id": job.run_id,
                    "test_top1": f"{scores['test_top1']:.6f}",
                    "test_score": "report-only (never used to pick the champion)"}  # fmt: skip
    registration = Registration(CLASSIFIER_MODEL, scores["val_top1"], version_tags) if register else None
    classifier = result.model
    return {**job.finish(classifier, "classifier", model_spec(classifier), registration), **scores}
