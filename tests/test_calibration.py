"""The calibration split: stratified counts, determinism, byte-identical manifests, content hashes."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
import torch
from PIL import Image

from starfish.calibration import build_manifest, content_hash, resolve_manifest, stratified_indices, write_manifest
from starfish.datasets import FashionMNIST, ImageDataset, load_dataset
from starfish.errors import StarfishError
from starfish.io import read_json
from starfish.models import create_model


def class_counts(targets: list[int], indices: list[int]) -> dict[int, int]:
    counts = Counter(targets[i] for i in indices)
    return {c: counts.get(c, 0) for c in sorted(set(targets))}


TARGETS = [0] * 6 + [1] * 3 + [2] * 1  # 10 images, classes of 6, 3 and 1


def test_counts_are_proportional_with_largest_remainders() -> None:
    # fraction 0.5 -> 5 images; exact shares 3, 1.5, 0.5 -> floors 3, 1, 0; the one left over
    # goes to the larger remainder, ties to the lower class: class 1
    assert class_counts(TARGETS, stratified_indices(TARGETS, 0.5, seed=0)) == {0: 3, 1: 2, 2: 0}
    # fraction 0.3 -> 3 images; shares 1.8, 0.9, 0.3 -> floors 1, 0, 0; remainders pick class 1, then 0
    assert class_counts(TARGETS, stratified_indices(TARGETS, 0.3, seed=0)) == {0: 2, 1: 1, 2: 0}
    # fraction 0.7 -> 7 images; shares 4.2, 2.1, 0.7 -> floors 4, 2, 0; class 2 takes the remainder
    assert class_counts(TARGETS, stratified_indices(TARGETS, 0.7, seed=0)) == {0: 4, 1: 2, 2: 1}
    assert stratified_indices(TARGETS, 1.0, seed=3) == list(range(10))


def test_sum_is_exact_and_indices_sorted_and_unique() -> None:
    targets = [i % 7 for i in range(1000)] + [0] * 13
    for fraction in (0.004, 0.05, 0.123, 0.5):
        picked = stratified_indices(targets, fraction, seed=1)
        assert len(picked) == round(fraction * len(targets))
        assert picked == sorted(set(picked))
        for c, n in class_counts(targets, picked).items():
            share = fraction * targets.count(c)
            assert abs(n - share) < 1, (fraction, c)


def test_same_seed_same_pick_other_seed_other_pick() -> None:
    targets = [i % 10 for i in range(2000)]
    first = stratified_indices(targets, 0.05, seed=0)
    assert stratified_indices(targets, 0.05, seed=0) == first
    other = stratified_indices(targets, 0.05, seed=1)
    assert other != first
    assert class_counts(targets, other) == class_counts(targets, first)


def test_zero_images_raises_naming_the_field() -> None:
    with pytest.raises(StarfishError, match=r"calibration.fraction=0.01 of 10 training images yields 0 images"):
        stratified_indices(TARGETS, 0.01, seed=0)
    for bad in (0.0, -0.5, 1.5):
        with pytest.raises(StarfishError, match="calibration.fraction"):
            stratified_indices(TARGETS, bad, seed=0)


# --- real Fashion-MNIST ----------------------------------------------------------------------


def test_manifest_on_fashion_mnist_is_byte_identical(fmnist_train: FashionMNIST, tmp_path: Path) -> None:
    first, second = tmp_path / "a.json", tmp_path / "b.json"
    write_manifest(first, build_manifest(fmnist_train, "fashion-mnist", 0.004, seed=0))
    write_manifest(second, build_manifest(fmnist_train, "fashion-mnist", 0.004, seed=0))
    assert first.read_bytes() == second.read_bytes()
    manifest = read_json(first)
    assert manifest["num_samples"] == 240 and len(manifest["ids"]) == 240
    assert manifest["num_source"] == 60000
    indices = resolve_manifest(first, fmnist_train)
    assert len(indices) == 240
    assert set(Counter(fmnist_train.targets[i] for i in indices).values()) == {24}
    assert len(Counter(fmnist_train.targets[i] for i in indices)) == 10
    other = build_manifest(fmnist_train, "fashion-mnist", 0.004, seed=1)
    assert other["ids"] != manifest["ids"] and other["content_sha256"] != manifest["content_sha256"]


def test_manifest_holds_no_labels(fmnist_train: FashionMNIST) -> None:
    manifest = build_manifest(fmnist_train, "fashion-mnist", 0.004, seed=0)
    assert set(manifest) == {"version", "dataset", "split", "fraction", "seed", "num_source", "num_samples",
                             "ids", "content_sha256"}
    assert all(isinstance(i, str) and i.startswith("train/") and i[len("train/"):].isdigit()
               for i in manifest["ids"])
    assert all(not isinstance(v, list) or all(isinstance(x, str) for x in v) for v in manifest.values())


# --- content hash on an ImageFolder tree ------------------------------------------------------


def write_png(path: Path, value: int, size: int = 8) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (size, size), (value, value // 2, 255 - value)).save(path)


def make_tree(root: Path, per_class: int = 5) -> None:
    for c, name in enumerate(("boot", "shirt")):
        for i in range(per_class):
            write_png(root / "train" / name / f"{i}.png", 20 * i + 100 * c)


def open_tree(root: Path) -> ImageDataset:
    return load_dataset("imagefolder", root, "train", create_model("resnet10t", num_classes=2))


def test_content_hash_changes_when_a_sample_changes(tmp_path: Path) -> None:
    make_tree(tmp_path)
    data = open_tree(tmp_path)
    manifest_path = tmp_path / "calibration.json"
    manifest = build_manifest(data, "imagefolder", 0.4, seed=0)
    write_manifest(manifest_path, manifest)
    assert manifest["num_samples"] == 4
    assert resolve_manifest(manifest_path, open_tree(tmp_path)) == stratified_indices(data.targets, 0.4, 0)
    assert content_hash(data, list(range(len(data)))) == content_hash(open_tree(tmp_path), list(range(len(data))))

    picked = manifest["ids"][0]
    write_png(tmp_path / "train" / picked, 7)
    changed = open_tree(tmp_path)
    assert build_manifest(changed, "imagefolder", 0.4, seed=0)["content_sha256"] != manifest["content_sha256"]
    with pytest.raises(StarfishError, match="calibration data changed"):
        resolve_manifest(manifest_path, changed)


def test_unpicked_sample_change_keeps_the_hash(tmp_path: Path) -> None:
    make_tree(tmp_path)
    manifest = build_manifest(open_tree(tmp_path), "imagefolder", 0.4, seed=0)
    unpicked = next(i for i in open_tree(tmp_path).ids if i not in manifest["ids"])
    write_png(tmp_path / "train" / unpicked, 3)
    assert build_manifest(open_tree(tmp_path), "imagefolder", 0.4, seed=0)["content_sha256"] == \
        manifest["content_sha256"]


def test_resolve_manifest_raises_when_ids_are_missing(tmp_path: Path) -> None:
    make_tree(tmp_path)
    manifest_path = tmp_path / "calibration.json"
    manifest = build_manifest(open_tree(tmp_path), "imagefolder", 0.4, seed=0)
    write_manifest(manifest_path, manifest)
    (tmp_path / "train" / manifest["ids"][-1]).unlink()
    with pytest.raises(StarfishError, match="1 calibration ids .* are not in the dataset"):
        resolve_manifest(manifest_path, open_tree(tmp_path))
    with pytest.raises(StarfishError, match="does not exist; run `starfish sample` first"):
        resolve_manifest(tmp_path / "nope.json", open_tree(tmp_path))


def test_imagefolder_ids_are_relative_paths(tmp_path: Path) -> None:
    make_tree(tmp_path, per_class=2)
    data = open_tree(tmp_path)
    assert data.ids == ["boot/0.png", "boot/1.png", "shirt/0.png", "shirt/1.png"]
    assert data.sample_bytes(2) == (tmp_path / "train" / "shirt" / "0.png").read_bytes()
    assert torch.is_tensor(data[0][0])
