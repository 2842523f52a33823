"""Precision: the choice with the device, the fp32 fall-back, the fp32 islands under bf16,
determinism, and resume across a bf16 run in the same MLflow run."""

from __future__ import annotations

import contextlib
import importlib
import platform
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from mlflow.tracking import MlflowClient
from torch import nn

from fewshot.augment import OnlineAffine
from fewshot.baseline import BaselineConfig
from fewshot.data import draw_labels, load_mnist, to_unit
from fewshot.device import FP32, NATIVE_BF16_ENV, Precision, cpu_has_native_bf16, resolve_precision
from fewshot.errors import UserError
from fewshot.hpo import HpoConfig
from fewshot.linear_eval import LinearEvalConfig
from fewshot.moco import MoCo, SplitBatchNorm2d
from fewshot.models import build_classifier, build_encoder
from fewshot.pretrain import PretrainConfig, load_checkpoint, pretrain
from fewshot.pretrain.job import run_pretrain
from fewshot.semisup import (
    PseudoLabeler,
    SemisupConfig,
    consistency_loss,
    prepare_model,
    semisup_data,
    train_semisup,
)
from fewshot.semisup.job import run_semisup
from fewshot.semisup.model import build_model, with_clean_batchnorm
from fewshot.train import FitConfig, fit
from fewshot.workflow import WorkflowConfig
from tests.encoders import same_weights

TIMING = ("images_per_s", "elapsed_s", "augment_share", "evaluate_s", "unlabeled_per_s", "train_seconds")


def without_timing(history: list[dict]) -> str:
    """The history without wall-clock figures, as text: exact, with NaN (an empty mask) equal to NaN."""
    return repr([{k: v for k, v in h.items() if k not in TIMING} for h in history])


def tiny_moco(**changes) -> PretrainConfig:
    cfg = PretrainConfig(
        width=4, epochs=3, batch_size=32, moco_k=96, bn_splits=4, max_steps_per_epoch=3, progress=False,
        checkpoint_minutes=0, warmup_epochs=0.5, knn_test=False, device="cpu",
    )  # fmt: skip
    return replace(cfg, **changes)


def tiny_semisup(**changes) -> SemisupConfig:
    cfg = SemisupConfig(init="random", width=8, steps=9, batch_size=8, mu=2, eval_every=3, progress=False,
                        targets="ema", ema=0.9, tau=0.5, device="cpu", tta_views=2)  # fmt: skip
    return replace(cfg, **changes)


@pytest.fixture
def bf16_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """This CPU counts as one with native bf16 (the computation is real bf16 on any CPU; only speed differs)."""
    monkeypatch.setenv(NATIVE_BF16_ENV, "1")


def _state_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------- the choice


def test_auto_picks_bf16_on_a_bf16_cpu_and_on_cuda_and_fp32_elsewhere(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(NATIVE_BF16_ENV, "1")
    assert resolve_precision("auto", "cpu") == "bf16"
    assert Precision.choose("auto", torch.device("cpu")) == Precision("bf16", "cpu")
    monkeypatch.setenv(NATIVE_BF16_ENV, "0")
    assert resolve_precision("auto", "cpu") == "fp32"
    assert resolve_precision("auto", "cuda") == "bf16"  # the GPU path has always run under bf16 autocast
    assert resolve_precision("auto", "cpu", native_bf16=True) == "bf16"  # the parameter beats the variable
    for forced in ("fp32", "bf16"):
        assert resolve_precision(forced, "cpu") == forced == resolve_precision(forced, "cuda")
    with pytest.raises(UserError, match="--precision fp16"):
        resolve_precision("fp16", "cpu")
    monkeypatch.setenv(NATIVE_BF16_ENV, "yes")
    with pytest.raises(UserError, match=NATIVE_BF16_ENV):
        cpu_has_native_bf16()


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="reads x86 /proc/cpuinfo flags")
def test_the_detector_agrees_with_the_cpu_flags(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(NATIVE_BF16_ENV)
    cpuinfo = Path("/proc/cpuinfo")
    if not cpuinfo.is_file():
        pytest.skip("no /proc/cpuinfo")
    flags = set()
    for line in cpuinfo.read_text().splitlines():
        if line.startswith("flags"):
            flags |= set(line.split(":", 1)[1].split())
    assert cpu_has_native_bf16() == bool(flags & {"amx_bf16", "avx512_bf16"})


@pytest.mark.parametrize(
    "make",
    [lambda: PretrainConfig(precision="fp16").validate(), lambda: SemisupConfig(precision="fp16").validate(),
     lambda: BaselineConfig(precision="fp16").validate(), lambda: LinearEvalConfig(precision="fp16").validate(),
     lambda: HpoConfig(precision="fp16").validate(), lambda: WorkflowConfig(precision="fp16").validate()],
)  # fmt: skip
def test_configs_refuse_an_unknown_precision_at_the_door(make) -> None:
    with pytest.raises(UserError, match="--precision fp16: choose one of auto, fp32, bf16"):
        make()


@pytest.mark.parametrize("entry", ["baseline", "moco_pretrain", "linear_eval", "semisup", "hpo", "main"])
def test_every_training_entry_point_takes_precision(entry: str) -> None:
    command = importlib.import_module(f"entrypoints.{entry}").main
    shown = CliRunner().invoke(command, ["--help"])
    assert shown.exit_code == 0 and "--precision [auto|fp32|bf16]" in shown.output
    refused = CliRunner().invoke(command, ["--precision", "fp16"])
    assert refused.exit_code == 2 and refused.output.count("\n") == 1 and "error:" in refused.output


# ---------------------------------------------------------------- the fp32 fall-back


def test_fp32_is_the_path_without_autocast_and_what_auto_gives_without_native_bf16(
    mnist, draw, monkeypatch: pytest.MonkeyPatch
) -> None:
    # one MoCo step under the fp32 precision against the same step with no autocast anywhere
    def step(context) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        torch.manual_seed(0)
        model = MoCo(build_encoder("digit", 4), k=64, bn_splits=4, generator=torch.Generator().manual_seed(0))
        x1, x2 = torch.rand(2, 16, 1, 28, 28, generator=torch.Generator().manual_seed(1))
        with context:
            loss, _ = model(x1, x2, 0.99, torch.Generator().manual_seed(2))
        loss.backward()
        grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
        return loss, {**grads, **model.state_dict()}

    plain_loss, plain = step(contextlib.nullcontext())
    fp32_loss, fp32 = step(FP32.autocast())
    assert torch.equal(plain_loss, fp32_loss) and _state_equal(plain, fp32)
    bf16_loss, _ = step(Precision("bf16").autocast())
    assert not torch.equal(bf16_loss, fp32_loss), "bf16 must really change the arithmetic"

    # whole runs: --precision fp32 on a bf16 CPU == auto on a CPU without native bf16; NCHW kept
    monkeypatch.setenv(NATIVE_BF16_ENV, "1")
    forced = pretrain(tiny_moco(precision="fp32"), mnist, draw)
    monkeypatch.setenv(NATIVE_BF16_ENV, "0")
    fallback = pretrain(tiny_moco(precision="auto"), mnist, draw)
    assert without_timing(forced.history) == without_timing(fallback.history)
    assert _state_equal(forced.model.state_dict(), fallback.model.state_dict())
    conv = next(m for m in forced.model.backbone_q.modules() if isinstance(m, nn.Conv2d) and m.in_channels > 1)
    assert not conv.weight.is_contiguous(memory_format=torch.channels_last), "the CPU fp32 MoCo path stays NCHW"
    bf16 = pretrain(tiny_moco(precision="bf16"), mnist, draw)
    conv = next(m for m in bf16.model.backbone_q.modules() if isinstance(m, nn.Conv2d) and m.in_channels > 1)
    assert conv.weight.is_contiguous(memory_format=torch.channels_last), "bf16 MoCo runs channels-last"
    assert without_timing(bf16.history) != without_timing(forced.history)

    # the supervised loop: no precision at all == fp32
    def trained(precision: Precision | None) -> nn.Module:
        torch.manual_seed(0)
        model = build_classifier("cnn")
        x, y = to_unit(mnist.train_images[:64]), mnist.train_labels[:64]
        fit(model, (x, y), (x[:16], y[:16]), FitConfig(epochs=2, batch_size=32, progress=False),
            torch.Generator().manual_seed(0), augment=OnlineAffine(), precision=precision)  # fmt: skip
        return model

    assert same_weights(trained(None), trained(FP32))
    assert not same_weights(trained(None), trained(Precision("bf16")))


# ---------------------------------------------------------------- the fp32 islands


def test_moco_under_bf16_keeps_logits_loss_queue_and_momentum_update_in_fp32() -> None:
    torch.manual_seed(0)
    model = MoCo(build_encoder("digit", 4), k=64, bn_splits=4, generator=torch.Generator().manual_seed(0))
    model = model.to(memory_format=torch.channels_last)
    seen: dict[str, torch.dtype] = {}
    conv = next(m for m in model.backbone_q.modules() if isinstance(m, nn.Conv2d) and m.in_channels > 1)
    conv.register_forward_hook(lambda mod, inp, out: seen.update(conv=out.dtype))
    optimizer = torch.optim.SGD(model.query_parameters(), lr=0.1, momentum=0.9)
    generator = torch.Generator().manual_seed(1)
    for _ in range(3):
        x1, x2 = torch.rand(2, 32, 1, 28, 28, generator=generator)
        with Precision("bf16").autocast():
            loss, logits = model(x1, x2, 0.9, generator)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert seen["conv"] == torch.bfloat16, "the convolutions really ran in bf16"
    assert loss.dtype == logits.dtype == model.queue.dtype == torch.float32
    # keys were normalised in fp32 before they entered the queue (bf16 norms are off by ~1e-3)
    written = model.queue[:, :64].norm(dim=0)
    assert torch.allclose(written, torch.ones_like(written), atol=1e-6)
    assert all(p.dtype == torch.float32 for p in model.parameters()), "query and momentum-updated key weights"
    assert all(b.dtype == torch.float32 for n, b in model.named_buffers() if "running" in n), "BN statistics"


def test_channels_last_split_bn_leaves_fp32_moco_bit_identical_and_bf16_moco_close(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # three MoCo steps (split-BN 4, channels-last everywhere) with the channels-last split-BN on and off
    def steps(precision: Precision, channels_last_path: bool) -> tuple[list[float], dict[str, torch.Tensor]]:
        monkeypatch.setattr(SplitBatchNorm2d, "channels_last_path", channels_last_path)
        torch.manual_seed(0)
        model = MoCo(build_encoder("digit", 4), k=64, bn_splits=4, generator=torch.Generator().manual_seed(0))
        model = model.to(memory_format=torch.channels_last)
        optimizer = torch.optim.SGD(model.query_parameters(), lr=0.1, momentum=0.9)
        generator = torch.Generator().manual_seed(1)
        losses = []
        for _ in range(3):
            x1, x2 = (
                x.contiguous(memory_format=torch.channels_last)
                for x in torch.rand(2, 32, 1, 28, 28, generator=generator)
            )
            with precision.autocast():
                loss, _ = model(x1, x2, 0.9, generator)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        return losses, model.state_dict()

    fp32_on, fp32_off = steps(FP32, True), steps(FP32, False)
    assert fp32_on[0] == fp32_off[0] and _state_equal(fp32_on[1], fp32_off[1]), "fp32 is untouched"
    bf16_on, bf16_off = steps(Precision("bf16"), True), steps(Precision("bf16"), False)
    assert bf16_on[0] == pytest.approx(bf16_off[0], rel=2e-2), "bf16: the same method within bf16 rounding"
    assert not _state_equal(bf16_on[1], bf16_off[1]), "bf16 really took the channels-last path"
    again = steps(Precision("bf16"), True)
    assert again[0] == bf16_on[0] and _state_equal(again[1], bf16_on[1]), "and repeats exactly"


def test_semisup_under_bf16_keeps_losses_pseudo_labels_and_ema_in_fp32(mnist, draw) -> None:
    cfg = tiny_semisup(precision="bf16", steps=3)
    data = semisup_data(mnist, draw, "cpu")
    model = prepare_model(cfg, data, None)
    labeler = PseudoLabeler(cfg, torch.full((10,), 0.1), data.pool.shape[0], torch.device("cpu"))
    u = to_unit(data.pool[:16])
    with Precision("bf16").autocast():
        out = consistency_loss(model, model, data.x_train[:8], data.y_train[:8], u, u, torch.arange(16), labeler, 1.0)
    assert out.loss.dtype == out.sup_loss.dtype == out.unsup_loss.dtype == out.pseudo.probs.dtype == torch.float32
    assert labeler.p_model.dtype == torch.float32

    result = train_semisup(cfg, data, prepare_model(cfg, data, None))
    for trained in (result.model, result.online):  # the EMA model and the online one
        assert all(p.dtype == torch.float32 for p in trained.parameters())
        assert all(b.dtype in (torch.float32, torch.long) for b in trained.buffers())
    assert all(torch.isfinite(torch.tensor(h["sup_loss"])) for h in result.history)


def test_supervised_fit_under_bf16_keeps_the_loss_and_weights_fp32(mnist) -> None:
    torch.manual_seed(0)
    model = build_classifier("cnn")
    x, y = to_unit(mnist.train_images[:64]), mnist.train_labels[:64]
    result = fit(model, (x, y), (x[:16], y[:16]), FitConfig(epochs=2, batch_size=32, progress=False),
                 torch.Generator().manual_seed(0), precision=Precision("bf16"))  # fmt: skip
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert all(isinstance(h["train_loss"], float) and h["train_loss"] > 0 for h in result.history)
    with Precision("bf16").autocast():
        logits = model.eval()(x[:4])
    assert logits.dtype == torch.bfloat16 and F.cross_entropy(logits.float(), y[:4]).dtype == torch.float32


# ---------------------------------------------------------------- determinism


def test_bf16_runs_repeat_exactly(mnist, draw) -> None:
    first, second = (pretrain(tiny_moco(precision="bf16"), mnist, draw) for _ in range(2))
    assert without_timing(first.history) == without_timing(second.history)
    assert _state_equal(first.model.state_dict(), second.model.state_dict())
    cfg = tiny_semisup(precision="bf16", steps=6)
    data = semisup_data(mnist, draw, "cpu")
    a, b = (train_semisup(cfg, data, prepare_model(cfg, data, None)) for _ in range(2))
    assert same_weights(a.model, b.model) and same_weights(a.online, b.online)
    assert without_timing(a.history) == without_timing(b.history)


# ---------------------------------------------------------------- resume across a bf16 run


def test_moco_resumes_a_bf16_run_in_the_same_mlflow_run(
    synthetic_data_dir: Path, tracking_store: str, tmp_path: Path, bf16_cpu: None
) -> None:
    cfg = tiny_moco(data_dir=str(synthetic_data_dir))  # auto: bf16 on this (declared) bf16 CPU
    mnist = load_mnist(str(synthetic_data_dir))
    reference = pretrain(cfg, mnist, draw_labels(mnist.train_labels, 0))

    def stop_after_epoch_1(epoch: int, metrics: dict) -> None:
        if epoch == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_pretrain(cfg, checkpoint_dir=tmp_path / "ck", run_name="r", on_epoch=stop_after_epoch_1)
    client = MlflowClient()
    (killed,) = client.search_runs([client.get_experiment_by_name("fewshot").experiment_id])
    assert killed.info.status == "KILLED"
    with pytest.raises(UserError, match="precision 'auto' -> 'fp32'"):
        run_pretrain(replace(cfg, precision="fp32"), checkpoint_dir=tmp_path / "ck", run_name="r")
    out = run_pretrain(cfg, checkpoint_dir=tmp_path / "ck", run_name="r")
    assert out["run_id"] == killed.info.run_id
    run = client.get_run(out["run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.params["precision"] == "auto" and run.data.params["precision_resolved"] == "bf16"
    assert sorted(m.step for m in client.get_metric_history(out["run_id"], "loss")) == [0, 1, 2]
    resumed = load_checkpoint(tmp_path / "ck" / "r" / "last.pt")
    assert _state_equal(resumed["moco_state"], {k: v.cpu() for k, v in reference.model.state_dict().items()})
    losses = [m.value for m in sorted(client.get_metric_history(out["run_id"], "loss"), key=lambda m: m.step)]
    assert losses == pytest.approx([h["loss"] for h in reference.history], abs=0)


def test_semisup_resumes_a_bf16_run_in_the_same_mlflow_run(
    synthetic_data_dir: Path, tracking_store: str, tmp_path: Path, mnist, draw
) -> None:
    cfg = tiny_semisup(precision="bf16", data_dir=str(synthetic_data_dir))
    data = semisup_data(mnist, draw, "cpu")
    reference = train_semisup(cfg, data, prepare_model(cfg, data, None))

    def stop_at_step_6(step: int, metrics: dict) -> None:
        if step == 6:
            raise KeyboardInterrupt

    folder = tmp_path / "ck"
    with pytest.raises(KeyboardInterrupt):
        run_semisup(cfg, checkpoint_dir=folder, run_name="semi", on_eval=stop_at_step_6, register=False)
    client = MlflowClient()
    (first,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert first.info.status == "KILLED"
    out = run_semisup(cfg, checkpoint_dir=folder, run_name="semi", register=False)
    assert out["run_id"] == first.info.run_id
    run = client.get_run(out["run_id"])
    assert run.info.status == "FINISHED" and run.data.tags["resumed_from_step"] == "3"
    assert run.data.params["precision"] == "bf16" and run.data.params["precision_resolved"] == "bf16"
    state = torch.load(folder / "semi" / "last.pt", weights_only=True)
    # the checkpoint keeps the EMA as trained; what is scored is its copy with clean-pool statistics
    ema = build_model(cfg, None, torch.device("cpu"))  # the trainer's own layout (channels-last)
    ema.load_state_dict(state["ema"])
    scored = with_clean_batchnorm(ema, data.pool, cfg.bn_recalibration, Precision.choose(cfg.precision, "cpu"))
    assert state["finished"] and _state_equal(scored.state_dict(), reference.model.state_dict())
    assert _state_equal(state["model"], reference.online.state_dict())
    val = [m.value for m in sorted(client.get_metric_history(out["run_id"], "val_acc"), key=lambda m: m.step)]
    assert val == [h["val_acc"] for h in reference.history]
