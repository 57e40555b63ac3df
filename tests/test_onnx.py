"""ONNX export: checked by onnx.checker and against torch before it is kept, on every covered
family, slim or dense, and served by the registered pyfunc with torch's answers; a model the
exporter cannot trace is one line, exit 2, nothing written."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import numpy as np
import onnx
import pytest
import torch
from mlflow import MlflowClient
from mlflow.models import infer_signature
from timm.models import register_model

from starfish import tracking
from starfish.cli import main
from starfish.config import PruneConfig
from starfish.datasets import load_dataset
from starfish.formats.onnx import read_metadata, run_session, session
from starfish.io import read_json, sha256_file, sidecar_path
from starfish.models import create_model, load_checkpoint, save_checkpoint
from starfish.pruning import prune, sparsify_
from starfish.pruning.slim import slim_, slim_masks

FAMILIES = [
    ("starfish_vit_fmnist", {}, "neurons+heads", (1, 28, 28)),
    ("starfish_cnn_fmnist", {}, "channels", (1, 28, 28)),
    ("vit_tiny_patch16_224", {"img_size": 32, "depth": 2}, "neurons+heads", (3, 32, 32)),
    ("swin_tiny_patch4_window7_224", {"img_size": 56, "depths": (1, 1, 1, 1), "embed_dim": 32,
                                      "num_heads": (2, 2, 4, 4)}, "neurons+heads", (3, 56, 56)),
    ("convnext_atto", {}, "channels", (3, 64, 64)),
    ("resnet26", {}, "channels", (3, 64, 64)),
    ("mobilenetv3_small_100", {}, "channels", (3, 64, 64)),
]


@pytest.mark.parametrize("name, kwargs, structure, size", FAMILIES, ids=[f[0] for f in FAMILIES])
def test_the_onnx_export_of_a_slim_model_matches_torch_and_serves_its_answers(
        name: str, kwargs: dict, structure: str, size: tuple[int, ...], tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = create_model(name, kwargs={**kwargs, "pretrained_cfg_overlay": {"input_size": size}}).eval()
    masks = prune(model, PruneConfig("magnitude", 0.5, structure=structure)).masks
    slim_(sparsify_(model, masks), masks)
    checkpoint = tmp_path / "slim.safetensors"
    save_checkpoint(checkpoint, model, name, masks=slim_masks(model),
                    metadata={"model_kwargs": {**kwargs, "pretrained_cfg_overlay": {"input_size": list(size)}}})
    out = tmp_path / "slim.onnx"
    assert main(["export", "--format", "onnx", "--checkpoint", str(checkpoint), "--out", str(out)]) == 0
    onnx.checker.check_model(str(out), full_check=True)
    images = torch.randn(5, *size, generator=torch.Generator().manual_seed(3))  # a batch size not traced
    with torch.no_grad():
        expected = model(images).numpy()
    assert np.abs(run_session(session(out), images) - expected).max() <= 1e-4
    meta = read_json(sidecar_path(out))
    assert meta["sha256"] == sha256_file(out) and meta["check"]["max_abs_difference"] <= 1e-4
    assert meta["flops_ratio"] < 0.8 and read_metadata(out)["checkpoint_sha256"] == sha256_file(checkpoint)
    assert json.loads(read_metadata(out)["architecture"])["kept"]

    # registered as the compress flow registers it, and loaded as `mlflow models serve` loads the champion
    store, before = f"sqlite:///{tmp_path / 'mlflow.db'}", mlflow.get_tracking_uri()
    example = images[:2].numpy()
    try:
        mlflow.set_tracking_uri(store)
        client = MlflowClient(store)
        with mlflow.start_run(experiment_id=client.create_experiment("onnx")):  # not this process's active one
            info = tracking.log_served_model(out, "onnx", example, infer_signature(example, expected[:2]), name)
        client.set_registered_model_alias(name, "champion", info.registered_model_version)
        served = mlflow.pyfunc.load_model(f"models:/{name}@champion").predict(images.numpy())
    finally:
        mlflow.set_tracking_uri(before)
    assert np.abs(np.asarray(served) - expected).max() <= 1e-4


def test_the_healed_demo_vit_exports_and_agrees_on_real_test_images(demo_checkpoint: Path, tmp_path: Path,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "dense.onnx"
    assert main(["export", "--format", "onnx", "--checkpoint", str(demo_checkpoint), "--out", str(out)]) == 0
    assert json.loads(capsys.readouterr().out)["flops_ratio"] == 1.0
    model, _, _ = load_checkpoint(demo_checkpoint)
    test = load_dataset("fashion-mnist", "/usr/share/datasets/fashion-mnist", "test", model)
    images = torch.stack([test[i][0] for i in range(64)])
    with torch.no_grad():
        expected = model(images).numpy()
    assert np.abs(run_session(session(out), images) - expected).max() <= 1e-4


class DataDependent(torch.nn.Module):
    """A forward whose control flow depends on the values: no exporter can trace it to one graph."""

    def __init__(self, num_classes: int = 10, **kwargs: object) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.fc = torch.nn.Linear(4, num_classes)
        self.pretrained_cfg = {"input_size": (1, 2, 2), "mean": (0.0,), "std": (1.0,), "crop_pct": 1.0,
                               "interpolation": "bilinear", "num_classes": num_classes}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.flatten(1)
        return self.fc(flat) if float(flat.sum()) > 0 else -self.fc(flat)


@register_model
def starfish_test_data_dependent(pretrained: bool = False, **kwargs: object) -> DataDependent:
    return DataDependent(**kwargs)


def test_a_model_that_cannot_be_traced_is_one_line_and_nothing_is_written(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    checkpoint = tmp_path / "odd.safetensors"
    save_checkpoint(checkpoint, DataDependent(), "starfish_test_data_dependent")
    out = tmp_path / "out" / "odd.onnx"
    assert main(["export", "--format", "onnx", "--checkpoint", str(checkpoint), "--out", str(out)]) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("starfish: error:")]
    assert len(lines) == 1 and "cannot export starfish_test_data_dependent to ONNX" in lines[0]
    assert not out.parent.exists() or not any(out.parent.iterdir())


def test_a_model_whose_outputs_do_not_depend_on_its_input_is_refused_before_export(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """MLP-Mixer as timm builds it (its head initialized to zero) answers 0 to every image, so
    onnxruntime agreeing with torch on the check batch would prove nothing: one line, nothing
    written."""
    from starfish.models import create_model

    mixer = create_model("mixer_s16_224", num_classes=10, kwargs={"img_size": 32})
    checkpoint = tmp_path / "mixer.safetensors"
    save_checkpoint(checkpoint, mixer, "mixer_s16_224", metadata={"model_kwargs": {"img_size": 32}})
    out = tmp_path / "out" / "mixer.onnx"
    assert main(["export", "--format", "onnx", "--checkpoint", str(checkpoint), "--out", str(out)]) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("starfish: error:")]
    assert len(lines) == 1 and "gives every check image the same outputs (they spread by 0.0e+00)" in lines[0]
    assert not out.parent.exists() or not any(out.parent.iterdir())
