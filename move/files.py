"""Small files written so that a crash never leaves a half-written one behind."""

import json
import os
from pathlib import Path


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
