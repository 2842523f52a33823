"""The MoCo method: queue ring buffer, momentum update, InfoNCE, gradients, split-BN, DDP."""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fewshot.errors import UserError
from fewshot.moco import (
    MoCo,
    SplitBatchNorm2d,
    check_queue,
    convert_split_bn,
    cosine_momentum,
    info_nce,
    warmup_cosine_lr,
)
from fewshot.models import build_encoder
from tests.conftest import run_group

PROJECT_ROOT = Path(__file__).resolve().parents[1]


def tiny_moco(k: int = 10, dim: int = 4, **kw) -> MoCo:
    return MoCo(build_encoder("digit", 4), dim=dim, k=k, generator=torch.Generator().manual_seed(0), **kw)


def test_queue_is_a_registered_dim_by_k_buffer():
    model = tiny_moco(k=10, dim=4)
    buffers = dict(model.named_buffers())
    assert buffers["queue"].shape == (4, 10)
    assert int(buffers["queue_ptr"]) == 0
    assert torch.allclose(model.queue.norm(dim=0), torch.ones(10))
    assert "queue" in model.state_dict() and "queue_ptr" in model.state_dict()


def test_ring_buffer_wraps_around_when_k_is_not_a_multiple_of_the_batch():
    model = tiny_moco(k=10, dim=4)
    batches = [torch.full((4, 4), float(i + 1)) for i in range(3)]  # 4 + 4 + 4 keys into 10 slots
    model.enqueue(batches[0])
    assert int(model.queue_ptr) == 4
    model.enqueue(batches[1])
    assert int(model.queue_ptr) == 8
    model.enqueue(batches[2])  # slots 8, 9 then 0, 1
    assert int(model.queue_ptr) == 2
    column_values = model.queue[0].tolist()
    assert column_values == [3, 3, 1, 1, 2, 2, 2, 2, 3, 3]


def test_enqueue_rejects_more_keys_than_the_queue_holds():
    model = tiny_moco(k=10, dim=4)
    with pytest.raises(ValueError):
        model.enqueue(torch.zeros(11, 4))


def test_check_queue_names_the_option():
    check_queue(256, 256)
    with pytest.raises(UserError, match="--moco-k 100"):
        check_queue(100, 64, world_size=2)
    with pytest.raises(UserError, match="symmetric"):
        check_queue(300, 256, symmetric=True)


def test_momentum_update_is_the_exponential_moving_average():
    model = tiny_moco()
    with torch.no_grad():
        for p in model.query_parameters():
            p.normal_()
    before = [p.clone() for p in model.key_parameters()]
    query = [p.clone() for p in model.query_parameters()]
    model.momentum_update(0.9)
    for k_new, k_old, q in zip(model.key_parameters(), before, query, strict=True):
        assert torch.allclose(k_new, 0.9 * k_old + 0.1 * q, atol=1e-6)
    model.momentum_update(0.0)  # m = 0 copies the query encoder
    for k_new, q in zip(model.key_parameters(), query, strict=True):
        assert torch.equal(k_new, q)


def test_loss_is_log_k_plus_one_when_all_logits_are_equal():
    k, dim = 50, 8
    v = F.normalize(torch.randn(1, dim), dim=1)
    q = v.repeat(6, 1)
    queue = v.T.repeat(1, k)
    loss, logits = info_nce(q, q.clone(), queue, temperature=0.2)
    assert logits.shape == (6, k + 1)
    assert loss.item() == pytest.approx(math.log(k + 1), rel=1e-5)


def test_nearest_positive_is_the_most_similar_queued_key_and_leaves_the_negatives():
    generator = torch.Generator().manual_seed(0)
    queue = F.normalize(torch.randn(8, 20, generator=generator), dim=0)
    chosen = torch.tensor([3, 17, 3])
    k = F.normalize(queue.T[chosen] + 0.05 * torch.randn(3, 8, generator=generator), dim=1)
    q = F.normalize(torch.randn(3, 8, generator=generator), dim=1)
    loss, logits = info_nce(q, k, queue, temperature=0.5, nearest=1)
    assert torch.allclose(logits[:, 0], (q * queue.T[chosen]).sum(1) / 0.5, atol=1e-6)
    assert torch.isinf(logits[torch.arange(3), 1 + chosen]).all()
    others = torch.ones(3, 20, dtype=torch.bool)
    others[torch.arange(3), chosen] = False
    assert torch.allclose(logits[:, 1:][others], (q @ queue / 0.5)[others], atol=1e-6)
    assert torch.isfinite(loss)
    own_loss, own_logits = info_nce(q, k, queue, temperature=0.5)
    assert torch.allclose(own_logits[:, 0], (q * k).sum(1) / 0.5, atol=1e-6) and own_loss != loss


def test_several_nearest_positives_are_each_scored_against_the_other_keys():
    generator = torch.Generator().manual_seed(1)
    queue = F.normalize(torch.randn(8, 20, generator=generator), dim=0)
    k = F.normalize(torch.randn(3, 8, generator=generator), dim=1)
    q = F.normalize(torch.randn(3, 8, generator=generator), dim=1)
    loss, logits = info_nce(q, k, queue, temperature=0.5, nearest=3)
    top = (k @ queue).topk(3, dim=1).indices
    similarity = q @ queue / 0.5
    # written out: for each positive j, -log(e^s_j / (e^s_j + sum of e^s_n over the 17 other keys))
    others = torch.ones(3, 20, dtype=torch.bool).scatter(1, top, False)
    negatives = (similarity.exp() * others).sum(1, keepdim=True)
    positives = similarity.gather(1, top)
    expected = (torch.log(positives.exp() + negatives) - positives).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert torch.allclose(logits[:, 0], similarity.gather(1, top[:, :1]).squeeze(1), atol=1e-6)  # the closest
    assert torch.isinf(logits).sum(1).eq(3).all()  # every positive left the negatives
    one, _ = info_nce(q, k, queue, temperature=0.5, nearest=1)
    assert one.item() != pytest.approx(loss.item())
    with pytest.raises(ValueError, match="no negatives"):
        info_nce(q, k, queue, temperature=0.5, nearest=20)


def test_moco_with_nearest_positives_trains_the_query_encoder():
    model = tiny_moco(k=16, dim=4, bn_splits=2, positive="nearest")
    x = torch.rand(8, 1, 28, 28)
    loss, logits = model(x, x.flip(-1), 0.99, torch.Generator().manual_seed(0))
    loss.backward()
    assert torch.isfinite(loss) and torch.isinf(logits).sum(1).eq(1).all()  # one queued key left the negatives
    assert all(p.grad is not None for p in model.query_parameters())
    with pytest.raises(ValueError, match="positive"):
        tiny_moco(positive="neighbour")
    with pytest.raises(ValueError, match="nearest_k"):
        tiny_moco(k=16, positive="nearest", nearest_k=16)
    several = tiny_moco(k=16, dim=4, bn_splits=2, positive="nearest", nearest_k=4)
    loss, logits = several(x, x.flip(-1), 0.99, torch.Generator().manual_seed(0))
    assert torch.isfinite(loss) and torch.isinf(logits).sum(1).eq(4).all()


def test_key_encoder_gets_no_gradients_and_query_encoder_does():
    model = tiny_moco(k=16, dim=4, bn_splits=2)
    x = torch.rand(8, 1, 28, 28)
    loss, logits = model(x, x.flip(-1), 0.99, torch.Generator().manual_seed(0))
    loss.backward()
    assert all(not p.requires_grad and p.grad is None for p in model.key_parameters())
    assert all(p.grad is not None for p in model.query_parameters())
    assert logits.shape == (8, 17)
    assert int(model.queue_ptr) == 8


def test_symmetric_loss_enqueues_both_views():
    model = tiny_moco(k=32, dim=4, symmetric=True)
    x = torch.rand(8, 1, 28, 28)
    loss, _ = model(x, x, 0.99)
    assert torch.isfinite(loss) and int(model.queue_ptr) == 16


def test_split_batchnorm_normalises_each_sub_batch_and_keeps_the_state_dict():
    torch.manual_seed(0)
    plain = nn.BatchNorm2d(3)
    split = SplitBatchNorm2d(3, num_splits=2)
    x = torch.randn(8, 3, 5, 5) + torch.arange(8).view(8, 1, 1, 1)  # sub-batches with different means
    out = split(x)
    expected = torch.empty_like(x)  # the groups are images 0, 2, 4, 6 and 1, 3, 5, 7 (one view, no copy)
    expected[0::2], expected[1::2] = plain(x[0::2]), nn.BatchNorm2d(3)(x[1::2])
    assert torch.allclose(out, expected, atol=1e-5)
    encoder = convert_split_bn(build_encoder("digit", 4), 2)
    assert any(isinstance(m, SplitBatchNorm2d) for m in encoder.modules())
    build_encoder("digit", 4).load_state_dict(encoder.state_dict())  # same keys, same shapes
    split.eval()
    assert torch.allclose(split(x), F.batch_norm(x, split.running_mean, split.running_var, split.weight, split.bias))


CL = torch.channels_last


def _split_bn_pair(channels: int, splits: int) -> tuple[SplitBatchNorm2d, SplitBatchNorm2d]:
    """Two split-BNs with the same non-trivial state; the second always takes the NCHW path."""
    torch.manual_seed(0)
    fast = SplitBatchNorm2d(channels, num_splits=splits)
    with torch.no_grad():
        fast.weight.uniform_(0.5, 1.5), fast.bias.normal_()
        fast.running_mean.normal_(), fast.running_var.uniform_(0.5, 2.0)
    nchw = SplitBatchNorm2d(channels, num_splits=splits)
    nchw.load_state_dict(fast.state_dict())
    nchw.channels_last_path = False
    return fast, nchw


def _bn_batch(dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """A channels-last batch whose images differ in mean (a wrong grouping shows) and a gradient for it."""
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(16, 8, 5, 6, generator=gen) * 3 + torch.arange(16.0).view(16, 1, 1, 1)
    grad = torch.randn(16, 8, 5, 6, generator=gen)
    return x.to(dtype).contiguous(memory_format=CL), grad.to(dtype).contiguous(memory_format=CL)


def _bn_step(bn: SplitBatchNorm2d, x: torch.Tensor, grad: torch.Tensor) -> dict[str, torch.Tensor]:
    """Two training forwards (the running statistics move twice) and one backward."""
    bn(x)
    x = x.detach().requires_grad_()
    out = bn(x)
    out.backward(grad)
    return {"out": out, "grad_x": x.grad, "grad_w": bn.weight.grad, "grad_b": bn.bias.grad,
            "mean": bn.running_mean, "var": bn.running_var, "tracked": bn.num_batches_tracked}  # fmt: skip


def test_channels_last_split_batchnorm_under_bf16_matches_the_nchw_path_and_keeps_the_layout():
    fast, nchw = _split_bn_pair(8, 4)
    x, grad = _bn_batch(torch.bfloat16)
    got, ref = _bn_step(fast, x, grad), _bn_step(nchw, x, grad)
    assert got["out"].dtype == got["grad_x"].dtype == torch.bfloat16
    assert got["out"].is_contiguous(memory_format=CL) and got["grad_x"].is_contiguous(memory_format=CL)
    assert not ref["out"].is_contiguous(memory_format=CL), "the NCHW path hands back NCHW (what this avoids)"
    for key in ("out", "grad_x"):  # bf16 results: within a bf16 rounding of the NCHW path's
        torch.testing.assert_close(got[key].float(), ref[key].float(), rtol=2**-7, atol=1e-2)
    for key in ("grad_w", "grad_b", "mean", "var"):  # fp32 sums and statistics of the same bf16 inputs
        torch.testing.assert_close(got[key], ref[key], rtol=1e-4, atol=1e-4)
    assert int(got["tracked"]) == int(ref["tracked"]) == 2
    # the groups are still images i, i + 4, i + 8, ... (index modulo the splits)
    expected = F.batch_norm(x[1::4].float(), None, None, fast.weight, fast.bias, True, 0.0, fast.eps)
    torch.testing.assert_close(got["out"][1::4].float(), expected.detach(), rtol=2**-7, atol=1e-2)
    # the same inputs give the same numbers, bit for bit
    again = _bn_step(_split_bn_pair(8, 4)[0], x, grad)
    assert all(torch.equal(v, again[k]) for k, v in got.items())
    fast.eval()  # eval mode: a plain BatchNorm2d on the running statistics
    assert torch.equal(fast(x), F.batch_norm(x, fast.running_mean, fast.running_var, fast.weight, fast.bias))


def test_split_batchnorm_fp32_takes_the_nchw_path_bit_for_bit_and_the_kernel_agrees_in_fp32():
    x, grad = _bn_batch(torch.float32)
    fast, nchw = _split_bn_pair(8, 4)
    got, ref = _bn_step(fast, x, grad), _bn_step(nchw, x, grad)
    assert all(torch.equal(v, ref[k]) for k, v in got.items()), "fp32 never takes the channels-last path"
    # the channels-last computation itself, run on fp32: the NCHW path's numbers up to the summation order
    fast, _ = _split_bn_pair(8, 4)
    kernel = SplitBatchNorm2d._keeps_channels_last
    try:
        SplitBatchNorm2d._keeps_channels_last = lambda self, x: True
        forced = _bn_step(fast, x, grad)
    finally:
        SplitBatchNorm2d._keeps_channels_last = kernel
    assert forced["out"].is_contiguous(memory_format=CL)
    for key, value in forced.items():
        torch.testing.assert_close(value, ref[key], rtol=1e-5, atol=1e-5)


def test_schedules():
    assert cosine_momentum(0.99, 0.0) == pytest.approx(0.99)
    assert cosine_momentum(0.99, 1.0) == pytest.approx(1.0)
    assert 0.99 < cosine_momentum(0.99, 0.5) < 1.0
    assert warmup_cosine_lr(0.1, 0, 100, 10) == pytest.approx(0.01)
    assert warmup_cosine_lr(0.1, 10, 100, 10) == pytest.approx(0.1)
    assert warmup_cosine_lr(0.1, 100, 100, 10) == pytest.approx(0.0, abs=1e-12)


def test_torchrun_two_cpu_processes_hold_identical_key_encoders_and_queues(synthetic_data_dir, tmp_path):
    """Two gloo processes (shuffle-BN, all-gathered keys) after a few steps: same key encoder, same queue."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(PROJECT_ROOT)}
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        "-m", "tests.moco_ddp_worker", str(synthetic_data_dir), str(tmp_path),
    ]  # fmt: skip
    done = run_group(cmd, timeout=300, cwd=PROJECT_ROOT, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    states = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert int(states[0]["queue_ptr"]) == int(states[1]["queue_ptr"]) == (4 * 2 * 16) % 96  # 4 steps x 2 x 16 keys
    for key in states[0]:
        if key.startswith(("backbone_k", "head_k")) or key.startswith("queue"):
            assert torch.equal(states[0][key], states[1][key]), key
    assert not torch.allclose(states[0]["queue"][:, :32], states[0]["queue"][:, 32:64])  # real, different keys
