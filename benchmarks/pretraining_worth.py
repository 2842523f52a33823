"""What MoCo pretraining is worth to the semi-supervised step: test top-1 against CPU-minutes for
MoCo-initialised and random-initialised runs of the same recipe on the same label draws, with the
pretraining's minutes counted (a) once per 3-draw study, as `main` shares one encoder across its
draws, and (b) once per draw.

Reads the CSVs of ``benchmarks/semisup_accuracy.py`` (each curve point carries its minutes; a later
file's row replaces an earlier one of the same draw and init), draws one panel per way of counting,
prints the paired comparison at equal minutes, and logs the figure and the figures behind it to the
tracking store (experiment ``benchmarks``, run ``pretraining-worth``). Equal minutes: the random run
is read at the end of its schedule when it took the MoCo pipeline's minutes (its run plus the
pretraining's share) within 5%. Give the random runs about those minutes (``--inits random
--steps N``): one that ended sooner is compared with its final model, one that ran longer at the
MoCo pipeline's minutes, mid-schedule; the summary names each such draw. On a noisy machine,
``--steady-minutes`` charges every run the median minutes a step of all runs (MoCo and random init
train the same network, so a step costs the same); ``--minutes-a-step X`` charges every run X, a
step's cost measured on the quiet host that timed the pretraining (when the runs did not all share
one host speed, the median of a mixed set matches neither the runs nor the pretraining's minutes).
Single-view test top-1 of the evaluated (EMA) model; nothing here chooses anything.

    python benchmarks/pretraining_worth.py --csv outputs/moco.csv outputs/random.csv --pretrain-minutes 4.7
"""

from __future__ import annotations

import argparse
import csv
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fewshot import tracking  # noqa: E402

Curve = list[tuple[float, float]]  # (minutes, test top-1), in order
SAME_MINUTES = 0.05  # a random run within 5% of the MoCo pipeline's minutes had equal minutes


@dataclass(frozen=True)
class Counting:
    label: str  # how the pretraining's minutes are counted
    share: float  # the fraction of the pretraining charged to one draw


def read_curves(path: Path, minutes_a_step: float | None = None) -> dict[str, dict[int, Curve]]:
    """init -> draw -> curve, from the ``curve`` column (``step:top1:minutes`` points); with
    ``minutes_a_step``, each point's minutes are its step times that instead of the measured ones."""
    curves: dict[str, dict[int, Curve]] = {}
    for row, points in _curve_rows(path):
        curves.setdefault(row["init"], {})[int(row["draw"])] = [
            (float(m) if minutes_a_step is None else int(step) * minutes_a_step, float(a)) for step, a, m in points
        ]
    return curves


def median_minutes_a_step(paths: list[Path]) -> float:
    """The median over every run in ``paths`` of its minutes over its steps."""
    return statistics.median(float(points[-1][2]) / int(points[-1][0]) for path in paths
                             for _, points in _curve_rows(path))  # fmt: skip


def _curve_rows(path: Path):
    with path.open(newline="") as handle:
        for row in csv.DictReader(handle):
            points = [point.split(":") for point in row["curve"].split()]
            if not points or any(len(point) != 3 for point in points):
                raise SystemExit(f"{path}: draw {row['draw']} ({row['init']}) has no minutes on its curve; "
                                 "rerun it with the current benchmarks/semisup_accuracy.py")  # fmt: skip
            yield row, points


def accuracy_at(curve: Curve, minutes: float, offset: float = 0.0) -> float:
    """Test top-1 of the last model evaluated by ``minutes`` (``offset`` minutes spent before the
    run began); nan before the first evaluation."""
    seen = [accuracy for at, accuracy in curve if at + offset <= minutes + 1e-9]
    return seen[-1] if seen else float("nan")


@dataclass(frozen=True)
class Pairing:
    gain: float  # MoCo's final test top-1 minus random's at equal minutes
    budget: float  # the MoCo pipeline's minutes: its run plus its share of the pretraining
    random_minutes: float  # what the random run took

    @property
    def mismatch(self) -> str:
        """'' when the random run took the MoCo pipeline's minutes (within ``SAME_MINUTES``)."""
        return {
            -1: "ended sooner",  # compared with its final model, which had fewer minutes
            0: "",
            1: "read before its schedule ended",  # its learning rate had not decayed yet
        }[_minutes_against(self.random_minutes, self.budget)]


def _minutes_against(spent: float, budget: float) -> int:
    """-1, 0 or 1: the random run took fewer minutes than ``budget``, the same (within
    ``SAME_MINUTES``) or more."""
    if spent < budget * (1 - SAME_MINUTES):
        return -1
    return 1 if spent > budget * (1 + SAME_MINUTES) else 0


def paired_gains(moco: dict[int, Curve], random: dict[int, Curve], offset: float) -> dict[int, Pairing]:
    """Per paired draw, at the MoCo pipeline's minutes (its run plus ``offset`` of pretraining).
    A random run within ``SAME_MINUTES`` of them is read at its end (the machine's noise is that
    large); a longer one at those minutes, mid-schedule; a shorter one at its end."""
    gains = {}
    for draw in sorted(set(moco) & set(random)):
        budget = moco[draw][-1][0] + offset
        spent, final = random[draw][-1]
        at = accuracy_at(random[draw], budget) if _minutes_against(spent, budget) > 0 else final
        gains[draw] = Pairing(moco[draw][-1][1] - at, budget, spent)
    return gains


def mean_curve(curves: dict[int, Curve], offset: float, grid: list[float]) -> list[float]:
    """Mean over draws of the step-wise curves on ``grid`` (nan until every draw has a point)."""
    return [statistics.mean(accuracy_at(c, m, offset) for c in curves.values()) for m in grid]


def draw_panel(ax, moco: dict[int, Curve], random: dict[int, Curve], offset: float, title: str) -> None:
    end = max(max(c[-1][0] for c in random.values()), max(c[-1][0] for c in moco.values()) + offset)
    grid = [end * i / 400 for i in range(401)]
    for curves, shift, colour, name in (
        (moco, offset, "tab:blue", "MoCo init"),
        (random, 0.0, "tab:orange", "random init"),
    ):
        for curve in curves.values():
            ax.plot([m + shift for m, _ in curve], [100 * a for _, a in curve], color=colour, alpha=0.25, lw=0.8)
        ax.step(grid, [100 * a for a in mean_curve(curves, shift, grid)], where="post", color=colour, lw=2,
                label=f"{name}, mean of {len(curves)} draws")  # fmt: skip
    if offset > 0:
        ax.axvspan(0, offset, color="tab:blue", alpha=0.08, label=f"MoCo pretraining ({offset:.1f} min)")
    finals = [100 * c[-1][1] for c in (*moco.values(), *random.values())]
    ax.set_ylim(max(min(finals) - 3, 90 if min(finals) > 93 else 0), min(max(finals) + 0.5, 100))  # the last points
    ax.set(title=title, xlabel="CPU-minutes (2 threads), pretraining included", ylabel="test top-1 % (single view)")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)


def summary(moco, random, pretrain_minutes: float, countings: list[Counting]) -> tuple[str, dict[str, float]]:
    lines, metrics = [], {}
    for counting in countings:
        offset = counting.share * pretrain_minutes
        gains = paired_gains(moco, random, offset)
        values = [100 * pairing.gain for pairing in gains.values()]
        spread = statistics.stdev(values) if len(values) > 1 else 0.0
        metrics["gain_per_study" if counting.share < 1 else "gain_per_draw"] = statistics.mean(values)
        budget = statistics.mean(pairing.budget for pairing in gains.values())
        line = (f"- {counting.label}: MoCo minus random at the MoCo pipeline's {budget:.1f} min a draw: "
                f"{statistics.mean(values):+.2f} ± {spread:.2f} points over {len(values)} paired draws "
                f"({' / '.join(f'{v:+.2f}' for v in values)})")  # fmt: skip
        unequal = [f"draw {draw} {p.random_minutes:.1f} min against {p.budget:.1f}, {p.mismatch}"
                   for draw, p in gains.items() if p.mismatch]  # fmt: skip
        if unequal:  # either way the comparison favours MoCo: give those random runs steps for equal minutes
            line += f"; random runs not at equal minutes: {'; '.join(unequal)}"
        lines.append(line)
    return "\n".join(lines) + "\n", metrics


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--csv", nargs="+", required=True,
                        help="semisup_accuracy.py's CSVs with the moco and random rows (random may run more steps)")  # fmt: skip
    parser.add_argument("--pretrain-minutes", type=float, required=True,
                        help="MoCo pretraining's minutes (its run's last elapsed_s / 60)")  # fmt: skip
    parser.add_argument("--steady-minutes", action="store_true",
                        help="charge every run the median minutes a step of all runs (a noisy machine)")  # fmt: skip
    parser.add_argument("--minutes-a-step", type=float, default=None,
                        help="charge every run this many minutes a step (measured where the pretraining was timed)")  # fmt: skip
    parser.add_argument("--draws-per-study", type=int, default=3, help="draws that share one encoder in `main`")
    parser.add_argument("--out", default="outputs/pretraining_worth")
    args = parser.parse_args()
    if args.pretrain_minutes < 0 or args.draws_per_study < 1:
        parser.error("--pretrain-minutes must be >= 0 and --draws-per-study >= 1")
    if args.minutes_a_step is not None and (args.steady_minutes or args.minutes_a_step <= 0):
        parser.error("--minutes-a-step must be > 0, and not given with --steady-minutes")
    moco, random = {}, {}
    paths = [Path(path) for path in args.csv]
    minutes_a_step = median_minutes_a_step(paths) if args.steady_minutes else args.minutes_a_step
    for path in paths:
        curves = read_curves(path, minutes_a_step)
        moco.update(curves.get("moco", {}))
        random.update(curves.get("random", {}))
    paired = set(moco) & set(random)
    if not paired:
        parser.error(f"{' '.join(args.csv)}: no draw has both a moco and a random row")
    moco, random = {d: moco[d] for d in paired}, {d: random[d] for d in paired}  # the figure shows paired draws only
    countings = [Counting(f"(a) pretraining once per {args.draws_per_study}-draw study", 1 / args.draws_per_study),
                 Counting("(b) pretraining once per draw", 1.0)]  # fmt: skip
    text, metrics = summary(moco, random, args.pretrain_minutes, countings)
    if minutes_a_step is not None:
        source = "the median minutes a step of every run read" if args.steady_minutes else "--minutes-a-step"
        text = f"Minutes: steps x {minutes_a_step:.5f} ({source}).\n" + text
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    for ax, counting in zip(axes, countings, strict=True):
        draw_panel(ax, moco, random, counting.share * args.pretrain_minutes, counting.label)
    fig.tight_layout()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out.with_suffix(".png"), dpi=120)
    out.with_suffix(".md").write_text(text)
    with tracking.start_run(run_name="pretraining-worth", experiment="benchmarks", tags={"job": "benchmark"}) as run:
        run.log_params({"csv": " ".join(args.csv), "pretrain_minutes": args.pretrain_minutes,
                        "draws_per_study": args.draws_per_study, "minutes_a_step": minutes_a_step})  # fmt: skip
        run.log_metrics(metrics)
        run.log_figure(fig, "pretraining_worth.png")
        run.log_text(text, "pretraining_worth.md")
    print(text + f"(written to {out}.png and {out}.md; logged to run pretraining-worth)")


if __name__ == "__main__":
    main()
