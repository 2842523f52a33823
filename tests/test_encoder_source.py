"""Every form of --encoder, and the one-line refusals (unknown names, foreign checkpoints)."""

from __future__ import annotations

import os
from pathlib import Path

import mlflow
import pytest
import torch
from click.testing import CliRunner

import fewshot
from entrypoints.linear_eval import main as linear_eval_command
from fewshot.encoder_source import resolve_encoder
from fewshot.errors import UserError
from fewshot.models import build_encoder
from tests.encoders import ENCODER_NAME, log_encoder, same_weights, tiny_encoder, write_checkpoint


@pytest.fixture
def registry(tracking_store: str) -> dict:
    """Two registered versions: v1 the champion (better score), v2 the challenger."""
    first, second = tiny_encoder(seed=1), tiny_encoder(seed=2)
    run1, v1, alias1 = log_encoder(first, score=0.9)
    run2, v2, alias2 = log_encoder(second, score=0.5)
    assert (str(v1), alias1, str(v2), alias2) == ("1", "champion", "2", "challenger")
    return {"encoders": {"1": first, "2": second}, "runs": {"1": run1, "2": run2}}


def test_registry_alias_is_the_default(registry: dict) -> None:
    encoder, source = resolve_encoder()  # models:/fewshot-moco-encoder@champion
    assert same_weights(encoder, registry["encoders"]["1"])
    assert not encoder.training and encoder.feature_dim == 32
    assert (source.kind, source.version, source.run_id) == ("registry", "1", registry["runs"]["1"])
    assert source.params()["encoder_uri"] == f"models:/{ENCODER_NAME}@champion"
    assert source.tags()["encoder_model"] == ENCODER_NAME


def test_registry_version_and_challenger(registry: dict) -> None:
    encoder, source = resolve_encoder(f"models:/{ENCODER_NAME}/2")
    assert same_weights(encoder, registry["encoders"]["2"]) and source.version == "2"
    _, challenger = resolve_encoder(f"models:/{ENCODER_NAME}@challenger")
    assert challenger.version == "2" and challenger.run_id == registry["runs"]["2"]


def test_run_uri_and_public_helper(registry: dict) -> None:
    run_id = registry["runs"]["2"]
    encoder, source = resolve_encoder(f"runs:/{run_id}/encoder")
    assert same_weights(encoder, registry["encoders"]["2"])
    assert (source.kind, source.run_id, source.version) == ("run", run_id, None)
    public = fewshot.load_encoder(f"runs:/{run_id}/encoder")
    assert same_weights(public, registry["encoders"]["2"])
    assert public(torch.rand(3, 1, 28, 28)).shape == (3, 32)


def test_checkpoint_file(tmp_path: Path) -> None:
    original = tiny_encoder(seed=3)
    path = write_checkpoint(tmp_path / "moco.pt", original, run_id="abc123")
    encoder, source = resolve_encoder(str(path))
    assert same_weights(encoder, original)
    assert source.kind == "checkpoint" and source.run_id == "abc123" and len(source.sha256) == 64
    assert source.uri == str(path.resolve())


@pytest.mark.parametrize(
    "uri, expected",
    [
        (f"models:/{ENCODER_NAME}@gold", ["alias gold not found", "@champion -> 1", "versions 1, 2"]),
        (f"models:/{ENCODER_NAME}/9", ["version=9", "not found", "versions 1, 2"]),
        ("models:/no-such-model@champion", ["no-such-model", "not found", f"registered models here: {ENCODER_NAME}"]),
        ("runs:/0123456789abcdef/encoder", ["Run with id=0123456789abcdef not found"]),
        ("models:/a/b/c", ["not a model URI", "models:/<name>@<alias>"]),
    ],
)
def test_unknown_model_version_alias_or_run(registry: dict, uri: str, expected: list[str]) -> None:
    with pytest.raises(UserError) as caught:
        resolve_encoder(uri)
    message = str(caught.value)
    assert message.startswith(f"--encoder {uri}: ") and "\n" not in message
    for text in expected:
        assert text in message


def test_empty_registry_says_what_to_do(tracking_store: str) -> None:
    with pytest.raises(UserError, match="no model is registered in this store yet.*moco_pretrain"):
        resolve_encoder()


def test_unknown_alias_on_the_command_line_leaves_no_run(
    registry: dict, synthetic_data_dir: Path, tracking_store: str
) -> None:
    args = ["--encoder", f"models:/{ENCODER_NAME}@gold", "--data-dir", str(synthetic_data_dir)]
    result = CliRunner().invoke(linear_eval_command, args)
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: --encoder models:/{ENCODER_NAME}@gold:")
    runs = mlflow.search_runs(search_all_experiments=True)
    assert set(runs["tags.job"]) == {"moco_pretrain"}  # only the two fake pretraining runs


class _RunsCode:
    """Unpickling this would create a directory: the proof that a loader executed code."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (str(self.marker),))


def _foreign_files(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    encoder = tiny_encoder()
    files = {}
    plain = tmp_path / "state_dict.pt"
    torch.save(encoder.state_dict(), plain)
    files["plain state_dict"] = (plain, "not a fewshot MoCo checkpoint")
    code = tmp_path / "code.pt"
    torch.save({"format": "fewshot-moco-checkpoint", "payload": _RunsCode(tmp_path / "pwned")}, code)
    files["pickled code"] = (code, "holds Python objects besides tensors; refused")
    whole = tmp_path / "module.pt"
    torch.save(encoder, whole)
    files["pickled module"] = (whole, "holds Python objects besides tensors; refused")
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(write_checkpoint(tmp_path / "ok.pt", encoder).read_bytes()[:500])
    files["truncated"] = (corrupt, "cannot be read as a torch file")
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    files["text file"] = (text, "cannot be read as a torch file")
    newer = write_checkpoint(tmp_path / "v2.pt", encoder, version=2)
    files["future version"] = (newer, "format version 2")
    wider = write_checkpoint(tmp_path / "wider.pt", build_encoder("digit", 16), width=WIDTH_LIE)
    files["weights of another width"] = (wider, "do not fit a digit encoder of width 8")
    files["missing"] = (tmp_path / "nothere.pt", "no such file")
    return files


WIDTH_LIE = 8  # the checkpoint claims width 8 but holds width-16 weights


@pytest.mark.parametrize(
    "case",
    ["plain state_dict", "pickled code", "pickled module", "truncated", "text file", "future version",
     "weights of another width", "missing"],
)  # fmt: skip
def test_foreign_checkpoints_are_refused_in_one_line(tmp_path: Path, case: str) -> None:
    path, expected = _foreign_files(tmp_path)[case]
    with pytest.raises(UserError) as caught:
        resolve_encoder(str(path))
    message = str(caught.value)
    assert expected in message and "\n" not in message and message.startswith(f"--encoder {path}")
    assert not (tmp_path / "pwned").exists()  # nothing was unpickled
