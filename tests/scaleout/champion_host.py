"""Run by test_champion on a fresh host: load the registered champion encoder over HTTP with
``fewshot.load_encoder``, then a one-step workflow whose step is ``linear_eval`` on it.

    python -m tests.scaleout.champion_host DATA_DIR
"""

from __future__ import annotations

import sys

import torch

import fewshot
from fewshot.linear_eval import LinearEvalConfig, run_linear_eval
from fewshot.train import FitConfig
from fewshot.workflow import Runner, Step, WorkflowConfig, run_workflow

CHAMPION = "models:/fewshot-moco-encoder@champion"


def main() -> None:
    data_dir = sys.argv[1]
    encoder = fewshot.load_encoder(CHAMPION)
    with torch.no_grad():
        features = encoder(torch.zeros(2, 1, 28, 28))
    print(f"loaded {CHAMPION}: features {tuple(features.shape)}", flush=True)
    probe = LinearEvalConfig(encoder=CHAMPION, probe="linear", data_dir=data_dir, embedding="pca",
                             fit=FitConfig(epochs=20, progress=False))  # fmt: skip

    def build(cfg: WorkflowConfig, run: Runner) -> None:
        run(Step("linear_eval-linear-draw0", probe.params(), lambda: run_linear_eval(probe)["run_id"]))

    result = run_workflow(WorkflowConfig(draws=1, results_dir=".", run_name="scaleout-workflow"), build)
    print(f"workflow run {result.run_id}", flush=True)


if __name__ == "__main__":
    main()
