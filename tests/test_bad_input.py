"""Bad input: one line naming the problem, exit status 2, nothing written.
docs/reliability.md lists these cases with the message each prints."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from .conftest import tiny_overrides, write_npz, write_shard

ROOT = Path(__file__).resolve().parents[1]


def setup_files(folder: Path, tiny_data: dict, trained_checkpoint: Path) -> None:
    (folder / "typo.yaml").write_text("train:\n  epoch: 3\n")
    (folder / "broken.yaml").write_text("train:\n  epochs: [3\n")
    (folder / "grids.yaml").write_text("grid: quick\ngrids:\n  quick: {datasets: [cifar10]}\n")
    data = trained_checkpoint.read_bytes()
    (folder / "truncated.pt").write_bytes(data[: len(data) // 2])
    (folder / "damaged.pt").write_bytes(flip_a_byte(trained_checkpoint))
    write_npz(folder / "intact.npz", 40)
    (folder / "damaged.npz").write_bytes(flip_a_byte(folder / "intact.npz"))
    from mrpf.io import load_checkpoint, save_checkpoint
    from mrpf.models import build_model

    state = load_checkpoint(trained_checkpoint)
    save_checkpoint(folder / "foreign.pt", state["arch"], build_model("resnet18_w8", 10, 32).state_dict())
    x = np.zeros((20, 32, 32), dtype=np.uint8)
    np.savez(folder / "shape.npz", x=x, y=np.zeros(20, dtype=np.int64))
    write_npz(folder / "labels.npz", 40)
    with np.load(folder / "labels.npz") as f:
        np.savez(folder / "labels.npz", x=f["x"], y=f["y"] + 5)
    (folder / "empty_folder").mkdir()
    np.savez(folder / "wide.npz", x=np.zeros((20, 16, 32, 3), dtype=np.uint8), y=np.zeros(20, dtype=np.int64))
    pixels, labels = np.zeros((4, 32, 32, 3), dtype=np.uint8), [0, 1, 2, 3]
    write_shard(folder / "nolabel.tar.gz", pixels, labels, {"odd000.png": _png()})
    write_shard(folder / "badlabel.tar.gz", pixels, labels, {"odd000.png": _png(), "odd000.cls": b"12"})
    write_shard(folder / "notimage.tar.gz", pixels, labels, {"odd000.jpg": b"not a jpeg", "odd000.cls": b"1"})


def flip_a_byte(path: Path) -> bytes:
    """``path``'s bytes with one byte flipped in the middle of its largest zip member (a
    checkpoint's largest tensor, an .npz's image array): what a bad disk sector does."""
    import struct
    import zipfile

    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as archive:
        member = max(archive.infolist(), key=lambda info: info.compress_size)
    name_length, extra_length = struct.unpack("<HH", data[member.header_offset + 26:member.header_offset + 30])
    data[member.header_offset + 30 + name_length + extra_length + member.compress_size // 2] ^= 0xFF
    return bytes(data)


def _png() -> bytes:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.zeros((32, 32, 3), dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


TRAIN = ["train", "--run", "x"]
CASES = [
    # (name, argv after `mrpf`, message)
    ("unknown dataset", TRAIN + ["data.dataset=mnist", "data.train_path=null"],
     "data.dataset: unknown dataset 'mnist'"),
    ("unknown architecture", TRAIN + ["model.arch=resnet99"], "model.arch: unknown architecture 'resnet99'"),
    ("unknown training method", TRAIN + ["train.method=fgsm_at"], "train.method: unknown value 'fgsm_at'"),
    ("unknown pruning method", ["prune", "--run", "x", "--checkpoint", "{ckpt}", "--method", "l2_norm"],
     "prune.method: unknown value 'l2_norm'"),
    ("sparsity above 1", ["prune", "--run", "x", "--checkpoint", "{ckpt}", "--sparsity", "1.5"],
     "prune.sparsity: must lie in (0, 1)"),
    ("sparsity 0", ["prune", "--run", "x", "--checkpoint", "{ckpt}", "--sparsity", "0"],
     "prune.sparsity: must lie in (0, 1)"),
    ("negative epochs", TRAIN + ["train.epochs=-1"], "train.epochs: expected a non-negative integer"),
    ("negative epsilon", TRAIN + ["attack.eps=-8/255"], "attack.eps: must be >= 0"),
    ("typo'd key in params.yaml", TRAIN + ["--params", "typo.yaml"], "unknown parameter 'train.epoch'"),
    ("malformed YAML", TRAIN + ["--params", "broken.yaml"], "broken.yaml: malformed YAML at line"),
    ("missing params file", TRAIN + ["--params", "nope.yaml"], "params file nope.yaml: no such file"),
    ("dataset missing offline", TRAIN + ["data.dataset=svhn", "data.train_path=null", "data.download=false",
                                         "data.root=dl"], "dataset 'svhn' not found under dl"),
    ("truncated checkpoint", ["evaluate", "--run", "x", "--checkpoint", "truncated.pt"], "unreadable or truncated"),
    ("checkpoint of another architecture", ["evaluate", "--run", "x", "--checkpoint", "foreign.pt"],
     "weights do not fit architecture"),
    ("missing checkpoint", ["prune", "--run", "x", "--checkpoint", "none.pt"], "checkpoint none.pt: no such file"),
    ("npz with wrong shapes", TRAIN + ["data.train_path=shape.npz"], "'x' must be uint8 of shape (N, H, W, 3)"),
    ("npz labels out of range", TRAIN + ["data.train_path=labels.npz"],
     "train split (labels.npz): labels reach 14, dataset 'cifar10' has 10 classes"),
    ("test images of another size", ["evaluate", "--run", "x", "--checkpoint", "{ckpt}", "data.test_path=wide.npz"],
     "test split (wide.npz): images are 16x32, dataset 'cifar10' expects 32x32"),
    ("no test images to evaluate", ["evaluate", "--run", "x", "--checkpoint", "{ckpt}", "evaluate.n_images=0"],
     "evaluate.n_images: expected a positive integer, got 0"),
    ("L2 step that cannot reach the radius", ["evaluate", "--run", "x", "--checkpoint", "{ckpt}", "attack.norm=l2",
                                              "attack.eps=0.5", "evaluate.step_size=2/255"],
     "evaluate.step_size=2/255: 3 steps of 0.007843 cannot reach the l2 radius attack.eps=0.5"),
    ("shard sample without a label", ["data", "--out", "out", "data.train_path=nolabel.tar.gz"],
     "nolabel.tar.gz: sample odd000 has no odd000.cls"),
    ("shard label out of range", ["data", "--out", "out", "data.train_path=badlabel.tar.gz"],
     "badlabel.tar.gz: odd000.cls: label 12 out of range [0, 10)"),
    ("shard member that is not an image", ["data", "--out", "out", "data.train_path=notimage.tar.gz"],
     "notimage.tar.gz: odd000.jpg: not a readable image"),
    ("empty ImageFolder", TRAIN + ["data.train_path=empty_folder"], "ImageFolder is empty"),
    ("CUDA where there is none", TRAIN + ["--device", "cuda"], "CUDA is not available"),
    ("calibration set larger than training set", TRAIN + ["data.calibration_size=100000"],
     "data.calibration_size=100000 is larger than the training split"),
    ("validation split takes everything", TRAIN + ["data.val_size=100000"], "data.val_size=100000 leaves no training"),
    ("unknown attack", ["evaluate", "--run", "x", "--checkpoint", "{ckpt}", "evaluate.attacks=[clean,deepfool]"],
     "evaluate.attacks: unknown attack(s) ['deepfool']"),
    ("r_max out of range", ["prune", "--run", "x", "--checkpoint", "{ckpt}", "prune.r_max=0"],
     "prune.r_max: must lie in (0, 1]"),
    ("unknown grid", TRAIN + ["--params", "grids.yaml", "grid=paper"], "grid: unknown grid 'paper'"),
    ("fraction that is not a number", TRAIN + ["attack.eps=eight"], "attack.eps: expected a number or a fraction"),
    ("unknown verb option", TRAIN + ["--epochs", "3"], "unrecognized arguments: --epochs"),
    ("override without a section", TRAIN + ["=3"], "override '=3': empty key"),
    ("radius in 1/255 units (train)", TRAIN + ["attack.eps=8"],
     "attack.eps: 8 is outside the pixel range [0, 1]; did you mean 8/255?"),
    ("radius in 1/255 units (mrs)", ["mrs", "--run", "x", "--checkpoint", "{ckpt}", "attack.eps=8"],
     "attack.eps: 8 is outside the pixel range [0, 1]; did you mean 8/255?"),
    ("radius in 1/255 units (prune)", ["prune", "--run", "x", "--checkpoint", "{ckpt}", "attack.eps=8"],
     "attack.eps: 8 is outside the pixel range [0, 1]; did you mean 8/255?"),
    ("radius in 1/255 units (evaluate)", ["evaluate", "--run", "x", "--checkpoint", "{ckpt}", "attack.eps=8"],
     "attack.eps: 8 is outside the pixel range [0, 1]; did you mean 8/255?"),
    ("L2 radius beyond the image", TRAIN + ["attack.norm=l2", "attack.eps=64"],
     "attack.eps: 64 is beyond the L2 diagonal of a 32x32 image in [0, 1] (55.4)"),
    ("no score-learning epochs", ["prune", "--run", "x", "--checkpoint", "{ckpt}", "--method", "hydra",
                                  "prune.score_epochs=0"], "prune.score_epochs: expected a positive integer, got 0"),
    ("unknown score ratios", ["prune", "--run", "x", "--checkpoint", "{ckpt}", "--method", "hydra",
                              "prune.score_ratios=taylor"], "prune.score_ratios: unknown value 'taylor'"),
    ("damaged checkpoint", ["evaluate", "--run", "x", "--checkpoint", "damaged.pt"],
     "checkpoint damaged.pt: damaged ("),
    ("damaged data file", TRAIN + ["data.train_path=damaged.npz"],
     "damaged.npz: damaged (Bad CRC-32 for file 'x.npy'); restore it with dvc checkout damaged.npz"),
    ("unreachable budget", ["prune", "--run", "x", "--checkpoint", "{ckpt}", "--sparsity", "0.95", "prune.r_max=0.2"],
     "out of reach: pruning every group to r_max=0.2"),
]


@pytest.fixture(scope="module")
def workdir(tiny_data, trained_checkpoint, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("bad")
    setup_files(folder, tiny_data, trained_checkpoint)
    return folder


def mrpf_in_process(argv: list[str], capsys) -> tuple[int, str]:
    """`mrpf ARGV` through the CLI's ``main`` in this process (a subprocess spends about 2 s
    importing torch per case); its exit status and standard error. The SIGTERM handler the CLI
    installs is put back afterwards."""
    import signal

    from mrpf.cli import main

    handler = signal.getsignal(signal.SIGTERM)
    capsys.readouterr()
    try:
        with pytest.raises(SystemExit) as stop:
            main(argv)
    finally:
        signal.signal(signal.SIGTERM, handler)
    return stop.value.code, capsys.readouterr().err


def case_argv(argv: list[str], tiny_data: dict, checkpoint: Path) -> list[str]:
    argv = [a.replace("{ckpt}", str(checkpoint)) for a in argv]
    overrides = [o for o in tiny_overrides(tiny_data) if not any(o.startswith(a.split("=")[0] + "=") for a in argv)]
    return [*argv, *overrides, "prune.steps=1"]


def assert_one_line(code: int, stderr: str, message: str) -> None:
    assert code == 2, (code, stderr)
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mrpf: error: "), stderr
    assert message in lines[0], lines[0]


@pytest.mark.parametrize("name, argv, message", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(workdir, tiny_data, trained_checkpoint, name, argv, message,
                                                         capsys, monkeypatch):
    monkeypatch.chdir(workdir)
    before = {p for p in workdir.rglob("*")}
    assert_one_line(*mrpf_in_process(case_argv(argv, tiny_data, trained_checkpoint), capsys), message)
    assert {p for p in workdir.rglob("*")} == before, "something was written"


@pytest.mark.parametrize("name", ["unknown verb option", "damaged checkpoint", "unreachable budget"])
def test_bad_input_through_python_m_mrpf_is_one_line_and_exit_2(workdir, tiny_data, trained_checkpoint, name):
    """The same through the entry point users run, for a parser, a loader and a budget error."""
    _, argv, message = next(c for c in CASES if c[0] == name)
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    before = {p for p in workdir.rglob("*")}
    done = subprocess.run([sys.executable, "-m", "mrpf", *case_argv(argv, tiny_data, trained_checkpoint)],
                          cwd=workdir, env=env, capture_output=True, text=True, timeout=300)
    assert_one_line(done.returncode, done.stderr, message)
    assert {p for p in workdir.rglob("*")} == before, "something was written"


def test_docs_list_every_case_with_its_message():
    """docs/reliability.md's table of messages names every case tested here, with its message."""
    doc = (ROOT / "docs" / "reliability.md").read_text()
    rows = {line.split("|")[1].strip(): line for line in doc.splitlines() if line.startswith("| ")}
    missing = [name for name, _, _ in CASES if name not in rows]
    assert not missing, f"cases missing from docs/reliability.md: {missing}"
    stale = [name for name, _, message in CASES if message not in rows[name]]
    assert not stale, f"docs/reliability.md shows another message for: {stale}"
