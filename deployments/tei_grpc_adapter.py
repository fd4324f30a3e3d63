"""gRPC in text-embeddings-inference's contract, without Ray: ``tei.v1`` messages (``proto/tei.proto``, TEI's
published file) <-> ``TaskRequest`` / ``TaskAnswer`` around the same ``ServingCore`` as ``elasticlm.v1``.

So a search backend that compiled TEI's proto into its code calls this server unchanged, with the same
validation, SubLM choice, deadline and quality floor as every other protocol: the deadline and the floor
come from the metadata ``x-elasticlm-deadline-ms`` / ``x-elasticlm-min-sublm`` (TEI's messages have no field
for them), and the SubLM that served is in the trailing metadata ``x-elasticlm-sublm`` (for a stream: each
SubLM that served it, comma-separated, in the order first used). Refusals carry TEI's status codes for the
same failures (``tei_status``). What the core cannot do is refused by name, never ignored: left
truncation, ``normalize=false``, ``prompt_name``, undeclared ``dimensions``, sparse and per-token embeddings.

Serve calls the deployment method named like the RPC, whatever its package (``replica.py``:
``call_method = service_method.split("/")[-1]``), so ``tei.v1.Embed/Embed`` and ``elasticlm.v1.ElasticLM/Embed``
reach the same method: ``ElasticAndTeiServicer`` tells them apart by the request's message type.
"""

from __future__ import annotations

import asyncio
import functools
import time

import grpc
import numpy as np

from deployments.auth import ApiKey, every_rpc_requires_api_key
from deployments.contract import RequestError, TaskRequest, parse_deadline
from deployments.core import ServingCore, TaskAnswer
from deployments.grpc_adapter import GrpcServicer
from deployments.grpc_api import elasticlm_pb2, tei_pb2
from deployments.grpc_api.servicer import TEI_SERVICES, UndecodableTei
from deployments.tasks import EMBED, PREDICT, RERANK
from deployments.tei import (NOT_SERVED, decode_ids, info_fields, no_prompt, normalized, simple_tokens,
                             truncate_at_end)
from deployments.wire import DEADLINE_HEADER, MIN_SUBLM_HEADER, RETRY_AFTER_HEADER, SUBLM_HEADER

# TEI answers a request its model's task cannot serve (a rerank on an embedding model) FAILED_PRECONDITION;
# invalid input INVALID_ARGUMENT and overload RESOURCE_EXHAUSTED, as elasticlm.v1 does
TEI_CODES = {404: grpc.StatusCode.FAILED_PRECONDITION}
INFO_FIELDS = {f.name for f in tei_pb2.InfoResponse.DESCRIPTOR.fields} - {"model_type"}  # those of TEI's info it has


def tei_status(error: RequestError) -> grpc.StatusCode:
    return TEI_CODES.get(error.status) or getattr(grpc.StatusCode, error.grpc_code)


def is_tei(message) -> bool:
    """Whether a request reaching a method both packages name (Embed, Rerank, Predict, Info) is TEI's."""
    descriptor = getattr(message, "DESCRIPTOR", None)  # None: an undecodable elasticlm.v1 message
    return isinstance(message, UndecodableTei) or (descriptor is not None and descriptor.file is tei_pb2.DESCRIPTOR)


def decoded(message):
    if isinstance(message, UndecodableTei):
        raise RequestError(400, f"the request body is not a valid {message.message_name} message")
    return message


def truncate_right(message) -> bool:
    """``truncate`` as sent (proto3: false unless set, so an over-long input is refused, as TEI does)."""
    return truncate_at_end(message.truncate, message.truncation_direction == tei_pb2.TRUNCATION_DIRECTION_LEFT,
                           "TRUNCATION_DIRECTION_LEFT", "TRUNCATION_DIRECTION_RIGHT")


def prompt_name(message) -> str | None:
    return message.prompt_name if message.HasField("prompt_name") else None


def answer_metadata(request: TaskRequest, served: TaskAnswer, started: float) -> tei_pb2.Metadata:
    """TEI's per-response metadata: what the core reports (characters, tokens, total time); the split into
    tokenization, queue and inference time is not measured per request and stays 0."""
    chars = sum(map(len, request.texts)) + (len(request.query) * request.examples if request.query else 0) \
        + sum(map(len, request.pairs or ()))
    return tei_pb2.Metadata(compute_chars=chars, compute_tokens=served.num_tokens,
                            total_time_ns=int((time.perf_counter() - started) * 1e9))


def unary_rpc(one, response):
    """A unary RPC that ``one(servicer, message, options)`` answers (``_unary``); a refusal's answer: ``response()``."""
    async def rpc(self, request, grpc_context):
        return await self._unary(request, grpc_context, functools.partial(one, self), response())

    return rpc


def stream_rpc(one):
    """A bidirectional stream whose every message ``one(servicer, message, options)`` answers (``_each``)."""
    async def rpc(self, requests, grpc_context):
        async for response in self._each(requests, grpc_context, functools.partial(one, self)):
            yield response

    return rpc


class TeiGrpcServicer:
    """Every ``tei.v1`` RPC over ``self.core``. The RPCs whose names elasticlm.v1 shares are ``tei_embed``,
    ``tei_rerank``, ``tei_predict``, ``tei_info`` here (``ElasticAndTeiServicer`` dispatches to them); the
    others carry their RPC's name, as Serve calls them."""

    core: ServingCore

    def __init__(self, core: ServingCore):
        self.core = core

    # ----------------------------------------------------------------- the shared path
    def _tei_options(self, grpc_context) -> dict:
        meta = dict(grpc_context.invocation_metadata())
        return {"min_sublm": meta.get(MIN_SUBLM_HEADER), "deadline_ms": parse_deadline(meta.get(DEADLINE_HEADER))}

    @staticmethod
    def _refuse(grpc_context, e: RequestError):
        grpc_context.set_code(tei_status(e))
        grpc_context.set_details(e.message)
        if e.retry_after_s:
            grpc_context.set_trailing_metadata([(RETRY_AFTER_HEADER, str(e.retry_after_s))])

    async def _serve(self, request: TaskRequest, respond):
        """``core.serve`` and the TEI response: ``respond(served, metadata)``; returns it and the SubLM."""
        started = time.perf_counter()
        served = await self.core.serve(request)
        return respond(served, answer_metadata(request, served, started)), served.sublm

    async def _unary(self, message, grpc_context, one, empty):
        """One call: ``one(message, options)`` -> (response, SubLM or None); a refusal is its status and
        ``empty``."""
        try:
            response, sublm = await one(decoded(message), self._tei_options(grpc_context))
        except RequestError as e:
            self._refuse(grpc_context, e)
            return empty
        if sublm:
            grpc_context.set_trailing_metadata([(SUBLM_HEADER, sublm)])
        return response

    async def _each(self, requests, grpc_context, one):
        """A bidirectional stream: each request's response, in the requests' order, as soon as it is ready
        (reading goes on meanwhile, so a client may wait for each answer before it sends the next). Up to
        ``max_inputs`` requests (what one request may carry) run at once, so a stream's texts batch
        together; the first refusal ends the stream with its status, as TEI's streams end."""
        answers: asyncio.Queue = asyncio.Queue()  # each request's task, in order; None once the stream ends
        room = asyncio.Semaphore(self.core.validator.limits.max_inputs)
        sublms, reader = {}, None

        async def answer(message, options):
            return await one(decoded(message), options)

        async def read(options):
            try:
                async for message in requests:
                    await room.acquire()
                    answers.put_nowait(asyncio.ensure_future(answer(message, options)))
            finally:
                answers.put_nowait(None)

        try:
            reader = asyncio.ensure_future(read(self._tei_options(grpc_context)))
            while (task := await answers.get()) is not None:
                response, sublm = await task
                room.release()
                sublms.setdefault(sublm)
                yield response
            await reader  # a broken request stream is this call's error
        except RequestError as e:
            self._refuse(grpc_context, e)
            return
        finally:
            discard([reader] if reader else [])
            discard([answers.get_nowait() for _ in range(answers.qsize())])
        if any(sublms):
            grpc_context.set_trailing_metadata([(SUBLM_HEADER, ",".join(s for s in sublms if s))])

    # ----------------------------------------------------------------- tei.v1.Embed
    async def _embed(self, m, options):
        no_prompt(prompt_name(m))
        normalized(not m.HasField("normalize") or m.normalize)
        v = self.core.validator
        request = EMBED.request(v, v.texts(m.inputs, "inputs", one=True), truncate=truncate_right(m), **options,
                                dimensions=m.dimensions if m.HasField("dimensions") else None)
        return await self._serve(request, lambda served, meta: tei_pb2.EmbedResponse(
            embeddings=np.asarray(served.embeddings[0]).tolist(), metadata=meta))

    tei_embed = unary_rpc(_embed, tei_pb2.EmbedResponse)
    EmbedStream = stream_rpc(_embed)

    async def EmbedSparse(self, request, grpc_context) -> tei_pb2.EmbedSparseResponse:
        return self._unserved(grpc_context, "EmbedSparse", tei_pb2.EmbedSparseResponse())

    async def EmbedSparseStream(self, requests, grpc_context):
        self._unserved(grpc_context, "EmbedSparseStream", None)
        return
        yield  # an async generator, as a streaming RPC's method must be

    async def EmbedAll(self, request, grpc_context) -> tei_pb2.EmbedAllResponse:
        return self._unserved(grpc_context, "EmbedAll", tei_pb2.EmbedAllResponse())

    async def EmbedAllStream(self, requests, grpc_context):
        self._unserved(grpc_context, "EmbedAllStream", None)
        return
        yield

    @staticmethod
    def _unserved(grpc_context, rpc: str, empty):
        why = NOT_SERVED["sparse" if rpc.startswith("EmbedSparse") else "per_token"]
        grpc_context.set_code(grpc.StatusCode.UNIMPLEMENTED)
        grpc_context.set_details(f"tei.v1.Embed/{rpc} is not served: {why}; use tei.v1.Embed/Embed")
        return empty

    # ----------------------------------------------------------------- tei.v1.Rerank
    async def _rerank(self, m, options):
        request = RERANK.request(self.core.validator, m.query or None, list(m.texts), truncate=truncate_right(m),
                                 raw_scores=m.raw_scores, **options)

        def respond(served, meta):
            return tei_pb2.RerankResponse(metadata=meta, ranks=[
                tei_pb2.Rank(index=i, score=score, **({"text": request.texts[i]} if m.return_text else {}))
                for i, score in served.ranks])

        return await self._serve(request, respond)

    tei_rerank = unary_rpc(_rerank, tei_pb2.RerankResponse)

    async def RerankStream(self, requests, grpc_context) -> tei_pb2.RerankResponse:
        """One (query, text) per message, one answer for all: every text ranked, best first, its index its
        message's position. The texts of one query go to the core together, ``max_inputs`` at a time (each
        part as soon as it is full); ``raw_scores`` and ``return_text`` are the first message's (as TEI reads
        them)."""
        parts = []
        try:
            options, started = self._tei_options(grpc_context), time.perf_counter()
            groups, first = {}, None
            async for i, message in aio_enumerate(requests):
                message = decoded(message)
                first = message if first is None else first
                key = (message.query, truncate_right(message))
                indices, texts = groups.setdefault(key, ([], []))
                indices.append(i)
                # checked here too, so a refusal names the message, not its place in a part
                texts += self.core.validator.texts(message.text, f"message {i}'s text", one=True)
                if len(texts) == self.core.validator.limits.max_inputs:
                    parts.append(asyncio.ensure_future(self._rerank_part(key, groups.pop(key), first, options)))
            if first is None:
                raise RequestError(422, "the stream is empty: send at least one (query, text) message")
            parts += [asyncio.ensure_future(self._rerank_part(key, group, first, options))
                      for key, group in groups.items()]
            results = await asyncio.gather(*parts)
        except RequestError as e:
            self._refuse(grpc_context, e)
            return tei_pb2.RerankResponse()
        finally:
            discard(parts)  # after a refusal the other parts' work is no longer wanted
        ranks = sorted((rank for part, _, _ in results for rank in part), key=lambda r: -r.score)
        sublms = dict.fromkeys(sublm for _, sublm, _ in results)
        grpc_context.set_trailing_metadata([(SUBLM_HEADER, ",".join(sublms))])
        return tei_pb2.RerankResponse(ranks=ranks, metadata=tei_pb2.Metadata(
            compute_chars=sum(meta.compute_chars for _, _, meta in results),
            compute_tokens=sum(meta.compute_tokens for _, _, meta in results),
            total_time_ns=int((time.perf_counter() - started) * 1e9)))

    async def _rerank_part(self, key, group, first, options):
        (query, truncate), (indices, texts) = key, group
        request = RERANK.request(self.core.validator, query or None, texts, truncate=truncate,
                                 raw_scores=first.raw_scores, **options)
        response, sublm = await self._serve(request, lambda served, meta: (served, meta))
        served, meta = response
        return ([tei_pb2.Rank(index=indices[j], score=score, **({"text": texts[j]} if first.return_text else {}))
                 for j, score in served.ranks], sublm, meta)

    # ----------------------------------------------------------------- tei.v1.Predict
    async def _predict(self, m, options, inputs=None):
        v = self.core.validator
        request, _ = PREDICT.request(v, v.texts(m.inputs, "inputs", one=True)[0] if inputs is None else inputs,
                                     truncate=truncate_right(m), raw_scores=m.raw_scores, **options)

        def respond(served, meta):
            (row,) = served.predictions
            return tei_pb2.PredictResponse(predictions=[tei_pb2.Prediction(label=label, score=score)
                                                        for label, score in row], metadata=meta)

        return await self._serve(request, respond)

    async def _predict_pair(self, m, options):
        return await self._predict(m, options, list(m.inputs))

    tei_predict = unary_rpc(_predict, tei_pb2.PredictResponse)
    PredictPair = unary_rpc(_predict_pair, tei_pb2.PredictResponse)
    PredictStream = stream_rpc(_predict)
    PredictPairStream = stream_rpc(_predict_pair)

    # ----------------------------------------------------------------- tei.v1.Tokenize
    async def _tokenize(self, m, options):
        no_prompt(prompt_name(m))
        (text,) = self.core.validator.texts(m.inputs, "inputs", one=True)
        tokens = simple_tokens(self.core.validator, text, m.add_special_tokens)
        return tei_pb2.EncodeResponse(tokens=[tei_pb2.SimpleToken(**{k: v for k, v in token.items() if v is not None})
                                              for token in tokens]), None

    async def _decode(self, m, options):
        (text,) = decode_ids(self.core.validator, [list(m.ids)], m.skip_special_tokens)
        return tei_pb2.DecodeResponse(text=text), None

    Tokenize = unary_rpc(_tokenize, tei_pb2.EncodeResponse)
    TokenizeStream = stream_rpc(_tokenize)
    Decode = unary_rpc(_decode, tei_pb2.DecodeResponse)
    DecodeStream = stream_rpc(_decode)

    # ----------------------------------------------------------------- tei.v1.Info
    async def tei_info(self, request, grpc_context=None) -> tei_pb2.InfoResponse:
        """TEI's info fields (``deployments/tei.py``) that its message has; the model type as its enum."""
        fields = info_fields(self.core, self.core.describe())
        (model_type,) = fields["model_type"]  # its one key: embedding, classifier or reranker
        return tei_pb2.InfoResponse(**{name: value for name, value in fields.items()
                                       if name in INFO_FIELDS and value is not None},
                                    model_type=tei_pb2.ModelType.Value(f"MODEL_TYPE_{model_type.upper()}"))


# each RPC's response message, by package: the empty answer of a call refused at the door (deployments/auth.py)
ELASTICLM_RESPONSES = {m.name: getattr(elasticlm_pb2, m.output_type.name)
                       for m in elasticlm_pb2.DESCRIPTOR.services_by_name["ElasticLM"].methods}
TEI_RESPONSES = {m.name: getattr(tei_pb2, m.output_type.name) for s in TEI_SERVICES.values() for m in s.methods}


def empty_response(rpc: str, request):
    return (TEI_RESPONSES if rpc not in ELASTICLM_RESPONSES or is_tei(request) else ELASTICLM_RESPONSES)[rpc]()


@every_rpc_requires_api_key(ELASTICLM_RESPONSES.keys() | TEI_RESPONSES.keys(), empty_response)
class ElasticAndTeiServicer(GrpcServicer, TeiGrpcServicer):
    """Both packages over one core. The RPC names both define reach one method here (Serve dispatches by
    the method's name alone), which answers in the package of the request's message. Every RPC of both
    requires ``api_key`` (None: the environment's, ``deployments/auth.py``); the health service's does not."""

    def __init__(self, core: ServingCore, api_key: ApiKey | None = None):
        super().__init__(core)
        self.api_key = ApiKey.from_environment() if api_key is None else api_key

    async def Embed(self, request, grpc_context):
        if is_tei(request):
            return await self.tei_embed(request, grpc_context)
        return await GrpcServicer.Embed(self, request, grpc_context)

    async def Rerank(self, request, grpc_context):
        if is_tei(request):
            return await self.tei_rerank(request, grpc_context)
        return await GrpcServicer.Rerank(self, request, grpc_context)

    async def Predict(self, request, grpc_context):
        if is_tei(request):
            return await self.tei_predict(request, grpc_context)
        return await GrpcServicer.Predict(self, request, grpc_context)

    async def Info(self, request, grpc_context=None):
        if is_tei(request):
            return await self.tei_info(request, grpc_context)
        return await GrpcServicer.Info(self, request, grpc_context)


async def aio_enumerate(iterable):
    i = 0
    async for item in iterable:
        yield i, item
        i += 1


def discard(tasks):
    """Cancels what still runs and reads what already failed (else asyncio logs it as never retrieved)."""
    for task in filter(None, tasks):
        if not task.done():
            task.cancel()
        elif not task.cancelled():
            task.exception()
