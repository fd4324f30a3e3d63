"""Latency profiles: measured on the device, and cached per device and checkpoint (replica start-up)."""

import torch

from elastic_core.model import ElasticConfig, ElasticEncoder
from elastic_core.profile import cached_profile, measure_profile


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


def test_a_variant_slower_than_a_better_one_at_every_shape_is_dominated():
    from elastic_core.profile import LatencyProfile

    # ms at (batch 1, batch 32): bf16 pays off only in big batches (AMX), int8 is slower everywhere than w50
    times = {"w100": (2.0, 400.0), "w100-bf16": (3.0, 210.0), "w50": (1.5, 220.0), "w50-int8": (1.6, 300.0),
             "w50-bf16": (2.5, 120.0), "w25": (1.0, 128.0)}
    entries = [{"sublm": s, "batch": b, "seq": 16, "ms": ms} for s, pair in times.items() for b, ms in zip((1, 32), pair)]
    profile = LatencyProfile(device="test", entries=entries)
    assert profile.dominated(list(times)) == ["w50-int8"]
    # ranked last, what was a rival is dominated too: w100 is faster than w100-bf16 only at batch 1
    assert profile.dominated(["w100", "w50", "w100-bf16"]) == []
    assert profile.dominated(["w50", "w100"]) == ["w100"]


def test_a_cpu_timing_names_the_cpu_and_its_int8_bf16_kernels(monkeypatch):
    from elastic_core import precision, profile

    monkeypatch.setattr(profile, "cpu_model", lambda: "Intel Xeon Platinum 8480+")
    monkeypatch.setattr(precision, "cpu_flags", lambda: frozenset({"avx2", "avx512_vnni", "amx_int8", "amx_bf16"}))
    name = profile.device_name(torch.device("cpu"))
    assert name.startswith("cpu:Intel Xeon Platinum 8480+ [avx512_vnni amx_int8 amx_bf16] x")
    monkeypatch.setattr(precision, "cpu_flags", lambda: frozenset({"avx2"}))
    assert "[no VNNI, AMX or bf16]" in profile.device_name(torch.device("cpu"))  # an AVX2-only EPYC
    from loadtests.experiment import machine  # the load tests' results name the same

    assert machine(with_platform=False).startswith("Intel Xeon Platinum 8480+ [no VNNI, AMX or bf16] x")


def test_bf16_autocast_only_where_the_device_multiplies_bf16(monkeypatch):
    """The teacher cache and long training batches autocast to bf16 on AMX / AVX512-BF16 / a GPU; an AVX2-only CPU
    emulates bf16, several times slower than fp32, and stays in fp32."""
    from elastic_core import precision

    monkeypatch.setattr(precision, "cpu_flags", lambda: frozenset({"avx2", "amx_bf16"}))
    assert precision.native_bf16("cpu") and precision.native_bf16("cuda")
    monkeypatch.setattr(precision, "cpu_flags", lambda: frozenset({"avx2", "avx512_vnni"}))
    assert not precision.native_bf16("cpu") and precision.native_bf16("cuda")


def test_each_point_keeps_its_fastest_pass_so_a_burst_of_contention_does_not_skew_the_table(monkeypatch):
    """A burst during the first pass (a replica starting beside this one) doubles w100's times there; the
    second pass, measured after it, is what the table keeps, point by point."""
    import elastic_core.profile as profile_module

    calls = []

    def timed(model, sublm, batch, seq, repeats, warmup):
        calls.append(sublm)
        cost = {"w100": 10.0, "w50": 6.0}[sublm] * batch
        burst = len(calls) <= 4  # the first pass's w100 points
        return cost * (2 if burst else 1) + (0.5 if sublm == "w50" and len(calls) > 8 else 0.0)

    monkeypatch.setattr(profile_module, "time_forward_ms", timed)
    one = measure_profile(tiny_model(), batches=(1, 4), seqs=(8, 16), progress=False, passes=1)
    assert one.predict_ms("w100", 4, 16) == 80.0  # one pass: the burst stays in the table
    calls.clear()
    two = measure_profile(tiny_model(), batches=(1, 4), seqs=(8, 16), progress=False, passes=2)
    assert len(calls) == 16 and calls[:8] == calls[8:]  # the whole grid, twice over, in the same order
    assert two.predict_ms("w100", 4, 16) == 40.0 and two.predict_ms("w50", 4, 16) == 24.0  # each point's faster pass
