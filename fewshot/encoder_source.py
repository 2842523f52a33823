"""Where a pretrained encoder comes from: the model registry, a run, or a checkpoint file.

Nothing here unpickles code: MLflow models are read through their ``extra_files/spec.json``
and ``extra_files/weights.pt`` (a plain state_dict), checkpoints with
``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import hashlib
import json
import pickle
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fewshot.errors import UserError
from fewshot.models import ENCODERS, build_encoder, with_feature_grid
from fewshot.names import DEFAULT_ENCODER, MOCO_CHECKPOINT_FORMAT, MOCO_CHECKPOINT_VERSION

ENCODER_KINDS = ("encoder", "encoder_classifier")  # spec kinds whose weights hold an encoder


@dataclass(frozen=True)
class EncoderSource:
    """Provenance of a loaded encoder, logged as params and tags of the runs that use it."""

    uri: str  # what the user passed (a checkpoint as an absolute path)
    kind: str  # "registry", "logged_model", "run" or "checkpoint"
    arch: str
    width: int
    feature_dim: int
    registered_name: str | None = None
    version: str | None = None
    run_id: str | None = None
    sha256: str | None = None  # of the checkpoint file

    def params(self) -> dict[str, Any]:
        return {
            "encoder_uri": self.uri,
            "encoder_version": self.version or "",
            "encoder_run_id": self.run_id or "",
            "encoder_arch": self.arch,
            "encoder_width": self.width,
            "encoder_feature_dim": self.feature_dim,
        }

    def tags(self) -> dict[str, Any]:
        tags = {
            "encoder_uri": self.uri,
            "encoder_source": self.kind,
            "encoder_version": self.version or "",
            "encoder_run_id": self.run_id or "",
        }
        if self.registered_name:
            tags["encoder_model"] = self.registered_name
        if self.sha256:
            tags["encoder_sha256"] = self.sha256
        return tags


def load_encoder(uri: str = DEFAULT_ENCODER, tracking_uri: str | None = None) -> nn.Module:
    """The pretrained encoder at ``uri``, on the CPU, in eval mode: images (N, 1, 28, 28) in
    [0, 1] -> pooled features (N, feature_dim).

    ``uri``: ``models:/<name>@<alias>``, ``models:/<name>/<version>``, ``runs:/<run_id>/encoder``
    or the path of a ``moco_pretrain`` checkpoint. ``tracking_uri`` defaults to
    $MLFLOW_TRACKING_URI, else MLflow's default ``sqlite:///mlflow.db`` in the working folder.
    MLflow's process-wide tracking URI is left as it was.
    """
    encoder, _ = resolve_encoder(uri, tracking_uri=tracking_uri)
    return encoder


def resolve_encoder(
    uri: str = DEFAULT_ENCODER, tracking_uri: str | None = None, option: str = "--encoder"
) -> tuple[nn.Module, EncoderSource]:
    """Load the encoder at ``uri`` and say where it came from (see ``load_encoder``)."""
    uri = (uri or "").strip()
    if not uri:
        raise UserError(f"{option} is empty; pass {DEFAULT_ENCODER}, another models:/ or runs:/ URI, or a checkpoint")
    from fewshot import tracking  # mlflow is imported only when a URI needs it

    if tracking.is_mlflow_uri(uri):
        with tempfile.TemporaryDirectory() as tmp:
            fetched = tracking.fetch_model_files(uri, tmp, option=option, store_uri=tracking_uri)
            encoder, spec = load_model_dir(fetched.local_dir, label=f"{option} {uri}")
        kind = "registry" if fetched.version else ("run" if uri.startswith("runs:") else "logged_model")
        source = EncoderSource(
            uri=uri, kind=kind, arch=spec["arch"], width=int(spec.get("width", 0)), feature_dim=encoder.feature_dim,
            registered_name=fetched.registered_name, version=fetched.version, run_id=fetched.run_id,
        )  # fmt: skip
        return encoder, source
    path = Path(uri).expanduser()
    if path.is_dir():
        encoder, spec = load_model_dir(path, label=f"{option} {uri}")
        return encoder, EncoderSource(
            uri=str(path.resolve()), kind="model_dir", arch=spec["arch"], width=int(spec.get("width", 0)),
            feature_dim=encoder.feature_dim,
        )  # fmt: skip
    return load_checkpoint(path, option=option)


def _check_spec(spec: Any, label: str) -> dict[str, Any]:
    if not isinstance(spec, dict) or spec.get("kind") not in ENCODER_KINDS:
        kind = spec.get("kind") if isinstance(spec, dict) else None
        raise UserError(
            f"{label}: this model is {'a ' + repr(kind) if kind else 'not described'}, not an encoder; "
            "pass a model logged by moco_pretrain (spec kind 'encoder') or linear_eval (kind 'encoder_classifier')"
        )
    if spec.get("arch") not in ENCODERS:
        raise UserError(
            f"{label}: unknown encoder arch {spec.get('arch')!r}; this fewshot builds {', '.join(ENCODERS)}"
        )
    return spec


def build_from_state(arch: str, width: int, state: dict[str, torch.Tensor], label: str) -> nn.Module:
    """``build_encoder(arch, width)`` with ``state`` loaded strictly, in eval mode."""
    encoder = build_encoder(arch, int(width))
    try:
        encoder.load_state_dict(state, strict=True)
    except (RuntimeError, TypeError, AttributeError) as exc:
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise UserError(f"{label}: the weights do not fit a {arch} encoder of width {width} ({first})") from exc
    return encoder.eval()


def load_model_dir(model_dir: Path, label: str) -> tuple[nn.Module, dict[str, Any]]:
    """The encoder of a downloaded MLflow model folder, from its spec.json and weights.pt."""
    spec_path, weights_path = model_dir / "extra_files" / "spec.json", model_dir / "extra_files" / "weights.pt"
    if not spec_path.is_file() or not weights_path.is_file():
        raise UserError(
            f"{label}: the model has no extra_files/spec.json and weights.pt; it was not logged by this project's "
            "Tracker.log_torch_model"
        )
    try:
        spec = _check_spec(json.loads(spec_path.read_text()), label)
    except json.JSONDecodeError as exc:
        raise UserError(f"{label}: extra_files/spec.json is not valid JSON ({exc})") from exc
    state = _load_tensors(weights_path, label)
    if spec["kind"] == "encoder_classifier":
        prefix = "encoder."  # EncoderClassifier's state_dict: encoder.* and head.*
        state = (
            {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
            if isinstance(state, dict)
            else state
        )
    encoder = build_from_state(spec["arch"], spec.get("width", 32), state, label)
    # a classifier of linear_eval read the last map (or two) pooled to a grid; the encoder comes back plain
    grid, maps = int(spec.get("feature_grid", 1)), int(spec.get("feature_maps", 1))
    read = encoder.feature_dim * grid * grid if maps == 1 else with_feature_grid(encoder, grid, maps).feature_dim
    if "feature_dim" in spec and int(spec["feature_dim"]) != read:
        raise UserError(
            f"{label}: spec says feature_dim {spec['feature_dim']} (feature grid {grid}, {maps} map(s)), the "
            f"encoder gives {read}"
        )
    return encoder, spec


def _load_tensors(path: Path, label: str) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise UserError(
            f"{label}: {path.name} holds Python objects besides tensors; refused (weights-only loading never "
            "runs code from a file)"
        ) from exc
    except Exception as exc:  # torch raises many types for a file that is not a torch archive
        raise UserError(f"{label}: {path.name} cannot be read as a torch file; it is corrupt or truncated") from exc


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load_checkpoint(path: Path, option: str = "--encoder") -> tuple[nn.Module, EncoderSource]:
    """The encoder of a ``moco_pretrain`` checkpoint; anything else is refused with one line."""
    label = f"{option} {path}"
    if not path.is_file():
        raise UserError(
            f"{label}: no such file; pass {DEFAULT_ENCODER}, models:/<name>/<version>, runs:/<run_id>/encoder "
            "or the path of a moco_pretrain checkpoint"
        )
    payload = _load_tensors(path, label)
    not_ours = f"{label}: not a fewshot MoCo checkpoint (no 'format': '{MOCO_CHECKPOINT_FORMAT}'); pass a file written by moco_pretrain"
    if not isinstance(payload, dict) or payload.get("format") != MOCO_CHECKPOINT_FORMAT:
        raise UserError(not_ours)
    if payload.get("version") != MOCO_CHECKPOINT_VERSION:
        raise UserError(
            f"{label}: checkpoint format version {payload.get('version')!r}; this fewshot reads version {MOCO_CHECKPOINT_VERSION}"
        )
    spec, state = payload.get("encoder_spec"), payload.get("encoder_state")
    if not isinstance(spec, dict) or spec.get("arch") not in ENCODERS or not isinstance(state, dict):
        raise UserError(f"{label}: the checkpoint lacks a valid encoder_spec (arch, width) or encoder_state")
    width = int(spec.get("width", 32))
    encoder = build_from_state(spec["arch"], width, state, label)
    run_id = next((payload[k] for k in ("run_id", "mlflow_run_id") if isinstance(payload.get(k), str)), None)
    source = EncoderSource(
        uri=str(path.resolve()), kind="checkpoint", arch=spec["arch"], width=width, feature_dim=encoder.feature_dim,
        run_id=run_id, sha256=_sha256(path),
    )  # fmt: skip
    return encoder, source
