"""Checks of a safetensors checkpoint before and after loading, each naming the tensor and file.

1. Files: every shard the index names exists, and every file's header reads (a truncated or
   overwritten file is refused naming the file).
2. Shapes: every stored tensor that the model has under the same name (after Hugging Face's
   own key renamings) has the shape the model's config gives it.
3. Values: after loading, every parameter is finite; the first NaN/Inf tensor is named with
   the file it came from.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from torch import nn

from hetmap.common.errors import ModelLoadError


def _files(directory: Path) -> list[Path]:
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise ModelLoadError(f"{index} is damaged ({type(exc).__name__}): re-save the "
                                 "checkpoint") from exc
        files = sorted({directory / name for name in weight_map.values()})
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise ModelLoadError(f"{directory}: shard {missing[0]} named by "
                                 f"model.safetensors.index.json is missing"
                                 f"{f' (and {len(missing) - 1} more)' if len(missing) > 1 else ''}")
        return files
    return sorted(directory.glob("*.safetensors"))


def check_files(directory: Path, expected: dict[str, tuple[int, ...]] | None = None) -> None:
    """Rules 1 and 2: ``expected`` maps the model's tensor names to their shapes."""
    from safetensors import SafetensorError, safe_open

    from hetmap.compiler.data.weights import CheckpointWeights

    for file in _files(directory):
        try:
            with safe_open(str(file), "pt") as handle:
                handle.keys()
        except (SafetensorError, OSError) as exc:
            first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise ModelLoadError(f"{file} is damaged ({first}): re-save or re-download the "
                                 "checkpoint") from exc
    if not expected:
        return
    try:
        weights = CheckpointWeights(directory)
    except Exception as exc:  # the files were readable above; report anything else briefly
        raise ModelLoadError(f"cannot read {directory}: {exc}") from exc
    for name, (file, key) in sorted(weights.keys.items()):
        found = expected.get(name)
        per_expert = found is None
        shape = _per_expert_shape(name, expected) if found is None else found
        if shape is None:
            continue
        with safe_open(str(file), "pt") as handle:
            stored = tuple(handle.get_slice(key).get_shape())
        # one expert's slice of a fused tensor may be stored transposed: compare sizes then
        mismatch = (_numel(stored) != _numel(shape)) if per_expert else stored != tuple(shape)
        if mismatch:
            raise ModelLoadError(f"tensor {key!r} in {file} has shape {list(stored)}, but the "
                                 f"model's config.json makes it {list(shape)}: the checkpoint "
                                 "does not match its config")


_EXPERT_KEY = re.compile(r"^(?P<base>.*\.experts)\.(?P<e>\d+)\.(?P<proj>\w+)\.weight$")


def _per_expert_shape(name: str, expected: dict[str, tuple[int, ...]]) -> tuple[int, ...] | None:
    """The shape one expert's matrix ``<base>.experts.<e>.<proj>.weight`` takes in the model's
    fused ``[E, ...]`` expert tensor, if the model fuses it."""
    match = _EXPERT_KEY.match(name)
    if match is None:
        return None
    base, proj = match["base"], match["proj"]
    fused = expected.get(f"{base}.{proj}")
    if fused is not None and len(fused) == 3:
        return tuple(fused[1:])
    both = expected.get(f"{base}.gate_up_proj")
    if proj in ("gate_proj", "up_proj") and both is not None and len(both) == 3:
        return (both[1] // 2, both[2]) if both[1] % 2 == 0 else None
    return None


def _numel(shape: tuple[int, ...]) -> int:
    total = 1
    for size in shape:
        total *= size
    return total


def check_finite(module: nn.Module, directory: Path | None) -> None:
    """Rule 3: the first parameter or buffer holding NaN or Inf, named with its file."""
    where: dict[str, Path] = {}
    if directory is not None:
        from hetmap.compiler.data.weights import CheckpointWeights

        try:
            where = CheckpointWeights(directory).where
        except Exception:  # naming the file is a courtesy; the tensor name is enough
            where = {}
    with torch.no_grad():
        for name, tensor in [*module.named_parameters(), *module.named_buffers()]:
            if tensor.is_floating_point() and not tensor.is_meta and not bool(
                    torch.isfinite(tensor).all()):
                bad = "NaN" if bool(torch.isnan(tensor).any()) else "Inf"
                prefix = name.rsplit(".", 1)[0] + "."
                file = where.get(name) or next(
                    (f for n, f in where.items() if n.startswith(prefix)), None)
                raise ModelLoadError(f"tensor {name!r}{f' in {file}' if file else ''} holds {bad} "
                                     "values: the checkpoint is damaged or was saved from a "
                                     "diverged run")
