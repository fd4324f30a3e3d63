"""Precision variants (``elastic_core/precision.py``): int8 / bf16 SubLMs close to their fp32 structure, their
lowered matrices true to the slicing, declared in the config, ranked by quality in the schedule, profiled and
named in answers like any other SubLM."""

import asyncio
import json
import shutil

import pytest
import torch
import torch.nn.functional as F

from elastic_core.model import ElasticConfig, ElasticEncoder, load_checkpoint, load_config, save_checkpoint
from elastic_core.precision import (VNNI, Int8Linear, LoweredCache, cpu_flags, int8_engine, precision_variants,
                                    quantize_per_channel, weights_stamp)
from elastic_core.profile import LatencyProfile, cached_profile
from elastic_core.schedule import DepthReading, ElasticSchedule

pytestmark = pytest.mark.fast

LADDER = {"w100": [4, 256, 2], "w50": [2, 128, 2], "w25": [1, 64, 2]}


def structures(config: dict) -> dict:
    """A checkpoint config's trained structures (its declared ladder without precision variants)."""
    return {name: entry for name, entry in config["sublms"].items() if len(entry) == 3}


def tiny_model(sublms=None, seed=0) -> ElasticEncoder:
    variants = precision_variants(precision_variants(LADDER, ["w100", "w50"]), ["w100"], "bf16")
    cfg = ElasticConfig(vocab_size=1200, hidden_size=64, num_layers=2, num_heads=4, intermediate_size=256,
                        max_position_embeddings=64, sublms=sublms or variants)
    torch.manual_seed(seed)
    return ElasticEncoder(cfg).eval()


def tiny_batch(seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000, 1200, (5, 16), generator=g)
    mask = torch.ones_like(ids)
    for row, length in enumerate([16, 3, 9, 12, 1]):
        mask[row, length:] = 0
    return ids, mask


# ----------------------------------------------------------------------------- the variants
def test_variants_sit_right_after_their_structure():
    model = tiny_model()
    assert model.config.sublm_names == ["w100", "w100-bf16", "w100-int8", "w50", "w50-int8", "w25"]
    s = model.config.sublm("w50-int8")
    assert (s.heads, s.ffn, s.layers, s.precision) == (2, 128, 2, "int8")
    assert model.config.sublm("w50").precision == "fp32"
    assert list(model.config.trained_sublms()) == ["w100", "w50", "w25"]  # training never runs a variant


@pytest.mark.parametrize("variant,floor", [("w100-int8", 0.99), ("w50-int8", 0.99), ("w100-bf16", 0.999)])
def test_a_variant_stays_close_to_its_fp32_sublm(variant, floor):
    model, (ids, mask) = tiny_model(), tiny_batch()
    with torch.inference_mode():
        ref = model.embed(ids, mask, sublm=variant.split("-")[0], packed=True)
        low = model.embed(ids, mask, sublm=variant, packed=True)
        padded = model.embed(ids, mask, sublm=variant)
    assert F.cosine_similarity(low, ref).min() >= floor
    assert not torch.equal(low, ref)  # it did run in another precision
    if variant.endswith("bf16"):  # packing computes the same function
        torch.testing.assert_close(padded, low, atol=1e-5, rtol=1e-5)
    else:  # but the padding's own activations take part in int8's one scale per call
        assert F.cosine_similarity(padded, low).min() >= 0.99


def test_int8_quantizes_per_output_channel_so_a_row_prefix_is_the_prefix_of_the_whole():
    w = torch.randn(96, 40)
    values, scale = quantize_per_channel(w)
    head_values, head_scale = quantize_per_channel(w[:24])
    assert torch.equal(head_values, values[:24]) and torch.equal(head_scale, scale[:24])
    assert values.dtype == torch.int8 and values.abs().max() == 127
    torch.testing.assert_close(values.float() * scale[:, None], w, atol=scale.max().item() / 2, rtol=0)
    # the model's lowered w50 query is the first rows of w100's (a column prefix gets scales of its own)
    model = tiny_model()
    w100, w50 = (model.lowered.get(model.layers, model.config.sublm(n)).layers[0] for n in ("w100-int8", "w50-int8"))

    def unpacked(linear):
        return torch.ops.quantized.linear_unpack(linear.packed)[0]

    assert torch.equal(unpacked(w50["query"]).int_repr(), unpacked(w100["query"]).int_repr()[:32])
    assert unpacked(w50["ffn_out"]).shape == (64, 128)


def test_an_int8_text_depends_only_slightly_on_its_batch_mates():
    """One activation scale per call (dynamic, per tensor): a text's steps follow its batch's largest value."""
    model, (ids, mask) = tiny_model(), tiny_batch()
    with torch.inference_mode():
        together = model.embed(ids, mask, sublm="w100-int8", packed=True)
        alone = torch.cat([model.embed(ids[i:i + 1, :int(mask[i].sum())], mask[i:i + 1, :int(mask[i].sum())],
                                       sublm="w100-int8", packed=True) for i in range(len(ids))])
    assert F.cosine_similarity(together, alone).min() >= 0.99


def test_int8_linear_matches_fp32_on_any_leading_shape():
    w, b, x = torch.randn(48, 32), torch.randn(48), torch.randn(2, 7, 32)
    y = Int8Linear(w, b)(x)
    assert y.shape == (2, 7, 48) and y.dtype == torch.float32
    # with VNNI (or AMX) the int8 sums are exact; without, oneDNN keeps them from saturating by halving the
    # weights' range (7 bits), which Gaussian matrices feel more than the model does (0.988 on an AVX2 EPYC)
    floor = 0.999 if (VNNI | {"amx_int8"}) & cpu_flags() else 0.98
    assert F.cosine_similarity(y.reshape(-1, 48), F.linear(x, w, b).reshape(-1, 48)).min() > floor
    assert int8_engine() in ("onednn", "x86")
    assert F.cosine_similarity(Int8Linear(w, b, engine="x86")(x).reshape(-1, 48), y.reshape(-1, 48)).min() > floor


def test_lowered_matrices_follow_every_change_of_the_weights():
    """A cache, never stale: an in-place edit, load_state_dict or merged adapter rebuilds it on next use."""
    model, (ids, mask) = tiny_model(), tiny_batch()
    sizes = model.prepare()
    assert set(sizes) == {"w100-int8", "w100-bf16", "w50-int8"}
    assert sizes["w50-int8"] < sizes["w100-int8"] < sizes["w100-bf16"]
    with torch.inference_mode():
        before = model.embed(ids, mask, sublm="w50-int8")
    stamp = weights_stamp(model.layers)
    with torch.no_grad():
        model.layers[0].ffn_in.weight[:64] *= 2  # inside w50's prefix
    assert weights_stamp(model.layers) != stamp
    with torch.inference_mode():
        after = model.embed(ids, mask, sublm="w50-int8")
        ref = model.embed(ids, mask, sublm="w50")
    assert not torch.allclose(before, after, atol=1e-3)
    assert F.cosine_similarity(after, ref).min() >= 0.99
    model.load_state_dict(tiny_model(seed=3).state_dict())
    with torch.inference_mode():
        torch.testing.assert_close(model.embed(ids, mask, sublm="w50-int8"),
                                   tiny_model(seed=3).embed(ids, mask, sublm="w50-int8"))
    cache = LoweredCache()
    assert cache.get(model.layers, model.config.sublm("w50")) is None  # fp32 runs on the weights themselves


def test_a_variant_is_for_inference_only():
    model, (ids, mask) = tiny_model(), tiny_batch()
    model.requires_grad_(True)
    with pytest.raises(ValueError, match="inference variant"):
        model.embed(ids, mask, sublm="w50-int8")
    with torch.no_grad():
        model.embed(ids, mask, sublm="w50-int8")


# ----------------------------------------------------------------------------- the checkpoint config
def test_the_config_round_trips_and_old_checkpoints_load(tmp_path):
    model, (ids, mask) = tiny_model(), tiny_batch()
    save_checkpoint(model, tmp_path / "new", dtype=torch.float32)
    assert json.loads((tmp_path / "new" / "elastic_config.json").read_text())["sublms"]["w50-int8"] == [2, 128, 2, "int8"]
    loaded = load_checkpoint(tmp_path / "new")
    assert loaded.config.sublms == model.config.sublms and loaded.config.sublm_names == model.config.sublm_names
    with torch.inference_mode():
        torch.testing.assert_close(loaded.embed(ids, mask, sublm="w50-int8"), model.embed(ids, mask, sublm="w50-int8"))
    # a checkpoint written before precision existed: three numbers per SubLM, all fp32
    old = json.loads((tmp_path / "new" / "elastic_config.json").read_text()) | {"sublms": LADDER}
    (tmp_path / "new" / "elastic_config.json").write_text(json.dumps(old))
    assert [load_config(tmp_path / "new").sublm(n).precision for n in LADDER] == ["fp32"] * 3
    with pytest.raises(ValueError, match="unknown precision 'int4'"):
        ElasticConfig(sublms={"w100": [4, 256, 2], "w100-int4": [4, 256, 2, "int4"]})
    with pytest.raises(ValueError, match="expected"):
        ElasticConfig(sublms={"w100": [4, 256]})
    with pytest.raises(ValueError, match=r"variants \['w50-int8'\] need their structure declared in fp32"):
        ElasticConfig(sublms={"w100": [4, 256, 2], "w50-int8": [2, 128, 2, "int8"]})


def test_a_declared_variant_is_profiled_even_with_a_cached_table(tmp_path):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "model.safetensors").write_bytes(b"weights")
    model = tiny_model(LADDER)
    assert cached_profile(model, ckpt, tmp_path, (1, 2), (8,)).sublms == list(LADDER)
    model.config.sublms = precision_variants(LADDER, ["w50"])  # the same weights, a variant declared since
    assert cached_profile(model, ckpt, tmp_path, (1, 2), (8,)).sublms == ["w100", "w50", "w50-int8", "w25"]


# ----------------------------------------------------------------------------- the schedule's quality order
# Ranked by measured quality, best first; a precision variant has the speed of a smaller structure and the
# quality of a larger one, so neither name nor size orders this ladder.
RANKING = ["w100", "w100-int8", "w50", "w50-int8", "w25"]
MS_PER_TEXT = {"w100": 4.0, "w100-int8": 2.0, "w50": 2.2, "w50-int8": 1.1, "w25": 1.0}


def ranked_schedule(sublms=RANKING, ms=MS_PER_TEXT):
    entries = [{"sublm": s, "batch": b, "seq": q, "ms": ms[s] * b} for s in sublms for b in (1, 64) for q in (8, 512)]
    return ElasticSchedule(LatencyProfile("test", entries), list(sublms), ranking=RANKING, choice_quantile=0,
                           calibration_alpha=0)


def test_a_quality_floor_orders_by_rank_not_by_name_or_size():
    s = ranked_schedule()
    assert s.allowed("w100-int8") == ["w100", "w100-int8"]              # w50 is not "at least w100-int8"
    assert s.allowed("w50") == ["w100", "w100-int8", "w50"]              # w50-int8, the same size, is below it
    assert s.allowed("w50-int8") == RANKING[:4]
    assert s.strictest(["w50-int8", None, "w100-int8", "w50"]) == "w100-int8"
    assert s.strictest(["w25", "w50-int8"]) == "w50-int8"


def test_the_choice_walks_the_ranking_and_falls_back_to_the_fastest():
    s, idle = ranked_schedule(), DepthReading(0, 1, True)
    # 10 texts: w100 40 ms, w100-int8 20 ms, w50 22 ms, w50-int8 11 ms, w25 10 ms
    assert s.choose([32] * 10, idle, target_ms=40).sublm == "w100"
    assert s.choose([32] * 10, idle, target_ms=30).sublm == "w100-int8"  # best that fits, though w50 too fits
    assert s.choose([32] * 10, idle, target_ms=21).sublm == "w100-int8"
    assert s.choose([32] * 10, idle, target_ms=15).sublm == "w50-int8"
    assert s.choose([32] * 10, idle, target_ms=1).sublm == "w25"
    # this ladder is not ordered by speed (w50 ranks below w100-int8 but is slower): when nothing a floor allows
    # fits, the fastest allowed runs, not the last ranked, and admission counts on that one too
    assert s.choose([32] * 10, idle, target_ms=15, min_sublm="w50").sublm == "w100-int8"
    assert s.alone_ms(10, 320, min_sublm="w50") == pytest.approx(20.0)
    assert s.alone_ms(10, 320) == pytest.approx(10.0)


def test_a_tied_variant_yields_to_its_structure_at_the_shapes_where_it_is_slower():
    """w50-int8 ties with w50 (ranked above it for its batch-32 speed); at one short text its quantization of the
    activations makes it the slower, and there the schedule tries w50 first: same quality, less time."""
    ranking = ["w100", "w50-int8", "w50", "w25"]
    ms = {("w100", 1): 8.0, ("w100", 32): 160.0, ("w50-int8", 1): 6.7, ("w50-int8", 32): 40.0,
          ("w50", 1): 5.4, ("w50", 32): 70.0, ("w25", 1): 3.0, ("w25", 32): 30.0}
    entries = [{"sublm": k, "batch": b, "seq": q, "ms": t} for (k, b), t in ms.items() for q in (8, 512)]
    s = ElasticSchedule(LatencyProfile("test", entries), ranking, ranking=ranking, ties={"w50-int8": "w50"},
                        choice_quantile=0, calibration_alpha=0)
    idle = DepthReading(0, 1, True)
    assert s.by_speed_within_ties(ranking, [16]) == ["w100", "w50", "w50-int8", "w25"]
    assert s.by_speed_within_ties(ranking, [16] * 32) == ranking
    assert s.choose([16], idle, target_ms=7).sublm == "w50"               # both fit: the faster of the tie
    assert s.choose([16] * 32, idle, target_ms=100).sublm == "w50-int8"   # at batch 32 the variant is the faster
    assert s.choose([16], idle, target_ms=7, min_sublm="w50-int8").sublm == "w50"  # a floor keeps its tie
    with pytest.raises(ValueError, match="ties"):
        ElasticSchedule(LatencyProfile("test", entries), ranking, ranking=ranking, ties={"w75-int8": "w75"})


def test_the_checkpoint_declares_a_variant_ranked_above_its_structure_a_tie():
    config = ElasticConfig(sublms={"w100-int8": [12, 1536, 6, "int8"], "w100": [12, 1536, 6], "w50": [6, 768, 6],
                                   "w50-int8": [6, 768, 6, "int8"], "w25-bf16": [3, 384, 6, "bf16"],
                                   "w25": [3, 384, 6]})
    assert config.tied_variants() == {"w100-int8": "w100", "w25-bf16": "w25"}  # w50-int8 ranks below w50: no tie


# ----------------------------------------------------------------------------- serving
def test_answers_name_the_variant_that_served(tmp_path, checkpoint_dir):
    """The committed checkpoint with w50-int8 declared: under a queue w50 cannot drain in T, w50-int8 can, and
    the answer says so; a floor of w50 keeps it off w50-int8 (same size, lower rank)."""
    from conftest import TEXTS, GhostDepth

    from deployments.config import ReplicaConfig
    from deployments.contract import TaskRequest
    from deployments.core import ServingCore

    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "model.safetensors").symlink_to((checkpoint_dir / "model.safetensors").resolve())
    config = json.loads((checkpoint_dir / "elastic_config.json").read_text())
    config["sublms"] = precision_variants(structures(config), ["w50"])
    (ckpt / "elastic_config.json").write_text(json.dumps(config))
    assert list(config["sublms"]) == ["w100", "w75", "w50", "w50-int8", "w25"]
    ms = {"w100": 10.0, "w75": 6.0, "w50": 3.0, "w50-int8": 2.0, "w25": 1.0}
    profile = tmp_path / "profile.json"
    profile.write_text(json.dumps({"device": "synthetic", "entries": [
        {"sublm": s, "batch": b, "seq": q, "ms": t * b} for s, t in ms.items() for b in (1, 64) for q in (8, 512)]}))
    depth = GhostDepth()
    core = ServingCore.build(ReplicaConfig(checkpoint=str(ckpt), tasks=("embed",), profile_path=str(profile),
                                           target_ms=1000.0, calibration_alpha=0), "test", lambda task: depth)

    async def serve(**kw):
        return await core.serve(TaskRequest("embed", list(TEXTS), **kw))

    async def run():
        core.start()
        try:
            # 3 texts + 400 behind (800 ghost texts over 2 replicas): w50 403 x 3 ms misses 1000 ms, w50-int8 fits
            depth.ghost = 800
            degraded, floored = await serve(), await serve(min_sublm="w50")
            depth.ghost = 0
            return degraded, floored, await serve()
        finally:
            await core.close()

    degraded, floored, idle = asyncio.run(run())
    assert (degraded.sublm, floored.sublm, idle.sublm) == ("w50-int8", "w50", "w100")
    denser = core.models["embed"]
    torch.testing.assert_close(torch.from_numpy(degraded.embeddings),
                               torch.from_numpy(denser.encode(TEXTS, sublm="w50-int8")), atol=1e-4, rtol=0)
    assert core.validator.options("w50-int8", None)["min_sublm"] == "w50-int8"
    assert core.describe()["sublms"] == ["w100", "w75", "w50", "w50-int8", "w25"]
    shutil.rmtree(ckpt)


def test_a_variant_ranked_above_its_structure_leaves_where_the_structure_is_as_fast():
    """The committed front ranks w100-bf16 above w100 (equal quality within the lowering's noise, faster with
    AMX). On a CPU without bf16 kernels the variant is slower everywhere: its own structure drops it, though ranked
    below it; a variant faster anywhere (w50-bf16 in a batch) stays."""
    per_text = {"w100-bf16": (20.0, 20.0), "w100": (10.0, 10.0), "w50-bf16": (4.0, 1.5), "w50": (3.0, 3.0)}
    profile = LatencyProfile(device="synthetic", entries=[
        {"sublm": s, "batch": b, "seq": q, "ms": t[b > 1] * b} for s, t in per_text.items() for b in (1, 64)
        for q in (8, 512)])
    ladder = list(per_text)
    assert profile.dominated(ladder) == []  # by rank alone nothing better is faster
    assert profile.dominated(ladder, {"w100-bf16": "w100", "w50-bf16": "w50"}) == ["w100-bf16"]


def test_a_replica_drops_the_variants_its_device_makes_pointless(tmp_path, checkpoint_dir):
    """A variant slower than a better-ranked SubLM at every profiled shape leaves the replica's ladder; one
    that pays off anywhere stays; a model cast to bf16 as a whole serves the trained structures only."""
    from deployments.config import ReplicaConfig
    from deployments.core import ServingCore

    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "model.safetensors").symlink_to((checkpoint_dir / "model.safetensors").resolve())
    config = json.loads((checkpoint_dir / "elastic_config.json").read_text())
    config["sublms"] = precision_variants(precision_variants(structures(config), ["w50"]), ["w75"], "bf16")
    (ckpt / "elastic_config.json").write_text(json.dumps(config))
    assert list(config["sublms"]) == ["w100", "w75", "w75-bf16", "w50", "w50-int8", "w25"]
    # per text at batch 1 and 64: w75-bf16 is slower than w75 alone but faster in a batch; w50-int8 never beats w50
    ms = {"w100": (10.0, 10.0), "w75": (6.0, 6.0), "w75-bf16": (7.0, 3.0), "w50": (3.0, 3.0), "w50-int8": (3.5, 3.0),
          "w25": (1.0, 1.0)}
    profile = tmp_path / "profile.json"
    profile.write_text(json.dumps({"device": "synthetic", "entries": [
        {"sublm": s, "batch": b, "seq": q, "ms": t[b > 1] * b} for s, t in ms.items() for b in (1, 64)
        for q in (8, 512)]}))
    args = dict(checkpoint=str(ckpt), tasks=("embed",), profile_path=str(profile))
    assert ServingCore.build(ReplicaConfig(**args)).describe()["sublms"] == ["w100", "w75", "w75-bf16", "w50", "w25"]
    named = ["w100", "w50", "w50-int8"]  # a ladder named by hand is served as named
    assert ServingCore.build(ReplicaConfig(**args, sublms=named)).describe()["sublms"] == named
    whole = ServingCore.build(ReplicaConfig(**args, dtype="bfloat16"))
    assert whole.describe()["sublms"] == ["w100", "w75", "w50", "w25"]
    # a table that does not time a declared SubLM (written before the variants were): it leaves the ladder;
    # a ladder named by hand must be timed whole
    old = tmp_path / "old-profile.json"
    old.write_text(json.dumps({"device": "synthetic", "entries": [
        e for e in json.loads(profile.read_text())["entries"] if e["sublm"] != "w75-bf16"]}))
    untimed = dict(args, profile_path=str(old))
    assert ServingCore.build(ReplicaConfig(**untimed)).describe()["sublms"] == ["w100", "w75", "w50", "w25"]
    with pytest.raises(ValueError, match=r"no t_k for SubLMs \['w75-bf16'\]"):
        ServingCore.build(ReplicaConfig(**untimed, sublms=["w100", "w75-bf16"]))
    with pytest.raises(ValueError, match=r"variants \['w50-int8'\] lower their own matrices"):
        ServingCore.build(ReplicaConfig(**args, sublms=named, dtype="bfloat16"))
    shutil.rmtree(ckpt)


# ----------------------------------------------------------------------------- the front over structure x precision
def test_the_benchmark_keeps_the_front_and_declares_it_best_first(tmp_path):
    """benchmarks/precision.py: a variant slower and worse than another is dropped; the kept ladder is written
    best first with the fp32 structure of every kept variant, and loads."""
    from benchmarks.ladder import keep, pareto_front
    from benchmarks.precision import markdown, variant_checkpoint, write_ladder

    source = tmp_path / "source"
    save_checkpoint(tiny_model(LADDER), source)
    ckpt = variant_checkpoint(source, tmp_path / "variants", ["bf16", "int8"], ["w100", "w50"])
    assert load_config(ckpt).sublm_names == ["w100", "w100-bf16", "w100-int8", "w50", "w50-bf16", "w50-int8", "w25"]
    assert (ckpt / "model.safetensors").resolve() == (source / "model.safetensors").resolve()

    # (latency ms, quality): w50 is slower and worse than w100-int8, w25 no faster and worse than w50-int8
    measured = {"w100": (100, 1.0), "w100-int8": (50, 0.98), "w50": (52, 0.93), "w50-int8": (27, 0.92),
                "w25": (27, 0.85)}
    structure = {n: n.split("-")[0] for n in measured}
    candidates = {n: {"latency_ms_b32_s128": ms, "quality": q, "structure": structure[n], "precision":
                      "int8" if "-" in n else "fp32", "heads_ffn_layers": LADDER[structure[n]]}
                  for n, (ms, q) in measured.items()}
    front = pareto_front(candidates)
    assert front == ["w100", "w100-int8", "w50-int8"]
    result = {"candidates": candidates, "front": front, "kept": keep(front, candidates, 5)}
    write_ladder(tmp_path / "kept", source, result)
    written = load_config(tmp_path / "kept")
    assert written.sublm_names == ["w100", "w100-int8", "w50", "w50-int8"]  # w50 stays: w50-int8 runs its weights
    assert written.sublm("w50-int8").precision == "int8" and list(written.trained_sublms()) == ["w100", "w50"]
    assert written.quality == {n: measured[n][1] for n in written.sublm_names}  # what overload trades against cost

    report = markdown({**result, "date": "today", "command": "python benchmarks/precision.py", "device": "cpu",
                       "torch": torch.__version__, "checkpoint": str(source),
                       "provenance": {"dl19": "held out", "scifact": "held out"},
                       "latency": {"threads": 2, "others_cpu_share": 0.4, "provisional": True,
                                   "resident_mb": {"fp32_weights": 400.0, "with_variants": 420.0}}})
    assert "provisional: measured under contention" in report and "best first: w100, w100-int8, w50-int8" in report


def test_a_variant_within_the_noise_of_its_structure_ties_with_it_and_the_faster_ranks_first(tmp_path):
    """A lowered variant runs its structure's weights: 0.002 of quality between them is rounding noise. Counted as
    a tie, the faster variant takes the front and heads the declared ladder; a variant that really loses quality
    keeps its own figure and its place below the structure."""
    from benchmarks.ladder import pareto_front
    from benchmarks.precision import QUALITY_TIE, best_first, tie_lowered_with_structure, write_ladder

    # (latency ms, measured quality)
    measured = {"w100": (600, 0.999), "w100-bf16": (380, 0.997), "w50": (290, 0.964),
                "w50-int8": (160, 0.964 - 2 * QUALITY_TIE), "w25": (170, 0.915)}
    candidates = {n: {"latency_ms_b32_s128": ms, "quality": q, "structure": n.split("-")[0],
                      "precision": n.split("-")[1] if "-" in n else "fp32", "heads_ffn_layers": LADDER[n.split("-")[0]]}
                  for n, (ms, q) in measured.items()}
    assert pareto_front(candidates)[0] == "w100"  # by the noise alone, the 1.6x slower fp32 w100 leads
    tie_lowered_with_structure(candidates)
    assert candidates["w100-bf16"]["quality"] == 0.999 and candidates["w100-bf16"]["quality_measured"] == 0.997
    assert candidates["w50-int8"]["quality"] == candidates["w50-int8"]["quality_measured"] < 0.964
    front = pareto_front(candidates)
    assert front == ["w100-bf16", "w50", "w50-int8"]
    tie_lowered_with_structure(candidates)  # applied again (a --reuse of saved figures): the same ties
    assert candidates["w100-bf16"]["quality"] == 0.999 and pareto_front(candidates) == front
    source = tmp_path / "source"
    save_checkpoint(tiny_model(LADDER), source)
    write_ladder(tmp_path / "kept", source, {"candidates": candidates, "kept": front})
    assert load_config(tmp_path / "kept").sublm_names == ["w100-bf16", "w100", "w50", "w50-int8"]
    assert sorted(candidates, key=lambda n: best_first(candidates[n]))[:2] == ["w100-bf16", "w100"]


def test_the_quality_table_divides_by_the_fp32_structure_not_a_variant_ranked_above_it():
    """benchmarks/core.py: with w100-int8 first in the ladder, "/ w100" and the latency ratio are still against
    fp32 w100, and only the full structure's pruned-only twin is the teacher."""
    from benchmarks.core import markdown, with_ratios

    def row(ndcg, ms, pruned=None):
        return {"ndcg@10": ndcg, "ndcg@10_asym": ndcg, "pruned_only_ndcg@10": pruned, "latency_ms_b32_s128": ms}

    r = with_ratios({"reference": "w100", "teacher": {"ndcg@10": 0.64, "latency_ms_b32_s128": 700.0},
                     "command": "python benchmarks/core.py", "corpus_docs": 10, "queries": 2, "device": "cpu",
                     "sublms": {"w100-int8": row(0.62, 400.0), "w100": row(0.64, 800.0), "w50": row(0.62, 400.0, 0.4),
                                "w25": row(0.56, 200.0, 0.1)}})
    assert r["sublms"]["w50"]["asym_vs_full"] == pytest.approx(0.62 / 0.64)
    assert r["sublms"]["w25"]["latency_vs_w100"] == pytest.approx(0.25) and r["targets"]["latency w25 / w100 <= 0.35"]
    assert r["sublms"]["w100-int8"]["beats_pruned_only"] is None and r["targets"]["every SubLM beats pruned-only"]
    table = markdown(r)
    assert "| w100 | 0.6400 | 1.000 | 0.6400 | 1.000 | = teacher |" in table
    assert "| w100-int8 | 0.6200 | 0.969 | 0.6200 | 0.969 |  |" in table
