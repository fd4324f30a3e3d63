"""HTTP and gRPC ingress: translate, validate, call one replica API. Nothing else.

HTTP (FastAPI behind Serve): TEI-compatible ``POST /embed``, OpenAI-compatible
``POST /v1/embeddings``, ``GET /health``, OpenAPI docs at ``/docs``.
gRPC (Serve's gRPC proxy): ``elasticlm.v1.ElasticLM/Embed`` and ``grpc.health.v1.Health/Check``.

Both paths go through ``Ingress._embed``: the same validation, the same limits, the same replica
call, the same errors (``RequestError`` -> HTTP status / gRPC code). The SubLM that served a request
is in the body and in the ``x-elasticlm-sublm`` header / trailing metadata.
"""

# no `from __future__ import annotations`: FastAPI must see the real types through Serve's class-based view
import asyncio
import logging

import grpc
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from grpc_health.v1 import health_pb2
from pydantic import BaseModel, Field
from ray import serve
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle

from deployments.contract import EmbedResult, Limits, RequestError, Validator
from deployments.grpc_api import elasticlm_pb2

logger = logging.getLogger("ray.serve")

SUBLM_HEADER = "x-elasticlm-sublm"
DEADLINE_HEADER = "x-elasticlm-deadline-ms"     # HTTP header and gRPC metadata key
MIN_SUBLM_HEADER = "x-elasticlm-min-sublm"
RETRY_AFTER_S = 1
HEALTH_TIMEOUT_S = 5.0

app = FastAPI(title="elasticlm", version="0.1.0",
              description="Elastic embeddings: under load, quality bends a little instead of latency breaking.")


class TEIEmbedRequest(BaseModel):
    inputs: str | list[str] = Field(..., description="one text or a list of texts")
    truncate: bool = Field(True, description="truncate texts over the model's token limit (false: reject with 413)")
    normalize: bool = Field(True, description="embeddings are always L2-normalized; false is rejected")
    min_sublm: str | None = Field(None, description="quality floor, e.g. 'w50'")
    kind: str | None = Field(None, description="'query' or 'passage'")


class OpenAIEmbeddingRequest(BaseModel):
    input: str | list[str]
    model: str | None = None
    encoding_format: str = Field("float", description="only 'float' is supported")
    user: str | None = None


def _error(status: int, message: str, error_type: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": message, "error_type": error_type}, status_code=status, headers=headers)


@app.exception_handler(RequestError)
async def _request_error(_: Request, e: RequestError):
    return _error(e.status, e.message, e.error_type,
                  {"Retry-After": str(RETRY_AFTER_S)} if e.status == 503 else None)


@app.exception_handler(RequestValidationError)
async def _validation_error(_: Request, e: RequestValidationError):
    errors = e.errors()
    if any(err.get("type") == "json_invalid" for err in errors):
        return _error(400, "the request body is not valid JSON", "Validation")
    where = "; ".join(f"{'.'.join(str(p) for p in err.get('loc', ())[1:]) or 'body'}: {err.get('msg')}"
                      for err in errors)
    return _error(422, where, "Validation")


@serve.deployment(name="Ingress", max_ongoing_requests=256, max_queued_requests=1024)
@serve.ingress(app)
class Ingress:
    def __init__(self, replica: DeploymentHandle, checkpoint: str, max_inputs: int = 256,
                 max_input_chars: int = 100_000, model_name: str = "elastic-minilm-l6"):
        from elastic_core.model import load_config, load_tokenizer

        config = load_config(checkpoint)
        self.validator = Validator(load_tokenizer(config), config.max_seq_length, config.sublm_names,
                                   Limits(max_inputs=max_inputs, max_input_chars=max_input_chars))
        self.replica = replica
        self.model_name = model_name

    # ----------------------------------------------------------------- the one shared call
    async def _embed(self, inputs, truncate=True, min_sublm=None, kind=None, deadline_ms=None) -> EmbedResult:
        job = self.validator.embed_job(inputs, truncate=truncate, min_sublm=min_sublm, kind=kind,
                                       deadline_ms=deadline_ms)
        try:
            result = await self.replica.embed.remote(job)
        except BackPressureError:
            raise RequestError(503, "overloaded: every replica's queue is full; retry shortly", "Overloaded") from None
        if isinstance(result, RequestError):  # refused by the replica's admission
            raise result
        return result

    @staticmethod
    def _deadline(raw) -> float | None:
        if raw in (None, ""):
            return None
        try:
            return float(raw)
        except ValueError:
            raise RequestError(400, f"{DEADLINE_HEADER} must be a number of milliseconds, got {raw!r}") from None

    # ----------------------------------------------------------------- HTTP
    @app.post("/embed", summary="TEI-compatible embeddings", response_model=list[list[float]])
    async def embed(self, body: TEIEmbedRequest, request: Request):
        if not body.normalize:
            raise RequestError(400, "normalize=false is not supported: embeddings are L2-normalized")
        result = await self._embed(body.inputs, body.truncate,
                                   body.min_sublm or request.headers.get(MIN_SUBLM_HEADER), body.kind,
                                   self._deadline(request.headers.get(DEADLINE_HEADER)))
        return JSONResponse(result.embeddings.tolist(), headers={SUBLM_HEADER: result.sublm})

    @app.post("/v1/embeddings", summary="OpenAI-compatible embeddings")
    async def openai_embeddings(self, body: OpenAIEmbeddingRequest, request: Request):
        if body.encoding_format != "float":
            raise RequestError(400, f"encoding_format {body.encoding_format!r} is not supported; use 'float'")
        result = await self._embed(body.input, True, request.headers.get(MIN_SUBLM_HEADER), None,
                                   self._deadline(request.headers.get(DEADLINE_HEADER)))
        data = [{"object": "embedding", "index": i, "embedding": e} for i, e in enumerate(result.embeddings.tolist())]
        return JSONResponse({"object": "list", "data": data, "model": self.model_name, "sublm": result.sublm,
                             "usage": {"prompt_tokens": result.prompt_tokens, "total_tokens": result.prompt_tokens}},
                            headers={SUBLM_HEADER: result.sublm})

    @app.get("/health", summary="200 once a model replica answers (readiness), 503 before")
    async def health(self):
        try:
            await asyncio.wait_for(self.replica.stats.remote(), timeout=HEALTH_TIMEOUT_S)
        except Exception as e:  # noqa: BLE001 - any failure to reach a replica means not ready
            return _error(503, f"no model replica is ready: {type(e).__name__}", "Unhealthy")
        return {"status": "ok", "sublms": self.validator.sublms}

    # ----------------------------------------------------------------- gRPC
    async def Embed(self, request: elasticlm_pb2.EmbedRequest, grpc_context) -> elasticlm_pb2.EmbedResponse:
        meta = dict(grpc_context.invocation_metadata())
        try:
            if request is None:  # see deployments/grpc_api/servicer.py
                raise RequestError(400, "the request body is not a valid elasticlm.v1.EmbedRequest message")
            result = await self._embed(list(request.inputs),
                                       request.truncate if request.HasField("truncate") else True,
                                       request.min_sublm or meta.get(MIN_SUBLM_HEADER), request.kind or None,
                                       self._deadline(meta.get(DEADLINE_HEADER)))
        except RequestError as e:
            grpc_context.set_code(getattr(grpc.StatusCode, e.grpc_code))
            grpc_context.set_details(e.message)
            return elasticlm_pb2.EmbedResponse()
        grpc_context.set_trailing_metadata([(SUBLM_HEADER, result.sublm)])
        return elasticlm_pb2.EmbedResponse(
            embeddings=[elasticlm_pb2.Embedding(values=row) for row in result.embeddings.tolist()],
            sublm=result.sublm, prompt_tokens=result.prompt_tokens)

    async def Check(self, request: health_pb2.HealthCheckRequest, grpc_context=None) -> health_pb2.HealthCheckResponse:
        healthy = (await self.health()) == {"status": "ok", "sublms": self.validator.sublms}
        return health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVING if healthy
                                              else health_pb2.HealthCheckResponse.NOT_SERVING)
