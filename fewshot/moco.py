"""MoCo v2 in one module: query encoder + projection head, momentum key encoder, a queue of
negatives as a ring buffer, InfoNCE (optionally with NNCLR's nearest-neighbour positives), and the
batch-norm leak fix for one or several processes.

Batch-norm leak. A query and its positive key are two views of the same image; if both
encoders normalise over the same set of images, the batch statistics let the model tell the
current batch's keys from the queue's and "cheat". Several processes (torchrun): the keys'
batch is shuffled across processes before the key encoder and unshuffled after (shuffle-BN,
as the paper). One device: split batch-norm (as the official single-GPU demo), every
BatchNorm2d normalises sub-batches of ``batch / bn_splits`` images separately, and the key
batch is permuted before the key encoder, so a query and its key sit in different
sub-batches. Split-BN is a drop-in subclass of BatchNorm2d with the same parameters and
buffers, so the trained backbone's state_dict loads into a plain ``build_encoder`` module.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from fewshot.errors import UserError

# ---------------------------------------------------------------- split batch-norm


class SplitBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d that, in training, normalises ``num_splits`` equal sub-batches separately.

    Split i holds the images whose index is i modulo S; the running statistics are the mean
    over splits. In eval mode it is a plain BatchNorm2d. Two ways to the same numbers:

    - NCHW (the fp32 CPU path, unchanged): one ``batch_norm`` call over a (N/S, C*S, H, W) view.
    - channels-last bf16 on the CPU: that view would cost an NHWC -> NCHW copy, and the NCHW
      output would leave the ReLU, max-pool (about 8x slower in NCHW bf16) and next convolution
      on the slow layout; ``_SplitBatchNormChannelsLast`` keeps channels-last instead.
    """

    # False sends every input down the NCHW path (benchmarks and tests compare the two)
    channels_last_path: bool = True

    def __init__(self, num_features: int, num_splits: int, **kwargs) -> None:
        super().__init__(num_features, **kwargs)
        self.num_splits = num_splits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.num_splits
        if not self.training or s == 1:
            return super().forward(x)
        n, c, h, w = x.shape
        if n % s:
            raise ValueError(f"batch of {n} does not split into {s} batch-norm groups")
        self.num_batches_tracked += 1
        if self._keeps_channels_last(x):
            return _SplitBatchNormChannelsLast.apply(
                x, self.weight, self.bias, self.running_mean, self.running_var, s, self.momentum, self.eps
            )
        mean_split = self.running_mean.repeat(s)
        var_split = self.running_var.repeat(s)
        out = F.batch_norm(
            x.reshape(n // s, c * s, h, w), mean_split, var_split,
            self.weight.repeat(s), self.bias.repeat(s), True, self.momentum, self.eps,
        ).reshape(n, c, h, w)  # fmt: skip
        with torch.no_grad():
            self.running_mean.copy_(mean_split.view(s, c).mean(0))
            self.running_var.copy_(var_split.view(s, c).mean(0))
        return out

    def _keeps_channels_last(self, x: torch.Tensor) -> bool:
        """bf16, channels-last (and not also NCHW, as a 1x1 map is), on the CPU, with running
        statistics: fp32 never comes here, so the fp32 path stays bit for bit what it was."""
        return (
            self.channels_last_path and x.dtype == torch.bfloat16 and x.device.type == "cpu"
            and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
            and self.track_running_stats and self.momentum is not None
        )  # fmt: skip


def _group(x5: torch.Tensor, g: int, out: torch.Tensor) -> torch.Tensor:
    """Split ``g`` of ``x5`` (N/S, S, C, H, W; channels-last strides) copied into ``out`` (N/S, H, W, C),
    returned as a dense channels-last (N/S, C, H, W): the fast batch-norm kernels need dense input
    (on the strided split directly, forward is ~5x and backward ~14x slower)."""
    out.copy_(x5[:, g].permute(0, 2, 3, 1))
    return out.permute(0, 3, 1, 2)


class _SplitBatchNormChannelsLast(torch.autograd.Function):
    """Split batch-norm on a channels-last (N, C, H, W) batch, same splits (index modulo S) and
    statistics as the NCHW path: per split, one copy in, the native kernel, one copy out, all
    in channels-last; the (N/S, S, C, H, W) view that selects a split is free on that layout."""

    @staticmethod
    def forward(
        ctx: Any, x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
        running_mean: torch.Tensor, running_var: torch.Tensor, s: int, momentum: float, eps: float,
    ) -> torch.Tensor:  # fmt: skip
        n, c, h, w = x.shape
        x5 = x.view(n // s, s, c, h, w)
        y = torch.empty_like(x, memory_format=torch.channels_last)
        y5 = y.view(n // s, s, c, h, w)
        dense = torch.empty((s, n // s, h, w, c), dtype=x.dtype, device=x.device)  # split-major copy of x
        # each split updates its own copy of the running statistics, averaged after (as the NCHW path)
        means, variances = running_mean.repeat(s, 1), running_var.repeat(s, 1)
        saved = []
        for g in range(s):
            out, mean, invstd = torch.native_batch_norm(
                _group(x5, g, dense[g]), weight, bias, means[g], variances[g], True, momentum, eps
            )
            y5[:, g].copy_(out)
            saved += [mean, invstd]
        running_mean.copy_(means.mean(0))
        running_var.copy_(variances.mean(0))
        ctx.save_for_backward(dense, weight, *saved)
        ctx.splits, ctx.eps = s, eps
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad_y: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        dense, weight, *saved = ctx.saved_tensors
        s = ctx.splits
        n, c, h, w = grad_y.shape
        g5 = grad_y.contiguous(memory_format=torch.channels_last).view(n // s, s, c, h, w)
        grad_x = torch.empty_like(grad_y, memory_format=torch.channels_last)
        gx5 = grad_x.view(n // s, s, c, h, w)
        grad_split = torch.empty((n // s, h, w, c), dtype=grad_y.dtype, device=grad_y.device)
        mask = list(ctx.needs_input_grad[:3])
        grad_w = grad_b = None
        for g in range(s):
            dx, dw, db = torch.ops.aten.native_batch_norm_backward(
                _group(g5, g, grad_split), dense[g].permute(0, 3, 1, 2), weight, None, None,
                saved[2 * g], saved[2 * g + 1], True, ctx.eps, mask,
            )  # fmt: skip
            if mask[0]:
                gx5[:, g].copy_(dx)
            if mask[1]:
                grad_w = dw if grad_w is None else grad_w + dw
            if mask[2]:
                grad_b = db if grad_b is None else grad_b + db
        return grad_x if mask[0] else None, grad_w, grad_b, None, None, None, None, None


def convert_split_bn(module: nn.Module, num_splits: int) -> nn.Module:
    """Replace every BatchNorm2d in ``module`` (in place) by a SplitBatchNorm2d with the same state."""
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d) and not isinstance(child, SplitBatchNorm2d):
            split = SplitBatchNorm2d(
                child.num_features, num_splits, eps=child.eps, momentum=child.momentum, affine=child.affine
            )
            split.load_state_dict(child.state_dict())
            split.to(child.weight.device if child.weight is not None else child.running_mean.device)
            setattr(module, name, split)
        else:
            convert_split_bn(child, num_splits)
    return module


# ---------------------------------------------------------------- distributed helpers


def distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


@torch.no_grad()
def concat_all_gather(x: torch.Tensor) -> torch.Tensor:
    """Every process's ``x`` stacked along dim 0, in rank order (no gradient)."""
    if not distributed():
        return x
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)


@torch.no_grad()
def average_buffers(module: nn.Module) -> None:
    """Average floating-point buffers (batch-norm running statistics) over processes."""
    if not distributed():
        return
    world = dist.get_world_size()
    for name, buf in module.named_buffers():
        if buf.is_floating_point() and not name.endswith("queue"):
            dist.all_reduce(buf)
            buf.div_(world)


# ---------------------------------------------------------------- the method


def projection_head(feature_dim: int, dim: int, mlp: bool) -> nn.Module:
    """MoCo v2's 2-layer MLP (feature -> feature -> dim), or MoCo v1's single linear layer."""
    if mlp:
        return nn.Sequential(nn.Linear(feature_dim, feature_dim), nn.ReLU(inplace=True), nn.Linear(feature_dim, dim))
    return nn.Linear(feature_dim, dim)


# what a query is pulled towards: its own key (MoCo), or the queued key most similar to it (NNCLR)
POSITIVES = ("key", "nearest")


def info_nce(
    q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor, temperature: float, nearest: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """InfoNCE of L2-normalised queries ``q`` (N, D) against positives ``k`` (N, D) and the
    negatives in ``queue`` (D, K). Returns (loss, logits); the (first) positive is column 0.

    ``nearest`` > 0: the positives are the ``nearest`` queued keys most similar to ``k`` instead of
    ``k`` itself (NNCLR, Dwibedi et al., 2021, for one), and they leave the negatives. Other images
    the key encoder already sees as alike, mostly of the same class, are pulled close: classes
    tighten beyond what two views of one image teach. With several, each positive is scored
    against the negatives alone and the losses are averaged (a multi-positive InfoNCE)."""
    # fp32 island: logits / T need more than bf16's 3 significant digits (at T = 0.2 a rounding of
    # the similarity by 0.004 moves a logit by 0.02), and the loss is a sum of their exponentials
    with torch.autocast(q.device.type, enabled=False):
        q, k, bank = q.float(), k.float(), queue.clone().detach().float()
        if nearest > 1:
            return _multi_positive_nce(q, k, bank, temperature, nearest)
        if nearest:
            closest = (k @ bank).argmax(dim=1, keepdim=True)
            k = bank.T[closest.squeeze(1)]
        positive = (q * k).sum(dim=1, keepdim=True)
        negative = q @ bank
        if nearest:
            negative = negative.scatter(1, closest, -math.inf)
        logits = torch.cat([positive, negative], dim=1) / temperature
    labels = torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device)
    return F.cross_entropy(logits, labels), logits


def _multi_positive_nce(
    q: torch.Tensor, k: torch.Tensor, bank: torch.Tensor, temperature: float, nearest: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 ``q`` (N, D), ``k`` (N, D), ``bank`` (D, K): the ``nearest`` keys of ``bank`` closest to
    ``k`` are the positives; each is scored against the remaining keys, -log(e^p / (e^p + sum e^n)),
    averaged over positives and queries. Logits: the closest positive, then the negatives."""
    if nearest >= bank.shape[1]:
        raise ValueError(f"{nearest} nearest positives leave no negatives in a queue of {bank.shape[1]}")
    similarity = q @ bank
    top = (k @ bank).topk(nearest, dim=1).indices
    positive = similarity.gather(1, top) / temperature
    negative = similarity.scatter(1, top, -math.inf) / temperature
    loss = (torch.logaddexp(positive, torch.logsumexp(negative, dim=1, keepdim=True)) - positive).mean()
    return loss, torch.cat([positive[:, :1], negative], dim=1)


def check_queue(k: int, batch_size: int, world_size: int = 1, symmetric: bool = False) -> None:
    """The queue must hold at least one step's keys (from every process)."""
    per_step = batch_size * world_size * (2 if symmetric else 1)
    if k < per_step:
        raise UserError(
            f"--moco-k {k}: the queue must hold at least one step's keys ({per_step} = batch size "
            f"{batch_size} x {world_size} process(es){' x 2 (symmetric)' if symmetric else ''}); raise it"
        )


class MoCo(nn.Module):
    """Query encoder (backbone + head), momentum key encoder, queue (dim x K) and pointer.

    ``backbone`` is any module with ``feature_dim``; a copy becomes the key encoder, which
    gets no gradients and follows the query encoder by ``momentum_update``. A K that is not
    a multiple of the batch is fine: the ring buffer wraps around. ``positive="nearest"`` takes
    the ``nearest_k`` queued keys closest to a query's key as its positives (``info_nce``).
    """

    def __init__(
        self,
        backbone: nn.Module,
        dim: int = 128,
        k: int = 4096,
        temperature: float = 0.1,
        mlp: bool = True,
        symmetric: bool = False,
        bn_splits: int = 1,
        generator: torch.Generator | None = None,
        positive: str = "key",
        nearest_k: int = 1,
    ) -> None:
        super().__init__()
        if positive not in POSITIVES:
            raise ValueError(f"positive must be one of {', '.join(POSITIVES)}; got {positive!r}")
        if not 1 <= nearest_k < k:
            raise ValueError(f"nearest_k must be at least 1 and below the queue size {k}; got {nearest_k}")
        self.k = k
        self.temperature = temperature
        self.symmetric = symmetric
        self.nearest = nearest_k if positive == "nearest" else 0  # how many queued keys are positives
        self.bn_splits = bn_splits
        if bn_splits > 1:
            convert_split_bn(backbone, bn_splits)
        self.backbone_q = backbone
        self.head_q = projection_head(backbone.feature_dim, dim, mlp)
        self.backbone_k = copy.deepcopy(self.backbone_q)
        self.head_k = copy.deepcopy(self.head_q)
        for p in self.key_parameters():
            p.requires_grad_(False)
        queue = torch.randn(dim, k, generator=generator)
        self.register_buffer("queue", F.normalize(queue, dim=0))
        self.register_buffer("queue_ptr", torch.zeros(1, dtype=torch.long))

    def key_parameters(self) -> list[nn.Parameter]:
        return list(self.backbone_k.parameters()) + list(self.head_k.parameters())

    def query_parameters(self) -> list[nn.Parameter]:
        return list(self.backbone_q.parameters()) + list(self.head_q.parameters())

    @torch.no_grad()
    def momentum_update(self, m: float) -> None:
        """key <- m * key + (1 - m) * query, parameter by parameter.

        fp32 island: autocast never lowers the parameters themselves, so this runs in fp32 under
        bf16 too; in bf16 (8-bit mantissa) a step of (1 - m) = 1% of the query-key gap would mostly round away."""
        torch._foreach_mul_(self.key_parameters(), m)
        torch._foreach_add_(self.key_parameters(), self.query_parameters(), alpha=1 - m)

    @torch.no_grad()
    def enqueue(self, keys: torch.Tensor) -> None:
        """Write ``keys`` (N, dim) at the pointer, wrapping around the end, and advance it.
        The queue is an fp32 buffer whatever the precision (keys are cast to it)."""
        n = keys.shape[0]
        if n > self.k:
            raise ValueError(f"{n} keys do not fit a queue of {self.k}")
        ptr = int(self.queue_ptr)
        first = min(n, self.k - ptr)
        self.queue[:, ptr : ptr + first] = keys[:first].T.to(self.queue.dtype)
        if first < n:
            self.queue[:, : n - first] = keys[first:].T.to(self.queue.dtype)
        self.queue_ptr[0] = (ptr + n) % self.k

    def query(self, x: torch.Tensor) -> torch.Tensor:
        # fp32 island: normalised in fp32 (a no-op cast under fp32), as the queue and InfoNCE need
        return F.normalize(self.head_q(self.backbone_q(x)).float(), dim=1)

    @torch.no_grad()
    def key(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Keys of ``x`` with the batch-norm leak blocked: shuffled across processes
        (shuffle-BN) or, on one device, permuted so that split-BN groups differ from the queries'."""
        if distributed():
            x, unshuffle = _shuffle_across_processes(x, generator)
            k = F.normalize(self.head_k(self.backbone_k(x)).float(), dim=1)
            return _unshuffle_across_processes(k, unshuffle)
        if self.bn_splits > 1:
            perm = torch.randperm(x.shape[0], generator=generator, device=generator.device if generator else None)
            perm = perm.to(x.device)
            k = F.normalize(self.head_k(self.backbone_k(x[perm])).float(), dim=1)
            return k[torch.argsort(perm)]
        # fp32 island: keys enter the queue, where they serve as negatives for K / batch steps;
        # normalised in fp32 so that a bf16 rounding is not stored and reused that long
        return F.normalize(self.head_k(self.backbone_k(x)).float(), dim=1)

    def forward(
        self, x1: torch.Tensor, x2: torch.Tensor, m: float, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One MoCo step's forward: momentum update, keys, InfoNCE, enqueue.

        Returns (loss, logits of the first query); the positive is logits' column 0.
        """
        self.momentum_update(m)
        if self.symmetric:
            q1, q2 = self.query(x1), self.query(x2)
            k1, k2 = self.key(x1, generator), self.key(x2, generator)
            loss12, logits = info_nce(q1, k2, self.queue, self.temperature, self.nearest)
            loss21, _ = info_nce(q2, k1, self.queue, self.temperature, self.nearest)
            loss = (loss12 + loss21) / 2
            keys = torch.cat([k1, k2])
        else:
            q = self.query(x1)
            k = self.key(x2, generator)
            loss, logits = info_nce(q, k, self.queue, self.temperature, self.nearest)
            keys = k
        self.enqueue(concat_all_gather(keys.float()))
        return loss, logits


def _shuffle_across_processes(x: torch.Tensor, generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Shuffle-BN: gather every process's batch, apply one permutation drawn on rank 0, and
    keep this process's share. Returns (local shuffled batch, unshuffle indices)."""
    local = x.shape[0]
    gathered = concat_all_gather(x)
    total = gathered.shape[0]
    perm = torch.randperm(total, generator=generator, device=generator.device if generator else None).to(x.device)
    dist.broadcast(perm, src=0)
    rank = dist.get_rank()
    unshuffle = torch.argsort(perm)
    return gathered[perm.view(-1, local)[rank]], unshuffle.view(-1, local)[rank]


def _unshuffle_across_processes(k: torch.Tensor, unshuffle: torch.Tensor) -> torch.Tensor:
    return concat_all_gather(k)[unshuffle]


# ---------------------------------------------------------------- schedules


def cosine_momentum(base: float, progress: float) -> float:
    """BYOL's schedule: m rises from ``base`` at the start to 1 at the end (progress in [0, 1])."""
    return 1 - (1 - base) * (math.cos(math.pi * min(max(progress, 0.0), 1.0)) + 1) / 2


def warmup_cosine_lr(base: float, step: int, total: int, warmup: int) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine decay to 0 at ``total``."""
    if warmup > 0 and step < warmup:
        return base * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return base * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
