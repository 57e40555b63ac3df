"""Pruning masks: hand-worked small cases for every mask function, and invariants on the demo ViT."""

from __future__ import annotations

import pytest
import timm
import torch
from torch import nn

from starfish.catalog import PRUNERS, parse_nm
from starfish.config import PruneConfig
from starfish.errors import StarfishError
from starfish.pruning import default_scope, nm_pattern_for, prune, scope_weights, sparsify_
from starfish.pruning import masks as M

T, F = True, False


def mask(rows: list[list[bool]]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.bool)


# --- magnitude -------------------------------------------------------------------------------


def test_magnitude_prunes_smallest_abs_values_of_the_whole_tensor() -> None:
    w = torch.tensor([[0.5, -0.1, 0.3], [-0.25, 0.15, 0.4]])
    # |w| ranked: 0.1 (0,1) < 0.15 (1,1) < 0.25 (1,0) < 0.3 < 0.4 < 0.5; half of 6 = 3 pruned
    assert torch.equal(M.magnitude_mask(w, 0.5), mask([[T, F, T], [F, F, T]]))


def test_magnitude_prunes_an_exact_count() -> None:
    w = torch.arange(1.0, 11.0).reshape(2, 5)
    keep = M.magnitude_mask(w, 0.3)
    assert int((~keep).sum()) == 3
    assert torch.equal(keep, mask([[F, F, F, T, T], [T, T, T, T, T]]))
    assert bool(M.magnitude_mask(w, 0.0).all())


def test_magnitude_breaks_ties_by_position() -> None:
    w = torch.tensor([[1.0, -1.0, 1.0], [-1.0, 1.0, -1.0]])
    assert torch.equal(M.magnitude_mask(w, 0.5), mask([[F, F, F], [T, T, T]]))
    w = torch.tensor([[2.0, 1.0, 1.0, 3.0]])
    assert torch.equal(M.magnitude_mask(w, 0.25), mask([[T, F, T, T]]))


def test_magnitude_handles_conv_weights() -> None:
    w = torch.tensor([1.0, -4.0, 2.0, 3.0]).reshape(2, 2, 1, 1)
    keep = M.magnitude_mask(w, 0.5)
    assert keep.shape == w.shape
    assert torch.equal(keep.reshape(-1), torch.tensor([F, T, F, T]))


def test_global_magnitude_uses_one_threshold_across_tensors() -> None:
    weights = {"a": torch.tensor([[0.1, 0.9], [0.2, 0.3]]), "b": torch.tensor([[0.8, -0.4, 0.7, 0.6]])}
    # 8 entries, 4 pruned: 0.1, 0.2, 0.3 in a and 0.4 in b -> a at 75%, b at 25%
    masks = M.global_magnitude_masks(weights, 0.5)
    assert torch.equal(masks["a"], mask([[F, T], [F, F]]))
    assert torch.equal(masks["b"], mask([[T, F, T, T]]))
    per_layer = {name: M.magnitude_mask(w, 0.5) for name, w in weights.items()}
    assert int((~per_layer["a"]).sum()) == 2 and int((~per_layer["b"]).sum()) == 2


def test_global_magnitude_breaks_ties_by_tensor_order_then_position() -> None:
    masks = M.global_magnitude_masks({"a": torch.ones(1, 3), "b": torch.ones(1, 3)}, 0.5)
    assert torch.equal(masks["a"], mask([[T, F, F]]))  # all of a ranks first; its first weight stays
    assert torch.equal(masks["b"], mask([[T, T, T]]))


def test_global_ranking_through_the_magnitude_pruner() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4, bias=False), nn.Linear(4, 4, bias=False))
    with torch.no_grad():
        model[0].weight.mul_(0.01)  # the first layer is all small: one threshold takes it whole...
    masks = prune(model, PruneConfig("magnitude", 0.5, global_ranking=True),
                  predicate=lambda name, m: isinstance(m, nn.Linear)).masks
    assert int(masks["0.weight"].sum()) == 1  # ...but for its largest weight: a layer is never emptied
    assert bool(masks["0.weight"].view(-1)[model[0].weight.abs().argmax()])
    assert bool(masks["1.weight"].all())


# --- wanda -----------------------------------------------------------------------------------


def test_wanda_scores_weight_times_input_norm() -> None:
    w = torch.tensor([[1.0, -2.0], [3.0, 1.0]])
    scores = M.wanda_scores(w, torch.tensor([4.0, 1.0]))
    assert torch.equal(scores, torch.tensor([[4.0, 2.0], [12.0, 1.0]]))
    with pytest.raises(StarfishError, match="3 input norms for 2 weight columns"):
        M.wanda_scores(w, torch.ones(3))


def test_wanda_input_norm_changes_the_choice_versus_magnitude() -> None:
    w = torch.tensor([[1.0, -2.0], [3.0, 1.0]])
    model = nn.Sequential(nn.Linear(2, 2, bias=False))
    with torch.no_grad():
        model[0].weight.copy_(w)
    images = torch.tensor([[3.0, 0.0], [4.0, 1.0]])  # ||x_0|| = 5, ||x_1|| = 1
    linear = lambda name, module: isinstance(module, nn.Linear)  # noqa: E731
    wanda = prune(model, PruneConfig("wanda", 0.5), images, predicate=linear).masks["0.weight"]
    # scores [[5, 2], [15, 1]]: row 0 now drops column 1, which plain magnitude keeps
    assert torch.equal(wanda, mask([[T, F], [T, F]]))
    plain = M.row_mask(w.abs(), 0.5, w.shape)
    assert torch.equal(plain, mask([[F, T], [T, F]]))


def test_wanda_ranks_within_each_row() -> None:
    scores = torch.tensor([[1.0, 2.0, 3.0, 4.0], [40.0, 30.0, 20.0, 10.0]])
    assert torch.equal(M.row_mask(scores, 0.5, scores.shape), mask([[F, F, T, T], [T, T, F, F]]))


def test_wanda_conv_norm_covers_each_channels_kernel_columns() -> None:
    conv = nn.Conv2d(2, 1, kernel_size=(1, 2), bias=False)
    with torch.no_grad():
        conv.weight.copy_(torch.tensor([[[[1.0, 1.0]], [[2.0, 0.5]]]]))
    model = nn.Sequential(conv)
    images = torch.zeros(1, 2, 1, 2)
    images[0, 0] = 3.0  # channel 0: ||x|| = sqrt(2 * 9) ~ 4.24; channel 1: 0
    keep = prune(model, PruneConfig("wanda", 0.5), images,
                 predicate=lambda name, m: isinstance(m, nn.Conv2d)).masks["0.weight"]
    # columns (c0k0, c0k1, c1k0, c1k1) score (4.24, 4.24, 0, 0): channel 1 goes despite |w| = 2
    assert torch.equal(keep.reshape(-1), torch.tensor([T, T, F, F]))


def test_wanda_needs_images(vit: nn.Module) -> None:
    with pytest.raises(StarfishError, match="wanda needs calibration images"):
        prune(vit, PruneConfig("wanda", 0.5))


# --- N:M -------------------------------------------------------------------------------------


@pytest.mark.parametrize(("n", "scores", "expected"), [
    (2, [[0.1, 0.4, 0.3, 0.2, 5.0, 6.0, 7.0, 8.0],
         [1.0, 1.0, 1.0, 1.0, 9.0, 0.0, 0.0, 9.0]],
        [[F, T, T, F, F, F, T, T],
         [F, F, T, T, T, F, F, T]]),
    (1, [[0.1, 0.4, 0.3, 0.2, 8.0, 6.0, 7.0, 5.0],
         [2.0, 2.0, 1.0, 1.0, 0.0, 0.0, 0.0, 3.0]],
        [[F, T, F, F, T, F, F, F],
         [F, T, F, F, F, F, F, T]]),
], ids=["2:4", "1:4"])
def test_nm_n_of_4(n: int, scores: list[list[float]], expected: list[list[bool]]) -> None:
    assert torch.equal(M.nm_mask(torch.tensor(scores), n, 4), mask(expected))


def test_nm_groups_of_conv_weights_are_input_channels_at_each_kernel_position() -> None:
    """(out=1, in=4, kh=1, kw=2): the groups are in-channels 0..3 at kw=0, and at kw=1."""
    w = torch.tensor([[4.0, 0.1], [1.0, 0.4], [3.0, 0.2], [2.0, 0.3]]).reshape(1, 4, 1, 2)
    keep = M.nm_mask(w, 2, 4)
    assert keep.is_contiguous() and keep.shape == w.shape
    assert keep[0, :, 0, 0].tolist() == [T, F, T, F] and keep[0, :, 0, 1].tolist() == [F, T, F, T]


def test_nm_input_size_must_be_a_multiple_of_m() -> None:
    with pytest.raises(StarfishError, match="input size 6 to be a multiple of M=4"):
        M.nm_mask(torch.ones(2, 6), 2, 4)
    with pytest.raises(StarfishError, match="0 < N < M"):
        M.nm_mask(torch.ones(2, 4), 4, 4)


def test_nm_pruner_requires_matching_sparsity(vit: nn.Module) -> None:
    with pytest.raises(StarfishError, match="prune.sparsity=0.75"):
        prune(vit, PruneConfig("nm", 0.5, nm="1:4"))


def test_parse_nm() -> None:
    assert parse_nm("2:4") == (2, 4)
    assert parse_nm("1:10") == (1, 10)
    for bad, message in (("4:4", "0 < N < M"), ("3:2", "0 < N < M"), ("0:4", "0 < N < M"),
                         ("x", "not N:M"), ("2:4:8", "not N:M"), ("a:b", "not N:M")):
        with pytest.raises(StarfishError, match=message) as info:
            parse_nm(bad)
        assert "prune.nm" in str(info.value)


@pytest.mark.parametrize("sparsity, pattern", [(0.5, "2:4"), (0.75, "1:4"), (0.9, "1:10"), (0.95, "1:20"),
                                               (0.875, "1:8"), (0.3, "7:10")])
def test_nm_pattern_for(sparsity: float, pattern: str) -> None:
    assert nm_pattern_for(sparsity) == pattern


def test_nm_pattern_for_impossible_sparsity() -> None:
    with pytest.raises(StarfishError, match="no N:M pattern"):
        nm_pattern_for(0.33)


# --- sparsity range --------------------------------------------------------------------------


@pytest.mark.parametrize("sparsity", [1.0, -0.1, 1.5])
def test_sparsity_outside_unit_interval_raises(sparsity: float) -> None:
    w = torch.ones(2, 4)
    for call in (lambda: M.magnitude_mask(w, sparsity), lambda: M.row_mask(w, sparsity, w.shape),
                 lambda: M.global_magnitude_masks({"w": w}, sparsity), lambda: PruneConfig("magnitude", sparsity)):
        with pytest.raises(StarfishError, match=r"prune.sparsity=.* must be in \[0, 1\)"):
            call()


def test_unknown_pruner_raises() -> None:
    with pytest.raises(StarfishError,
                       match=r"unknown pruner 'bogus'; use one of \['contribution', 'magnitude', 'nm', "
                             r"'torch-pruning', 'wanda'\]"):
        PruneConfig("bogus", 0.5)


# --- invariants on the demo ViT --------------------------------------------------------------


def expected_scope() -> list[str]:
    return [f"blocks.{i}.{leaf}.weight" for i in range(4)
            for leaf in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")]


def test_default_scope_selects_exactly_the_block_linears(vit: nn.Module) -> None:
    assert list(scope_weights(vit)) == expected_scope()
    in_scope = default_scope(vit)
    modules = dict(vit.named_modules())
    assert not in_scope("patch_embed.proj", modules["patch_embed.proj"])
    assert not in_scope("head", modules["head"])


RESNET18_SCOPE = [f"layer{s}.{b}.{conv}.weight" for s in range(1, 5) for b in range(2)
                  for conv in (("conv1", "conv2", "downsample.0") if s > 1 and b == 0 else ("conv1", "conv2"))]
MOBILENETV1_SCOPE = [f"blocks.{s}.{b}.conv_pw.weight" for s, depth in enumerate((1, 2, 2, 6, 2)) for b in range(depth)]
CONVNEXT_ATTO_SCOPE = [name for s, depth in enumerate((2, 2, 6, 2))
                       for name in ([f"stages.{s}.downsample.1.weight"] if s else [])
                       + [f"stages.{s}.blocks.{b}.mlp.{fc}.weight" for b in range(depth) for fc in ("fc1", "fc2")]]


@pytest.mark.parametrize("name, expected", [("resnet18", RESNET18_SCOPE), ("mobilenetv1_100", MOBILENETV1_SCOPE),
                                            ("convnext_atto", CONVNEXT_ATTO_SCOPE)])
def test_default_scope_on_cnns_is_every_dense_conv_inside_the_stages(name: str, expected: list[str]) -> None:
    """Stem, depthwise convs and head stay out; ConvNeXt's downsample conv (outside its blocks) stays in."""
    assert list(scope_weights(timm.create_model(name, num_classes=10))) == expected


def test_scope_that_selects_nothing_raises(vit: nn.Module) -> None:
    with pytest.raises(StarfishError, match="selects no layers"):
        scope_weights(vit, lambda name, module: False)


@pytest.mark.parametrize("method, sparsity, nm", [("magnitude", 0.5, "2:4"), ("magnitude", 0.9, "2:4"),
                                                  ("wanda", 0.5, "2:4"), ("wanda", 0.75, "2:4"),
                                                  ("nm", 0.5, "2:4"), ("nm", 0.75, "1:4")])
def test_exact_sparsity_per_layer_on_the_demo_vit(vit: nn.Module, method: str, sparsity: float, nm: str) -> None:
    torch.manual_seed(1)
    images = torch.randn(8, 1, 28, 28)
    before = {k: v.clone() for k, v in vit.state_dict().items()}
    masks = prune(vit, PruneConfig(method, sparsity, nm=nm), images).masks
    assert list(masks) == expected_scope()
    for name, v in vit.state_dict().items():
        assert torch.equal(v, before[name]), f"prune changed {name}"
    params = dict(vit.named_parameters())
    for name, keep in masks.items():
        weight = params[name]
        assert keep.dtype == torch.bool and keep.shape == weight.shape
        if method == "magnitude":
            assert int((~keep).sum()) == round(sparsity * weight.numel()), name
        else:  # wanda and N:M prune the same count from every row
            per_row = (~keep).sum(dim=1)
            assert bool((per_row == round(sparsity * weight.shape[1])).all()), name
        assert abs(int((~keep).sum()) / keep.numel() - sparsity) <= 0.5 / keep.shape[1], name
        if method == "nm":
            n, m = parse_nm(nm)
            assert bool((keep.reshape(-1, m).sum(dim=1) == n).all()), name


def test_sparsify_zeros_exactly_the_masked_entries(vit: nn.Module) -> None:
    before = {k: v.clone() for k, v in vit.state_dict().items()}
    masks = prune(vit, PruneConfig("magnitude", 0.5)).masks
    assert sparsify_(vit, masks) is vit
    after = vit.state_dict()
    for name, value in after.items():
        if name in masks:
            keep = masks[name]
            assert bool((value[~keep] == 0).all()), name
            assert torch.equal(value[keep], before[name][keep]), name
            assert bool((before[name][keep] != 0).all()), name  # kept entries were not zero already
        else:
            assert torch.equal(value, before[name]), name


def test_registered_pruners() -> None:
    assert {"magnitude", "wanda", "nm"} <= set(PRUNERS.names())


@pytest.mark.parametrize("method", ["magnitude", "wanda"])
def test_exact_sparsity_per_layer_on_a_cnn(method: str) -> None:
    torch.manual_seed(0)
    model = timm.create_model("resnet10t", num_classes=10).eval()
    images = torch.randn(2, 3, 32, 32)
    masks = prune(model, PruneConfig(method, 0.5), images).masks
    for name, keep in masks.items():
        rows = (~keep).reshape(keep.shape[0], -1)
        if method == "magnitude":
            assert int(rows.sum()) == round(0.5 * keep.numel()), name
        else:
            assert bool((rows.sum(dim=1) == round(0.5 * rows.shape[1])).all()), name
