"""The calibration split: a deterministic, class-stratified, unlabeled sample of the training set.

The manifest lists sample ids only (no labels: healing is label-free) and a content hash over
the ids and the samples' bytes, so the same seed and data give a byte-identical manifest, and
a changed image changes the hash.
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable

import torch
from torch.utils.data import DataLoader, Dataset

from starfish.datasets import ImageDataset, loader_workers
from starfish.errors import StarfishError
from starfish.io import atomic_write_json, loads_bounded
from starfish.rows import RowStore, row_store

MANIFEST_VERSION = 1


def stratified_indices(targets: list[int], fraction: float, seed: int) -> list[int]:
    """Pick round(fraction * N) indices, split over classes in proportion to their size.

    Per-class counts use largest remainders so they add up exactly; within a class the pick is
    a seeded permutation. Returned sorted, so the order never depends on the class loop.
    """
    if not 0.0 < fraction <= 1.0:
        raise StarfishError(f"calibration.fraction={fraction} must be in (0, 1]")
    total = round(fraction * len(targets))
    if total == 0:
        raise StarfishError(
            f"calibration.fraction={fraction} of {len(targets)} training images yields 0 images; "
            f"raise it to at least {1 / max(1, len(targets)):.2g}"
        )
    by_class: dict[int, list[int]] = defaultdict(list)
    for index, target in enumerate(targets):
        by_class[target].append(index)
    classes = sorted(by_class)
    exact = {c: total * len(by_class[c]) / len(targets) for c in classes}
    counts = {c: int(exact[c]) for c in classes}
    remainder = total - sum(counts.values())
    for c in sorted(classes, key=lambda c: (-(exact[c] - counts[c]), c))[:remainder]:
        counts[c] += 1
    generator = torch.Generator().manual_seed(seed)
    picked: list[int] = []
    for c in classes:
        members = by_class[c]
        order = torch.randperm(len(members), generator=generator)[: counts[c]]
        picked.extend(members[i] for i in order.tolist())
    return sorted(picked)


def content_hash(dataset: ImageDataset, indices: list[int]) -> str:
    """SHA-256 over each picked sample's id and raw bytes, in manifest order."""
    digest = hashlib.sha256()
    for index in indices:
        digest.update(dataset.ids[index].encode() + b"\0")
        digest.update(hashlib.sha256(dataset.sample_bytes(index)).digest())
    return digest.hexdigest()


class _Decoded(Dataset):
    """Each sample as (position, image or None, error text), so one bad file never stops the rest."""

    def __init__(self, dataset: ImageDataset, indices: list[int]) -> None:
        self.dataset, self.indices = dataset, indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, position: int) -> tuple[int, torch.Tensor | None, str]:
        try:
            return position, self.dataset.pixels(self.indices[position]), ""
        except Exception as exc:  # PIL and torchvision raise OSError, ValueError, SyntaxError, ...
            return position, None, f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"


def _decode_all(dataset: ImageDataset, indices: list[int], num_workers: int | None,
                keep: Callable[[int, torch.Tensor], None]) -> None:
    """Decode the samples at `indices` to pixels (by `loader_workers` processes), handing each to
    `keep(position, pixels)`; every sample that cannot be decoded is named in one error, so a
    bad file is found when the split is drawn, not mid-heal."""
    loader = DataLoader(_Decoded(dataset, indices), batch_size=32, num_workers=loader_workers(dataset, num_workers),
                        collate_fn=list)
    bad = []
    for batch in loader:
        for position, image, error in batch:
            if image is None:
                bad.append(f"{dataset.ids[indices[position]]} ({error})")
            else:
                keep(position, image)
    if bad:
        raise StarfishError(f"{len(bad)} calibration image(s) cannot be decoded: {'; '.join(bad[:5])}"
                            f"{' ...' if len(bad) > 5 else ''}; fix or remove them, then sample again")


def check_images(dataset: ImageDataset, indices: list[int], num_workers: int | None = 0) -> None:
    """Raise, naming them, if any of the samples at `indices` cannot be decoded; keeps none."""
    _decode_all(dataset, indices, num_workers, lambda position, image: None)


class CalibrationImages:
    """A calibration split's images, read like a float tensor (`images[index]`, `.shape`, `len`).

    They are kept as the dataset's uint8 pixels (a quarter of the float size) in a row store,
    in RAM or in a scratch file, and finished (scaled, normalized) per read: a read gives
    exactly what the dataset's items give, bitwise.
    """

    def __init__(self, pixels: RowStore, finish: Callable[[torch.Tensor], torch.Tensor]) -> None:
        self.pixels, self.finish = pixels, finish
        self.shape = torch.Size((len(pixels), *finish(pixels[0:1]).shape[1:]))

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, key: int | slice | torch.Tensor) -> torch.Tensor:
        if isinstance(key, int):
            return self.finish(self.pixels[[key]])[0]
        return self.finish(self.pixels[key])

    def close(self) -> None:
        self.pixels.close()


def load_images(dataset: ImageDataset, indices: list[int], num_workers: int | None = 0,
                on_disk: bool = True) -> CalibrationImages:
    """The samples at `indices`, decoded by loader workers into one row store: a scratch file
    (`on_disk`, RAM then holds a batch) or RAM."""
    if not indices:
        raise StarfishError("the calibration split holds no images; sample a larger one (calibration.fraction)")
    holder: list[RowStore] = []

    def keep(position: int, pixels: torch.Tensor) -> None:
        if not holder:
            holder.append(row_store((len(indices), *pixels.shape), pixels.dtype, on_disk))
        holder[0].write(position, pixels.unsqueeze(0))

    _decode_all(dataset, indices, num_workers, keep)
    return CalibrationImages(holder[0], dataset.finish)


def build_manifest(dataset: ImageDataset, dataset_kind: str, fraction: float, seed: int,
                   num_workers: int | None = 0) -> dict[str, Any]:
    indices = stratified_indices(dataset.targets, fraction, seed)
    check_images(dataset, indices, num_workers)  # a split of images that decode, or an error naming those that do not
    return {
        "version": MANIFEST_VERSION,
        "dataset": dataset_kind,
        "split": "train",
        "fraction": fraction,
        "seed": seed,
        "num_source": len(dataset),
        "num_samples": len(indices),
        "ids": [dataset.ids[i] for i in indices],
        "content_sha256": content_hash(dataset, indices),
    }


def write_manifest(path: str | Path, manifest: dict[str, Any]) -> None:
    atomic_write_json(path, manifest)


def read_manifest(path: str | Path) -> dict[str, Any]:
    """A manifest checked for the fields every step relies on; one clear error for anything else."""
    path = Path(path)
    if not path.is_file():
        raise StarfishError(f"calibration manifest {path} does not exist; run `starfish sample` first")
    fix = "write it again with `starfish sample`"
    try:
        manifest = loads_bounded(path.read_text())
    except (ValueError, UnicodeDecodeError) as exc:  # JSONDecodeError, UnsafeJSON
        raise StarfishError(f"calibration manifest {path} is not valid JSON ({exc}); {fix}") from None
    if not isinstance(manifest, dict):
        raise StarfishError(f"calibration manifest {path} holds a {type(manifest).__name__}, not a manifest; {fix}")
    ids = manifest.get("ids")
    if not isinstance(ids, list) or not ids or not all(isinstance(i, str) for i in ids):
        raise StarfishError(f"calibration manifest {path} has no list of sample ids; {fix}")
    if not isinstance(manifest.get("content_sha256"), str) or manifest.get("num_samples") != len(ids):
        raise StarfishError(f"calibration manifest {path} lacks its content hash or sample count; {fix}")
    return manifest


def resolve_manifest(path: str | Path, dataset: ImageDataset) -> list[int]:
    """Indices into `dataset` of the manifest's ids; fails if the data no longer matches its hash."""
    manifest = read_manifest(path)
    position = {sample_id: i for i, sample_id in enumerate(dataset.ids)}
    missing = [sid for sid in manifest["ids"] if sid not in position]
    if missing:
        raise StarfishError(f"{len(missing)} calibration ids (e.g. {missing[0]}) are not in the dataset; "
                            "sample again for this data version")
    indices = [position[sid] for sid in manifest["ids"]]
    if content_hash(dataset, indices) != manifest["content_sha256"]:
        raise StarfishError(f"calibration data changed since {path} was written (content hash differs); "
                            "check out the matching data version or sample again")
    return indices


class Rows:
    """Rows `index` of `tensor`, gathered when read (`rows[i]`, `rows[a:b]`, `rows[index_tensor]`).

    The training and held-out parts of a calibration split, without copying them: at 5,000
    images of 224 px the training copy was 3 GB. Reads give exactly what indexing a copy would.
    """

    def __init__(self, tensor: torch.Tensor, index: torch.Tensor) -> None:
        self.tensor, self.index = tensor, index

    @property
    def shape(self) -> torch.Size:
        return torch.Size((self.index.numel(), *self.tensor.shape[1:]))

    def __len__(self) -> int:
        return self.index.numel()

    def __getitem__(self, key: int | slice | torch.Tensor) -> torch.Tensor:
        return self.tensor[self.index[key]]


# What a healer reads as its calibration images: a tensor, rows of one, or images decoded when read.
Images = torch.Tensor | Rows | CalibrationImages
