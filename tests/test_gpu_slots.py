"""The GPU slot pool (mrpf/gpu_slots.py) with simulated GPUs: distinct slots for
concurrent jobs, a killed job's slot freed, never one slot held twice."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from mrpf.config import DeviceParams

ROOT = Path(__file__).resolve().parents[1]


def holder(lock_dir: Path, gpus: int, seconds: float, visible: str | None = None) -> subprocess.Popen:
    env = dict(os.environ, MRPF_GPU_LOCK_DIR=str(lock_dir), MRPF_FAKE_GPUS=str(gpus), PYTHONPATH=str(ROOT))
    env.pop("CUDA_VISIBLE_DEVICES", None)
    if visible is not None:
        env["CUDA_VISIBLE_DEVICES"] = visible
    return subprocess.Popen([sys.executable, "-m", "mrpf.gpu_slots", str(seconds)], env=env, stdout=subprocess.PIPE,
                            text=True)


def test_concurrent_jobs_hold_distinct_slots_and_a_killed_job_frees_its_slot(tmp_path):
    jobs = [holder(tmp_path, 4, 30) for _ in range(4)]
    slots = [p.stdout.readline().strip() for p in jobs]
    assert sorted(slots) == ["0", "1", "2", "3"]
    victim = slots.index("2")
    jobs[victim].send_signal(signal.SIGKILL)
    jobs[victim].wait()
    newcomer = holder(tmp_path, 4, 0)
    assert newcomer.stdout.readline().strip() == "2"
    newcomer.wait()
    for p in jobs:
        p.kill()
        p.wait()


def test_existing_cuda_visible_devices_is_the_pool(tmp_path):
    jobs = [holder(tmp_path, 8, 10, visible="5,7") for _ in range(2)]
    assert sorted(p.stdout.readline().strip() for p in jobs) == ["5", "7"]
    for p in jobs:
        p.kill()
        p.wait()


def test_eight_claimants_on_four_slots_never_share_one(tmp_path):
    """Each claimant logs when it got and left its slot; no two intervals on one slot overlap."""
    script = ("import sys, time; from mrpf import gpu_slots as g; s = g.claim(poll_s=0.05); t0 = time.time(); "
              "time.sleep(0.4); t1 = time.time(); print(s, t0, t1, flush=True)")
    env = dict(os.environ, MRPF_GPU_LOCK_DIR=str(tmp_path), MRPF_FAKE_GPUS="4", PYTHONPATH=str(ROOT))
    env.pop("CUDA_VISIBLE_DEVICES", None)
    procs = [subprocess.Popen([sys.executable, "-c", script], env=env, stdout=subprocess.PIPE, text=True)
             for _ in range(8)]
    rows = [p.communicate(timeout=60)[0].split() for p in procs]
    assert all(p.returncode == 0 for p in procs)
    by_slot: dict[str, list] = {}
    for slot, start, end in rows:
        by_slot.setdefault(slot, []).append((float(start), float(end)))
    assert set(by_slot) <= {"0", "1", "2", "3"}
    for intervals in by_slot.values():
        intervals.sort()
        for (_, end), (start, _) in zip(intervals, intervals[1:]):
            assert start >= end, f"slot handed out twice: {intervals}"


def test_setup_claims_a_slot_only_for_gpu_devices(tmp_path, monkeypatch):
    from mrpf import devices, gpu_slots

    monkeypatch.setenv("MRPF_GPU_LOCK_DIR", str(tmp_path))
    monkeypatch.setenv("MRPF_FAKE_GPUS", "2")
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    try:
        devices.setup(DeviceParams(name="cpu", channels_last=True, bf16=False))
        assert not gpu_slots._held
        devices.setup(DeviceParams(name="auto", channels_last=True, bf16=False))
        assert list(gpu_slots._held) == ["0"] and os.environ["CUDA_VISIBLE_DEVICES"] == "0"
    finally:
        gpu_slots.release()
