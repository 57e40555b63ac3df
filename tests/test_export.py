"""The compressed export: a bit-exact round trip, sizes near the bitmask ideal, clean refusals."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from starfish.cli import main
from starfish.config import PruneConfig
from starfish.formats.bitmask import compress, decompress
from starfish.io import read_json, sidecar_path
from starfish.models import create_model, load_checkpoint, save_checkpoint
from starfish.pruning import prune, sparsify_


def same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal dtype, shape and bytes: torch.equal calls -0.0 and +0.0 equal, bytes do not."""
    return a.dtype == b.dtype and a.shape == b.shape and \
        a.contiguous().view(torch.uint8).numpy().tobytes() == b.contiguous().view(torch.uint8).numpy().tobytes()


@pytest.mark.parametrize("sparsity", [0.5, 0.75, 0.9])
def test_export_round_trip_is_bit_exact_and_near_the_bitmask_ideal(sparsity: float, tmp_path: Path) -> None:
    torch.manual_seed(0)
    dense = create_model("deit_tiny_patch16_224", num_classes=10)
    masks = prune(dense, PruneConfig("magnitude", sparsity)).masks
    model = sparsify_(copy.deepcopy(dense), masks)
    with torch.no_grad():  # a kept weight that is exactly zero stays kept, and a kept -0.0 stays -0.0
        kept = masks["blocks.0.mlp.fc1.weight"].nonzero()
        model.blocks[0].mlp.fc1.weight[tuple(kept[0].tolist())] = 0.0
        model.blocks[0].mlp.fc1.weight[tuple(kept[1].tolist())] = -0.0
    fc1 = dense.blocks[0].mlp.fc1.weight
    assert bool(((fc1 < 0) & ~masks["blocks.0.mlp.fc1.weight"]).any())  # pruned negatives: sparsify_ writes +0.0
    assert not bool(torch.signbit(model.blocks[0].mlp.fc1.weight[~masks["blocks.0.mlp.fc1.weight"]]).any())
    pruned = tmp_path / "pruned.safetensors"
    save_checkpoint(pruned, model, "deit_tiny_patch16_224", masks=masks)
    out = tmp_path / "export" / "model.safetensors"
    assert main(["export", "--checkpoint", str(pruned), "--out", str(out)]) == 0
    restored, restored_masks, name = load_checkpoint(out)
    assert name == "deit_tiny_patch16_224" and set(restored_masks) == set(masks)
    assert all(torch.equal(restored_masks[k], masks[k]) for k in masks)
    assert all(same_bytes(v, model.state_dict()[k]) for k, v in restored.state_dict().items())
    sizes = read_json(sidecar_path(out))["sizes"]
    assert sizes["bytes"] == out.stat().st_size and 0 <= sizes["pruned_weight_over_ideal"] < 0.05
    ideal_ratio = (1 - sparsity) + 1 / 32  # (1 - s) x 4 bytes + 1/8 byte, over 4 bytes
    assert sizes["size_ratio"] < ideal_ratio + 0.1  # the unpruned rest (embeddings, norms, head) is small


def test_compress_refuses_weights_that_do_not_hold_their_masks() -> None:
    weight = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    masks = {"w": torch.tensor([[True, False], [True, True]])}
    with pytest.raises(Exception, match="masks do not hold"):
        compress({"w": weight}, masks)
    pruned = weight.masked_fill(~masks["w"], 0.0)
    state, back = decompress(compress({"w": pruned}, masks))
    assert same_bytes(state["w"], pruned) and torch.equal(back["w"], masks["w"])


def test_exporting_a_checkpoint_without_masks_is_one_line_and_writes_nothing(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    dense = tmp_path / "dense.safetensors"
    save_checkpoint(dense, create_model("starfish_vit_fmnist"), "starfish_vit_fmnist")
    out = tmp_path / "out" / "model.safetensors"
    assert main(["export", "--checkpoint", str(dense), "--out", str(out)]) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("starfish: error")]
    assert len(lines) == 1 and "carries no pruning masks" in lines[0]
    assert not out.exists() and not (tmp_path / "out").exists()


def test_export_sizes_table_measures_and_checks_the_round_trip(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from starfish.benchmarks import export_sizes
    from starfish.models import DEMO_CHECKPOINT, DEMO_MODEL

    monkeypatch.setattr(export_sizes, "MODELS", {DEMO_MODEL: DEMO_CHECKPOINT})
    monkeypatch.setattr(export_sizes, "SPARSITIES", (0.75,))
    rows = export_sizes.run(tmp_path)
    assert len(rows) == 1 and rows[0]["bit_exact"] and 0.28 < rows[0]["pruned_weight_ratio"] < 0.29
    assert (tmp_path / "export.png").stat().st_size > 0 and "| starfish_vit_fmnist | 0.75 |" in \
        (tmp_path / "export.md").read_text()
