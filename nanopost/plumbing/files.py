"""Plain file helpers: read a JSON object with errors that name the file, write a file atomically.

Nothing here knows about models or runs; checkpoints, metrics, configs and curriculum state all
write through `write_atomic`, so a crash never leaves half a file behind.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path


def read_json(path: Path) -> dict:
    """The JSON object in `path`; a missing file, invalid JSON or another JSON value is an error
    that names the file (and the line, for invalid JSON)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: file not found")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{e.lineno}: invalid JSON ({e.msg})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def write_atomic(path: Path, write) -> None:
    """Write via a temp file in the same directory and rename, so a crash never leaves half a file.

    `write(tmp)` writes the whole content to the temporary path it is given."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
