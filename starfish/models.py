"""Models: timm names, local checkpoints, and starfish checkpoints that carry their masks.

Every model is a timm model, created by name through timm's registry; the two Fashion-MNIST demo
models are registered there too, so they honour the same contract (`pretrained_cfg` with input
size and normalization): a ViT (blocks `blocks.{i}`) and a MobileNetV1-style CNN built by timm's
EfficientNet builder (blocks `blocks.{i}.{j}`, as in the STARFISH authors' MobileNetV1).

A starfish checkpoint (`formats.checkpoint`) is built from here: the metadata it names is checked
as a config's model section is, and the model is built on the meta device and checked against the
file's tensors before it is allocated; a slim model is rebuilt at its recorded shapes.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import socket
import urllib.parse
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

import timm
import torch
from timm.models import register_model
from timm.models.efficientnet import EfficientNet, decode_arch_def
from timm.models.vision_transformer import VisionTransformer
from torch.overrides import TorchFunctionMode

from starfish.config import kwargs_problem
from starfish.errors import StarfishError
from starfish.formats.checkpoint import MASK_PREFIX, read_checkpoint, write_checkpoint
from starfish.pruning.slim import architecture_of, rebuild_, slim_masks

if TYPE_CHECKING:
    from starfish.pruning.masks import Masks

log = logging.getLogger(__name__)

_DEMO_DIR = Path(__file__).resolve().parent.parent / "data" / "demo"
DEMO_MODEL = "starfish_vit_fmnist"
DEMO_CHECKPOINT = _DEMO_DIR / "starfish_vit_fmnist.safetensors"
DEMO_CNN_MODEL = "starfish_cnn_fmnist"
DEMO_CNN_CHECKPOINT = _DEMO_DIR / "starfish_cnn_fmnist.safetensors"
FASHION_MNIST_MEAN = (0.2860,)
FASHION_MNIST_STD = (0.3530,)


def device_of(model: torch.nn.Module) -> torch.device:
    """Where the model's parameters live: inputs are moved there before each forward pass. A
    model without any (an onnxruntime session behind a module) runs on the CPU."""
    first = next(model.parameters(), None)
    return torch.device("cpu") if first is None else first.device


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


# Buffers a model builds for itself (not stored in its checkpoint, such as attention index
# tables): a checkpoint whose metadata makes more than this is refused before it is allocated.
MAX_UNSTORED_BYTES = 1 << 30
# In-place writes of values only (weight initialization); they never change a tensor's shape.
_VALUE_WRITES = frozenset({"uniform_", "normal_", "trunc_normal_", "erfinv_", "mul_", "add_", "sub_", "div_",
                           "clamp_", "clamp_min_", "clamp_max_", "fill_", "zero_", "copy_", "exponential_",
                           "bernoulli_", "random_", "log_normal_", "geometric_", "cauchy_", "orthogonal_"})


class _SkipMetaValueWrites(TorchFunctionMode):
    """Weight initialization skipped on meta tensors, which have no values to write: run through
    the meta kernels, timm's initializers took three quarters of a meta build (1.6 of 2.0 s for a
    64-block ViT), time every check of an untrusted file's metadata paid."""

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        if (getattr(func, "__name__", "") in _VALUE_WRITES and args and isinstance(args[0], torch.Tensor)
                and args[0].is_meta):
            return args[0]
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def on_meta() -> Any:
    """Modules built inside have meta tensors: their shapes, no memory and no initialization."""
    with torch.device("meta"), _SkipMetaValueWrites():
        yield


RANDOM_INIT_SEED = 0
HUB_CONNECT_TIMEOUT_S = 5.0


def create_model(name: str, checkpoint: str | Path | None = None, pretrained: bool = False,
                 num_classes: int | None = None, kwargs: Mapping[str, Any] | None = None) -> torch.nn.Module:
    """Build timm model `name` (with timm `kwargs` such as img_size), with weights from
    `checkpoint` or (online only) the hub, in eval mode. With neither, the weights are timm's
    initialization under a fixed seed, so every step that builds the model builds the same one."""
    _check_name(name)
    options = _options(num_classes, kwargs)
    if checkpoint is None:
        return _timm_model(name, options, pretrained).eval()
    state, _, _ = read_checkpoint(checkpoint)
    check_buildable(name, options, state, None, str(checkpoint))
    return load_state_(_timm_model(name, options), state, source=str(checkpoint)).eval()


def _options(num_classes: int | None, kwargs: Mapping[str, Any] | None) -> dict[str, Any]:
    """timm.create_model's keyword arguments."""
    return {**(kwargs or {}), **({} if num_classes is None else {"num_classes": num_classes})}


MAX_NAME_LENGTH = 200  # timm's longest model name is under 70 characters
MAX_CLASSES = 1_000_000


def _check_name(name: str) -> None:
    if len(name) > MAX_NAME_LENGTH:
        raise StarfishError(f"model name of {len(name):,} characters is refused (at most {MAX_NAME_LENGTH}); use a "
                            f"timm model name or {DEMO_MODEL!r}")
    if not timm.is_model(name):
        close = timm.list_models(f"*{name.split('_')[0]}*")[:5]
        hint = f" (close: {', '.join(close)})" if close else ""
        raise StarfishError(f"unknown model {name!r}{hint}; use a timm model name or {DEMO_MODEL!r}")


def _timm_model(name: str, options: dict[str, Any], pretrained: bool = False) -> torch.nn.Module:
    try:
        if pretrained:
            _check_hub_weights(name)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return _with_input_size(timm.create_model(name, pretrained=True, **options), options)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(RANDOM_INIT_SEED)
            return _with_input_size(timm.create_model(name, **options), options)
    except StarfishError:
        raise
    except TypeError as exc:  # an argument this model does not take
        raise StarfishError(f"cannot create {name!r} with {options}: {exc}; fix model.kwargs") from exc
    except Exception as exc:  # hub download failures surface as many types
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise StarfishError(f"cannot create {name!r} ({reason}); pass a local checkpoint instead "
                            "(model.checkpoint)") from None


def _check_hub_weights(name: str) -> None:
    """Fail in seconds, not after a minute of retries, when timm's pretrained weights for `name`
    are neither in the Hugging Face cache nor reachable (`HF_ENDPOINT`, `HF_HUB_OFFLINE`)."""
    from huggingface_hub import constants, try_to_load_from_cache

    cfg = timm.models.get_pretrained_cfg(name)
    hub_id = getattr(cfg, "hf_hub_id", None)
    if hub_id and any(isinstance(try_to_load_from_cache(hub_id, f), str)
                      for f in ("model.safetensors", "open_clip_model.safetensors", "pytorch_model.bin")):
        return
    source = constants.ENDPOINT if hub_id else getattr(cfg, "url", None)
    if not source:  # no hub weights at all: timm says so
        return
    url = urllib.parse.urlsplit(source)
    reachable = not constants.HF_HUB_OFFLINE
    if reachable:
        try:
            socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)),
                                     timeout=HUB_CONNECT_TIMEOUT_S).close()
        except OSError:
            reachable = False
    if not reachable:
        raise StarfishError(f"model.pretrained=true needs the hub weights of {name}, which are not in the local "
                            f"Hugging Face cache, and {url.hostname} cannot be reached from here; download them "
                            "where there is network, or set model.checkpoint to a local file")


def _with_input_size(model: torch.nn.Module, options: dict[str, Any]) -> torch.nn.Module:
    """Make the model's `pretrained_cfg` give the input size it was built for: timm's
    `resolve_data_config`, which sizes every image starfish loads, reads that, not `img_size`."""
    size = options.get("img_size")
    cfg = getattr(model, "pretrained_cfg", None)
    if size is None or not isinstance(cfg, dict) or "input_size" not in cfg:
        return model
    height, width = (size, size) if isinstance(size, int) else tuple(size)
    model.pretrained_cfg = {**cfg, "input_size": (cfg["input_size"][0], int(height), int(width))}
    model.pretrained_cfg.pop("test_input_size", None)
    return model


def check_buildable(name: str, options: dict[str, Any], state: dict[str, torch.Tensor],
                    architecture: Any, source: str) -> None:
    """Build the model on the meta device (no memory) and check that `state` fits it exactly,
    before the real model is allocated: a checkpoint's metadata (num_classes, img_size, an
    architecture record) is untrusted, and only tensors the file really holds may size the model."""
    try:
        with on_meta():
            probe = _timm_model(name, options)
    except StarfishError:
        raise
    except Exception as exc:  # a model whose constructor cannot run on meta: the real build checks it
        log.debug("cannot build %s on the meta device (%s); its state is checked after building", name, exc)
        return
    if architecture is not None:
        rebuild_(probe, architecture, source)
    check_state_fits(probe, state, source)
    stored = set(probe.state_dict())
    unstored = sum(b.numel() * b.element_size() for key, b in probe.named_buffers() if key not in stored)
    if unstored > MAX_UNSTORED_BYTES:
        raise StarfishError(f"checkpoint {source}: {name} with {options} would build {unstored / 2**30:.1f} GiB "
                            "of buffers its file does not hold; the metadata is damaged or hostile")


def check_state_fits(model: torch.nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """`state` has exactly `model`'s keys and shapes; a mismatch names the keys and shapes that differ."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shared = sorted(set(own) & set(state))
    wrong = [f"{k}: {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in shared if state[k].shape != own[k].shape]
    kinds = [f"{k}: {state[k].dtype} where the model holds {own[k].dtype}" for k in shared
             if _kind(state[k]) != _kind(own[k])]  # integers or bools for float weights: a damaged file
    if missing or unexpected or wrong or kinds:
        parts = []
        for label, items in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", wrong),
                             ("dtype mismatch", kinds)):
            if items:
                parts.append(f"{label}: {', '.join(items[:3])}{' ...' if len(items) > 3 else ''}")
        raise StarfishError(f"checkpoint {source} does not match the model ({'; '.join(parts)}); "
                            "pass the model name the checkpoint was trained as")


def _kind(tensor: torch.Tensor) -> str:
    return "float" if tensor.is_floating_point() else "bool" if tensor.dtype == torch.bool else "int"


def load_state_(model: torch.nn.Module, state: dict[str, torch.Tensor], source: str) -> torch.nn.Module:
    """Load `state` strictly (`check_state_fits` first)."""
    check_state_fits(model, state, source)
    model.load_state_dict(state, strict=True)
    return model


def state_sha256(model: torch.nn.Module) -> str:
    """A hash of the model's state (names, dtypes, shapes and bytes, in name order): which dense
    weights a pruned model came from, whatever file or seed they were read from."""
    digest = hashlib.sha256()
    for key, value in sorted(model.state_dict().items()):
        value = value.detach().cpu().contiguous()
        digest.update(f"{key}|{value.dtype}|{list(value.shape)}|".encode())
        digest.update(value.reshape(-1).view(torch.uint8).numpy().tobytes() if value.numel() else b"")
    return digest.hexdigest()


def save_checkpoint(path: str | Path, model: torch.nn.Module, model_name: str, masks: Masks | None = None,
                    metadata: dict[str, Any] | None = None) -> None:
    """Write model state (+ masks) to one `.safetensors` file, atomically."""
    tensors, seen = {}, set()
    for key, value in model.state_dict().items():  # a tensor shared by several keys (CoaT) is stored once per key
        value = value.detach().contiguous().cpu()
        pointer = value.untyped_storage().data_ptr() if value.numel() else None
        tensors[key] = value.clone() if pointer in seen else value
        seen.add(pointer)
    architecture = architecture_of(model)
    for name, mask in (masks or {}).items():
        if architecture is None or not mask.all():  # a slim model's all-True masks say nothing: not stored
            tensors[MASK_PREFIX + name] = mask.detach().bool().contiguous().cpu()
    meta = {"model": model_name, "num_classes": getattr(model, "num_classes", None), **(metadata or {}),
            **({"architecture": architecture} if architecture is not None else {})}
    write_checkpoint(path, tensors, meta)


def load_checkpoint(path: str | Path, model_name: str | None = None) -> tuple[torch.nn.Module, Masks, str]:
    """Rebuild a model from a starfish checkpoint: (model, masks, model name). A slim checkpoint
    (structured pruning) is rebuilt at its recorded shapes; its masks are all-True over the
    narrowed weights (`structured.slim_masks`): the layers a heal trains. The metadata, state and
    masks are checked against each other before the model is allocated."""
    return model_from(read_checkpoint(path), path, model_name)


def model_from(read: tuple[dict[str, torch.Tensor], Masks, dict[str, Any]], path: str | Path,
               model_name: str | None = None) -> tuple[torch.nn.Module, Masks, str]:
    """`load_checkpoint` of what `read_checkpoint(path)` returned, for a caller that also needs
    the file's own tensors or metadata: the file is read once."""
    state, masks, metadata = read
    name, num_classes, kwargs = model_spec(metadata, path, model_name)
    _check_name(name)
    options = _options(num_classes, kwargs)
    architecture = metadata.get("architecture")
    check_buildable(name, options, state, architecture, str(path))
    model = _timm_model(name, options)
    if architecture is not None:  # a slim checkpoint: the smaller modules first, from its record
        rebuild_(model, architecture, source=str(path))
        masks = {**slim_masks(model), **masks}
    load_state_(model, state, source=str(path))
    check_masks_fit(model, masks, str(path))
    return model.eval(), masks, name


def model_spec(metadata: Mapping[str, Any], path: str | Path, model_name: str | None = None
               ) -> tuple[str, int | None, dict[str, Any]]:
    """(model name, num_classes, timm kwargs) from a checkpoint's metadata, checked as the model
    section of a config is: the file may be hostile, and these become constructor arguments."""
    def bad(why: str) -> StarfishError:
        return StarfishError(f"checkpoint {path}: its metadata {why}; the file is damaged or not written by "
                             "starfish: write it again")

    name = model_name or metadata.get("model")
    if not name:
        raise StarfishError(f"checkpoint {path} does not name its model; pass the model name")
    if not isinstance(name, str):
        raise bad(f"names the model {str(name)[:40]!r}, which is not a string")
    _check_name(name)
    num_classes = metadata.get("num_classes")
    if num_classes is not None and (not isinstance(num_classes, int) or isinstance(num_classes, bool)
                                    or not 1 <= num_classes <= MAX_CLASSES):
        raise bad(f"gives num_classes={repr(num_classes)[:40]}, which is not an integer in 1..{MAX_CLASSES:,}")
    kwargs = metadata.get("model_kwargs") or {}
    if not isinstance(kwargs, dict) or not all(isinstance(key, str) for key in kwargs):
        raise bad(f"gives model_kwargs={kwargs!r}, which is not a mapping of names")
    problem = kwargs_problem(kwargs)
    if problem:
        raise bad(f"model_kwargs {problem}")
    return name, num_classes, dict(kwargs)


def check_masks_fit(model: torch.nn.Module, masks: Masks, source: str) -> None:
    """Every mask is a bool tensor over a parameter the model has, at that parameter's shape."""
    params = dict(model.named_parameters())
    for key, mask in masks.items():
        if key not in params:
            raise StarfishError(f"checkpoint {source} has a mask for {key}, which {type(model).__name__} does not "
                                "have; the file is damaged or for another model: write it again")
        if mask.dtype != torch.bool or mask.shape != params[key].shape:
            raise StarfishError(f"checkpoint {source}: the mask of {key} is {mask.dtype} {tuple(mask.shape)} but "
                                f"must be bool {tuple(params[key].shape)}; the file is damaged: write it again")
