"""Where the dense model's states live while a pruned model is aligned to them (`heal.cache`).

At the paper's scale they do not fit in RAM: DeiT-B's 12 block outputs for 5,000 images are
5,000 x 197 x 768 x 12 x 2 bytes, about 18 GB. So:
- `memory` keeps them in RAM (in `heal.cache_dtype`), as before;
- `disk` keeps one scratch file per state (`starfish.rows.FileRows`: beside the heal step's
  output, unlinked, read batch by batch): RAM holds one batch;
- `recompute` runs the dense model on each batch instead, as the authors' `--no-dense-cache`:
  no storage, one more forward pass per step;
- `auto` (the default) takes, of the modes whose states fit (`memory`: half the available RAM;
  `disk`: 80% of the folder's free space; `recompute` always), the one whose whole cost for this
  heal's budget is lowest (`ModeCosts`, from a timed dense forward of one batch and, when `disk`
  is in the running, a timed write and read of a scratch file), and logs the totals. `memory`
  and `disk` run the dense model once per image, `recompute` once per image of every step and
  held-out check: a heal of few steps on many images recomputes, a long one caches.
Every mode rounds the targets through `cache_dtype`, so they give the same targets up to the
dense forward's float noise (`memory` and `disk` are bitwise equal).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

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


@dataclass(frozen=True)
class ModeCosts:
    """Measured unit costs, from which each mode's whole cost for a heal follows (`totals`)."""

    dense_seconds_per_image: float  # the dense model's forward pass, per image
    state_bytes_per_image: int
    write_seconds_per_byte: float = 0.0  # a scratch file's, `disk` only
    read_seconds_per_byte: float = 0.0

    def totals(self, images: int, steps: int, batch_size: int, checked_images: int) -> dict[str, float]:
        """Seconds each mode spends on the dense states of a heal of `steps` batches over
        `images` images (held-out ones included), whose held-out checks read `checked_images`
        in all: `memory` and `disk` run the dense model once per image (`disk` also writes every
        state once and reads each step's and check's), `recompute` once per image read."""
        forward, size = self.dense_seconds_per_image, self.state_bytes_per_image
        read = steps * batch_size + checked_images
        write_and_read = images * size * self.write_seconds_per_byte + read * size * self.read_seconds_per_byte
        return {"memory": images * forward, "disk": images * forward + write_and_read, "recompute": read * forward}


def choose_mode(mode: str, needed: int, folder: Path, totals: Callable[[bool], dict[str, float]] | None = None) -> str:
    """The mode `auto` resolves to for `needed` bytes of states (others are returned as given):
    of those that fit, the lowest of `totals(disk_fits)` (seconds per mode), or without it the
    first of memory, disk, recompute."""
    if mode != "auto":
        return mode
    ram, disk = available_memory(), shutil.disk_usage(folder).free
    fits = {"memory": needed <= ram // 2, "disk": needed <= disk * 0.8, "recompute": True}
    candidates = [name for name in ("memory", "disk", "recompute") if fits[name]]
    if totals is None:
        chosen, costs = candidates[0], ""
    else:
        seconds = totals(fits["disk"] and not fits["memory"])
        chosen = min(candidates, key=lambda name: seconds[name])
        costs = "; estimated seconds " + ", ".join(f"{name} {seconds[name]:.3g}" for name in candidates)
    log.info("heal.cache=auto: dense states need %.2f GB; %.2f GB RAM available, %.2f GB free in %s%s: %s",
             needed / 1e9, ram / 1e9, disk / 1e9, folder, costs, chosen)
    return chosen


@torch.no_grad()
def dense_seconds_per_image(dense: nn.Module, images: "Images", batch_size: int) -> float:
    """One timed forward pass of the dense model on a batch (after an untimed one), per image."""
    batch = images[:batch_size].to(device_of(dense))
    dense(batch[:1])
    synchronize = torch.cuda.synchronize if batch.is_cuda else (lambda: None)
    synchronize()
    start = time.perf_counter()
    dense(batch)
    synchronize()
    return (time.perf_counter() - start) / len(batch)


def disk_seconds_per_byte(folder: Path, size: int = 32 * 2**20) -> tuple[float, float]:
    """(write, read) seconds per byte of a scratch file of `size` bytes in `folder`: written and
    synced, dropped from the page cache, read back; the file is gone after."""
    data = os.urandom(size)
    fd, path = tempfile.mkstemp(dir=folder, prefix="starfish-probe-")
    try:
        os.unlink(path)
        start = time.perf_counter()
        os.pwrite(fd, data, 0)
        os.fsync(fd)
        written = time.perf_counter() - start
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(fd, 0, size, os.POSIX_FADV_DONTNEED)
        start = time.perf_counter()
        os.pread(fd, size, 0)
        return written / size, (time.perf_counter() - start) / size
    finally:
        os.close(fd)


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
                  dtype: torch.dtype, mode: str, steps: int = 0, checked_images: int = 0
                  ) -> Iterator[list[DenseTargets | None]]:
    """One `DenseTargets` per image set (None stays None), kept as `mode` says (`auto`: for a heal
    of `steps` batches whose held-out checks read `checked_images`); `disk` files are in the
    scratch folder and gone when the block ends (or the process dies)."""
    present = [images for images in sets if images is not None]
    per_image = state_bytes_per_image(dense, names, present[0], dtype)
    count = sum(len(images) for images in present)
    folder = current_scratch_folder()

    def totals(disk_in_running: bool) -> dict[str, float]:
        rates = disk_seconds_per_byte(folder) if disk_in_running else (0.0, 0.0)
        costs = ModeCosts(dense_seconds_per_image(dense, present[0], batch_size), per_image, *rates)
        return costs.totals(count, steps, batch_size, checked_images)

    mode = choose_mode(mode, count * per_image, folder, totals if steps else None)
    made: list[DenseTargets | None] = []
    try:
        for images in sets:
            made.append(None if images is None else DenseTargets(dense, names, images, batch_size, dtype, mode))
        yield made
    finally:
        for targets in made:
            if targets is not None:
                targets.close()
