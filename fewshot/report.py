"""The comparison table: one row per method from logged runs, plus the published reference rows."""

from __future__ import annotations

import csv
import io
import statistics
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from fewshot import tracking  # noqa: E402
from fewshot.errors import UserError  # noqa: E402

WORKFLOW_TAG = "job"
WORKFLOW_JOB = "workflow"
STEP_TAG_PREFIX = "step."


def method_of(tags: dict[str, str]) -> str | None:
    """The table row a run belongs to, from the tags its job sets."""
    job = tags.get("job")
    if job == "baseline":
        return {"mlp1": "MLP1", "mlp2": "MLP2", "cnn": "CNN (report's)"}.get(tags.get("model", ""))
    if job == "linear_eval":
        return {"linear": "MoCo + linear", "knn": "MoCo + kNN", "finetune": "MoCo + fine-tune"}.get(
            tags.get("probe", "")
        )
    if job == "semisup":
        return "MoCo + semi-supervised" if tags.get("init", "moco") != "random" else "Semi-supervised (random init)"
    return None


METHOD_ORDER = [
    "MLP1", "MLP2", "CNN (report's)", "MoCo + linear", "MoCo + kNN", "MoCo + fine-tune",
    "MoCo + semi-supervised", "Semi-supervised (random init)",
]  # fmt: skip


@dataclass(frozen=True)
class Reference:
    method: str
    top1: float | None
    top2: float | None
    top5: float | None
    note: str


REFERENCES = [
    Reference("Report: MLP1", None, None, None, "best validation 0.85 (25 images), no test figure"),
    Reference("Report: MLP2", None, None, None, "best validation about 0.80 (25 images), no test figure"),
    Reference("Report: CNN", 0.91, None, None, "one draw; best validation 0.96"),
    Reference("Report: MoCo + linear", 0.34, 0.61, 0.77, "on 100 test images only"),
    Reference("Published: Ladder networks", 0.9894, None, None, "100 labels, semi-supervised"),
    Reference("Published: VAT", 0.9864, None, None, "100 labels, semi-supervised"),
    Reference("Published: Improved GAN", 0.9907, None, None, "100 labels, semi-supervised"),
    Reference("Published: Bad GAN", 0.992, None, None, "100 labels, semi-supervised"),
]


@dataclass
class MethodRow:
    method: str
    top1: list[float] = field(default_factory=list)
    top2: list[float] = field(default_factory=list)
    top5: list[float] = field(default_factory=list)
    tta_top1: list[float] = field(default_factory=list)  # NaN for a run without test-time augmentation
    seconds: list[float] = field(default_factory=list)
    draws: list[str] = field(default_factory=list)
    run_ids: list[str] = field(default_factory=list)
    confusion: torch.Tensor | None = None

    def add(self, summary: dict) -> None:
        """One run's figures. With test-time augmentation a job logs its TTA scores as ``test_top*`` and
        the single view as ``test_plain_top*``: the table's top-k columns are single view for every
        method, the TTA top-1 stands in a column of its own."""
        metrics = summary["metrics"]
        tta = "test_plain_top1" in metrics
        prefix = "test_plain_top" if tta else "test_top"
        self.top1.append(metrics[f"{prefix}1"])
        self.top2.append(metrics.get(f"{prefix}2", float("nan")))
        self.top5.append(metrics.get(f"{prefix}5", float("nan")))
        self.tta_top1.append(metrics["test_top1"] if tta else float("nan"))
        self.seconds.append(metrics.get("wall_seconds", float("nan")))
        self.draws.append(summary["tags"].get("seed", "?"))
        self.run_ids.append(summary["run_id"])

    @property
    def mean(self) -> float:
        return statistics.mean(self.top1)

    @property
    def tta_mean(self) -> float | None:
        """Mean TTA top-1 when every draw has one, else None (no column entry)."""
        known = [v for v in self.tta_top1 if v == v]
        return statistics.mean(known) if known and len(known) == len(self.tta_top1) else None

    @property
    def std(self) -> float:
        return statistics.stdev(self.top1) if len(self.top1) > 1 else 0.0


def _pct(value: float | None) -> str:
    return "" if value is None or value != value else f"{100 * value:.2f}"


def step_run_ids(parent_run_id: str) -> list[str]:
    tags = tracking.run_summary(parent_run_id)["tags"]
    return [value for key, value in sorted(tags.items()) if key.startswith(STEP_TAG_PREFIX) and key.count(".") == 1]


def collect(run_ids: list[str]) -> dict[str, MethodRow]:
    rows: dict[str, MethodRow] = {}
    for run_id in run_ids:
        summary = tracking.run_summary(run_id)
        method = method_of(summary["tags"])
        if method is None or summary["status"] != "FINISHED" or "test_top1" not in summary["metrics"]:
            continue
        rows.setdefault(method, MethodRow(method)).add(summary)
    return dict(sorted(rows.items(), key=lambda item: METHOD_ORDER.index(item[0])))


def attach_confusions(rows: dict[str, MethodRow]) -> None:
    """Sum each method's test confusion matrices over its draws (from the runs' CSV artifacts)."""
    with tempfile.TemporaryDirectory() as tmp:
        for row in rows.values():
            total = None
            for run_id in row.run_ids:
                try:
                    path = tracking.download_artifact(
                        run_id, "evaluation/test_confusion_matrix.csv", Path(tmp) / run_id
                    )
                except Exception:  # a run without the artifact still counts in the table
                    continue
                lines = path.read_text().strip().splitlines()[1:]
                matrix = torch.tensor([[int(v) for v in line.split(",")[1:]] for line in lines])
                total = matrix if total is None else total + matrix
            row.confusion = total


HEADER = ["method", "test top-1 % single view (mean ± std)", "min", "with TTA: top-1 %", "top-2 %", "top-5 %", "draws",
          "wall time per run", "source"]  # fmt: skip


def table_rows(rows: dict[str, MethodRow]) -> list[list[str]]:
    out = []
    for row in rows.values():
        out.append([
            row.method, f"{100 * row.mean:.2f} ± {100 * row.std:.2f}", _pct(min(row.top1)),
            _pct(row.tta_mean), _pct(statistics.mean(row.top2)), _pct(statistics.mean(row.top5)), str(len(row.top1)),
            f"{statistics.mean(row.seconds):.0f} s", "this repository (logged runs)",
        ])  # fmt: skip
    for ref in REFERENCES:
        out.append([ref.method, _pct(ref.top1), "", "", _pct(ref.top2), _pct(ref.top5), "", "", ref.note])
    return out


def markdown(rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def csv_text(rows: dict[str, MethodRow]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["method", "top1_mean", "top1_std", "top1_min", "tta_top1_mean", "top2_mean", "top5_mean", "draws",
                     "wall_seconds_mean", "source"])  # fmt: skip
    for row in rows.values():
        tta = "" if row.tta_mean is None else f"{row.tta_mean:.6f}"
        writer.writerow([row.method, f"{row.mean:.6f}", f"{row.std:.6f}", f"{min(row.top1):.6f}", tta,
                         f"{statistics.mean(row.top2):.6f}", f"{statistics.mean(row.top5):.6f}", len(row.top1),
                         f"{statistics.mean(row.seconds):.1f}", "logged runs"])  # fmt: skip
    for ref in REFERENCES:
        writer.writerow([ref.method, ref.top1 if ref.top1 is not None else "", "", "", "", ref.top2 or "", ref.top5 or "",
                         "", "", ref.note])  # fmt: skip
    return buffer.getvalue()


def bar_figure(rows: dict[str, MethodRow]) -> Figure:
    fig, ax = plt.subplots(figsize=(10, 4.5))
    names = list(rows)
    means = [100 * rows[n].mean for n in names]
    stds = [100 * rows[n].std for n in names]
    ax.bar(range(len(names)), means, yerr=stds, capsize=4, color="tab:blue", label="this repository (mean ± std)")
    for i, n in enumerate(names):
        ax.scatter([i] * len(rows[n].top1), [100 * a for a in rows[n].top1], color="black", s=8, zorder=3)
    refs = [r for r in REFERENCES if r.top1 is not None]
    offset = len(names)
    ax.bar(range(offset, offset + len(refs)), [100 * r.top1 for r in refs], color="tab:gray", label="published")
    ax.set_xticks(range(offset + len(refs)))
    ax.set_xticklabels(names + [r.method for r in refs], rotation=35, ha="right", fontsize=8)
    ax.set_ylabel("test top-1 accuracy (%), single view")
    ax.set_ylim(max(0, min(means + [100 * r.top1 for r in refs]) - 10), 100)
    ax.set_title("MNIST with 100 labels: test top-1 (dots: individual label draws)")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    return fig


def confusion_grid_figure(rows: dict[str, MethodRow]) -> Figure:
    with_matrix = [r for r in rows.values() if r.confusion is not None]
    cols = min(3, max(1, len(with_matrix)))
    n_rows = max(1, -(-len(with_matrix) // cols))
    fig, axes = plt.subplots(n_rows, cols, figsize=(4 * cols, 3.8 * n_rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, row in zip(axes.flat, with_matrix, strict=False):
        matrix = row.confusion.float()
        normalised = matrix / matrix.sum(1, keepdim=True).clamp(min=1)
        ax.axis("on")
        ax.imshow(normalised.numpy(), cmap="Blues", vmin=0, vmax=1)
        ax.set_title(f"{row.method} ({len(row.top1)} draws)", fontsize=9)
        ax.set_xticks(range(10))
        ax.set_yticks(range(10))
        ax.set_xlabel("predicted", fontsize=8)
        ax.set_ylabel("true", fontsize=8)
    fig.suptitle("Test confusion matrices, summed over draws, row-normalised")
    fig.tight_layout()
    return fig


@dataclass
class Report:
    markdown: str
    csv: str
    rows: dict[str, MethodRow]


def build_report(run_ids: list[str], title: str) -> Report:
    rows = collect(run_ids)
    if not rows:
        raise UserError("no finished runs with test metrics to report; run the workflow (`mlflow run . -e main`) first")
    attach_confusions(rows)
    text = f"# {title}\n\n" + markdown(table_rows(rows))
    return Report(markdown=text, csv=csv_text(rows), rows=rows)


def write_report(report: Report, out_dir: Path, tracker: tracking.Tracker | None = None) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    md, table = out_dir / "results.md", out_dir / "results.csv"
    md.write_text(report.markdown)
    table.write_text(report.csv)
    if tracker is not None:
        tracker.log_file(md)
        tracker.log_file(table)
        tracker.log_figure(bar_figure(report.rows), "results_bar.png")
        tracker.log_figure(confusion_grid_figure(report.rows), "results_confusion_grid.png")
    return [md, table]


def latest_workflow_run() -> str:
    run_id = tracking.latest_run_id(WORKFLOW_TAG, WORKFLOW_JOB)
    if run_id is None:
        raise UserError(
            "no workflow run in this tracking store; run `mlflow run . -e main` first or pass --parent-run-id"
        )
    return run_id
