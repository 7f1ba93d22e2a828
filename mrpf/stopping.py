"""Stopping on SIGTERM, what SLURM and most schedulers send some seconds before SIGKILL.

Inside a ``deferred()`` section (the batch loops of training and score learning) SIGTERM
only sets a flag; the loop checks ``requested()`` at the next batch boundary, saves a resume
point there (training: mid-epoch, bit-identical on resume) and raises ``Stopped``. Anywhere
else (MRS, evaluation, the report) the signal raises ``Stopped`` at once: every output is
written atomically, so nothing half-written stays, and the rerun starts from the last resume
point. The CLI prints ``Stopped`` as one line and exits with ``STOPPED_STATUS``.
"""

from __future__ import annotations

import contextlib
import signal
from typing import Iterator

STOPPED_STATUS = 75   # EX_TEMPFAIL (sysexits.h): stopped on request; the same command resumes


class Stopped(Exception):
    """The run stopped on SIGTERM; the message says where the same command resumes."""


_state = {"requested": False, "deferred": 0}


def _handler(signum, frame) -> None:
    _state["requested"] = True
    if not _state["deferred"]:
        raise Stopped("stopped by SIGTERM; nothing half-written was kept, and the same command resumes from the "
                      "last completed epoch or step")


def install() -> None:
    """Handle SIGTERM as described above (the CLI calls this once)."""
    _state["requested"] = False
    signal.signal(signal.SIGTERM, _handler)


def requested() -> bool:
    """Whether SIGTERM arrived: a deferred loop stops at its next batch boundary."""
    return _state["requested"]


@contextlib.contextmanager
def deferred() -> Iterator[None]:
    """A section in which SIGTERM waits for the next ``requested()`` check."""
    _state["deferred"] += 1
    try:
        yield
    finally:
        _state["deferred"] -= 1
