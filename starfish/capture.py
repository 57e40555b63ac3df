"""Which internal states a model exposes, and one owner for the hooks that record them.

Internal states are block outputs, found by module names and types (never by tensor shape).
Stages are the children of the model's top-level container: `blocks.{i}` (ViT/DeiT,
EfficientNet/MobileNet), `stages.{i}` (ConvNeXt), `layers.{i}` (Swin), or named stages:
`layer1..layer4` (ResNet), `s1..s4` (RegNet), `serial_blocks1..4` (CoaT). Blocks are what a stage
holds, as the STARFISH authors align them: its `.blocks` container (`stages.{i}.blocks.{j}`,
`layers.{i}.blocks.{j}`), its children when the stage is a Sequential (`blocks.{i}.{j}`,
`layerN.{j}`) or holds only blocks of one type (RegNet's `sN.bJ`), or the stage itself when it is
one block (ViT).
"""

from __future__ import annotations

from typing import Callable, Iterable

import torch
from torch import nn

from starfish.errors import StarfishError

_CONTAINERS = ("blocks", "stages", "layers")
_NAMED_STAGES = (("layer1", "layer2", "layer3", "layer4"), ("s1", "s2", "s3", "s4"),  # ResNet, RegNet
                 tuple(f"serial_blocks{i}" for i in range(1, 5)))  # CoaT (its parallel blocks stay out)
_SEQUENCES = (nn.Sequential, nn.ModuleList)


def stage_names(model: nn.Module) -> list[str]:
    """Names of the model's stages in forward order: the coarse states, and the pruning scope's roots."""
    for container in _CONTAINERS:
        stages = getattr(model, container, None)
        if isinstance(stages, _SEQUENCES) and len(stages) > 0:
            return [f"{container}.{child}" for child, _ in stages.named_children()]
    for names in _NAMED_STAGES:
        if all(isinstance(getattr(model, name, None), nn.Module) for name in names):
            return list(names)
    raise StarfishError(f"{type(model).__name__} has no `blocks`, `stages`, `layer1..4`, `s1..4` or "
                        "`serial_blocks1..4`")


def _blocks_of(stage: nn.Module, name: str) -> list[str]:
    """A stage's blocks: its `.blocks` container, else its children if it is a Sequential or
    they are all blocks of one type (RegNet's `s1.b1`, `s1.b2`), else itself."""
    inner = getattr(stage, "blocks", None)
    if isinstance(inner, _SEQUENCES) and len(inner) > 0:
        return [f"{name}.blocks.{child}" for child, _ in inner.named_children()]
    children = list(stage.named_children())
    if isinstance(stage, _SEQUENCES) and children:
        return [f"{name}.{child}" for child, _ in children]
    if children and len({type(module) for _, module in children}) == 1 and any(children[0][1].children()):
        return [f"{name}.{child}" for child, _ in children]
    return [name]


def block_names(model: nn.Module) -> list[str]:
    """Names of every block in forward order: the internal states STARFISH aligns by default."""
    return [block for stage in stage_names(model) for block in _blocks_of(model.get_submodule(stage), stage)]


def state_names(model: nn.Module, states: str) -> list[str]:
    """Resolve heal.states: `blocks` (every block), `stages`, `last` (final block) or comma-separated names."""
    if states in ("blocks", "stages", "last"):
        try:
            names = stage_names(model) if states == "stages" else block_names(model)
        except StarfishError as exc:
            raise StarfishError(f"{exc}; name its internal states explicitly with heal.states") from None
        return names[-1:] if states == "last" else names
    names = [name.strip() for name in states.split(",") if name.strip()]
    modules = dict(model.named_modules())
    unknown = [name for name in names if name not in modules]
    if unknown or not names:
        raise StarfishError(f"heal.states={states!r}: unknown module(s) {unknown}; use `blocks`, `stages`, "
                            "`last` or comma-separated module names")
    return names


class ActivationCapture:
    """Record the output (or input) of named submodules on every forward pass.

    Lifecycle: `with ActivationCapture(model, names) as capture:` registers one forward hook per
    name; each forward pass overwrites `capture.values[name]`; leaving the block removes every
    hook, also when the forward pass raised. `on_value`, if given, is called with (name, tensor)
    instead of storing, for accumulators that must not keep tensors alive.

    Inputs of a Linear layer whose parent reads its weight directly (BEiT's and EVA's attention:
    `F.linear(x, self.qkv.weight, bias)`, so the layer's own hook never fires) are the parent's
    input: recorded from the parent when the layer did not run during the parent's call.
    """

    def __init__(self, model: nn.Module, names: Iterable[str], inputs: bool = False,
                 on_value: Callable[[str, torch.Tensor], None] | None = None):
        modules = dict(model.named_modules())
        self.names = list(names)
        missing = [name for name in self.names if name not in modules]
        if missing:
            raise StarfishError(f"cannot capture {missing}: no such modules in {type(model).__name__}")
        self._modules = [modules[name] for name in self.names]
        self._parents = [modules[name.rpartition(".")[0]] for name in self.names]
        self._ran: dict[str, bool] = {}
        self._inputs = inputs
        self._on_value = on_value
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self.values: dict[str, torch.Tensor] = {}

    def _record(self, name: str, value: torch.Tensor) -> None:
        self._ran[name] = True
        if self._on_value is not None:
            self._on_value(name, value)
        else:
            self.values[name] = value

    def _hook(self, name: str) -> Callable:
        def record(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            self._record(name, args[0] if self._inputs else output)

        return record

    def _parent_hooks(self, name: str, layer: nn.Linear) -> tuple[Callable, Callable]:
        def before(parent: nn.Module, args: tuple) -> None:
            self._ran[name] = False

        def after(parent: nn.Module, args: tuple, output: object) -> None:
            x = args[0] if args else None
            if not self._ran.get(name, True) and isinstance(x, torch.Tensor) and x.shape[-1] == layer.in_features:
                self._record(name, x)

        return before, after

    def __enter__(self) -> "ActivationCapture":
        try:
            for name, module, parent in zip(self.names, self._modules, self._parents):
                self._handles.append(module.register_forward_hook(self._hook(name)))
                if self._inputs and isinstance(module, nn.Linear) and parent is not module:
                    before, after = self._parent_hooks(name, module)
                    self._handles.append(parent.register_forward_pre_hook(before))
                    self._handles.append(parent.register_forward_hook(after))
        except BaseException:
            self.remove()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self.values.clear()
