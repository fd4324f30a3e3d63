"""``build_http_app(core)``: the HTTP face of one ``ServingCore``, without Ray. The Serve deployment answers
HTTP with it (``deployments/ingress.py``), and the request-logic tests call it in process.

Every protocol family's routes are its own module (``tei.py``, ``openai.py``, ``cohere.py``), each only
translating its wire format into one ``core.serve`` call and back; here: the refusals, one shape for all
(TEI's ``{"error", "error_type"}``, a ``RequestError``'s status code), the body limit, ``GET /health``
(and TEI's ``/`` and ``/ping``), ``GET /info`` (ours and TEI's fields in one body), ``/openapi.json``
(with the replica's limits) and the docs at ``/docs``.
"""

# no `from __future__ import annotations`: FastAPI reads the handlers' real parameter types
import copy

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from deployments.auth import ApiKey, RequireApiKey
from deployments.contract import MAX_BODY_BYTES, NOT_BLANK_PATTERN, RequestError
from deployments.core import ServingCore
from deployments.http import cohere, openai, tei
from deployments.http.common import JSON, REFUSALS, error_response
from deployments.tasks import SERVED_TASKS
from deployments.tei import info_fields, whole_tokenizer
from deployments.wire import MIN_SUBLM_HEADER

ROUTE_TASKS = {route: task.name for task in SERVED_TASKS.values() for route in task.http_routes}


def openapi_with_limits(schema: dict, info: dict, vocabulary: int) -> dict:
    """The app's OpenAPI schema with this replica's limits (``ServingCore.describe()``) on every text field
    and the tokenizer's ``vocabulary`` on token ids; routes of tasks the replica does not serve are left out."""
    text = {"type": "string", "minLength": 1, "maxLength": info["max_input_chars"], "pattern": NOT_BLANK_PATTERN}
    texts = {"type": "array", "items": text, "minItems": 1, "maxItems": info["max_inputs"]}
    models = schema["components"]["schemas"]
    schema["paths"] = {path: ops for path, ops in schema["paths"].items()
                       if ROUTE_TASKS.get(path) in (None, *info["tasks"])}
    for task in info["tasks"]:
        SERVED_TASKS[task].openapi_limits(models, info, text, texts)
    # no task's routes: every replica tokenizes
    models["TEITokenizeRequest"]["properties"]["inputs"]["anyOf"] = [text, texts]
    ids = {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": vocabulary - 1}, "minItems": 1}
    models["TEIDecodeRequest"]["properties"]["ids"]["anyOf"] = [ids, {"type": "array", "items": ids, "minItems": 1,
                                                                       "maxItems": info["max_inputs"]}]
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
async def _request_error(_: Request, e: RequestError):
    return error_response(e.status, e.message, e.error_type, e.retry_after_s)


async def _http_error(_: Request, e: StarletteHTTPException):
    """Starlette's own refusals (no such route, wrong method, body too large) in the same shape as ours,
    with their headers (a 405 names the allowed methods in Allow)."""
    if e.status_code == 413:
        return _too_large()
    if isinstance(e.__cause__, UnicodeDecodeError):  # FastAPI's "error parsing the body" says no more than that
        bad = e.__cause__
        return error_response(400, f"the request body is not valid {bad.encoding.upper()}: byte "
                                   f"0x{bad.object[bad.start]:02x} at offset {bad.start}", "Validation")
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


# ----------------------------------------------------------------------------- the app
def build_http_app(core: ServingCore, api_key: ApiKey | None = None) -> FastAPI:
    """The HTTP face of ``core``: every route translates, calls ``core.serve`` once, and lays the answer out.
    ``api_key``: what every route but health and the docs requires (None: the environment's; deployments/auth.py)."""
    # /openapi.json and /docs are routes of their own (below): the schema states the replica's limits
    app = FastAPI(title="elasticlm", version="0.2.0", openapi_url=None, docs_url=None, redoc_url=None,
                  description="Elastic embeddings: under load, quality bends a little instead of latency breaking.")
    app.add_exception_handler(RequestError, _request_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_middleware(BodyLimit)
    app.add_middleware(RequireApiKey, api_key=ApiKey.from_environment() if api_key is None else api_key)  # outermost
    for family in (tei, openai, cohere):
        app.include_router(family.router(core))
    openapi_schema: dict = {}

    @app.get("/health", summary="200 while this replica serves, 503 while it starts or drains",
             responses={503: REFUSALS[503]})
    @app.get("/", include_in_schema=False)      # TEI's health routes: its root and SageMaker's /ping
    @app.get("/ping", include_in_schema=False)
    async def health():
        if not core.accepting:
            return error_response(503, "the replica is shutting down", "Unhealthy")
        return JSON(core.health())

    @app.get("/info", summary="the model, its SubLMs, the latency target and the request limits; "
                              "text-embeddings-inference's fields beside them")
    async def info():
        ours = core.describe()
        return JSON(ours | info_fields(core, ours))

    @app.get("/openapi.json", include_in_schema=False)
    async def openapi(request: Request):
        if not openapi_schema:
            vocabulary = whole_tokenizer(core.validator).get_vocab_size()
            openapi_schema.update(openapi_with_limits(copy.deepcopy(request.app.openapi()), core.describe(),
                                                      vocabulary))
        return JSON(openapi_schema)

    @app.get("/docs", include_in_schema=False)
    async def docs():
        return get_swagger_ui_html(openapi_url="/openapi.json", title="elasticlm")

    return app
