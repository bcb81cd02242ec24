"""Progress bars for the commands a user waits on.

Evaluation, sampling and data preparation run both inside training (where the
trainer's own bar is the only one wanted) and as commands of their own (where a
silent minute looks like a hang). So the library code asks `progress(...)` for
its loops, and the bars appear only inside `with shown():`, which the commands
open. tqdm also stays silent when stderr is not a terminal (disable=None)."""

import contextlib
from contextvars import ContextVar

from tqdm import tqdm

_shown: ContextVar[bool] = ContextVar("move_progress_shown", default=False)


@contextlib.contextmanager
def shown():
    """Show the progress bars of the library loops run inside this block."""
    token = _shown.set(True)
    try:
        yield
    finally:
        _shown.reset(token)


def progress_shown() -> bool:
    return _shown.get()


def progress(iterable=None, desc: str = "", total: int | None = None, unit: str = "it"):
    """tqdm over `iterable`, displayed only inside shown() and on a terminal."""
    return tqdm(
        iterable,
        desc=desc,
        total=total,
        unit=unit,
        leave=False,
        dynamic_ncols=True,
        disable=None if progress_shown() else True,
    )
