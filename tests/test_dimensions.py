"""Reduced embedding sizes (OpenAI's ``dimensions``, ``elastic_core/dimensions.py``): the rotation, the cut,
what a checkpoint declares, and the sizes served (or refused) on every protocol.

The served tests give the session's in-process core (conftest ``core_stack``) a rotation of their own, so
they hold whichever sizes the committed checkpoint happens to declare (or none, before it is fitted).
"""

import json

import numpy as np
import pytest

from conftest import TEXTS
from deployments.contract import Limits, RequestError, Validator
from deployments.grpc_api import elasticlm_pb2, tei_pb2
from deployments.tasks import EMBED
from elastic_core.dimensions import DIMENSIONS_FILE, Dimensions, principal_axes

pytestmark = pytest.mark.fast

FULL = 384
SIZES = {256: {"ndcg@10": {"scifact": {"w100": 0.6}}}, 128: {"ndcg@10": {"scifact": {"w100": 0.5}}}}


def random_rotation(seed: int = 0) -> np.ndarray:
    q, r = np.linalg.qr(np.random.default_rng(seed).standard_normal((FULL, FULL)))
    return (q * np.sign(np.diag(r))).astype(np.float32)


def unit_rows(n: int, seed: int = 1) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, FULL)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.fixture
def dims() -> Dimensions:
    return Dimensions(FULL, random_rotation(), dict(SIZES), {"method": "test"})


# ----------------------------------------------------------------------------- the rotation and the cut
@pytest.mark.parametrize("centered", [False, True])
def test_principal_axes_are_an_orthogonal_rotation_largest_variance_first(centered):
    # anisotropic data: a few strong directions, mean off the origin (embeddings share a common direction)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((4000, FULL)) * np.linspace(3, 0.1, FULL) @ random_rotation(1) + 0.5
    r = principal_axes(x, centered)
    assert r.shape == (FULL, FULL) and r.dtype == np.float32
    np.testing.assert_allclose(r.T @ r, np.eye(FULL), atol=1e-5)
    variance = ((x - x.mean(0) if centered else x) @ r).var(axis=0) + (0 if centered else (x @ r).mean(0) ** 2)
    assert np.all(np.diff(variance[:50]) <= 1e-6 * variance[0])  # second moment along the axes: descending


def test_full_size_is_unchanged_bit_for_bit(dims):
    rows = unit_rows(5)
    assert dims.reduce(rows, None) is rows and dims.reduce(rows, FULL) is rows


def test_a_declared_size_is_rotated_cut_and_renormalized(dims):
    rows = unit_rows(7)
    for d in (256, 128):
        cut = dims.reduce(rows, d)
        reference = rows.astype(np.float64) @ dims.rotation.astype(np.float64)[:, :d]
        reference /= np.linalg.norm(reference, axis=1, keepdims=True)
        assert cut.shape == (7, d) and cut.dtype == np.float32
        np.testing.assert_allclose(np.linalg.norm(cut, axis=1), 1, atol=1e-6)
        np.testing.assert_allclose(cut, reference, atol=1e-6)


def test_rotation_keeps_full_size_cosines():
    rows, r = unit_rows(6), random_rotation()
    np.testing.assert_allclose((rows @ r) @ (rows @ r).T, rows @ rows.T, atol=1e-5)


def test_sizes_not_declared_are_refused_naming_the_allowed_ones(dims):
    assert dims.allowed == [384, 256, 128]
    for ok in (None, 384, 256, 128):
        assert dims.refusal(ok) is None
    for bad in (100, 64, 0, -1, 512, True, 128.0, "128"):
        assert "[384, 256, 128]" in dims.refusal(bad)
    with pytest.raises(ValueError, match=r"\[384, 256, 128\]"):
        dims.reduce(unit_rows(1), 100)


# ----------------------------------------------------------------------------- the checkpoint's file
def test_the_file_round_trips_and_a_checkpoint_without_it_declares_none(tmp_path, dims):
    none = Dimensions.load(tmp_path, FULL)
    assert none.allowed == [FULL] and none.sizes == {} and none.refusal(128) and none.refusal(FULL) is None
    assert none.info() == {"dimensions": [FULL], "full_dimensions": FULL, "reduced_dimensions": {}}
    dims.save(tmp_path)
    loaded = Dimensions.load(tmp_path, FULL)
    assert loaded.sizes == SIZES and loaded.fit == {"method": "test"}
    np.testing.assert_array_equal(loaded.rotation, dims.rotation)
    with pytest.raises(ValueError, match="refit"):
        Dimensions.load(tmp_path, 768)


def test_the_denser_loads_what_its_checkpoint_declares(tmp_path, checkpoint_dir, dims):
    from elastic_core.denser import ElasticDenser

    for f in checkpoint_dir.iterdir():
        if f.is_file() and f.name != DIMENSIONS_FILE:
            (tmp_path / f.name).symlink_to(f)
    assert ElasticDenser.from_checkpoint(tmp_path).dimensions.allowed == [FULL]
    dims.save(tmp_path)
    assert ElasticDenser.from_checkpoint(tmp_path).dimensions.allowed == [384, 256, 128]


def test_the_committed_checkpoints_sizes_are_measured(checkpoint_dir):
    if not (checkpoint_dir / DIMENSIONS_FILE).exists():
        pytest.skip(f"{checkpoint_dir} declares no reduced sizes (elasticlm dimensions)")
    dims = Dimensions.load(checkpoint_dir, FULL)
    np.testing.assert_allclose(dims.rotation.T @ dims.rotation, np.eye(FULL), atol=1e-4)
    for d, quality in dims.sizes.items():
        assert 0 < d < FULL and quality["ndcg@10"] and quality["vs_full"]
    assert dims.fit["method"] and dims.fit["rule"] and dims.fit["measured_on"]


# ----------------------------------------------------------------------------- validation
def test_the_validator_refuses_undeclared_sizes_with_400(tokenizer, dims):
    from types import SimpleNamespace

    v = Validator(tokenizer, 16, ["w100"], Limits(), models={"embed": SimpleNamespace(dimensions=dims)})
    assert EMBED.request(v, "hi").dimensions is None
    assert EMBED.request(v, "hi", dimensions=128).dimensions == 128
    assert EMBED.request(v, "hi", dimensions=FULL).dimensions == FULL
    with pytest.raises(RequestError) as refused:
        EMBED.request(v, "hi", dimensions=100)
    assert refused.value.status == 400 and "[384, 256, 128]" in refused.value.message


# ----------------------------------------------------------------------------- served
@pytest.fixture
def served(core_stack, dims, monkeypatch):
    denser = core_stack.core.models["embed"]
    monkeypatch.setattr(denser, "dimensions", dims)
    return denser


def test_http_serves_declared_sizes_and_refuses_others(core_stack, served, dims):
    full = served.encode(TEXTS, sublm="w100")
    for body, n in (({"input": TEXTS}, FULL), ({"input": TEXTS, "dimensions": FULL}, FULL),
                    ({"input": TEXTS, "dimensions": 128}, 128)):
        r = core_stack.http.post("/v1/embeddings", json=body)
        assert r.status_code == 200 and r.headers["x-elasticlm-sublm"] == "w100", r.text
        rows = np.array([e["embedding"] for e in r.json()["data"]])
        assert rows.shape == (len(TEXTS), n)
        np.testing.assert_allclose(rows, dims.reduce(full, n), atol=1e-4)
    r = core_stack.http.post("/v1/embeddings", json={"input": TEXTS, "dimensions": 100})
    assert r.status_code == 400 and "[384, 256, 128]" in r.text


def test_requests_of_different_sizes_share_a_batch(core_stack, served, dims):
    from test_serving_core import concurrently

    sizes = [None, 256, 128, FULL, 128, None]
    responses = concurrently(core_stack, [("/v1/embeddings", {"json": {"input": TEXTS[i % len(TEXTS)]}
                                                              | ({"dimensions": d} if d else {})})
                                          for i, d in enumerate(sizes)])
    for i, (d, r) in enumerate(zip(sizes, responses)):
        assert r.status_code == 200, r.text
        expected = dims.reduce(served.encode([TEXTS[i % len(TEXTS)]], sublm=r.json()["sublm"]), d)[0]
        np.testing.assert_allclose(r.json()["data"][0]["embedding"], expected, atol=1e-4)


def test_grpc_serves_declared_sizes_on_both_packages(core_stack, served, dims):
    import grpc

    from deployments.grpc_api import tei_pb2_grpc

    reply, _ = core_stack.grpc.Embed.with_call(elasticlm_pb2.EmbedRequest(inputs=TEXTS[:2], dimensions=256),
                                               timeout=60)
    np.testing.assert_allclose([e.values for e in reply.embeddings],
                               dims.reduce(served.encode(TEXTS[:2], sublm=reply.sublm), 256), atol=1e-4)
    with pytest.raises(grpc.RpcError) as refused:
        core_stack.grpc.Embed(elasticlm_pb2.EmbedRequest(inputs=TEXTS[:1], dimensions=100), timeout=60)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "[384, 256, 128]" in refused.value.details()
    info = core_stack.grpc.Info(elasticlm_pb2.InfoRequest(), timeout=60)
    assert [list(t.dimensions) for t in info.tasks if t.name == "embed"] == [[384, 256, 128]]

    tei = tei_pb2_grpc.EmbedStub(core_stack.channel)
    answer = tei.Embed(tei_pb2.EmbedRequest(inputs=TEXTS[0], dimensions=128), timeout=60)
    first = core_stack.core.describe()["sublms"][0]  # what serves at this load (TEI's answer does not name it)
    np.testing.assert_allclose(answer.embeddings, dims.reduce(served.encode(TEXTS[:1], sublm=first), 128)[0],
                               atol=1e-4)
    with pytest.raises(grpc.RpcError) as refused:
        tei.Embed(tei_pb2.EmbedRequest(inputs=TEXTS[0], dimensions=100), timeout=60)
    assert "[384, 256, 128]" in refused.value.details()


def test_info_shows_the_sizes_with_their_measured_quality(core_stack, served):
    embed = core_stack.http.get("/info").json()["tasks"]["embed"]
    assert embed["dimensions"] == [384, 256, 128] and embed["full_dimensions"] == FULL
    assert embed["reduced_dimensions"] == {"256": SIZES[256], "128": SIZES[128]}


def test_the_openai_client_gets_the_size_it_asks_for(core_stack, served, dims):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=f"{core_stack.http.base_url}/v1", api_key="unused", http_client=core_stack.http)
    answer = client.embeddings.create(model="elastic-minilm-l6", input=TEXTS[:2], dimensions=128)
    rows = np.array([d.embedding for d in answer.data])  # the client asks for base64 and decodes it
    assert rows.shape == (2, 128)
    np.testing.assert_allclose(np.linalg.norm(rows, axis=1), 1, atol=1e-5)
    first = core_stack.core.describe()["sublms"][0]  # what serves at this load
    np.testing.assert_allclose(rows, dims.reduce(served.encode(TEXTS[:2], sublm=first), 128), atol=1e-4)
    with pytest.raises(openai.BadRequestError) as refused:
        client.embeddings.create(model="elastic-minilm-l6", input=TEXTS[:1], dimensions=100)
    assert "[384, 256, 128]" in refused.value.body  # the client hands over the body's "error"


def test_no_declared_sizes_serves_only_the_full_size(core_stack, monkeypatch):
    monkeypatch.setattr(core_stack.core.models["embed"], "dimensions", Dimensions(FULL))
    r = core_stack.http.post("/v1/embeddings", json={"input": TEXTS[0], "dimensions": 128})
    assert r.status_code == 400 and "[384]" in r.text
    assert core_stack.http.post("/v1/embeddings", json={"input": TEXTS[0], "dimensions": FULL}).status_code == 200



# ----------------------------------------------------------------------------- the fit (the command's plumbing)
class HashDenser:
    """Stands in for the checkpoint (no forward pass): a text's embedding is a fixed random projection of its
    bag of tokens, slightly different per SubLM, so the fit's plumbing runs in a second."""

    sublms = ["w100", "w25"]

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.model = type("M", (), {"config": type("C", (), {"hidden_size": FULL})()})()
        self.table = np.random.default_rng(0).standard_normal((tokenizer.vocab_size, FULL)).astype(np.float32)

    def tokenize(self, texts):
        return self.tokenizer(texts, truncation=True, max_length=64)

    def encode_tokenized(self, ids, sublm, progress=None):
        rows = np.stack([self.table[i].mean(0) for i in ids]) * (1.0 if sublm == "w100" else 0.9)
        rows[:, 0] += 0.05 * (sublm != "w100")
        if progress is not None:
            progress.update(len(ids))
        return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def fake_corpus(directory, tokenizer, n: int = 600):
    texts = [f"sample text number {i} about bones, markets and music" for i in range(n)]
    ids = tokenizer(texts)["input_ids"]
    cache = directory / "teacher-len128"
    cache.mkdir(parents=True)
    np.save(cache / "tokens.npy", np.concatenate([np.asarray(x, np.int32) for x in ids]))
    np.save(cache / "lengths.npy", np.array([len(x) for x in ids], np.int32))
    np.save(cache / "embeddings.npy", HashDenser(tokenizer).encode_tokenized(ids, "w100").astype(np.float16))
    return directory


def test_the_fit_measures_every_size_and_sublm_and_declares_by_the_rule(tmp_path, tokenizer, monkeypatch):
    from conftest import DATA_DIR
    from elastic_core import dimensions as module
    from elastic_core.denser import ElasticDenser

    monkeypatch.setattr(ElasticDenser, "from_checkpoint", classmethod(lambda cls, path: HashDenser(tokenizer)))
    dims, report = module.fit_dimensions("ckpt", fake_corpus(tmp_path, tokenizer), DATA_DIR, sizes=(256, 64, 8),
                                         fit_texts=500, scifact_max_docs=400, dl19=True, min_ratio=0.8,
                                         compare=True, own_texts=300, progress=False)
    assert report["chosen"] == "teacher-uncentered" and report["fit"]["measured_on"].keys() == {"scifact", "dl19"}
    for by_sublm in report["measured"].values():
        assert set(by_sublm) == {"w100", "w25"}
        for row in by_sublm.values():
            assert {"teacher-uncentered", "teacher-centered", "own-uncentered", "own-centered", "none"} < set(row)
            assert set(row["none"]) == {256, 64, 8}
    for d, q in report["candidates"].items():
        passes = all(r["w100"] >= 0.8 for r in q["vs_full"].values())
        assert (d in report["declared"]) == passes == (d in dims.sizes)
        assert q["vs_full"]["scifact"]["w25"] == pytest.approx(
            q["ndcg@10"]["scifact"]["w25"] / report["fit"]["full_size_ndcg@10"]["scifact"]["w25"], abs=2e-3)
    np.testing.assert_allclose(dims.rotation.T @ dims.rotation, np.eye(FULL), atol=1e-4)
    assert "| 256 |" in module.format_dimensions_table(report)
    # the benchmark renders what it wrote (every size a string key once through JSON)
    from benchmarks.dimensions import markdown

    written = json.loads(json.dumps({**report, "date": "today", "device": "cpu", "command": "python ...",
                                     "wall_s": 1, "cpu_s": 1, "provenance": {"dl19": "held out", "scifact": "held out"}}))
    text = markdown(written)
    assert "**teacher-uncentered** (served)" in text and "| none |" in text and "| 8 | " in text
