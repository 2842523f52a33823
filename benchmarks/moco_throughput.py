"""Images/second of MoCo pretraining, three ways, measured in one run on one machine.

- ours: the default encoder, two views made by batched tensor ops on the training device
  (fewshot.augment), the real training loop (fewshot.pretrain) with its defaults;
- (a) the report's setting: torchvision ResNet-50 on digits upsampled to 224x224 RGB, views
  from a per-image PIL pipeline (resize, resized crop, horizontal flip, colour jitter) through
  a DataLoader; a few steps suffice to time it;
- (b) the same default encoder and MoCo step as ours, views from a per-image PIL torchvision
  pipeline (resized crop, affine, jitter, blur) through a DataLoader.
Also the share of step time spent making the views (ours), and on CUDA a check that the
step runs under bf16 autocast with channels-last weights.

    python benchmarks/moco_throughput.py                 # this machine, defaults
    python benchmarks/moco_throughput.py --steps 3 --report-steps 1 --report-batch 4   # smoke test
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
import torchvision
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms as T

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fewshot import augment as aug  # noqa: E402
from fewshot.data import draw_labels, load_mnist, to_unit  # noqa: E402
from fewshot.device import configure_threads  # noqa: E402
from fewshot.moco import MoCo  # noqa: E402
from fewshot.models import build_encoder  # noqa: E402
from fewshot.pretrain import PretrainConfig, pretrain  # noqa: E402


class PILTwoViews(Dataset):
    """Per-image PIL pipeline: each item is two independently transformed views."""

    def __init__(self, images: torch.Tensor, transform: T.Compose) -> None:
        self.images = images.numpy()
        self.transform = transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        from PIL import Image

        img = Image.fromarray(self.images[i], mode="L")
        return self.transform(img), self.transform(img)


def pil_digit_views(spec: aug.ViewSpec) -> T.Compose:
    """The torchvision equivalent of our default views, one image at a time."""
    return T.Compose([
        T.RandomResizedCrop(28, scale=(spec.crop_scale[0], min(1.0, spec.crop_scale[1])), ratio=(1.0, 1.0)),
        T.RandomAffine(spec.rotation, shear=spec.shear),
        T.ElasticTransform(alpha=spec.elastic_alpha, sigma=spec.elastic_sigma) if spec.elastic_alpha else T.Lambda(lambda x: x),
        T.ColorJitter(brightness=spec.jitter, contrast=spec.jitter),
        T.RandomApply([T.GaussianBlur(3, sigma=(0.1, spec.blur_sigma))], p=spec.blur_probability),
        T.ToTensor(),
    ])  # fmt: skip


def report_views() -> T.Compose:
    """The report's MoCo views: 224x224 RGB upsampled digits, flips and colour jitter."""
    return T.Compose([
        T.Grayscale(3), T.Resize(224), T.RandomResizedCrop(224, scale=(0.2, 1.0)), T.RandomHorizontalFlip(),
        T.ColorJitter(0.4, 0.4, 0.4, 0.1), T.ToTensor(),
    ])  # fmt: skip


class ResNet50Backbone(torch.nn.Module):
    """torchvision ResNet-50 as the report used it: 3x224x224 input, standard stem."""

    def __init__(self) -> None:
        super().__init__()
        net = torchvision.models.resnet50(weights=None)
        self.feature_dim = net.fc.in_features
        net.fc = torch.nn.Identity()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def time_loader_steps(model: MoCo, loader: DataLoader, steps: int, warmup: int, device: torch.device) -> float:
    """Images/second of MoCo steps fed by ``loader`` (loading included, as in training)."""
    cuda = device.type == "cuda"
    fmt = torch.channels_last if cuda else torch.contiguous_format
    optimizer = torch.optim.SGD(model.query_parameters(), lr=0.01, momentum=0.9)
    generator = torch.Generator(device=device).manual_seed(0)
    model.train()
    iterator = iter(loader)
    images, t0 = 0, None
    for i in range(warmup + steps):
        if i == warmup:
            if cuda:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
        x1, x2 = next(iterator)
        x1 = x1.to(device, non_blocking=True).contiguous(memory_format=fmt)
        x2 = x2.to(device, non_blocking=True).contiguous(memory_format=fmt)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
            loss, _ = model(x1, x2, 0.99, generator)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if i >= warmup:
            images += x1.shape[0]
    if cuda:
        torch.cuda.synchronize()
    return images / (time.perf_counter() - t0)


def augment_seconds_per_batch(x: torch.Tensor, spec: aug.ViewSpec, device: torch.device, repeats: int = 20) -> float:
    generator = torch.Generator(device=device).manual_seed(0)
    aug.two_views(x, spec, generator)
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(repeats):
        aug.two_views(x, spec, generator)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / repeats


def gpu_path_check(cfg: PretrainConfig, device: torch.device) -> dict[str, object]:
    """On CUDA: does the step really run in bf16 with channels-last weights?"""
    model = MoCo(build_encoder(cfg.arch, cfg.width), k=cfg.moco_k, bn_splits=cfg.bn_splits).to(device)
    model = model.to(memory_format=torch.channels_last)
    conv = next(m for m in model.backbone_q.modules() if isinstance(m, torch.nn.Conv2d) and m.in_channels > 1)
    seen: dict[str, object] = {}
    conv.register_forward_hook(lambda mod, inp, out: seen.update(conv_output_dtype=str(out.dtype)))
    x = torch.rand(cfg.batch_size, 1, 28, 28, device=device).contiguous(memory_format=torch.channels_last)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss, _ = model(x, x, 0.99, torch.Generator(device=device).manual_seed(0))
    seen["weights_channels_last"] = conv.weight.is_contiguous(memory_format=torch.channels_last)
    seen["loss_dtype"] = str(loss.dtype)
    return seen


def main() -> None:
    defaults = PretrainConfig()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=30, help="timed steps for ours and (b)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--report-steps", type=int, default=3, help="timed steps of the report's setting (a)")
    parser.add_argument("--report-batch", type=int, default=32)
    parser.add_argument(
        "--workers", type=int, default=min(os.cpu_count() or 1, 16), help="DataLoader workers for (a), (b)"
    )
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size)
    parser.add_argument("--arch", default=defaults.arch)
    parser.add_argument("--width", type=int, default=defaults.width)
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", default="outputs/moco_throughput.json")
    args = parser.parse_args()

    configure_threads()
    device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    cfg = PretrainConfig(
        arch=args.arch, width=args.width, batch_size=args.batch_size, epochs=1, knn_test=False, progress=False,
        max_steps_per_epoch=args.warmup + args.steps, device=str(device), checkpoint_minutes=0,
    )  # fmt: skip
    mnist = load_mnist(args.data_dir)
    draw = draw_labels(mnist.train_labels, 0)
    spec = cfg.view_spec()
    results: dict[str, object] = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                                  "threads": torch.get_num_threads(), "workers": args.workers,
                                  "batch_size": cfg.batch_size, "encoder": f"{cfg.arch}-w{cfg.width}"}  # fmt: skip

    # ours: the real loop (its first steps include warm-up; the loop's own clock)
    pretrain(cfg, mnist, draw)  # warm-up run (allocator, kernels)
    result = pretrain(cfg, mnist, draw)
    ours = result.history[-1]["images_per_s"]
    x = to_unit(mnist.train_images[: cfg.batch_size], device)
    aug_s = augment_seconds_per_batch(x, spec, device)
    results["ours_images_per_s"] = ours
    results["augment_share"] = aug_s / (cfg.batch_size / ours)
    if "augment_share" in result.history[-1]:
        results["augment_share_in_loop"] = result.history[-1]["augment_share"]
    print(
        f"ours: {ours:.0f} img/s, views {aug_s * 1000:.1f} ms per batch ({results['augment_share']:.1%} of a step)",
        flush=True,
    )

    # (b) same encoder and step, per-image PIL views through a DataLoader
    pool = mnist.train_images[draw.unlabeled_idx]
    loader_kw = {"num_workers": args.workers, "pin_memory": device.type == "cuda", "drop_last": True, "shuffle": True,
                 "persistent_workers": args.workers > 0}  # fmt: skip
    if args.workers > 0:
        loader_kw["prefetch_factor"] = 4
    model = MoCo(build_encoder(cfg.arch, cfg.width), k=cfg.moco_k, temperature=cfg.moco_t, bn_splits=cfg.bn_splits).to(
        device
    )
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    loader = DataLoader(PILTwoViews(pool, pil_digit_views(spec)), batch_size=cfg.batch_size, **loader_kw)
    pil = time_loader_steps(model, loader, args.steps, args.warmup, device)
    results["pil_dataloader_images_per_s"] = pil
    print(f"(b) same encoder, PIL DataLoader ({args.workers} workers): {pil:.0f} img/s", flush=True)

    # (a) the report's setting
    report = MoCo(ResNet50Backbone(), k=4096, temperature=0.07, mlp=False).to(device)
    if device.type == "cuda":
        report = report.to(memory_format=torch.channels_last)
    loader = DataLoader(PILTwoViews(pool, report_views()), batch_size=args.report_batch, **loader_kw)
    slow = time_loader_steps(report, loader, args.report_steps, 1, device)
    results["report_images_per_s"] = slow
    print(f"(a) report: ResNet-50 at 224x224, PIL DataLoader, batch {args.report_batch}: {slow:.2f} img/s", flush=True)

    results["ratio_vs_report"] = ours / slow
    results["ratio_vs_pil_same_encoder"] = ours / pil
    if device.type == "cuda":
        results["gpu_path"] = gpu_path_check(cfg, device)
    need_b = 3.0 if device.type == "cuda" else 1.15
    results["meets"] = bool(results["ratio_vs_report"] >= 100 and results["ratio_vs_pil_same_encoder"] >= need_b
                            and (device.type == "cuda" or results["augment_share"] < 0.05))  # fmt: skip
    print(json.dumps(results, indent=2))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(
        f"ours / (a) report = {results['ratio_vs_report']:.0f}x (need >= 100x); ours / (b) PIL = "
        f"{results['ratio_vs_pil_same_encoder']:.2f}x (need >= {need_b}x); augmentation {results['augment_share']:.1%} "
        f"of a step; {'meets' if results['meets'] else 'misses'} the targets; written to {out}"
    )


if __name__ == "__main__":
    main()
