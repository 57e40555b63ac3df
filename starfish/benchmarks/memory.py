"""Peak memory of a block of work, sampled from /proc while it runs: of this process
(`MemorySampler`, anonymous memory) or of a process and its children (`TreeMemorySampler`),
and one process's counters (`status_kb`). Linux only, as the benchmarks' machines are.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path


class PeakSampler:
    """Calls `sample()` every `interval` seconds in a thread while the block runs, and once at its end."""

    interval = 0.05

    def __init__(self) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def sample(self) -> None:
        raise NotImplementedError

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            time.sleep(self.interval)

    def __enter__(self) -> "PeakSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()


class MemorySampler(PeakSampler):
    """Peak anonymous memory (RssAnon) of this process, sampled every 50 ms."""

    def __init__(self) -> None:
        super().__init__()
        self.peak = 0

    def sample(self) -> None:
        self.peak = max(self.peak, status_kb("RssAnon"))


def status_kb(field: str, pid: int | str = "self") -> int:
    return proc_kb(f"/proc/{pid}/status", field)


def pss_kb(pid: int) -> int:
    return proc_kb(f"/proc/{pid}/smaps_rollup", "Pss")


def proc_kb(path: str, field: str) -> int:
    """The kB value of `field` in a /proc file, or 0 once the process has ended."""
    try:
        for line in Path(path).read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def descendants(root: int) -> list[int]:
    """`root` and every process below it."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    found, queue = [], [root]
    while queue:
        pid = queue.pop()
        found.append(pid)
        queue.extend(children.get(pid, []))
    return found


class TreeMemorySampler(PeakSampler):
    """Peak memory of process `root` and its descendants, every 100 ms: the largest single
    process's resident memory (VmRSS), and the tree's proportional set size (Pss: pages that
    forked loader workers share with their parent are counted once, not once per process)."""

    interval = 0.1

    def __init__(self) -> None:
        super().__init__()
        self.root: int | None = None
        self.peak_single = self.peak_total = 0

    def sample(self) -> None:
        if self.root is not None:
            tree = descendants(self.root)
            self.peak_single = max([self.peak_single] + [status_kb("VmRSS", pid) for pid in tree])
            self.peak_total = max(self.peak_total, sum(pss_kb(pid) for pid in tree))
