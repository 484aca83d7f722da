from __future__ import annotations

from pathlib import Path

import pytest

from hetmap.compiler.registry import Registries, load_registries

FIXTURES = Path(__file__).parent / "fixtures"
HANDWRITTEN = f"{FIXTURES / 'handwritten.py'}"
TINY = ["olmoe-tiny", "mixtral-tiny", "qwen2-moe-tiny", "deepseek-v2-tiny", "deepseek-v3-tiny"]


@pytest.fixture(scope="session")
def registries() -> Registries:
    return load_registries(plugins=False)
