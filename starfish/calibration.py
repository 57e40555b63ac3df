"""The calibration split: a deterministic, class-stratified, unlabeled sample of the training set.

The manifest lists sample ids only (no labels: healing is label-free) and a content hash over
the ids and the samples' bytes, so the same seed and data give a byte-identical manifest, and
a changed image changes the hash.
"""

from __future__ import annotations

import hashlib
import json
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch

from starfish.datasets import ImageDataset
from starfish.errors import StarfishError
from starfish.io import atomic_write_json

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


def load_images(dataset: ImageDataset, indices: list[int]) -> torch.Tensor:
    """The samples at `indices`, decoded and transformed, as one tensor; every sample that cannot
    be decoded is named in one error, so a bad file is found when the split is drawn, not mid-heal."""
    images, bad = [], []
    for index in indices:
        try:
            images.append(dataset[index][0])
        except Exception as exc:  # PIL and torchvision raise OSError, ValueError, SyntaxError, ...
            bad.append(f"{dataset.ids[index]} ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})")
    if bad:
        raise StarfishError(f"{len(bad)} calibration image(s) cannot be decoded: {'; '.join(bad[:5])}"
                            f"{' ...' if len(bad) > 5 else ''}; fix or remove them, then sample again")
    return torch.stack(images)


def build_manifest(dataset: ImageDataset, dataset_kind: str, fraction: float, seed: int) -> dict[str, Any]:
    indices = stratified_indices(dataset.targets, fraction, seed)
    load_images(dataset, indices)  # a split of images that decode, or an error naming those that do not
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
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
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
