"""Row stores: a scratch file reads back exactly what a tensor holds, and leaves nothing behind."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from starfish.rows import FileRows, MemoryRows, row_store, scratch_folder


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.uint8])
def test_file_rows_read_what_a_tensor_gives_for_every_kind_of_index(tmp_path: Path, dtype: torch.dtype) -> None:
    values = (torch.randn(50, 3, 7) * 50).to(dtype)
    with scratch_folder(tmp_path):
        stored, held = row_store(values.shape, dtype, on_disk=True), row_store(values.shape, dtype, on_disk=False)
    assert isinstance(stored, FileRows) and isinstance(held, MemoryRows)
    for rows in (stored, held):
        rows.write(0, values[:20])
        rows.write(20, values[20:])
    shuffled = torch.randperm(50)
    keys = [7, -1, slice(3, 9), slice(None), slice(40, None, 3), shuffled, torch.tensor([4, 5, 6, 2, 3]),
            [0, 49], torch.tensor([], dtype=torch.long), torch.tensor([-1, 3, -50])]
    for key in keys:
        assert torch.equal(stored[key], values[key]) and torch.equal(held[key], values[key]), key
    assert len(stored) == 50 and stored.shape == values.shape
    for rows in (stored, held):
        with pytest.raises(IndexError):
            rows[torch.tensor([50])]
    with pytest.raises(IndexError):
        stored.write(45, values[:10])
    assert list(tmp_path.iterdir()) == []  # never a named file: unlinked as it is made
    stored.close()


def test_a_killed_writer_leaves_no_scratch_file(tmp_path: Path) -> None:
    code = ("import sys, time, torch; from starfish.rows import FileRows; from pathlib import Path\n"
            "rows = FileRows((64, 1024), torch.float32, Path(sys.argv[1])); rows.write(0, torch.ones(64, 1024))\n"
            "print('written', flush=True); time.sleep(60)")
    child = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == "written"
    held = [os.readlink(f"/proc/{child.pid}/fd/{fd}") for fd in os.listdir(f"/proc/{child.pid}/fd")]
    assert any(target.startswith(str(tmp_path)) for target in held)  # the file exists while its writer lives
    child.send_signal(signal.SIGKILL)
    child.wait()
    assert list(tmp_path.iterdir()) == []


def test_a_disk_too_small_fails_when_the_file_is_made(tmp_path: Path) -> None:
    free = os.statvfs(tmp_path)
    too_big = free.f_bavail * free.f_frsize + (1 << 30)
    with pytest.raises(OSError) as info:
        FileRows((too_big // 4096, 1024), torch.float32, tmp_path)
    assert info.value.errno in (errno.ENOSPC, errno.EFBIG)
    assert list(tmp_path.iterdir()) == []
