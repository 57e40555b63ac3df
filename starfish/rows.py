"""Fixed-shape rows (calibration pixels, dense states, layer inputs) in RAM or in a scratch file.

At the paper's scale they do not fit in RAM: DeiT-B's 12 block outputs for 5,000 images are
about 18 GB. A `FileRows` is an anonymous file in the scratch folder (`scratch_folder`; the
heal step puts it beside its output), unlinked as it is created, so a killed process leaves
nothing behind. It is written and read with pwrite/pread: its pages live in the kernel's page
cache, reclaimable, and never count as the process's memory, where a memory map's touched
pages would. `MemoryRows` is a plain tensor with the same interface.
"""

from __future__ import annotations

import contextlib
import contextvars
import errno
import math
import os
import tempfile
from pathlib import Path
from typing import Iterator, Protocol

import torch

_SCRATCH: contextvars.ContextVar[Path | None] = contextvars.ContextVar("starfish_scratch_folder", default=None)


@contextlib.contextmanager
def scratch_folder(folder: str | Path) -> Iterator[None]:
    """Put the `FileRows` made inside the block in `folder` (default: the system temp folder)."""
    token = _SCRATCH.set(Path(folder))
    try:
        yield
    finally:
        _SCRATCH.reset(token)


def current_scratch_folder() -> Path:
    folder = _SCRATCH.get() or Path(tempfile.gettempdir())
    folder.mkdir(parents=True, exist_ok=True)
    return folder


Key = int | slice | torch.Tensor | list[int]


class RowStore(Protocol):
    shape: torch.Size
    dtype: torch.dtype

    def __len__(self) -> int: ...

    def __getitem__(self, key: Key) -> torch.Tensor: ...

    def write(self, start: int, values: torch.Tensor) -> None: ...

    def close(self) -> None: ...


class MemoryRows:
    """Rows in one preallocated tensor."""

    def __init__(self, shape: tuple[int, ...], dtype: torch.dtype) -> None:
        self.tensor = torch.empty(shape, dtype=dtype)
        self.shape, self.dtype = self.tensor.shape, dtype

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, key: Key) -> torch.Tensor:
        if isinstance(key, torch.Tensor) and key.dtype == torch.long and key.ndim == 1 and \
                (key.numel() == 0 or int(key.min()) >= 0):
            return self.tensor.index_select(0, key)  # a heal step's batch: a third of advanced indexing's time
        return self.tensor[key]

    def write(self, start: int, values: torch.Tensor) -> None:
        self.tensor[start : start + values.shape[0]] = values

    def close(self) -> None:
        """Nothing to release: the tensor goes with its last reference."""


class FileRows:
    """Rows in an unlinked scratch file, read by index (runs of consecutive rows in one read).

    The file's full size is reserved when it is made, so a disk too small fails at once
    (ENOSPC), not halfway through the work.
    """

    def __init__(self, shape: tuple[int, ...], dtype: torch.dtype, folder: Path | None = None) -> None:
        self.shape, self.dtype = torch.Size(shape), dtype
        self.row_bytes = math.prod(shape[1:]) * dtype.itemsize
        self._file = tempfile.TemporaryFile(dir=folder or current_scratch_folder(), prefix=".starfish-rows-")
        self._fd = self._file.fileno()
        size = self.row_bytes * shape[0]
        if size:
            try:
                os.posix_fallocate(self._fd, 0, size)
            except OSError as exc:
                if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                    self._file.close()
                    raise
                os.ftruncate(self._fd, size)

    def __len__(self) -> int:
        return self.shape[0]

    def close(self) -> None:
        self._file.close()

    def write(self, start: int, values: torch.Tensor) -> None:
        if values.shape[1:] != self.shape[1:] or start < 0 or start + values.shape[0] > len(self):
            raise IndexError(f"rows {start}..{start + values.shape[0]} of shape {tuple(values.shape[1:])} do not fit "
                             f"{tuple(self.shape)}")
        data = memoryview(_bytes_of(values.detach().to("cpu", self.dtype).contiguous()))
        offset, done = start * self.row_bytes, 0
        while done < len(data):
            done += os.pwrite(self._fd, data[done:], offset + done)

    def __getitem__(self, key: Key) -> torch.Tensor:
        if isinstance(key, int):
            return self._read(_positions(torch.tensor([key]), len(self)))[0]
        if isinstance(key, slice):
            return self._read(list(range(len(self)))[key])
        return self._read(_positions(torch.as_tensor(key).reshape(-1), len(self)))

    def _read(self, rows: list[int]) -> torch.Tensor:
        out = torch.empty((len(rows), *self.shape[1:]), dtype=self.dtype)
        buffer = memoryview(_bytes_of(out))
        first = 0
        while first < len(rows):  # one read per run of consecutive rows
            last = first
            while last + 1 < len(rows) and rows[last + 1] == rows[last] + 1:
                last += 1
            self._read_into(buffer[first * self.row_bytes : (last + 1) * self.row_bytes], rows[first] * self.row_bytes)
            first = last + 1
        return out

    def _read_into(self, view: memoryview, offset: int) -> None:
        done = 0
        while done < len(view):
            got = os.preadv(self._fd, [view[done:]], offset + done)
            if got == 0:
                raise OSError(errno.EIO, f"scratch file ended {len(view) - done} bytes early")
            done += got


def _bytes_of(tensor: torch.Tensor) -> "memoryview":
    """The bytes of a contiguous CPU tensor, writable in place (any dtype, bfloat16 included)."""
    return memoryview(tensor.view(-1).view(torch.uint8).numpy()) if tensor.numel() else memoryview(b"")


def _positions(index: torch.Tensor, count: int) -> list[int]:
    """Row numbers for an integer index tensor, negative ones counted from the end, as tensors do."""
    if index.dtype == torch.bool:
        return index.nonzero().squeeze(1).tolist()
    rows = index.tolist()
    bad = next((r for r in rows if not -count <= r < count), None)
    if bad is not None:
        raise IndexError(f"row {bad} is out of range for {count} rows")
    return [r % count for r in rows]


def row_store(shape: tuple[int, ...], dtype: torch.dtype, on_disk: bool) -> MemoryRows | FileRows:
    return FileRows(shape, dtype) if on_disk else MemoryRows(shape, dtype)
