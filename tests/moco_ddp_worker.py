"""Run under torchrun by tests/test_moco.py: a few DDP MoCo steps on CPU, then dump each rank's state.

python -m torch.distributed.run --nproc_per_node 2 -m tests.moco_ddp_worker DATA_DIR OUT_DIR
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist

from fewshot.data import draw_labels, load_mnist
from fewshot.pretrain import PretrainConfig, init_distributed, pretrain


def main() -> None:
    data_dir, out_dir = sys.argv[1], Path(sys.argv[2])
    rank, world = init_distributed("cpu")
    assert world == 2, world
    mnist = load_mnist(data_dir)
    draw = draw_labels(mnist.train_labels, 0)
    cfg = PretrainConfig(
        width=4, epochs=2, batch_size=16, moco_k=96, device="cpu", max_steps_per_epoch=2, knn_test=False,
        progress=False, checkpoint_minutes=0, warmup_epochs=0,
    )  # fmt: skip
    result = pretrain(cfg, mnist, draw)
    torch.save({k: v.detach().clone() for k, v in result.model.state_dict().items()}, out_dir / f"rank{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
