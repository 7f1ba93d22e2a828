import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.datasets as tvd
from PIL import Image

from mrpf import data
from mrpf.config import load_params
from mrpf.errors import MrpfError

from .conftest import make_images, write_npz, write_shard

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def params_for(**data_keys):
    """The data section of the default params with ``data_keys`` set."""
    return load_params(None, [f"data.{k}={v}" for k, v in data_keys.items()]).data


def test_npz_reader_gives_nchw_uint8(tmp_path):
    path = write_npz(tmp_path / "d.npz", 30)
    images = data.read_npz(path)
    assert images.x.shape == (30, 3, 32, 32) and images.x.dtype == torch.uint8
    x, y = make_images(30, seed=0)
    assert torch.equal(images.x[5], torch.from_numpy(x[5]).permute(2, 0, 1))
    assert images.y.tolist() == y.tolist()
    assert images.classes[0] == "class0"


@pytest.mark.parametrize("x, y, message", [
    (np.zeros((4, 32, 32), np.uint8), np.zeros(4, np.int64), "must be uint8 of shape"),
    (np.zeros((4, 32, 32, 3), np.float32), np.zeros(4, np.int64), "must be uint8 of shape"),
    (np.zeros((4, 32, 32, 3), np.uint8), np.zeros(5, np.int64), "'y' must be integers of shape"),
    (np.zeros((4, 32, 32, 3), np.uint8), np.array([0, 1, 2, -1]), "labels must lie in"),
])
def test_npz_reader_rejects_bad_arrays(tmp_path, x, y, message):
    path = tmp_path / "bad.npz"
    np.savez(path, x=x, y=y)
    with pytest.raises(MrpfError, match=message):
        data.read_npz(path)


def test_npz_labels_beyond_class_names(tmp_path):
    path = tmp_path / "bad.npz"
    np.savez(path, x=np.zeros((2, 32, 32, 3), np.uint8), y=np.array([0, 3]), classes=np.array(["a", "b"]))
    with pytest.raises(MrpfError, match=r"labels must lie in \[0, 2\)"):
        data.read_npz(path)


def _write_folder(root, classes=3, per_class=4, size=32):
    for c in range(classes):
        (root / f"c{c}").mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(np.full((size, size, 3), 40 * c + i, np.uint8)).save(root / f"c{c}" / f"{i}.png")


def test_image_folder_layout(tmp_path):
    _write_folder(tmp_path / "train", size=40)
    images = data.read_image_folder(tmp_path / "train", 32)
    assert images.x.shape == (12, 3, 32, 32)  # resized to the dataset's input size
    assert images.classes == ["c0", "c1", "c2"]
    assert images.y.tolist() == [0] * 4 + [1] * 4 + [2] * 4


def test_empty_image_folder_is_a_clear_error(tmp_path):
    (tmp_path / "empty" / "cls").mkdir(parents=True)
    with pytest.raises(MrpfError, match="ImageFolder is empty"):
        data.read_image_folder(tmp_path / "empty", 32)


def test_cifar10_torchvision_layout(tmp_path, monkeypatch):
    base = tmp_path / "cifar-10-batches-py"
    base.mkdir()
    x, y = make_images(20)
    flat = x.transpose(0, 3, 1, 2).reshape(20, -1)
    for name in ["data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5", "test_batch"]:
        with open(base / name, "wb") as f:
            pickle.dump({"data": flat, "labels": y.tolist()}, f)
    with open(base / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [f"n{i}" for i in range(10)]}, f)
    import torchvision.datasets.cifar as tv_cifar

    monkeypatch.setattr(tv_cifar, "check_integrity", lambda *a, **k: True)  # our files have other md5 sums
    images = data.read_source(params_for(root=str(tmp_path), download=False), "train")
    assert images.x.shape == (100, 3, 32, 32)
    assert torch.equal(images.x[3], torch.from_numpy(x[3]).permute(2, 0, 1))
    assert images.classes[2] == "n2"


def test_svhn_torchvision_layout(tmp_path, monkeypatch):
    from scipy.io import savemat

    x, y = make_images(12)
    y_mat = np.where(y == 0, 10, y)[:, None]  # SVHN stores digit 0 as label 10
    savemat(tmp_path / "test_32x32.mat", {"X": x.transpose(1, 2, 3, 0), "y": y_mat})
    monkeypatch.setattr(tvd.SVHN, "_check_integrity", lambda self: True)
    images = data.read_source(params_for(dataset="svhn", root=str(tmp_path), download=False), "test")
    assert images.x.shape == (12, 3, 32, 32)
    assert images.y.tolist() == y.tolist()


def test_tiny_imagenet_layout(tmp_path):
    tiny = tmp_path / "tiny-imagenet-200"
    wnids = ["n001", "n002"]
    (tiny / "val" / "images").mkdir(parents=True)
    (tiny / "wnids.txt").write_text("\n".join(wnids) + "\n")
    for k, w in enumerate(wnids):
        (tiny / "train" / w / "images").mkdir(parents=True)
        for i in range(3):
            image = Image.fromarray(np.full((64, 64, 3), 100 * k, np.uint8))
            image.save(tiny / "train" / w / "images" / f"{w}_{i}.JPEG")
    lines = []
    for i in range(4):
        Image.fromarray(np.full((64, 64, 3), 100 * (i % 2), np.uint8)).save(tiny / "val" / "images" / f"val_{i}.JPEG")
        lines.append(f"val_{i}.JPEG\t{wnids[i % 2]}\t0\t0\t63\t63")
    (tiny / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    params = params_for(dataset="tinyimagenet", root=str(tmp_path), download=False)
    train = data.read_source(params, "train")
    test = data.read_source(params, "test")
    assert train.x.shape == (6, 3, 64, 64) and train.y.tolist() == [0, 0, 0, 1, 1, 1]
    assert test.y.tolist() == [0, 1, 0, 1]
    assert abs(int(test.x[1].float().mean()) - 100) <= 2   # JPEG of a flat 100-valued image
    assert data.read_source(params, "train").y.tolist() == train.y.tolist()  # second read from the cache


@pytest.mark.parametrize("dataset", ["cifar10", "cifar100", "svhn", "tinyimagenet"])
def test_missing_dataset_says_what_where_and_how(tmp_path, dataset):
    with pytest.raises(MrpfError) as err:
        data.read_source(params_for(dataset=dataset, root=str(tmp_path / "nowhere"), download=False), "train")
    message = str(err.value)
    assert dataset in message and "nowhere" in message and "data.train_path" in message


def test_splits_are_fixed_disjoint_and_seed_independent(tiny_data):
    a = data.load_splits(load_params(None, [f"data.train_path={tiny_data['train']}", "data.val_size=100",
                                            "data.calibration_size=50", "seed=1"]).data, with_test=False)
    b = data.load_splits(load_params(None, [f"data.train_path={tiny_data['train']}", "data.val_size=100",
                                            "data.calibration_size=50", "seed=2"]).data, with_test=False)
    assert len(a.train) == 500 and len(a.val) == 100 and len(a.calibration) == 50
    assert torch.equal(a.val.x, b.val.x) and torch.equal(a.calibration.x, b.calibration.x)
    train_rows = {bytes(t.numpy()) for t in a.train.x}
    assert not any(bytes(v.numpy()) in train_rows for v in a.val.x[:20])      # validation held out
    assert all(bytes(c.numpy()) in train_rows for c in a.calibration.x[:20])  # calibration from train


def test_calibration_larger_than_training_set_is_refused(tiny_data):
    params = load_params(None, [f"data.train_path={tiny_data['train']}", "data.val_size=100",
                                "data.calibration_size=501"])
    with pytest.raises(MrpfError, match="calibration_size=501 is larger than the training split"):
        data.load_splits(params.data, with_test=False)


def test_augmentation_crops_and_flips_like_torchvision():
    x = torch.arange(2 * 3 * 8 * 8, dtype=torch.uint8).view(2, 3, 8, 8)
    gen = torch.Generator().manual_seed(0)
    out = data.augment_batch(x, padding=2, flip=True, generator=gen)
    assert out.shape == x.shape and out.dtype == torch.uint8
    for i in range(2):  # each output is some shifted window of the zero-padded input, maybe mirrored
        padded = torch.nn.functional.pad(x[i], (2, 2, 2, 2))
        windows = [padded[:, dy:dy + 8, dx:dx + 8] for dy in range(5) for dx in range(5)]
        assert any(torch.equal(out[i], w) or torch.equal(out[i], w.flip(2)) for w in windows)
    again = data.augment_batch(x, padding=2, flip=True, generator=torch.Generator().manual_seed(0))
    assert torch.equal(out, again)


def test_batches_scale_to_unit_range_and_cover_every_image(tiny_data):
    images = data.read_npz(tiny_data["test"])
    seen = []
    for x, y in data.Batches(images, 64, torch.device("cpu"), shuffle=True, seed=3):
        assert x.dtype == torch.float32 and 0 <= x.min() and x.max() <= 1
        seen.append(y)
    assert sorted(torch.cat(seen).tolist()) == sorted(images.y.tolist())


def test_mrpf_data_writes_the_splits_from_an_offline_copy(tmp_path):
    import shutil
    import subprocess
    import sys

    offline = tmp_path / "offline"
    offline.mkdir()
    write_npz(offline / "cifar10-subset-train.npz", 120, seed=1)
    write_npz(offline / "cifar10-subset-test.npz", 40, seed=2)
    done = subprocess.run([sys.executable, "-m", "mrpf", "data", "--out", "data/cifar10",
                           f"data.offline_dir={offline}"], cwd=tmp_path, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    for split, n in (("train", 120), ("test", 40)):
        with np.load(tmp_path / "data" / "cifar10" / f"{split}.npz") as written, \
                np.load(offline / f"cifar10-subset-{split}.npz") as source:
            assert written["x"].shape == (n, 32, 32, 3)
            assert np.array_equal(written["x"], source["x"]) and np.array_equal(written["y"], source["y"])
    shutil.rmtree(tmp_path / "data")
    done = subprocess.run([sys.executable, "-m", "mrpf", "data", "--out", "data/svhn", "data.dataset=svhn",
                           f"data.offline_dir={offline}", "data.download=false", f"data.root={tmp_path / 'dl'}"],
                          cwd=tmp_path, capture_output=True, text=True)
    assert done.returncode == 2 and "dataset 'svhn' not found" in done.stderr
    assert not (tmp_path / "data" / "svhn" / "train.npz").exists()


def test_shards_by_path_glob_or_list_give_every_image_in_shard_order(tmp_path):
    x, y = make_images(30, seed=4)
    write_shard(tmp_path / "part-000000.tar.gz", x[:20], y[:20])
    write_shard(tmp_path / "part-000001.tar.gz", x[20:], y[20:])
    expected = torch.from_numpy(x).permute(0, 3, 1, 2)
    spec = data.DATASETS["cifar10"]
    for source in (str(tmp_path / "part-*.tar.gz"),
                   (str(tmp_path / "part-000000.tar.gz"), str(tmp_path / "part-000001.tar.gz"))):
        images = data.read_source(params_for(train_path=source if isinstance(source, str) else
                                             "[" + ",".join(source) + "]"), "train")
        assert torch.equal(images.x, expected) and images.y.tolist() == y.tolist()
    one = data.read_shards([tmp_path / "part-000001.tar.gz"], spec)
    assert torch.equal(one.x, expected[20:])
    with pytest.raises(MrpfError, match="no shard file matches"):
        data.read_source(params_for(train_path=str(tmp_path / "none-*.tar.gz")), "train")


def test_offline_dir_prefers_the_whole_dataset_unless_offline_set_is_subset(tmp_path):
    x, y = make_images(30, seed=5)
    write_shard(tmp_path / "cifar10-train-000000.tar.gz", x, y)
    write_npz(tmp_path / "cifar10-subset-train.npz", 12, seed=6)
    full = data.read_source(params_for(offline_dir=tmp_path), "train")
    subset = data.read_source(params_for(offline_dir=tmp_path, offline_set="subset"), "train")
    assert len(full) == 30 and len(subset) == 12
    with pytest.raises(MrpfError, match="data.offline_set: unknown value 'half'"):
        params_for(offline_set="half")


@pytest.mark.skipif(not (SHARED / "cifar10-test-000000.tar.gz").is_file(),
                    reason="needs ../shared/data (the CIFAR-10 shards); absent on a plain clone")
def test_cifar10_test_shard_decodes_to_the_subset_pixels_for_the_images_both_hold():
    """Every image of cifar10-subset-test.npz is in the test shard with the same label and
    exactly the same pixels (the shard holds 5,000 images, the subset 2,000 of them)."""
    spec = data.DATASETS["cifar10"]
    shard = data.read_shards([SHARED / "cifar10-test-000000.tar.gz"], spec)
    subset = data.read_npz(SHARED / "cifar10-subset-test.npz")
    assert len(shard) == 5000 and len(subset) == 2000
    index = {shard.x[i].numpy().tobytes(): int(shard.y[i]) for i in range(len(shard))}
    labels = [index.get(subset.x[i].numpy().tobytes()) for i in range(len(subset))]
    assert labels == subset.y.tolist()
