"""One expert at a time on simulated tiles, measured without rerunning the whole model.

The ``sensitivity`` pass needs, for every expert ``e`` of an MoE layer, the model's loss when
only ``e`` runs on AIMC tiles. Everything before that layer's experts is unchanged, so this
module records it once (:class:`LayerRecorder`) and replays it (:func:`replayed_tail`):

1. A digital forward records, per MoE layer, the experts module's call (hidden rows, top-k
   indices and weights) and output, and every decoder layer's output.
2. :class:`ExpertDeltas` computes, for ``K`` replicas of the recorded rows, the change of the
   experts output when expert ``e_k`` alone runs analog in replica ``k``:
   ``w * (post_norm(analog_e(x)) - post_norm(digital_e(x)))`` on the rows routed to ``e_k``.
   Replica ``k``'s analog matrices are programmed exactly as :class:`SimulatedExperts` with
   ``analog_experts=(e_k,)`` and seed ``s_k`` programs them (same stacks, same seeds, same rows
   in the same order, so the same programming and output noise).
3. :func:`replayed_tail` runs the model on ``K`` copies of the window batch with the decoder
   layers before the MoE layer's own replaced by modules that return the recorded output
   (no compute), and the MoE layer's decoder layer replaced by ``recorded output + delta``
   when that layer's output is additive in its experts output (checked once per layer by
   :func:`output_is_additive`), or else run for real with its experts module replaced by
   ``recorded experts output + delta``. The layers after it run for real.

Results equal a full rerun of a simulated copy of the model up to float rounding (the deltas
are added to recorded sums instead of summing the experts again).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn

from .experts import canonical_experts, expert_group
from .grouped import RowGroups
from .layouts import ExpertLayout
from .settings import AnalogSettings


class ExpertDeltas(nn.Module):
    """Output changes of a routed experts module with expert ``runs[k][0]`` analog (seed
    ``runs[k][1]``, the experts module's seed in a simulated model) in replica ``k``."""

    def __init__(self, experts: nn.Module, path: str, layout: ExpertLayout,
                 runs: Sequence[tuple[int, int]], settings: AnalogSettings) -> None:
        super().__init__()
        canon = canonical_experts(experts, path, layout)
        self.experts = [expert for expert, _ in runs]
        self.analog = nn.ModuleList(expert_group(canon, [expert], settings, seed)
                                    for expert, seed in runs)
        self.digital = expert_group(canon, self.experts, None, 0)
        self.activation = canon.activation
        self.post_norm = canon.post_norm

    @property
    def replicas(self) -> int:
        return len(self.experts)

    def forward(self, hidden: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        """``[K, T, H]`` deltas for the recorded call ``(hidden [T, H], index, weights)``."""
        flat = hidden.reshape(-1, hidden.shape[-1])
        index = top_k_index.reshape(flat.shape[0], -1)
        weights = top_k_weights.reshape(flat.shape[0], -1)
        deltas = flat.new_zeros(self.replicas, *flat.shape)
        routed = [(index == expert).nonzero() for expert in self.experts]  # (token, slot)
        counts = torch.tensor([len(pairs) for pairs in routed], device=flat.device)
        if int(counts.sum()) == 0:
            return deltas
        tokens = torch.cat([pairs[:, 0] for pairs in routed])
        replica = torch.repeat_interleave(torch.arange(self.replicas, device=flat.device), counts)
        rows = RowGroups.from_sorted(replica, self.replicas)
        digital = self._normed(self.digital(flat[tokens], rows, self.activation))
        start = 0
        for k, (pairs, group) in enumerate(zip(routed, self.analog, strict=True)):
            stop = start + len(pairs)
            if stop > start:
                single = RowGroups.single(len(pairs), flat.device)
                analog = self._normed(group(flat[pairs[:, 0]], single, self.activation))
                weight = weights[pairs[:, 0], pairs[:, 1]].unsqueeze(-1).to(analog.dtype)
                change = (analog - digital[start:stop]) * weight
                deltas[k].index_add_(0, pairs[:, 0], change.to(deltas.dtype))
            start = stop
        return deltas

    def _normed(self, outputs: torch.Tensor) -> torch.Tensor:
        return outputs if self.post_norm is None else self.post_norm(outputs)


def _repeat(value: Any, replicas: int) -> Any:
    """``value`` (a tensor with a batch dimension, or a tuple of them) for ``replicas``."""
    if isinstance(value, torch.Tensor):
        return value if replicas == 1 else value.repeat(replicas, *([1] * (value.dim() - 1)))
    if isinstance(value, tuple):
        return type(value)(_repeat(item, replicas) for item in value)
    return value


def _plus(value: Any, delta: torch.Tensor) -> Any:
    """``value + delta`` on the (first) tensor of ``value``, reshaped to it."""
    if isinstance(value, tuple):
        return type(value)((_plus(value[0], delta), *value[1:]))
    return value + delta.reshape(value.shape).to(value.dtype)


class _Replay(nn.Module):
    """Stands in for ``original``: ignores its inputs and returns ``output``; other attributes
    (e.g. a decoder layer's ``attention_type``, read by the model's loop) are the original's."""

    def __init__(self, output: Any, original: nn.Module) -> None:
        super().__init__()
        self.output = output
        object.__setattr__(self, "_original", original)  # not a submodule

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(object.__getattribute__(self, "_original"), name)

    def forward(self, *_args: Any, **_kwargs: Any) -> Any:
        return self.output


class LayerRecorder:
    """Records, during forwards, the outputs and run times of ``decoder_layers`` and the calls
    ``(args, kwargs, output)`` of ``experts`` (path -> module); one entry per forward."""

    def __init__(self, decoder_layers: nn.ModuleList, experts: dict[str, nn.Module]) -> None:
        self.layer_outputs: list[list[Any]] = []
        self.layer_seconds = [0.0] * len(decoder_layers)
        self.expert_calls: list[dict[str, tuple[tuple[Any, ...], dict[str, Any], Any]]] = []
        self.layer_calls: dict[int, tuple[tuple[Any, ...], dict[str, Any]]] = {}
        self.layer_calls_per_forward: list[list[int]] = []
        self.disordered = False
        self._handles: list[Any] = []
        self._layers = decoder_layers
        self._experts = experts
        self._started = 0.0

    def __enter__(self) -> LayerRecorder:
        for position, layer in enumerate(self._layers):
            self._handles.append(layer.register_forward_pre_hook(
                self._call_hook(position), with_kwargs=True))
            self._handles.append(layer.register_forward_hook(self._layer_hook(position)))
        for path, module in self._experts.items():
            self._handles.append(module.register_forward_hook(self._experts_hook(path),
                                                              with_kwargs=True))
        return self

    def __exit__(self, *_exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _call_hook(self, position: int) -> Any:
        def hook(_module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            if position == 0 or not self.layer_outputs:
                self.layer_outputs.append([])
                self.layer_calls_per_forward.append([0] * len(self._layers))
                self.expert_calls.append({})
            self.layer_calls.setdefault(position, (args, kwargs))  # first forward's call
            _synchronize(args[0] if args else None)
            self._started = time.perf_counter()

        return hook

    def _layer_hook(self, position: int) -> Any:
        def hook(_module: nn.Module, _args: tuple[Any, ...], output: Any) -> None:
            _synchronize(output[0] if isinstance(output, tuple) else output)
            self.layer_seconds[position] += time.perf_counter() - self._started
            self.layer_calls_per_forward[-1][position] += 1
            self.disordered |= len(self.layer_outputs[-1]) != position
            self.layer_outputs[-1].append(output)

        return hook

    @property
    def in_order(self) -> bool:
        """Whether every forward ran each decoder layer once, in order (what replaying
        assumes)."""
        return bool(self.layer_outputs) and not self.disordered and all(
            calls == [1] * len(self._layers) and len(outputs) == len(self._layers)
            for calls, outputs in zip(self.layer_calls_per_forward, self.layer_outputs,
                                      strict=True))

    def _experts_hook(self, path: str) -> Any:
        def hook(_module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any],
                 output: Any) -> None:
            self.expert_calls[-1][path] = (args, kwargs, output)

        return hook


def _synchronize(value: Any) -> None:
    """Wait for a GPU's queued work (so that per-layer times are real)."""
    if isinstance(value, torch.Tensor) and value.device.type == "cuda":
        torch.cuda.synchronize(value.device)


def output_is_additive(layer: nn.Module, experts: nn.Module,
                       call: tuple[tuple[Any, ...], dict[str, Any]], output: Any) -> bool:
    """Whether ``layer``'s output moves by exactly ``d`` when its ``experts`` output moves by a
    random ``d`` (a residual add after the MoE block, no norm after it): checked by running
    the layer once on its recorded ``call``."""
    generator = torch.Generator().manual_seed(0)
    offset: dict[str, torch.Tensor] = {}

    def shift(_module: nn.Module, _args: Any, result: Any) -> Any:
        if not isinstance(result, torch.Tensor):
            return result
        noise = torch.randn(result.shape, generator=generator, dtype=torch.float64)
        offset["delta"] = (noise * float(result.abs().amax()) + 1.0).to(result)
        return result + offset["delta"]

    handle = experts.register_forward_hook(shift)
    try:
        with torch.no_grad():
            moved = layer(*call[0], **call[1])
    finally:
        handle.remove()
    first = output[0] if isinstance(output, tuple) else output
    moved = moved[0] if isinstance(moved, tuple) else moved
    if "delta" not in offset or not isinstance(first, torch.Tensor):
        return False
    if not isinstance(moved, torch.Tensor) or moved.shape != first.shape:
        return False
    delta = offset["delta"]
    if delta.numel() != first.numel():
        return False
    first = first.detach()
    change = moved - first
    scale = float(delta.abs().amax()) + float(first.abs().amax())
    return bool((change - delta.reshape(change.shape)).abs().amax() <= 1e-4 * scale)


@contextlib.contextmanager
def replayed_tail(model: nn.Module, decoder_layers: nn.ModuleList, position: int,
                  experts_path: str, recorded_layers: list[Any],
                  recorded_experts: Any, deltas: torch.Tensor,
                  additive: bool) -> Iterator[None]:
    """Within the block, ``model`` run on ``K`` copies of the recorded window batch skips the
    decoder layers before ``position`` and (``additive``) the layer at ``position`` itself,
    whose output becomes the recorded one plus ``deltas [K, T, H]``; otherwise that layer
    runs with its experts module replaced by the recorded experts output plus ``deltas``."""
    replicas = deltas.shape[0]
    swaps: dict[int, nn.Module] = {}
    if additive:
        layer_output = _plus(_repeat(recorded_layers[position], replicas), deltas)
        for index in range(position + 1):
            swaps[index] = _Replay(layer_output, decoder_layers[index])
    else:
        before = _repeat(recorded_layers[position - 1], replicas) if position else None
        for index in range(position):
            swaps[index] = _Replay(before, decoder_layers[index])
    originals = {index: decoder_layers[index] for index in swaps}
    experts_swap = None
    if not additive:
        experts_output = _plus(_repeat(recorded_experts, replicas), deltas)
        experts = model.get_submodule(experts_path)
        experts_swap = (experts_path, experts, _Replay(experts_output, experts))
    try:
        for index, module in swaps.items():
            decoder_layers[index] = module
        if experts_swap is not None:
            _set(model, experts_swap[0], experts_swap[2])
        yield
    finally:
        for index, module in originals.items():
            decoder_layers[index] = module
        if experts_swap is not None:
            _set(model, experts_swap[0], experts_swap[1])


def _set(root: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, name = path.rpartition(".")
    parent = root.get_submodule(parent_path) if parent_path else root
    setattr(parent, name, module)
