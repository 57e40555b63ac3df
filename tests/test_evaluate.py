"""Evaluation: the masks-hold check, measured sparsity and the dense/candidate comparison."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from starfish.errors import StarfishError
from starfish.evaluate import check_masks_hold, compare, measured_sparsity, predict, predict_all


def tiny_linear(weight: list[list[float]], bias: list[float] | None = None) -> nn.Linear:
    layer = nn.Linear(len(weight[0]), len(weight), bias=bias is not None)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor(weight))
        if bias is not None:
            layer.bias.copy_(torch.tensor(bias))
    return layer


def test_check_masks_hold_catches_a_revived_weight() -> None:
    model = nn.Sequential(tiny_linear([[0.0, 2.0], [3.0, 0.0]]))
    masks = {"0.weight": torch.tensor([[False, True], [True, False]])}
    check_masks_hold(model, masks)
    with torch.no_grad():
        model[0].weight[1, 1] = 1e-30
    with pytest.raises(StarfishError, match="1 pruned weights of 0.weight are non-zero"):
        check_masks_hold(model, masks)


def test_measured_sparsity_counts_exact_zeros() -> None:
    model = nn.Sequential(tiny_linear([[0.0, 2.0], [3.0, 0.0]]),  # 2 of 4 zero
                          tiny_linear([[0.0, 0.0, 0.0], [1.0, 1.0, 1e-8], [0.0, 5.0, 0.0]]))  # 5 of 9 zero
    report = measured_sparsity(model, ["0.weight", "1.weight"])
    assert report == {"0.weight": 0.5, "1.weight": pytest.approx(5 / 9), "total": pytest.approx(7 / 13)}
    assert measured_sparsity(model, ["1.weight"])["total"] == pytest.approx(5 / 9)


def test_compare_reports_top1_recovery_and_agreement() -> None:
    # inputs are one-hot over 3 classes; labels say 0, 1, 2, 2
    x = torch.eye(3)[[0, 1, 2, 2]]
    data = TensorDataset(x, torch.tensor([0, 1, 2, 2]))
    dense = tiny_linear([[1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0]])  # predicts 0, 1, 2, 2: top-1 1.0
    swapped = tiny_linear([[1.0, 0, 0], [0, 0, 1.0], [0, 1.0, 0]])  # predicts 0, 2, 1, 1: top-1 0.25
    metrics = compare(dense, {"pruned": swapped, "healed": dense}, data, batch_size=3)
    assert metrics == {"dense_top1": 1.0, "pruned_top1": 0.25, "pruned_recovery": 0.25, "pruned_agreement": 0.25,
                       "healed_top1": 1.0, "healed_recovery": 1.0, "healed_agreement": 1.0}


def test_one_pass_for_every_model_and_cached_dense_predictions_give_the_same_metrics() -> None:
    x = torch.eye(3)[[0, 1, 2, 2, 1]]
    data = TensorDataset(x, torch.tensor([0, 1, 2, 2, 0]))
    dense = tiny_linear([[1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0]])
    swapped = tiny_linear([[1.0, 0, 0], [0, 0, 1.0], [0, 1.0, 0]])
    preds, targets = predict_all({"dense": dense, "swapped": swapped}, data, batch_size=2)
    assert torch.equal(preds["dense"], predict(dense, data, batch_size=5)[0])
    assert torch.equal(preds["swapped"], predict(swapped, data, batch_size=3)[0])
    fresh = compare(dense, {"pruned": swapped}, data, batch_size=2)
    assert compare(dense, {"pruned": swapped}, data, batch_size=2, dense_predictions=(preds["dense"], targets)) == fresh
    with pytest.raises(StarfishError, match="other test labels"):
        compare(dense, {"pruned": swapped}, data, dense_predictions=(preds["dense"], targets.flip(0)))


def test_evaluation_in_bf16_autocast_predicts_like_fp32_on_clear_cases() -> None:
    x = torch.eye(3)[[0, 1, 2, 2, 1]] * 10
    data = TensorDataset(x, torch.tensor([0, 1, 2, 2, 0]))
    model = tiny_linear([[1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0]])
    assert torch.equal(predict(model, data, precision="bf16")[0], predict(model, data, precision="fp32")[0])
