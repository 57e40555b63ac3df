"""Internal-state names: every block by default, coarse stages on request, hand-written per model."""

from __future__ import annotations

import pytest
import timm
import torch
from torch import nn

from starfish.capture import ActivationCapture, block_names, stage_names, state_names
from starfish.errors import StarfishError
from starfish.models import create_model


def blocks(stage: str, count: int) -> list[str]:
    return [f"{stage}.{j}" for j in range(count)]


RESNET18_BLOCKS = [*blocks("layer1", 2), *blocks("layer2", 2), *blocks("layer3", 2), *blocks("layer4", 2)]
MOBILENETV1_BLOCKS = [*blocks("blocks.0", 1), *blocks("blocks.1", 2), *blocks("blocks.2", 2),
                      *blocks("blocks.3", 6), *blocks("blocks.4", 2)]
CONVNEXT_ATTO_BLOCKS = [*blocks("stages.0.blocks", 2), *blocks("stages.1.blocks", 2),
                        *blocks("stages.2.blocks", 6), *blocks("stages.3.blocks", 2)]
DEMO_VIT_BLOCKS = blocks("blocks", 4)
DEMO_CNN_BLOCKS = [*blocks("blocks.0", 1), *blocks("blocks.1", 2), *blocks("blocks.2", 2), *blocks("blocks.3", 1)]

# model name -> (every block, the coarse stages); models with random weights
EXPECTED = {
    "resnet18": (RESNET18_BLOCKS, ["layer1", "layer2", "layer3", "layer4"]),
    "mobilenetv1_100": (MOBILENETV1_BLOCKS, blocks("blocks", 5)),
    "convnext_atto": (CONVNEXT_ATTO_BLOCKS, blocks("stages", 4)),
    "starfish_vit_fmnist": (DEMO_VIT_BLOCKS, DEMO_VIT_BLOCKS),
    "starfish_cnn_fmnist": (DEMO_CNN_BLOCKS, blocks("blocks", 4)),
}


@pytest.fixture(scope="module", params=sorted(EXPECTED))
def named_model(request: pytest.FixtureRequest) -> tuple[str, nn.Module]:
    return request.param, timm.create_model(request.param, pretrained=False, num_classes=10)


def test_blocks_stages_and_last_are_named_by_hand(named_model: tuple[str, nn.Module]) -> None:
    name, model = named_model
    every_block, stages = EXPECTED[name]
    assert block_names(model) == every_block
    assert state_names(model, "blocks") == every_block
    assert stage_names(model) == stages
    assert state_names(model, "stages") == stages
    assert state_names(model, "last") == every_block[-1:]


def test_mobilenetv1_has_the_authors_thirteen_blocks() -> None:
    assert len(block_names(timm.create_model("mobilenetv1_100", num_classes=10))) == 13


def test_swin_blocks_sit_inside_its_layers() -> None:
    model = timm.create_model("swin_tiny_patch4_window7_224", embed_dim=32, depths=(1, 2), num_heads=(1, 2),
                              num_classes=10)
    assert block_names(model) == ["layers.0.blocks.0", "layers.1.blocks.0", "layers.1.blocks.1"]
    assert state_names(model, "stages") == ["layers.0", "layers.1"]


def test_every_demo_cnn_block_reports_an_output() -> None:
    model = create_model("starfish_cnn_fmnist")
    names = block_names(model)
    with ActivationCapture(model, names) as capture, torch.no_grad():
        model(torch.randn(2, 1, 28, 28))
        shapes = {name: tuple(value.shape) for name, value in capture.values.items()}
    assert shapes == {"blocks.0.0": (2, 32, 14, 14), "blocks.1.0": (2, 64, 7, 7), "blocks.1.1": (2, 64, 7, 7),
                      "blocks.2.0": (2, 128, 4, 4), "blocks.2.1": (2, 128, 4, 4), "blocks.3.0": (2, 256, 4, 4)}


def test_explicit_state_names_are_checked(vit: nn.Module) -> None:
    assert state_names(vit, "blocks.1, norm") == ["blocks.1", "norm"]
    with pytest.raises(StarfishError, match="heal.states='blocks.7'"):
        state_names(vit, "blocks.7")
    with pytest.raises(StarfishError, match="no `blocks`, `stages`, `layer1..4`, `s1..4` or `serial_blocks1..4`"):
        block_names(nn.Sequential(nn.Linear(2, 2)))
    with pytest.raises(StarfishError, match="s1..4`; name its internal states explicitly with heal.states"):
        state_names(nn.Sequential(nn.Linear(2, 2)), "blocks")
