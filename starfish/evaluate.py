"""Evaluation: top-1, agreement with the dense model, and measured sparsity."""

from __future__ import annotations

from typing import Mapping

import torch
from starfish.progress import progress

from starfish.datasets import ImageDataset, make_loader
from starfish.errors import StarfishError
from starfish.models import device_of


@torch.no_grad()
def predict(model: torch.nn.Module, dataset: ImageDataset, batch_size: int = 500,
            desc: str = "evaluate") -> tuple[torch.Tensor, torch.Tensor]:
    """(predicted classes, targets) over the whole dataset, in dataset order."""
    was_training = model.training
    model.eval()
    preds, targets = [], []
    for images, labels in progress(make_loader(dataset, batch_size), desc=desc):
        preds.append(model(images.to(device_of(model))).argmax(dim=-1).cpu())
        targets.append(torch.as_tensor(labels))
    model.train(was_training)
    return torch.cat(preds), torch.cat(targets)


def top1_accuracy(model: torch.nn.Module, dataset: ImageDataset) -> float:
    preds, targets = predict(model, dataset)
    return float((preds == targets).float().mean())


def measured_sparsity(model: torch.nn.Module, names: list[str]) -> dict[str, float]:
    """Fraction of exact zeros in each named parameter, plus the overall figure under `"total"`."""
    params = dict(model.named_parameters())
    zeros, count, report = 0, 0, {}
    for name in names:
        weight = params[name].detach()
        z = int((weight == 0).sum())
        report[name] = z / weight.numel()
        zeros, count = zeros + z, count + weight.numel()
    report["total"] = zeros / count if count else 0.0
    return report


def check_masks_hold(model: torch.nn.Module, masks: Mapping[str, torch.Tensor]) -> None:
    """Raise if any pruned weight (mask False) is not exactly zero: healing must never revive one."""
    params = dict(model.named_parameters())
    for name, mask in masks.items():
        weight = params[name].detach().cpu()
        revived = int((weight[~mask.cpu()] != 0).sum())
        if revived:
            raise StarfishError(f"{revived} pruned weights of {name} are non-zero; the masks were not enforced")


def compare(dense: torch.nn.Module, candidates: Mapping[str, torch.nn.Module],
            dataset: ImageDataset, batch_size: int = 500) -> dict[str, float]:
    """Top-1 of dense and each candidate, each candidate's recovery (top-1 / dense) and agreement."""
    dense_preds, targets = predict(dense, dataset, batch_size, desc="evaluate dense")
    dense_top1 = float((dense_preds == targets).float().mean())
    metrics = {"dense_top1": dense_top1}
    for label, model in candidates.items():
        preds, _ = predict(model, dataset, batch_size, desc=f"evaluate {label}")
        top1 = float((preds == targets).float().mean())
        metrics[f"{label}_top1"] = top1
        metrics[f"{label}_recovery"] = top1 / dense_top1 if dense_top1 > 0 else 0.0
        metrics[f"{label}_agreement"] = float((preds == dense_preds).float().mean())
    return metrics
