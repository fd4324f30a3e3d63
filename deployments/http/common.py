"""What every HTTP route shares: the JSON response, the one refusal shape, the headers a request may carry,
and the answer that names its SubLM."""

# no `from __future__ import annotations`: FastAPI reads the handlers' real parameter types
import base64
from typing import Annotated

import orjson
from fastapi import Request
from fastapi.responses import Response
from pydantic import BaseModel, BeforeValidator, Field
from pydantic_core import PydanticCustomError

from deployments.contract import RequestError, echo
from deployments.core import TaskAnswer
from deployments.wire import DEADLINE_HEADER, MIN_SUBLM_HEADER, SUBLM_HEADER


def _json_integer(value):
    """JSON Schema's integer is a number without a fraction (5 or 5.0); pydantic's lax ``int`` also takes
    ``true`` and ``"5"``, which the schema refuses (schemathesis: ``"top_n": true`` was accepted)."""
    if isinstance(value, (bool, str)):
        raise PydanticCustomError("int_type", "Input should be a valid integer")
    return value


JsonInt = Annotated[int, BeforeValidator(_json_integer)]  # request fields the schema calls integer


class JSON(Response):
    """orjson, with numpy arrays serialized natively (10x cheaper than ``json`` on 384 floats)."""

    media_type = "application/json"

    def render(self, content) -> bytes:
        return orjson.dumps(content, option=orjson.OPT_SERIALIZE_NUMPY)


def served(content, answer: TaskAnswer) -> JSON:
    """An answer, naming the SubLM that served it (every route's answer does)."""
    return JSON(content, headers={SUBLM_HEADER: answer.sublm})


class ErrorBody(BaseModel):
    error: str = Field(..., description="what is wrong, naming the field, the limit or the condition")
    error_type: str = Field(..., description="Validation, Overloaded, NotFound, Unhealthy or Unauthorized")


def error_response(status: int, message: str, error_type: str, retry_after_s: int | None = None) -> Response:
    """Every refusal, whatever the route's protocol family: TEI's body (``error``, ``error_type``)."""
    headers = {"Retry-After": str(retry_after_s or 1)} if status == 503 else None
    return JSON({"error": message, "error_type": error_type}, status_code=status, headers=headers)


REFUSALS = {400: {"model": ErrorBody, "description": "a field has a value the service does not accept"},
            413: {"model": ErrorBody, "description": "over a limit: body bytes, texts, characters or tokens"},
            422: {"model": ErrorBody, "description": "malformed: a missing field, a wrong type, an empty text"},
            503: {"model": ErrorBody, "description": "overloaded: not answerable within the latency target",
                  "headers": {"Retry-After": {
                      "description": "seconds to wait: grows with the refusals per admitted request (1 to 30)",
                      "schema": {"type": "integer"}}}}}
# A request's own options in headers, beside the body's. Read from the request (``option_headers``), not as
# handler parameters (``Header(...)``): FastAPI 0.165 re-inspects a header parameter's annotation on every
# request, which cost 0.08 ms of a replica's ~0.4 ms of event-loop CPU per one-text embedding. ``OPTION_HEADERS``
# states them in the OpenAPI schema (every task route's ``openapi_extra``); the patterns only document them: the
# validator checks the values.
OPTION_HEADERS = {"parameters": [
    {"name": DEADLINE_HEADER, "in": "header", "required": False,
     "description": "this request's latency target in ms (tighter than T)",
     "schema": {"anyOf": [{"type": "string", "pattern": r"^[0-9]*[1-9][0-9]*(\.[0-9]+)?$"}, {"type": "null"}]}},
    {"name": MIN_SUBLM_HEADER, "in": "header", "required": False,
     "description": "quality floor, e.g. 'w50' (as the body's min_sublm)",
     "schema": {"anyOf": [{"type": "string"}, {"type": "null"}]}},  # the served SubLMs: openapi_with_limits
]}


def option_headers(request: Request) -> tuple[str | None, str | None]:
    """The request's deadline and quality-floor headers (``OPTION_HEADERS``), as sent."""
    return request.headers.get(DEADLINE_HEADER), request.headers.get(MIN_SUBLM_HEADER)


def one_of(name: str, value, accepted) -> None:
    """A wire-only option (a protocol's own enum) with a value the service does not accept: 400 naming them."""
    if value not in accepted:
        raise RequestError(400, f"{name} must be one of {list(accepted)}, got {echo(value)}")


def float32_base64(row) -> str:
    """One embedding as OpenAI's and Cohere's base64: its little-endian float32 bytes (4 bytes a float instead
    of ~10 characters of JSON)."""
    return base64.b64encode(row.astype("<f4").tobytes()).decode()
