"""Checks for strings that become paths: names used as one folder name, and output folders.

A run name becomes ``<checkpoint dir>/<run name>/last.pt``: a name holding ``/`` or ``..``
would write outside the checkpoint folder. An output folder that cannot be created or written
should stop the command before any work, in one line naming the option.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from fewshot.errors import UserError

MAX_NAME = 200


def path_component(option: str, value: str) -> str:
    """``value`` if it is safe as a single folder name under the folder it belongs in."""
    problem = None
    if not value.strip():
        problem = "is empty"
    elif "/" in value or "\\" in value or os.sep in value:
        problem = "holds a path separator"
    elif value.strip(".") == "" or ".." in value:
        problem = "holds '..'"
    elif any(ord(c) < 32 for c in value):
        problem = "holds a control character"
    elif len(value) > MAX_NAME:
        problem = f"is longer than {MAX_NAME} characters"
    if problem is not None:
        raise UserError(
            f"{option} {value!r} {problem}: it names a folder inside the output folder; use letters, digits, "
            "spaces and - _ . (no / and no ..)"
        )
    return value


def writable_dir(option: str, value: str) -> str:
    """``value`` after making sure the folder exists (created if missing) and this user can write in it."""
    path = Path(value).expanduser()
    try:
        if path.exists() and not path.is_dir():
            raise UserError(f"{option} {value}: is a file, not a folder; pass a folder (it is created if missing)")
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".fewshot-write-check-"):
            pass
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise UserError(
            f"{option} {value}: cannot create or write this folder ({reason}); pass a folder this user can write"
        ) from exc
    return value
