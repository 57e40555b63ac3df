"""Models: timm names, local checkpoints, and starfish checkpoints that carry their masks.

Every model is a timm model, created by name through timm's registry; the two Fashion-MNIST demo
models are registered there too, so they honour the same contract (`pretrained_cfg` with input
size and normalization): a ViT (blocks `blocks.{i}`) and a MobileNetV1-style CNN built by timm's
EfficientNet builder (blocks `blocks.{i}.{j}`, as in the STARFISH authors' MobileNetV1).

A starfish checkpoint is one `.safetensors` file: the model's state under its own keys, the
pruning masks under `masks/<parameter name>`, and the model name in the file's metadata; a
slim (structurally pruned) model's metadata also holds its `architecture` record.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

import timm
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save, save_file
from timm.models import register_model
from timm.models.efficientnet import EfficientNet, decode_arch_def
from timm.models.vision_transformer import VisionTransformer

from starfish import sparse_format
from starfish.errors import StarfishError
from starfish.io import atomic_path

if TYPE_CHECKING:  # the pruning package imports this module
    from starfish.pruning.masks import Masks

log = logging.getLogger(__name__)

_DEMO_DIR = Path(__file__).resolve().parent.parent / "data" / "demo"
DEMO_MODEL = "starfish_vit_fmnist"
DEMO_CHECKPOINT = _DEMO_DIR / "starfish_vit_fmnist.safetensors"
DEMO_CNN_MODEL = "starfish_cnn_fmnist"
DEMO_CNN_CHECKPOINT = _DEMO_DIR / "starfish_cnn_fmnist.safetensors"
MASK_PREFIX = "masks/"
METADATA_KEY = "starfish"
FASHION_MNIST_MEAN = (0.2860,)
FASHION_MNIST_STD = (0.3530,)


def resolve_device(spec: str) -> torch.device:
    """`auto` -> the GPU when there is one, else the CPU; `cuda` without a GPU is an error."""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if spec.startswith("cuda") and not torch.cuda.is_available():
        raise StarfishError(f"model.device={spec!r} but no CUDA device is visible; use cpu or auto")
    try:
        return torch.device(spec)
    except RuntimeError:
        raise StarfishError(f"model.device={spec!r} is not a torch device; use auto, cpu or cuda") from None


def device_of(model: torch.nn.Module) -> torch.device:
    """Where the model's parameters live: inputs are moved there before each forward pass."""
    return next(model.parameters()).device


def _demo_options(name: str, checkpoint: Path, pretrained: bool, kwargs: dict[str, Any],
                  defaults: dict[str, Any]) -> dict[str, Any]:
    """Constructor options for a demo model: `defaults` overridden by `kwargs`; it has no hub weights."""
    if pretrained:
        raise StarfishError(f"{name} has no hub weights; pass checkpoint={checkpoint}")
    for hub_only in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir"):
        kwargs.pop(hub_only, None)
    return {**defaults, **kwargs}


def _fashion_mnist_cfg(name: str, in_chans: int, size: int, num_classes: int) -> dict[str, Any]:
    """The `pretrained_cfg` a demo model carries, so data loading finds its input size and normalization."""
    return {
        "architecture": name,
        "input_size": (in_chans, size, size),
        "mean": FASHION_MNIST_MEAN,
        "std": FASHION_MNIST_STD,
        "crop_pct": 1.0,
        "interpolation": "bilinear",
        "num_classes": num_classes,
    }


@register_model
def starfish_vit_fmnist(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """A 4-block ViT (dim 64, 4 heads, 4x4 patches) for 28x28 grayscale Fashion-MNIST."""
    options = _demo_options(DEMO_MODEL, DEMO_CHECKPOINT, pretrained, kwargs,
                            dict(img_size=28, patch_size=4, in_chans=1, num_classes=10, embed_dim=64, depth=4,
                                 num_heads=4, mlp_ratio=4.0))
    model = VisionTransformer(**options)
    model.pretrained_cfg = _fashion_mnist_cfg(DEMO_MODEL, options["in_chans"], options["img_size"],
                                              options["num_classes"])
    return model


# MobileNetV1 stages (depthwise 3x3 + pointwise 1x1, no skip) sized for 28x28: the stem (stride 2)
# gives 14x14, then 14 -> 7 -> 4; six blocks, 73k parameters.
_CNN_ARCH = [["dsa_r1_k3_s1_c32"], ["dsa_r2_k3_s2_c64"], ["dsa_r2_k3_s2_c128"], ["dsa_r1_k3_s1_c256"]]


@register_model
def starfish_cnn_fmnist(pretrained: bool = False, **kwargs: Any) -> EfficientNet:
    """A small MobileNetV1 for 28x28 grayscale Fashion-MNIST: the CNN counterpart of the demo ViT."""
    options = _demo_options(DEMO_CNN_MODEL, DEMO_CNN_CHECKPOINT, pretrained, kwargs,
                            dict(in_chans=1, num_classes=10, stem_size=16, fix_stem=True, num_features=0,
                                 act_layer=torch.nn.ReLU6))
    model = EfficientNet(decode_arch_def(_CNN_ARCH), **options)
    model.pretrained_cfg = _fashion_mnist_cfg(DEMO_CNN_MODEL, options["in_chans"], 28, options["num_classes"])
    return model


def create_model(name: str, checkpoint: str | Path | None = None, pretrained: bool = False,
                 num_classes: int | None = None, kwargs: Mapping[str, Any] | None = None) -> torch.nn.Module:
    """Build timm model `name` (with timm `kwargs` such as img_size), with weights from
    `checkpoint` or (online only) the hub, in eval mode."""
    if not timm.is_model(name):
        close = timm.list_models(f"*{name.split('_')[0]}*")[:5]
        hint = f" (close: {', '.join(close)})" if close else ""
        raise StarfishError(f"unknown model {name!r}{hint}; use a timm model name or {DEMO_MODEL!r}")
    options = {**(kwargs or {}), **({} if num_classes is None else {"num_classes": num_classes})}
    try:
        model = timm.create_model(name, pretrained=pretrained and checkpoint is None, **options)
    except StarfishError:
        raise
    except TypeError as exc:  # an argument this model does not take
        raise StarfishError(f"cannot create {name!r} with {dict(kwargs or {})}: {exc}; fix model.kwargs") from exc
    except Exception as exc:  # hub download failures surface as many types
        raise StarfishError(f"cannot create {name!r}: {exc}; pass a local checkpoint instead") from exc
    if checkpoint is not None:
        state, _, _ = read_checkpoint(checkpoint)
        load_state_(model, state, source=str(checkpoint))
    return model.eval()


def read_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], Masks, dict[str, str]]:
    """Read a checkpoint: (model state, masks, metadata). Clear errors for missing or damaged files."""
    path = Path(path)
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
    if metadata.get("format") == sparse_format.FORMAT:  # a compressed export: the bitmasks are the masks
        state, masks = sparse_format.decompress(tensors)
        return state, masks, metadata
    masks = {k[len(MASK_PREFIX):]: v.bool() for k, v in tensors.items() if k.startswith(MASK_PREFIX)}
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
            return _parse_metadata(dict(handle.metadata() or {}))
    except (SafetensorError, OSError, ValueError) as exc:
        raise StarfishError(f"checkpoint {path} is damaged or truncated ({exc}); write it again") from exc


def _parse_metadata(header: dict[str, str]) -> dict[str, Any]:
    """The checkpoint's metadata as JSON values; files from before METADATA_KEY kept flat text keys."""
    if METADATA_KEY in header:
        return json.loads(header[METADATA_KEY])
    meta: dict[str, Any] = {}
    for key, text in header.items():
        try:
            meta[key] = json.loads(text) if key != "model" else text
        except json.JSONDecodeError:
            meta[key] = text
    return meta


def load_state_(model: torch.nn.Module, state: dict[str, torch.Tensor], source: str) -> torch.nn.Module:
    """Load `state` strictly; a mismatch names the keys and shapes that differ."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong = [f"{k}: {tuple(state[k].shape)} vs {tuple(own[k].shape)}"
             for k in sorted(set(own) & set(state)) if state[k].shape != own[k].shape]
    if missing or unexpected or wrong:
        parts = []
        for label, items in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", wrong)):
            if items:
                parts.append(f"{label}: {', '.join(items[:3])}{' ...' if len(items) > 3 else ''}")
        raise StarfishError(f"checkpoint {source} does not match the model ({'; '.join(parts)}); "
                            "pass the model name the checkpoint was trained as")
    model.load_state_dict(state, strict=True)
    return model


def checkpoint_bytes(tensors: dict[str, torch.Tensor], metadata: dict[str, Any]) -> bytes:
    """A `.safetensors` file's bytes, the metadata as one header key of sorted JSON (see below)."""
    return save({k: v.contiguous() for k, v in tensors.items()},
                metadata={METADATA_KEY: json.dumps(metadata, sort_keys=True)})


def save_checkpoint(path: str | Path, model: torch.nn.Module, model_name: str, masks: Masks | None = None,
                    metadata: dict[str, Any] | None = None) -> None:
    """Write model state (+ masks) to one `.safetensors` file, atomically."""
    from starfish.pruning.structured import architecture_of  # the pruning package imports this module

    tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    architecture = architecture_of(model)
    for name, mask in (masks or {}).items():
        if architecture is None or not mask.all():  # a slim model's all-True masks say nothing: not stored
            tensors[MASK_PREFIX + name] = mask.detach().bool().contiguous().cpu()
    meta = {"model": model_name, "num_classes": getattr(model, "num_classes", None), **(metadata or {}),
            **({"architecture": architecture} if architecture is not None else {})}
    # One header key holding sorted JSON: safetensors writes several keys in a varying order,
    # and equal models must give equal bytes (hashes, dvc.lock).
    with atomic_path(path) as tmp:
        try:
            save_file(tensors, str(tmp), metadata={METADATA_KEY: json.dumps(meta, sort_keys=True)})
        except SafetensorError as exc:  # an I/O failure (a full disk) as the OSError it is
            code = re.search(r"os error (\d+)", str(exc))
            if code is None:
                raise
            raise OSError(int(code.group(1)), os.strerror(int(code.group(1))), str(path)) from exc


def load_checkpoint(path: str | Path, model_name: str | None = None) -> tuple[torch.nn.Module, Masks, str]:
    """Rebuild a model from a starfish checkpoint: (model, masks, model name). A slim checkpoint
    (structured pruning) is rebuilt at its recorded shapes; its masks are all-True over the
    narrowed weights (`structured.slim_masks`): the layers a heal trains."""
    from starfish.pruning.structured import rebuild_, slim_masks  # the pruning package imports this module

    state, masks, metadata = read_checkpoint(path)
    name = model_name or metadata.get("model")
    if not name:
        raise StarfishError(f"checkpoint {path} does not name its model; pass the model name")
    num_classes = metadata.get("num_classes") if isinstance(metadata.get("num_classes"), int) else None
    kwargs = metadata.get("model_kwargs") if isinstance(metadata.get("model_kwargs"), dict) else None
    model = create_model(name, num_classes=num_classes, kwargs=kwargs)
    if "architecture" in metadata:  # a slim checkpoint: the smaller modules first, from its record
        rebuild_(model, metadata["architecture"], source=str(path))
        masks = {**slim_masks(model), **masks}
    load_state_(model, state, source=str(path))
    return model.eval(), masks, name
