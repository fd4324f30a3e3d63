import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import pytest  # noqa: E402
import torch  # noqa: E402

from elastic_core.cli import DEFAULT_CHECKPOINT  # noqa: E402

torch.set_num_threads(2)

from elastic_core.data import DEFAULT_DATA_DIR as DATA_DIR  # noqa: E402,F401

SENTENCES = [
    "A man is playing a guitar on stage.",
    "Someone performs music with a guitar.",
    "The stock market fell sharply on Monday.",
    "Investors sold shares as prices dropped at the start of the week.",
    "Vitamin D deficiency is associated with bone loss.",
    "Low vitamin D levels can weaken bones.",
]


@pytest.fixture(scope="session")
def tokenizer():
    from elastic_core.model import load_tokenizer

    return load_tokenizer()


@pytest.fixture(scope="session")
def teacher():
    from elastic_core.model import load_bert

    return load_bert()


@pytest.fixture(scope="session")
def batch(tokenizer):
    return dict(tokenizer(SENTENCES, padding=True, return_tensors="pt", return_token_type_ids=False))


@pytest.fixture(scope="session")
def checkpoint_dir():
    """The committed default checkpoint (``ELASTICLM_CHECKPOINT`` points the tests at another one)."""
    path = Path(os.environ.get("ELASTICLM_CHECKPOINT", DEFAULT_CHECKPOINT))
    if not (path / "model.safetensors").exists():
        pytest.fail(f"no checkpoint at {path}")
    return path
