"""Run under torchrun by tests/test_hpo_distributed.py: a tiny ``--target moco`` study whose
trials train on both processes; each rank writes what it did.

python -m torch.distributed.run --nproc_per_node 2 -m tests.hpo_ddp_worker DATA_DIR STORAGE OUT_DIR
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch.distributed as dist

from fewshot.hpo import HpoConfig, run_hpo


def main() -> None:
    data_dir, storage, out_dir = sys.argv[1], sys.argv[2], Path(sys.argv[3])
    tiny = {"batch_size": 32, "max_steps_per_epoch": 2}
    cfg = HpoConfig(target="moco", n_trials=2, budget="2", data_dir=data_dir, moco_overrides=tiny, pruner="median",
                    study_name="ddp", storage=storage, device="cpu")  # fmt: skip
    result = run_hpo(cfg, echo=lambda *_: None)
    rank, world = dist.get_rank(), dist.get_world_size()
    report = {"world": world, "follower": result.follower, "trials_run": result.trials_run, "states": result.states,
              "parent_run_id": result.parent_run_id}  # fmt: skip
    (out_dir / f"rank{rank}.json").write_text(json.dumps(report))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
