"""Structured pruning: hand-worked groups and masks, masked == slim on every covered family, slim
checkpoints rebuilt from their record alone, and the heal of a slim model against the masked one."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from timm.layers import Mlp

from starfish.config import HealConfig, PruneConfig
from starfish.errors import StarfishError
from starfish.healing import heal_
from starfish.models import create_model, load_checkpoint, save_checkpoint
from starfish.pruning import prune, sparsify_
from starfish.pruning.groups import Member, StructurePlan, find_groups, groups_for
from starfish.pruning.pruners import magnitude_scores
from starfish.pruning.slim import architecture_of, kept_by_group, rebuild_, size_ratios, slim_, slim_masks
from starfish.pruning.structured import contributions, structured_masks

# (timm name, kwargs that keep it small, structure, input size): every family structured pruning covers.
FAMILIES = [
    ("starfish_vit_fmnist", {}, "neurons+heads", (1, 28, 28)),
    ("starfish_cnn_fmnist", {}, "channels", (1, 28, 28)),
    ("vit_tiny_patch16_224", {"img_size": 32, "depth": 2}, "neurons+heads", (3, 32, 32)),
    ("deit_tiny_patch16_224", {"img_size": 32, "depth": 2}, "neurons+heads", (3, 32, 32)),
    ("swin_tiny_patch4_window7_224", {"img_size": 56, "depths": (1, 1, 1, 1), "embed_dim": 32,
                                      "num_heads": (2, 2, 4, 4)}, "neurons+heads", (3, 56, 56)),
    ("convnext_atto", {}, "channels", (3, 64, 64)),
    ("resnet18", {}, "channels", (3, 64, 64)),
    ("resnet26", {}, "channels", (3, 64, 64)),
    ("efficientnet_b0", {}, "channels", (3, 64, 64)),
    ("mobilenetv3_small_100", {}, "channels", (3, 64, 64)),
]


def family_model(name: str, kwargs: dict) -> torch.nn.Module:
    """The family at random weights, with BatchNorm statistics and affines moved off their identity
    defaults (else a removed channel's BatchNorm would output zero and hide a missed coupling)."""
    torch.manual_seed(0)
    model = create_model(name, kwargs=kwargs).double().eval()
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.running_mean.normal_(0, 0.2)
            module.running_var.uniform_(0.5, 1.5)
            module.weight.data.uniform_(0.5, 1.5)
            module.bias.data.normal_(0, 0.2)
    return model


def test_member_index_covers_each_section_and_head_width() -> None:
    """A fused qkv of 3 heads of width 2: keeping heads 0 and 2 keeps rows 0-1 and 4-5 of each of q, k, v."""
    rows = Member("qkv.weight", 0, sections=3, width=2).index(torch.tensor([0, 2]), units=3)
    assert rows.tolist() == [0, 1, 4, 5, 6, 7, 10, 11, 12, 13, 16, 17]


def hand_worked_mlp() -> torch.nn.Module:
    """A model holding one MLP of 4 neurons: fc1 rows (1, 0), (3, 0), (0.5, 0), (2, 0); fc2 (1, 3, 0.5, 0)."""
    wrapper = torch.nn.Module()
    wrapper.mlp = Mlp(2, 4, 1)
    with torch.no_grad():
        wrapper.mlp.fc1.weight.copy_(torch.tensor([[1.0, 0.0], [3.0, 0.0], [0.5, 0.0], [2.0, 0.0]]))
        wrapper.mlp.fc2.weight.copy_(torch.tensor([[1.0, 3.0, 0.5, 0.0]]))
    return wrapper


def test_magnitude_removes_the_neurons_with_the_smallest_group_norm() -> None:
    """Hand-worked: neuron i's group is fc1 row i and fc2 column i; norms sqrt(1+1), sqrt(9+9), sqrt(0.25+0.25), 2."""
    wrapper = hand_worked_mlp()
    groups = find_groups(wrapper, ("neurons",))
    masks = structured_masks(wrapper, groups, PruneConfig(sparsity=0.5), magnitude_scores(wrapper, groups, None))
    assert masks["mlp.fc1.weight"].all(1).tolist() == [False, True, False, True]  # neurons 0 and 2 go
    assert masks["mlp.fc2.weight"].tolist() == [[False, True, False, True]]
    assert kept_by_group(wrapper, masks) == {"mlp": [1, 3]}


def test_contribution_removes_the_neurons_that_add_least_to_the_output() -> None:
    """Hand-worked, the weights of the magnitude case: neuron i adds fc2[0, i]^2 * ||h_i||^2 to the
    output's energy; with hidden norms 4, 1, 8, 1 that is 16, 9, 16 and 0, so neurons 3 and 1 go
    (magnitude removes 0 and 2)."""
    wrapper = hand_worked_mlp()
    norms = {"mlp.fc1": torch.tensor([1.0, 1.0]), "mlp.fc2": torch.tensor([4.0, 1.0, 8.0, 1.0])}
    groups = find_groups(wrapper, ("neurons",))
    scores = {g.name: contributions(g, dict(wrapper.named_parameters()), norms) for g in groups}
    masks = structured_masks(wrapper, groups, PruneConfig("contribution", 0.5, structure="neurons"), scores)
    assert masks["mlp.fc1.weight"].all(1).tolist() == [True, False, True, False]
    assert masks["mlp.fc2.weight"].tolist() == [[True, False, True, False]]


def test_a_neurons_contribution_is_the_energy_its_removal_takes_from_the_block_output() -> None:
    """On real activations of the demo ViT: removing one neuron (its fc2 column) changes the block's
    output by exactly its score, summed over tokens. (A head's score sums its columns' energies and
    leaves out their cross terms.)"""
    from starfish.pruning.pruners import input_norms

    torch.manual_seed(0)
    model = create_model("starfish_vit_fmnist").double().eval()
    x = torch.randn(4, 1, 28, 28, dtype=torch.float64)
    [group] = [g for g in find_groups(model, ("neurons",)) if g.name == "blocks.1.mlp"]
    weights = dict(model.named_parameters())
    scores = contributions(group, weights, input_norms(model, ["blocks.1.mlp.fc2"], x))
    fc2 = weights["blocks.1.mlp.fc2.weight"]
    outputs = []
    handle = model.blocks[1].register_forward_hook(lambda module, args, out: outputs.append(out))
    with torch.no_grad():
        model(x)
        for unit in range(group.units):
            saved = fc2[:, unit].clone()
            fc2[:, unit] = 0
            model(x)
            fc2[:, unit] = saved
    handle.remove()
    energies = torch.stack([(out - outputs[0]).pow(2).sum() for out in outputs[1:]])
    assert torch.allclose(energies, scores.double(), rtol=1e-5)


# every family by group magnitude; wanda and contribution (which read activations) on one of each kind of group
CASES = [(*family, "magnitude") for family in FAMILIES] + [
    (*family, method) for method in ("wanda", "contribution") for family in FAMILIES
    if family[0] in ("starfish_vit_fmnist", "starfish_cnn_fmnist", "swin_tiny_patch4_window7_224", "efficientnet_b0")]


@pytest.mark.parametrize("name, kwargs, structure, size, method", CASES, ids=[f"{c[0]}-{c[4]}" for c in CASES])
def test_the_slim_model_computes_what_the_masked_model_does(name: str, kwargs: dict, structure: str,
                                                            size: tuple[int, ...], method: str,
                                                            tmp_path: Path) -> None:
    model = family_model(name, kwargs)
    x = torch.randn(3, *size, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    masks = prune(model, PruneConfig(method, 0.5, structure=structure), x).masks
    sparsify_(model, masks)
    with torch.no_grad():
        masked = model(x)
    dense = family_model(name, kwargs)
    architecture = slim_(model, masks)
    with torch.no_grad():
        slim = model(x)
    assert (slim - masked).abs().max() <= 1e-5
    ratios = size_ratios(model, dense, size)
    assert ratios["params_ratio"] < 0.9 and ratios["flops_ratio"] < 0.8
    assert set(kept_by_group(model, {})) == {g.name for g in groups_for(dense, structure)}
    # the checkpoint rebuilds the same modules from its record alone, and its masks say which layers train
    path = tmp_path / "slim.safetensors"
    save_checkpoint(path, model.float(), name, masks=slim_masks(model), metadata={"model_kwargs": kwargs})
    with safe_open(str(path), framework="pt") as handle:
        assert not any(key.startswith("masks/") for key in handle.keys())
        assert json.loads(handle.metadata()["starfish"])["architecture"] == json.loads(json.dumps(architecture))
    restored, restored_masks, _ = load_checkpoint(path)
    assert architecture_of(restored) == architecture
    assert set(restored_masks) == set(slim_masks(model)) and all(m.all() for m in restored_masks.values())
    with torch.no_grad():
        assert torch.equal(restored.double()(x), model.double()(x))


def test_a_structure_the_family_lacks_and_norms_across_units_are_refused() -> None:
    resnet = create_model("resnet18")
    with pytest.raises(StarfishError, match=r"ResNet has no heads that can be removed \(it has: channels\)"):
        groups_for(resnet, "heads")
    vit = create_model("starfish_vit_fmnist", kwargs={"mlp_layer": Mlp, "scale_mlp_norm": True})
    with pytest.raises(StarfishError, match="the MLP blocks.0.mlp normalizes across its units"):
        groups_for(vit, "neurons")


def test_a_damaged_architecture_record_is_refused_before_allocating() -> None:
    model = create_model("starfish_vit_fmnist")
    for record, why in [({"shapes": {"blocks.0.mlp.fc1.weight": [10**9, 64]}, "attributes": {}, "kept": {}},
                         "does not fit its dense shape"),
                        ({"shapes": {"nope.weight": [1]}, "attributes": {}, "kept": {}}, "does not have"),
                        ({"shapes": {}, "attributes": {"blocks.0.attn": {"num_heads": 99}}, "kept": {}},
                         "not a unit count up to 4"),
                        ({"shapes": {}, "attributes": {"blocks.0.attn": {"forward": 1}}, "kept": {}},
                         "not a unit count"),
                        ({"shapes": {}, "attributes": {}, "kept": {"blocks.0.mlp": [3, 1]}}, "not increasing"),
                        ({"shapes": {}}, "is not a mapping of shapes")]:
        with pytest.raises(StarfishError, match=why):
            rebuild_(copy.deepcopy(model), record, "x.safetensors")


@pytest.mark.parametrize("preset", ["default", "recommended"])
def test_healing_the_slim_model_matches_healing_the_masked_model(preset: str, demo_checkpoint: Path,
                                                                 fmnist_train: torch.utils.data.Dataset) -> None:
    """The same heal on the masked and on the slim model (STARFISH; the recommended least-squares
    warm start, logit term and last state): every slim weight ends where its masked counterpart
    does. The warm start's conjugate gradients stop at a 1e-6 residual, and Adam's normalized steps
    carry that difference into weights whose gradients are near zero, so recommended's tolerance is
    wider (measured: weights 1.2e-3, outputs 2e-4 of their scale)."""
    weight_tol, output_tol = {"default": (2e-5, 1e-4), "recommended": (5e-3, 1e-3)}[preset]
    images = torch.stack([fmnist_train[i][0] for i in range(64)])
    dense = create_model("starfish_vit_fmnist", checkpoint=demo_checkpoint)
    masks = prune(dense, PruneConfig("magnitude", 0.5, structure="neurons+heads")).masks
    cfg = HealConfig.from_preset(preset, steps=6, batch_size=16, holdout=0.0)
    masked = sparsify_(copy.deepcopy(dense), masks)
    heal_(masked, dense, masks, images, cfg)
    slim = sparsify_(copy.deepcopy(dense), masks)
    slim_(slim, masks)
    heal_(slim, dense, slim_masks(slim), images, cfg)
    expected = copy.deepcopy(masked)
    slim_(expected, masks)
    for key, value in slim.state_dict().items():
        assert (value - expected.state_dict()[key]).abs().max() <= weight_tol, key
    with torch.no_grad():
        masked_out, slim_out = masked(images), slim(images)
    assert (slim_out - masked_out).abs().max() <= output_tol * masked_out.abs().max()


def test_the_demo_cnn_aligns_the_kept_channels_of_narrowed_block_outputs() -> None:
    """The demo CNN has no residuals: its channels group narrows block outputs, so the heal compares
    only the dense channels a block keeps (and a masked block is cut to the same channels)."""
    from starfish.pruning.slim import state_channels

    torch.manual_seed(0)
    dense = create_model("starfish_cnn_fmnist")
    masks = prune(dense, PruneConfig("magnitude", 0.5, structure="channels")).masks
    masked = sparsify_(copy.deepcopy(dense), masks)
    narrowed = state_channels(masked, dense, masks)
    assert list(narrowed) == ["blocks.0.0", "blocks.1.0", "blocks.1.1", "blocks.2.0", "blocks.2.1"]
    assert narrowed["blocks.0.0"].numel() == 16  # of 32
    slim = copy.deepcopy(masked)
    slim_(slim, masks)
    assert {k: v.tolist() for k, v in state_channels(slim, dense, {}).items()} == \
        {k: v.tolist() for k, v in narrowed.items()}


def test_torch_pruning_chooses_what_group_magnitude_does_where_it_takes_the_family() -> None:
    """Torch-Pruning's MetaPruner, kept to the same groups, picks the very units our group
    magnitude picks on a ViT and a ConvNeXt and leaves the model as it was (on a ResNet whose
    BatchNorm is not the identity it picks other units, so ResNet is not asserted here); where
    it cannot take the coupling (a depthwise conv inside the group) it is refused in one line,
    not silently a no-op."""
    for name, structure, size in [("starfish_vit_fmnist", "neurons+heads", (1, 28, 28)),
                                  ("convnext_atto", "channels", (3, 64, 64))]:
        model = family_model(name, {})
        before = {k: v.clone() for k, v in model.state_dict().items()}
        x = torch.randn(4, *size, dtype=torch.float64)
        chosen = prune(model, PruneConfig("torch-pruning", 0.5, structure=structure), x).masks
        ours = prune(model, PruneConfig("magnitude", 0.5, structure=structure)).masks
        assert set(chosen) == set(ours) and all(torch.equal(chosen[k], ours[k]) for k in ours), name
        assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()), name
    cnn = family_model("starfish_cnn_fmnist", {})
    with pytest.raises(StarfishError, match="Torch-Pruning does not take this family's channels as one group"):
        prune(cnn, PruneConfig("torch-pruning", 0.5, structure="channels"), torch.randn(4, 1, 28, 28,
                                                                                      dtype=torch.float64))
    with pytest.raises(StarfishError, match="torch-pruning removes whole units"):
        PruneConfig("torch-pruning", 0.5)


def test_block_loss_allocation_spreads_the_target_over_the_blocks_unequally(
        demo_checkpoint: Path, fmnist_train) -> None:
    """prune.allocation=block-loss on the trained demo ViT: each structure loses the target in
    total (to the unit), spread unequally over the blocks, and no group is emptied; without
    structure, or with global ranking, it is refused."""
    from starfish.calibration import stratified_indices
    from starfish.pruning import pruners

    dense = create_model("starfish_vit_fmnist", checkpoint=demo_checkpoint).eval()
    images = torch.stack([fmnist_train[i][0] for i in stratified_indices(fmnist_train.targets, 0.004, 0)])
    cfg = PruneConfig("contribution", 0.5, structure="neurons+heads", allocation="block-loss")
    groups = list(StructurePlan.find(dense, cfg.structure).groups)
    amounts = pruners.block_loss_amounts(dense, groups, cfg, pruners.contribution_scores(dense, groups, images), images)
    for structure in ("neurons", "heads"):
        members = [g for g in groups if g.structure == structure]
        assert sum(amounts[g.name] for g in members) / len(members) == pytest.approx(0.5)
        assert all(0 <= amounts[g.name] <= (g.units - 1) / g.units for g in members)
    masks = prune(dense, cfg, images).masks
    removed = {i: 1 - float(masks[f"blocks.{i}.mlp.fc1.weight"].float().mean()) for i in range(4)}
    assert sum(removed.values()) / 4 == pytest.approx(0.5, abs=2 / 256) and len(set(removed.values())) > 1
    assert all(masks[f"blocks.{i}.mlp.fc1.weight"].any(1).sum() >= 1 for i in range(4))
    with pytest.raises(StarfishError, match="prune.allocation=block-loss shares out whole units per block"):
        PruneConfig("magnitude", 0.5, allocation="block-loss")
    with pytest.raises(StarfishError, match="prune.global_ranking=false"):
        PruneConfig("magnitude", 0.5, structure="neurons", global_ranking=True, allocation="block-loss")


def test_depth_removes_the_blocks_whose_removal_moves_the_block_outputs_least(
        demo_checkpoint: Path, fmnist_train, tmp_path: Path) -> None:
    """prune.depth=1 at 0.75 on the trained demo ViT: the block removed whole is the one whose
    removal alone costs the least 1 - cosine over the block outputs (computed here apart from the
    pruner), each structure loses exactly 75% of its units, and the slim model (the removed
    block's attention and MLP adding only their biases) computes what the masked one does, in
    torch, after a checkpoint round trip and as an ONNX file in onnxruntime."""
    from starfish.calibration import stratified_indices
    from starfish.capture import ActivationCapture
    from starfish.formats.onnx import export_onnx, run_session, session
    from starfish.pruning.structured import masks_removing

    dense = create_model("starfish_vit_fmnist", checkpoint=demo_checkpoint).eval()
    images = torch.stack([fmnist_train[i][0] for i in stratified_indices(fmnist_train.targets, 0.004, 0)])
    blocks = [f"blocks.{i}" for i in range(4)]

    def states(net: torch.nn.Module) -> dict[str, torch.Tensor]:
        with torch.no_grad(), ActivationCapture(net, blocks) as capture:
            net(images[:64])
            return dict(capture.values)

    groups, reference = groups_for(dense, "neurons+heads"), states(dense)
    cost = {}
    for block in blocks:
        alone = [g for g in groups if g.name.startswith(block + ".")]
        found = states(sparsify_(copy.deepcopy(dense), masks_removing(
            dict(dense.named_parameters()), alone, {g.name: torch.arange(g.units) for g in alone})))
        cost[block] = sum(float(1 - torch.nn.functional.cosine_similarity(
            found[b].flatten(1), reference[b].flatten(1)).mean()) for b in blocks)
    masks = prune(dense, PruneConfig("contribution", 0.75, structure="neurons+heads", depth=1), images).masks
    kept = kept_by_group(dense, masks)
    assert [b for b in blocks if not kept[f"{b}.attn"] and not kept[f"{b}.mlp"]] == [min(cost, key=cost.get)]
    assert sum(len(kept[f"{b}.attn"]) for b in blocks) == 4 and sum(len(kept[f"{b}.mlp"]) for b in blocks) == 256

    masked = sparsify_(copy.deepcopy(dense), masks)
    slim = copy.deepcopy(masked)
    slim_(slim, masks)
    save_checkpoint(tmp_path / "slim.safetensors", slim, "starfish_vit_fmnist", slim_masks(slim))
    loaded = load_checkpoint(tmp_path / "slim.safetensors")[0].eval()
    export_onnx(loaded, tmp_path / "slim.onnx", (1, 28, 28), {})
    with torch.no_grad():
        expected = masked(images[:32])
        for out in (slim(images[:32]), loaded(images[:32]),
                    torch.from_numpy(run_session(session(tmp_path / "slim.onnx"), images[:32]))):
            assert (out - expected).abs().max() <= 1e-4 * expected.abs().max()


def test_depth_beyond_the_model_or_the_target_is_refused(demo_checkpoint: Path) -> None:
    dense = create_model("starfish_vit_fmnist", checkpoint=demo_checkpoint).eval()
    images = torch.randn(8, 1, 28, 28)
    for sparsity, depth, why in [(0.75, 4, r"would remove all 4 blocks of the model; lower it \(at most 3\)"),
                                 (0.5, 3, "removes more (neurons|heads) than prune.sparsity=0.5 asks for"),
                                 (0.75, 3, "leaves the other blocks' (neurons|heads) whole, so a heal has no"),
                                 (0.75, 2, None)]:
        cfg = PruneConfig("contribution", sparsity, structure="neurons+heads", depth=depth)
        if why is None:
            prune(dense, cfg, images)
            continue
        with pytest.raises(StarfishError, match=why):
            prune(dense, cfg, images)
    for fields in ({}, {"structure": "channels"}, {"structure": "neurons+heads", "allocation": "block-loss"}):
        with pytest.raises(StarfishError, match="prune.depth=1 removes whole transformer blocks"):
            PruneConfig("magnitude", 0.5, depth=1, **fields)
    with pytest.raises(StarfishError, match="prune.depth=1 measures each block on calibration images"):
        prune(dense, PruneConfig("magnitude", 0.5, structure="neurons+heads", depth=1))


def test_blocks_no_group_lies_in_are_reported_in_the_sidecar_and_by_info(tmp_path: Path,
                                                                         capsys: pytest.CaptureFixture) -> None:
    """tf_efficientnetv2_b0 at 0.5 channels keeps its fused blocks (EdgeResidual) and its first
    ConvBnAct whole, so its FLOPs fall by less than half: the structure report and `info` name
    those blocks and why, where before nothing did."""
    from starfish.cli import main
    from starfish.pruning import remove_units_

    dense = create_model("tf_efficientnetv2_b0").eval()
    masks, _, plan = prune(dense, PruneConfig("magnitude", 0.5, structure="channels"))
    slim = copy.deepcopy(dense)
    slim_masks_, report = remove_units_(slim, masks, plan)
    assert report["skipped"] == plan.skipped == {
        "blocks.0.0": "starfish removes no channels from a ConvBnAct",
        **{f"blocks.{s}.{b}": "starfish removes no channels from an EdgeResidual" for s in (1, 2) for b in (0, 1)}}
    assert 0.5 < report["flops_ratio"] < 0.8 and slim_masks_.keys() == slim_masks(slim).keys()
    path = tmp_path / "slim.safetensors"
    save_checkpoint(path, slim, "tf_efficientnetv2_b0", slim_masks(slim))
    capsys.readouterr()
    assert main(["info", str(path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["skipped"] == plan.skipped
    assert main(["info", str(path)]) == 0
    assert "blocks.1.0: kept whole (starfish removes no channels from an EdgeResidual)" in capsys.readouterr().out
