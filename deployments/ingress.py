"""HTTP and gRPC: translate, validate, call one replica API. Nothing else.

HTTP (FastAPI): TEI-compatible ``POST /embed``, OpenAI-compatible ``POST /v1/embeddings`` (``float``
or ``base64``), ``GET /health``, ``GET /info``; ``/openapi.json`` (with this replica's limits) and
docs at ``/docs``.
gRPC: ``elasticlm.v1.ElasticLM/Embed`` and ``grpc.health.v1.Health/Check`` (``proto/elasticlm.proto``).

Both go through ``ElasticReplica._serve``: the same validation, the same limits, the same admission, the
same engine call, the same errors (``RequestError`` -> HTTP status / gRPC code). The SubLM that
served a request is in the body and in the ``x-elasticlm-sublm`` header / trailing metadata.

``ElasticReplica`` is the one Serve deployment: each replica holds a ``Replica`` (the model and
the engine, ``deployments/replica.py``) and, with Serve's direct ingress, answers HTTP and gRPC
itself; HAProxy in front balances over replicas. A request costs one process and no Ray hop.
Measured: a proxy and a separate ingress deployment cost ~20 ms of CPU per request here; this
path ~2 ms (docs/benchmarks.md).
"""

# no `from __future__ import annotations`: FastAPI must see the real types through Serve's class-based view
import base64
import copy
import logging

import grpc
import numpy as np
import orjson
from fastapi import FastAPI, Header, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import Response
from grpc_health.v1 import health_pb2
from pydantic import BaseModel, Field
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException

from deployments.config import ReplicaConfig
from deployments.contract import MAX_BODY_BYTES, NOT_BLANK_PATTERN, RequestError, TaskRequest, overloaded, predictions, ranked
from deployments.grpc_api import elasticlm_pb2
from deployments.replica import Replica
from elastic_core.denser import KINDS
from elastic_core.engine import Job, Overloaded, Served

logger = logging.getLogger("ray.serve")

SUBLM_HEADER = "x-elasticlm-sublm"
DEADLINE_HEADER = "x-elasticlm-deadline-ms"     # HTTP header and gRPC metadata key
MIN_SUBLM_HEADER = "x-elasticlm-min-sublm"
RETRY_AFTER_HEADER = "retry-after"  # HTTP header (seconds) and, on RESOURCE_EXHAUSTED, gRPC trailing metadata

# /openapi.json and /docs are the replica's own routes (below): the schema states its configured limits
app = FastAPI(title="elasticlm", version="0.2.0", openapi_url=None, docs_url=None, redoc_url=None,
              description="Elastic embeddings: under load, quality bends a little instead of latency breaking.")


class JSON(Response):
    """orjson, with numpy arrays serialized natively (10x cheaper than ``json`` on 384 floats)."""

    media_type = "application/json"

    def render(self, content) -> bytes:
        return orjson.dumps(content, option=orjson.OPT_SERIALIZE_NUMPY)


# The request models document what the one validator (deployments/contract.py) accepts; they do not
# validate beyond JSON types, so HTTP and gRPC refuse the same things with the same messages. Limits
# that depend on the replica's settings are written into the schema by `openapi_with_limits`.
class TEIEmbedRequest(BaseModel):
    inputs: str | list[str] = Field(..., description="one text or a list of texts")
    truncate: bool = Field(True, description="truncate texts over the model's token limit (false: reject with 413)")
    normalize: bool = Field(True, description="embeddings are always L2-normalized; false is rejected",
                            json_schema_extra={"enum": [True]})
    min_sublm: str | None = Field(None, description="quality floor, e.g. 'w50'")
    kind: str | None = Field(None, description="'query' or 'passage'", json_schema_extra={"enum": [*KINDS, None]})


class OpenAIEmbeddingRequest(BaseModel):
    input: str | list[str]
    model: str | None = None
    encoding_format: str = Field("float", description="'float' or 'base64' (little-endian float32)",
                                 json_schema_extra={"enum": ["float", "base64"]})
    user: str | None = None


class TEIRerankRequest(BaseModel):
    query: str = Field(..., description="the text every candidate is judged against")
    texts: list[str] = Field(..., description="the candidates (e.g. a first stage's top 20-100)")
    truncate: bool = Field(True, description="cut a pair over the ranker's token limit, longest text first "
                                             "(false: reject with 413)")
    raw_scores: bool = Field(False, description="the ranker's raw relevance (a cross-encoder's logit, the dense "
                                                "ranker's cosine) instead of a 0..1 score")
    return_text: bool = Field(False, description="echo each candidate's text in its rank")
    min_sublm: str | None = Field(None, description="quality floor, e.g. 'w50'")
    first_stage_scores: list[float] | None = Field(
        None, description="hybrid reranking: the first stage's score of each text (e.g. BM25), in the texts' order; "
                          "the answer is the ranker's order fused with the first stage's (reciprocal-rank fusion)")


class RerankDocumentsRequest(BaseModel):
    query: str = Field(..., description="the text every document is judged against")
    documents: list[str] = Field(..., description="the candidates")
    top_n: int | None = Field(None, description="answer only the best n (default: all)")
    return_documents: bool = Field(False, description="echo each document's text")
    model: str | None = None
    first_stage_scores: list[float] | None = Field(
        None, description="hybrid reranking: the first stage's score of each document (e.g. BM25), in the documents' order; "
                          "the answer is the ranker's order fused with the first stage's (reciprocal-rank fusion)")


class TEIPredictRequest(BaseModel):
    inputs: str | list[str] | list[list[str]] = Field(
        ..., description="one text, a pair [first, second], or a batch [[text], ...] / [[first, second], ...]; "
                         "pairs only for a pair classifier (GET /info: tasks.predict.pairs)")
    truncate: bool = Field(True, description="truncate inputs over the classifier's token limit (false: reject with 413)")
    raw_scores: bool = Field(False, description="logits instead of softmax probabilities")
    min_sublm: str | None = Field(None, description="quality floor, e.g. 'w50'")


class RankBody(BaseModel):
    index: int = Field(..., description="the candidate's position in the request")
    score: float
    text: str | None = Field(None, description="the candidate, with return_text")


class PredictionBody(BaseModel):
    label: str
    score: float


class ErrorBody(BaseModel):
    error: str = Field(..., description="what is wrong, naming the field, the limit or the condition")
    error_type: str = Field(..., description="Validation, Overloaded, NotFound or Unhealthy")


REFUSALS = {400: {"model": ErrorBody, "description": "a field has a value the service does not accept"},
            413: {"model": ErrorBody, "description": "over a limit: body bytes, texts, characters or tokens"},
            422: {"model": ErrorBody, "description": "malformed: a missing field, a wrong type, an empty text"},
            503: {"model": ErrorBody, "description": "overloaded: not answerable within the latency target",
                  "headers": {"Retry-After": {
                      "description": "seconds to wait: grows with the refusals per admitted request (1 to 30)",
                      "schema": {"type": "integer"}}}}}
# the headers are read by the one validator too; the patterns only document them
DEADLINE = Header(None, alias=DEADLINE_HEADER, description="this request's latency target in ms (tighter than T)",
                  json_schema_extra={"pattern": r"^[0-9]*[1-9][0-9]*(\.[0-9]+)?$"})
MIN_SUBLM = Header(None, alias=MIN_SUBLM_HEADER, description="quality floor, e.g. 'w50' (as the body's min_sublm)")
ROUTE_TASKS = {"/embed": "embed", "/v1/embeddings": "embed", "/rerank": "rerank", "/v1/rerank": "rerank",
               "/predict": "predict"}


def openapi_with_limits(schema: dict, info: dict) -> dict:
    """The app's OpenAPI schema with this replica's limits (``Replica.describe()``) on every text field;
    routes of tasks the replica does not serve are left out."""
    text = {"type": "string", "minLength": 1, "maxLength": info["max_input_chars"], "pattern": NOT_BLANK_PATTERN}
    texts = {"type": "array", "items": text, "minItems": 1, "maxItems": info["max_inputs"]}
    models = schema["components"]["schemas"]
    schema["paths"] = {path: ops for path, ops in schema["paths"].items()
                       if ROUTE_TASKS.get(path) in (None, *info["tasks"])}
    if "embed" in info["tasks"]:
        for model, field in (("TEIEmbedRequest", "inputs"), ("OpenAIEmbeddingRequest", "input")):
            models[model]["properties"][field]["anyOf"] = [text, texts]
    if "rerank" in info["tasks"]:
        for model, field in (("TEIRerankRequest", "texts"), ("RerankDocumentsRequest", "documents")):
            models[model]["properties"][field] = texts | {"title": field.title()}
            models[model]["properties"]["query"] |= text
            models[model]["properties"]["first_stage_scores"]["anyOf"][0]["maxItems"] = info["max_inputs"]
        models["RerankDocumentsRequest"]["properties"]["top_n"]["anyOf"][0]["minimum"] = 1
    if "predict" in info["tasks"]:
        width = 2 if info["tasks"]["predict"]["pairs"] else 1
        example = {"type": "array", "items": text, "minItems": width, "maxItems": width}
        batch = {"type": "array", "items": example, "minItems": 1, "maxItems": info["max_inputs"]}
        models["TEIPredictRequest"]["properties"]["inputs"]["anyOf"] = [example, batch] + ([text] if width == 1 else [])
    for model in ("TEIEmbedRequest", "TEIRerankRequest", "TEIPredictRequest"):
        if model in models:
            models[model]["properties"]["min_sublm"]["enum"] = [*info["sublms"], None]
    for path in schema["paths"].values():
        for operation in path.values():
            for parameter in operation.get("parameters", ()):
                if parameter["name"] == MIN_SUBLM_HEADER:
                    parameter["schema"] = {"anyOf": [{"enum": info["sublms"]}, {"type": "null"}]}
    return schema


def _error(status: int, message: str, error_type: str, retry_after_s: int | None = None) -> Response:
    headers = {"Retry-After": str(retry_after_s or 1)} if status == 503 else None
    return JSON({"error": message, "error_type": error_type}, status_code=status, headers=headers)


@app.exception_handler(RequestError)
async def _request_error(_: Request, e: RequestError):
    return _error(e.status, e.message, e.error_type, e.retry_after_s)


@app.exception_handler(StarletteHTTPException)
async def _http_error(_: Request, e: StarletteHTTPException):
    """Starlette's own refusals (no such route, wrong method, body too large) in the same shape as ours,
    with their headers (a 405 names the allowed methods in Allow)."""
    if e.status_code == 413:
        return _too_large()
    response = _error(e.status_code, str(e.detail), "NotFound" if e.status_code == 404 else "Validation")
    response.headers.update(e.headers or {})
    return response


@app.exception_handler(RequestValidationError)
async def _validation_error(_: Request, e: RequestValidationError):
    errors = e.errors()
    if any(err.get("type") == "json_invalid" for err in errors):
        return _error(400, "the request body is not valid JSON", "Validation")
    where = "; ".join(f"{'.'.join(str(p) for p in err.get('loc', ())[1:]) or 'body'}: {err.get('msg')}"
                      for err in errors)
    return _error(422, where, "Validation")


class BodyLimit:
    """Refuses a body over ``MAX_BODY_BYTES`` before it is read into memory, let alone parsed into Python
    objects: a declared Content-Length at once, a chunked body as it arrives; 413 in our error shape.
    (FastAPI's own ``max_body_size`` answers a declared length with a plain-text "Content Too Large"
    that replaces any handler's response.)"""

    def __init__(self, inner):
        self.inner = inner

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.inner(scope, receive, send)
        declared = next((v for k, v in scope["headers"] if k == b"content-length"), b"")
        if declared.isdigit() and int(declared) > MAX_BODY_BYTES:
            return await _too_large()(scope, receive, send)
        seen = 0

        async def counted():
            nonlocal seen
            event = await receive()
            seen += len(event.get("body", b""))
            if seen > MAX_BODY_BYTES:  # FastAPI passes an HTTPException through to the handler below
                raise StarletteHTTPException(413)
            return event

        await self.inner(scope, counted, send)


def _too_large() -> Response:
    return _error(413, f"the request body is over the limit of {MAX_BODY_BYTES} bytes", "Validation")


app.add_middleware(BodyLimit)


def _deadline(raw) -> float | None:
    if raw is None:  # present but empty is malformed, not absent
        return None
    try:
        return float(raw)
    except ValueError:
        raise RequestError(400, f"{DEADLINE_HEADER} must be a number of milliseconds, got {raw!r}") from None


@serve.deployment(name="ElasticReplica", max_ongoing_requests=1024, ray_actor_options={"num_cpus": 1})
@serve.ingress(app)
class ElasticReplica:
    def __init__(self, config: ReplicaConfig | dict | None = None):
        self.replica = Replica(config)
        self.engine, self.validator = self.replica.engine, self.replica.validator
        self._openapi: dict | None = None

    # ----------------------------------------------------------------- the one shared call
    async def _serve(self, request: TaskRequest) -> Served:
        """Every task, both protocols: deadline check, admission, tokenization, the engine's queue."""
        if request.task not in self.engine.lanes:
            raise RequestError(404, f"this deployment does not serve {request.task} (its tasks: "
                                    f"{list(self.engine.lanes)})", "NotFound")
        examples, tokens = request.examples, self.validator.estimate_tokens(request)
        if request.deadline_ms is not None:  # unmeetable at any load: the client's to change, not to retry
            alone = self.engine.alone_ms(request.task, examples, tokens, request.min_sublm)
            if alone > request.deadline_ms:
                raise RequestError(400, f"a deadline of {request.deadline_ms:g} ms is shorter than this request "
                                        f"takes alone on its fastest allowed SubLM (~{alone:.1f} ms here): "
                                        "send a longer deadline, fewer texts or no quality floor")
        # admission before tokenizing: under overload refusing must cost next to nothing
        if not self.engine.admits(request.task, examples, tokens, request.min_sublm, request.deadline_ms):
            self.replica.count_shed()
            raise overloaded(self.engine.pacing.retry_after_s())
        input_ids, token_type_ids = self.validator.tokenize(request)
        job = Job(input_ids, token_type_ids, task=request.task, min_sublm=request.min_sublm,
                  deadline_ms=request.deadline_ms)
        try:
            return await self.engine.submit(job)
        except Overloaded:
            raise overloaded(self.engine.pacing.retry_after_s()) from None

    def _labels(self) -> list[str]:
        return self.replica.models["predict"].labels

    def _unit_score(self, raw):
        return self.replica.models["rerank"].unit_score(raw)

    # ----------------------------------------------------------------- HTTP
    @app.post("/embed", summary="TEI-compatible embeddings", response_model=list[list[float]], responses=REFUSALS)
    async def embed(self, body: TEIEmbedRequest, deadline_ms: str | None = DEADLINE, min_sublm: str | None = MIN_SUBLM):
        if not body.normalize:
            raise RequestError(400, "normalize=false is not supported: embeddings are L2-normalized")
        served = await self._serve(self.validator.embed_request(
            body.inputs, body.truncate, self.validator.one_floor(body.min_sublm, min_sublm, MIN_SUBLM_HEADER),
            body.kind, _deadline(deadline_ms)))
        return JSON(served.outputs, headers={SUBLM_HEADER: served.sublm})

    @app.post("/v1/embeddings", summary="OpenAI-compatible embeddings", responses=REFUSALS)
    async def openai_embeddings(self, body: OpenAIEmbeddingRequest, deadline_ms: str | None = DEADLINE,
                                min_sublm: str | None = MIN_SUBLM):
        if body.encoding_format not in ("float", "base64"):
            raise RequestError(400, f"encoding_format {body.encoding_format!r} is not supported; "
                                    "use 'float' or 'base64'")
        served = await self._serve(self.validator.embed_request(body.input, True, min_sublm, None,
                                                                _deadline(deadline_ms)))
        rows = served.outputs
        if body.encoding_format == "base64":  # 4 bytes a float instead of ~10 characters of JSON
            rows = [base64.b64encode(r.astype("<f4").tobytes()).decode() for r in rows]
        data = [{"object": "embedding", "index": i, "embedding": e} for i, e in enumerate(rows)]
        return JSON({"object": "list", "data": data, "model": self.replica.model_name, "sublm": served.sublm,
                     "usage": {"prompt_tokens": served.num_tokens, "total_tokens": served.num_tokens}},
                    headers={SUBLM_HEADER: served.sublm})

    @app.post("/rerank", summary="TEI-compatible reranking: the candidates best first",
              response_model=list[RankBody], responses=REFUSALS)
    async def rerank(self, body: TEIRerankRequest, deadline_ms: str | None = DEADLINE,
                     min_sublm: str | None = MIN_SUBLM):
        request = self.validator.rerank_request(body.query, body.texts, body.truncate,
                                                self.validator.one_floor(body.min_sublm, min_sublm, MIN_SUBLM_HEADER),
                                                _deadline(deadline_ms), body.first_stage_scores)
        served = await self._serve(request)
        ranks = [{"index": i, "score": score, **({"text": request.texts[i]} if body.return_text else {})}
                 for i, score in ranked(served.outputs, body.raw_scores, unit=self._unit_score,
                                        first_stage_scores=request.first_stage_scores)]
        return JSON(ranks, headers={SUBLM_HEADER: served.sublm})

    @app.post("/v1/rerank", summary="Cohere / Jina-compatible reranking", responses=REFUSALS)
    async def rerank_documents(self, body: RerankDocumentsRequest, deadline_ms: str | None = DEADLINE,
                               min_sublm: str | None = MIN_SUBLM):
        if body.top_n is not None and body.top_n < 1:
            raise RequestError(400, f"top_n must be at least 1, got {body.top_n}")
        request = self.validator.rerank_request(body.query, body.documents, True, min_sublm, _deadline(deadline_ms),
                                                body.first_stage_scores)
        served = await self._serve(request)
        results = [{"index": i, "relevance_score": score,
                    **({"document": {"text": request.texts[i]}} if body.return_documents else {})}
                   for i, score in ranked(served.outputs, top_n=body.top_n, unit=self._unit_score,
                                          first_stage_scores=request.first_stage_scores)]
        return JSON({"results": results, "model": self.replica.model_name, "sublm": served.sublm,
                     "usage": {"total_tokens": served.num_tokens}}, headers={SUBLM_HEADER: served.sublm})

    @app.post("/predict", summary="TEI-compatible classification: every label's score, best first",
              response_model=list[PredictionBody] | list[list[PredictionBody]], responses=REFUSALS)
    async def predict(self, body: TEIPredictRequest, deadline_ms: str | None = DEADLINE,
                      min_sublm: str | None = MIN_SUBLM):
        request, batch = self.validator.predict_request(
            body.inputs, body.truncate, self.validator.one_floor(body.min_sublm, min_sublm, MIN_SUBLM_HEADER),
            _deadline(deadline_ms))
        served = await self._serve(request)
        rows = [[{"label": label, "score": score} for label, score in row]
                for row in predictions(served.outputs, self._labels(), body.raw_scores)]
        return JSON(rows if batch else rows[0], headers={SUBLM_HEADER: served.sublm})

    @app.get("/health", summary="200 while this replica serves, 503 while it starts or drains",
             responses={503: REFUSALS[503]})
    async def health(self):
        if not self.engine.accepting:
            return _error(503, "the replica is shutting down", "Unhealthy")
        return JSON({"status": "ok", "tasks": list(self.engine.lanes),
                     "sublms": next(iter(self.engine.lanes.values())).schedule.sublms})

    @app.get("/info", summary="the model, its SubLMs, the latency target and the request limits")
    async def info(self):
        return JSON(self.replica.describe())

    @app.get("/openapi.json", include_in_schema=False)
    async def openapi(self, request: Request):
        if self._openapi is None:
            self._openapi = openapi_with_limits(copy.deepcopy(request.app.openapi()), self.replica.describe())
        return JSON(self._openapi)

    @app.get("/docs", include_in_schema=False)
    async def docs(self):
        return get_swagger_ui_html(openapi_url="/openapi.json", title="elasticlm")

    # ----------------------------------------------------------------- gRPC
    async def _rpc(self, message, grpc_context, name: str, to_request, answer):
        """One gRPC call on the shared path: ``to_request(message, metadata)`` -> the validated request,
        ``answer(request, served)`` -> the response. A ``RequestError`` becomes its status code and
        the empty response."""
        meta = dict(grpc_context.invocation_metadata())
        try:
            if message is None:  # see deployments/grpc_api/servicer.py
                raise RequestError(400, f"the request body is not a valid elasticlm.v1.{name} message")
            request = to_request(message, meta)
            served = await self._serve(request)
        except RequestError as e:
            grpc_context.set_code(getattr(grpc.StatusCode, e.grpc_code))
            grpc_context.set_details(e.message)
            if e.retry_after_s:
                grpc_context.set_trailing_metadata([(RETRY_AFTER_HEADER, str(e.retry_after_s))])
            return None
        grpc_context.set_trailing_metadata([(SUBLM_HEADER, served.sublm)])
        return answer(request, served)

    def _grpc_options(self, message, meta) -> dict:
        """What every request message and its metadata share: truncate, the quality floor, the deadline."""
        return {"truncate": message.truncate if message.HasField("truncate") else True,
                "min_sublm": self.validator.one_floor(message.min_sublm or None, meta.get(MIN_SUBLM_HEADER),
                                                      MIN_SUBLM_HEADER),
                "deadline_ms": _deadline(meta.get(DEADLINE_HEADER))}

    async def Embed(self, request: elasticlm_pb2.EmbedRequest, grpc_context) -> elasticlm_pb2.EmbedResponse:
        response = await self._rpc(
            request, grpc_context, "EmbedRequest",
            lambda m, meta: self.validator.embed_request(list(m.inputs), kind=m.kind or None,
                                                         **self._grpc_options(m, meta)),
            lambda _, served: elasticlm_pb2.EmbedResponse(
                embeddings=[elasticlm_pb2.Embedding(values=row) for row in np.asarray(served.outputs).tolist()],
                sublm=served.sublm, prompt_tokens=served.num_tokens))
        return response or elasticlm_pb2.EmbedResponse()

    async def Rerank(self, request: elasticlm_pb2.RerankRequest, grpc_context) -> elasticlm_pb2.RerankResponse:
        def answer(valid, served):
            ranks = [elasticlm_pb2.Rank(index=i, score=score, **({"text": valid.texts[i]} if request.return_text else {}))
                     for i, score in ranked(served.outputs, request.raw_scores, unit=self._unit_score,
                                            first_stage_scores=valid.first_stage_scores)]
            return elasticlm_pb2.RerankResponse(ranks=ranks, sublm=served.sublm, prompt_tokens=served.num_tokens)

        response = await self._rpc(
            request, grpc_context, "RerankRequest",
            lambda m, meta: self.validator.rerank_request(m.query or None, list(m.texts), **self._grpc_options(m, meta),
                                                          first_stage_scores=list(m.first_stage_scores) or None),
            answer)
        return response or elasticlm_pb2.RerankResponse()

    async def Predict(self, request: elasticlm_pb2.PredictRequest, grpc_context) -> elasticlm_pb2.PredictResponse:
        def answer(_, served):
            (row,) = predictions(served.outputs, self._labels(), request.raw_scores)
            return elasticlm_pb2.PredictResponse(
                predictions=[elasticlm_pb2.Prediction(label=label, score=score) for label, score in row],
                sublm=served.sublm, prompt_tokens=served.num_tokens)

        def to_request(m, meta):
            if not m.inputs:
                raise RequestError(422, "inputs is empty: send one text, or a pair for a pair classifier")
            return self.validator.predict_request(list(m.inputs), **self._grpc_options(m, meta))[0]

        response = await self._rpc(request, grpc_context, "PredictRequest", to_request, answer)
        return response or elasticlm_pb2.PredictResponse()

    async def Info(self, request: elasticlm_pb2.InfoRequest, grpc_context=None) -> elasticlm_pb2.InfoResponse:
        info = self.replica.describe()
        predict = info["tasks"].get("predict", {})
        return elasticlm_pb2.InfoResponse(
            model=info["model"], sublms=info["sublms"], target_ms=info["target_ms"],
            tasks=[elasticlm_pb2.TaskInfo(name=name, max_input_tokens=t["max_input_tokens"], target_ms=t["target_ms"],
                                          ranker=t.get("ranker", ""))
                   for name, t in info["tasks"].items()],
            max_inputs=info["max_inputs"], max_input_chars=info["max_input_chars"],
            max_body_bytes=info["max_body_bytes"], classifier=predict.get("classifier", ""),
            labels=predict.get("labels", []), predict_pairs=predict.get("pairs", False))

    async def Check(self, request: health_pb2.HealthCheckRequest, grpc_context=None) -> health_pb2.HealthCheckResponse:
        return health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVING if self.engine.accepting
                                              else health_pb2.HealthCheckResponse.NOT_SERVING)

    # ----------------------------------------------------------------- Serve hooks and operators
    def record_autoscaling_stats(self) -> dict[str, float]:
        return self.replica.autoscaling_stats()

    async def stats(self, last: int | None = None, records: bool = False) -> dict:
        """For operators, tests and benchmarks (a deployment-handle call, not an HTTP route)."""
        return self.replica.stats(last, records)

    async def __del__(self):
        """Graceful shutdown: finish what was accepted, then leave the shared depth."""
        await self.replica.close()
