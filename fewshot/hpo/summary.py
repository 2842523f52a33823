"""What the parent run gets at the end: the trials table and Optuna's plots (matplotlib, as PNG)."""

from __future__ import annotations

import warnings
from collections.abc import Callable

import numpy as np
import optuna
from matplotlib.figure import Figure
from optuna.trial import TrialState

from fewshot import plots, tracking

plt = plots.plt

PLOTS: dict[str, str] = {
    "optimization_history": "plot_optimization_history",
    "param_importances": "plot_param_importances",
    "parallel_coordinate": "plot_parallel_coordinate",
    "slice": "plot_slice",
    "intermediate_values": "plot_intermediate_values",
}


def trials_csv(study: optuna.Study) -> str:
    """One row per trial: number, state, value, params, timing, the child run id."""
    frame = study.trials_dataframe(attrs=("number", "state", "value", "datetime_start", "datetime_complete",
                                          "duration", "params", "user_attrs", "system_attrs"))  # fmt: skip
    return frame.to_csv(index=False)


def _figure(result) -> Figure:
    first = np.asarray(result, dtype=object).flat[0]
    return first.figure


def study_figures(study: optuna.Study) -> tuple[dict[str, Figure], dict[str, str]]:
    """Each plot that can be drawn for this study, and why the others could not."""
    from optuna.visualization import matplotlib as optuna_plots

    done = [t for t in study.get_trials(deepcopy=False) if t.state == TrialState.COMPLETE]
    figures, skipped = {}, {}
    for name, function in PLOTS.items():
        if name == "param_importances" and len(done) < 2:
            skipped[name] = "needs at least 2 complete trials"
            continue
        plot: Callable = getattr(optuna_plots, function)
        before = set(plt.get_fignums())
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # ExperimentalWarning on every matplotlib plot
                fig = _figure(plot(study))
            fig.set_size_inches(max(fig.get_size_inches()[0], 8), max(fig.get_size_inches()[1], 5))
            if name not in ("slice", "parallel_coordinate"):  # their colour bars do not fit tight_layout
                fig.tight_layout()
            figures[name] = fig
        except Exception as exc:  # too few trials, constant params, ...
            skipped[name] = f"{type(exc).__name__}: {exc}"[:300]
            for number in set(plt.get_fignums()) - before:
                plt.close(number)
    return figures, skipped


def log_study_summary(tracker: tracking.Tracker, study: optuna.Study) -> dict[str, str]:
    """Trials table and plots on ``tracker``'s run; returns the plots that were skipped, with reasons."""
    tracker.log_text(trials_csv(study), "hpo/trials.csv")
    figures, skipped = study_figures(study)
    for name, fig in figures.items():
        tracker.log_figure(fig, f"hpo/{name}.png")
    if skipped:
        tracker.log_dict(skipped, "hpo/plots_skipped.json")
    return skipped
