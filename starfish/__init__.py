"""starfish: prune a trained network, then heal it by aligning its internal states with the dense original.

The names below load on first use, so `starfish --help` and argument errors answer without
importing torch and timm."""

from typing import Any

from starfish.errors import StarfishError

__all__ = ["DEMO_MODEL", "StarfishError", "create_model", "load_checkpoint", "save_checkpoint"]
__version__ = "0.1.0"
_FROM_MODELS = ("DEMO_MODEL", "create_model", "load_checkpoint", "save_checkpoint")


def __getattr__(name: str) -> Any:
    if name in _FROM_MODELS:
        from starfish import models

        return getattr(models, name)
    raise AttributeError(f"module 'starfish' has no attribute {name!r}")
