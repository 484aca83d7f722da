"""Back ends. An emitter writes files for a compiled plan into the (staging) output directory:
``emit(plan, out_dir, **options) -> list[Path]``."""

from __future__ import annotations

from typing import Any


def builtin_emitters() -> dict[str, tuple[Any, str]]:
    emitters: dict[str, tuple[Any, str]] = {}
    try:
        from hetmap.compiler.backends.onnx_emitter import emit_onnx
    except ImportError:  # pragma: no cover - during bring-up only
        return emitters
    emitters["onnx"] = (emit_onnx, "ONNX graph with hetmap.* placement metadata (model.onnx)")
    return emitters
