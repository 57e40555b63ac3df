"""PNG figures: the headless backend, an atomic write, and a figure that is always closed."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from starfish.io import atomic_path


def subplots(*args: Any, **kwargs: Any) -> tuple[Any, Any]:
    """`plt.subplots` on the Agg backend, so plots render on machines without a display."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(*args, **kwargs)


def save_png(figure: Any, path: str | Path, dpi: int) -> Path:
    """Write `figure` to `path` atomically and release it."""
    import matplotlib.pyplot as plt

    try:
        with atomic_path(path) as tmp:
            figure.savefig(tmp, format="png", dpi=dpi)
    finally:
        plt.close(figure)
    return Path(path)
