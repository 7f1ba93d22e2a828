"""Datasets as in-memory uint8 tensors, fixed-seed splits, and on-device augmentation.

CIFAR-sized data fits in memory (CIFAR-10: 150 MB as uint8), so each split is held as
one ``uint8`` tensor (N, C, H, W) and batches are cut, augmented and scaled to [0, 1]
on the training device. That removes the DataLoader/PIL bottleneck of the usual
training scripts. Normalisation is *not* done here: it lives inside the model so that
attacks work in pixel space (the RobustBench convention).

Sources, by ``data.*`` params:
- torchvision CIFAR-10 / CIFAR-100 / SVHN under ``data.root`` (downloaded on first use);
- Tiny-ImageNet in the standard ``tiny-imagenet-200/`` layout under ``data.root``;
- offline: ``data.train_path`` / ``data.test_path`` naming an ``.npz`` file
  (``x``: uint8 (N, H, W, 3), ``y``: int64 (N,), optional ``classes``), an
  ImageFolder directory (one sub-directory per class), or WebDataset shards (a
  ``.tar`` / ``.tar.gz`` file, a glob or a list of them; ``read_shards``);
- a copy under ``data.offline_dir`` (``offline_source``).

``mrpf data`` decodes any of them once into ``DIR/{train,test}.npz``, which every later
stage of the pipeline reads.
"""

from __future__ import annotations

import dataclasses
import glob
import io
import tarfile
import zipfile
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from .config import DataParams
from .datasets import DATASETS, DatasetSpec
from .errors import MrpfError

TINY_IMAGENET_URL = "http://cs231n.stanford.edu/tiny-imagenet-200.zip"


@dataclasses.dataclass
class ImageSet:
    """Images as uint8 (N, C, H, W) and int64 labels, with the class names."""

    x: torch.Tensor
    y: torch.Tensor
    classes: list[str]

    def __len__(self) -> int:
        return len(self.y)

    def subset(self, index: torch.Tensor) -> "ImageSet":
        return ImageSet(self.x[index], self.y[index], self.classes)


@dataclasses.dataclass
class Splits:
    spec: DatasetSpec
    train: ImageSet        # training split, with the validation images removed
    val: ImageSet          # fixed-seed hold-out of the training data
    calibration: ImageSet  # fixed-seed subset of ``train`` (MRS)
    test: ImageSet | None


def spec_for(data: DataParams) -> DatasetSpec:
    name = data.dataset
    if name not in DATASETS:
        raise MrpfError(f"data.dataset: unknown dataset {name!r} (choose from {', '.join(DATASETS)})")
    return DATASETS[name]


# ----------------------------------------------------------------------------- readers

def read_npz(path: Path) -> ImageSet:
    """Read the offline .npz format (see module docstring); shapes and labels are checked."""
    try:
        with np.load(path, allow_pickle=False) as f:
            if "x" not in f or "y" not in f:
                raise MrpfError(f"{path}: an mrpf .npz needs arrays 'x' and 'y' (has {sorted(f.files)})")
            x, y = f["x"], f["y"]
            classes = [str(c) for c in f["classes"]] if "classes" in f else None
    except (OSError, ValueError, zipfile.BadZipFile) as e:
        if "CRC" in str(e):   # zipfile checks each member's CRC as it reads it
            raise MrpfError(f"{path}: damaged ({e}); restore it with dvc checkout {path} (or dvc pull), "
                            f"or delete it and rerun mrpf data") from None
        raise MrpfError(f"{path}: not a readable .npz file ({e})") from None
    if x.ndim != 4 or x.shape[-1] != 3 or x.dtype != np.uint8:
        raise MrpfError(f"{path}: 'x' must be uint8 of shape (N, H, W, 3), got {x.dtype} {tuple(x.shape)}")
    if y.ndim != 1 or len(y) != len(x) or not np.issubdtype(y.dtype, np.integer):
        raise MrpfError(f"{path}: 'y' must be integers of shape ({len(x)},), got {y.dtype} {tuple(y.shape)}")
    n_classes = len(classes) if classes is not None else int(y.max()) + 1 if len(y) else 0
    if len(y) and (y.min() < 0 or y.max() >= n_classes):
        raise MrpfError(f"{path}: labels must lie in [0, {n_classes}), found {int(y.min())}..{int(y.max())}")
    if classes is None:
        classes = [str(i) for i in range(n_classes)]
    return ImageSet(torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2))),
                    torch.from_numpy(y.astype(np.int64)), classes)


def _read_images(paths: list[Path], size: int) -> torch.Tensor:
    from PIL import Image

    out = torch.empty((len(paths), 3, size, size), dtype=torch.uint8)
    for i, p in enumerate(paths):
        with Image.open(p) as im:
            im = im.convert("RGB")
            if im.size != (size, size):
                im = im.resize((size, size), Image.BILINEAR)
            out[i] = torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1)
    return out


IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".webp", ".tif", ".tiff"}


def read_image_folder(path: Path, size: int) -> ImageSet:
    """Read an ImageFolder directory (``class_name/*.png``), resizing to ``size`` where needed."""
    classes = sorted(d.name for d in path.iterdir() if d.is_dir())
    files, labels = [], []
    for label, name in enumerate(classes):
        for f in sorted((path / name).rglob("*")):
            if f.suffix.lower() in IMAGE_SUFFIXES:
                files.append(f)
                labels.append(label)
    if not files:
        raise MrpfError(f"{path}: ImageFolder is empty (expected class sub-directories holding images)")
    return ImageSet(_read_images(files, size), torch.tensor(labels, dtype=torch.int64), classes)


SHARD_SUFFIXES = (".tar", ".tar.gz", ".tgz")
SHARD_IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "ppm", "webp")


def is_shards(source: str | tuple[str, ...]) -> bool:
    """Whether a ``data.*_path`` names WebDataset shards: a list, a glob or a tar file."""
    return (not isinstance(source, str) or glob.has_magic(source)
            or str(source).endswith(SHARD_SUFFIXES))


def shard_paths(source: str | tuple[str, ...], key: str) -> list[Path]:
    """The shard files of a path, glob or list of them, each glob in sorted order."""
    paths: list[Path] = []
    for pattern in [source] if isinstance(source, str) else source:
        found = sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern] if Path(pattern).is_file() else []
        if not found:
            raise MrpfError(f"{key}: no shard file matches {pattern}")
        paths += [Path(p) for p in found]
    return paths


def read_shards(paths: list[Path], spec: DatasetSpec) -> ImageSet:
    """Read WebDataset shards (Aizman et al. 2019's layout: a tar, optionally gzip'd, whose
    samples are members ``KEY.jpg`` + ``KEY.cls`` with the class index as text), in shard and
    member order. Python's tarfile and Pillow are all it takes, so no webdataset dependency;
    a sample without label or image, a label beyond the dataset's classes or a member that
    is not an image is an error naming the shard and the member."""
    from PIL import Image, UnidentifiedImageError

    images, labels = [], []
    for path in paths:
        samples: dict[str, dict[str, tuple[str, bytes]]] = {}   # key -> extension -> (member, bytes)
        try:
            with tarfile.open(path, "r:*") as tar:
                for member in tar:
                    if not member.isfile():
                        continue
                    folder, _, base = member.name.rpartition("/")
                    stem, dot, extension = base.partition(".")
                    if dot:
                        samples.setdefault(f"{folder}/{stem}" if folder else stem, {})[extension.lower()] = (
                            member.name, tar.extractfile(member).read())
        except (tarfile.TarError, OSError, EOFError) as e:
            raise MrpfError(f"{path}: not a readable tar shard ({e})") from None
        for key, parts in samples.items():
            image = next((parts[e] for e in SHARD_IMAGE_EXTENSIONS if e in parts), None)
            if image is None or "cls" not in parts:
                missing = f"{key}.cls" if image is not None else f"an image ({key}.jpg)"
                raise MrpfError(f"{path}: sample {key} has no {missing} (WebDataset samples need KEY.jpg and KEY.cls)")
            name, text = parts["cls"]
            try:
                label = int(text.decode().strip())
            except (UnicodeDecodeError, ValueError):
                raise MrpfError(f"{path}: {name}: not a class index ({text[:20]!r})") from None
            if not 0 <= label < spec.num_classes:
                raise MrpfError(f"{path}: {name}: label {label} out of range [0, {spec.num_classes})")
            try:
                with Image.open(io.BytesIO(image[1])) as im:
                    pixels = np.asarray(im.convert("RGB"))
            except (UnidentifiedImageError, OSError) as e:
                raise MrpfError(f"{path}: {image[0]}: not a readable image ({e})") from None
            if pixels.shape[:2] != (spec.input_size, spec.input_size):
                raise MrpfError(f"{path}: {image[0]}: image is {pixels.shape[0]}x{pixels.shape[1]}, the dataset "
                                f"expects {spec.input_size}x{spec.input_size}")
            images.append(pixels)
            labels.append(label)
    if not images:
        raise MrpfError(f"{', '.join(map(str, paths))}: the shards hold no samples")
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()
    return ImageSet(x, torch.tensor(labels, dtype=torch.int64), [str(i) for i in range(spec.num_classes)])


def read_tiny_imagenet(root: Path, split: str) -> ImageSet:
    """Read the standard ``tiny-imagenet-200/`` layout (train/<wnid>/images, val/images + annotations)."""
    wnids = (root / "wnids.txt").read_text().split()
    index = {w: i for i, w in enumerate(wnids)}
    if split == "train":
        files, labels = [], []
        for w in wnids:
            for f in sorted((root / "train" / w / "images").glob("*.JPEG")):
                files.append(f)
                labels.append(index[w])
    else:  # the labelled 'val' split serves as the test split, as is usual for Tiny-ImageNet
        files, labels = [], []
        for line in (root / "val" / "val_annotations.txt").read_text().splitlines():
            parts = line.split("\t")
            if len(parts) >= 2:
                files.append(root / "val" / "images" / parts[0])
                labels.append(index[parts[1]])
    if not files:
        raise MrpfError(f"{root}: no Tiny-ImageNet images found for split {split!r}")
    return ImageSet(_read_images(files, 64), torch.tensor(labels, dtype=torch.int64), wnids)


def _missing(name: str, root: Path, why: str) -> MrpfError:
    return MrpfError(
        f"dataset {name!r} not found under {root} and could not be downloaded ({why}); "
        f"provide it offline with data.train_path / data.test_path pointing to an .npz "
        f"(uint8 x (N,H,W,3), int y (N,)) or an ImageFolder directory")


def _read_torchvision(name: str, root: Path, split: str, download: bool) -> ImageSet:
    import torchvision.datasets as tvd

    train = split == "train"
    try:
        if name == "svhn":
            ds = tvd.SVHN(str(root), split="train" if train else "test", download=download)
            return ImageSet(torch.from_numpy(ds.data), torch.from_numpy(ds.labels.astype(np.int64)),
                            [str(i) for i in range(10)])
        cls = tvd.CIFAR10 if name == "cifar10" else tvd.CIFAR100
        ds = cls(str(root), train=train, download=download)
    except (RuntimeError, OSError) as e:  # torchvision: "Dataset not found or corrupted", URLError, ...
        raise _missing(name, root, str(e).splitlines()[0] or type(e).__name__) from None
    return ImageSet(torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous(),
                    torch.tensor(ds.targets, dtype=torch.int64), list(ds.classes))


def _tiny_imagenet(root: Path, split: str, download: bool) -> ImageSet:
    tiny = root / "tiny-imagenet-200"
    if not (tiny / "wnids.txt").is_file():
        if not download:
            raise _missing("tinyimagenet", tiny, "download disabled")
        from torchvision.datasets.utils import download_and_extract_archive
        try:
            download_and_extract_archive(TINY_IMAGENET_URL, str(root))
        except Exception as e:  # any network failure: one clear message
            raise _missing("tinyimagenet", tiny, str(e).splitlines()[0] or type(e).__name__) from None
    cache = root / f"tiny-imagenet-200-{split}.npz"   # decoding 100k JPEGs takes minutes: keep them once
    if cache.is_file():
        return read_npz(cache)
    images = read_tiny_imagenet(tiny, split)
    from .io import atomic_path
    with atomic_path(cache) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, x=images.x.permute(0, 2, 3, 1).numpy(), y=images.y.numpy(), classes=np.array(images.classes))
    return images


def read_source(data: DataParams, split: str) -> ImageSet:
    """Read the train or test split from ``data.{split}_path`` if set, else from a copy under
    ``data.offline_dir``, else from the named dataset (downloaded if allowed); the images'
    size and labels are checked against the dataset (``check_fits``)."""
    spec = spec_for(data)
    path = (data.train_path if split == "train" else data.test_path) or offline_source(data, split)
    if path is not None and is_shards(path):
        images = read_shards(shard_paths(path, f"data.{split}_path"), spec)
    elif path is not None:
        path = Path(path)
        if path.is_dir():
            images = read_image_folder(path, spec.input_size)
        elif path.suffix == ".npz" and path.is_file():
            images = read_npz(path)
        else:
            raise MrpfError(f"data.{split}_path: {path} is neither an .npz file nor an ImageFolder directory")
    else:
        root = Path(data.root)
        images = (_tiny_imagenet(root, split, data.download) if data.dataset == "tinyimagenet"
                  else _read_torchvision(data.dataset, root, split, data.download))
    check_fits(images, spec, data.dataset, f"{split} split ({path or 'download of ' + data.dataset})")
    return images


def check_fits(images: ImageSet, spec: DatasetSpec, dataset: str, source: str) -> None:
    """Refuse images whose size is not the dataset's input size, and labels beyond its classes."""
    height, width = images.x.shape[-2:]
    if (height, width) != (spec.input_size, spec.input_size):
        raise MrpfError(f"{source}: images are {height}x{width}, dataset {dataset!r} expects "
                        f"{spec.input_size}x{spec.input_size}")
    if len(images) and int(images.y.max()) >= spec.num_classes:
        raise MrpfError(f"{source}: labels reach {int(images.y.max())}, dataset {dataset!r} has "
                        f"{spec.num_classes} classes")


# What offline_source looks for, by data.offline_set: the whole dataset (an .npz or
# WebDataset shards) or the 10k-image subset first.
_WHOLE, _SUBSET = ("{dataset}-{split}.npz", "{dataset}-{split}-*.tar.gz"), ("{dataset}-subset-{split}.npz",)
OFFLINE_NAMES = {"full": _WHOLE + _SUBSET + ("{dataset}/{split}",), "subset": _SUBSET + _WHOLE + ("{dataset}/{split}",)}


def offline_source(data: DataParams, split: str) -> str | None:
    """The first of ``OFFLINE_NAMES[data.offline_set]`` present under ``data.offline_dir``
    (a path, or a glob of shards; None if unset or absent)."""
    folder = data.offline_dir
    if folder is None:
        return None
    for pattern in OFFLINE_NAMES[data.offline_set]:
        path = str(Path(folder) / pattern.format(dataset=data.dataset, split=split))
        if glob.glob(path):
            return path
    return None


def prepare(data: DataParams, out_dir: str | Path, log=print) -> dict:
    """``mrpf data``: write the dataset's train and test splits to ``out_dir/{train,test}.npz``,
    the one format every later stage reads (and DVC versions). The source is, in order:
    ``data.train_path``/``test_path``; a copy under ``data.offline_dir``; the download."""
    from .io import atomic_path

    out_dir = Path(out_dir)
    summary = {"dataset": data.dataset}
    for split in ("train", "test"):
        source = (data.train_path if split == "train" else data.test_path) or offline_source(data, split)
        if source is None and data.offline_dir is not None:
            log(f"{split}: no offline copy under {data.offline_dir}; using data.root / download")
        images = read_source(data, split)
        with atomic_path(out_dir / f"{split}.npz") as tmp:
            with open(tmp, "wb") as f:
                np.savez(f, x=images.x.permute(0, 2, 3, 1).numpy(), y=images.y.numpy(),
                         classes=np.array(images.classes))
        summary[split] = {"images": len(images), "source": str(source) if source else "download"}
        log(f"{split}: {len(images)} images from {summary[split]['source']} -> {out_dir / (split + '.npz')}")
    return summary


def load_splits(data: DataParams, with_test: bool = True) -> Splits:
    """Read the data and cut the fixed-seed validation and calibration subsets.

    The split seed is fixed (not ``params.seed``) so that runs with different training
    seeds see the same validation and calibration images.
    """
    spec = spec_for(data)
    full = read_source(data, "train")
    n_val, n_cal = data.val_size, data.calibration_size
    if n_val >= len(full):
        raise MrpfError(f"data.val_size={n_val} leaves no training images (the training split has {len(full)})")
    order = torch.randperm(len(full), generator=torch.Generator().manual_seed(12345))
    train, val = full.subset(order[n_val:]), full.subset(order[:n_val])
    if n_cal > len(train):
        raise MrpfError(f"data.calibration_size={n_cal} is larger than the training split ({len(train)} images)")
    cal_index = torch.randperm(len(train), generator=torch.Generator().manual_seed(54321))[:n_cal]
    test = read_source(data, "test") if with_test else None
    return Splits(spec, train, val, train.subset(cal_index), test)


def fixed_subset(images: ImageSet, n: int, seed: int = 0) -> ImageSet:
    """The first ``n`` images of a fixed-seed shuffle (all of them, shuffled, if ``n`` >= len)."""
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))
    return images.subset(order[: min(n, len(images))])


# ----------------------------------------------------------------------------- batches

def augment_batch(x: torch.Tensor, padding: int, flip: bool, generator: torch.Generator) -> torch.Tensor:
    """Random crop after zero padding, then random horizontal flip, per image, on x's device.

    The random numbers come from a CPU generator, so results do not depend on the device.
    """
    n, _, h, w = x.shape
    if padding:
        padded = torch.nn.functional.pad(x, (padding,) * 4)
        dy = torch.randint(0, 2 * padding + 1, (n,), generator=generator).to(x.device)
        dx = torch.randint(0, 2 * padding + 1, (n,), generator=generator).to(x.device)
        rows = (dy[:, None] + torch.arange(h, device=x.device))[:, None, :, None]
        cols = (dx[:, None] + torch.arange(w, device=x.device))[:, None, None, :]
        x = padded[torch.arange(n, device=x.device)[:, None, None, None],
                   torch.arange(x.shape[1], device=x.device)[None, :, None, None], rows, cols]
    if flip:
        mask = (torch.rand(n, generator=generator) < 0.5).to(x.device)
        x = torch.where(mask[:, None, None, None], x.flip(3), x)
    return x


class Batches:
    """Iterate over (images in [0, 1], labels) batches of an ImageSet held on ``device``.

    ``seed`` fixes shuffling and augmentation, so an epoch is reproducible on its own
    (that is what lets training resume bit-exactly from any completed epoch).
    """

    def __init__(self, images: ImageSet, batch_size: int, device: torch.device, *, shuffle: bool = False,
                 spec: DatasetSpec | None = None, seed: int = 0, channels_last: bool = False):
        self.x = images.x.to(device)
        self.y = images.y.to(device)
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.spec = spec           # None: no augmentation
        self.seed = seed
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format

    def __len__(self) -> int:
        return (len(self.y) + self.batch_size - 1) // self.batch_size

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        gen = torch.Generator().manual_seed(self.seed)
        n = len(self.y)
        order = torch.randperm(n, generator=gen).to(self.x.device) if self.shuffle else None
        for start in range(0, n, self.batch_size):
            if order is None:
                xb, yb = self.x[start:start + self.batch_size], self.y[start:start + self.batch_size]
            else:
                idx = order[start:start + self.batch_size]
                xb, yb = self.x[idx], self.y[idx]
            if self.spec is not None:
                xb = augment_batch(xb, self.spec.crop_padding, self.spec.flip, gen)
            yield xb.float().div_(255).contiguous(memory_format=self.memory_format), yb
