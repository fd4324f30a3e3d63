"""gRPC, without Ray: ``elasticlm.v1.ElasticLM`` messages <-> ``TaskRequest`` / ``TaskAnswer`` around one
``ServingCore`` (``proto/elasticlm.proto``), and ``grpc.health.v1.Health/Check``.

A ``RequestError`` becomes its gRPC status code, its message the details, and the empty response; the
SubLM that served is in the trailing metadata ``x-elasticlm-sublm``. The methods take any context with
grpc's servicer-context API: Serve's ``RayServegRPCContext`` (the deployment in ``ingress.py`` is a
``GrpcServicer``) or a plain ``grpc.aio`` server's, as the request-logic tests run it.
"""

from __future__ import annotations

import grpc
import numpy as np
from grpc_health.v1 import health_pb2

from deployments.contract import RequestError, parse_deadline
from deployments.core import ServingCore, TaskAnswer
from deployments.grpc_api import elasticlm_pb2
from deployments.tasks import EMBED, PREDICT, RERANK
from deployments.wire import DEADLINE_HEADER, MIN_SUBLM_HEADER, RETRY_AFTER_HEADER, SUBLM_HEADER


class GrpcServicer:
    """Every RPC of the service over ``self.core``; the method names are the RPC names (as Serve dispatches)."""

    core: ServingCore

    def __init__(self, core: ServingCore):
        self.core = core

    async def _rpc(self, message, grpc_context, name: str, to_request, answer):
        """One gRPC call on the shared path: ``to_request(message, metadata)`` -> the validated request,
        ``answer(request, task_answer)`` -> the response. A ``RequestError`` becomes its status code and
        the empty response."""
        meta = dict(grpc_context.invocation_metadata())
        try:
            if message is None:  # see deployments/grpc_api/servicer.py
                raise RequestError(400, f"the request body is not a valid elasticlm.v1.{name} message")
            request = to_request(message, meta)
            served: TaskAnswer = await self.core.serve(request)
        except RequestError as e:
            grpc_context.set_code(getattr(grpc.StatusCode, e.grpc_code))
            grpc_context.set_details(e.message)
            if e.retry_after_s:
                grpc_context.set_trailing_metadata([(RETRY_AFTER_HEADER, str(e.retry_after_s))])
            return None
        grpc_context.set_trailing_metadata([(SUBLM_HEADER, served.sublm)])
        return answer(request, served)

    def _options(self, message, meta) -> dict:
        """What every request message and its metadata share: truncate, the quality floor, the deadline."""
        return {"truncate": message.truncate if message.HasField("truncate") else True,
                "min_sublm": self.core.validator.one_floor(message.min_sublm or None, meta.get(MIN_SUBLM_HEADER),
                                                           MIN_SUBLM_HEADER),
                "deadline_ms": parse_deadline(meta.get(DEADLINE_HEADER))}

    async def Embed(self, request: elasticlm_pb2.EmbedRequest, grpc_context) -> elasticlm_pb2.EmbedResponse:
        response = await self._rpc(
            request, grpc_context, "EmbedRequest",
            lambda m, meta: EMBED.request(self.core.validator, list(m.inputs), kind=m.kind or None,
                                          **self._options(m, meta),
                                          dimensions=m.dimensions if m.HasField("dimensions") else None),
            lambda _, served: elasticlm_pb2.EmbedResponse(
                embeddings=[elasticlm_pb2.Embedding(values=row) for row in np.asarray(served.embeddings).tolist()],
                sublm=served.sublm, prompt_tokens=served.num_tokens))
        return response or elasticlm_pb2.EmbedResponse()

    async def Rerank(self, request: elasticlm_pb2.RerankRequest, grpc_context) -> elasticlm_pb2.RerankResponse:
        def answer(valid, served):
            ranks = [elasticlm_pb2.Rank(index=i, score=score, **({"text": valid.texts[i]} if request.return_text else {}))
                     for i, score in served.ranks]
            return elasticlm_pb2.RerankResponse(ranks=ranks, sublm=served.sublm, prompt_tokens=served.num_tokens)

        response = await self._rpc(
            request, grpc_context, "RerankRequest",
            lambda m, meta: RERANK.request(
                self.core.validator, m.query or None, list(m.texts), **self._options(m, meta),
                first_stage_scores=list(m.first_stage_scores) or None, raw_scores=m.raw_scores),
            answer)
        return response or elasticlm_pb2.RerankResponse()

    async def Predict(self, request: elasticlm_pb2.PredictRequest, grpc_context) -> elasticlm_pb2.PredictResponse:
        def answer(_, served):
            (row,) = served.predictions
            return elasticlm_pb2.PredictResponse(
                predictions=[elasticlm_pb2.Prediction(label=label, score=score) for label, score in row],
                sublm=served.sublm, prompt_tokens=served.num_tokens)

        def to_request(m, meta):
            if not m.inputs:
                raise RequestError(422, "inputs is empty: send one text, or a pair for a pair classifier")
            return PREDICT.request(self.core.validator, list(m.inputs), **self._options(m, meta),
                                   raw_scores=m.raw_scores)[0]

        response = await self._rpc(request, grpc_context, "PredictRequest", to_request, answer)
        return response or elasticlm_pb2.PredictResponse()

    async def Info(self, request: elasticlm_pb2.InfoRequest, grpc_context=None) -> elasticlm_pb2.InfoResponse:
        info = self.core.describe()
        predict = info["tasks"].get(PREDICT.name, {})  # the message's classifier fields
        return elasticlm_pb2.InfoResponse(
            model=info["model"], sublms=info["sublms"], target_ms=info["target_ms"],
            tasks=[elasticlm_pb2.TaskInfo(name=name, max_input_tokens=t["max_input_tokens"], target_ms=t["target_ms"],
                                          ranker=t.get("ranker", ""), dimensions=t.get("dimensions", []))
                   for name, t in info["tasks"].items()],
            max_inputs=info["max_inputs"], max_input_chars=info["max_input_chars"],
            max_body_bytes=info["max_body_bytes"], classifier=predict.get("classifier", ""),
            labels=predict.get("labels", []), predict_pairs=predict.get("pairs", False))

    async def Check(self, request: health_pb2.HealthCheckRequest, grpc_context=None) -> health_pb2.HealthCheckResponse:
        return health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVING if self.core.accepting
                                              else health_pb2.HealthCheckResponse.NOT_SERVING)
