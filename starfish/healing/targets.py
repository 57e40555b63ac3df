"""Where the dense model's states live while a pruned model is aligned to them (`heal.cache`).

At the paper's scale they do not fit in RAM: DeiT-B's 12 block outputs for 5,000 images are
5,000 x 197 x 768 x 12 x 2 bytes, about 18 GB. So:
- `memory` keeps them in RAM (in `heal.cache_dtype`), as before;
- `disk` memory-maps one file per state in the cache folder (the heal step's output folder),
  written once and read batch by batch: RAM holds only the pages in use;
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
import contextvars
import logging
import math
import os
import shutil
import socket
import tempfile
from pathlib import Path
from typing import Iterator

import torch
from torch import nn

from starfish.capture import ActivationCapture
from starfish.io import process_alive
from starfish.models import device_of
from starfish.progress import progress

log = logging.getLogger(__name__)
_FOLDER: contextvars.ContextVar[Path | None] = contextvars.ContextVar("starfish_cache_folder", default=None)


@contextlib.contextmanager
def cache_folder(folder: str | Path) -> Iterator[None]:
    """Put `disk` caches made inside the block in `folder` (default: the system temp folder)."""
    token = _FOLDER.set(Path(folder))
    try:
        yield
    finally:
        _FOLDER.reset(token)


def available_memory() -> int:
    """Bytes of RAM available to new allocations (MemAvailable), or total physical RAM elsewhere."""
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


@torch.no_grad()
def state_bytes_per_image(dense: nn.Module, names: list[str], image: torch.Tensor, dtype: torch.dtype) -> int:
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

    def __init__(self, dense: nn.Module, names: list[str], images: torch.Tensor, batch_size: int,
                 dtype: torch.dtype, mode: str, folder: Path | None = None) -> None:
        self.dense, self.names, self.images, self.dtype, self.mode = dense, names, images, dtype, mode
        self.stored: dict[str, torch.Tensor] = {}
        self._capture: ActivationCapture | None = None
        if mode == "recompute":
            self._capture = ActivationCapture(dense, names).__enter__()
        else:
            self._fill(batch_size, folder)

    @torch.no_grad()
    def _fill(self, batch_size: int, folder: Path | None) -> None:
        self.dense.eval()
        count = self.images.shape[0]
        with ActivationCapture(self.dense, self.names) as capture:
            for start in progress(range(0, count, batch_size), desc="cache dense states",
                                  total=math.ceil(count / batch_size)):
                self.dense(self.images[start : start + batch_size].to(device_of(self.dense)))
                for name in self.names:
                    value = capture.values[name].detach().to("cpu", self.dtype)
                    if name not in self.stored:
                        self.stored[name] = self._allocate(name, (count, *value.shape[1:]), folder)
                    self.stored[name][start : start + value.shape[0]] = value

    def _allocate(self, name: str, shape: tuple[int, ...], folder: Path | None) -> torch.Tensor:
        if folder is None:
            return torch.empty(shape, dtype=self.dtype)
        path = folder / f"{len(self.stored):03d}.bin"
        return torch.from_file(str(path), shared=True, size=math.prod(shape), dtype=self.dtype).view(shape)

    @torch.no_grad()
    def batch(self, index: torch.Tensor, device: torch.device) -> dict[str, torch.Tensor]:
        """The states of images `index` (rounded through the cache dtype), float32 on `device`."""
        if self._capture is None:
            return {name: t[index].to(device, torch.float32) for name, t in self.stored.items()}
        self.dense(self.images[index].to(device_of(self.dense)))
        return {name: self._capture.values[name].detach().to(self.dtype).to(device, torch.float32)
                for name in self.names}

    def close(self) -> None:
        if self._capture is not None:
            self._capture.__exit__(None, None, None)
        self.stored.clear()


@contextlib.contextmanager
def dense_targets(dense: nn.Module, names: list[str], sets: list[torch.Tensor | None], batch_size: int,
                  dtype: torch.dtype, mode: str) -> Iterator[list[DenseTargets | None]]:
    """One `DenseTargets` per image set (None stays None), kept as `mode` says; a `disk` cache is
    a folder that is deleted on exit (and, if a killed process left one, by the next heal)."""
    folder = _FOLDER.get() or Path(tempfile.gettempdir())
    folder.mkdir(parents=True, exist_ok=True)
    present = [images for images in sets if images is not None]
    needed = sum(images.shape[0] for images in present) * state_bytes_per_image(dense, names, present[0], dtype)
    mode = choose_mode(mode, needed, folder)
    _remove_dead_caches(folder)
    work = Path(tempfile.mkdtemp(prefix=f"{_PREFIX}{socket.gethostname()}-{os.getpid()}-", dir=folder)) \
        if mode == "disk" else None
    made: list[DenseTargets | None] = []
    try:
        for number, images in enumerate(sets):
            if images is None:
                made.append(None)
                continue
            part = work / str(number) if work else None
            if part is not None:
                part.mkdir()
            made.append(DenseTargets(dense, names, images, batch_size, dtype, mode, part))
        yield made
    finally:
        for targets in made:
            if targets is not None:
                targets.close()
        if work is not None:
            shutil.rmtree(work, ignore_errors=True)


_PREFIX = ".starfish-dense-states-"


def _remove_dead_caches(folder: Path) -> None:
    """Delete disk caches whose heal, on this host, was killed before it could."""
    prefix = f"{_PREFIX}{socket.gethostname()}-"
    for path in folder.glob(f"{_PREFIX}*"):
        pid = path.name[len(prefix):].split("-", 1)[0] if path.name.startswith(prefix) else ""
        if pid.isdigit() and not process_alive(int(pid)):
            shutil.rmtree(path, ignore_errors=True)
