"""Clients written for text-embeddings-inference, Cohere, OpenAI and Hugging Face, unchanged, against the real app.

The official client libraries (``cohere``, ``openai``, ``huggingface_hub``) and plain ``httpx`` call the HTTP app of
conftest's ``core_stack`` (the committed checkpoint's ``ServingCore``) served by uvicorn on a free loopback port, on
the core's own event loop. Values are checked, not only shapes: the same texts give the same numbers on every
route (idle, every answer comes from the full SubLM, which each names in ``x-elasticlm-sublm``).
"""

import base64
import socket
import time

import httpx
import numpy as np
import pytest

from conftest import MAX_INPUTS, TEXTS

pytestmark = pytest.mark.fast

QUERY = "What does a lack of vitamin D do to bones?"   # TEXTS[0] answers it
SOURCE, PARAPHRASE, UNRELATED = ("A man is playing a guitar on stage.", "Someone performs music with a guitar.",
                                 "The stock market fell sharply on Monday.")
LONG = "word " * 600  # > 256 tokens


@pytest.fixture(scope="module")
def base_url(core_stack):
    """The app on a real socket: uvicorn on the core's event loop (the test client's portal)."""
    import uvicorn

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(core_stack.app, lifespan="off", log_level="warning"))
    serving = core_stack.http.portal.start_task_soon(server.serve, [listener])
    started = time.monotonic()
    while not server.started:
        assert not serving.done() and time.monotonic() - started < 30, "uvicorn did not start"
        time.sleep(0.02)
    yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    server.should_exit = True
    serving.result(timeout=30)
    listener.close()


@pytest.fixture(scope="module")
def http(base_url):
    with httpx.Client(base_url=base_url, timeout=60) as client:
        yield client


@pytest.fixture()
def hf(base_url, monkeypatch):
    """``InferenceClient(base_url=...)``: the hub refuses every request in offline mode (conftest sets it), a local
    server's included."""
    import huggingface_hub
    from huggingface_hub import InferenceClient

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    return InferenceClient(base_url=base_url, timeout=60)


@pytest.fixture(scope="module")
def tei_embeddings(http):
    """TEI's /embed of TEXTS: what every other route's embeddings of them must equal."""
    r = http.post("/embed", json={"inputs": TEXTS})
    assert r.status_code == 200 and r.headers["x-elasticlm-sublm"] == "w100", r.text
    return np.array(r.json())


@pytest.fixture(scope="module")
def denser(core_stack):
    return core_stack.core.models["embed"]


# ----------------------------------------------------------------------------- TEI over plain HTTP
def test_tei_root_answers_as_the_first_task_embed(http, tei_embeddings, denser):
    r = http.post("/", json={"inputs": TEXTS})
    assert r.status_code == 200 and r.headers["x-elasticlm-sublm"] == "w100", r.text
    np.testing.assert_allclose(r.json(), tei_embeddings, atol=1e-6)
    np.testing.assert_allclose(tei_embeddings, denser.encode(TEXTS, sublm="w100"), atol=1e-4)
    np.testing.assert_allclose(http.post("/invocations", json={"inputs": TEXTS[0]}).json(), tei_embeddings[:1],
                               atol=1e-6)  # TEI's SageMaker alias of its root
    assert http.get("/").status_code == 200 and http.get("/ping").json()["status"] == "ok"  # TEI's health routes


def test_tei_similarity_is_the_cosine_of_the_embeddings(http):
    body = {"inputs": {"source_sentence": SOURCE, "sentences": [PARAPHRASE, UNRELATED]}}
    r = http.post("/similarity", json=body)
    assert r.status_code == 200 and r.headers["x-elasticlm-sublm"] == "w100", r.text
    rows = np.array(http.post("/embed", json={"inputs": [SOURCE, PARAPHRASE, UNRELATED]}).json())
    np.testing.assert_allclose(r.json(), rows[1:] @ rows[0], atol=1e-5)
    assert r.json()[0] > r.json()[1] + 0.3
    assert http.post("/", json=body | {"parameters": {}}).json() == pytest.approx(r.json(), abs=1e-6)
    empty = http.post("/similarity", json={"inputs": {"source_sentence": SOURCE, "sentences": []}})
    assert empty.status_code == 422 and "inputs.sentences is empty" in empty.json()["error"]


def test_tei_tokenize_and_decode(http):
    text = "Vitamin D weakens bönes"
    r = http.post("/tokenize", json={"inputs": text})
    assert r.status_code == 200, r.text
    [tokens] = r.json()
    assert tokens[0] == {"id": 101, "text": "[CLS]", "special": True, "start": None, "stop": None}
    assert tokens[-1]["text"] == "[SEP]" and tokens[-1]["special"]
    encoded = text.encode()
    for token in tokens[1:-1]:  # TEI's offsets: UTF-8 bytes of the text
        assert not token["special"] and encoded[token["start"]:token["stop"]].decode() == token["text"]
    assert tokens[-2]["stop"] == len(encoded) and len(encoded) > len(text)
    bare = http.post("/tokenize", json={"inputs": [text, "hi"], "add_special_tokens": False}).json()
    assert bare[0] == tokens[1:-1] and len(bare) == 2
    ids = [t["id"] for t in tokens]
    assert http.post("/decode", json={"ids": ids}).json() == ["vitamin d weakens bones"]
    assert http.post("/decode", json={"ids": [ids, ids[:2]], "skip_special_tokens": False}).json() == [
        "[CLS] vitamin d weakens bones [SEP]", "[CLS] vitamin"]
    refused = http.post("/decode", json={"ids": [101, 10 ** 9]})
    assert refused.status_code == 422 and "1000000000 is not a token id" in refused.json()["error"]


def test_tei_info_fields_beside_ours(http):
    info = http.get("/info").json()
    assert info["model"] == info["model_id"] == info["served_model_name"] == "elastic-minilm-l6"
    assert info["model_type"] == {"embedding": {"pooling": "mean"}}
    assert info["max_input_length"] == info["max_input_tokens"] == 256 and info["model_dtype"] in ("float32", "float16")
    assert info["max_client_batch_size"] == info["max_inputs"] == MAX_INPUTS and info["auto_truncate"] is True
    assert {"max_concurrent_requests", "max_batch_tokens", "tokenization_workers", "version"} <= info.keys()


@pytest.mark.parametrize("path,body,status,named", [
    ("/embed_all", {"inputs": "x"}, 404, "one pooled embedding per text"),
    ("/embed_sparse", {"inputs": "x"}, 404, "no sparse (SPLADE) head"),
    ("/embed", {"inputs": "x", "truncation_direction": "left"}, 400, "truncation_direction=Left"),
    ("/embed", {"inputs": "x", "truncation_direction": "up"}, 400, "truncation_direction must be one of"),
    ("/embed", {"inputs": "x", "normalize": False}, 400, "normalize=false"),
    ("/embed", {"inputs": "x", "prompt_name": "query"}, 400, "declares no prompts"),
    ("/embed", {"inputs": [LONG], "truncate": False}, 413, "more than the model's limit of 256"),
    ("/embed", {"inputs": []}, 422, "inputs is empty"),
    ("/embed", {"inputs": ["ok", " "]}, 422, "inputs[1] is empty"),
    ("/embed", {"inputs": ["t"] * (MAX_INPUTS + 1)}, 413, f"more than the limit of {MAX_INPUTS}"),
    ("/rerank", {"query": QUERY, "texts": TEXTS, "truncation_direction": "Left"}, 400, "truncation_direction=Left"),
    ("/tokenize", {"inputs": "x", "prompt_name": "query"}, 400, "declares no prompts"),
    ("/", {"inputs": "A film.", "parameters": {"function_to_apply": "sigmoid"}}, 400, "single-label"),
])
def test_tei_refusals_name_the_option_in_teis_error_body(http, path, body, status, named):
    r = http.post(path, json=body)
    assert r.status_code == status, r.text
    assert r.json().keys() == {"error", "error_type"} and named in r.json()["error"], r.text


# ----------------------------------------------------------------------------- Hugging Face InferenceClient
def test_hf_feature_extraction(hf, tei_embeddings):
    from huggingface_hub.errors import HfHubHTTPError

    rows = hf.feature_extraction(TEXTS)
    assert rows.shape == (3, 384) and rows.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(rows, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(rows, tei_embeddings, atol=1e-6)
    one = hf.feature_extraction(TEXTS[0], truncate=True, truncation_direction="right", normalize=True)
    np.testing.assert_allclose(one, tei_embeddings[:1], atol=1e-6)
    with pytest.raises(HfHubHTTPError) as refused:
        hf.feature_extraction(TEXTS[0], truncation_direction="left")
    assert refused.value.response.status_code == 400 and "truncation_direction=Left" in str(refused.value)


def test_hf_sentence_similarity(hf, http):
    scores = hf.sentence_similarity(SOURCE, [PARAPHRASE, UNRELATED])
    tei = http.post("/similarity", json={"inputs": {"source_sentence": SOURCE, "sentences": [PARAPHRASE, UNRELATED]}})
    assert scores == pytest.approx(tei.json(), abs=1e-6) and scores[0] > scores[1]


def test_hf_text_classification(hf, http, core_stack):
    labels = hf.text_classification("A moving, beautifully acted film.")
    assert [x.label for x in labels] == ["positive", "negative"] and labels[0].score > 0.9
    assert sum(x.score for x in labels) == pytest.approx(1.0)
    tei = http.post("/predict", json={"inputs": "A moving, beautifully acted film."}).json()
    assert [(x.label, x.score) for x in labels] == [(p["label"], pytest.approx(p["score"])) for p in tei]
    [best] = hf.text_classification("A dull, lifeless film.", top_k=1)
    assert best.label == "negative"
    logits = hf.text_classification("A dull, lifeless film.", function_to_apply="none")
    assert logits[0].label == "negative" and logits[0].score - logits[1].score > 1.0


# ----------------------------------------------------------------------------- Cohere
@pytest.fixture(scope="module")
def cohere_v2(base_url):
    import cohere

    return cohere.ClientV2(api_key="unused", base_url=base_url, timeout=60)


@pytest.fixture(scope="module")
def cohere_v1(base_url):
    import cohere

    return cohere.Client(api_key="unused", base_url=base_url, timeout=60)


def test_cohere_v2_embed_every_served_type(cohere_v2, tei_embeddings):
    r = cohere_v2.embed(model="elastic-minilm-l6", texts=TEXTS, input_type="search_document",
                        embedding_types=["float", "base64", "binary", "ubinary"], output_dimension=384)
    floats = np.array(r.embeddings.float_)
    np.testing.assert_allclose(floats, tei_embeddings, atol=1e-6)
    packed = np.array(r.embeddings.ubinary, dtype=np.uint8)
    assert packed.shape == (3, 48) and (np.unpackbits(packed, axis=1) == (floats > 0)).all()
    assert (np.array(r.embeddings.binary) == packed.astype(np.int16) - 128).all()
    unpacked = [np.frombuffer(base64.b64decode(row), "<f4") for row in r.embeddings.base64]
    np.testing.assert_allclose(unpacked, floats, atol=1e-6)
    assert r.texts == TEXTS and r.meta.billed_units.input_tokens > 0 and r.id
    query = cohere_v2.embed(model="m", texts=[QUERY], input_type="search_query", embedding_types=["float"])
    assert np.array(query.embeddings.float_).shape == (1, 384)


def test_cohere_v2_embed_refuses_what_it_cannot_serve_by_name(cohere_v2):
    from cohere.errors import BadRequestError

    for kwargs, named in [({"embedding_types": ["int8"]}, "calibration ranges"),
                          ({"embedding_types": ["float"], "truncate": "START"}, "truncate=START"),
                          ({"embedding_types": ["float"], "max_tokens": 16}, "max_tokens=16"),
                          ({"embedding_types": ["float"], "output_dimension": 100}, "dimensions must be one of")]:
        with pytest.raises(BadRequestError) as refused:
            cohere_v2.embed(model="m", texts=TEXTS[:1], input_type="search_query", **kwargs)
        assert named in refused.value.body["error"]


def test_cohere_v2_rerank_matches_teis_order(cohere_v2, http):
    tei = http.post("/rerank", json={"query": QUERY, "texts": TEXTS}).json()
    r = cohere_v2.rerank(model="elastic-minilm-l6", query=QUERY, documents=TEXTS, top_n=2)
    assert [x.index for x in r.results] == [x["index"] for x in tei[:2]] and r.results[0].index == 0
    assert [x.relevance_score for x in r.results] == pytest.approx([x["score"] for x in tei[:2]])
    assert r.id and r.meta.api_version.version == "2"


def test_cohere_v1_rerank_and_embed(cohere_v1, http, tei_embeddings):
    tei = http.post("/rerank", json={"query": QUERY, "texts": TEXTS}).json()
    documents = [{"text": TEXTS[0], "id": "a"}, TEXTS[1], TEXTS[2]]
    r = cohere_v1.rerank(query=QUERY, documents=documents, return_documents=True)
    assert [x.index for x in r.results] == [x["index"] for x in tei]
    assert r.results[0].document.text == TEXTS[0] and r.results[0].document.id == "a"  # objects echoed whole
    floats = cohere_v1.embed(texts=TEXTS, model="m", input_type="search_document")
    assert floats.response_type == "embeddings_floats"
    np.testing.assert_allclose(floats.embeddings, tei_embeddings, atol=1e-6)
    by_type = cohere_v1.embed(texts=TEXTS, model="m", input_type="clustering", embedding_types=["ubinary"])
    assert by_type.response_type == "embeddings_by_type" and np.array(by_type.embeddings.ubinary).shape == (3, 48)


# ----------------------------------------------------------------------------- OpenAI
def test_openai_embeddings_float_and_its_default_base64(base_url, tei_embeddings):
    from openai import OpenAI

    client = OpenAI(api_key="unused", base_url=f"{base_url}/v1", timeout=60)
    packed = client.embeddings.create(model="elastic-minilm-l6", input=TEXTS)  # the client asks for base64
    floats = client.embeddings.create(model="elastic-minilm-l6", input=TEXTS, encoding_format="float")
    for answer in (packed, floats):
        assert [d.index for d in answer.data] == [0, 1, 2] and answer.usage.prompt_tokens > 0
        np.testing.assert_allclose([d.embedding for d in answer.data], tei_embeddings, atol=1e-6)


def test_overload_is_503_with_retry_after_in_teis_error_body(http, base_url, core_stack, monkeypatch):
    """TEI answers 429; here 503 with Retry-After, which the OpenAI and Cohere clients retry as they retry 429."""
    from openai import InternalServerError, OpenAI

    monkeypatch.setattr(core_stack.core.engine, "admits", lambda *args, **kwargs: False)  # as under a surge
    r = http.post("/", json={"inputs": TEXTS})
    with pytest.raises(InternalServerError) as refused:
        OpenAI(api_key="unused", base_url=f"{base_url}/v1", max_retries=0).embeddings.create(model="m", input="x")
    monkeypatch.undo()
    assert r.status_code == 503 and int(r.headers["retry-after"]) >= 1, r.text
    assert r.json()["error_type"] == "Overloaded" and "overloaded" in r.json()["error"]
    assert refused.value.status_code == 503


# ----------------------------------------------------------------------------- every answer names its SubLM
@pytest.mark.parametrize("path,body", [
    ("/", {"inputs": TEXTS[0]}), ("/embed", {"inputs": TEXTS[0]}), ("/v1/embeddings", {"input": TEXTS[0]}),
    ("/embeddings", {"input": TEXTS[0]}), ("/similarity", {"inputs": {"source_sentence": SOURCE, "sentences": [QUERY]}}),
    ("/v1/embed", {"texts": TEXTS}), ("/v2/embed", {"texts": TEXTS, "input_type": "search_query"}),
    ("/rerank", {"query": QUERY, "texts": TEXTS}), ("/v1/rerank", {"query": QUERY, "documents": TEXTS}),
    ("/v2/rerank", {"query": QUERY, "documents": TEXTS}), ("/predict", {"inputs": "A film."}),
    ("/", {"inputs": "A film.", "parameters": {}}),
])
def test_every_served_answer_names_its_sublm(http, path, body):
    r = http.post(path, json=body)
    assert r.status_code == 200 and r.headers["x-elasticlm-sublm"] == "w100", r.text
