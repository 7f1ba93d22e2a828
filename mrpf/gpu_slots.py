"""One GPU per job: a lock-file slot pool.

Local Snakemake limits how many ``gpu=1`` jobs run at once (``--resources gpu=4``) but
tells no job *which* GPU to use, so every job would land on GPU 0. Each ``mrpf`` job
therefore claims a free slot before CUDA starts: one lock file per visible device, held
with ``fcntl.flock`` for the life of the process. The kernel drops the lock when the
process ends in any way (including SIGKILL), so a killed job frees its slot.

- The visible devices are ``CUDA_VISIBLE_DEVICES`` when set (SLURM sets it to the job's
  allocation, so there the pool is just that allocation), else ``0..n-1``.
- The claimed device becomes the only visible one (``CUDA_VISIBLE_DEVICES=<id>``).
- Lock files are keyed by the device id, in ``MRPF_GPU_LOCK_DIR`` (default
  ``/tmp/mrpf-gpu-slots-<uid>``), so concurrent Snakemake runs on one machine share them.
- ``MRPF_FAKE_GPUS=N`` pretends there are N devices (tests on machines without GPUs).

Hand-written because no maintained library does this for local Snakemake; the
``snakemake-executor-plugin-slurm`` covers the cluster side.
"""

from __future__ import annotations

import fcntl
import os
import time
from pathlib import Path

_held: dict[str, int] = {}   # device id -> open file descriptor of its lock (kept for the process' life)


def lock_dir() -> Path:
    return Path(os.environ.get("MRPF_GPU_LOCK_DIR") or f"/tmp/mrpf-gpu-slots-{os.getuid()}")


def visible_devices(count: int | None = None) -> list[str]:
    """Device ids this process may use: CUDA_VISIBLE_DEVICES entries, else 0..count-1."""
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None and env.strip():
        return [d.strip() for d in env.split(",") if d.strip()]
    if count is None:
        fake = os.environ.get("MRPF_FAKE_GPUS")
        if fake:
            count = int(fake)
        else:
            import torch

            count = torch.cuda.device_count()
    return [str(i) for i in range(count)]


def _try_lock(device: str) -> int | None:
    folder = lock_dir()
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder / f"gpu-{device.replace('/', '_')}.lock", os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    return fd


def claim(devices: list[str] | None = None, wait_s: float = 24 * 3600, poll_s: float = 0.2, log=None) -> str | None:
    """Claim a free device (first free one in order), make it the only visible one and
    return its id; None when there is no device. Waits while all are held."""
    if _held:
        return next(iter(_held))
    devices = visible_devices() if devices is None else devices
    if not devices:
        return None
    deadline = time.monotonic() + wait_s
    waited = False
    while True:
        for device in devices:
            fd = _try_lock(device)
            if fd is not None:
                _held[device] = fd
                os.environ["CUDA_VISIBLE_DEVICES"] = device
                if log and (waited or len(devices) > 1):
                    log(f"GPU slot: device {device} (of {','.join(devices)})")
                return device
        if time.monotonic() > deadline:
            from .errors import MrpfError

            raise MrpfError(f"no free GPU slot among {','.join(devices)} after {wait_s:.0f}s "
                            f"(locks in {lock_dir()})")
        if not waited and log:
            log(f"all GPU slots ({','.join(devices)}) are held; waiting")
        waited = True
        time.sleep(poll_s)


def release() -> None:
    """Give back the slot this process holds (also happens when the process ends)."""
    for fd in _held.values():
        os.close(fd)
    _held.clear()


if __name__ == "__main__":  # `python -m mrpf.gpu_slots SECONDS`: claim, print the id, hold (tests)
    import sys

    held = claim()
    print(held, flush=True)
    time.sleep(float(sys.argv[1]) if len(sys.argv) > 1 else 0)
