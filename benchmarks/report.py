"""The one way a benchmark reports: its JSON printed, and written to ``--output`` if given."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def emit(report: dict[str, Any], output: str | Path | None, indent: int = 1) -> None:
    text = json.dumps(report, indent=indent)
    print(text)
    if output:
        Path(output).write_text(text + "\n")
