"""CIFAR-10 (python-pickle folder or .npz), any image set as .npz, scikit-learn's digits and
synthetic data, held whole on the device.

Images stay uint8 (N, C, H, W) on the device (150 MB for CIFAR-10), so a batch is one
index-select plus the batched augmentation of ``augment.py``; no worker processes and no
per-image Python. Pixels are scaled to [0, 1] per batch: the attacks' eps is in that scale
and the model has no input normalisation (as in the Madry and TRADES CIFAR-10 code).
"""

from __future__ import annotations

import hashlib
import os
import pickle
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from .augment import random_crop_flip

CIFAR_FOLDER = "cifar-10-batches-py"
CIFAR_TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR_FILES = CIFAR_TRAIN_FILES + ("test_batch", "batches.meta")
NPZ_KEYS = ("x_train", "y_train", "x_test", "y_test")
NPZ_EXPECTED = (f"expected an .npz file with arrays {', '.join(NPZ_KEYS)}: images (N, H, W, C), "
                "(N, C, H, W) or (N, H, W) with C in 1, 3 or 4, uint8 (or float in [0, 1]), "
                "and N integer labels each")
CHANNELS = (1, 3, 4)
DIGITS_TEST_FRACTION = 0.2
CIFAR_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
EXPECTED = (f"expected a folder {CIFAR_FOLDER!r} holding {', '.join(CIFAR_FILES)} "
            f"(extract {CIFAR_URL}), its parent folder, or an .npz file with arrays "
            f"{', '.join(NPZ_KEYS)}")


class DataError(ValueError):
    """Missing or malformed data; the message names the expected files or arrays."""


@dataclass
class Split:
    """Images x (N, C, H, W) uint8 (or float32 in [0, 1]) and labels y (N,) int64; ``info``
    says where a drawn split came from (``--dataset digits``: seed, sizes, class counts)."""

    x: Tensor
    y: Tensor
    info: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return self.x.shape[0]


def load_dataset(dataset: str, path: str, *, synthetic_sizes=(2048, 512), image_size: int = 32,
                 seed: int = 0):
    """(train Split, test Split, number of classes) on the CPU."""
    if dataset == "synthetic":
        return (*make_synthetic(*synthetic_sizes, seed=seed, size=image_size), 10)
    if dataset == "digits":
        return (*load_digits(seed), 10)
    if dataset == "npz" or path.endswith(".npz"):
        train, test = load_npz(path)
    else:
        train, test = load_cifar10_folder(path)
    num_classes = int(max(train.y.max(), test.y.max())) + 1
    return train, test, num_classes


def find_cifar10_folder(path: str) -> str:
    """``path`` itself or ``path/cifar-10-batches-py``, whichever holds every CIFAR file."""
    for folder in (path, os.path.join(path, CIFAR_FOLDER)):
        if all(os.path.isfile(os.path.join(folder, f)) for f in CIFAR_FILES):
            return folder
    if not os.path.exists(path):
        raise DataError(f"CIFAR-10 data not found: {path!r} does not exist; {EXPECTED}")
    if os.path.isfile(path):
        raise DataError(f"{path!r} is a file but not an .npz; {EXPECTED}")
    nested = os.path.join(path, CIFAR_FOLDER)
    folder = nested if os.path.isdir(nested) else path
    missing = [f for f in CIFAR_FILES if not os.path.isfile(os.path.join(folder, f))]
    raise DataError(f"CIFAR-10 data incomplete: {folder!r} lacks {', '.join(missing)}; {EXPECTED}")


def _unpickle(path: str) -> dict:
    try:
        with open(path, "rb") as fh:
            raw = pickle.load(fh, encoding="bytes")
    except Exception as exc:
        raise DataError(f"cannot read {path!r} as a CIFAR-10 pickle batch: {exc}") from None
    if not isinstance(raw, dict):
        raise DataError(f"{path!r} holds a {type(raw).__name__}, expected a CIFAR-10 batch dict")
    # The official files are Python 2 pickles with bytes keys; accept str keys as well.
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in raw.items()}


def _batch(path: str) -> Split:
    d = _unpickle(path)
    if "data" not in d or not ({"labels", "fine_labels"} & set(d)):
        raise DataError(f"{path!r} lacks the 'data' and 'labels' entries of a CIFAR-10 batch")
    data = np.asarray(d["data"], dtype=np.uint8)
    labels = np.asarray(d.get("labels", d.get("fine_labels")), dtype=np.int64)
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or data.shape[0] != labels.shape[0]:
        raise DataError(f"{path!r}: 'data' must be (N, 3072) uint8 rows with N labels, got "
                        f"{data.shape} and {labels.shape[0]} labels")
    # Rows are the red, green and blue 32x32 planes, row-major: reshape, no transpose.
    return Split(torch.from_numpy(data.reshape(-1, 3, 32, 32).copy()), torch.from_numpy(labels))


def load_cifar10_folder(path: str) -> tuple[Split, Split]:
    folder = find_cifar10_folder(path)
    parts = [_batch(os.path.join(folder, f)) for f in CIFAR_TRAIN_FILES]
    train = Split(torch.cat([p.x for p in parts]), torch.cat([p.y for p in parts]))
    _unpickle(os.path.join(folder, "batches.meta"))  # present and readable, as the format has it
    return train, _batch(os.path.join(folder, "test_batch"))


def _images(name: str, a: np.ndarray, path: str) -> Tensor:
    """(N, H, W, C), (N, C, H, W) or (N, H, W), C in 1, 3 or 4, uint8 or float in [0, 1]
    -> (N, C, H, W)."""
    if a.ndim == 3:
        a = a[:, None]
    layout = _layout(a.shape) if a.ndim == 4 else None
    if layout is None:
        raise DataError(f"{path!r}: {name} has shape {a.shape}; {NPZ_EXPECTED}")
    if layout == "nhwc":
        a = a.transpose(0, 3, 1, 2)
    if a.dtype == np.uint8:
        return torch.from_numpy(np.ascontiguousarray(a))
    if not np.issubdtype(a.dtype, np.floating):
        raise DataError(f"{path!r}: {name} must be uint8 or float in [0, 1], got {a.dtype}")
    if a.size and (a.min() < 0 or a.max() > 1):
        raise DataError(f"{path!r}: float {name} must lie in [0, 1], got [{a.min()}, {a.max()}]")
    return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))


def _layout(shape: tuple) -> str | None:
    """'nchw' or 'nhwc' for a 4-d image shape: the axis of 1, 3 or 4 channels; when both
    ends could be channels, the one that leaves a square image (None if that is ambiguous)."""
    first, last = shape[1] in CHANNELS, shape[3] in CHANNELS
    if first and last:
        square_first, square_last = shape[2] == shape[3], shape[1] == shape[2]
        if square_first != square_last:
            return "nchw" if square_first else "nhwc"
        return None
    return "nchw" if first else "nhwc" if last else None


def load_npz(path: str) -> tuple[Split, Split]:
    """An image set as one .npz (``NPZ_EXPECTED``): how MNIST, SVHN, CIFAR-100 or one's own
    data comes in. Train and test images must share channels and size."""
    if not os.path.isfile(path):
        what = "is a folder, not a file" if os.path.isdir(path) else "does not exist"
        raise DataError(f"data not found: {path!r} {what}; {NPZ_EXPECTED}")
    try:
        arrays = np.load(path, allow_pickle=False)
    except Exception as exc:
        raise DataError(f"cannot read {path!r} as .npz ({exc}); {NPZ_EXPECTED}") from None
    if not hasattr(arrays, "files"):
        raise DataError(f"{path!r} holds a single .npy array, not an .npz archive; {NPZ_EXPECTED}")
    missing = [k for k in NPZ_KEYS if k not in arrays.files]
    if missing:
        raise DataError(f"{path!r} lacks array(s) {', '.join(missing)} "
                        f"(has {', '.join(arrays.files) or 'none'}); {NPZ_EXPECTED}")
    splits = []
    for xs, ys in (("x_train", "y_train"), ("x_test", "y_test")):
        x = _images(xs, arrays[xs], path)
        y = np.asarray(arrays[ys]).reshape(-1)
        if not np.issubdtype(y.dtype, np.integer) or y.shape[0] != x.shape[0]:
            raise DataError(f"{path!r}: {ys} must hold {x.shape[0]} integer labels, "
                            f"got {y.dtype} {y.shape}")
        if y.size and y.min() < 0:
            raise DataError(f"{path!r}: {ys} has negative labels")
        splits.append(Split(x, torch.from_numpy(y.astype(np.int64))))
    if splits[0].x.shape[1:] != splits[1].x.shape[1:]:
        raise DataError(f"{path!r}: x_train images are {tuple(splits[0].x.shape[1:])} (C, H, W) "
                        f"but x_test images are {tuple(splits[1].x.shape[1:])}; they must match")
    return splits[0], splits[1]


def load_digits(seed: int, test_fraction: float = DIGITS_TEST_FRACTION) -> tuple[Split, Split]:
    """scikit-learn's copy of the UCI handwritten digits (1,797 8 x 8 grayscale images, 10
    classes, values 0..16) as float32 (N, 1, 8, 8) pixels / 16 in [0, 1], split into train and
    test stratified by class, drawn from ``seed``. The test Split's ``info`` reports the split
    (sizes, per-class test counts, a SHA-1 of the test indices) so that it can be checked."""
    try:
        from sklearn.datasets import load_digits as sk_load_digits
        from sklearn.model_selection import train_test_split
    except ImportError:
        raise DataError("--dataset digits needs scikit-learn (pip install scikit-learn), which "
                        "ships the data set") from None
    bunch = sk_load_digits()
    x = torch.from_numpy((bunch.images / 16.0).astype(np.float32))[:, None]
    y = torch.from_numpy(bunch.target.astype(np.int64))
    train_idx, test_idx = train_test_split(np.arange(len(y)), test_size=test_fraction,
                                           stratify=bunch.target, random_state=seed)
    test_idx = np.sort(test_idx)
    train_idx = np.sort(train_idx)
    info = {"dataset": "digits", "split_seed": seed, "stratified": True,
            "test_fraction": test_fraction, "train_images": len(train_idx),
            "test_images": len(test_idx),
            "test_per_class": np.bincount(bunch.target[test_idx], minlength=10).tolist(),
            "test_index_sha1": hashlib.sha1(test_idx.astype(np.int64).tobytes()).hexdigest()}
    return Split(x[train_idx], y[train_idx], info), Split(x[test_idx], y[test_idx], info)


def make_synthetic(n_train: int, n_test: int, *, seed: int = 0, num_classes: int = 10,
                   size: int = 32) -> tuple[Split, Split]:
    """Class-dependent images (a per-class smooth pattern plus noise), so that a model can
    learn them and accuracies move; throughput does not depend on pixel values."""
    g = torch.Generator().manual_seed(seed)
    patterns = torch.nn.functional.interpolate(
        torch.rand(num_classes, 3, 4, 4, generator=g), size=(size, size), mode="bilinear",
        align_corners=False)

    def split(n: int) -> Split:
        y = torch.randint(num_classes, (n,), generator=g)
        x = 0.6 * patterns[y] + 0.4 * torch.rand(n, 3, size, size, generator=g)
        return Split((x * 255).round().to(torch.uint8), y)

    return split(n_train), split(n_test)


def crop_padding(side: int) -> int:
    """Zero padding of the random crop for images of this side: an eighth of it (CIFAR's 4
    pixels at 32), at least 1, so that the shift is the same fraction of the image."""
    return max(1, round(side / 8))


def shard_indices(n: int, rank: int, world: int, generator: torch.Generator | None) -> Tensor:
    """This rank's part of a (shuffled when ``generator`` is given) epoch, as
    ``DistributedSampler`` does it: pad by wrapping to a multiple of ``world``, take every
    ``world``-th index from ``rank``."""
    order = torch.randperm(n, generator=generator) if generator is not None else torch.arange(n)
    total = -(-n // world) * world
    if total > n:
        order = torch.cat([order, order[: total - n]])
    return order[rank::world]


class DeviceLoader:
    """Batches of one Split that lives on the device.

    Train mode: a fresh permutation per epoch drawn from ``seed`` and the epoch number alone
    (so a resumed run sees the same order without saving it), sharded over ranks, incomplete
    last batch dropped (fixed shapes for the loss and torch.compile), random crop (zero padding
    ``crop_padding(side)``: 4 pixels at 32 x 32, 1 at 8 x 8) and, when ``flip``, horizontal
    flip from ``aug_generator``. Eval mode: fixed order, the first ``limit`` images, every image once
    over all ranks, no augmentation.
    """

    def __init__(self, split: Split, batch_size: int, device, *, train: bool, seed: int = 0,
                 rank: int = 0, world: int = 1, aug_generator: torch.Generator | None = None,
                 limit: int = 0, max_steps: int | None = None, flip: bool = True):
        self.device = torch.device(device)
        n = len(split) if not limit else min(limit, len(split))
        self.x, self.y = split.x[:n].to(self.device), split.y[:n].to(self.device)
        self.batch_size, self.train, self.seed = batch_size, train, seed
        self.rank, self.world = rank, world
        self.aug_generator = aug_generator
        self.pad, self.flip = crop_padding(split.x.shape[-1]), flip
        per_rank = -(-n // world) if train else len(range(rank, n, world))
        steps = per_rank // batch_size if train else -(-per_rank // batch_size)
        if train and steps == 0:
            raise DataError(f"{n} training images give no full batch of {batch_size} per process "
                            f"({world} process(es)); lower --batch-size")
        self.steps = min(steps, max_steps) if max_steps else steps

    def __len__(self) -> int:
        return self.steps

    def epoch(self, epoch: int, channels_last: bool = False):
        """Yield (x (b, C, H, W) float32 in [0, 1], y (b,)) for one epoch."""
        if self.train:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            idx = shard_indices(self.x.shape[0], self.rank, self.world, g)
        else:
            idx = torch.arange(self.rank, self.x.shape[0], self.world)
        idx = idx.to(self.device)
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        for step in range(self.steps):
            b = idx[step * self.batch_size:(step + 1) * self.batch_size]
            x = self.x.index_select(0, b)
            if self.train:
                x = random_crop_flip(x, pad=self.pad, generator=self.aug_generator, flip=self.flip)
            x = x.float().div_(255) if x.dtype == torch.uint8 else x.float()
            yield x.contiguous(memory_format=fmt), self.y.index_select(0, b)
