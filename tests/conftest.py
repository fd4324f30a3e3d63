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


@pytest.fixture(scope="session")
def redis_tls(tmp_path_factory):
    """A test CA (trustme) and a certificate for 127.0.0.1 it signed: redis-server's TLS files."""
    import trustme

    from deployments.local import RedisTLS

    tmp = tmp_path_factory.mktemp("redis-tls")
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    ca.cert_pem.write_to_path(str(tmp / "ca.pem"))
    cert.cert_chain_pems[0].write_to_path(str(tmp / "cert.pem"))
    cert.private_key_pem.write_to_path(str(tmp / "key.pem"))
    return RedisTLS(str(tmp / "cert.pem"), str(tmp / "key.pem"), str(tmp / "ca.pem"))
