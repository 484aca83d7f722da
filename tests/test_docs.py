"""The plugin guide's Python snippets run, in order, in one module namespace."""

from __future__ import annotations

import re
import sys
import types
from pathlib import Path

GUIDE = Path(__file__).resolve().parents[1] / "docs" / "plugins.md"


def test_plugin_guide_snippets_run(monkeypatch) -> None:
    blocks = re.findall(r"```python\n(.*?)```", GUIDE.read_text(), re.DOTALL)
    assert len(blocks) >= 3
    module = types.ModuleType("plugin_guide")
    monkeypatch.setitem(sys.modules, "plugin_guide", module)
    for block in blocks:
        exec(compile(block, str(GUIDE), "exec"), module.__dict__)  # noqa: S102 - our own docs
