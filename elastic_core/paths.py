"""Where things are, once: the repository's root (``data.py`` reads ``../shared/data`` from it) and the
committed checkpoint every command and the replica default to. Standard library only, so the CLI, the
replica's settings and the load tests may import it at no cost."""

from .data import REPO_ROOT

DEFAULT_CHECKPOINT = REPO_ROOT / "models" / "elastic-minilm-l6"

__all__ = ["DEFAULT_CHECKPOINT", "REPO_ROOT"]
