"""Checkpoints (safetensors with masks, .pth state dicts), model names, atomic writes, sidecars."""

from __future__ import annotations

import hashlib
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import starfish.io as io_module
from starfish.config import PruneConfig
from starfish.errors import StarfishError
from starfish.formats.checkpoint import read_checkpoint
from starfish.io import (
    atomic_path,
    atomic_write_bytes,
    atomic_write_json,
    read_json,
    sha256_file,
    sidecar_path,
    write_with_sidecar,
)
from starfish.models import (
    FASHION_MNIST_MEAN,
    FASHION_MNIST_STD,
    create_model,
    load_checkpoint,
    on_meta,
    save_checkpoint,
)
from starfish.pruning import prune, sparsify_


class NotATensor:
    """A pickled object a weights-only load must refuse."""


def assert_same_state(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for name in sa:
        assert torch.equal(sa[name], sb[name]), name


def test_safetensors_roundtrip_with_masks_and_metadata(vit: nn.Module, tmp_path: Path) -> None:
    masks = prune(vit, PruneConfig("magnitude", 0.5)).masks
    sparsify_(vit, masks)
    path = tmp_path / "pruned.safetensors"
    save_checkpoint(path, vit, "starfish_vit_fmnist", masks=masks, metadata={"sparsity": 0.5, "tag": ["a"]})
    model, loaded_masks, name = load_checkpoint(path)
    assert name == "starfish_vit_fmnist"
    assert not model.training
    assert_same_state(model, vit)
    assert set(loaded_masks) == set(masks)
    for key, mask in masks.items():
        assert loaded_masks[key].dtype == torch.bool
        assert torch.equal(loaded_masks[key], mask)
    state, _, metadata = read_checkpoint(path)
    assert not any(key.startswith("masks/") for key in state)
    assert metadata == {"model": "starfish_vit_fmnist", "num_classes": 10, "sparsity": 0.5, "tag": ["a"]}
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(model(x), vit(x))
    assert [p.name for p in tmp_path.iterdir()] == ["pruned.safetensors"]


def test_outputs_get_the_mode_the_umask_gives(vit: nn.Module, tmp_path: Path) -> None:
    """mkstemp makes 0600 files and safetensors recreates its file 0600; outputs are shared, so
    every one gets 0666 less the umask like any file: bytes, checkpoints and their sidecars."""
    previous = os.umask(0o027)
    try:
        atomic_write_bytes(tmp_path / "a.bin", b"x")
        save_checkpoint(tmp_path / "model.safetensors", vit, "starfish_vit_fmnist")
        write_with_sidecar(tmp_path / "b.bin", lambda path: path.write_bytes(b"y"))
        with open(tmp_path / "plain.bin", "wb"):
            pass
    finally:
        os.umask(previous)
    modes = {path.name: path.stat().st_mode & 0o777 for path in tmp_path.iterdir()}
    assert modes == dict.fromkeys(["a.bin", "model.safetensors", "b.bin", "b.bin.meta.json", "plain.bin"], 0o640)


def test_an_output_is_on_disk_before_its_name_and_its_name_after(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """fsync of the written file before the rename, and of its folder after it: a power loss
    leaves the old file or the whole new one."""
    events: list[str] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        events.append("fsync " + os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    def replace(source: str, target: str) -> None:
        events.append("rename")
        real_replace(source, target)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    atomic_write_bytes(tmp_path / "out.bin", b"x")
    assert len(events) == 3 and events[0].startswith(f"fsync {tmp_path}/.out.bin.") and events[0].endswith(".tmp")
    assert events[1:] == ["rename", f"fsync {tmp_path}"]


def test_a_write_deletes_the_temp_files_of_killed_writers_only(tmp_path: Path) -> None:
    """A SIGKILL mid-write leaves `.<name>.<host>-<pid>.*.tmp`; the next write of that output
    deletes it when that pid is gone, and leaves a live writer's alone."""
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    host = socket.gethostname()
    killed = tmp_path / f".out.bin.{host}-{dead.pid}.abc123.tmp"
    live = tmp_path / f".out.bin.{host}-{os.getpid()}.def456.tmp"
    other_output = tmp_path / f".other.bin.{host}-{dead.pid}.ghi789.tmp"
    for path in (killed, live, other_output):
        path.write_bytes(b"partial")
    atomic_write_bytes(tmp_path / "out.bin", b"x")
    assert not killed.exists() and live.exists() and other_output.exists()
    assert (tmp_path / "out.bin").read_bytes() == b"x"


def test_equal_models_save_to_equal_bytes(vit: nn.Module, tmp_path: Path) -> None:
    """Several metadata keys came out in a varying order (1 save in 6): hashes and dvc.lock changed."""
    masks = prune(vit, PruneConfig("magnitude", 0.5)).masks
    digests = set()
    for i in range(12):
        save_checkpoint(tmp_path / f"{i}.safetensors", vit, "starfish_vit_fmnist", masks=masks,
                        metadata={"b": 1, "a": 2, "c": [3]})
        digests.add(sha256_file(tmp_path / f"{i}.safetensors"))
    assert len(digests) == 1


def test_checkpoints_written_before_the_single_metadata_key_still_load(demo_checkpoint: Path) -> None:
    _, _, metadata = read_checkpoint(demo_checkpoint)  # the committed demo ViT has flat text keys
    assert metadata["model"] == "starfish_vit_fmnist" and metadata["num_classes"] == 10
    model, _, name = load_checkpoint(demo_checkpoint)
    assert name == "starfish_vit_fmnist" and model.num_classes == 10


def test_checkpoint_keeps_num_classes(tmp_path: Path) -> None:
    model = create_model("starfish_vit_fmnist", num_classes=3)
    save_checkpoint(tmp_path / "m.safetensors", model, "starfish_vit_fmnist")
    loaded, masks, _ = load_checkpoint(tmp_path / "m.safetensors")
    assert loaded.num_classes == 3 and masks == {}
    assert_same_state(loaded, model)


@pytest.mark.parametrize("wrap", [None, "state_dict", "model"])
def test_pth_state_dict_loads(vit: nn.Module, tmp_path: Path, wrap: str | None) -> None:
    path = tmp_path / "dense.pth"
    state = vit.state_dict()
    torch.save(state if wrap is None else {wrap: state, "epoch": 3}, path)
    assert_same_state(create_model("starfish_vit_fmnist", checkpoint=path), vit)


def test_pth_is_loaded_weights_only(vit: nn.Module, tmp_path: Path) -> None:
    path = tmp_path / "unsafe.pth"
    torch.save({**vit.state_dict(), "extra": NotATensor()}, path)
    with pytest.raises(StarfishError) as info:
        create_model("starfish_vit_fmnist", checkpoint=path)
    message = str(info.value)
    assert "never unpickles" in message and "\n" not in message
    assert "weights_only" not in message  # torch's advice to turn the guard off is never repeated
    truncated = tmp_path / "truncated.pth"
    torch.save(vit.state_dict(), truncated)
    truncated.write_bytes(truncated.read_bytes()[:500])
    with pytest.raises(StarfishError, match="damaged or truncated") as info:
        create_model("starfish_vit_fmnist", checkpoint=truncated)
    assert "\n" not in str(info.value) and "weights_only" not in str(info.value)


def test_checkpoint_for_another_model_names_missing_keys(tmp_path: Path) -> None:
    path = tmp_path / "resnet.pth"
    torch.save(create_model("resnet10t", num_classes=10).state_dict(), path)
    with pytest.raises(StarfishError, match="does not match the model .*missing: .*unexpected: "):
        create_model("starfish_vit_fmnist", checkpoint=path)


@pytest.mark.parametrize("name", ["starfish_vit_fmnist", "starfish_cnn_fmnist", "resnet10t", "convnext_atto",
                                  "swin_tiny_patch4_window7_224", "efficientnet_b0"])
def test_a_meta_build_has_the_real_build_s_tensors_and_no_memory(name: str) -> None:
    """The shapes a file's tensors are checked against: those of the model built for real."""
    real = create_model(name, num_classes=10).state_dict()
    with on_meta():
        probe = create_model(name, num_classes=10).state_dict()
    assert {key: (value.shape, value.dtype) for key, value in probe.items()} == \
        {key: (value.shape, value.dtype) for key, value in real.items()}
    assert all(value.is_meta for value in probe.values())
    assert torch.empty(2).device.type == "cpu"  # the default device is back


def test_checkpoint_with_other_shapes_names_the_mismatch(tmp_path: Path) -> None:
    path = tmp_path / "five.safetensors"
    save_checkpoint(path, create_model("starfish_vit_fmnist", num_classes=5), "starfish_vit_fmnist")
    with pytest.raises(StarfishError, match=r"shape mismatch: head.bias: \(5,\) vs \(10,\)"):
        create_model("starfish_vit_fmnist", checkpoint=path)


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_truncated_checkpoint_raises(vit: nn.Module, tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"dense{suffix}"
    if suffix == ".pth":
        torch.save(vit.state_dict(), path)
    else:
        save_checkpoint(path, vit, "starfish_vit_fmnist")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(StarfishError, match="damaged"):
        create_model("starfish_vit_fmnist", checkpoint=path)
    path.write_bytes(b"")
    with pytest.raises(StarfishError, match="damaged"):
        create_model("starfish_vit_fmnist", checkpoint=path)


def test_missing_and_unsupported_checkpoints_raise(tmp_path: Path) -> None:
    with pytest.raises(StarfishError, match="does not exist"):
        create_model("starfish_vit_fmnist", checkpoint=tmp_path / "nope.safetensors")
    (tmp_path / "weights.npz").write_bytes(b"x")
    with pytest.raises(StarfishError, match="unsupported suffix '.npz'"):
        create_model("starfish_vit_fmnist", checkpoint=tmp_path / "weights.npz")


def test_unknown_model_name_raises() -> None:
    with pytest.raises(StarfishError, match="unknown model 'no_such_model_xyz'"):
        create_model("no_such_model_xyz")


@pytest.mark.parametrize("name", ["starfish_vit_fmnist", "starfish_cnn_fmnist"])
def test_demo_models_honour_one_contract(name: str) -> None:
    model = create_model(name)
    cfg = model.pretrained_cfg
    assert cfg["architecture"] == name and cfg["input_size"] == (1, 28, 28) and cfg["num_classes"] == 10
    assert (cfg["mean"], cfg["std"]) == (FASHION_MNIST_MEAN, FASHION_MNIST_STD)
    with torch.no_grad():
        assert model(torch.randn(2, 1, 28, 28)).shape == (2, 10)
    with pytest.raises(StarfishError, match=f"{name} has no hub weights"):
        create_model(name, pretrained=True)


def test_demo_cnn_is_a_small_mobilenet_v1() -> None:
    model = create_model("starfish_cnn_fmnist")
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert sum(p.numel() for p in model.parameters()) == 72_842
    assert sum(m.groups == 1 and m.kernel_size == (1, 1) for m in convs) == 6  # the pointwise convs
    assert sum(m.groups == m.in_channels > 1 for m in convs) == 6  # the depthwise convs
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules())


def test_demo_cnn_roundtrip_keeps_batchnorm_statistics(tmp_path: Path) -> None:
    model = create_model("starfish_cnn_fmnist").train()
    with torch.no_grad():
        model(torch.randn(8, 1, 28, 28))  # moves the running statistics off their initial values
    masks = prune(model.eval(), PruneConfig("magnitude", 0.5)).masks
    sparsify_(model, masks)
    save_checkpoint(tmp_path / "cnn.safetensors", model, "starfish_cnn_fmnist", masks=masks)
    loaded, loaded_masks, name = load_checkpoint(tmp_path / "cnn.safetensors")
    assert name == "starfish_cnn_fmnist" and set(loaded_masks) == set(masks)
    assert_same_state(loaded, model)


def test_created_models_are_in_eval_mode() -> None:
    assert not create_model("starfish_vit_fmnist").training


# --- atomic writes and sidecars ----------------------------------------------------------------


def test_atomic_path_on_failure_leaves_no_temp_and_no_target(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "out.bin"
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"half")
            assert tmp.parent == target.parent and tmp.exists()
            raise RuntimeError("boom")
    assert not target.exists()
    assert list(target.parent.iterdir()) == []


def test_atomic_path_failure_keeps_the_previous_file(tmp_path: Path) -> None:
    target = tmp_path / "out.json"
    atomic_write_json(target, {"v": 1})
    before = target.read_bytes()
    with pytest.raises(KeyboardInterrupt):
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"{\"v\": ")
            raise KeyboardInterrupt
    assert target.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]


def test_failed_checkpoint_write_leaves_nothing(vit: nn.Module, tmp_path: Path) -> None:
    target = tmp_path / "pruned.safetensors"
    bad_masks = {"blocks.0.attn.qkv.weight": object()}  # not a tensor: fails while writing
    with pytest.raises(AttributeError):
        save_checkpoint(target, vit, "starfish_vit_fmnist", masks=bad_masks)  # type: ignore[dict-item]
    assert list(tmp_path.iterdir()) == []


def test_atomic_write_replaces_whole_file(tmp_path: Path) -> None:
    target = tmp_path / "a.bin"
    atomic_write_bytes(target, b"x" * 100)
    atomic_write_bytes(target, b"short")
    assert target.read_bytes() == b"short"
    assert os.listdir(tmp_path) == ["a.bin"]


def test_an_output_and_its_sidecar_are_written_as_one_unit(tmp_path: Path) -> None:
    out = tmp_path / "metrics.json"
    meta = write_with_sidecar(out, lambda path: atomic_write_json(path, {"b": 2, "a": 1}), config={"x": 1},
                              inputs={"in_sha256": "abc"})
    assert out.read_text() == '{\n  "a": 1,\n  "b": 2\n}\n'
    assert sidecar_path(out) == tmp_path / "metrics.json.meta.json"
    assert read_json(sidecar_path(out)) == meta
    assert meta == {"file": "metrics.json", "sha256": hashlib.sha256(out.read_bytes()).hexdigest(),
                    "config": {"x": 1}, "inputs": {"in_sha256": "abc"}}


def test_a_failed_write_keeps_the_old_pair(tmp_path: Path) -> None:
    out = tmp_path / "pruned.bin"
    old = write_with_sidecar(out, lambda path: path.write_bytes(b"old"), sparsity=0.5)

    def broken(path: Path) -> None:
        path.write_bytes(b"half")
        raise OSError("injected: disk full")

    with pytest.raises(OSError, match="disk full"):
        write_with_sidecar(out, broken, sparsity=0.75)
    assert out.read_bytes() == b"old" and read_json(sidecar_path(out)) == old
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pruned.bin", "pruned.bin.meta.json"]


def test_a_crash_between_the_two_renames_leaves_no_stale_sidecar(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """The new output is in place and its sidecar is not: the old sidecar must not describe it."""
    out = tmp_path / "pruned.bin"
    write_with_sidecar(out, lambda path: path.write_bytes(b"old"), sparsity=0.5)
    real_replace = os.replace

    def crash_on_sidecar(src: str, dst: str) -> None:
        if str(dst).endswith(".meta.json"):
            raise KeyboardInterrupt("injected: killed between the renames")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", crash_on_sidecar)
    with pytest.raises(KeyboardInterrupt):
        write_with_sidecar(out, lambda path: path.write_bytes(b"new"), sparsity=0.75)
    assert out.read_bytes() == b"new" and not sidecar_path(out).exists()
    assert [p.name for p in tmp_path.iterdir()] == ["pruned.bin"]


def test_timm_kwargs_shape_the_model_and_travel_with_its_checkpoint(tmp_path: Path) -> None:
    """model.kwargs reach timm (here a 32 px ViT: 4 patches + class token), and a checkpoint saved
    with them in its metadata rebuilds the same architecture."""
    kwargs = {"img_size": 32, "patch_size": 16, "embed_dim": 64, "depth": 2, "num_heads": 2}
    model = create_model("vit_tiny_patch16_224", num_classes=10, kwargs=kwargs)
    assert model.pos_embed.shape == (1, 5, 64) and len(model.blocks) == 2
    path = tmp_path / "small.safetensors"
    save_checkpoint(path, model, "vit_tiny_patch16_224", metadata={"model_kwargs": kwargs})
    loaded, _, _ = load_checkpoint(path)
    assert_same_state(loaded, model)
    with pytest.raises(StarfishError, match="fix model.kwargs"):
        create_model("resnet18", kwargs={"img_size": 32})


def _hashing_calls(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    calls: list[str] = []
    real = hashlib.new
    monkeypatch.setattr(io_module.hashlib, "new", lambda name: calls.append(name) or real(name))
    return calls


def test_an_unchanged_file_is_hashed_once_and_a_rewrite_with_its_old_times_is_hashed_again(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "weights.bin"
    path.write_bytes(b"a" * 4096)
    stat = path.stat()
    monkeypatch.setattr(io_module, "RACY_NS", -1)  # as if it had been written long ago
    calls = _hashing_calls(monkeypatch)
    first = sha256_file(path)
    assert sha256_file(path) == first and len(calls) == 1
    path.write_bytes(b"b" * 4096)  # same size, and the old times put back: only ctime moves
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert sha256_file(path) == hashlib.sha256(b"b" * 4096).hexdigest() != first and len(calls) == 2


def test_a_file_written_just_now_is_read_every_time(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "weights.bin"
    path.write_bytes(b"a" * 4096)
    calls = _hashing_calls(monkeypatch)
    sha256_file(path)
    sha256_file(path)
    assert len(calls) == 2  # a write within the same clock tick would not have moved its times
