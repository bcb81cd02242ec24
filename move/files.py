"""Small files written so that a crash never leaves a half-written one behind."""

import json
import os
from pathlib import Path

from move.errors import DataError


def atomic_write_text(path, text: str) -> None:
    """Write to a temporary sibling, fsync, rename over `path` (atomic on POSIX)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_json(path, record) -> None:
    atomic_write_text(path, json.dumps(record, indent=2))


def read_manifest(directory, name: str, fmt: str, missing_hint: str) -> dict:
    """The JSON manifest `name` of a data directory, which must declare format `fmt`."""
    path = Path(directory) / name
    if not path.is_file():
        raise DataError(f"{directory}: {missing_hint} ({name} missing)")
    try:
        manifest = json.loads(path.read_text())
        if manifest.get("format") == fmt:
            return manifest
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        pass
    raise DataError(f"{path}: not a {fmt} manifest")
