"""Weight access for passes: from a live module, or streamed from safetensors files.

:class:`CheckpointWeights` never loads a whole model: each :meth:`load` opens the shard that
holds the tensor and reads just the requested slice (one expert of a fused tensor). It also
maps hetmap's fused-layout references onto the per-expert keys that ``save_pretrained``
writes (``experts.<e>.gate_proj.weight`` for ``experts.gate_up_proj[e][0:I]``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Protocol

import torch
from safetensors import safe_open
from torch import nn

from hetmap.compiler.errors import MissingDataError
from hetmap.compiler.ir import WeightRef


class WeightStore(Protocol):
    def load(self, ref: WeightRef) -> torch.Tensor:
        """The referenced matrix, ``[out, in]`` (or vector for a bias), float32."""
        ...


class ModuleWeights:
    """Weights of an instantiated module (no copies: views of its parameters)."""

    def __init__(self, module: nn.Module) -> None:
        self.tensors = dict(module.named_parameters())
        self.tensors.update(dict(module.named_buffers()))

    def load(self, ref: WeightRef) -> torch.Tensor:
        tensor = self.tensors.get(ref.tensor)
        if tensor is None:
            raise MissingDataError(f"the model has no tensor {ref.tensor!r}")
        if tensor.is_meta:
            raise MissingDataError(f"tensor {ref.tensor!r} has no data (meta device)")
        return ref.select(tensor.detach()).float()  # type: ignore[no-any-return,union-attr]


_PER_EXPERT = {"gate_up_proj": ("gate_proj", "up_proj"), "up_proj": ("up_proj", "up_proj"),
               "down_proj": ("down_proj", "down_proj")}


class CheckpointWeights:
    """Streams tensors from the safetensors files of a checkpoint directory."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        index = directory / "model.safetensors.index.json"
        if index.is_file():
            self.where = {k: directory / v for k, v in json.loads(index.read_text())["weight_map"].items()}
        else:
            self.where = {}
            for file in sorted(directory.glob("*.safetensors")):
                with safe_open(str(file), "pt") as handle:
                    self.where.update({k: file for k in handle.keys()})
        if not self.where:
            raise MissingDataError(f"{directory} has no safetensors weights")

    def _read(self, key: str, expert: int | None) -> torch.Tensor:
        with safe_open(str(self.where[key]), "pt") as handle:
            view = handle.get_slice(key)
            return view[expert] if expert is not None else view[:]

    def load(self, ref: WeightRef) -> torch.Tensor:
        if ref.tensor in self.where:
            tensor = self._read(ref.tensor, ref.expert)
            return WeightRef(ref.tensor, None, ref.transposed, ref.out_start, ref.out_stop,
                             ref.out_step).select(tensor).float()  # type: ignore[union-attr]
        key = self._per_expert_key(ref)
        if key is None or key not in self.where:
            raise MissingDataError(f"{self.directory}: no tensor for {ref} in the checkpoint")
        return self._read(key, None).float()

    @staticmethod
    def _per_expert_key(ref: WeightRef) -> str | None:
        if ref.expert is None or ref.transposed or ref.out_step != 1:
            return None
        base, _, leaf = ref.tensor.rpartition(".")
        is_bias = leaf.endswith("_bias")
        leaf = leaf.removesuffix("_bias")
        if leaf not in _PER_EXPERT:
            return None
        first, second = _PER_EXPERT[leaf]
        name = first if not ref.out_start else second
        return f"{base}.{ref.expert}.{name}.{'bias' if is_bias else 'weight'}"
