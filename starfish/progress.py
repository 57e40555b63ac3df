"""Progress bars for long work: live on a terminal, a line every few seconds in logs."""

from __future__ import annotations

import sys
from typing import Iterable, TypeVar

from tqdm import tqdm

T = TypeVar("T")


def progress(iterable: Iterable[T], desc: str, total: int | None = None) -> tqdm:
    """A tqdm bar that redraws at most every 10 s when stderr is not a terminal (CI, workers)."""
    interactive = sys.stderr.isatty()
    return tqdm(iterable, desc=desc, total=total, leave=False, mininterval=0.1 if interactive else 10.0,
                dynamic_ncols=interactive)
