"""starfish: prune a trained network, then heal it by aligning its internal states with the dense original."""

from starfish.errors import StarfishError
from starfish.models import DEMO_MODEL, create_model, load_checkpoint, save_checkpoint

__all__ = ["DEMO_MODEL", "StarfishError", "create_model", "load_checkpoint", "save_checkpoint"]
__version__ = "0.1.0"
