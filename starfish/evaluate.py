"""Evaluation: top-1, agreement with the dense model, and measured sparsity."""

from __future__ import annotations

from typing import Mapping

import torch

from starfish.datasets import ImageDataset, make_loader
from starfish.errors import StarfishError
from starfish.models import device_of
from starfish.precision import numerics
from starfish.progress import progress


@torch.no_grad()
def predict_all(models: Mapping[str, torch.nn.Module], dataset: ImageDataset, batch_size: int = 500,
                num_workers: int | None = 0, desc: str = "evaluate",
                precision: str = "auto") -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """({label: predicted classes}, targets) over the whole dataset, in dataset order, in
    `precision` (starfish.precision). One pass: each batch is loaded (decoded, resized) once and
    given to every model."""
    modes = {label: model.training for label, model in models.items()}
    for model in models.values():
        model.eval()
    preds: dict[str, list[torch.Tensor]] = {label: [] for label in models}
    targets = []
    for images, labels in progress(make_loader(dataset, batch_size, num_workers), desc=desc):
        for label, model in models.items():
            with numerics(precision, device_of(model)):
                logits = model(images.to(device_of(model), non_blocking=True))
            preds[label].append(logits.argmax(dim=-1).cpu())
        targets.append(torch.as_tensor(labels))
    for label, model in models.items():
        model.train(modes[label])
    return {label: torch.cat(parts) for label, parts in preds.items()}, torch.cat(targets)


def predict(model: torch.nn.Module, dataset: ImageDataset, batch_size: int = 500, desc: str = "evaluate",
            num_workers: int | None = 0, precision: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """(predicted classes, targets) of one model over the whole dataset, in dataset order."""
    preds, targets = predict_all({"": model}, dataset, batch_size, num_workers, desc, precision)
    return preds[""], targets


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
        report[name] = z / weight.numel() if weight.numel() else 0.0  # a removed block: no weights left
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


def compare(dense: torch.nn.Module, candidates: Mapping[str, torch.nn.Module], dataset: ImageDataset,
            batch_size: int = 500, num_workers: int | None = 0,
            dense_predictions: tuple[torch.Tensor, torch.Tensor] | None = None,
            precision: str = "auto") -> dict[str, float]:
    """Top-1 of dense and each candidate, each candidate's recovery (top-1 / dense) and agreement.

    All models share one pass over the data; `dense_predictions` ((classes, targets) computed
    earlier on this dataset) leaves the dense model out of it."""
    models = dict(candidates) if dense_predictions is not None else {"dense": dense, **candidates}
    preds, targets = predict_all(models, dataset, batch_size, num_workers, "evaluate " + ", ".join(models), precision)
    dense_preds = preds["dense"] if dense_predictions is None else dense_predictions[0]
    if dense_predictions is not None and not torch.equal(dense_predictions[1], targets):
        raise StarfishError("cached dense predictions are for other test labels; delete the cache and run again")
    dense_top1 = float((dense_preds == targets).float().mean())
    metrics = {"dense_top1": dense_top1}
    for label in candidates:
        top1 = float((preds[label] == targets).float().mean())
        metrics[f"{label}_top1"] = top1
        metrics[f"{label}_recovery"] = top1 / dense_top1 if dense_top1 > 0 else 0.0
        metrics[f"{label}_agreement"] = float((preds[label] == dense_preds).float().mean())
    return metrics
