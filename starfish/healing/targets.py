"""Where the dense model's states live while a pruned model is aligned to them (`heal.cache`).

At the paper's scale they do not fit in RAM: DeiT-B's 12 block outputs for 5,000 images are
5,000 x 197 x 768 x 12 x 2 bytes, about 18 GB. So:
- `memory` keeps them in RAM (in `heal.cache_dtype`), as before;
- `disk` keeps one scratch file per state (`starfish.rows.FileRows`: beside the heal step's
  output, unlinked, read batch by batch): RAM holds one batch;
- `recompute` runs the dense model on each batch instead, as the authors' `--no-dense-cache`:
  no storage, one more forward pass per step;
- `auto` (the default) takes `memory` when the estimate (images x per-image state size) fits
  in half the available RAM, else `disk` when it fits in 80% of the folder's free space, else
  `recompute`, and logs why.
Every mode rounds the targets through `cache_dtype`, so they give the same targets up to the
dense forward's float noise (`memory` and `disk` are bitwise equal).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import shutil
from pathlib import Path
from typing import Iterator

import torch
from torch import nn

from starfish.calibration import Images
from starfish.capture import ActivationCapture
from starfish.models import device_of
from starfish.progress import progress
from starfish.rows import RowStore, current_scratch_folder, row_store

log = logging.getLogger(__name__)


def available_memory() -> int:
    """Bytes of RAM available to new allocations (MemAvailable), or total physical RAM elsewhere."""
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


@torch.no_grad()
def state_bytes_per_image(dense: nn.Module, names: list[str], image: "Images", dtype: torch.dtype) -> int:
    """Bytes one calibration image's states take in `dtype`: one dense forward pass on it."""
    with ActivationCapture(dense, names) as capture:
        dense(image[:1].to(device_of(dense)))
        return sum(capture.values[name][0].numel() for name in names) * dtype.itemsize


def choose_mode(mode: str, needed: int, folder: Path) -> str:
    """The mode `auto` resolves to for `needed` bytes of states (others are returned as given)."""
    if mode != "auto":
        return mode
    ram, disk = available_memory(), shutil.disk_usage(folder).free
    chosen = "memory" if needed <= ram // 2 else "disk" if needed <= disk * 0.8 else "recompute"
    log.info("heal.cache=auto: dense states need %.2f GB; %.2f GB RAM available, %.2f GB free in %s: %s",
             needed / 1e9, ram / 1e9, disk / 1e9, folder, chosen)
    return chosen


class DenseTargets:
    """The dense model's states for a fixed set of images, by image index, as float32 on a device."""

    def __init__(self, dense: nn.Module, names: list[str], images: "Images", batch_size: int,
                 dtype: torch.dtype, mode: str) -> None:
        self.dense, self.names, self.images, self.dtype, self.mode = dense, names, images, dtype, mode
        self.stored: dict[str, RowStore] = {}
        self._capture: ActivationCapture | None = None
        if mode == "recompute":
            self._capture = ActivationCapture(dense, names).__enter__()
        else:
            self._fill(batch_size)

    @torch.no_grad()
    def _fill(self, batch_size: int) -> None:
        self.dense.eval()
        count = len(self.images)
        with ActivationCapture(self.dense, self.names) as capture:
            for start in progress(range(0, count, batch_size), desc="cache dense states",
                                  total=math.ceil(count / batch_size)):
                self.dense(self.images[start : start + batch_size].to(device_of(self.dense)))
                for name in self.names:
                    value = capture.values[name].detach().to("cpu", self.dtype)
                    if name not in self.stored:
                        self.stored[name] = row_store((count, *value.shape[1:]), self.dtype, self.mode == "disk")
                    self.stored[name].write(start, value)

    @torch.no_grad()
    def batch(self, index: torch.Tensor, device: torch.device) -> dict[str, torch.Tensor]:
        """The states of images `index` (rounded through the cache dtype), float32 on `device`."""
        if self._capture is None:
            return {name: rows[index].to(device, torch.float32) for name, rows in self.stored.items()}
        self.dense(self.images[index].to(device_of(self.dense)))
        return {name: self._capture.values[name].detach().to(self.dtype).to(device, torch.float32)
                for name in self.names}

    def close(self) -> None:
        if self._capture is not None:
            self._capture.__exit__(None, None, None)
        for rows in self.stored.values():
            rows.close()
        self.stored.clear()


@contextlib.contextmanager
def dense_targets(dense: nn.Module, names: list[str], sets: list["Images | None"], batch_size: int,
                  dtype: torch.dtype, mode: str) -> Iterator[list[DenseTargets | None]]:
    """One `DenseTargets` per image set (None stays None), kept as `mode` says; `disk` files are
    in the scratch folder and gone when the block ends (or the process dies)."""
    present = [images for images in sets if images is not None]
    needed = sum(len(images) for images in present) * state_bytes_per_image(dense, names, present[0], dtype)
    mode = choose_mode(mode, needed, current_scratch_folder())
    made: list[DenseTargets | None] = []
    try:
        for images in sets:
            made.append(None if images is None else DenseTargets(dense, names, images, batch_size, dtype, mode))
        yield made
    finally:
        for targets in made:
            if targets is not None:
                targets.close()
