"""Where every `passn bench` command writes its figures (``--out``): one JSON file."""

from __future__ import annotations

import json
from typing import Any


def write_result(path: str | None, result: dict[str, Any]) -> None:
    """A benchmark's figures as JSON at ``path`` (``--out``), when one is given."""
    if path:
        with open(path, "w") as f:
            json.dump(result, f, indent=2)
        print(f"wrote {path}")
