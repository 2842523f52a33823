"""One source of truth for the interface: ``MLproject`` and ``conda.yaml`` are what
``scripts/gen_mlproject.py`` makes from the click commands and ``pyproject.toml``; MLflow's own
project loader turns each entry point's defaults into a command line that click parses to the
command's own defaults, every option reachable with ``-P``; and the boolean options take
``true``/``false`` as MLflow passes them."""

from __future__ import annotations

import importlib.util
import shlex
from pathlib import Path

import click
import pytest
import tomllib
import yaml
from mlflow.projects import _project_spec

from tests.conftest import PROJECT_ROOT

MLFLOW_TYPES = {"string", "float", "path", "uri"}  # the parameter types MLflow Projects document


def _generator():
    spec = importlib.util.spec_from_file_location("gen_mlproject", PROJECT_ROOT / "scripts" / "gen_mlproject.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


GEN = _generator()
COMMANDS = GEN.entry_points()


def test_committed_files_are_what_the_generator_makes() -> None:
    for path, text in GEN.generated().items():
        assert path.read_text() == text, f"{path.name} drifted from the click commands; run make mlproject"


def test_conda_env_lists_exactly_the_pyproject_dependencies() -> None:
    project = tomllib.loads((PROJECT_ROOT / "pyproject.toml").read_text())["project"]
    conda = yaml.safe_load((PROJECT_ROOT / "conda.yaml").read_text())
    pip = next(d["pip"] for d in conda["dependencies"] if isinstance(d, dict))
    assert pip == project["dependencies"]


def _parse(command: click.Command, line: str, name: str) -> dict:
    words = shlex.split(line)
    assert words[:3] == ["python", "-m", f"entrypoints.{name}"], words[:3]
    with command.make_context(name, words[3:]) as ctx:
        return dict(ctx.params)


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_mlflow_defaults_parse_to_the_cli_defaults(name: str, tmp_path: Path) -> None:
    command = COMMANDS[name]
    project = _project_spec.load_project(str(PROJECT_ROOT))
    entry = project.get_entry_point(name)
    options = GEN.exposed_options(command)
    assert set(entry.parameters) == {GEN.parameter_name(o) for o in options}, "an option has no -P parameter"
    assert {p.type for p in entry.parameters.values()} <= MLFLOW_TYPES
    with command.make_context(name, []) as ctx:
        cli_defaults = dict(ctx.params)
    assert _parse(command, entry.compute_command({}, str(tmp_path)), name) == cli_defaults


def test_known_drift_is_gone() -> None:
    project = _project_spec.load_project(str(PROJECT_ROOT))
    assert str(project.get_entry_point("linear_eval").parameters["batch_size"].default) == "75"
    assert project.get_entry_point("moco_pretrain").parameters["register"].default == "false"
    for name in COMMANDS:
        assert "device" in project.get_entry_point(name).parameters or name == "report", name


def test_a_parameter_given_with_P_reaches_the_option(tmp_path: Path) -> None:
    project = _project_spec.load_project(str(PROJECT_ROOT))
    entry = project.get_entry_point("moco_pretrain")
    line = entry.compute_command({"mlp": "false", "width": "8", "run_name": "my run", "device": "cpu"}, str(tmp_path))
    params = _parse(COMMANDS["moco_pretrain"], line, "moco_pretrain")
    assert (params["mlp"], params["width"], params["run_name"], params["device"]) == (False, 8, "my run", "cpu")


@pytest.mark.parametrize(
    ("args", "expected"),
    [([], True), (["--mlp"], True), (["--mlp", "false"], False), (["--mlp", "true"], True), (["--no-mlp"], False),
     (["--no-mlp", "--mlp", "true"], False), (["--mlp", "--width", "8"], True)],
)  # fmt: skip
def test_bool_options_take_true_false_a_bare_flag_and_no(args: list[str], expected: bool) -> None:
    with COMMANDS["moco_pretrain"].make_context("moco_pretrain", args) as ctx:
        assert ctx.params["mlp"] is expected
