"""Access to the published test vectors in ``../shared/vectors`` (see its SOURCES.md)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
VECTORS_DIR = Path(os.environ.get("SIGND_VECTORS_DIR", REPO_ROOT.parent / "shared" / "vectors"))


def vector_path(name: str) -> Path:
    path = VECTORS_DIR / name
    if not path.exists():
        raise FileNotFoundError(f"test vector {name} not found in {VECTORS_DIR}")
    return path


def load_vectors(name: str) -> Any:
    """Parse one JSON vector file."""
    return json.loads(vector_path(name).read_text())
