"""The repository's structure limits hold: scripts/check_structure.py exits 0 (module and function
sizes, no import cycle between fewshot modules, module docstrings, commented late imports)."""

from __future__ import annotations

import subprocess
import sys

from tests.conftest import PROJECT_ROOT

SCRIPT = PROJECT_ROOT / "scripts" / "check_structure.py"


def test_structure_check_passes() -> None:
    done = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True, timeout=120)
    offenders = [line for line in done.stdout.splitlines() if line.startswith("offender:")]
    assert done.returncode == 0, "\n".join(offenders) or done.stderr


def test_structure_check_names_offenders(tmp_path) -> None:
    """The check fails on a long module, a long function and an import cycle, and names each."""
    package = tmp_path / "fewshot"
    package.mkdir()
    (tmp_path / "entrypoints").mkdir()
    (package / "__init__.py").write_text('"""Package."""\n')
    body = "\n".join(f"    x{i} = {i}" for i in range(90))
    (package / "a.py").write_text(f'"""A."""\n\nfrom fewshot import b\n\n\ndef long():\n{body}\n' + "\n" * 420)
    (package / "b.py").write_text('"""B."""\n\nfrom fewshot import a\n')
    (package / "c.py").write_text("x = 1\n")
    copy = tmp_path / "scripts"
    copy.mkdir()
    (copy / "check_structure.py").write_text(SCRIPT.read_text())
    done = subprocess.run([sys.executable, str(copy / "check_structure.py")], capture_output=True, text=True,
                          timeout=120)  # fmt: skip
    assert done.returncode == 1
    assert "fewshot/a.py: 516 lines (limit 500)" in done.stdout
    assert "fewshot/a.py:6 long: 91 lines (limit 80)" in done.stdout
    assert "import cycle at import time: fewshot.a <-> fewshot.b" in done.stdout
    assert "fewshot/c.py: no module docstring" in done.stdout
