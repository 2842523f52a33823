"""The model registry: registering versions with champion/challenger aliases, finding versions,
and turning a models:/ or runs:/ URI into downloaded model files (without loading them)."""

from __future__ import annotations

import contextlib
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from fewshot.errors import UserError
from fewshot.names import CHAMPION_ALIAS
from fewshot.tracking.models import quiet_mlflow
from fewshot.tracking.queries import param_text
from fewshot.tracking.store import TRACKING_ENV, check_reachable, first_line, redact, tracking_uri

CHAMPION = CHAMPION_ALIAS  # one name, defined in fewshot.names
CHALLENGER = "challenger"
SCORE_TAG = "val_score"


def _version_score(client: MlflowClient, name: str, version: str) -> float | None:
    tags = client.get_model_version(name, version).tags
    try:
        return float(tags[SCORE_TAG])
    except (KeyError, ValueError):
        return None


def _latest_version(client: MlflowClient, name: str):
    """The highest version of ``name`` (MLflow's ``models:/<name>/latest``), None when it has none."""
    found = client.search_model_versions(f"name = '{name}'", order_by=["version_number DESC"], max_results=1)
    return found[0] if found else None


def register_model_version(
    model_uri: str, name: str, score: float, tags: dict[str, Any] | None = None, once_per: dict[str, str] | None = None
) -> tuple[str, str]:
    """Register ``model_uri`` as a new version of ``name`` and give it an alias.

    ``score`` is the validation measure (higher is better, labeled training data only),
    stored as the version tag ``val_score``. The new version takes the ``champion`` alias
    when there is no champion or it beats the champion's score; otherwise it becomes the
    ``challenger``. With ``once_per`` (tags that identify what is registered, e.g. a study's
    winning trial), workers that register the same thing at the same moment keep one version:
    the lowest, whose registrar sets its alias; the others delete theirs. Returns (version, alias).
    """
    client = MlflowClient()
    score = round(score, 6)  # compared as stored: a tie with the champion's tag is not a win
    all_tags = {key: param_text(value) for key, value in {**(tags or {}), SCORE_TAG: f"{score:.6f}"}.items()}
    version = str(mlflow.register_model(model_uri, name, tags={**all_tags, **(once_per or {})}).version)
    if once_per:
        first = _lowest_version_with(client, name, once_per)
        if first is not None and int(first) < int(version):
            client.delete_model_version(name, version)
            return first, "set by the worker that registered it"
    try:
        champion = client.get_model_version_by_alias(name, CHAMPION)
        champion_score = _version_score(client, name, champion.version)
    except MlflowException:
        champion, champion_score = None, None
    alias = CHAMPION if champion is None or champion_score is None or score > champion_score else CHALLENGER
    _set_alias(client, name, alias, version)
    return version, alias


def _lowest_version_with(client: MlflowClient, name: str, tags: dict[str, str]) -> str | None:
    versions = client.search_model_versions(f"name = '{name}'", max_results=1000)
    found = [int(v.version) for v in versions if all(v.tags.get(k) == value for k, value in tags.items())]
    return str(min(found)) if found else None


def _set_alias(client: MlflowClient, name: str, alias: str, version: str, tries: int = 5) -> None:
    """Set an alias; two registrars setting one at once can collide in the store (a duplicate key
    on PostgreSQL), and the next try updates the row the other one wrote."""
    for attempt in range(tries):
        try:
            client.set_registered_model_alias(name, alias, version)
            return
        except MlflowException:
            if attempt == tries - 1:
                raise
            time.sleep(0.5 * (attempt + 1))


# ---------------------------------------------------------------- reading logged models back

MODEL_URI_FORMS = "models:/<name>@<alias>, models:/<name>/<version>, models:/<name>/latest, runs:/<run_id>/<model name>"
_REGISTRY_ALIAS = re.compile(r"^models:/(?P<name>[^/@]+)@(?P<alias>[^/@]+)$")
_REGISTRY_VERSION = re.compile(r"^models:/(?P<name>[^/@]+)/(?P<version>\d+|latest)$")
_LOGGED_MODEL_ID = re.compile(r"^models:/(?P<model_id>m-[0-9a-f]+)$")
_RUN_MODEL = re.compile(r"^runs:/(?P<run_id>[^/]+)/(?P<path>.+)$")


def is_mlflow_uri(text: str) -> bool:
    return text.startswith(("models:", "runs:"))


def _registry_hint(client: MlflowClient, name: str) -> str:
    """What exists under ``name``: its aliases and versions, or the registered model names."""
    try:
        model = client.get_registered_model(name)
    except MlflowException:
        names = [m.name for m in client.search_registered_models(max_results=20)]
        if not names:
            return "no model is registered in this store yet: run `mlflow run . -e moco_pretrain` or pass a checkpoint file"
        return f"registered models here: {', '.join(names)}"
    aliases = ", ".join(f"@{alias} -> {version}" for alias, version in sorted((model.aliases or {}).items()))
    versions = sorted(int(v.version) for v in client.search_model_versions(f"name = '{name}'", max_results=200))
    listed = ", ".join(str(v) for v in versions) or "none"
    return f"{name} has aliases {aliases or 'none'} and versions {listed}; try models:/{name}@champion or models:/{name}/<version>"


def _resolve_model_uri(client: MlflowClient, uri: str) -> tuple[str, str | None, str | None, str | None]:
    """(download URI pinned to a version, registered name, version, source run id)."""
    if match := _REGISTRY_ALIAS.match(uri):
        name = match["name"]
        found = client.get_model_version_by_alias(name, match["alias"])
        return f"models:/{name}/{found.version}", name, str(found.version), found.run_id
    if match := _REGISTRY_VERSION.match(uri):
        name = match["name"]
        found = _latest_version(client, name) if match["version"] == "latest" else None
        found = found or client.get_model_version(name, match["version"])
        return f"models:/{name}/{found.version}", name, str(found.version), found.run_id
    if _LOGGED_MODEL_ID.match(uri):
        return uri, None, None, None
    if match := _RUN_MODEL.match(uri):
        client.get_run(match["run_id"])  # a clear "Run ... not found" before the download
        return uri, None, None, match["run_id"]
    raise UserError(f"{uri}: not a model URI this project reads; use {MODEL_URI_FORMS}, or a checkpoint file path")


def _download(client: MlflowClient, pinned: str, dst: str | Path, store: str) -> str:
    """Download a pinned model URI from ``client``'s store. A registered version is read from
    its logged model's artifact location: MLflow's models:/ repository would ask the
    process-wide registry, which may be another store than the one asked for."""
    location = pinned
    if match := _REGISTRY_VERSION.match(pinned):
        found = client.get_model_version(match["name"], match["version"])
        model_id = getattr(found, "model_id", None)
        location = (
            client.get_logged_model(model_id).artifact_location
            if model_id
            else client.get_model_version_download_uri(match["name"], match["version"])
        )
    elif match := _LOGGED_MODEL_ID.match(pinned):
        location = client.get_logged_model(match["model_id"]).artifact_location
    return mlflow.artifacts.download_artifacts(artifact_uri=location, dst_path=str(dst), tracking_uri=store)


@dataclass(frozen=True)
class FetchedModel:
    """A logged model's files downloaded to ``local_dir``, with where they came from."""

    uri: str
    local_dir: Path
    registered_name: str | None
    version: str | None
    run_id: str | None


def fetch_model_files(
    uri: str, dst: str | Path, option: str = "--encoder", store_uri: str | None = None
) -> FetchedModel:
    """Download the files of the MLflow model at ``uri`` (registry alias or version, logged model
    id, or run URI) into ``dst`` without loading (unpickling) it.

    An alias is resolved to its version first, so the files and the reported version agree even
    if the alias moves meanwhile. Unknown names, versions, aliases and runs raise UserError with
    MLflow's message and what exists instead. ``store_uri`` defaults to the store MLflow
    resolves (MLFLOW_TRACKING_URI, else ./mlflow.db); MLflow's own tracking URI is left alone.
    """
    uri = uri.strip()
    store = store_uri or tracking_uri()
    check_reachable(store)
    client = MlflowClient(tracking_uri=store, registry_uri=store)
    try:
        pinned, name, version, run_id = _resolve_model_uri(client, uri)
        with quiet_mlflow():
            local = _download(client, pinned, dst, store)
    except MlflowException as exc:
        hint = "check the run id in the MLflow UI" if uri.startswith("runs:") else ""
        match = _REGISTRY_ALIAS.match(uri) or _REGISTRY_VERSION.match(uri)
        if match is not None:
            with contextlib.suppress(Exception):
                hint = _registry_hint(client, match["name"])
        if uri.startswith("runs:") and "Failed to download" in str(exc):
            hint = "check the model name after the run id (moco_pretrain logs it as 'encoder')"
        raise UserError(f"{option} {uri}: {first_line(exc)}" + (f"; {hint}" if hint else "")) from exc
    except UserError as exc:  # a malformed URI
        raise UserError(f"{option} {exc}") from exc
    except Exception as exc:  # connection errors from requests / sqlalchemy
        raise UserError(
            f"{option} {uri}: the tracking store {redact(store)} cannot be read ({type(exc).__name__}); "
            f"check {TRACKING_ENV}"
        ) from exc
    local_dir = Path(local)
    if run_id is None:
        run_id = _mlmodel_run_id(local_dir)
    return FetchedModel(uri=uri, local_dir=local_dir, registered_name=name, version=version, run_id=run_id)


def _mlmodel_run_id(model_dir: Path) -> str | None:
    path = model_dir / "MLmodel"
    if not path.is_file():
        return None
    match = re.search(r"^run_id:\s*(\S+)\s*$", path.read_text(), re.MULTILINE)
    return match.group(1) if match else None


def find_model_version(name: str, tags: dict[str, str]) -> tuple[str, list[str]] | None:
    """(version, its aliases) of the lowest version of ``name`` carrying all ``tags``, or None."""
    client = MlflowClient()
    try:
        version = _lowest_version_with(client, name, tags)
    except MlflowException:
        return None
    if version is None:
        return None
    aliases = [a for a, v in (client.get_registered_model(name).aliases or {}).items() if str(v) == version]
    return version, aliases
