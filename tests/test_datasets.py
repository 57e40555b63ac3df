"""Datasets: the IDX reader on hand-made files, clear errors, and ImageFolder trees for timm CNNs."""

from __future__ import annotations

import gzip
import os
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from timm.data import resolve_data_config

from starfish.calibration import build_manifest, load_images
from starfish.datasets import (
    FashionMNIST,
    TensorTransform,
    _read_idx,
    load_dataset,
    loader_workers,
    make_loader,
    usable_cores,
)
from starfish.errors import StarfishError
from starfish.models import create_model
from starfish.rows import scratch_folder

IMAGES = torch.tensor([[[0, 255], [51, 102]], [[10, 20], [30, 40]], [[255, 255], [0, 0]]], dtype=torch.uint8)
LABELS = torch.tensor([3, 0, 9], dtype=torch.uint8)


def idx_bytes(array: torch.Tensor) -> bytes:
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.numpy().tobytes()


def write_idx(path: Path, array: torch.Tensor, gz: bool) -> Path:
    data = idx_bytes(array)
    if gz:
        path = path.with_name(path.name + ".gz")
        path.write_bytes(gzip.compress(data))
    else:
        path.write_bytes(data)
    return path


def write_fmnist(root: Path, gz: bool, split: str = "train") -> None:
    stems = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
             "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}[split]
    root.mkdir(parents=True, exist_ok=True)
    write_idx(root / stems[0], IMAGES, gz)
    write_idx(root / stems[1], LABELS, gz)


IDENTITY = TensorTransform((1, 2, 2), mean=(0.0,), std=(1.0,))


@pytest.mark.parametrize("gz", [False, True])
def test_read_idx(tmp_path: Path, gz: bool) -> None:
    path = write_idx(tmp_path / "images-idx3-ubyte", IMAGES, gz)
    assert torch.equal(_read_idx(path), IMAGES)
    assert torch.equal(_read_idx(write_idx(tmp_path / "labels-idx1-ubyte", LABELS, gz)), LABELS)


def test_an_idx_file_is_decoded_once_until_it_changes(tmp_path: Path) -> None:
    path = write_idx(tmp_path / "images-idx3-ubyte", IMAGES, gz=True)
    first = _read_idx(path)
    assert _read_idx(path) is first  # the same decoded tensor: no second decompression
    assert write_idx(tmp_path / "images-idx3-ubyte", IMAGES.flip(0), gz=True) == path
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 1))  # even within one clock tick
    assert torch.equal(_read_idx(path), IMAGES.flip(0))


@pytest.mark.parametrize("gz", [False, True])
def test_fashion_mnist_from_idx_files(tmp_path: Path, gz: bool) -> None:
    write_fmnist(tmp_path, gz)
    data = FashionMNIST(tmp_path, "train", IDENTITY)
    assert len(data) == 3
    assert data.targets == [3, 0, 9]
    assert data.ids == ["train/00000", "train/00001", "train/00002"]
    image, target = data[0]
    assert target == 3
    assert torch.allclose(image, torch.tensor([[[0.0, 1.0], [0.2, 0.4]]]))
    assert data.sample_bytes(1) == bytes([10, 20, 30, 40])
    batch = data.__getitems__([2, 0])
    assert [t for _, t in batch] == [9, 3]
    assert torch.equal(batch[1][0], image)


def test_transform_resizes_expands_and_normalizes() -> None:
    transform = TensorTransform((3, 4, 4), mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    out = transform(torch.full((2, 2, 2), 255, dtype=torch.uint8))
    assert out.shape == (2, 3, 4, 4)
    assert torch.allclose(out, torch.ones_like(out))


def test_truncated_idx_raises(tmp_path: Path) -> None:
    path = tmp_path / "train-images-idx3-ubyte"
    path.write_bytes(idx_bytes(IMAGES)[:-1])
    with pytest.raises(StarfishError, match=r"is truncated \(27 of 28 bytes\)"):
        _read_idx(path)
    path.write_bytes(idx_bytes(IMAGES)[:9])  # cut inside the header's dimensions
    with pytest.raises(StarfishError, match="is truncated"):
        _read_idx(path)
    gz = tmp_path / "x-idx3-ubyte.gz"
    gz.write_bytes(gzip.compress(idx_bytes(IMAGES))[:-6])
    with pytest.raises(StarfishError, match="cannot read IDX file"):
        _read_idx(gz)


def test_not_an_idx_file_raises(tmp_path: Path) -> None:
    path = tmp_path / "train-images-idx3-ubyte"
    path.write_bytes(b"\x89PNG\r\n\x1a\n")
    with pytest.raises(StarfishError, match="is not an unsigned-byte IDX file"):
        _read_idx(path)


def test_label_count_mismatch_raises(tmp_path: Path) -> None:
    write_fmnist(tmp_path, gz=False)
    write_idx(tmp_path / "train-labels-idx1-ubyte", LABELS[:2], gz=False)
    with pytest.raises(StarfishError, match="3 images but 2 labels"):
        FashionMNIST(tmp_path, "train", IDENTITY)


def test_missing_root_and_files_name_the_install_command(tmp_path: Path) -> None:
    with pytest.raises(StarfishError, match="`apt-get install dataset-fashion-mnist`"):
        FashionMNIST(tmp_path / "nowhere", "train", IDENTITY)
    write_fmnist(tmp_path, gz=True, split="train")
    with pytest.raises(StarfishError, match=r"t10k-images-idx3-ubyte\[.gz\] not found .*"
                                            "`apt-get install dataset-fashion-mnist`"):
        FashionMNIST(tmp_path, "test", IDENTITY)
    with pytest.raises(StarfishError, match="unknown split 'val'"):
        FashionMNIST(tmp_path, "val", IDENTITY)


def test_unknown_dataset_kind_raises(tmp_path: Path) -> None:
    with pytest.raises(StarfishError, match="unknown dataset kind 'cifar'"):
        load_dataset("cifar", tmp_path, "train", create_model("starfish_vit_fmnist"))


def test_real_fashion_mnist_matches_the_demo_model(fmnist_root: Path) -> None:
    model = create_model("starfish_vit_fmnist")
    test = load_dataset("fashion-mnist", fmnist_root, "test", model)
    assert len(test) == 10000 and sorted(set(test.targets)) == list(range(10))
    images, labels = next(iter(make_loader(test, batch_size=4)))
    assert images.shape == (4, 1, 28, 28)
    assert labels.tolist() == test.targets[:4]
    with torch.no_grad():
        assert model(images).shape == (4, 10)


# --- ImageFolder -----------------------------------------------------------------------------


def make_tree(root: Path) -> None:
    for c, name in enumerate(("cat", "dog")):
        for i in range(3):
            path = root / "train" / name / f"img{i}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (40, 30), (40 * i, 100 * c, 50)).save(path)


def test_imagefolder_with_timm_eval_transform(tmp_path: Path) -> None:
    make_tree(tmp_path)
    model = create_model("resnet10t", num_classes=2)
    data = load_dataset("imagefolder", tmp_path, "train", model)
    assert data.ids == [f"{c}/img{i}.png" for c in ("cat", "dog") for i in range(3)]
    assert data.targets == [0, 0, 0, 1, 1, 1]
    image, target = data[4]
    assert target == 1
    assert image.shape == resolve_data_config({}, model=model)["input_size"]
    images, _ = next(iter(make_loader(data, batch_size=6)))
    with torch.no_grad():
        assert model(images).shape == (6, 2)


def test_kept_pixels_finish_bitwise_into_the_items_of_the_whole_transform(tmp_path: Path, fmnist_root: Path) -> None:
    """Calibration images are kept as uint8 pixels and finished per batch; reads equal the items."""
    from timm.data import create_transform

    rng = np.random.default_rng(0)
    for i in range(6):
        path = tmp_path / "train" / f"c{i % 2}" / f"{i}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (50 + i, 61, 3), dtype=np.uint8)).save(path, quality=90)
    model = create_model("resnet10t", num_classes=2)
    folder = load_dataset("imagefolder", tmp_path, "train", model)
    whole = create_transform(**resolve_data_config({}, model=model), is_training=False)
    assert folder.pixels(0).dtype == torch.uint8
    assert all(torch.equal(folder[i][0], whole(Image.open(tmp_path / "train" / folder.ids[i]).convert("RGB")))
               for i in range(6))
    small_vit = create_model("starfish_vit_fmnist", kwargs={"img_size": 32})  # a resize in the transform
    fmnist = load_dataset("fashion-mnist", fmnist_root, "test", small_vit)
    for data, picked in ((folder, [5, 0, 3, 1]), (fmnist, [9, 3, 4000, 17, 2])):
        items = torch.stack([data[i][0] for i in picked])
        for on_disk in (True, False):
            with scratch_folder(tmp_path / "scratch"):
                kept = load_images(data, picked, on_disk=on_disk)
            assert kept.shape == items.shape and torch.equal(kept[:], items)
            assert torch.equal(kept[torch.tensor([3, 0])], items[[3, 0]]) and torch.equal(kept[-1], items[-1])
            kept.close()


def test_imagefolder_missing_split_raises(tmp_path: Path) -> None:
    model = create_model("resnet10t", num_classes=2)
    with pytest.raises(StarfishError, match="ImageFolder split .* does not exist"):
        load_dataset("imagefolder", tmp_path, "train", model)
    (tmp_path / "train" / "empty").mkdir(parents=True)
    with pytest.raises(StarfishError, match="cannot read ImageFolder"):
        load_dataset("imagefolder", tmp_path, "train", model)


def test_corrupt_images_are_named_when_the_split_is_drawn(tmp_path: Path) -> None:
    """A bad PNG and a truncated JPEG are refused by `sample`, by name, instead of failing mid-heal."""
    make_tree(tmp_path)
    (tmp_path / "train" / "cat" / "img1.png").write_bytes(b"\x89PNG\r\n\x1a\n not a png")
    jpeg = tmp_path / "train" / "dog" / "img2.jpg"
    Image.new("RGB", (40, 30), (200, 10, 10)).save(jpeg, quality=95)
    jpeg.write_bytes(jpeg.read_bytes()[:300])
    model = create_model("resnet10t", num_classes=2)
    data = load_dataset("imagefolder", tmp_path, "train", model)
    for workers in (0, 2):  # decoded in this process, or by a pool of loader processes
        with pytest.raises(StarfishError) as info:
            build_manifest(data, "imagefolder", 1.0, seed=0, num_workers=workers)
        message = str(info.value)
        assert message.startswith("2 calibration image(s) cannot be decoded: cat/img1.png (")
        assert "dog/img2.jpg (" in message and "sample again" in message and "\n" not in message
    good = [i for i, sample_id in enumerate(data.ids) if sample_id not in ("cat/img1.png", "dog/img2.jpg")]
    serial = load_images(data, good)
    assert serial.shape[0] == 5 and torch.equal(load_images(data, good, num_workers=2)[:], serial[:])
    assert torch.equal(serial[1], data[good[1]][0])


def test_loader_workers_auto_and_a_worker_pool_gives_the_same_batches(tmp_path: Path, fmnist_root: Path) -> None:
    make_tree(tmp_path)
    model = create_model("resnet10t", num_classes=2)
    folder = load_dataset("imagefolder", tmp_path, "train", model)
    assert loader_workers(folder, None) == usable_cores() and loader_workers(folder, 3) == 3
    assert loader_workers(load_dataset("fashion-mnist", fmnist_root, "test", create_model("starfish_vit_fmnist")),
                          None) == 0  # already decoded in memory
    serial = [images for images, _ in make_loader(folder, batch_size=4, num_workers=0)]
    pooled = [images for images, _ in make_loader(folder, batch_size=4, num_workers=2)]
    assert len(serial) == len(pooled) == 2 and all(torch.equal(a, b) for a, b in zip(serial, pooled))


def test_fingerprints_change_with_the_files_not_with_reading(tmp_path: Path) -> None:
    make_tree(tmp_path)
    model = create_model("resnet10t", num_classes=2)
    first = load_dataset("imagefolder", tmp_path, "train", model).fingerprint()
    assert load_dataset("imagefolder", tmp_path, "train", model).fingerprint() == first
    Image.new("RGB", (41, 30), (1, 2, 3)).save(tmp_path / "train" / "dog" / "img0.png")
    assert load_dataset("imagefolder", tmp_path, "train", model).fingerprint() != first
