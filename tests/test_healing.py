"""Healers: masks hold, only the scope trains, hooks go away, losses and solvers hand-checked."""

from __future__ import annotations

import copy
import logging
import math
import shutil
import time
from pathlib import Path

import pytest
import timm
import torch
from torch import nn

from starfish.calibration import stratified_indices
from starfish.capture import ActivationCapture, block_names, state_names
from starfish.catalog import HEALERS
from starfish.config import HealConfig, PruneConfig, recipe_config
from starfish.datasets import FashionMNIST
from starfish.errors import StarfishError
from starfish.evaluate import check_masks_hold
from starfish.healing import baselines, heal_
from starfish.healing.baselines import (
    InputOf,
    PairedInputs,
    cg_least_squares,
    masked_least_squares,
    solve_rows,
    sparsegpt_least_squares,
)
from starfish.healing.batchnorm import batchnorm_buffers
from starfish.healing.common import between_chunks, masked_training, split_calibration
from starfish.healing.targets import ModeCosts, available_memory, choose_mode
from starfish.losses import cosine_loss, nmse_loss
from starfish.models import create_model, load_checkpoint, save_checkpoint
from starfish.pruning import prune, sparsify_
from starfish.pruning.masks import Masks
from starfish.recipes import RECIPES
from starfish.rows import FileRows, scratch_folder


def variant(name: str, **fields: object) -> HealConfig:
    """A bench variant (every registered healer, and STARFISH's presets) with test-sized settings."""
    return recipe_config(HealConfig(**fields), name, seed=0)


def pruned_pair(sparsity: float = 0.5, seed: int = 0) -> tuple[nn.Module, nn.Module, Masks]:
    """(dense, pruned copy, masks) of the demo ViT with seeded random weights."""
    torch.manual_seed(seed)
    dense = create_model("starfish_vit_fmnist")
    masks = prune(dense, PruneConfig("magnitude", sparsity)).masks
    return dense, sparsify_(copy.deepcopy(dense), masks), masks


def random_images(n: int = 16, shape: tuple[int, ...] = (1, 28, 28), seed: int = 0) -> torch.Tensor:
    return torch.randn(n, *shape, generator=torch.Generator().manual_seed(seed))


def no_hooks(model: nn.Module) -> bool:
    modules_clean = all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    params_clean = all(not getattr(p, "_backward_hooks", None) and not getattr(p, "_post_accumulate_grad_hooks", None)
                       for p in model.parameters())
    return modules_clean and params_clean


def clone_masks(masks: Masks) -> Masks:
    return {k: v.clone() for k, v in masks.items()}


def test_every_registered_healer_is_covered() -> None:
    assert {variant(name).method for name in RECIPES.names()} == set(HEALERS.names())


@pytest.mark.parametrize("healer", RECIPES.names())
def test_healers_keep_masks_and_remove_hooks(healer: str) -> None:
    dense, model, masks = pruned_pair()
    before_masks = clone_masks(masks)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    dense_state = {k: v.clone() for k, v in dense.state_dict().items()}
    # six steps for every variant, also those whose preset sets a budget of its own (fast's 400)
    cfg = recipe_config(HealConfig(batch_size=8, holdout_every=3), healer, seed=0, steps=6)
    report = heal_(model, dense, masks, random_images(), cfg)
    assert isinstance(report, dict)
    check_masks_hold(model, masks)
    for name, mask in masks.items():
        assert torch.equal(mask, before_masks[name]), name
    for name, value in dense.state_dict().items():
        assert torch.equal(value, dense_state[name]), f"{healer} changed the dense model's {name}"
    assert no_hooks(model) and no_hooks(dense)
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, before[k])]
    if healer == "none":
        assert changed == []
    elif not report.get("kept_pruned"):
        assert changed, f"{healer} changed nothing"


@pytest.mark.parametrize("healer", ["faithful", "logit-kd", "recommended"])
def test_alignment_trains_only_the_scope_weights(healer: str) -> None:
    dense, model, masks = pruned_pair()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    heal_(model, dense, masks, random_images(), variant(healer, epochs=1, batch_size=8, holdout=0.0))
    state = model.state_dict()
    for name, value in state.items():
        if name in masks:
            continue
        assert torch.equal(value, before[name]), f"{healer} changed {name}, which is outside the scope"
    frozen = {"patch_embed.proj.weight", "patch_embed.proj.bias", "pos_embed", "cls_token", "head.weight",
              "head.bias", "norm.weight", "blocks.0.norm1.weight", "blocks.0.attn.qkv.bias"}
    assert frozen <= set(state)
    assert all(not torch.equal(state[name], before[name]) for name in masks), "some scope weight did not train"


def test_requires_grad_flags_restored_after_healing() -> None:
    dense, model, masks = pruned_pair()
    model.head.weight.requires_grad_(False)
    model.blocks[0].attn.qkv.weight.requires_grad_(False)
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    heal_(model, dense, masks, random_images(8), HealConfig(epochs=1, batch_size=8))
    assert {name: p.requires_grad for name, p in model.named_parameters()} == flags
    assert all(p.grad is None or name in masks for name, p in model.named_parameters())


def test_masked_training_restores_everything_after_an_exception() -> None:
    _, model, masks = pruned_pair()
    model.head.bias.requires_grad_(False)
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    name = "blocks.1.mlp.fc1.weight"
    with pytest.raises(RuntimeError, match="mid-step"):
        with masked_training(model, masks) as trainable:
            assert len(trainable) == len(masks)
            assert {n for n, p in model.named_parameters() if p.requires_grad} == set(masks)
            with torch.no_grad():
                dict(model.named_parameters())[name].add_(1.0)  # revives pruned entries
            raise RuntimeError("mid-step")
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert no_hooks(model)
    check_masks_hold(model, masks)


def test_gradients_of_pruned_entries_are_zero() -> None:
    _, model, masks = pruned_pair()
    with masked_training(model, masks):
        model(random_images(2)).sum().backward()
        for name, p in model.named_parameters():
            if name in masks:
                assert bool((p.grad[~masks[name]] == 0).all()), name
                assert bool((p.grad[masks[name]] != 0).any()), name
            else:
                assert p.grad is None, name


# --- capture -----------------------------------------------------------------------------------


def test_capture_removes_hooks_after_an_exception(vit: nn.Module) -> None:
    names = block_names(vit)
    assert names == ["blocks.0", "blocks.1", "blocks.2", "blocks.3"]
    with pytest.raises(RuntimeError):
        with ActivationCapture(vit, names) as capture:
            vit(random_images(2))
            assert set(capture.values) == set(names)
            assert capture.values["blocks.0"].shape == (2, 50, 64)
            vit(torch.zeros(2, 3, 28, 28))  # wrong channel count: the forward pass itself raises
    assert no_hooks(vit)
    with pytest.raises(KeyError):
        with ActivationCapture(vit, names, inputs=True):
            raise KeyError("user code")
    assert no_hooks(vit)


def test_capture_of_unknown_modules_raises(vit: nn.Module) -> None:
    with pytest.raises(StarfishError, match=r"cannot capture \['blocks.9'\]"):
        ActivationCapture(vit, ["blocks.9"])
    assert no_hooks(vit)


# --- losses ------------------------------------------------------------------------------------


def test_cosine_loss_is_per_token_for_3d_states() -> None:
    student = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    assert cosine_loss(student, torch.tensor([[[1.0, 0.0], [1.0, 0.0]]])).item() == pytest.approx(0.5)
    # each token is parallel to its target, though the flattened sample is not
    assert cosine_loss(student, torch.tensor([[[1.0, 0.0], [0.0, 2.0]]])).item() == pytest.approx(0.0, abs=1e-7)
    opposite = torch.tensor([[[-1.0, 0.0], [0.0, -3.0]]])
    assert cosine_loss(student, opposite).item() == pytest.approx(2.0)


def test_cosine_loss_is_per_sample_for_4d_states() -> None:
    student = torch.tensor([[[[1.0, 0.0], [0.0, 1.0]]]])  # (1, 1, 2, 2)
    teacher = torch.tensor([[[[1.0, 0.0], [0.0, 2.0]]]])
    # flattened: [1, 0, 0, 1] . [1, 0, 0, 2] = 3, norms sqrt(2) and sqrt(5)
    assert cosine_loss(student, teacher).item() == pytest.approx(1 - 3 / math.sqrt(10), rel=1e-6)
    two = torch.stack([student[0], -student[0]])
    assert cosine_loss(two, torch.stack([student[0], student[0]])).item() == pytest.approx(1.0)


def test_cosine_loss_gives_torchs_cosine_similarity_and_its_gradient() -> None:
    generator = torch.Generator().manual_seed(0)
    for shape in [(4, 5, 6), (3, 2, 4, 4)]:
        student = torch.randn(*shape, generator=generator, dtype=torch.float64, requires_grad=True)
        teacher = torch.randn(*shape, generator=generator, dtype=torch.float64)
        rows = (lambda x: x.reshape(-1, x.shape[-1])) if len(shape) == 3 else (lambda x: x.reshape(x.shape[0], -1))
        expected = (1 - torch.nn.functional.cosine_similarity(rows(student), rows(teacher), dim=-1)).mean()
        value = cosine_loss(student, teacher)
        assert float(value) == pytest.approx(float(expected), abs=1e-12)
        (grad,), (expected_grad,) = torch.autograd.grad(value, student), torch.autograd.grad(expected, student)
        assert torch.allclose(grad, expected_grad, atol=1e-12)


def test_cosine_loss_written_out_gradient_holds_at_a_zero_row_and_across_dtypes() -> None:
    generator = torch.Generator().manual_seed(1)
    teacher = torch.randn(2, 3, 5, generator=generator, dtype=torch.float64)
    student = torch.randn(2, 3, 5, generator=generator, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda x: cosine_loss(x, teacher), (student.clone().requires_grad_(),))
    student[0, 1] = 0.0  # a dead token: below the floor, where autograd's own graph of the formula still answers
    student.requires_grad_()
    rows = student.reshape(-1, 5), teacher.reshape(-1, 5)
    norms = torch.linalg.vector_norm(rows[0], dim=-1) * torch.linalg.vector_norm(rows[1], dim=-1)
    by_autograd = (1 - torch.linalg.vecdot(*rows) / norms.clamp_min(1e-8)).mean()
    value = cosine_loss(student, teacher)
    assert float(value) == pytest.approx(float(by_autograd), abs=1e-12)
    (grad,), (expected,) = torch.autograd.grad(value, student), torch.autograd.grad(by_autograd, student)
    assert torch.isfinite(grad).all() and torch.allclose(grad, expected, rtol=1e-12, atol=0)
    # bfloat16 states against float32 targets: computed in float32, the gradient in the states' dtype
    low = student.detach().to(torch.bfloat16).requires_grad_()
    value = cosine_loss(low, teacher.float())
    value.backward()
    assert value.dtype == torch.float32 and low.grad.dtype == torch.bfloat16
    assert float(value) == pytest.approx(float(cosine_loss(low.detach().double(), teacher)), abs=1e-6)


def test_nmse_loss_per_token_and_per_sample() -> None:
    student = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    teacher = torch.tensor([[[2.0, 0.0], [0.0, 1.0]]])
    # tokens: ||(-1, 0)||^2 / 4 = 0.25 and 0 -> mean 0.125
    assert nmse_loss(student, teacher).item() == pytest.approx(0.125)
    # one sample: 1 / 5
    assert nmse_loss(student.reshape(1, 1, 2, 2), teacher.reshape(1, 1, 2, 2)).item() == pytest.approx(0.2)


# --- least squares and bias correction ---------------------------------------------------------


def test_masked_least_squares_matches_lstsq_per_row() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(30, 5, generator=g, dtype=torch.float64)
    x_dense = x + 0.3 * torch.randn(30, 5, generator=g, dtype=torch.float64)
    w_dense = torch.randn(4, 5, generator=g, dtype=torch.float64)
    keep = torch.tensor([[1, 1, 0, 0, 1], [0, 1, 1, 1, 1], [1, 0, 0, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    solved = masked_least_squares(x.T @ x, x.T @ x_dense, w_dense, keep, damp=0.0, memory_mb=0.0004)  # 1 row
    for r in range(4):
        cols = keep[r].nonzero().squeeze(1)
        expected = torch.linalg.lstsq(x[:, cols], (x_dense @ w_dense[r]).unsqueeze(1)).solution.squeeze(1)
        assert torch.allclose(solved[r, cols], expected, atol=1e-10), r
        assert bool((solved[r, ~keep[r]] == 0).all()), r
    # with every weight kept and equal inputs, the dense weights are the exact solution
    full = masked_least_squares(x.T @ x, x.T @ x, w_dense, torch.ones_like(keep), damp=0.0)
    assert torch.allclose(full, w_dense, atol=1e-10)


def test_the_solver_memory_budget_sets_the_rows_per_batch_not_the_result() -> None:
    assert solve_rows(3072, 1024) == 7 and solve_rows(192, 1024) == 1820 and solve_rows(3072, 1) == 1
    g = torch.Generator().manual_seed(1)
    x = torch.randn(200, 48, generator=g, dtype=torch.float64)
    w_dense = torch.randn(40, 48, generator=g, dtype=torch.float64)
    keep = torch.rand(40, 48, generator=g) > 0.5
    one_batch = masked_least_squares(x.T @ x, x.T @ x, w_dense, keep, damp=0.01)
    assert solve_rows(48, 0.1) == 2 < 40  # 0.1 MB: 20 batches of 2 rows
    assert torch.equal(masked_least_squares(x.T @ x, x.T @ x, w_dense, keep, damp=0.01, memory_mb=0.1), one_batch)


def mean_outputs(model: nn.Module, layers: list[str], images: torch.Tensor) -> dict[str, torch.Tensor]:
    with torch.no_grad(), ActivationCapture(model, layers) as capture:
        model(images)
        return {name: capture.values[name].double().reshape(-1, capture.values[name].shape[-1]).mean(0)
                for name in layers}


def test_bias_correction_matches_the_dense_mean_output() -> None:
    dense, model, masks = pruned_pair(0.75)
    images = random_images(8)
    layers = [name.removesuffix(".weight") for name in masks]
    first = layers[0]
    assert first == "blocks.0.attn.qkv"
    gap = (mean_outputs(model, [first], images)[first] - mean_outputs(dense, [first], images)[first]).abs().max()
    assert gap > 1e-2  # pruning shifted the mean
    heal_(model, dense, masks, images, HealConfig(method="bias-correction", batch_size=3))
    ours, ref = mean_outputs(model, layers, images), mean_outputs(dense, layers, images)
    for name in layers:  # layer by layer in forward order, so every layer's mean matches
        assert torch.allclose(ours[name], ref[name], atol=1e-4), name


def test_layer_by_layer_healers_follow_forward_order_for_checkpoint_masks(tmp_path: Path) -> None:
    """Masks read back from a checkpoint come in file order; healing must still go in forward order."""
    dense, model, masks = pruned_pair(0.75)
    path = tmp_path / "pruned.safetensors"
    save_checkpoint(path, model, "starfish_vit_fmnist", masks=masks)
    loaded, loaded_masks, _ = load_checkpoint(path)
    images = random_images(8)
    heal_(loaded, dense, loaded_masks, images, HealConfig(method="bias-correction", batch_size=8))
    heal_(model, dense, masks, images, HealConfig(method="bias-correction", batch_size=8))
    for name, value in model.state_dict().items():
        assert torch.allclose(loaded.state_dict()[name], value, atol=1e-6), name


def test_layerwise_reduces_layer_output_error() -> None:
    dense, model, masks = pruned_pair(0.75)
    images = random_images(16)
    layers = [name.removesuffix(".weight") for name in masks]

    def final_error(m: nn.Module) -> float:
        with torch.no_grad():
            return float((m(images) - dense(images)).pow(2).mean())

    before = final_error(model)
    report = heal_(model, dense, masks, images, HealConfig(method="layerwise", batch_size=8))
    assert set(report["relative_weight_change"]) == set(masks)  # type: ignore[arg-type]
    assert final_error(model) < before
    assert len(layers) == 16


def test_layerwise_refuses_conv_scopes() -> None:
    torch.manual_seed(0)
    dense = timm.create_model("resnet10t", num_classes=10).eval()
    masks = prune(dense, PruneConfig("magnitude", 0.5)).masks
    model = sparsify_(copy.deepcopy(dense), masks)
    for method in ("layerwise", "bias-correction"):
        with pytest.raises(StarfishError, match="Linear layers only"):
            heal_(model, dense, masks, random_images(2, (3, 32, 32)), HealConfig(method=method))


# --- STARFISH ----------------------------------------------------------------------------------


def test_starfish_loss_decreases_on_the_demo_vit(demo_checkpoint: Path, fmnist_train: FashionMNIST) -> None:
    dense = create_model("starfish_vit_fmnist", checkpoint=demo_checkpoint)
    masks = prune(dense, PruneConfig("magnitude", 0.75)).masks
    model = sparsify_(copy.deepcopy(dense), masks)
    indices = stratified_indices(fmnist_train.targets, 0.002, seed=0)  # 120 real images
    images = torch.stack([fmnist_train[i][0] for i in indices])
    report = heal_(model, dense, masks, images, HealConfig(steps=30, holdout_every=10, lr=1e-3, holdout=0.1))
    curve = report["curve"]
    assert [p["step"] for p in curve] == [0, 10, 20, 30]
    assert curve[-1]["calibration_loss"] < curve[0]["calibration_loss"]
    assert curve[-1]["holdout_loss"] < curve[0]["holdout_loss"]
    assert report["states"] == ["blocks.0", "blocks.1", "blocks.2", "blocks.3"]
    assert (report["steps"], report["train_images"], report["holdout_images"]) == (30, 108, 12)
    best = min(curve, key=lambda p: p["holdout_loss"])
    assert report["selected_step"] == best["step"] and report["holdout_loss"] == best["holdout_loss"]
    assert report["kept_pruned"] is False
    check_masks_hold(model, masks)


def test_the_step_budget_is_the_same_for_every_split_size() -> None:
    for n in (16, 40):
        dense, model, masks = pruned_pair()
        report = heal_(model, dense, masks, random_images(n), HealConfig(steps=7, batch_size=8, holdout=0.0))
        assert report["steps"] == 7 and [p["step"] for p in report["curve"]] == [0, 7]


def test_the_held_out_slice_is_deterministic_and_disjoint() -> None:
    images = torch.arange(20.0).reshape(20, 1, 1, 1)
    train, held = split_calibration(images, 0.25)
    assert held[:].flatten().tolist() == [0.0, 5.0, 10.0, 14.0, 19.0]  # ceil(0.25 * 20) = 5, evenly spaced
    assert sorted(train[:].flatten().tolist() + held[:].flatten().tolist()) == list(map(float, range(20)))
    assert held.tensor is images and held.shape == (5, 1, 1, 1)
    # both parts are views: reads give what indexing a copy gives, without the copy
    copy_ = images[[i for i in range(20) if i not in (0, 5, 10, 14, 19)]]
    assert train.shape == copy_.shape and train.tensor is images
    order = torch.randperm(15, generator=torch.Generator().manual_seed(0))
    assert torch.equal(train[order[:4]], copy_[order[:4]]) and torch.equal(train[3:9], copy_[3:9])
    assert split_calibration(images, 0.0)[1] is None
    with pytest.raises(StarfishError, match="holds out all 1 calibration images"):
        split_calibration(images[:1], 0.1)


def test_a_heal_that_only_hurts_returns_the_pruned_weights() -> None:
    """An absurd learning rate makes every step worse on the held-out slice: the pruned model comes back."""
    dense, model, masks = pruned_pair(0.5)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    report = heal_(model, dense, masks, random_images(16), HealConfig(steps=4, batch_size=8, lr=50.0, lr_min=50.0,
                                                                    holdout=0.25, holdout_every=1))
    assert report["kept_pruned"] is True and report["selected_step"] == 0
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert all(p["holdout_loss"] > report["holdout_loss"] for p in report["curve"][1:])


def test_a_warm_start_that_hurts_is_undone_too() -> None:
    """With a warm start, the pruned weights (before it) are a candidate of their own."""
    dense, model, masks = pruned_pair(0.5)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = HealConfig.from_preset("recommended", steps=2, batch_size=8, lr=50.0, lr_min=50.0, holdout=0.25,
                                 holdout_every=1, damp=1e6)  # a huge damping shrinks every weight towards 0
    report = heal_(model, dense, masks, random_images(16), cfg)
    assert report["kept_pruned"] is True and report["selected_step"] == "pruned"
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_a_logit_term_changes_the_objective() -> None:
    dense, model, masks = pruned_pair(0.75)
    other = copy.deepcopy(model)
    plain = heal_(model, dense, masks, random_images(16), HealConfig(steps=3, batch_size=8, holdout=0.0))
    mixed = heal_(other, dense, masks, random_images(16), HealConfig(steps=3, batch_size=8, holdout=0.0,
                                                                     logit_weight=1.0))
    assert mixed["curve"][0]["calibration_loss"] > plain["curve"][0]["calibration_loss"]  # same start, KD added
    assert not all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), other.state_dict().values()))


def test_the_recommended_preset_on_a_cnn_skips_the_linear_only_warm_start() -> None:
    torch.manual_seed(0)
    dense = create_model("starfish_cnn_fmnist")
    masks = prune(dense, PruneConfig("magnitude", 0.75)).masks
    model = sparsify_(copy.deepcopy(dense), masks)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = HealConfig.from_preset("recommended", steps=4, batch_size=8, holdout_every=2)
    report = heal_(model, dense, masks, random_images(16), cfg)
    assert report["warm_start"].startswith("skipped") and "warm_start_seconds" not in report
    assert report["states"] == ["blocks.0.0", "blocks.1.0", "blocks.1.1", "blocks.2.0", "blocks.2.1", "blocks.3.0"]
    check_masks_hold(model, masks)
    state = model.state_dict()
    assert all(torch.equal(v, before[k]) for k, v in state.items() if k not in masks)  # BatchNorm stays frozen


def test_layerwise_block_by_block_matches_whole_model_passes(monkeypatch: pytest.MonkeyPatch) -> None:
    """The block-by-block feed gives the same least-squares result as whole-model passes."""
    dense, model, masks = pruned_pair(0.9)
    images = random_images(24)
    reference = copy.deepcopy(model)
    layers = [name.removesuffix(".weight") for name in masks]
    assert PairedInputs(model, dense, layers, images, 8).blockwise
    heal_(model, dense, masks, images, HealConfig(method="layerwise", batch_size=8))

    def no_blocks(model: nn.Module) -> list[str]:
        raise StarfishError("no blocks")

    monkeypatch.setattr(baselines, "stage_names", no_blocks)
    assert not PairedInputs(reference, dense, layers, images, 8).blockwise
    heal_(reference, dense, masks, images, HealConfig(method="layerwise", batch_size=8))
    changed = 0
    for name, value in model.state_dict().items():
        assert torch.allclose(value, reference.state_dict()[name], atol=1e-5), name
        changed += name in masks
    assert changed == len(masks)


def test_starfish_on_a_cnn_aligns_block_outputs() -> None:
    torch.manual_seed(0)
    dense = timm.create_model("resnet10t", num_classes=10).eval()
    masks = prune(dense, PruneConfig("magnitude", 0.5)).masks
    before_masks = clone_masks(masks)
    model = sparsify_(copy.deepcopy(dense), masks)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    report = heal_(model, dense, masks, random_images(8, (3, 48, 48)),
                   HealConfig(epochs=2, batch_size=4, batchnorm="frozen"))
    assert report["states"] == ["layer1.0", "layer2.0", "layer3.0", "layer4.0"]
    check_masks_hold(model, masks)
    assert all(torch.equal(masks[k], before_masks[k]) for k in masks)
    state = model.state_dict()
    assert all(torch.equal(v, before[k]) for k, v in state.items() if k not in masks)  # BN stats included
    assert any(not torch.equal(state[k], before[k]) for k in masks)
    assert no_hooks(model) and no_hooks(dense)


def cnn_pair() -> tuple[nn.Module, nn.Module, Masks]:
    torch.manual_seed(0)
    dense = timm.create_model("resnet10t", num_classes=10).eval()
    masks = prune(dense, PruneConfig("magnitude", 0.5)).masks
    return dense, sparsify_(copy.deepcopy(dense), masks), masks


def test_batchnorm_train_mode_updates_the_statistics_once_per_step_and_never_on_the_held_out_slice(
        fmnist_train: FashionMNIST) -> None:
    dense = create_model("starfish_cnn_fmnist", checkpoint="data/demo/starfish_cnn_fmnist.safetensors")
    masks = prune(dense, PruneConfig("magnitude", 0.75)).masks
    model = sparsify_(copy.deepcopy(dense), masks)
    dense_stats = {k: v.clone() for k, v in batchnorm_buffers(dense).items()}
    images = torch.stack([fmnist_train[i][0] for i in range(16)])
    report = heal_(model, dense, masks, images,
                   HealConfig(epochs=2, batch_size=4, holdout=0.25, holdout_every=1, keep="last", batchnorm="train"))
    assert report["steps"] == 6 and report["selected_step"] == 6  # 12 training images in batches of 4, twice
    stats = batchnorm_buffers(model)
    counts = {k: int(v - dense_stats[k]) for k, v in stats.items() if k.endswith("num_batches_tracked")}
    assert counts and set(counts.values()) == {6}  # 7 held-out checks ran, none counted
    assert any(not torch.equal(stats[k], dense_stats[k]) for k in stats if k.endswith("running_mean"))
    assert all(torch.equal(v, dense_stats[k]) for k, v in batchnorm_buffers(dense).items())  # dense untouched
    assert not any(m.training for m in model.modules())  # returned in eval mode


def test_batchnorm_recalibrate_re_estimates_the_statistics_on_the_training_images() -> None:
    dense, model, masks = cnn_pair()
    images = random_images(12, (3, 48, 48))
    report = heal_(model, dense, masks, images, HealConfig(steps=3, batch_size=4, holdout=0.0, batchnorm="recalibrate"))
    assert report["batchnorm_recalibrated"] is True
    first = model.conv1[1]  # the first BatchNorm: no other one before it normalizes its input
    with torch.no_grad(), ActivationCapture(model, ["conv1.1"], inputs=True) as capture:
        model(images)
        x = capture.values["conv1.1"]
    # a cumulative average over equal batches: the mean over all 12 images
    assert torch.allclose(first.running_mean, x.mean(dim=(0, 2, 3)), atol=1e-5)
    assert int(first.num_batches_tracked) == 3


def test_a_train_mode_heal_that_only_hurts_returns_the_pruned_batchnorm_statistics_too() -> None:
    dense, model, masks = cnn_pair()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    report = heal_(model, dense, masks, random_images(16, (3, 48, 48)),
                   HealConfig(steps=2, batch_size=4, lr=50.0, lr_min=50.0, holdout=0.25, batchnorm="train"))
    assert report["kept_pruned"] is True
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def random_least_squares(rows: int = 24, width: int = 32, seed: int = 0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(300, width, generator=g, dtype=torch.float64) @ torch.randn(width, width, generator=g,
                                                                                 dtype=torch.float64)
    x_dense = x + 0.3 * torch.randn(300, width, generator=g, dtype=torch.float64)
    return x.T @ x, x.T @ x_dense, torch.randn(rows, width, generator=g, dtype=torch.float64)


def test_sparsegpt_is_exact_when_the_pruned_columns_come_first() -> None:
    gram, cross, w_dense = random_least_squares()
    keep = torch.ones_like(w_dense, dtype=torch.bool)
    keep[:, :20] = False  # every pruned column before every kept one: each column's update is the exact one
    assert torch.allclose(sparsegpt_least_squares(gram, cross, w_dense, keep, 0.01, block=8),
                          masked_least_squares(gram, cross, w_dense, keep, 0.01), atol=1e-9)


def test_cg_solves_the_masked_systems_exactly() -> None:
    gram, cross, w_dense = random_least_squares()
    keep = torch.rand(w_dense.shape, generator=torch.Generator().manual_seed(3)) < 0.3
    exact = masked_least_squares(gram, cross, w_dense, keep, 0.01)
    start = sparsegpt_least_squares(gram, cross, w_dense, keep, 0.01)
    solved = cg_least_squares(gram, cross, w_dense, keep, 0.01)
    assert bool((solved[~keep] == 0).all())
    assert float((solved - exact).abs().max()) < 1e-4 * float(exact.abs().max()) < float((start - exact).abs().max())


def test_the_cg_warm_start_gives_the_exact_one_on_the_demo_vit() -> None:
    dense, _, masks = pruned_pair(0.9)
    images = random_images(24)
    healed = {}
    for solver in ("exact", "cg"):
        model = sparsify_(copy.deepcopy(dense), masks)
        heal_(model, dense, masks, images, HealConfig(method="layerwise", batch_size=8, solver=solver,
                                                      solve_dtype="float64"))
        healed[solver] = model.state_dict()
    # the same weights up to the conjugate gradients' tolerance: 1e-4 of the largest weight (float32 weights)
    assert all(float((healed["cg"][k] - healed["exact"][k]).abs().max()) <= 1e-4 * float(healed["exact"][k].abs().max())
               for k in masks)


@pytest.mark.parametrize("sparsity", [0.5, 0.9])
def test_float32_statistics_and_solves_agree_with_float64(sparsity: float, caplog: pytest.LogCaptureFixture) -> None:
    """The default float32 re-fit gives the float64 one's logits within 5e-4 of the largest
    (measured: 9e-5 at 50%, 5e-5 at 90%), with no fallback on the demo ViT. Weights can differ
    more (to 6e-3 of a layer's largest at 50%) where the inputs barely constrain them."""
    dense, _, masks = pruned_pair(sparsity)
    images, unseen = random_images(24), random_images(64, seed=1)
    logits = {}
    for dtype in ("float32", "float64"):
        model = sparsify_(copy.deepcopy(dense), masks)
        report = heal_(model, dense, masks, images, HealConfig(method="layerwise", batch_size=8, solver="cg",
                                                               solve_dtype=dtype))
        assert report["float64_fallbacks"] == []
        with torch.no_grad():
            logits[dtype] = model.eval()(unseen)
    scale = float(logits["float64"].abs().max())
    assert 0 < float((logits["float32"] - logits["float64"]).abs().max()) <= 5e-4 * scale
    assert "solved again in float64" not in caplog.text


def test_the_statistics_come_from_evenly_spaced_images_when_capped() -> None:
    dense, _, masks = pruned_pair(0.75)
    images = random_images(24)
    capped, subset = (sparsify_(copy.deepcopy(dense), masks) for _ in range(2))
    report = heal_(capped, dense, masks, images, HealConfig(method="layerwise", batch_size=8, statistics_images=8))
    heal_(subset, dense, masks, images[torch.linspace(0, 23, 8).round().long()],
          HealConfig(method="layerwise", batch_size=8))
    assert report["statistics_images"] == 8
    assert all(torch.equal(value, subset.state_dict()[name]) for name, value in capped.state_dict().items())


@pytest.mark.parametrize("solver", ["exact", "cg"])
def test_an_ill_conditioned_float32_solve_is_redone_in_float64(solver: str, caplog: pytest.LogCaptureFixture) -> None:
    """Undamped, with eigenvalues from 1 to 1e-6, float32 cannot be trusted with the systems: they are
    solved in float64, logged, with float64's answer."""
    generator = torch.Generator().manual_seed(0)
    basis, _ = torch.linalg.qr(torch.randn(48, 48, generator=generator, dtype=torch.float64))
    gram = basis @ torch.diag(torch.logspace(0, -6, 48, dtype=torch.float64)) @ basis.T
    cross, w_dense = gram.clone(), torch.randn(6, 48, generator=generator, dtype=torch.float64)
    keep = torch.ones(6, 48, dtype=torch.bool)
    least_squares = HealConfig(solver=solver, damp=0.0).least_squares
    solved, dtype = baselines.solve_layer(gram.float(), cross.float(), w_dense.float(), keep, least_squares, "fc")
    assert dtype == "float64" and "fc: the float32 solve is not accurate enough, the damped Hessian" in caplog.text
    expected, _ = baselines.solve_layer(gram.float().double(), cross.float().double(), w_dense.float().double(),
                                        keep, least_squares)
    assert torch.equal(solved, expected)
    assert baselines.relative_residual(solved, gram.float(), cross.float(), w_dense.float(), keep, 0.0) \
        <= baselines.FLOAT32_RESIDUAL


@pytest.mark.parametrize("loss, states", [("nmse", "last"), ("cosine", "blocks.1,blocks.3")])
def test_starfish_options(loss: str, states: str) -> None:
    dense, model, masks = pruned_pair()
    report = heal_(model, dense, masks, random_images(8), HealConfig(epochs=1, batch_size=8, loss=loss, states=states))
    assert report["states"] == state_names(model, states)
    check_masks_hold(model, masks)


def test_heal_config_rejects_bad_fields() -> None:
    with pytest.raises(StarfishError, match="unknown healer 'bogus'"):
        HealConfig(method="bogus")
    with pytest.raises(StarfishError, match="heal.loss='l1'"):
        HealConfig(loss="l1")
    with pytest.raises(StarfishError, match="heal.warm_start='kd'"):
        HealConfig(warm_start="kd")


def test_pruned_weights_are_exactly_zero_at_every_pass_of_a_heal() -> None:
    """Masked gradients keep Adam's moments at zero for pruned weights, so no step moves them:
    the weights are never re-masked during the heal, and every forward pass sees exact zeros."""
    dense, model, masks = pruned_pair(0.75)
    modules = dict(model.named_modules())
    seen = []

    def check(module: nn.Module, args: tuple) -> None:
        for name, mask in masks.items():
            weight = modules[name.removesuffix(".weight")].weight
            seen.append(bool((weight[~mask] == 0).all()) and not bool(torch.signbit(weight[~mask]).any()))

    handle = model.register_forward_pre_hook(check)
    heal_(model, dense, masks, random_images(24), HealConfig(steps=20, batch_size=8, lr=1e-2, holdout_every=5))
    handle.remove()
    assert len(seen) > 20 * len(masks) and all(seen)


def test_a_benchmarks_reference_runs_between_the_heals_runs_of_steps_outside_its_time() -> None:
    dense, model, masks = pruned_pair(0.75)
    calls = []

    def reference() -> None:
        calls.append(len(calls))
        time.sleep(0.2)

    start = time.perf_counter()
    with between_chunks(reference):
        report = heal_(model, dense, masks, random_images(24), HealConfig(steps=9, batch_size=8, holdout_every=4))
    whole = time.perf_counter() - start
    assert calls == [0, 1, 2] and len(report["step_seconds"]) == 3  # after steps 4, 8 and 9
    # the three 0.2 s calls are in the heal's wall time but in neither its steps nor its runs of them
    assert report["seconds"]["steps"] <= whole - 0.6
    assert sum(seconds * steps for seconds, steps in zip(report["step_seconds"], (4, 4, 1))) <= whole - 0.6


def heal_with_cache(mode: str, folder: Path) -> tuple[nn.Module, dict[str, object]]:
    dense, model, masks = pruned_pair(0.75)
    with scratch_folder(folder):
        report = heal_(model, dense, masks, random_images(40), HealConfig(steps=12, batch_size=8, cache=mode,
                                                                          holdout_every=4))
    return model, report


def test_dense_states_on_disk_heal_bitwise_like_memory_and_recompute_to_float_noise(tmp_path: Path) -> None:
    memory, memory_report = heal_with_cache("memory", tmp_path)
    disk, disk_report = heal_with_cache("disk", tmp_path)
    recomputed, recomputed_report = heal_with_cache("recompute", tmp_path)
    for name, value in memory.state_dict().items():
        assert torch.equal(value, disk.state_dict()[name]), name
        assert torch.allclose(value, recomputed.state_dict()[name], atol=1e-5), name
    assert memory_report["curve"] == disk_report["curve"]
    assert list(tmp_path.iterdir()) == []  # the disk cache is gone with the heal


def test_auto_cache_picks_memory_when_the_states_fit_and_recompute_when_nothing_holds_them(tmp_path: Path) -> None:
    assert choose_mode("auto", 1, tmp_path) == "memory"
    assert choose_mode("auto", 10**18, tmp_path) == "recompute"
    ram, disk = available_memory(), shutil.disk_usage(tmp_path).free
    if ram // 2 < disk * 0.8:  # a size too big for RAM that the disk holds
        assert choose_mode("auto", int(min(ram, disk * 0.8)), tmp_path) == "disk"
    assert choose_mode("disk", 1, tmp_path) == "disk"


def test_auto_cache_picks_the_lowest_total_of_the_modes_that_fit(tmp_path: Path,
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    """Memory against recompute is images against images read (steps x batch + checks); with the
    states too big for RAM, disk against recompute goes by the measured write and read rates."""
    caplog.set_level(logging.INFO)
    costs = ModeCosts(dense_seconds_per_image=0.01, state_bytes_per_image=10**6, write_seconds_per_byte=1e-9,
                      read_seconds_per_byte=1e-9)
    totals = costs.totals(images=5000, steps=400, batch_size=32, checked_images=0)
    assert totals == pytest.approx({"memory": 50.0, "disk": 50.0 + 5.0 + 12.8, "recompute": 128.0})
    few_steps = costs.totals(images=5000, steps=100, batch_size=32, checked_images=0)
    assert few_steps["recompute"] == pytest.approx(32.0) and few_steps["recompute"] < few_steps["memory"]

    def measured(disk_in_running: bool) -> dict[str, float]:
        return costs.totals(5000, 400, 32, 0) if disk_in_running else totals

    assert choose_mode("auto", 1, tmp_path, measured) == "memory"
    assert choose_mode("auto", 1, tmp_path, lambda _: few_steps) == "recompute"
    assert "estimated seconds memory 50, disk 67.8, recompute 128: memory" in caplog.text
    ram, disk = available_memory(), shutil.disk_usage(tmp_path).free
    if ram // 2 < disk * 0.8:  # too big for RAM, held by the disk: disk (67.8 s) beats recompute (128 s)
        assert choose_mode("auto", int(min(ram, disk * 0.8)), tmp_path, measured) == "disk"


def test_a_short_heal_on_many_images_recomputes_its_states_under_auto(caplog: pytest.LogCaptureFixture) -> None:
    """Two steps of 8 images on 40 read fewer images (16, plus the held-out checks' 4 x 4) than
    caching all 40 runs: `auto` recomputes, with the same result as `memory` up to float noise."""
    caplog.set_level(logging.INFO)
    dense, model, masks = pruned_pair(0.75)
    cached = copy.deepcopy(model)
    heal_(model, dense, masks, random_images(40), HealConfig(steps=2, batch_size=8, holdout_every=2))
    assert caplog.text.rstrip().count(": recompute") == 1
    heal_(cached, dense, masks, random_images(40), HealConfig(steps=2, batch_size=8, holdout_every=2, cache="memory"))
    for name, value in model.state_dict().items():
        assert torch.allclose(value, cached.state_dict()[name], atol=1e-5), name


def test_heal_config_rejects_an_unknown_cache_mode() -> None:
    with pytest.raises(StarfishError, match="heal.cache='ram': use one of"):
        HealConfig(cache="ram")


def heal_with(steps: int = 6, **fields: object) -> nn.Module:
    dense, model, masks = pruned_pair(0.75)
    heal_(model, dense, masks, random_images(24), HealConfig(steps=steps, batch_size=8, holdout=0.0, **fields))
    check_masks_hold(model, masks)
    return model


def test_gradient_checkpointing_changes_memory_not_the_result() -> None:
    plain, checkpointed = heal_with(), heal_with(grad_checkpointing=True)
    start = pruned_pair(0.75)[1]
    for name, value in plain.state_dict().items():
        assert torch.allclose(value, checkpointed.state_dict()[name], atol=1e-6), name
    assert any(not torch.equal(value, start.state_dict()[name]) for name, value in plain.state_dict().items())
    assert not checkpointed.grad_checkpointing  # switched off again
    dense, model, masks = pruned_pair(0.5)
    sequential = nn.Sequential(nn.Flatten(), nn.Linear(784, 10))
    with pytest.raises(StarfishError, match="no gradient checkpointing"):
        heal_(sequential, copy.deepcopy(sequential), {"1.weight": torch.ones(10, 784, dtype=torch.bool)},
              random_images(8), HealConfig(steps=1, holdout=0.0, grad_checkpointing=True, states="last"))


def test_precision_auto_is_fp32_on_a_cpu_and_bf16_autocasts() -> None:
    auto, fp32, bf16 = heal_with(), heal_with(precision="fp32"), heal_with(precision="bf16")
    for name, value in auto.state_dict().items():
        assert torch.equal(value, fp32.state_dict()[name]), name
    assert any(not torch.equal(value, bf16.state_dict()[name]) for name, value in auto.state_dict().items())
    assert all(value.dtype == torch.float32 for value in bf16.state_dict().values())  # weights stay fp32
    assert HealConfig.from_preset("faithful").precision == "fp32"
    with pytest.raises(StarfishError, match="heal.precision='fp16'"):
        HealConfig(precision="fp16")


def test_a_layers_input_comes_from_a_pass_stopped_at_the_layer() -> None:
    """`InputOf` gives exactly the input a whole pass records, and runs nothing after the layer."""
    dense, _, _ = pruned_pair()
    images = random_images(4)
    for layer in ("blocks.0.attn.qkv", "blocks.1.mlp.fc2"):
        with ActivationCapture(dense, [layer], inputs=True) as whole:
            dense(images)
            expected = whole.values[layer].clone()
        later = []
        handle = dense.head.register_forward_hook(lambda *args: later.append(1))
        with InputOf(dense, layer) as stopped:
            assert torch.equal(stopped(images), expected)
        handle.remove()
        assert later == [] and no_hooks(dense)


def test_layerwise_keeps_its_block_inputs_on_disk_with_the_same_result(tmp_path: Path) -> None:
    """`heal.cache=disk` moves the kept block inputs (2 x N x tokens x width) to scratch files."""
    dense, model, masks = pruned_pair(0.75)
    images = random_images(24)
    on_disk = copy.deepcopy(model)
    heal_(model, dense, masks, images, HealConfig(method="layerwise", batch_size=8, cache="memory"))
    with scratch_folder(tmp_path):
        inputs = PairedInputs(on_disk, dense, [name.removesuffix(".weight") for name in masks], images, 8, "disk")
        inputs.feed(next(iter(masks)).removesuffix(".weight"), lambda x, y: None)
        assert isinstance(inputs.x_model, FileRows) and isinstance(inputs.x_dense, FileRows)
        heal_(on_disk, dense, masks, images, HealConfig(method="layerwise", batch_size=8, cache="disk"))
    for name, value in model.state_dict().items():
        assert torch.equal(value, on_disk.state_dict()[name]), name
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(shutil.which("cc") is None and shutil.which("gcc") is None,
                    reason="torch.compile's CPU backend needs a C compiler")
def test_a_compiled_heal_gives_the_eager_result_and_leaves_the_model_plain() -> None:
    eager, compiled = heal_with(steps=3), heal_with(steps=3, compile=True)
    for name, value in eager.state_dict().items():
        assert torch.allclose(value, compiled.state_dict()[name], atol=1e-5), name
    assert all("forward" not in vars(block) for block in compiled.blocks)  # the class's forward again
    sequential = nn.Sequential(nn.Flatten(), nn.Linear(784, 10))
    with pytest.raises(StarfishError, match="heal.compile compiles the model's blocks"):
        heal_(sequential, copy.deepcopy(sequential), {"1.weight": torch.ones(10, 784, dtype=torch.bool)},
              random_images(8), HealConfig(steps=1, holdout=0.0, compile=True, states="last"))
