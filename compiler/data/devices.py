"""Placing a model across devices (``--device-map auto|FILE.json``) with Hugging Face accelerate.

Rules:

1. ``auto``: accelerate's ``infer_auto_device_map`` over the GPUs, then the CPU, then disk
   (a checkpoint: ``from_pretrained(device_map="auto")``), never splitting the model's
   ``_no_split_modules`` (decoder layers).
2. ``FILE.json``: an object from module names (``""`` for the whole model) to a device: a GPU
   index or ``"cuda:N"``, ``"cpu"`` or ``"disk"``; every parameter must fall under a name. On
   a machine with GPUs, modules mapped to ``"cpu"`` or ``"disk"`` are offloaded: their
   weights stay there and are brought to the GPU for each call (accelerate's hooks).
3. Offloaded weights go to a temporary folder removed when the run ends.
4. The simulated model follows the placement: tiles are programmed on the device of the
   weights they come from, and offloaded modules are simulated from their weights at every
   call (:class:`hetmap.runtime.rewrite.BuiltOnCall`).
Every mistake in a map is one :class:`SimulationError` line naming the entry.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from hetmap.common.errors import SimulationError

DeviceMap = str | dict[str, int | str]


def read_device_map(value: str) -> DeviceMap:
    """Rule 1 or 2: ``"auto"`` or the checked contents of a JSON file."""
    if value == "auto":
        return "auto"
    path = Path(value)
    if not path.is_file():
        raise SimulationError(f"--device-map {value}: no such file; give 'auto' or a JSON file "
                              "mapping module names to devices")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise SimulationError(f"--device-map {value}: not a JSON file ({exc})") from exc
    if not isinstance(data, dict) or not data:
        raise SimulationError(f"--device-map {value}: must be a JSON object from module names to "
                              'devices, e.g. {"model.layers.0": 0, "lm_head": "cpu"}')
    return {str(name): _device(value, str(name), device) for name, device in data.items()}


def _device(source: str, name: str, device: Any) -> int | str:
    gpus = torch.cuda.device_count()
    index: int | None = None
    if isinstance(device, int) and not isinstance(device, bool):
        index = device
    elif isinstance(device, str) and device.startswith("cuda"):
        try:
            index = torch.device(device).index or 0
        except RuntimeError:
            index = None
            device = None
    elif device in ("cpu", "disk"):
        return str(device)
    if index is None:
        raise SimulationError(f"--device-map {source}: {name!r} maps to {device!r}; use a GPU "
                              "index, 'cuda:N', 'cpu' or 'disk'")
    if not 0 <= index < gpus:
        raise SimulationError(f"--device-map {source}: {name!r} maps to GPU {index}, but this "
                              f"machine has {gpus} GPU(s)")
    return index


def dispatched(loaded: Any, device_map: DeviceMap, offload_dir: Path) -> nn.Module:
    """``loaded`` (a :class:`~hetmap.compiler.frontend.loader.LoadedModel`) placed by
    ``device_map``: a checkpoint is loaded straight onto its devices; a model in memory is
    dispatched with its hooks (in place)."""
    import accelerate

    if loaded.checkpoint is not None and loaded.on_meta:
        return loaded.runnable(device_map=device_map, offload_folder=offload_dir)
    model = loaded.runnable()
    no_split = list(getattr(model, "_no_split_modules", None) or [])
    if device_map == "auto":
        device_map = accelerate.infer_auto_device_map(model, no_split_module_classes=no_split)
    assert isinstance(device_map, dict)
    _check_cover(model, device_map)
    try:
        return accelerate.dispatch_model(model, device_map=device_map, offload_dir=offload_dir)
    except (ValueError, KeyError, RuntimeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise SimulationError(f"--device-map: accelerate cannot place the model: {first}") from exc


def _check_cover(model: nn.Module, device_map: dict[str, Any]) -> None:
    """Rule 2: names are modules (or parameters) of the model, and cover every parameter."""
    names = {name for name, _ in model.named_modules()} | {
        name for name, _ in model.named_parameters()}
    for name in device_map:
        if name and name not in names:
            raise SimulationError(f"--device-map: {name!r} is not a module of the model (its "
                                  "top-level modules: "
                                  f"{', '.join(n for n, _ in model.named_children())})")
    for name, _ in model.named_parameters():
        if not any(not key or name == key or name.startswith(key + ".") for key in device_map):
            raise SimulationError(f"--device-map: parameter {name!r} has no device; add its "
                                  "module (or a parent) to the map")
