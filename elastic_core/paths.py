"""Where things are, once: the repository's root (``data.py`` reads ``../shared/data`` from it), the
committed checkpoint every command and the replica default to, and which weights a checkpoint directory
holds. Standard library only, so the CLI, the replica's settings and the load tests may import it at no cost."""

from __future__ import annotations

import hashlib
from pathlib import Path

from .data import REPO_ROOT

DEFAULT_CHECKPOINT = REPO_ROOT / "models" / "elastic-minilm-l6"
WEIGHTS_FILE = "model.safetensors"


def weights_id(checkpoint: str | Path) -> str | None:
    """The first 16 hex digits of the SHA-256 of a checkpoint's weights (None without a weights file).

    A result names the checkpoint it measured by this as well as by path: the default checkpoint's directory
    receives each better backbone in turn, and a figure of the weights it held before must never be read as a
    figure of the weights it holds now. Hashing the 44 MB file takes about 0.1 s."""
    weights = Path(checkpoint) / WEIGHTS_FILE
    if not weights.exists():
        return None
    digest = hashlib.sha256()
    with weights.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()[:16]


__all__ = ["DEFAULT_CHECKPOINT", "REPO_ROOT", "WEIGHTS_FILE", "weights_id"]
