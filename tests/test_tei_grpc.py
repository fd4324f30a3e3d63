"""TEI's gRPC contract (``tei.v1``, compiled from text-embeddings-inference's own ``proto/tei.proto``) served by
the in-process core of test_serving_core.py beside ``elasticlm.v1``, on one servicer and one port, as a client
built on TEI calls it: every unary RPC, the streams, refusals in TEI's status codes, overload, and the same
numbers as elasticlm.v1 for the same input (same SubLM). Serve's own gRPC path is in test_serving.py."""

import asyncio
import queue

import grpc
import numpy as np
import pytest

from conftest import MAX_INPUTS, TEXTS
from test_serving_core import LONG, QUERY, ghost
from deployments.grpc_api import elasticlm_pb2, elasticlm_pb2_grpc, tei_pb2, tei_pb2_grpc

pytestmark = pytest.mark.fast

SUBLM = "x-elasticlm-sublm"


@pytest.fixture(scope="module")
def tei(core_stack):
    """TEI's five service stubs on the core's channel, as a TEI client compiles them."""
    channel = core_stack.channel
    return {name: getattr(tei_pb2_grpc, f"{name}Stub")(channel) for name in ("Info", "Embed", "Predict", "Rerank",
                                                                            "Tokenize")}


def call(stub, rpc, request, metadata=()):
    return getattr(stub, rpc).with_call(request, metadata=list(metadata), timeout=60)


def refusal(stub, rpc, request, metadata=()) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as e:
        call(stub, rpc, request, metadata)
    return e.value


# ----------------------------------------------------------------------------- the unary RPCs
def test_embed_answers_the_same_numbers_as_elasticlm(core_stack, tei):
    """tei.v1.Embed and elasticlm.v1.ElasticLM/Embed share their RPC name; each gets its own answer."""
    denser = core_stack.core.models["embed"]
    response, c = call(tei["Embed"], "Embed", tei_pb2.EmbedRequest(inputs=TEXTS[0]))
    sublm = dict(c.trailing_metadata())[SUBLM]
    assert sublm == "w100" and len(response.embeddings) == 384
    np.testing.assert_allclose(response.embeddings, denser.encode(TEXTS[:1], sublm=sublm)[0], atol=1e-4)
    assert response.metadata.compute_tokens > 0 and response.metadata.compute_chars == len(TEXTS[0])
    ours, _ = call(core_stack.grpc, "Embed", elasticlm_pb2.EmbedRequest(inputs=TEXTS[:1]))
    assert ours.sublm == sublm
    np.testing.assert_array_equal(ours.embeddings[0].values, response.embeddings)
    # dimensions and normalize as the model answers them are accepted
    same, _ = call(tei["Embed"], "Embed", tei_pb2.EmbedRequest(inputs=TEXTS[0], dimensions=384, normalize=True))
    np.testing.assert_array_equal(same.embeddings, response.embeddings)


def test_quality_floor_and_deadline_come_from_the_metadata(core_stack, tei):
    ghost(core_stack, 920)
    try:
        _, floor = call(tei["Embed"], "Embed", tei_pb2.EmbedRequest(inputs=TEXTS[0]),
                        [("x-elasticlm-min-sublm", "w75")])
    finally:
        ghost(core_stack, 0)
    assert dict(floor.trailing_metadata())[SUBLM] == "w75"
    _, tight = call(tei["Embed"], "Embed", tei_pb2.EmbedRequest(inputs=TEXTS[0]), [("x-elasticlm-deadline-ms", "2")])
    assert dict(tight.trailing_metadata())[SUBLM] == "w25"  # 1 text: 10/6/3 ms on w100/w75/w50, 1 ms on w25


def test_rerank_and_predict_answer_as_elasticlm_does(core_stack, tei):
    response, c = call(tei["Rerank"], "Rerank", tei_pb2.RerankRequest(query=QUERY, texts=TEXTS, return_text=True))
    ours, _ = call(core_stack.grpc, "Rerank", elasticlm_pb2.RerankRequest(query=QUERY, texts=TEXTS))
    assert [r.index for r in response.ranks] == [r.index for r in ours.ranks] and response.ranks[0].index == 0
    scores = [r.score for r in response.ranks]
    assert scores == [r.score for r in ours.ranks] == sorted(scores, reverse=True)
    assert [r.text for r in response.ranks] == [TEXTS[r.index] for r in response.ranks]
    assert dict(c.trailing_metadata())[SUBLM] == ours.sublm
    predicted, _ = call(tei["Predict"], "Predict", tei_pb2.PredictRequest(inputs="a fine, moving film"))
    ours, _ = call(core_stack.grpc, "Predict", elasticlm_pb2.PredictRequest(inputs=["a fine, moving film"]))
    assert [(p.label, p.score) for p in predicted.predictions] == [(p.label, p.score) for p in ours.predictions]
    pair, _ = call(tei["Predict"], "PredictPair", tei_pb2.PredictPairRequest(inputs=["a fine, moving film"]))
    assert [p.label for p in pair.predictions] == [p.label for p in ours.predictions]


def test_info_states_the_model_and_limits(core_stack, tei):
    info, _ = call(tei["Info"], "Info", tei_pb2.InfoRequest())
    ours, _ = call(core_stack.grpc, "Info", elasticlm_pb2.InfoRequest())
    assert info.model_id == ours.model and info.model_type == tei_pb2.MODEL_TYPE_EMBEDDING
    assert info.max_client_batch_size == MAX_INPUTS and info.max_input_length == 256
    assert info.model_dtype == "float32" and info.version and info.max_batch_tokens > 0


def test_tokenize_and_decode(tei):
    text = "Crème brûlée, please"
    encoded, c = call(tei["Tokenize"], "Tokenize", tei_pb2.EncodeRequest(inputs=text, add_special_tokens=True))
    tokens = encoded.tokens
    assert SUBLM not in dict(c.trailing_metadata())  # no model ran
    assert tokens[0].special and tokens[0].text == "[CLS]" and not tokens[0].HasField("start")
    assert tokens[-1].special and tokens[-1].text == "[SEP]"
    data = text.encode()
    for token in tokens[1:-1]:  # TEI's offsets count UTF-8 bytes
        assert not token.special and data[token.start:token.stop].decode() == token.text
    bare, _ = call(tei["Tokenize"], "Tokenize", tei_pb2.EncodeRequest(inputs=text))
    assert [t.id for t in bare.tokens] == [t.id for t in tokens[1:-1]]
    decoded, _ = call(tei["Tokenize"], "Decode", tei_pb2.DecodeRequest(ids=[t.id for t in tokens],
                                                                        skip_special_tokens=True))
    assert decoded.text == "creme brulee, please"  # the uncased WordPiece vocabulary folds case and accents


# ----------------------------------------------------------------------------- refusals, in TEI's codes
@pytest.mark.parametrize("service,rpc,message,needle", [
    ("Embed", "Embed", tei_pb2.EmbedRequest(inputs=" "), "inputs is empty"),
    ("Embed", "Embed", tei_pb2.EmbedRequest(inputs=LONG), "more than the model's limit of 256"),  # truncate unset
    ("Embed", "Embed", tei_pb2.EmbedRequest(inputs="x", normalize=False), "normalize=false"),
    ("Embed", "Embed", tei_pb2.EmbedRequest(inputs="x", dimensions=100), "dimensions must be one of [384"),
    ("Embed", "Embed", tei_pb2.EmbedRequest(inputs="x", prompt_name="query"), "prompt_name"),
    ("Embed", "Embed", tei_pb2.EmbedRequest(inputs=LONG, truncate=True, truncation_direction=1),
     "TRUNCATION_DIRECTION_LEFT"),
    ("Rerank", "Rerank", tei_pb2.RerankRequest(query=QUERY), "texts is empty"),
    ("Rerank", "Rerank", tei_pb2.RerankRequest(texts=TEXTS), "query"),
    ("Rerank", "Rerank", tei_pb2.RerankRequest(query=QUERY, texts=["t"] * (MAX_INPUTS + 1)), "more than the limit"),
    ("Predict", "PredictPair", tei_pb2.PredictPairRequest(inputs=["a", "b"]), "takes single texts"),
    ("Tokenize", "Tokenize", tei_pb2.EncodeRequest(inputs=""), "inputs is empty"),
    ("Tokenize", "Decode", tei_pb2.DecodeRequest(ids=[10**6]), "is not a token id"),
])
def test_bad_input_is_invalid_argument_naming_it(tei, service, rpc, message, needle):
    e = refusal(tei[service], rpc, message)
    assert e.code() == grpc.StatusCode.INVALID_ARGUMENT and needle in e.details(), e.details()


def test_bad_metadata_and_undecodable_messages(core_stack, tei):
    e = refusal(tei["Embed"], "Embed", tei_pb2.EmbedRequest(inputs="x"), [("x-elasticlm-min-sublm", "w10")])
    assert e.code() == grpc.StatusCode.INVALID_ARGUMENT and "min_sublm" in e.details()
    for method, message in (("/tei.v1.Embed/Embed", "tei.v1.EmbedRequest"),
                            ("/elasticlm.v1.ElasticLM/Embed", "elasticlm.v1.EmbedRequest")):
        with pytest.raises(grpc.RpcError) as e:
            core_stack.channel.unary_unary(method)(b"\xff\xff\xff", timeout=30)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and message in e.value.details()


def test_what_is_not_served_answers_unimplemented_saying_why(tei):
    e = refusal(tei["Embed"], "EmbedSparse", tei_pb2.EmbedSparseRequest(inputs="x"))
    assert e.code() == grpc.StatusCode.UNIMPLEMENTED and "SPLADE" in e.details()
    with pytest.raises(grpc.RpcError) as e:
        list(tei["Embed"].EmbedAllStream(iter([tei_pb2.EmbedAllRequest(inputs="x")]), timeout=30))
    assert e.value.code() == grpc.StatusCode.UNIMPLEMENTED and "one per token" in e.value.details()


def test_overload_is_resource_exhausted_with_retry_after(core_stack):
    """80 single-text calls at once, each allowing 10 ms: the queue admits about 10 texts (1 ms each even
    on w25) and the rest are refused at once, in TEI's code for overload."""
    async def flood():
        async with grpc.aio.insecure_channel(core_stack.grpc_target) as channel:
            stub = tei_pb2_grpc.EmbedStub(channel)
            calls = [stub.Embed(tei_pb2.EmbedRequest(inputs=LONG, truncate=True),
                                metadata=[("x-elasticlm-deadline-ms", "10")], timeout=120) for _ in range(80)]
            return await asyncio.gather(*calls, return_exceptions=True)

    results = core_stack.http.portal.call(flood)
    refused = [r for r in results if isinstance(r, grpc.aio.AioRpcError)]
    assert len(refused) >= 10 and sum(isinstance(r, tei_pb2.EmbedResponse) for r in results) >= 1
    for e in refused:
        assert e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "overloaded" in e.details(), e.details()
        assert dict(e.trailing_metadata())["retry-after"].isdigit()


# ----------------------------------------------------------------------------- the streams
def test_streams_answer_each_message_in_order(core_stack, tei):
    denser = core_stack.core.models["embed"]
    stream = tei["Embed"].EmbedStream(iter([tei_pb2.EmbedRequest(inputs=t) for t in TEXTS * 2]), timeout=60)
    rows = np.array([r.embeddings for r in stream])
    sublms = dict(stream.trailing_metadata())[SUBLM].split(",")
    assert rows.shape == (6, 384) and set(sublms) <= {"w100", "w75", "w50", "w25"}
    np.testing.assert_allclose(rows, np.vstack([denser.encode(TEXTS, sublm=sublms[0])] * 2), atol=1e-4)
    labels = [r.predictions[0].label for r in tei["Predict"].PredictStream(
        iter([tei_pb2.PredictRequest(inputs=t) for t in ("a fine, moving film", "a dull, tedious mess")]), timeout=60)]
    assert len(labels) == 2 and labels[0] != labels[1]
    tokens = [len(r.tokens) for r in tei["Tokenize"].TokenizeStream(
        iter([tei_pb2.EncodeRequest(inputs=t) for t in ("one", "one two three")]), timeout=60)]
    assert tokens == [1, 3]


def test_a_stream_answers_each_message_before_the_next_is_sent(tei):
    """A client may wait for each answer before it sends the next message: reading never blocks answering."""
    outbox = queue.Queue()

    def requests():
        while (text := outbox.get()) is not None:
            yield tei_pb2.EmbedRequest(inputs=text)

    outbox.put(TEXTS[0])
    stream = tei["Embed"].EmbedStream(requests(), timeout=30)
    answered = []
    for text in [*TEXTS[1:], None]:
        answered.append(next(stream))
        outbox.put(text)
    assert len(answered) == 3 and list(stream) == []


def test_rerank_stream_ranks_every_message_best_first(core_stack, tei):
    """One (query, text) per message; beyond max_inputs texts the core takes them in parts."""
    texts = TEXTS + [f"filler passage number {i}" for i in range(MAX_INPUTS)]
    response, c = tei["Rerank"].RerankStream.with_call(
        iter([tei_pb2.RerankStreamRequest(query=QUERY, text=t, return_text=True) for t in texts]), timeout=60)
    assert sorted(r.index for r in response.ranks) == list(range(len(texts)))
    assert [r.score for r in response.ranks] == sorted((r.score for r in response.ranks), reverse=True)
    assert response.ranks[0].index == 0 and all(r.text == texts[r.index] for r in response.ranks)
    assert dict(c.trailing_metadata())[SUBLM]
    unary, _ = call(tei["Rerank"], "Rerank", tei_pb2.RerankRequest(query=QUERY, texts=TEXTS))
    assert [r.index for r in response.ranks if r.index < 3] == [r.index for r in unary.ranks]


def test_a_bad_message_ends_a_stream_with_its_status(tei):
    stream = tei["Embed"].EmbedStream(iter([tei_pb2.EmbedRequest(inputs="fine"), tei_pb2.EmbedRequest(inputs="")]),
                                      timeout=60)
    with pytest.raises(grpc.RpcError) as e:
        list(stream)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "inputs is empty" in e.value.details()
    with pytest.raises(grpc.RpcError) as e:
        tei["Rerank"].RerankStream(iter([]), timeout=60)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "the stream is empty" in e.value.details()
    messages = [tei_pb2.RerankStreamRequest(query=QUERY, text=t) for t in ["fine"] * (MAX_INPUTS + 2) + [" "]]
    with pytest.raises(grpc.RpcError) as e:
        tei["Rerank"].RerankStream(iter(messages), timeout=60)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and f"message {MAX_INPUTS + 2}'s text is empty" \
        in e.value.details(), e.value.details()
