"""Latency profiles: measured on the device, and cached per device and checkpoint (replica start-up)."""

import torch

from elastic_core.model import ElasticConfig, ElasticEncoder
from elastic_core.profile import cached_profile


def tiny_model():
    cfg = ElasticConfig(vocab_size=1200, hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64,
                        sublms={"w100": [2, 64, 2], "w50": [1, 32, 2]})
    torch.manual_seed(0)
    return ElasticEncoder(cfg).eval()


def test_a_profile_is_measured_once_per_checkpoint_and_grid(tmp_path, monkeypatch):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "model.safetensors").write_bytes(b"weights")
    model, cache = tiny_model(), tmp_path / "cache"
    calls = []
    import elastic_core.profile as profile_module

    real = profile_module.measure_profile
    monkeypatch.setattr(profile_module, "measure_profile", lambda *a, **kw: calls.append(1) or real(*a, **kw))

    first = cached_profile(model, ckpt, cache, batches=(1, 4), seqs=(8, 16))
    assert first.sublms == ["w100", "w50"] and len(first.entries) == 8 and len(calls) == 1
    again = cached_profile(model, ckpt, cache, batches=(1, 4), seqs=(8, 16))
    assert again.entries == first.entries and len(calls) == 1       # read back, not measured
    cached_profile(model, ckpt, cache, batches=(1, 8), seqs=(8, 16))
    assert len(calls) == 2                                          # another grid is another table
    (ckpt / "model.safetensors").write_bytes(b"new weights!")
    cached_profile(model, ckpt, cache, batches=(1, 4), seqs=(8, 16))
    assert len(calls) == 3                                          # a changed checkpoint is measured again
    for damaged in cache.glob("*.json"):
        damaged.write_text("{not json")
    assert cached_profile(model, ckpt, cache, batches=(1, 4), seqs=(8, 16)).sublms == ["w100", "w50"]
    cached_profile(model, ckpt, None, batches=(1, 4), seqs=(8, 16))
    assert len(calls) == 5                                          # no cache: always measured
