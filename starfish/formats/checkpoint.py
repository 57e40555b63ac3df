"""The starfish checkpoint file: one `.safetensors` file holding the model's state under its own
keys, the pruning masks under `masks/<parameter name>`, and one metadata key of sorted JSON (the
model name, its classes and timm kwargs, a slim model's `architecture` record, lineage). A `.pth`
state dict of tensors is read too, and a compressed export (`formats.bitmask`) is read as the
masks it encodes. Reading validates what it parses: the metadata is bounded before it is parsed,
the tensors must be finite, nothing is unpickled. Building a model from a file is `models`' work.
"""

from __future__ import annotations

import json
import os
import pickle
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save, save_file

from starfish.errors import StarfishError
from starfish.formats import bitmask
from starfish.io import UnsafeJSON, atomic_path, loads_bounded

if TYPE_CHECKING:
    from starfish.pruning.masks import Masks

MASK_PREFIX = "masks/"
METADATA_KEY = "starfish"


def read_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], Masks, dict[str, str]]:
    """Read a checkpoint: (model state, masks, metadata). Clear errors for missing or damaged files."""
    path = Path(path)
    if path.exists() and not path.is_file():
        raise StarfishError(f"checkpoint {path} is not a regular file; point at the checkpoint file itself")
    if not path.is_file():
        raise StarfishError(f"checkpoint {path} does not exist; check the path")
    if path.suffix == ".safetensors":
        try:
            tensors = load_file(str(path))
        except (SafetensorError, OSError, ValueError) as exc:
            raise StarfishError(f"checkpoint {path} is damaged or truncated ({exc}); write it again") from exc
        metadata = checkpoint_metadata(path)
    elif path.suffix in (".pth", ".pt", ".bin"):
        try:
            loaded = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError:  # torch's message suggests weights_only=False: never repeat that
            raise StarfishError(f"checkpoint {path} holds Python objects besides tensors, which starfish never "
                                "unpickles; save its state dict of tensors, or .safetensors") from None
        except Exception as exc:  # truncated zip, bad magic number
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise StarfishError(f"checkpoint {path} is damaged or truncated ({reason}); write it again") from None
        for key in ("state_dict", "model"):
            if isinstance(loaded, dict) and isinstance(loaded.get(key), dict):
                loaded = loaded[key]
        if not isinstance(loaded, dict) or not all(isinstance(v, torch.Tensor) for v in loaded.values()):
            raise StarfishError(f"checkpoint {path} does not hold a state dict of tensors")
        tensors, metadata = dict(loaded), {}
    else:
        raise StarfishError(f"checkpoint {path}: unsupported suffix {path.suffix!r}; use .safetensors or .pth")
    bad = next((key for key, value in tensors.items() if value.is_floating_point()
                and not bool(torch.isfinite(value).all())), None)
    if bad is not None:
        raise StarfishError(f"checkpoint {path}: {bad} holds NaN or infinite values; the file is damaged, or it "
                            "was written from a diverged run: write it again from a good one")
    if metadata.get("format") == bitmask.FORMAT:  # a compressed export: the bitmasks are the masks
        state, masks = bitmask.decompress(tensors)
        return state, masks, metadata
    masks = {k[len(MASK_PREFIX):]: v for k, v in tensors.items() if k.startswith(MASK_PREFIX)}
    state = {k: v for k, v in tensors.items() if not k.startswith(MASK_PREFIX)}
    return state, masks, metadata


def checkpoint_metadata(path: str | Path) -> dict[str, Any]:
    """A checkpoint's metadata alone, from the `.safetensors` header without reading the tensors
    (`{}` for a `.pth` state dict, which has none)."""
    path = Path(path)
    if path.suffix != ".safetensors":
        return {}
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            header = dict(handle.metadata() or {})
    except (SafetensorError, OSError, ValueError) as exc:
        raise StarfishError(f"checkpoint {path} is damaged or truncated ({exc}); write it again") from exc
    return _parse_metadata(header, path)


def _parse_metadata(header: dict[str, str], path: Path) -> dict[str, Any]:
    """The checkpoint's metadata as JSON values; files from before METADATA_KEY kept flat text keys."""
    if METADATA_KEY in header:
        try:
            meta = loads_bounded(header[METADATA_KEY])
        except UnsafeJSON as exc:
            raise StarfishError(f"checkpoint {path}: its metadata is refused ({exc}); the file is damaged or not "
                                "written by starfish: write it again") from None
        except json.JSONDecodeError as exc:
            raise StarfishError(f"checkpoint {path}: its metadata is not JSON ({exc}); write it again") from None
        if not isinstance(meta, dict):
            raise StarfishError(f"checkpoint {path}: its metadata is a JSON {type(meta).__name__}, not a "
                                "mapping; write it again")
        return meta
    meta: dict[str, Any] = {}
    for key, text in header.items():
        try:
            meta[key] = loads_bounded(text) if key != "model" else text
        except UnsafeJSON as exc:
            raise StarfishError(f"checkpoint {path}: its metadata {key!r} is refused ({exc}); the file is damaged "
                                "or not written by starfish: write it again") from None
        except json.JSONDecodeError:
            meta[key] = text
    return meta


def checkpoint_bytes(tensors: dict[str, torch.Tensor], metadata: dict[str, Any]) -> bytes:
    """A `.safetensors` file's bytes, the metadata as one header key of sorted JSON (see below)."""
    return save({k: v.contiguous() for k, v in tensors.items()},
                metadata={METADATA_KEY: json.dumps(metadata, sort_keys=True)})



def write_checkpoint(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, Any]) -> None:
    """Write `tensors` and `metadata` to one `.safetensors` file, atomically. One header key holds
    sorted JSON: safetensors writes several keys in a varying order, and equal models must give
    equal bytes (hashes, dvc.lock)."""
    with atomic_path(path) as tmp:
        try:
            save_file(tensors, str(tmp), metadata={METADATA_KEY: json.dumps(metadata, sort_keys=True)})
        except SafetensorError as exc:  # an I/O failure (a full disk) as the OSError it is
            code = re.search(r"os error (\d+)", str(exc))
            if code is None:
                raise
            raise OSError(int(code.group(1)), os.strerror(int(code.group(1))), str(path)) from exc
