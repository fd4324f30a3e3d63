"""OpenAI-compatible embeddings: ``POST /v1/embeddings`` (and TEI's alias ``/embeddings``), ``float`` or
``base64`` rows, for the ``openai`` client with ``base_url=http://host:8000/v1``."""

# no `from __future__ import annotations`: FastAPI reads the handlers' real parameter types
from fastapi import APIRouter, Request
from pydantic import BaseModel, Field

from deployments.contract import parse_deadline
from deployments.core import ServingCore
from deployments.http.common import (OPTION_HEADERS, REFUSALS, JsonInt, float32_base64, one_of, option_headers,
                                     served)
from deployments.tasks import EMBED


class OpenAIEmbeddingRequest(BaseModel):
    input: str | list[str]
    model: str | None = None
    encoding_format: str = Field("float", description="'float' or 'base64' (little-endian float32)",
                                 json_schema_extra={"enum": ["float", "base64"]})
    user: str | None = None
    dimensions: JsonInt | None = Field(None, description="a size the model declares (GET /info: tasks.embed.dimensions); "
                                                     "unset: the full size")


def router(core: ServingCore) -> APIRouter:
    routes = APIRouter()

    @routes.post("/v1/embeddings", summary="OpenAI-compatible embeddings",
                 responses=REFUSALS, openapi_extra=OPTION_HEADERS)
    @routes.post("/embeddings", include_in_schema=False)  # TEI's alias of the same route
    async def openai_embeddings(body: OpenAIEmbeddingRequest, http: Request):
        deadline_ms, min_sublm = option_headers(http)
        one_of("encoding_format", body.encoding_format, ("float", "base64"))
        answer = await core.serve(EMBED.request(core.validator, body.input, True, min_sublm, None,
                                                parse_deadline(deadline_ms), dimensions=body.dimensions,
                                                field="input"))
        rows = answer.embeddings
        if body.encoding_format == "base64":
            rows = [float32_base64(r) for r in rows]
        data = [{"object": "embedding", "index": i, "embedding": e} for i, e in enumerate(rows)]
        return served({"object": "list", "data": data, "model": core.config.model_name, "sublm": answer.sublm,
                       "usage": {"prompt_tokens": answer.num_tokens, "total_tokens": answer.num_tokens}}, answer)

    return routes
