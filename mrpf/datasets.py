"""The datasets mrpf knows: classes, input size, normalisation and augmentation of each.

Imports nothing of mrpf (and not torch), so that ``mrpf.config`` checks ``data.dataset``
against these names and ``mrpf.data`` reads the images by them, without either importing
the other.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
    num_classes: int
    input_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    crop_padding: int     # random crop after zero-padding by this many pixels
    flip: bool            # random horizontal flip


DATASETS: dict[str, DatasetSpec] = {
    # Augmentation as in the robust-training literature (Madry et al.; Rice et al. 2020).
    "cifar10": DatasetSpec(10, 32, (0.4914, 0.4822, 0.4465), (0.2471, 0.2435, 0.2616), 4, True),
    "cifar100": DatasetSpec(100, 32, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762), 4, True),
    "svhn": DatasetSpec(10, 32, (0.4377, 0.4438, 0.4728), (0.1980, 0.2010, 0.1970), 4, False),
    "tinyimagenet": DatasetSpec(200, 64, (0.4802, 0.4481, 0.3975), (0.2302, 0.2265, 0.2262), 4, True),
}
