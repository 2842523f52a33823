from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from fewshot import tracking
from fewshot.baseline import BaselineConfig, run_baseline
from fewshot.train import FitConfig
from fewshot.workflow import Runner, Step, StepFailed, WorkflowConfig, run_workflow


def _steps(data_dir: Path, fail: bool = False):
    def build(cfg: WorkflowConfig, run: Runner) -> None:
        for seed in range(cfg.draws):
            baseline = BaselineConfig(model="mlp2", seed=seed, data_dir=str(data_dir), refit=False,
                                      fit=FitConfig(epochs=2, progress=False))  # fmt: skip
            run(Step(f"baseline-mlp2-draw{seed}", baseline.params(), lambda b=baseline: run_baseline(b)["run_id"]))
        if fail:
            broken = BaselineConfig(model="mlp2", data_dir=str(data_dir / "missing"))
            run(Step("broken-step", broken.params(), lambda: run_baseline(broken)["run_id"]))

    return build


def _statuses(parent_id: str) -> dict[str, str]:
    client = MlflowClient()
    parent = client.get_run(parent_id)
    runs = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent_id}'")
    return {r.info.run_name: r.info.status for r in runs}


def test_finished_steps_are_reused_and_force_reruns(synthetic_data_dir: Path, tracking_store: str,
                                                    tmp_path: Path) -> None:  # fmt: skip
    cfg = WorkflowConfig(draws=2, results_dir=str(tmp_path))
    first = run_workflow(cfg, _steps(synthetic_data_dir), echo=lambda _: None)
    assert first.reused == [] and len(first.steps) == 2
    assert set(_statuses(first.run_id).values()) == {"FINISHED"}
    assert (tmp_path / "results.md").read_text().count("| MLP2 |") == 1

    second = run_workflow(cfg, _steps(synthetic_data_dir), echo=lambda _: None)
    assert sorted(second.reused) == sorted(first.steps) and second.steps == first.steps

    forced = run_workflow(WorkflowConfig(draws=2, force=True, results_dir=str(tmp_path)), _steps(synthetic_data_dir),
                          echo=lambda _: None)  # fmt: skip
    assert forced.reused == [] and set(forced.steps.values()).isdisjoint(first.steps.values())


def test_a_failed_step_fails_the_workflow_by_name(
    synthetic_data_dir: Path, tracking_store: str, tmp_path: Path
) -> None:
    with pytest.raises(StepFailed, match="broken-step"):
        run_workflow(WorkflowConfig(draws=1, results_dir=str(tmp_path)), _steps(synthetic_data_dir, fail=True),
                     echo=lambda _: None)  # fmt: skip
    client = MlflowClient()
    workflow = client.search_runs([e.experiment_id for e in client.search_experiments()], "tags.job = 'workflow'")[0]
    assert workflow.info.status == "FAILED"
    # the finished step stays, and a rerun reuses it
    finished = tracking.find_finished_run("fewshot.step", "baseline-mlp2-draw0")
    assert finished is not None
    again = run_workflow(WorkflowConfig(draws=1, results_dir=str(tmp_path)), _steps(synthetic_data_dir),
                         echo=lambda _: None)  # fmt: skip
    assert again.reused == ["baseline-mlp2-draw0"]
