"""Pruners on real timm families (random weights, small inputs): the defects each family showed."""

from __future__ import annotations

import logging

import pytest
import timm
import torch

from starfish.config import PruneConfig
from starfish.errors import StarfishError
from starfish.pruning import prune, scope_weights
from starfish.pruning.pruners import resolve_scope


def images(size: int, count: int = 4) -> torch.Tensor:
    return torch.randn(count, 3, size, size, generator=torch.Generator().manual_seed(0))


def test_wanda_on_a_linear_fed_channels_last_inputs() -> None:
    """ConvNeXt with conv_mlp=False runs its MLP Linears on NHWC maps: norms are per last dim."""
    torch.manual_seed(0)
    model = timm.create_model("convnext_atto", conv_mlp=False, num_classes=10).eval()
    masks = prune(model, PruneConfig("wanda", 0.5), images(64)).masks
    fc1 = masks["stages.0.blocks.0.mlp.fc1.weight"]
    assert fc1.shape == (160, 40) and int(fc1.sum()) == 160 * 20  # 20 of 40 kept in every row


def test_per_row_rounding_never_empties_a_row_or_a_layer(caplog: pytest.LogCaptureFixture) -> None:
    """efficientnet_b0's se.conv_expand has 4 inputs per row: round(0.9 x 4) = 4 would prune them all."""
    torch.manual_seed(0)
    model = timm.create_model("efficientnet_b0", num_classes=10).eval()
    with caplog.at_level(logging.WARNING, logger="starfish.pruning.pruners"):
        masks, held, _ = prune(model, PruneConfig("wanda", 0.9), images(64, 2))
    expand = masks["blocks.1.0.se.conv_expand.weight"]
    assert expand.shape == (96, 4, 1, 1) and expand.reshape(96, -1).sum(1).tolist() == [1] * 96
    assert all(mask.reshape(mask.shape[0], -1).any(1).all() for mask in masks.values())
    assert "blocks.1.0.se.conv_expand.weight: keeps one weight per row" in caplog.text
    assert held["blocks.1.0.se.conv_expand.weight"] == "keeps one weight per row"


def test_magnitude_never_empties_a_layer() -> None:
    weights = {"a": torch.nn.Parameter(torch.full((2, 2), 0.01)), "b": torch.nn.Parameter(torch.ones(4, 4))}
    from starfish.pruning import masks as M

    assert int(M.magnitude_mask(torch.ones(1, 3), 0.9).sum()) == 1  # round(0.9 x 3) = 3 would take all
    kept = M.global_magnitude_masks(weights, 0.8)
    assert int(kept["a"].sum()) == 1 and int(kept["b"].sum()) == 4  # the layer keeps its largest weight


def test_nm_on_convs_groups_input_channels_for_every_kernel_position() -> None:
    """The KRSC (channels-last) layout that sparse tensor cores take: 2 of every 4 input channels."""
    torch.manual_seed(0)
    model = timm.create_model("resnet18", num_classes=10)
    masks = prune(model, PruneConfig("nm", 0.5, nm="2:4")).masks
    conv = masks["layer1.0.conv1.weight"]  # (64, 64, 3, 3)
    groups = conv.permute(0, 2, 3, 1).reshape(-1, 4)
    assert groups.sum(1).eq(2).all()


def test_nm_skips_layers_whose_channels_do_not_tile_and_says_why(caplog: pytest.LogCaptureFixture) -> None:
    torch.manual_seed(0)
    model = timm.create_model("efficientnet_b0", num_classes=10)
    with caplog.at_level(logging.WARNING, logger="starfish.pruning.pruners"):
        masks = prune(model, PruneConfig("nm", 0.5, nm="2:4")).masks
    assert "blocks.1.0.se.conv_expand.weight" in masks  # 4 inputs tile
    assert "blocks.1.1.se.conv_expand.weight" not in masks  # 6 do not
    skipped = [name for name in scope_weights(model) if name not in masks]
    assert skipped and all(model.get_parameter(name).shape[1] % 4 for name in skipped)
    assert "blocks.1.1.se.conv_expand.weight: left dense: its 6 input channels do not tile by 4" in caplog.text
    assert all(mask.permute(0, 2, 3, 1).reshape(-1, 4).sum(1).eq(2).all() for mask in masks.values())
    with pytest.raises(StarfishError, match="no layer of the pruning scope"):
        prune(timm.create_model("resnet18", num_classes=10), PruneConfig("nm", 0.8, nm="1:5"))  # widths 64..512


def test_grouped_convs_are_in_scope_and_depthwise_convs_are_not() -> None:
    """The authors' rule: leave out convs with groups == in_channels (depthwise), keep grouped ones."""
    model = timm.create_model("regnety_002", num_classes=10)
    names = list(scope_weights(model))
    modules = dict(model.named_modules())
    grouped = [n for n in names if 1 < modules[n.removesuffix(".weight")].groups]
    assert grouped and all(modules[n.removesuffix(".weight")].groups < modules[n.removesuffix(".weight")].in_channels
                           for n in grouped)
    assert not any(isinstance(m, torch.nn.Conv2d) and m.groups == m.in_channels > 1 and f"{n}.weight" in names
                   for n, m in modules.items())


def test_a_model_without_stages_is_refused_in_pruning_terms() -> None:
    with pytest.raises(StarfishError, match=r"s1..4`, so the pruning scope presets \(layers inside its stages\)"):
        prune(torch.nn.Sequential(torch.nn.Linear(4, 4)), PruneConfig("magnitude", 0.5))


def scoped(model: torch.nn.Module, scope: str) -> list[str]:
    return [name.removesuffix(".weight") for name in scope_weights(model, resolve_scope(model, scope))]


def test_scope_presets_pick_attention_and_mlp_layers_by_role() -> None:
    vit = timm.create_model("vit_tiny_patch16_224", num_classes=10)
    block0 = [name.removeprefix("blocks.0.") for name in scoped(vit, "default") if name.startswith("blocks.0.")]
    assert block0 == ["attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"]
    assert scoped(vit, "default") == scoped(vit, "qkv_out_mlp")
    assert all(name.endswith("attn.qkv") for name in scoped(vit, "qkv")) and len(scoped(vit, "qkv")) == 12
    assert all(name.endswith(("mlp.fc1", "mlp.fc2")) for name in scoped(vit, "mlp"))
    assert len(scoped(vit, "qkv_out")) == 24
    with pytest.raises(StarfishError, match="selects no layers"):  # a fused qkv has no separate q and k
        scoped(vit, "qk")
    levit = timm.create_model("levit_128s", num_classes=10)  # Linears wrapped as qkv.linear, mlp.ln1.linear
    names = scoped(levit, "default")
    assert "stages.0.blocks.0.attn.qkv.linear" in names and "stages.0.blocks.0.mlp.ln2.linear" in names
    assert "stages.0.blocks.0.attn.proj.ln.linear" in names and not any(n.startswith("head") for n in names)


def test_cnn_presets_and_patterns() -> None:
    net = timm.create_model("efficientnet_b0", num_classes=10)
    modules = dict(net.named_modules())
    dense_convs, all_convs = scoped(net, "conv_only"), scoped(net, "conv_dw")
    assert set(dense_convs) < set(all_convs) and all(modules[n].groups == modules[n].in_channels > 1
                                                     for n in set(all_convs) - set(dense_convs))
    assert scoped(net, "default") == dense_convs and scoped(net, "all") == all_convs  # no Linear in its stages
    assert not any(n.startswith(("conv_stem", "conv_head", "classifier")) for n in all_convs)
    assert scoped(net, "blocks.1.*.conv_pwl, classifier") == ["blocks.1.0.conv_pwl", "blocks.1.1.conv_pwl",
                                                              "classifier"]
    with pytest.raises(StarfishError, match="pattern 'blocks.9.*' names no Linear or Conv2d"):
        resolve_scope(net, "blocks.9.*")
    with pytest.raises(StarfishError, match="neither a preset"):
        resolve_scope(net, "convs")


FAMILIES = {  # one small configuration per timm family, at a small input size where it allows one
    "vit": ("vit_tiny_patch16_224", {"img_size": 64}),
    "deit": ("deit_tiny_patch16_224", {"img_size": 64}),
    "swin": ("swin_tiny_patch4_window7_224", {"img_size": 128, "window_size": 4}),
    "resnet": ("resnet18", {}),
    "mobilenet": ("mobilenetv3_small_100", {}),
    "efficientnet": ("efficientnet_b0", {}),
    "convnext": ("convnext_atto", {"conv_mlp": False}),
    "regnet": ("regnety_002", {}),
    "levit": ("levit_128s", {}),
}


@pytest.mark.parametrize("pruner, sparsity", [("magnitude", 0.75), ("wanda", 0.75), ("nm", 0.5)])
@pytest.mark.parametrize("family", FAMILIES)
def test_every_pruner_on_every_family(family: str, pruner: str, sparsity: float) -> None:
    """Exact per-layer (or per-row, per-group) sparsity, no layer emptied, masks within the scope and held."""
    from starfish.evaluate import check_masks_hold
    from starfish.pruning import masks as M
    from starfish.pruning import sparsify_

    name, kwargs = FAMILIES[family]
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=10, **kwargs).eval()
    size = kwargs.get("img_size", 224 if family == "levit" else 64)
    scope = scope_weights(model)
    masks = prune(model, PruneConfig(pruner, sparsity), images(size, 2) if pruner == "wanda" else None).masks
    assert set(masks) <= set(scope) and (pruner == "nm" or set(masks) == set(scope))
    for layer, mask in masks.items():
        weight = scope[layer]
        assert mask.shape == weight.shape and mask.any(), layer
        rows = mask.reshape(mask.shape[0], -1)
        if pruner == "magnitude":
            assert int(mask.sum()) == weight.numel() - M.capped_count(sparsity, weight.numel()), layer
        elif pruner == "wanda":
            assert rows.sum(1).eq(rows.shape[1] - M.capped_count(sparsity, rows.shape[1])).all(), layer
        else:
            assert mask.movedim(1, -1).reshape(-1, 4).sum(1).eq(2).all(), layer
    check_masks_hold(sparsify_(model, masks), masks)


# Families outside FAMILIES that broke a pruner or a healer: tiny widths, so each runs in seconds.
SMALL = {"embed_dim": 64, "depth": 2, "num_heads": 2, "num_classes": 10}
OUTSIDE = {
    "beit": ("beit_base_patch16_224", {"img_size": 32, **SMALL}),  # F.linear(x, self.qkv.weight, ...)
    "eva02": ("eva02_tiny_patch14_224", {"img_size": 28, **SMALL}),  # the same, and RoPE from the parent
    "xcit": ("xcit_nano_12_p16_224", {"img_size": 32, **SMALL, "cls_attn_layers": 1}),  # blocks take H, W
}


@pytest.mark.parametrize("family", OUTSIDE)
def test_wanda_and_the_layerwise_refit_on_families_whose_blocks_are_not_plain(family: str) -> None:
    """wanda reads every layer's input (also one its parent runs through F.linear), and the
    layerwise re-fit runs a stage on its own only where the model calls it as stage(x) alone
    (`test_the_layerwise_refit_runs_plain_stages_on_their_own` has the other side)."""
    import copy

    from starfish.config import HealConfig
    from starfish.healing import heal_
    from starfish.healing.baselines import PairedInputs
    from starfish.pruning import sparsify_

    name, kwargs = OUTSIDE[family]
    torch.manual_seed(0)
    dense = timm.create_model(name, **kwargs).eval()
    x = images(kwargs["img_size"], 8)
    masks = prune(dense, PruneConfig("wanda", 0.5), x).masks
    qkv = next(key for key in masks if key.endswith("attn.qkv.weight"))
    rows = masks[qkv].reshape(masks[qkv].shape[0], -1)
    assert rows.sum(1).eq(rows.shape[1] // 2).all(), qkv  # scored on real input norms, per row
    model = sparsify_(copy.deepcopy(dense), masks)
    paired = PairedInputs(model, dense, [qkv], x, batch_size=4)
    assert not paired.blockwise, family  # BEiT passes a bias, EVA RoPE, XCiT H and W: whole-model passes
    report = heal_(model, dense, masks, x, HealConfig(method="layerwise"))
    assert report is not None
    with torch.no_grad():
        assert torch.isfinite(model(x)).all()


def test_img_size_in_model_kwargs_sizes_the_images_starfish_loads() -> None:
    from timm.data import resolve_data_config

    from starfish.models import create_model

    model = create_model("deit_tiny_patch16_224", kwargs={"img_size": 64})
    assert resolve_data_config({}, model=model)["input_size"] == (3, 64, 64)


def test_regnet_aligns_its_residual_blocks_not_its_four_stages() -> None:
    from starfish.capture import block_names

    model = timm.create_model("regnety_002")
    blocks = block_names(model)
    assert blocks[:2] == ["s1.b1", "s2.b1"] and len(blocks) == sum(len(list(getattr(model, s).children()))
                                                                    for s in ("s1", "s2", "s3", "s4"))


def test_the_layerwise_refit_runs_plain_stages_on_their_own(vit: torch.nn.Module) -> None:
    from starfish.healing.baselines import PairedInputs

    paired = PairedInputs(vit, vit, ["blocks.1.mlp.fc1"], torch.randn(4, 1, 28, 28), batch_size=2)
    assert paired.blockwise
