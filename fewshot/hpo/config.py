"""One config object for a search, validated once at the door."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field

from fewshot.device import check_precision
from fewshot.errors import UserError
from fewshot.names import DEFAULT_ENCODER

TARGETS = ("linear", "moco", "baseline", "semisup")
PRUNERS = ("median", "halving", "none")
# per-trial budget when --budget is empty: epochs of the linear head / baseline per fold, MoCo epochs
DEFAULT_BUDGET = {"linear": "100", "moco": "3", "baseline": "150", "semisup": "300"}  # semisup: training steps


@dataclass(frozen=True)
class Budget:
    """A per-trial budget: ``epochs`` (an upper bound on the epochs a trial trains) or ``minutes``."""

    epochs: int | None = None
    minutes: float | None = None

    @classmethod
    def parse(cls, text: str, target: str) -> Budget:
        """``"3"`` or ``"3ep"``: epochs; ``"2min"`` or ``"2m"``: minutes (MoCo only)."""
        raw = (text or DEFAULT_BUDGET[target]).strip().lower()
        match = re.fullmatch(r"(\d+(?:\.\d+)?)\s*(ep|epochs?|m|min|minutes?)?", raw)
        if match is None:
            raise UserError(f"--budget {text}: write a number of epochs (3 or 3ep) or minutes (2min)")
        value, unit = float(match.group(1)), match.group(2) or "ep"
        if unit.startswith("ep"):
            if value != int(value) or not 1 <= value <= 100000:
                raise UserError(f"--budget {text}: epochs must be a whole number between 1 and 100000")
            return cls(epochs=int(value))
        if target != "moco":
            raise UserError(
                f"--budget {text}: a budget in minutes is for --target moco; give {target} epochs (e.g. 100)"
            )
        if not 0 < value <= 24 * 60:
            raise UserError(f"--budget {text}: minutes must be in (0, 1440]")
        return cls(minutes=value)

    def __str__(self) -> str:
        return f"{self.epochs}ep" if self.epochs is not None else f"{self.minutes:g}min"


@dataclass
class HpoConfig:
    target: str = "linear"
    n_trials: int = 20  # finished (COMPLETE or PRUNED) trials the study should reach; 0: only create it
    timeout: float = 0.0  # seconds for this invocation, 0: none
    n_jobs: int = 1  # trials run in parallel threads of this process
    study_name: str | None = None  # None: a fresh name; an existing name resumes / joins that study
    storage: str | None = None  # Optuna storage URL; None: SQLite beside the MLflow store
    folds: int = 5  # stratified k-fold over the labeled images; 0: the 75/25 validation split
    seed: int = 0
    data_dir: str | None = None
    encoder: str = DEFAULT_ENCODER  # target linear
    budget: str = ""
    pruner: str = "median"
    labels_per_class: int | None = 10
    n_labels: int | None = None
    device: str = "auto"
    precision: str = "auto"  # of every trial's training (fewshot.device)
    heartbeat_seconds: int = 10  # a trial without a heartbeat for 3x this long is failed and retried
    experiment: str | None = None
    moco_overrides: dict = field(default_factory=dict)  # PretrainConfig fields fixed for every trial
    semisup_overrides: dict = field(default_factory=dict)  # SemisupConfig fields fixed for every trial

    def validate(self) -> Budget:
        if self.target not in TARGETS:
            raise UserError(f"--target {self.target}: choose one of {', '.join(TARGETS)}")
        if self.pruner not in PRUNERS:
            raise UserError(f"--pruner {self.pruner}: choose one of {', '.join(PRUNERS)}")
        if not 0 <= self.n_trials <= 100000:
            raise UserError(f"--n-trials {self.n_trials}: must be between 0 (create the study only) and 100000")
        if self.timeout < 0:
            raise UserError(f"--timeout {self.timeout}: must be >= 0 seconds (0: no limit)")
        if not 1 <= self.n_jobs <= 64:
            raise UserError(f"--n-jobs {self.n_jobs}: must be between 1 and 64")
        if self.folds == 1 or not 0 <= self.folds <= 20:
            raise UserError(f"--folds {self.folds}: use 2 to 20 folds, or 0 for the 75/25 validation split")
        check_precision(self.precision)
        if self.heartbeat_seconds < 1:
            raise UserError(f"--heartbeat {self.heartbeat_seconds}: must be >= 1 second")
        name = self.study_name
        if name is not None and (not re.fullmatch(r"[A-Za-z0-9_.:@+-]{1,200}", name) or ".." in name):
            raise UserError(f"--study-name {name!r}: use up to 200 letters, digits and _ . : @ + - characters (no ..)")
        if self.target == "semisup" and not self.encoder.strip():
            raise UserError("--encoder is empty: --target semisup starts from it; pass its URI or random")
        if self.target == "linear" and not self.encoder.strip():
            raise UserError("--encoder is empty: --target linear tunes a head on a fixed encoder; pass its URI")
        return Budget.parse(self.budget, self.target)

    def identity(self, budget: Budget) -> dict[str, str]:
        """What makes two invocations the same search: a worker joining a study must match it."""
        ident = {
            "target": self.target,
            "folds": str(self.folds),
            "seed": str(self.seed),
            "labels": f"{self.labels_per_class}/class" if self.labels_per_class else f"{self.n_labels} random",
            "budget": str(budget),
        }
        if self.target in ("linear", "semisup"):
            ident["encoder"] = self.encoder
        return ident

    def params(self) -> dict:
        flat = asdict(self)
        flat.pop("moco_overrides")
        flat.pop("semisup_overrides")
        return flat
