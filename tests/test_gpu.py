"""The GPU paths, where a CUDA device exists (skipped elsewhere): `pytest tests/test_gpu.py`.

Healing on CUDA in every precision keeps the masks and lowers the alignment loss; TF32
switches are restored afterwards; the disk cache of dense states and a compiled heal give the
plain heal's result; layerwise keeps its inputs on disk; evaluation runs in bf16.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from starfish.config import HealConfig, PruneConfig
from starfish.evaluate import check_masks_hold, predict
from starfish.healing import heal_
from starfish.models import create_model
from starfish.pruning import prune, sparsify_
from starfish.pruning.masks import Masks
from starfish.rows import scratch_folder

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def pruned_on_cuda() -> tuple[torch.nn.Module, torch.nn.Module, Masks, torch.Tensor]:
    torch.manual_seed(0)
    dense = create_model("starfish_vit_fmnist").cuda()
    masks = prune(dense, PruneConfig("magnitude", 0.75)).masks
    images = torch.randn(64, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    return dense, sparsify_(copy.deepcopy(dense), masks), masks, images


@pytest.mark.parametrize("precision", ["fp32", "tf32", "bf16"])
def test_heal_on_cuda_in_each_precision(precision: str) -> None:
    dense, model, masks, images = pruned_on_cuda()
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    report = heal_(model, dense, masks, images, HealConfig(steps=20, batch_size=16, precision=precision,
                                                           holdout_every=10))
    assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == saved
    check_masks_hold(model, masks)
    assert next(model.parameters()).is_cuda
    assert report["curve"][-1]["calibration_loss"] < report["curve"][0]["calibration_loss"]


def test_disk_cache_on_cuda_matches_memory(tmp_path: Path) -> None:
    results = []
    for mode in ("memory", "disk"):
        dense, model, masks, images = pruned_on_cuda()
        with scratch_folder(tmp_path):
            heal_(model, dense, masks, images, HealConfig(steps=10, batch_size=16, cache=mode, precision="fp32"))
        results.append(model.state_dict())
    assert all(torch.allclose(results[0][k], results[1][k], atol=1e-5) for k in results[0])


def test_evaluation_on_cuda_in_bf16() -> None:
    dense, _, _, images = pruned_on_cuda()
    data = torch.utils.data.TensorDataset(images, torch.zeros(len(images), dtype=torch.long))
    fp32, _ = predict(dense, data, batch_size=32, precision="fp32")
    bf16, _ = predict(dense, data, batch_size=32, precision="bf16")
    assert fp32.shape == bf16.shape == (64,) and float((fp32 == bf16).float().mean()) > 0.9


def test_compiled_heal_on_cuda_matches_eager() -> None:
    results = []
    for compiled in (False, True):
        dense, model, masks, images = pruned_on_cuda()
        heal_(model, dense, masks, images, HealConfig(steps=10, batch_size=16, precision="fp32", compile=compiled))
        check_masks_hold(model, masks)
        results.append(model.state_dict())
    assert all(torch.allclose(results[0][k], results[1][k], atol=1e-4) for k in results[0])


def test_layerwise_on_cuda_with_inputs_on_disk(tmp_path: Path) -> None:
    dense, model, masks, images = pruned_on_cuda()
    with scratch_folder(tmp_path):
        report = heal_(model, dense, masks, images, HealConfig(method="layerwise", batch_size=16, cache="disk"))
    check_masks_hold(model, masks)
    assert next(model.parameters()).is_cuda and all(v < 1 for v in report["relative_weight_change"].values())


def test_two_four_linears_run_as_semi_structured_sparse_tensors() -> None:
    from starfish.benchmarks.latency import to_semi_structured_

    torch.manual_seed(0)
    dense = create_model("deit_small_patch16_224", num_classes=10).eval()
    masks = prune(dense, PruneConfig("nm", 0.5, nm="2:4")).masks
    dense = sparsify_(dense, masks).to("cuda", torch.float16)
    sparse = copy.deepcopy(dense)
    skipped = to_semi_structured_(sparse, masks)
    assert len(skipped) < len(masks)
    x = torch.randn(32, 3, 224, 224, device="cuda", dtype=torch.float16)
    with torch.no_grad():
        assert torch.allclose(dense(x).float(), sparse(x).float(), atol=5e-2, rtol=5e-2)
