"""The steps of the `main` workflow and their two profiles (CPU defaults and --quick)."""

from __future__ import annotations

from dataclasses import dataclass, replace

from fewshot import tracking
from fewshot.baseline import BaselineConfig, run_baseline
from fewshot.hpo import HpoConfig, run_hpo
from fewshot.linear_eval import LinearEvalConfig, run_linear_eval
from fewshot.names import MOCO_ENCODER_MODEL
from fewshot.pretrain import PretrainConfig
from fewshot.pretrain.job import run_pretrain
from fewshot.semisup import SemisupConfig
from fewshot.semisup.job import run_semisup
from fewshot.train import FitConfig
from fewshot.workflow import Runner, Step, WorkflowConfig

BASELINE_MODELS = ("mlp1", "mlp2", "cnn")
PROBES = ("linear", "knn", "finetune")


@dataclass(frozen=True)
class Profile:
    baseline_epochs: int
    moco: PretrainConfig
    linear_epochs: int
    linear_augment: str  # the linear probe's `linear_eval --augment` (kNN and fine-tuning keep their own)
    finetune_epochs: int
    hpo_trials: int
    hpo_budget: str
    hpo_folds: int
    semisup: SemisupConfig  # MoCo + semi-supervised, one run per draw


DEFAULT = Profile(
    baseline_epochs=1000,
    moco=PretrainConfig(),
    # the head trained on the frozen encoder's features of freshly augmented images (the strong digit
    # view): +0.5 points over cached features of the plain images, at 300 epochs as good as 1000
    # (docs/benchmarks.md, the linear head under augmentation)
    linear_epochs=300,
    linear_augment="strong",
    finetune_epochs=150,
    hpo_trials=10,
    hpo_budget="",
    hpo_folds=5,
    # the time bf16 saved spent here, chosen by budget (not by accuracy): 2000 steps of 32 labeled + 224
    # unlabeled images on the width-32 MoCo encoder (about 4.5 minutes a draw on 2 cores) is what fits
    # the 30-minute budget beside the other steps; the `semisup` entry point's default is 5000 steps
    semisup=SemisupConfig(steps=2000, eval_every=500),
)
QUICK = Profile(
    baseline_epochs=15,
    moco=PretrainConfig(
        epochs=1, width=8, batch_size=64, bn_splits=4, moco_k=256, max_steps_per_epoch=8, knn_test=False
    ),
    linear_epochs=30,
    linear_augment="strong",
    finetune_epochs=3,
    hpo_trials=3,
    hpo_budget="20",
    hpo_folds=3,
    semisup=SemisupConfig(steps=4, eval_every=2, batch_size=8, mu=2, eval_test=False),
)


def build_steps(cfg: WorkflowConfig, run: Runner) -> None:
    """Baselines and probes on every draw; MoCo pretraining and the search once (seed ``cfg.seed``)."""
    profile = QUICK if cfg.quick else DEFAULT
    draws = range(cfg.seed, cfg.seed + cfg.draws)
    progress = not cfg.quick

    for seed in draws:
        for model in BASELINE_MODELS:
            baseline = BaselineConfig(
                model=model, seed=seed, data_dir=cfg.data_dir, device=cfg.device, precision=cfg.precision,
                fit=FitConfig(epochs=profile.baseline_epochs, progress=progress),
            )  # fmt: skip

            def run_one(baseline: BaselineConfig = baseline) -> str:
                return run_baseline(baseline)["run_id"]

            run(Step(f"baseline-{model}-draw{seed}", baseline.params(), run_one))

    moco = replace(profile.moco, seed=cfg.seed, data_dir=cfg.data_dir, device=cfg.device, precision=cfg.precision,
                   progress=progress)  # fmt: skip
    moco_params = moco.params()
    moco_step = Step("moco_pretrain", moco_params, lambda: "")
    checkpoint_dir = tracking.checkpoint_root() / f"workflow-{moco_step.key(run.code)}"
    registered: dict = {}

    def pretrain_and_register() -> str:
        out = run_pretrain(moco, checkpoint_dir=checkpoint_dir, resume="auto", register=True)
        return out["run_id"]

    moco_run = run(Step("moco_pretrain", moco_params, pretrain_and_register))
    registered["version"] = tracking.run_summary(moco_run)["tags"]["registered_version"]
    encoder_uri = f"models:/{MOCO_ENCODER_MODEL}/{registered['version']}"

    for seed in draws:
        for probe in PROBES:
            epochs = profile.finetune_epochs if probe == "finetune" else profile.linear_epochs
            augment = profile.linear_augment if probe == "linear" else "auto"
            probe_cfg = LinearEvalConfig(
                encoder=encoder_uri, probe=probe, augment=augment, seed=seed, data_dir=cfg.data_dir,
                device=cfg.device, precision=cfg.precision, fit=FitConfig(epochs=epochs, progress=progress),
            )  # fmt: skip

            def run_probe(probe_cfg: LinearEvalConfig = probe_cfg) -> str:
                return run_linear_eval(probe_cfg)["run_id"]

            run(Step(f"linear_eval-{probe}-draw{seed}", probe_cfg.params(), run_probe))

    for seed in draws:
        semi = replace(profile.semisup, init=encoder_uri, seed=seed, data_dir=cfg.data_dir, device=cfg.device,
                       precision=cfg.precision, progress=progress)  # fmt: skip
        semi_params = semi.params()
        semi_name = f"semisup-moco-draw{seed}"
        semi_key = Step(semi_name, semi_params, lambda: "").key(run.code)
        semi_dir = tracking.checkpoint_root() / f"workflow-{semi_key}"

        def semisup(semi: SemisupConfig = semi, semi_dir=semi_dir) -> str:
            return run_semisup(semi, checkpoint_dir=semi_dir, resume="auto", register=True)["run_id"]

        run(Step(semi_name, semi_params, semisup))

    hpo = HpoConfig(
        target="linear", n_trials=profile.hpo_trials, encoder=encoder_uri, seed=cfg.seed, data_dir=cfg.data_dir,
        folds=profile.hpo_folds, budget=profile.hpo_budget, device=cfg.device, precision=cfg.precision,
    )  # fmt: skip
    hpo_params = hpo.params()
    hpo_step = Step("hpo-linear", hpo_params, lambda: "")
    hpo.study_name = f"workflow-linear-{hpo_step.key(run.code)}"

    def search() -> str:
        return run_hpo(hpo).parent_run_id

    run(Step("hpo-linear", hpo_params, search))
