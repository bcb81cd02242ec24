"""Files and directories written so that a crash never leaves a half-written one
behind, and so that move never replaces what it did not create."""

import ctypes
import fcntl
import json
import os
import shutil
from pathlib import Path

from move.errors import DataError, DirectoryBusy, UserError
from move.readers import read_json

# Marker files: a directory holding one of these was written by move.
RUN_MARKERS = ("run.json",)  # a training run
DATA_MARKERS = ("manifest.json",)  # prepared text, knowledge or image-token data
EXPORT_MARKERS = ("modeling_move.py",)  # a Hugging Face export


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
        manifest = read_json(path, f"{fmt} manifest")
    except DataError as e:
        raise DataError(f"{e} (not a {fmt} manifest)") from None
    if isinstance(manifest, dict) and manifest.get("format") == fmt:
        return manifest
    raise DataError(f"{path}: not a {fmt} manifest")


def existing_data(out_dir, force: bool, recipe: dict, recorded, defaults: dict | None = None) -> dict | None:
    """What to do with the output directory of a data-preparing command: None = build
    it (absent, or --force, which may replace only move's own data); its manifest = it
    already holds data made with this recipe (keep it, nothing to do). Data made with
    another recipe is refused with a one-line error naming the first difference, so an
    experiment's set-up never trains on data prepared for something else.
    recorded(manifest) -> the recipe a manifest records. defaults: what an option the
    manifest lacks reads as (one added after the data was made: its default is what the
    data was made with, as new options keep old data bit for bit)."""
    out_dir = Path(out_dir)
    check_replaceable(out_dir, DATA_MARKERS, "prepared data")
    if force or not out_dir.exists():
        return None
    try:
        manifest = read_json(out_dir / DATA_MARKERS[0], "manifest")
        theirs = {**(defaults or {}), **recorded(manifest)}
    except (UserError, ValueError, KeyError, TypeError, AttributeError):
        raise DataError(
            f"{out_dir} already exists and its manifest is unreadable; pass --force to replace it"
        ) from None
    if theirs == recipe:
        return manifest
    differences = "; ".join(
        f"{k}: {theirs.get(k)!r}, not {recipe.get(k)!r}"
        for k in sorted(set(recipe) | set(theirs))
        if recipe.get(k) != theirs.get(k)
    )
    raise DataError(
        f"{out_dir} already holds data prepared with other options ({differences}); "
        f"pass --force to replace it or choose another --out"
    )


def check_replaceable(path, markers: tuple[str, ...], what: str) -> None:
    """--force may replace only move's own output: an existing non-empty directory
    without one of `markers` (or a file in the way) is refused with a one-line error."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UserError(f"{path} is a file, not {what}; choose another output path")
    if path.is_dir() and any(path.iterdir()) and not any((path / m).is_file() for m in markers):
        raise UserError(
            f"{path} exists and is not {what} written by move (no {' or '.join(markers)}); move replaces "
            f"only its own output: choose another path or remove it yourself"
        )


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def temporary_sibling(target) -> Path:
    """An empty directory next to `target` to build its replacement in. Leftovers of
    killed writers (.NAME.tmp-PID of a process that no longer runs) are removed."""
    target = Path(target)
    for stale in target.parent.glob(f".{target.name}.tmp-*") if target.parent.is_dir() else []:
        pid = stale.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not pid_alive(int(pid)):
            shutil.rmtree(stale, ignore_errors=True)
    tmp = target.parent / f".{target.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


_RENAME_EXCHANGE, _AT_FDCWD = 2, -100


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one atomic step (Linux renameat2); False where unsupported."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    result = renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    return result == 0


def replace_directory(built: Path, target: Path) -> None:
    """Put the finished directory `built` at `target`. An existing target is swapped
    out in one atomic step (renameat2 RENAME_EXCHANGE), then deleted: a kill at any
    moment leaves either the old or the new directory at `target`, never neither.
    Where the exchange is unsupported, the old one is renamed aside first (a kill
    between the two renames leaves it beside the target as .NAME.old-PID)."""
    built, target = Path(built), Path(target)
    if not target.exists():
        os.replace(built, target)
        return
    if _exchange(built, target):
        shutil.rmtree(built)  # now the old directory
        return
    aside = target.parent / f".{target.name}.old-{os.getpid()}"
    os.replace(target, aside)
    os.replace(built, target)
    shutil.rmtree(aside)


class DirectoryLock:
    """One writer per output directory: an advisory lock (flock) on the sibling file
    .NAME.lock, holding the owner's pid for the message. The kernel drops the lock
    when its process dies, so a killed run never leaves a stale lock behind."""

    def __init__(self, directory, what: str = "directory"):
        directory = Path(directory)
        directory.parent.mkdir(parents=True, exist_ok=True)
        self.path = directory.parent / f".{directory.name}.lock"
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = os.pread(self.fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(self.fd)
            raise DirectoryBusy(
                f"{directory} is being written by another move process (pid {owner}); "
                f"wait for it to finish or choose another {what}"
            ) from None
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, str(os.getpid()).encode(), 0)

    def release(self) -> None:
        if self.fd is not None:
            self.path.unlink(missing_ok=True)
            os.close(self.fd)  # closing drops the lock
            self.fd = None

    def __enter__(self) -> "DirectoryLock":
        return self

    def __exit__(self, *_exc) -> None:
        self.release()
