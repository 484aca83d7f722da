"""Weight access for passes: from a live module, or streamed from safetensors files.

:class:`CheckpointWeights` never loads a whole model: each :meth:`load` reads just the
requested slice (one expert of a fused tensor) from the shard that holds it (files stay open,
a few per thread, so that a shard's header is parsed once). It also
maps hetmap's fused-layout references onto the per-expert keys that ``save_pretrained``
writes (``experts.<e>.gate_proj.weight`` for ``experts.gate_up_proj[e][0:I]``).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import threading
from pathlib import Path
from typing import Any, Protocol, cast

import torch
from safetensors import safe_open
from torch import nn

from hetmap.common.errors import MissingDataError
from hetmap.compiler.ir.graph import WeightRef

_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16,
           "BF16": torch.bfloat16, "I64": torch.int64, "I32": torch.int32, "I16": torch.int16,
           "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
           "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}
_READ_BYTES = 1 << 30  # one positional read at most (Linux caps a read below 2 GiB)


class SafetensorsFile:
    """One safetensors file read with positional reads (``os.preadv``) into fresh tensors.

    The header is parsed once; a tensor (or a range of its leading index) is one read of its
    bytes: no memory map, so nothing read stays resident after the tensor is dropped, and
    threads can read the same file at once. Raises :class:`MissingDataError` for a file whose
    header cannot be read, a tensor outside the file, or a dtype it does not know.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            with path.open("rb") as handle:
                size = int.from_bytes(handle.read(8), "little")
                header = json.loads(handle.read(size))
        except (OSError, ValueError) as exc:
            raise MissingDataError(f"{path}: not a readable safetensors file ({exc})") from exc
        if not isinstance(header, dict):
            raise MissingDataError(f"{path}: not a readable safetensors file (bad header)")
        header.pop("__metadata__", None)
        self.start = 8 + size
        self.entries: dict[str, dict[str, Any]] = header
        self._fd = os.open(path, os.O_RDONLY)
        if hasattr(os, "posix_fadvise"):  # reads go mostly forward: a larger read-ahead
            os.posix_fadvise(self._fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            os.close(self._fd)

    def shape(self, key: str) -> list[int]:
        return list(self.entries[key]["shape"])

    def read(self, key: str, first: int | None = None, last: int | None = None
             ) -> torch.Tensor:
        """The tensor ``key``, or its rows ``first .. last - 1`` along the leading index."""
        entry = self.entries[key]
        dtype = _DTYPES.get(entry["dtype"])
        if dtype is None:
            raise MissingDataError(f"{self.path}: tensor {key!r} has dtype {entry['dtype']}, "
                                   "which hetmap does not read")
        shape = list(entry["shape"])
        begin, end = entry["data_offsets"]
        if first is not None and shape:
            row = (end - begin) // max(shape[0], 1)
            last = shape[0] if last is None else last
            begin, end = begin + first * row, begin + last * row
            shape[0] = last - first
        buffer = torch.empty(end - begin, dtype=torch.uint8)
        view = memoryview(cast(Any, buffer.numpy()))
        done = 0
        while done < end - begin:
            count = os.preadv(self._fd, [view[done:done + _READ_BYTES]],
                              self.start + begin + done)
            if count <= 0:
                raise MissingDataError(f"{self.path}: the file ends inside tensor {key!r} "
                                       "(truncated?)")
            done += count
        return buffer.view(dtype).reshape(shape)


class WeightStore(Protocol):
    def load(self, ref: WeightRef) -> torch.Tensor:
        """The referenced matrix, ``[out, in]`` (or vector for a bias), float32."""
        ...


class ModuleWeights:
    """Weights of an instantiated module (no copies: views of its parameters)."""

    def __init__(self, module: nn.Module) -> None:
        self.tensors: dict[str, torch.Tensor] = dict(module.named_parameters())
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


def _gate_first(key: str | None) -> int:
    return 0 if key is not None and ".gate_proj." in key else 1


_LEGACY_EXPERT_LEAVES = [(re.compile(r"\.experts\.(\d+)\.w1\."), r".experts.\1.gate_proj."),
                         (re.compile(r"\.experts\.(\d+)\.w3\."), r".experts.\1.up_proj."),
                         (re.compile(r"\.experts\.(\d+)\.w2\."), r".experts.\1.down_proj.")]


def _renamings(directory: Path) -> list[tuple[re.Pattern[str], str]]:
    """Hugging Face's own on-disk -> in-memory key renamings for this checkpoint's model type
    (e.g. Mixtral's ``block_sparse_moe`` -> ``mlp``), plus legacy expert leaf names."""
    rules: list[tuple[re.Pattern[str], str]] = []
    try:
        model_type = json.loads((directory / "config.json").read_text()).get("model_type")
        from transformers.conversion_mapping import get_checkpoint_conversion_mapping

        for rule in get_checkpoint_conversion_mapping(model_type) or []:
            if type(rule).__name__ == "WeightRenaming":
                rules.extend((re.compile(src), tgt) for src, tgt in
                             zip(rule.source_patterns, rule.target_patterns, strict=False))
    except (OSError, ValueError, ImportError, AttributeError):
        pass  # unknown layouts are read by their stored names only
    return rules + _LEGACY_EXPERT_LEAVES


class CheckpointWeights:
    """Streams tensors from the safetensors files of a checkpoint directory.

    Stored keys are mapped to the model's in-memory names with Hugging Face's renaming rules
    for the checkpoint's model type, so references use the names hetmap sees in the model.
    """

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        index = directory / "model.safetensors.index.json"
        stored: dict[str, Path] = {}
        if index.is_file():
            stored = {k: directory / v for k, v in json.loads(index.read_text())["weight_map"].items()}
        else:
            for file in sorted(directory.glob("*.safetensors")):
                with safe_open(str(file), "pt") as handle:
                    stored.update({k: file for k in handle.keys()})
        if not stored:
            raise MissingDataError(f"{directory} has no safetensors weights")
        rules = _renamings(directory)
        #: in-memory name -> (file, stored key)
        self.keys: dict[str, tuple[Path, str]] = {}
        for key, file in stored.items():
            name = key
            for pattern, replacement in rules:
                name = pattern.sub(replacement, name)
            self.keys[name] = (file, key)
        self.where = {name: file for name, (file, _key) in self.keys.items()}
        self._files: dict[Path, SafetensorsFile] = {}
        self._lock = threading.Lock()

    def _file(self, file: Path) -> SafetensorsFile:
        with self._lock:
            if file not in self._files:
                self._files[file] = SafetensorsFile(file)
            return self._files[file]

    def _read(self, key: str, expert: int | None, split: int | None = None) -> torch.Tensor:
        file, stored = self.keys[key]
        reader = self._file(file)
        if expert is None:
            return reader.read(stored)
        if split is None:
            return reader.read(stored, expert, expert + 1)[0]
        rows = reader.shape(stored)[0] // split  # flat stack [E * rows, ...]: expert e's rows
        return reader.read(stored, expert * rows, (expert + 1) * rows)

    def load(self, ref: WeightRef) -> torch.Tensor:
        if ref.tensor in self.where:
            tensor = self._read(ref.tensor, ref.expert, ref.split)
            return WeightRef(ref.tensor, None, ref.transposed, ref.out_start, ref.out_stop,
                             ref.out_step).select(tensor).float()  # type: ignore[union-attr]
        key = self._per_expert_key(ref)
        if key is None or key not in self.where:
            raise MissingDataError(f"{self.directory}: no tensor for {ref} in the checkpoint")
        return self._read(key, None).float()

    def load_full(self, name: str, shape: tuple[int, ...]) -> torch.Tensor | None:
        """A whole state-dict tensor; fused expert tensors are assembled from per-expert keys.

        Returns None when the checkpoint has no such tensor."""
        if name in self.where:
            return self._read(name, None)
        base, _, leaf = name.rpartition(".")
        if leaf.removesuffix("_bias") not in _PER_EXPERT or not shape:
            return None
        out: torch.Tensor | None = None  # filled expert by expert: no second copy
        for e in range(shape[0]):
            keys = sorted({self._per_expert_key(WeightRef(name, e, out_start=start))
                           for start in (None, 1)}, key=_gate_first)
            if any(k is None or k not in self.where for k in keys):
                return None
            offset = 0
            for key in keys:
                assert key is not None
                piece = self._read(key, None)
                if out is None:
                    out = piece.new_empty(shape).view(shape[0], -1)
                out[e, offset:offset + piece.numel()] = piece.reshape(-1)
                offset += piece.numel()
        return None if out is None else out.reshape(shape)

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
