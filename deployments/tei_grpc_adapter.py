"""gRPC in text-embeddings-inference's contract, without Ray: ``tei.v1`` messages (``proto/tei.proto``, TEI's
published file) <-> ``TaskRequest`` / ``TaskAnswer`` around the same ``ServingCore`` as ``elasticlm.v1``.

So a search backend that compiled TEI's proto into its code calls this server unchanged, with the same
validation, SubLM choice, deadline and quality floor as every other protocol: the deadline and the floor
come from the metadata ``x-elasticlm-deadline-ms`` / ``x-elasticlm-min-sublm`` (TEI's messages have no field
for them), and the SubLM that served is in the trailing metadata ``x-elasticlm-sublm`` (for a stream: each
SubLM that served it, comma-separated, in the order first used). Refusals carry TEI's status codes for the
same failures (``tei_status``). What the core cannot do is refused by name, never ignored: left
truncation, ``normalize=false``, ``prompt_name``, other ``dimensions``, sparse and per-token embeddings.

Serve calls the deployment method named like the RPC, whatever its package (``replica.py``:
``call_method = service_method.split("/")[-1]``), so ``tei.v1.Embed/Embed`` and ``elasticlm.v1.ElasticLM/Embed``
reach the same method: ``ElasticAndTeiServicer`` tells them apart by the request's message type.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import itertools
import time
from importlib import metadata as package_metadata

import grpc
import numpy as np

from deployments.contract import RequestError, TaskRequest, parse_deadline
from deployments.core import ServingCore, TaskAnswer
from deployments.grpc_adapter import GrpcServicer
from deployments.grpc_api import tei_pb2
from deployments.grpc_api.servicer import UndecodableTei
from deployments.tasks import EMBED, PREDICT, RERANK
from deployments.wire import DEADLINE_HEADER, MIN_SUBLM_HEADER, RETRY_AFTER_HEADER, SUBLM_HEADER

# TEI answers a request its model's task cannot serve (a rerank on an embedding model) FAILED_PRECONDITION;
# invalid input INVALID_ARGUMENT and overload RESOURCE_EXHAUSTED, as elasticlm.v1 does
TEI_CODES = {404: grpc.StatusCode.FAILED_PRECONDITION}
MODEL_TYPES = {EMBED.name: tei_pb2.MODEL_TYPE_EMBEDDING, RERANK.name: tei_pb2.MODEL_TYPE_RERANKER,
               PREDICT.name: tei_pb2.MODEL_TYPE_CLASSIFIER}


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
    """``truncate`` as sent (proto3: false unless set, so an over-long input is refused, as TEI does);
    left truncation is refused where it would apply, rather than silently cutting the other end."""
    if message.truncate and message.truncation_direction == tei_pb2.TRUNCATION_DIRECTION_LEFT:
        raise RequestError(400, "truncation_direction=TRUNCATION_DIRECTION_LEFT is not supported: inputs over the "
                                "token limit are cut at the end; send TRUNCATION_DIRECTION_RIGHT, or truncate=false "
                                "to have them refused")
    return message.truncate


def no_prompt(message):
    if message.HasField("prompt_name"):
        raise RequestError(400, f"prompt_name {message.prompt_name!r} is not supported: this model has no prompts; "
                                "leave prompt_name unset")


def answer_metadata(request: TaskRequest, served: TaskAnswer, started: float) -> tei_pb2.Metadata:
    """TEI's per-response metadata: what the core reports (characters, tokens, total time); the split into
    tokenization, queue and inference time is not measured per request and stays 0."""
    chars = sum(map(len, request.texts)) + (len(request.query) * request.examples if request.query else 0) \
        + sum(map(len, request.pairs or ()))
    return tei_pb2.Metadata(compute_chars=chars, compute_tokens=served.num_tokens,
                            total_time_ns=int((time.perf_counter() - started) * 1e9))


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
        no_prompt(m)
        if m.HasField("normalize") and not m.normalize:
            raise RequestError(400, "normalize=false is not supported: embeddings are L2-normalized")
        if m.HasField("dimensions") and EMBED.name in self.core.models and m.dimensions != self.dimensions:
            raise RequestError(400, f"dimensions={m.dimensions} is not supported: the embeddings have "
                                    f"{self.dimensions} dimensions; send {self.dimensions} or leave it unset")
        v = self.core.validator
        request = EMBED.request(v, v.texts(m.inputs, "inputs", one=True), truncate=truncate_right(m), **options)
        return await self._serve(request, lambda served, meta: tei_pb2.EmbedResponse(
            embeddings=np.asarray(served.embeddings[0]).tolist(), metadata=meta))

    @functools.cached_property
    def dimensions(self) -> int:
        return self.core.models[EMBED.name].model.config.hidden_size

    async def tei_embed(self, request, grpc_context) -> tei_pb2.EmbedResponse:
        return await self._unary(request, grpc_context, self._embed, tei_pb2.EmbedResponse())

    async def EmbedStream(self, requests, grpc_context):
        async for response in self._each(requests, grpc_context, self._embed):
            yield response

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
        why = ("this model has no sparse (SPLADE) head" if rpc.startswith("EmbedSparse")
               else "the serving core answers pooled embeddings only, not one per token")
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

    async def tei_rerank(self, request, grpc_context) -> tei_pb2.RerankResponse:
        return await self._unary(request, grpc_context, self._rerank, tei_pb2.RerankResponse())

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

    async def tei_predict(self, request, grpc_context) -> tei_pb2.PredictResponse:
        return await self._unary(request, grpc_context, self._predict, tei_pb2.PredictResponse())

    async def PredictPair(self, request, grpc_context) -> tei_pb2.PredictResponse:
        return await self._unary(request, grpc_context, self._predict_pair, tei_pb2.PredictResponse())

    async def PredictStream(self, requests, grpc_context):
        async for response in self._each(requests, grpc_context, self._predict):
            yield response

    async def PredictPairStream(self, requests, grpc_context):
        async for response in self._each(requests, grpc_context, self._predict_pair):
            yield response

    # ----------------------------------------------------------------- tei.v1.Tokenize
    @functools.cached_property
    def tokenizer(self):
        """The checkpoint's tokenizer as the model reads it, whole: TEI's Tokenize neither cuts nor pads."""
        from tokenizers import Tokenizer

        first = next(iter(self.core.models.values()))
        whole = Tokenizer.from_str(first.tokenizer.backend_tokenizer.to_str())
        whole.no_truncation()
        whole.no_padding()
        return whole

    async def _tokenize(self, m, options):
        no_prompt(m)
        (text,) = self.core.validator.texts(m.inputs, "inputs", one=True)
        encoding = self.tokenizer.encode(text, add_special_tokens=m.add_special_tokens)
        # TEI's offsets count UTF-8 bytes (Rust's); Python's tokenizers count characters
        byte_at = list(itertools.accumulate((len(c.encode()) for c in text), initial=0))
        tokens = []
        for token_id, token, (start, stop), special in zip(encoding.ids, encoding.tokens, encoding.offsets,
                                                           encoding.special_tokens_mask):
            if special:
                tokens.append(tei_pb2.SimpleToken(id=token_id, text=token, special=True))
            else:
                tokens.append(tei_pb2.SimpleToken(id=token_id, text=text[start:stop], start=byte_at[start],
                                                  stop=byte_at[stop]))
        return tei_pb2.EncodeResponse(tokens=tokens), None

    async def _decode(self, m, options):
        if not m.ids:
            raise RequestError(422, "ids is empty: send at least one token id")
        vocabulary = self.tokenizer.get_vocab_size()
        unknown = next((i for i, token_id in enumerate(m.ids) if token_id >= vocabulary), None)
        if unknown is not None:
            raise RequestError(422, f"ids[{unknown}] = {m.ids[unknown]} is not a token id (the vocabulary has "
                                    f"{vocabulary})")
        return tei_pb2.DecodeResponse(text=self.tokenizer.decode(list(m.ids), m.skip_special_tokens)), None

    async def Tokenize(self, request, grpc_context) -> tei_pb2.EncodeResponse:
        return await self._unary(request, grpc_context, self._tokenize, tei_pb2.EncodeResponse())

    async def TokenizeStream(self, requests, grpc_context):
        async for response in self._each(requests, grpc_context, self._tokenize):
            yield response

    async def Decode(self, request, grpc_context) -> tei_pb2.DecodeResponse:
        return await self._unary(request, grpc_context, self._decode, tei_pb2.DecodeResponse())

    async def DecodeStream(self, requests, grpc_context):
        async for response in self._each(requests, grpc_context, self._decode):
            yield response

    # ----------------------------------------------------------------- tei.v1.Info
    async def tei_info(self, request, grpc_context=None) -> tei_pb2.InfoResponse:
        """TEI's fields from ``describe()``: the model type is the first served task's; the batch limits
        are the engine's; ``max_concurrent_requests`` stays 0: admission is by time, not by a count."""
        info = self.core.describe()
        first = next(iter(info["tasks"]))
        return tei_pb2.InfoResponse(
            version=package_version(), model_id=info["model"], model_dtype=self.model_dtype,
            model_type=MODEL_TYPES.get(first, tei_pb2.MODEL_TYPE_EMBEDDING),
            max_input_length=info["max_input_tokens"], max_batch_tokens=info["max_batch_tokens"],
            max_batch_requests=info["max_batch_texts"], max_client_batch_size=info["max_inputs"],
            tokenization_workers=1)  # tokenizing runs on the replica's one event loop

    @functools.cached_property
    def model_dtype(self) -> str:
        model = next(iter(self.core.models.values()))
        module = getattr(model, "model", model)
        parameters = getattr(module, "parameters", None)
        return str(next(parameters()).dtype).removeprefix("torch.") if parameters else "float32"


class ElasticAndTeiServicer(GrpcServicer, TeiGrpcServicer):
    """Both packages over one core. The RPC names both define reach one method here (Serve dispatches by
    the method's name alone), which answers in the package of the request's message."""

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


@functools.cache
def package_version() -> str:
    try:
        return package_metadata.version("elasticlm")
    except package_metadata.PackageNotFoundError:
        return "unknown"
