"""HTTP (FastAPI), without Ray: JSON <-> ``TaskRequest`` / ``TaskAnswer`` around one ``ServingCore``.

TEI-compatible ``POST /embed``, ``/rerank``, ``/predict``; OpenAI-compatible ``POST /v1/embeddings``
(``float`` or ``base64``); Cohere / Jina-compatible ``POST /v1/rerank``; ``GET /health``, ``GET /info``;
``/openapi.json`` (with the replica's limits) and docs at ``/docs``. A handler translates the body and
headers into the validator's arguments, calls ``core.serve`` and lays the answer out; a ``RequestError``
becomes its status code and the error body every refusal has. The SubLM that served is in the
``x-elasticlm-sublm`` header. ``build_http_app(core)`` is what the Serve deployment answers HTTP with
(``deployments/ingress.py``) and what the request-logic tests call in process.
"""

# no `from __future__ import annotations`: FastAPI reads the handlers' real parameter types
import base64
import copy

import orjson
from fastapi import FastAPI, Header, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import Response
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from deployments.contract import MAX_BODY_BYTES, NOT_BLANK_PATTERN, RequestError, parse_deadline
from deployments.core import ServingCore
from deployments.tasks import EMBED, PREDICT, RERANK, SERVED_TASKS
from deployments.wire import DEADLINE_HEADER, MIN_SUBLM_HEADER, SUBLM_HEADER
from elastic_core.denser import KINDS


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
    truncate: bool = Field(True, description="cut a pair over the ranker's token limit: the text's tail, the query "
                                             "kept whole up to half the limit (false: reject with 413)")
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
ROUTE_TASKS = {route: task.name for task in SERVED_TASKS.values() for route in task.http_routes}


def openapi_with_limits(schema: dict, info: dict) -> dict:
    """The app's OpenAPI schema with this replica's limits (``ServingCore.describe()``) on every text field;
    routes of tasks the replica does not serve are left out."""
    text = {"type": "string", "minLength": 1, "maxLength": info["max_input_chars"], "pattern": NOT_BLANK_PATTERN}
    texts = {"type": "array", "items": text, "minItems": 1, "maxItems": info["max_inputs"]}
    models = schema["components"]["schemas"]
    schema["paths"] = {path: ops for path, ops in schema["paths"].items()
                       if ROUTE_TASKS.get(path) in (None, *info["tasks"])}
    for task in info["tasks"]:
        SERVED_TASKS[task].openapi_limits(models, info, text, texts)
    for model in models.values():  # every request model with a quality floor
        if "min_sublm" in model.get("properties", {}):
            model["properties"]["min_sublm"]["enum"] = [*info["sublms"], None]
    for path in schema["paths"].values():
        for operation in path.values():
            for parameter in operation.get("parameters", ()):
                if parameter["name"] == MIN_SUBLM_HEADER:
                    parameter["schema"] = {"anyOf": [{"enum": info["sublms"]}, {"type": "null"}]}
    return schema


# ----------------------------------------------------------------------------- refusals, one shape
def error_response(status: int, message: str, error_type: str, retry_after_s: int | None = None) -> Response:
    headers = {"Retry-After": str(retry_after_s or 1)} if status == 503 else None
    return JSON({"error": message, "error_type": error_type}, status_code=status, headers=headers)


async def _request_error(_: Request, e: RequestError):
    return error_response(e.status, e.message, e.error_type, e.retry_after_s)


async def _http_error(_: Request, e: StarletteHTTPException):
    """Starlette's own refusals (no such route, wrong method, body too large) in the same shape as ours,
    with their headers (a 405 names the allowed methods in Allow)."""
    if e.status_code == 413:
        return _too_large()
    response = error_response(e.status_code, str(e.detail), "NotFound" if e.status_code == 404 else "Validation")
    response.headers.update(e.headers or {})
    return response


async def _validation_error(_: Request, e: RequestValidationError):
    errors = e.errors()
    if any(err.get("type") == "json_invalid" for err in errors):
        return error_response(400, "the request body is not valid JSON", "Validation")
    where = "; ".join(f"{'.'.join(str(p) for p in err.get('loc', ())[1:]) or 'body'}: {err.get('msg')}"
                      for err in errors)
    return error_response(422, where, "Validation")


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
    return error_response(413, f"the request body is over the limit of {MAX_BODY_BYTES} bytes", "Validation")


# ----------------------------------------------------------------------------- the routes
def build_http_app(core: ServingCore) -> FastAPI:
    """The HTTP face of ``core``: every route translates, calls ``core.serve`` once, and lays the answer out."""
    # /openapi.json and /docs are routes of their own (below): the schema states the replica's limits
    app = FastAPI(title="elasticlm", version="0.2.0", openapi_url=None, docs_url=None, redoc_url=None,
                  description="Elastic embeddings: under load, quality bends a little instead of latency breaking.")
    app.add_exception_handler(RequestError, _request_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_middleware(BodyLimit)
    validator = core.validator
    openapi_schema: dict = {}

    @app.post("/embed", summary="TEI-compatible embeddings", response_model=list[list[float]], responses=REFUSALS)
    async def embed(body: TEIEmbedRequest, deadline_ms: str | None = DEADLINE, min_sublm: str | None = MIN_SUBLM):
        if not body.normalize:
            raise RequestError(400, "normalize=false is not supported: embeddings are L2-normalized")
        answer = await core.serve(EMBED.request(
            validator, body.inputs, body.truncate, validator.one_floor(body.min_sublm, min_sublm, MIN_SUBLM_HEADER),
            body.kind, parse_deadline(deadline_ms)))
        return JSON(answer.embeddings, headers={SUBLM_HEADER: answer.sublm})

    @app.post("/v1/embeddings", summary="OpenAI-compatible embeddings", responses=REFUSALS)
    async def openai_embeddings(body: OpenAIEmbeddingRequest, deadline_ms: str | None = DEADLINE,
                                min_sublm: str | None = MIN_SUBLM):
        if body.encoding_format not in ("float", "base64"):
            raise RequestError(400, f"encoding_format {body.encoding_format!r} is not supported; "
                                    "use 'float' or 'base64'")
        answer = await core.serve(EMBED.request(validator, body.input, True, min_sublm, None,
                                                parse_deadline(deadline_ms)))
        rows = answer.embeddings
        if body.encoding_format == "base64":  # 4 bytes a float instead of ~10 characters of JSON
            rows = [base64.b64encode(r.astype("<f4").tobytes()).decode() for r in rows]
        data = [{"object": "embedding", "index": i, "embedding": e} for i, e in enumerate(rows)]
        return JSON({"object": "list", "data": data, "model": core.config.model_name, "sublm": answer.sublm,
                     "usage": {"prompt_tokens": answer.num_tokens, "total_tokens": answer.num_tokens}},
                    headers={SUBLM_HEADER: answer.sublm})

    @app.post("/rerank", summary="TEI-compatible reranking: the candidates best first",
              response_model=list[RankBody], responses=REFUSALS)
    async def rerank(body: TEIRerankRequest, deadline_ms: str | None = DEADLINE, min_sublm: str | None = MIN_SUBLM):
        request = RERANK.request(validator, body.query, body.texts, body.truncate,
                                 validator.one_floor(body.min_sublm, min_sublm, MIN_SUBLM_HEADER),
                                 parse_deadline(deadline_ms), body.first_stage_scores, body.raw_scores)
        answer = await core.serve(request)
        ranks = [{"index": i, "score": score, **({"text": request.texts[i]} if body.return_text else {})}
                 for i, score in answer.ranks]
        return JSON(ranks, headers={SUBLM_HEADER: answer.sublm})

    @app.post("/v1/rerank", summary="Cohere / Jina-compatible reranking", responses=REFUSALS)
    async def rerank_documents(body: RerankDocumentsRequest, deadline_ms: str | None = DEADLINE,
                               min_sublm: str | None = MIN_SUBLM):
        if body.top_n is not None and body.top_n < 1:
            raise RequestError(400, f"top_n must be at least 1, got {body.top_n}")
        request = RERANK.request(validator, body.query, body.documents, True, min_sublm, parse_deadline(deadline_ms),
                                 body.first_stage_scores)
        answer = await core.serve(request)
        results = [{"index": i, "relevance_score": score,
                    **({"document": {"text": request.texts[i]}} if body.return_documents else {})}
                   for i, score in answer.ranks[:body.top_n]]
        return JSON({"results": results, "model": core.config.model_name, "sublm": answer.sublm,
                     "usage": {"total_tokens": answer.num_tokens}}, headers={SUBLM_HEADER: answer.sublm})

    @app.post("/predict", summary="TEI-compatible classification: every label's score, best first",
              response_model=list[PredictionBody] | list[list[PredictionBody]], responses=REFUSALS)
    async def predict(body: TEIPredictRequest, deadline_ms: str | None = DEADLINE, min_sublm: str | None = MIN_SUBLM):
        request, batch = PREDICT.request(
            validator, body.inputs, body.truncate, validator.one_floor(body.min_sublm, min_sublm, MIN_SUBLM_HEADER),
            parse_deadline(deadline_ms), body.raw_scores)
        answer = await core.serve(request)
        rows = [[{"label": label, "score": score} for label, score in row] for row in answer.predictions]
        return JSON(rows if batch else rows[0], headers={SUBLM_HEADER: answer.sublm})

    @app.get("/health", summary="200 while this replica serves, 503 while it starts or drains",
             responses={503: REFUSALS[503]})
    async def health():
        if not core.accepting:
            return error_response(503, "the replica is shutting down", "Unhealthy")
        return JSON(core.health())

    @app.get("/info", summary="the model, its SubLMs, the latency target and the request limits")
    async def info():
        return JSON(core.describe())

    @app.get("/openapi.json", include_in_schema=False)
    async def openapi(request: Request):
        if not openapi_schema:
            openapi_schema.update(openapi_with_limits(copy.deepcopy(request.app.openapi()), core.describe()))
        return JSON(openapi_schema)

    @app.get("/docs", include_in_schema=False)
    async def docs():
        return get_swagger_ui_html(openapi_url="/openapi.json", title="elasticlm")

    return app
