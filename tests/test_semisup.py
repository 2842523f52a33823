"""Semi-supervised training: pseudo-label mask, views, pools, label leakage, resume, the tracked job."""

from __future__ import annotations

import dataclasses
import signal
from dataclasses import replace
from pathlib import Path

import mlflow
import pytest
import torch
from mlflow.tracking import MlflowClient
from torch.optim.optimizer import register_optimizer_step_post_hook

from fewshot import augment as aug
from fewshot import report
from fewshot.data import labeled_tensors, to_unit
from fewshot.errors import UserError
from fewshot.evaluate import predict_logits, topk_accuracy
from fewshot.linear_head import cached_features
from fewshot.models import EncoderClassifier, build_encoder
from fewshot.probe import ProbeContext, ProbeSettings, run_probe
from fewshot.semisup import (
    EMA,
    PseudoLabeler,
    SemisupConfig,
    consistency_loss,
    final_test_scores,
    load_checkpoint,
    prepare_model,
    pseudo_labels,
    semisup_data,
    train_semisup,
)
from fewshot.semisup.job import run_semisup
from fewshot.semisup.loop import SemisupTrainer
from fewshot.train import FitConfig
from tests.conftest import run_cli
from tests.encoders import same_weights, tiny_encoder, write_checkpoint

TIMING = ("unlabeled_per_s", "train_seconds")


def tiny(**changes) -> SemisupConfig:
    """Width-8 network, 8 labeled + 16 unlabeled images per step, an evaluation every 3 steps."""
    cfg = SemisupConfig(init="random", width=8, steps=9, batch_size=8, mu=2, eval_every=3, progress=False,
                        threshold="flexmatch", dist_align=True, targets="ema", ema=0.9, tau=0.5,
                        bn_recalibration=64)  # fmt: skip
    return replace(cfg, **changes)


def _digit7(n: int) -> torch.Tensor:
    """A blocky seven: a top bar and a thick stem on the right (its mirror image has the stem on the left)."""
    x = torch.zeros(n, 1, 28, 28)
    x[:, :, 5:9, 6:22] = 1.0
    x[:, :, 9:24, 17:22] = 1.0
    return x


def _without_timing(history: list[dict]) -> list[dict]:
    return [{k: v for k, v in h.items() if k not in TIMING} for h in history]


def killed_at_step_6(step: int, metrics: dict) -> None:
    """An ``on_eval`` that stops a run at its step-6 evaluation, before that checkpoint is written."""
    if step == 6:
        raise KeyboardInterrupt


def interrupted_at_step_6(cfg: SemisupConfig, data, path: Path) -> dict:
    """Train until the step-6 evaluation stops the run; the checkpoint it left behind."""
    with pytest.raises(KeyboardInterrupt):
        train_semisup(cfg, data, prepare_model(cfg, data, None), on_eval=killed_at_step_6, checkpoint_path=path)
    return load_checkpoint(path)


# ---------------------------------------------------------------- the pseudo-label mask


def test_mask_keeps_exactly_the_predictions_at_or_above_the_threshold() -> None:
    probs = torch.tensor([[0.96, 0.04] + [0.0] * 8, [0.5, 0.5] + [0.0] * 8, [0.05, 0.95] + [0.0] * 8])
    logits = (probs + 1e-12).log()
    result = pseudo_labels(logits, 0.95)
    assert result.targets.tolist() == [0, 0, 1]
    assert result.mask.tolist() == [1.0, 0.0, 1.0]  # 0.95 itself passes, 0.5 does not
    # per-class thresholds: class 1 needs 0.99 now
    per_class = torch.full((10,), 0.9)
    per_class[1] = 0.99
    assert pseudo_labels(logits, per_class).mask.tolist() == [1.0, 0.0, 0.0]
    # distribution alignment re-weights before the argmax and the threshold
    align = torch.ones(10)
    align[0] = 0.1
    aligned = pseudo_labels(logits, 0.9, align)
    # row 0: 0.096 vs 0.04 -> still a 0, now at 0.71; row 1: 0.05 vs 0.5 -> a 1 at 0.91
    assert aligned.targets.tolist() == [0, 1, 1] and aligned.mask.tolist() == [0.0, 1.0, 1.0]
    assert torch.allclose(aligned.probs.sum(1), torch.ones(3))


def test_flexmatch_thresholds_follow_each_class_learning_status() -> None:
    cfg = SemisupConfig(threshold="flexmatch", tau=0.9, dist_align=False)
    labeler = PseudoLabeler(cfg, torch.full((10,), 0.1), n_pool=20, device=torch.device("cpu"))
    assert torch.equal(labeler.thresholds(), torch.zeros(10))  # warm-up: nothing learned yet
    logits = torch.full((20, 10), -10.0)
    logits[:12, 3] = 10.0  # twelve confident threes
    logits[12:16, 7] = 10.0  # four confident sevens
    labeler(logits, torch.arange(20))
    thresholds = labeler.thresholds()
    assert thresholds[3] == pytest.approx(0.9)  # the best-learned class keeps tau
    beta = 4 / 12
    assert thresholds[7] == pytest.approx(0.9 * beta / (2 - beta))  # a lagging class gets a lower bar
    assert thresholds[0] == 0.0


def test_targets_carry_no_gradient() -> None:
    torch.manual_seed(0)
    model = EncoderClassifier(build_encoder("digit", 4))
    cfg = SemisupConfig(tau=0.0, dist_align=True)  # every pseudo-label counts
    labeler = PseudoLabeler(cfg, torch.full((10,), 0.1), n_pool=6, device=torch.device("cpu"))
    x_l, y_l = torch.rand(4, 1, 28, 28), torch.arange(4)
    u_weak = torch.rand(6, 1, 28, 28, requires_grad=True)
    u_strong = torch.rand(6, 1, 28, 28, requires_grad=True)
    for teacher in (model, EMA(model, 0.9).model):
        out = consistency_loss(model, teacher, x_l, y_l, u_weak, u_strong, torch.arange(6), labeler, lambda_u=1.0)
        assert not out.pseudo.targets.requires_grad and not out.pseudo.mask.requires_grad
        assert not out.pseudo.probs.requires_grad
        u_weak.grad = u_strong.grad = None
        out.loss.backward()
        assert u_weak.grad is None  # nothing flows back through the weak views (the targets)
        assert u_strong.grad is not None and u_strong.grad.abs().sum() > 0
        assert out.unsup_loss > 0 and out.pseudo.mask.sum() == 6


# ---------------------------------------------------------------- views and pools


def test_weak_and_strong_views_differ_and_stay_digit_shaped() -> None:
    cfg = SemisupConfig()
    x = _digit7(256)
    generator = torch.Generator().manual_seed(0)
    weak = aug.random_affine(x, cfg.weak_spec(), generator)
    strong = aug.random_view(x, cfg.strong_spec(), generator)

    def cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:  # of 5x5-smoothed images: a shift costs little
        smooth = torch.nn.functional.avg_pool2d
        return torch.nn.functional.cosine_similarity(smooth(a, 5, 1, 2).flatten(1), smooth(b, 5, 1, 2).flatten(1))

    assert weak.shape == strong.shape == x.shape
    assert 0 <= float(strong.min()) and float(strong.max()) <= 1 + 1e-5
    assert (weak - strong).abs().mean() > 0.02  # two different views of each image
    assert cosine(weak, strong).mean() < cosine(weak, x).mean()  # the strong view is the harder one
    flipped = x.flip(-1)
    for view in (weak, strong):  # never mirrored: each view is closer to the digit than to its mirror image
        assert (cosine(view, x) > cosine(view, flipped)).float().mean() >= 0.98
        assert cosine(view, x).mean() > cosine(view, flipped).mean() + 0.2
        assert (view.sum((1, 2, 3)) > 0.3 * x.sum((1, 2, 3))).all()  # the strokes survive (cutout is mild)


def test_labeled_and_unlabeled_pools_are_disjoint(mnist, draw) -> None:
    data = semisup_data(mnist, draw, "cpu")
    labeled = set(draw.train_idx.tolist()) | set(draw.val_idx.tolist())
    pool = set(data.pool_idx.tolist())
    assert not labeled & pool and len(labeled | pool) == mnist.train_images.shape[0]
    assert torch.equal(data.pool, mnist.train_images[data.pool_idx])
    assert data.x_train.shape[0] == 75 and data.x_val.shape[0] == 25
    leaky = dataclasses.replace(draw, unlabeled_idx=torch.cat([draw.unlabeled_idx, draw.val_idx[:1]]))
    with pytest.raises(RuntimeError, match="contains labeled images"):
        semisup_data(mnist, leaky, "cpu")


def test_refit_trains_on_all_100_labels_and_leaves_the_pool_alone(mnist, draw) -> None:
    data = semisup_data(mnist, draw, "cpu")
    refit = SemisupTrainer(tiny(refit=True), data, prepare_model(tiny(), data, None)).data
    assert refit.x_train.shape[0] == 100 and torch.equal(refit.x_train[75:], data.x_val)
    assert torch.equal(refit.y_train, torch.cat([data.y_train, data.y_val]))
    assert torch.equal(refit.x_val, data.x_val) and torch.equal(refit.pool, data.pool)  # validation kept, in-sample
    plain = SemisupTrainer(tiny(refit=False), data, prepare_model(tiny(), data, None)).data
    assert plain.x_train.shape[0] == 75 and data.x_train.shape[0] == 75  # the caller's data is not changed


def test_the_unlabeled_pools_true_labels_never_reach_the_loss(mnist, draw) -> None:
    cfg = tiny(steps=6)

    def train(labels_of_pool: torch.Tensor | None):
        data = semisup_data(mnist, draw, "cpu")
        data.pool_labels = labels_of_pool
        result = train_semisup(cfg, data, prepare_model(cfg, data, None))
        return result

    data = semisup_data(mnist, draw, "cpu")
    reference = train(data.pool_labels)
    shuffled = data.pool_labels[torch.randperm(len(data.pool_labels), generator=torch.Generator().manual_seed(1))]
    assert not torch.equal(shuffled, data.pool_labels)
    again = train(shuffled)
    hidden = train(None)
    for other in (again, hidden):
        assert same_weights(reference.online, other.online) and same_weights(reference.model, other.model)
    # the monitor did read them: pseudo-label accuracy changes with the shuffled labels, the rest does not
    assert [h["pseudo_acc_all"] for h in reference.history] != [h["pseudo_acc_all"] for h in again.history]
    assert [h["val_acc"] for h in reference.history] == [h["val_acc"] for h in again.history]
    assert "pseudo_acc" not in hidden.history[0]


def test_resume_reproduces_the_uninterrupted_run(mnist, draw, tmp_path: Path) -> None:
    cfg = tiny()
    data = semisup_data(mnist, draw, "cpu")
    reference = train_semisup(cfg, data, prepare_model(cfg, data, None))
    path = tmp_path / "last.pt"
    state = interrupted_at_step_6(cfg, data, path)
    assert state["step"] == 3 and not state["finished"]  # step 6's checkpoint was never written
    resumed = train_semisup(cfg, data, prepare_model(cfg, data, None), checkpoint_path=path, resume_state=state)
    assert resumed.steps == reference.steps == 9
    assert same_weights(resumed.online, reference.online) and same_weights(resumed.model, reference.model)
    assert _without_timing(resumed.history) == _without_timing(reference.history)
    assert load_checkpoint(path)["finished"]
    with pytest.raises(UserError, match="tau 0.5 -> 0.7"):
        train_semisup(replace(cfg, tau=0.7), data, prepare_model(cfg, data, None), resume_state=state)


def test_ctrl_c_mid_window_stops_after_the_step_with_a_checkpoint_that_resumes_exactly(
    mnist, draw, tmp_path: Path
) -> None:
    cfg = tiny()
    data = semisup_data(mnist, draw, "cpu")
    reference = train_semisup(cfg, data, prepare_model(cfg, data, None))
    steps_taken = 0

    def ctrl_c_during_step_5(optimizer, args, kwargs) -> None:
        nonlocal steps_taken
        steps_taken += 1
        if steps_taken == 5:  # between evaluations (every 3 steps): the handler only sets a flag
            signal.raise_signal(signal.SIGINT)

    path = tmp_path / "last.pt"
    handler_before = signal.getsignal(signal.SIGINT)  # SIG_IGN when the suite runs as a background job
    hook = register_optimizer_step_post_hook(ctrl_c_during_step_5)
    try:
        with pytest.raises(KeyboardInterrupt):
            train_semisup(cfg, data, prepare_model(cfg, data, None), checkpoint_path=path)
    finally:
        hook.remove()
    assert signal.getsignal(signal.SIGINT) is handler_before, "the handler is put back"
    state = load_checkpoint(path)
    assert state["step"] == 5 and not state["finished"], "the interrupted step finished and was saved"
    resumed = train_semisup(cfg, data, prepare_model(cfg, data, None), resume_state=state)
    assert resumed.steps == 9
    assert same_weights(resumed.online, reference.online) and same_weights(resumed.model, reference.model)
    assert [h["val_acc"] for h in resumed.history] == [h["val_acc"] for h in reference.history]


def test_scored_model_has_the_clean_pools_batchnorm_statistics_and_training_is_unchanged(mnist, draw) -> None:
    cfg = tiny(steps=6, precision="fp32")
    data = semisup_data(mnist, draw, "cpu")
    clean = train_semisup(cfg, data, prepare_model(cfg, data, None))
    as_trained = train_semisup(replace(cfg, bn_recalibration=0), data, prepare_model(cfg, data, None))
    assert same_weights(clean.online, as_trained.online), "the recalibration only touches a copy that is scored"
    scored, ema = clean.model.state_dict(), as_trained.model.state_dict()
    assert all(torch.equal(scored[k], ema[k]) for k, _ in as_trained.model.named_parameters())
    assert not torch.equal(scored["encoder.body.2.running_mean"], ema["encoder.body.2.running_mean"])
    # the first batch norm's statistics: those of the first convolution's outputs on 64 clean pool images
    with torch.no_grad():
        first_conv = as_trained.model.encoder.body[:2](to_unit(data.pool[:64]))
    torch.testing.assert_close(scored["encoder.body.2.running_mean"], first_conv.mean(dim=(0, 2, 3)))
    torch.testing.assert_close(
        scored["encoder.body.2.running_var"], first_conv.var(dim=(0, 2, 3)), rtol=1e-4, atol=1e-6
    )
    assert clean.model.encoder.body[2].momentum == 0.1 and not clean.model.training
    assert [h["val_loss"] for h in clean.history] != [h["val_loss"] for h in as_trained.history]  # scored so too


def test_scoring_the_online_model_mid_run_leaves_it_training(mnist, draw) -> None:
    cfg = tiny(ema=0.0, targets="online", bn_recalibration=0)
    data = semisup_data(mnist, draw, "cpu")
    trainer = SemisupTrainer(cfg, data, prepare_model(cfg, data, None))
    trainer.model.train()
    trainer.train_step()
    trainer.window_metrics(lr=0.03, window_seconds=1.0, window_steps=1)
    assert trainer.model.training, "batch norm would switch to running statistics for the steps that follow"


@pytest.mark.parametrize(
    ("change", "option"),
    [({"tau": 0.0}, "--tau"), ({"tau": 1.5}, "--tau"), ({"lambda_u": -1.0}, "--lambda-u"),
     ({"threshold": "freematch"}, "--threshold"), ({"targets": "ema", "ema": 0.0}, "--targets ema"),
     ({"strong": "flips"}, "--strong"), ({"mu": 0}, "--mu"), ({"lr": float("nan")}, "--lr"),
     ({"init": " "}, "--init"), ({"bar": 1.5}, "--bar"), ({"bn_recalibration": -1}, "--bn-recalibration")],
)  # fmt: skip
def test_bad_settings_are_refused_naming_the_option(change: dict, option: str) -> None:
    with pytest.raises(UserError, match=option):
        replace(SemisupConfig(), **change).validate()


def test_semisup_is_a_probe_that_leaves_the_loaded_encoder_alone(mnist, draw) -> None:
    encoder, loaded = tiny_encoder(seed=3), tiny_encoder(seed=3)
    settings = ProbeSettings(fit=FitConfig(epochs=2, progress=False))
    ctx = ProbeContext(
        encoder=encoder, features=cached_features(encoder, mnist, draw, "cpu"),
        images=labeled_tensors(mnist, draw, "cpu"), settings=settings, generator=torch.Generator().manual_seed(0),
        device=torch.device("cpu"), mnist=mnist, draw=draw,
    )  # fmt: skip
    result = run_probe("semisup", ctx)
    assert same_weights(encoder, loaded) and not result.frozen
    assert result.test_scores.shape == (200, 10) and result.val_scores.shape == (25, 10)
    assert not same_weights(result.classifier.encoder, loaded)  # the copy did train


# ---------------------------------------------------------------- the tracked job


def test_tracked_run_logs_registers_and_resumes_in_the_same_run(
    synthetic_data_dir: Path, tracking_store: str, tmp_path: Path, mnist
) -> None:
    checkpoint = write_checkpoint(tmp_path / "moco.pt", tiny_encoder(seed=2))
    cfg = tiny(init=str(checkpoint), data_dir=str(synthetic_data_dir))
    folder = tmp_path / "ck"
    with pytest.raises(KeyboardInterrupt):
        run_semisup(cfg, checkpoint_dir=folder, run_name="semi", on_eval=killed_at_step_6)
    client = MlflowClient()
    (first,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert first.info.status == "KILLED"

    out = run_semisup(cfg, checkpoint_dir=folder, run_name="semi")  # resume="auto": the same MLflow run
    assert out["run_id"] == first.info.run_id
    run = client.get_run(out["run_id"])
    assert run.info.status == "FINISHED" and run.data.tags["resumed_from_step"] == "3"
    assert run.data.tags["job"] == "semisup" and run.data.tags["init"] == "moco"
    assert report.method_of(run.data.tags) == "MoCo + semi-supervised"
    for key in ("val_acc", "test_acc", "mask_rate", "pseudo_acc", "sup_loss", "unsup_loss", "threshold_mean"):
        assert [m.step for m in client.get_metric_history(out["run_id"], key)] == [3, 6, 9], key
    metrics = run.data.metrics
    assert {f"test_top{k}" for k in range(1, 6)} <= set(metrics) and "test_acc_class7" in metrics
    assert {"wall_seconds", "final_mask_rate", "final_pseudo_acc", "warmup_head_val_top1"} <= set(metrics)
    assert run.data.params["tau"] == "0.5" and run.data.params["encoder_arch"] == "digit"
    artifacts = {a.path for folder_ in ("evaluation", "augmentation", "checkpoints")
                 for a in client.list_artifacts(out["run_id"], folder_)}  # fmt: skip
    assert {"evaluation/test_confusion_matrix.png", "evaluation/learning_curves.png",
            "evaluation/pseudo_label_confusion.png", "augmentation/views.png", "checkpoints/last.pt"} <= artifacts  # fmt: skip
    version = client.get_model_version_by_alias("fewshot-classifier", "champion")
    assert version.run_id == out["run_id"] and out["alias"] == "champion"
    loaded = mlflow.pytorch.load_model(f"models:/fewshot-classifier/{version.version}")
    assert loaded(torch.rand(2, 1, 28, 28)).shape == (2, 10)
    # test top-1 is the 8-view TTA score of the registered classifier, its single view logged beside
    x_test = to_unit(mnist.test_images, "cpu")
    single_view = topk_accuracy(predict_logits(loaded, x_test), mnist.test_labels)[1]
    with_tta = topk_accuracy(final_test_scores(loaded, x_test, cfg)[0], mnist.test_labels)[1]
    assert run.data.params["tta_views"] == "8"
    assert metrics["test_plain_top1"] == pytest.approx(single_view, abs=1e-9)
    assert metrics["test_top1"] == pytest.approx(with_tta, abs=1e-9)


def test_a_run_stopped_after_its_final_checkpoint_only_redoes_the_logging(
    synthetic_data_dir: Path, tracking_store: str, tmp_path: Path
) -> None:
    cfg = tiny(data_dir=str(synthetic_data_dir))
    folder = tmp_path / "ck"
    first = run_semisup(cfg, checkpoint_dir=folder, run_name="tail")
    client = MlflowClient()
    # what a kill between the final checkpoint and the end of logging leaves behind
    client.set_terminated(first["run_id"], status="KILLED")
    again = run_semisup(cfg, checkpoint_dir=folder, run_name="tail")
    assert again["run_id"] == first["run_id"]
    run = client.get_run(again["run_id"])
    assert run.info.status == "FINISHED" and run.data.tags["resumed_from_step"] == "9", "no step trained again"
    assert [m.step for m in client.get_metric_history(again["run_id"], "val_acc")] == [3, 6, 9]


def test_cli_bad_init_is_one_line_and_leaves_no_run(synthetic_data_dir: Path, tracking_store: str) -> None:
    result = run_cli("entrypoints.semisup", "--init", "models:/fewshot-moco-encoder@champion", "--data-dir",
                     str(synthetic_data_dir), env={"MLFLOW_TRACKING_URI": tracking_store})  # fmt: skip
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --init models:/fewshot-moco-encoder@champion")
    client = MlflowClient(tracking_uri=tracking_store)
    assert not client.search_runs([e.experiment_id for e in client.search_experiments()])


def test_hpo_semisup_target_searches_without_the_test_set(
    synthetic_data_dir: Path, tracking_store: str, tmp_path: Path
) -> None:
    from fewshot.hpo import HpoConfig, run_hpo

    checkpoint = write_checkpoint(tmp_path / "moco.pt", tiny_encoder(seed=2))
    cfg = HpoConfig(target="semisup", n_trials=1, folds=2, budget="2", encoder=str(checkpoint), seed=0,
                    data_dir=str(synthetic_data_dir), semisup_overrides={"batch_size": 8, "mu": 2})  # fmt: skip
    result = run_hpo(cfg, echo=lambda text: None)
    assert result.states.get("COMPLETE") == 1 and 0 <= result.best_value <= 1
    assert {"tau", "lambda_u", "threshold", "dist_align"} <= set(result.best_params)
    assert 0 <= result.test_metrics["test_top1"] <= 1  # report-only, after the search
