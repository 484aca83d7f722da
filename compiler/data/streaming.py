"""Run a checkpoint that does not fit in memory, one leaf module at a time.

The traced torch.fx graph of the model (its leaves: MoE blocks, attention, MLPs, norms,
embeddings, the LM head) is executed by an :class:`fx.Interpreter`. Before a leaf runs, its
parameters are read from the checkpoint's safetensors files; afterwards they go back to the
meta device. Peak memory is therefore about one leaf module's weights (one layer's MoE block,
the largest leaf in an MoE model) plus the activations alive at that point, instead of the
whole model. Forward hooks registered on submodules (e.g. the density pass' routing
counters) fire as usual.

A ``wrap`` function turns each materialised leaf into the module that runs (simulation: the
leaf with its analog matrices on tiles programmed from the weights just read; see
:func:`hetmap.compiler.evaluation.simulate.streamed_perplexity`).

Limits: (1) speed -- every leaf is read from disk for every batch, so calibrate with few,
large batches; (2) a leaf larger than memory (e.g. one DeepSeek-V3 MoE layer in fp32, ~45 GB)
still does not fit; (3) non-persistent buffers created at init (rotary ``inv_freq``) are
rebuilt by constructing the module again from the model config.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from hetmap.common.errors import MissingDataError
from hetmap.compiler.data.weights import CheckpointWeights


class StreamingInterpreter(fx.Interpreter):
    """Executes a traced model, materialising each leaf module's weights just in time."""

    def __init__(self, gm: fx.GraphModule, weights: CheckpointWeights, *, wrapped: bool,
                 config: Any, wrap: Callable[[nn.Module, str], nn.Module] | None = None,
                 device: str | torch.device = "cpu") -> None:
        super().__init__(gm, garbage_collect_values=True)
        self.weights = weights
        self.device = torch.device(device)
        self.wrapped = wrapped
        self.config = config
        self.wrap = wrap
        self.aliases = _aliases(gm)

    def call_module(self, target: Any, args: Any, kwargs: Any) -> Any:
        module = self.fetch_attr(target)
        path = str(target).removeprefix("model.") if self.wrapped else str(target)
        with self._materialised(module, path) as live:
            runs = live if self.wrap is None else self.wrap(live, path)
            return runs(*args, **kwargs)

    def get_attr(self, target: Any, args: Any, kwargs: Any) -> Any:
        """A parameter or buffer the graph reads directly (a module traced through, not a
        leaf): read from the checkpoint when it is on the meta device."""
        value = super().get_attr(target, args, kwargs)
        if isinstance(value, torch.Tensor) and value.is_meta:
            return self._load(str(target).removeprefix("model.") if self.wrapped else str(target),
                              value)
        return value.to(self.device) if isinstance(value, torch.Tensor) else value

    @contextmanager
    def _materialised(self, module: nn.Module, path: str) -> Iterator[nn.Module]:
        if _has_meta_buffers(module) and not any(True for _ in module.parameters()):
            yield self._rebuilt(module, path)
            return
        saved: list[tuple[dict[str, Any], str, Any]] = []
        try:
            for name, param in list(module.named_parameters(remove_duplicate=False)):
                owner, leaf = _owner(module, name)
                tensor = self._load(f"{path}.{name}" if path else name, param)
                saved.append((owner._parameters, leaf, param))
                owner._parameters[leaf] = nn.Parameter(tensor, requires_grad=False)
            for name, buffer in list(module.named_buffers(remove_duplicate=False)):
                if not buffer.is_meta and buffer.device == self.device:
                    continue
                owner, leaf = _owner(module, name)
                tensor = buffer.to(self.device) if not buffer.is_meta else \
                    self._load(f"{path}.{name}" if path else name, buffer)
                saved.append((owner._buffers, leaf, buffer))
                owner._buffers[leaf] = tensor
            yield module
        finally:
            for table, leaf, original in saved:
                table[leaf] = original

    def _load(self, name: str, param: torch.Tensor) -> torch.Tensor:
        for candidate in [name, *self.aliases.get(name, [])]:
            tensor = self.weights.load_full(candidate, tuple(param.shape))
            if tensor is not None:
                return tensor.to(self.device,
                                 param.dtype if param.is_floating_point() else tensor.dtype)
        raise MissingDataError(f"{self.weights.directory}: no tensor for {name!r}")

    def _rebuilt(self, module: nn.Module, path: str) -> nn.Module:
        try:
            return type(module)(config=self.config).eval().to(self.device)
        except TypeError as exc:
            raise MissingDataError(f"cannot rebuild buffers of {path} ({type(module).__name__}) "
                                   "for streamed execution") from exc


def _owner(module: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent, _, leaf = name.rpartition(".")
    return (module.get_submodule(parent) if parent else module), leaf


def _has_meta_buffers(module: nn.Module) -> bool:
    return any(b.is_meta for b in module.buffers())


def _aliases(gm: fx.GraphModule) -> dict[str, list[str]]:
    """Tied parameters: every name of a shared tensor maps to its other names."""
    by_id: dict[int, list[str]] = {}
    root = gm.get_submodule("model") if hasattr(gm, "model") else gm
    for name, param in root.named_parameters(remove_duplicate=False):
        by_id.setdefault(id(param), []).append(name)
    return {n: [m for m in names if m != n] for names in by_id.values() for n in names}


def streams(model: Any, stream: str) -> bool:
    """Whether ``model`` (a :class:`~hetmap.compiler.frontend.loader.LoadedModel`) runs
    streamed: a checkpoint not loaded yet, with ``stream`` ``"on"``, or ``"auto"`` when its
    files are larger than half of the machine's memory."""
    if stream == "off" or model.checkpoint is None or not model.on_meta:
        return False
    if stream == "on":
        return True
    size = sum(f.stat().st_size for f in model.checkpoint.glob("*.safetensors"))
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return bool(size > memory // 2)


def run_streamed(gm: fx.GraphModule, weights: CheckpointWeights, batches: list[torch.Tensor], *,
                 wrapped: bool, config: Any, advance: Any = None) -> None:
    interpreter = StreamingInterpreter(gm, weights, wrapped=wrapped, config=config)
    with torch.no_grad():
        for batch in batches:
            interpreter.run(batch)
            if advance is not None:
                advance(1)
