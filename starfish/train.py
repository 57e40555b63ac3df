"""Train a classifier from scratch on Fashion-MNIST: how the committed demo checkpoint was made."""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from starfish.datasets import load_dataset
from starfish.evaluate import top1_accuracy
from starfish.io import sha256_file, write_with_sidecar
from starfish.models import create_model, save_checkpoint
from starfish.progress import progress

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainConfig:
    model: str = "starfish_vit_fmnist"
    data_root: str = "/usr/share/datasets/fashion-mnist"
    epochs: int = 15
    batch_size: int = 128
    lr: float = 2e-3
    weight_decay: float = 0.05
    warmup_epochs: float = 1.0
    label_smoothing: float = 0.1
    seed: int = 0
    init: str | None = None  # continue from this checkpoint (a second cosine cycle) instead of scratch


def _augment(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random horizontal flip and a random shift of up to 2 pixels (pad + crop), per batch."""
    flip = torch.rand(x.shape[0], generator=generator) < 0.5
    x = torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)
    dy, dx = (int(v) for v in torch.randint(-2, 3, (2,), generator=generator))
    padded = F.pad(x, (2, 2, 2, 2), mode="replicate")
    h, w = x.shape[-2:]
    return padded[..., 2 + dy : 2 + dy + h, 2 + dx : 2 + dx + w]


def train(cfg: TrainConfig, out: str | Path) -> dict[str, float]:
    """Train `cfg.model` on the Fashion-MNIST training set; write its checkpoint and test top-1."""
    torch.manual_seed(cfg.seed)
    generator = torch.Generator().manual_seed(cfg.seed)
    model = create_model(cfg.model, checkpoint=cfg.init).train()
    train_set = load_dataset("fashion-mnist", cfg.data_root, "train", model)
    test_set = load_dataset("fashion-mnist", cfg.data_root, "test", model)
    loader = torch.utils.data.DataLoader(train_set, batch_size=cfg.batch_size, shuffle=True,
                                         generator=generator, drop_last=True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    total = cfg.epochs * len(loader)
    warmup = int(cfg.warmup_epochs * len(loader))

    def lr_at(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_at)
    start = time.perf_counter()
    for epoch in range(cfg.epochs):
        model.train()
        bar = progress(loader, desc=f"train epoch {epoch + 1}/{cfg.epochs}")
        for images, targets in bar:
            loss = F.cross_entropy(model(_augment(images, generator)), targets,
                                   label_smoothing=cfg.label_smoothing)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
        acc = top1_accuracy(model, test_set)
        log.info("epoch %d/%d: test top-1 %.4f", epoch + 1, cfg.epochs, acc)
    metrics = {"test_top1": acc, "train_seconds": time.perf_counter() - start}
    lineage = {"init_sha256": sha256_file(cfg.init)} if cfg.init else {}
    write_with_sidecar(out, lambda path: save_checkpoint(path, model.eval(), cfg.model), config=asdict(cfg),
                       metrics=metrics, **lineage)
    return metrics
