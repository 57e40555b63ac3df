"""Every timm family the registry names, through every pruner, heal preset and healer, the export
and the read-back (random weights, tiny widths and images, two heal steps): each either works or
is refused in one line that names what is missing. No family ends in a traceback."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import timm
import torch

from starfish.config import HealConfig, PruneConfig
from starfish.errors import StarfishError
from starfish.healing import heal_
from starfish.models import load_checkpoint, save_checkpoint
from starfish.pruning import prune, sparsify_
from starfish.pruning.groups import find_groups
from starfish.pruning.slim import slim_, slim_masks
from starfish.recipes import PRESETS
from starfish.steps import export_step, onnx_export_step

pytestmark = pytest.mark.slow

VIT = {"embed_dim": 64, "depth": 2, "num_heads": 2}
FAMILIES = {  # timm name, kwargs that keep it small, image size
    "eva02": ("eva02_tiny_patch14_224", {"img_size": 28, **VIT}, 28),
    "beit": ("beit_base_patch16_224", {"img_size": 32, **VIT}, 32),
    "xcit": ("xcit_nano_12_p16_224", {"img_size": 32, **VIT, "cls_attn_layers": 1}, 32),
    "coat": ("coat_lite_tiny", {"img_size": 64, "embed_dims": (32, 32, 32, 32), "serial_depths": (1, 1, 1, 1)}, 64),
    "cait": ("cait_xxs24_224", {"img_size": 32, **VIT, "depth_token_only": 1}, 32),
    "maxvit": ("maxvit_pico_rw_256", {"img_size": 64}, 64),
    "pvtv2": ("pvt_v2_b0", {"depths": (1, 1, 1, 1)}, 64),
    "fastvit": ("fastvit_t8", {}, 64),
    "mobilevitv2": ("mobilevitv2_050", {}, 64),
    "efficientnet_b1": ("efficientnet_b1", {}, 32),
    "resnet50": ("resnet50", {}, 32),
    "regnety": ("regnety_002", {}, 32),
    "convnextv2": ("convnextv2_atto", {}, 32),
    "inception_next": ("inception_next_atto", {}, 32),
    "deit3": ("deit3_small_patch16_224", {"img_size": 32, **VIT}, 32),
}
HEALERS = ("none", "bias-correction", "layerwise", "logit-kd")  # the presets below all heal with starfish
# ONNX export of the slim model, beyond the families tests/test_onnx.py covers (each export takes
# 10 to 35 s here): one the exporter cannot trace (refused in one line) and two it can.
ONNX_FAMILIES = ("beit", "cait", "efficientnet_b1")


def outcome(action) -> str:
    """'ok', or the one-line refusal; anything else propagates as the traceback it is."""
    try:
        action()
    except StarfishError as exc:
        message = str(exc)
        assert message and "\n" not in message and "Traceback" not in message, message
        return f"refused: {message}"
    return "ok"


def outputs(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(x)


@pytest.mark.parametrize("family", FAMILIES)
def test_the_family_prunes_heals_exports_and_reads_back(family: str, tmp_path: Path) -> None:
    name, kwargs, size = FAMILIES[family]
    torch.manual_seed(0)
    dense = timm.create_model(name, num_classes=10, **kwargs).eval()
    x = torch.randn(8, 3, size, size, generator=torch.Generator().manual_seed(0))
    structure = "+".join(sorted({g.structure for g in find_groups(dense)})) or None
    results: dict[str, str] = {}

    # Every pruner: unstructured, and each structured method on the units the family has.
    pruned: dict[str, tuple[torch.nn.Module, dict]] = {}
    cases = [(method, "unstructured") for method in ("magnitude", "wanda", "nm")]
    cases += [(method, structure or "neurons") for method in ("magnitude", "wanda", "contribution", "torch-pruning")]
    for method, kind in cases:
        def run(method: str = method, kind: str = kind) -> None:
            masks = prune(dense, PruneConfig(method, 0.5, structure=kind), x).masks
            pruned[f"{method}/{kind}"] = (sparsify_(copy.deepcopy(dense), masks), masks)
        results[f"prune {method} {kind}"] = outcome(run)
    assert results["prune magnitude unstructured"] == "ok", results
    assert results["prune wanda unstructured"] == "ok", results
    if structure is None:  # the refusal names the structures there are (none) and the fix
        assert "has no neurons that can be removed" in results["prune magnitude neurons"], results
    else:
        assert results[f"prune contribution {structure}"] == "ok", results

    # Every heal preset and healer, at two steps, on the magnitude-pruned model.
    model, masks = pruned["magnitude/unstructured"]
    heals = {f"preset {p}": HealConfig.from_preset(p, steps=2, epochs=None, batch_size=4, holdout=0.25,
                                                   holdout_every=1) for p in PRESETS}
    heals |= {f"healer {h}": HealConfig(method=h, steps=2, batch_size=4, holdout=0.25, holdout_every=1)
              for h in HEALERS}
    for label, cfg in heals.items():
        healed = copy.deepcopy(model)

        def run(healed: torch.nn.Module = healed, cfg: HealConfig = cfg) -> None:
            heal_(healed, dense, masks, x, cfg)
            assert torch.isfinite(outputs(healed, x)).all()
            assert all(not (healed.get_parameter(k).detach()[~m]).any() for k, m in masks.items())
        results[label] = outcome(run)
    assert all(results[f"preset {p}"] == "ok" for p in PRESETS), results

    # The export, read back bit for bit.
    checkpoint = tmp_path / "pruned.safetensors"
    save_checkpoint(checkpoint, model, name, masks=masks, metadata={"model_kwargs": kwargs, "num_classes": 10})
    export_step(checkpoint, tmp_path / "pruned.export.safetensors")
    restored, restored_masks, _ = load_checkpoint(tmp_path / "pruned.export.safetensors")
    assert torch.equal(outputs(restored, x), outputs(model, x)) and set(restored_masks) == set(masks)

    # The slim model: same outputs as the masked one, a heal, and ONNX (or a one-line refusal).
    if structure is not None and "magnitude/" + structure in pruned:
        masked, unit_masks = pruned["magnitude/" + structure]
        slim = copy.deepcopy(masked)
        slim_(slim, unit_masks)
        assert torch.allclose(outputs(slim, x), outputs(masked, x), atol=1e-5), family
        heal_(slim, dense, slim_masks(slim), x, HealConfig(steps=2, batch_size=4, holdout=0.25, holdout_every=1))
        path = tmp_path / "slim.safetensors"
        save_checkpoint(path, slim, name, masks=slim_masks(slim),
                        metadata={"model_kwargs": kwargs, "num_classes": 10})
        assert torch.equal(outputs(load_checkpoint(path)[0], x), outputs(slim, x))
        if family in ONNX_FAMILIES:
            results["onnx"] = outcome(lambda: onnx_export_step(path, tmp_path / "slim.onnx"))
            assert results["onnx"] == "ok" or family == "beit", results
