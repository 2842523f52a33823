"""The whole study in one command: baselines, MoCo, probes and a short search over label draws.

Each step is a nested child run of one workflow run. A step whose exact parameters and code
version already finished in this store is reused, so an interrupted workflow picks up where
it stopped.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from fewshot import report, tracking
from fewshot.device import check_precision
from fewshot.errors import UserError

STEP_KEY_TAG = "fewshot.step_key"
STEP_NAME_TAG = "fewshot.step"
CODE_DIRS = ("fewshot", "entrypoints")


def code_version() -> str:
    """A hash of the library's and entry points' source: a step reruns when the code changes."""
    digest = hashlib.sha256()
    for folder in CODE_DIRS:
        for path in sorted((tracking.PROJECT_ROOT / folder).rglob("*.py")):
            digest.update(str(path.relative_to(tracking.PROJECT_ROOT)).encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


@dataclass
class Step:
    name: str
    params: dict[str, Any]
    run: Callable[[], str]  # runs the job (a tracked run); returns its run id

    def key(self, code: str) -> str:
        payload = json.dumps({"step": self.name, "params": self.params, "code": code}, sort_keys=True, default=str)
        return hashlib.sha256(payload.encode()).hexdigest()[:24]


class StepFailed(UserError):
    pass


@dataclass
class WorkflowConfig:
    draws: int = 3
    quick: bool = False
    force: bool = False
    data_dir: str | None = None
    seed: int = 0
    run_name: str | None = None
    results_dir: str | None = None  # default: the project root
    device: str = "auto"
    precision: str = "auto"  # of every step's training and inference (fewshot.device)

    def validate(self) -> None:
        if not 1 <= self.draws <= 20:
            raise UserError(f"--draws {self.draws}: must be between 1 and 20")
        check_precision(self.precision)


@dataclass
class WorkflowResult:
    run_id: str
    steps: dict[str, str] = field(default_factory=dict)  # step name -> run id
    reused: list[str] = field(default_factory=list)
    report_path: Path | None = None
    markdown: str = ""


class Runner:
    """Runs steps under the workflow run, reusing finished ones."""

    def __init__(self, parent: tracking.Tracker, force: bool, echo: Callable[[str], None]) -> None:
        self.parent = parent
        self.force = force
        self.echo = echo
        self.code = code_version()
        self.result = WorkflowResult(run_id=parent.run_id)

    def __call__(self, step: Step) -> str:
        key = step.key(self.code)
        existing = None if self.force else tracking.find_finished_run(STEP_KEY_TAG, key)
        if existing is not None:
            self.echo(f"[reuse] {step.name}: run {existing}")
            self.result.reused.append(step.name)
            self.parent.set_tags({f"{report.STEP_TAG_PREFIX}{step.name}": existing, f"reused.{step.name}": "true"})
        else:
            self.echo(f"[run]   {step.name}")
            started = time.perf_counter()
            try:
                with tracking.step_tags({STEP_KEY_TAG: key, STEP_NAME_TAG: step.name}):
                    existing = step.run()
            except KeyboardInterrupt:
                raise
            except Exception as exc:  # the step's own run is already marked FAILED
                raise StepFailed(f"workflow step {step.name} failed: {' '.join(str(exc).split())[:400]}") from exc
            self.parent.set_tags({f"{report.STEP_TAG_PREFIX}{step.name}": existing})
            self.echo(f"        done in {time.perf_counter() - started:.0f} s (run {existing})")
        self.result.steps[step.name] = existing
        return existing


def run_workflow(
    cfg: WorkflowConfig, build_steps: Callable[[WorkflowConfig, Runner], None], echo: Callable[[str], None] = print
) -> WorkflowResult:
    """Run ``build_steps`` (which calls the runner step by step) under one workflow run, then the report."""
    cfg.validate()
    tracking.configure()
    for run_id in tracking.reap_dead_runs():
        echo(f"marked run {run_id} KILLED: its process is gone (an earlier attempt was interrupted)")
    name = cfg.run_name or ("workflow-quick" if cfg.quick else "workflow")
    with tracking.start_run(run_name=name, tags={report.WORKFLOW_TAG: report.WORKFLOW_JOB}) as parent:
        parent.log_params({**asdict(cfg), "code_version": code_version()})
        runner = Runner(parent, cfg.force, echo)
        build_steps(cfg, runner)
        result = runner.result
        parent.log_metrics({"steps_run": len(result.steps) - len(result.reused), "steps_reused": len(result.reused)})
        built = report.build_report(list(result.steps.values()), title=f"fewshot results ({name}, {cfg.draws} draws)")
        out_dir = Path(cfg.results_dir) if cfg.results_dir else tracking.PROJECT_ROOT
        with tracking.start_run(run_name="report", tags={"job": "report", "source_workflow": parent.run_id}) as rep:
            paths = report.write_report(built, out_dir, rep)
        result.report_path = paths[0]
        result.markdown = built.markdown
    return result
