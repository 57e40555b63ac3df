"""Which internal states a model exposes, and one owner for the hooks that record them.

Internal states are the outputs of a model's top-level blocks, found by name (never by tensor
shape): `blocks.{i}` for ViT/DeiT-style models, `stages.{i}` for ConvNeXt-style models, and
`layer1..layer4` for ResNets.
"""

from __future__ import annotations

from typing import Callable, Iterable

import torch
from torch import nn

from starfish.errors import StarfishError

_CONTAINERS = ("blocks", "stages", "layers")
_RESNET_STAGES = ("layer1", "layer2", "layer3", "layer4")


def block_names(model: nn.Module) -> list[str]:
    """Names of the modules whose outputs are the model's internal states, in forward order."""
    for container in _CONTAINERS:
        blocks = getattr(model, container, None)
        if isinstance(blocks, (nn.Sequential, nn.ModuleList)) and len(blocks) > 0:
            return [f"{container}.{i}" for i in range(len(blocks))]
    if all(isinstance(getattr(model, name, None), nn.Module) for name in _RESNET_STAGES):
        return list(_RESNET_STAGES)
    raise StarfishError(
        f"{type(model).__name__} has no `blocks`, `stages` or `layer1..4`; name its internal states "
        "explicitly with heal.states"
    )


def state_names(model: nn.Module, states: str) -> list[str]:
    """Resolve heal.states: `blocks` (every block), `last` (the final block) or comma-separated names."""
    if states == "blocks":
        return block_names(model)
    if states == "last":
        return block_names(model)[-1:]
    names = [name.strip() for name in states.split(",") if name.strip()]
    modules = dict(model.named_modules())
    unknown = [name for name in names if name not in modules]
    if unknown or not names:
        raise StarfishError(f"heal.states={states!r}: unknown module(s) {unknown}; use `blocks`, `last` "
                            "or comma-separated module names")
    return names


class ActivationCapture:
    """Record the output (or input) of named submodules on every forward pass.

    Lifecycle: `with ActivationCapture(model, names) as capture:` registers one forward hook per
    name; each forward pass overwrites `capture.values[name]`; leaving the block removes every
    hook, also when the forward pass raised. `on_value`, if given, is called with (name, tensor)
    instead of storing, for accumulators that must not keep tensors alive.
    """

    def __init__(self, model: nn.Module, names: Iterable[str], inputs: bool = False,
                 on_value: Callable[[str, torch.Tensor], None] | None = None):
        modules = dict(model.named_modules())
        self.names = list(names)
        missing = [name for name in self.names if name not in modules]
        if missing:
            raise StarfishError(f"cannot capture {missing}: no such modules in {type(model).__name__}")
        self._modules = [modules[name] for name in self.names]
        self._inputs = inputs
        self._on_value = on_value
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self.values: dict[str, torch.Tensor] = {}

    def _hook(self, name: str) -> Callable:
        def record(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            value = args[0] if self._inputs else output
            if self._on_value is not None:
                self._on_value(name, value)
            else:
                self.values[name] = value

        return record

    def __enter__(self) -> "ActivationCapture":
        try:
            for name, module in zip(self.names, self._modules):
                self._handles.append(module.register_forward_hook(self._hook(name)))
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
