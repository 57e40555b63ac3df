"""Image datasets: Fashion-MNIST from IDX files, and ImageFolder trees (the ImageNet layout).

Every dataset exposes the same small contract (`ImageDataset`): stable string ids per sample,
integer targets, raw bytes per sample (for content hashes), and `(image, target)` items already
transformed for a given model. A transform is split in two: `pixels(i)`, the decoded, resized
and cropped image as uint8 (what is worth keeping: 4x smaller than float), and `finish(batch)`,
the scaling and normalization, bitwise the same on a batch as per item. Labels are only used
for stratified sampling and evaluation; healing never sees them.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import os
import struct
from pathlib import Path
from typing import Callable, Protocol, Sequence

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from starfish.errors import StarfishError

FASHION_MNIST_ROOT = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
DATASET_KINDS = ("fashion-mnist", "imagefolder")


class ImageDataset(Protocol):
    ids: list[str]
    targets: list[int]

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]: ...

    def pixels(self, index: int) -> torch.Tensor: ...

    def finish(self, pixels: torch.Tensor) -> torch.Tensor: ...

    def sample_bytes(self, index: int) -> bytes: ...

    def fingerprint(self) -> str: ...


def _stat_fingerprint(entries: list[tuple[str, Path]]) -> str:
    """A cheap identity of files: names, sizes and modification times (no content read)."""
    digest = hashlib.sha256()
    for name, path in entries:
        stat = path.stat()
        digest.update(f"{name}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def _read_idx(path: Path) -> torch.Tensor:
    """Parse an IDX file (optionally gzipped) into a uint8 tensor, which callers only read.

    Decoded once per process for as long as the file's size and modification time stay: a flow
    reads the split in four steps, and each decompression took 0.3 s."""
    stat = path.stat()
    return _decoded_idx(path.resolve(), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=4)  # Fashion-MNIST's two splits, images and labels: 55 MB
def _decoded_idx(path: Path, size: int, mtime_ns: int) -> torch.Tensor:
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as handle:
            data = handle.read()
    except (OSError, EOFError) as exc:
        raise StarfishError(f"cannot read IDX file {path}: {exc}; re-install the dataset") from exc
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise StarfishError(f"{path} is not an unsigned-byte IDX file; check the dataset root")
    ndim = data[3]
    if len(data) < 4 + 4 * ndim:
        raise StarfishError(f"{path} is truncated (header cut at {len(data)} bytes); re-install the dataset")
    shape = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    expected = 4 + 4 * ndim + int(torch.tensor(shape).prod())
    if len(data) != expected:
        raise StarfishError(f"{path} is truncated ({len(data)} of {expected} bytes); re-install the dataset")
    return torch.frombuffer(bytearray(data[4 + 4 * ndim :]), dtype=torch.uint8).reshape(shape)


def _find_idx(root: Path, stem: str) -> Path:
    for candidate in (root / stem, root / f"{stem}.gz"):
        if candidate.exists():
            return candidate
    raise StarfishError(
        f"Fashion-MNIST file {stem}[.gz] not found under {root}; "
        "install it with `apt-get install dataset-fashion-mnist` or set data.root"
    )


class TensorTransform:
    """Model-ready tensors from uint8 grayscale images: resize, channel count, normalization."""

    def __init__(self, input_size: Sequence[int], mean: Sequence[float], std: Sequence[float]):
        self.channels, self.height, self.width = (int(v) for v in input_size)
        self.mean = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """`images`: uint8 (N, H, W) -> float (N, C, H', W')."""
        x = images.unsqueeze(1).float().div_(255.0)
        if x.shape[-2:] != (self.height, self.width):
            x = F.interpolate(x, size=(self.height, self.width), mode="bilinear", align_corners=False)
        x = x.expand(-1, self.channels, -1, -1)
        return (x - self.mean) / self.std


class FashionMNIST(Dataset):
    """Fashion-MNIST read from the IDX files Debian's `dataset-fashion-mnist` installs."""

    def __init__(self, root: str | Path, split: str, transform: TensorTransform):
        if split not in FASHION_MNIST_FILES:
            raise StarfishError(f"unknown split {split!r}; use one of {sorted(FASHION_MNIST_FILES)}")
        root = Path(root)
        if not root.is_dir():
            raise StarfishError(
                f"dataset root {root} does not exist; install Fashion-MNIST with "
                "`apt-get install dataset-fashion-mnist` or set data.root"
            )
        image_stem, label_stem = FASHION_MNIST_FILES[split]
        self.files = [_find_idx(root, image_stem), _find_idx(root, label_stem)]
        self.images = _read_idx(self.files[0])
        labels = _read_idx(self.files[1])
        if labels.shape[0] != self.images.shape[0]:
            raise StarfishError(f"{root}: {self.images.shape[0]} images but {labels.shape[0]} labels")
        self.targets = labels.long().tolist()
        self.ids = [f"{split}/{i:05d}" for i in range(len(self.targets))]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.transform(self.images[index : index + 1])[0], self.targets[index]

    def pixels(self, index: int) -> torch.Tensor:
        return self.images[index]

    def finish(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.transform(pixels)

    def __getitems__(self, indices: list[int]) -> list[tuple[torch.Tensor, int]]:
        """Batched fetch: one vectorized transform per batch instead of one per image."""
        batch = self.transform(self.images[indices])
        return [(batch[j], self.targets[i]) for j, i in enumerate(indices)]

    def fingerprint(self) -> str:
        return _stat_fingerprint([(path.name, path) for path in self.files])

    in_memory = True  # decoded once, up front: loader workers would only add copies

    def sample_bytes(self, index: int) -> bytes:
        return self.images[index].numpy().tobytes()


class ScaleNormalize:
    """`ToTensor` + `Normalize` for uint8 pixels, per item or on a batch: the same float ops."""

    def __init__(self, normalize: Callable[[torch.Tensor], torch.Tensor]) -> None:
        self.normalize = normalize

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.normalize(pixels.to(torch.float32).div(255))


def split_transform(transform: Callable) -> tuple[Callable, Callable[[torch.Tensor], torch.Tensor]]:
    """(decode to uint8 pixels, finish) for a torchvision Compose ending in ToTensor + Normalize,
    as timm's eval transform does; any other transform is kept whole (float pixels)."""
    from torchvision import transforms

    steps = list(getattr(transform, "transforms", []))
    if len(steps) >= 2 and type(steps[-2]).__name__ in ("ToTensor", "MaybeToTensor") \
            and isinstance(steps[-1], transforms.Normalize):
        return transforms.Compose([*steps[:-2], transforms.PILToTensor()]), ScaleNormalize(steps[-1])
    return transform, _unchanged


def _unchanged(batch: torch.Tensor) -> torch.Tensor:
    return batch


class ImageFolderDataset(Dataset):
    """An ImageFolder tree (`root/<split>/<class>/<image>`), transformed with timm's eval transform."""

    def __init__(self, root: str | Path, split: str, transform: Callable):
        from torchvision.datasets import ImageFolder

        split_root = Path(root) / split
        if not split_root.is_dir():
            raise StarfishError(
                f"ImageFolder split {split_root} does not exist; expected root/{split}/<class>/<image> "
                "(the ImageNet layout)"
            )
        try:
            decode, self.finish = split_transform(transform)
            self.folder = ImageFolder(str(split_root), transform=decode)
        except (FileNotFoundError, RuntimeError) as exc:
            raise StarfishError(f"cannot read ImageFolder {split_root}: {exc}") from exc
        self.ids = [str(Path(path).relative_to(split_root)) for path, _ in self.folder.samples]
        self.targets = [int(t) for t in self.folder.targets]

    def __len__(self) -> int:
        return len(self.folder)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        pixels, target = self.folder[index]
        return self.finish(pixels.unsqueeze(0))[0], target

    def pixels(self, index: int) -> torch.Tensor:
        return self.folder[index][0]

    def sample_bytes(self, index: int) -> bytes:
        return Path(self.folder.samples[index][0]).read_bytes()

    def fingerprint(self) -> str:
        return _stat_fingerprint([(sample_id, Path(path))
                                  for sample_id, (path, _) in zip(self.ids, self.folder.samples)])

    in_memory = False  # decoded and resized per item: the work loader workers share


def load_dataset(kind: str, root: str | Path, split: str, model: torch.nn.Module) -> ImageDataset:
    """Open `split` of a dataset, with items transformed for `model`'s input contract."""
    from timm.data import create_transform, resolve_data_config

    data_config = resolve_data_config({}, model=model)
    if kind == "fashion-mnist":
        transform = TensorTransform(data_config["input_size"], data_config["mean"], data_config["std"])
        return FashionMNIST(root, split, transform)
    if kind == "imagefolder":
        return ImageFolderDataset(root, split, create_transform(**data_config, is_training=False))
    raise StarfishError(f"unknown dataset kind {kind!r}; use one of {list(DATASET_KINDS)}")


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def loader_workers(dataset: ImageDataset, num_workers: int | None) -> int:
    """`data.num_workers`, or for None (auto): every usable core for datasets decoded per item
    (ImageFolder), none for those already in memory (Fashion-MNIST)."""
    if num_workers is not None:
        return num_workers
    base = getattr(dataset, "dataset", dataset)  # through a Subset
    return 0 if getattr(base, "in_memory", False) else usable_cores()


def make_loader(dataset: ImageDataset, batch_size: int, num_workers: int | None = 0) -> DataLoader:
    """An in-order DataLoader over `dataset` (batched fetch where the dataset supports it), with
    `loader_workers` processes and pinned memory when a GPU takes the batches."""
    workers = loader_workers(dataset, num_workers)
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers,
                      pin_memory=torch.cuda.is_available(), persistent_workers=False,
                      prefetch_factor=4 if workers else None)
