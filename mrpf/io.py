"""Atomic file output and the checkpoint format.

Every output is written to a temporary name in the same directory and renamed into
place, so a killed job never leaves a file that looks finished. Checkpoints hold only
tensors and plain Python values and are read with ``torch.load(weights_only=True)``:
no pickled code from a file is ever executed.

Faults (docs/reliability.md): a full disk while writing is one line naming the file, the
previous complete file kept and no temporary left; a checkpoint damaged on disk (a flipped
byte fails its zip CRC) is refused with the way to restore it, never loaded silently.
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import os
import pickle
import tempfile
import zipfile
from pathlib import Path
from typing import Any, Iterator

import torch

from .errors import MrpfError

CHECKPOINT_FORMAT = "mrpf-checkpoint/1"


def _default_mode() -> int:
    """0666 less the umask: what a plain ``open(path, "w")`` would give (mkstemp makes 0600)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


_crash_counts: dict[str, int] = {}


def crash_point(name: str) -> None:
    """Fault injection for the kill-safety tests (tests/test_kill.py, tests/test_faults.py): with
    ``MRPF_CRASH_AT=NAME:N`` the process SIGKILLs itself the N-th time it reaches ``NAME`` (a
    file about to be renamed into place, or ``batch``); ``MRPF_SIGTERM_AT=NAME:N`` sends it
    SIGTERM instead, as a scheduler does. Does nothing otherwise."""
    import signal

    for variable, sig in (("MRPF_CRASH_AT", signal.SIGKILL), ("MRPF_SIGTERM_AT", signal.SIGTERM)):
        spec = os.environ.get(variable)
        if not spec:
            continue
        target, _, nth = spec.rpartition(":")
        if target != name:
            continue
        key = f"{variable}:{name}"
        _crash_counts[key] = _crash_counts.get(key, 0) + 1
        if _crash_counts[key] == int(nth):
            os.kill(os.getpid(), sig)


def remove_stale_temporaries(folder: str | os.PathLike) -> None:
    """Delete temporary files a killed writer left in ``folder`` (``.NAME.*.tmp``)."""
    folder = Path(folder)
    if folder.is_dir():
        for tmp in folder.glob(".*.tmp"):
            tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it onto ``path`` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = None
    try:
        try:
            fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
            os.close(fd)
            tmp = Path(name)
            yield tmp
            with open(tmp, "rb") as f:  # the bytes reach the disk before the name does
                os.fsync(f.fileno())
        except OSError as e:
            if e.errno in (errno.ENOSPC, errno.EDQUOT):
                raise MrpfError(f"no space left on the device writing {path}") from None
            raise
        crash_point(path.name)
        os.chmod(tmp, _default_mode())
        os.replace(tmp, path)
    finally:
        if tmp is not None:
            tmp.unlink(missing_ok=True)


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as indented JSON, atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def read_json(path: str | os.PathLike) -> Any:
    path = Path(path)
    if not path.is_file():
        raise MrpfError(f"{path}: no such file")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise MrpfError(f"{path}: not valid JSON ({e})") from None


def save_checkpoint(path: str | os.PathLike, arch: dict, state_dict: dict, **extra: Any) -> None:
    """Save weights plus the architecture description that rebuilds the model, atomically."""
    payload = {"format": CHECKPOINT_FORMAT, "arch": arch,
               "state_dict": {k: v.detach().cpu() for k, v in state_dict.items()}, **extra}
    # serialised in memory first: torch's file writer reports a full disk as "unexpected pos",
    # a plain write as ENOSPC (and the archive's inner name no longer depends on the temp name)
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    with atomic_path(path) as tmp:
        tmp.write_bytes(buffer.getbuffer())


def load_checkpoint(path: str | os.PathLike) -> dict:
    """Load a checkpoint with ``weights_only=True``; any unreadable or foreign file is a clear error."""
    path = Path(path)
    if not path.is_file():
        raise MrpfError(f"checkpoint {path}: no such file")
    try:   # torch.load checks no CRC: a flipped byte in a tensor would load as a wrong weight
        with zipfile.ZipFile(path) as archive:
            damaged = archive.testzip()
    except (zipfile.BadZipFile, OSError):
        damaged = None    # not a zip archive, or truncated: torch.load below says which
    if damaged is not None:
        raise MrpfError(f"checkpoint {path}: damaged ({damaged.split('/', 1)[-1]} fails its CRC check); restore it "
                        f"with dvc checkout {path} (or dvc pull), or delete it and rerun the stage that wrote it")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise MrpfError(f"checkpoint {path}: refused, it holds more than weights "
                        f"(weights_only load failed: {first})") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise MrpfError(f"checkpoint {path}: unreadable or truncated ({first})") from None
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise MrpfError(f"checkpoint {path}: not an mrpf checkpoint (expected format {CHECKPOINT_FORMAT})")
    return payload
