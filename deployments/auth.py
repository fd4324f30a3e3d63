"""API keys, without Ray: ``authorization: Bearer <key>`` on every HTTP route and gRPC RPC but health.

The key comes from the replica's environment, ``$ELASTICLM_API_KEY`` or the file ``$ELASTICLM_API_KEY_FILE``
names (a mounted Kubernetes Secret; ``elasticlm serve --api-key`` sets the variable), read once when the
replica starts (``ElasticReplica.__init__``: ``ApiKey.from_environment``) and handed to both protocol
adapters. Unset, the service is open, and each replica says so in one warning as it starts. The key never
enters Serve's config, status or logs, nor any answer; a refusal names what is wrong with the credential
sent, never echoes it.

What stays open is what text-embeddings-inference leaves open with ``--api-key`` (``router/src/http/server.rs``:
its health routes, metrics, docs and OpenAPI schema are merged outside the authenticated routes;
``router/src/grpc/server.rs``: the health and reflection services have no interceptor; ``/info`` and gRPC
``Info`` require the key). Here: HTTP ``GET /health`` (and TEI's ``GET /``, ``GET /ping``), ``GET /docs`` and
``GET /openapi.json`` (the schema states routes and limits, nothing secret, and a client generator needs it),
and gRPC ``grpc.health.v1.Health``. gRPC reflection and Serve's own ``/-/healthz``, ``/-/routes`` and
``ray.serve.RayServeAPIService`` are answered by Ray Serve before any of our code runs, so they stay open too
(they list services and routes, nothing more). Every other path, an unknown one included, answers 401;
every other RPC of ``elasticlm.v1`` and ``tei.v1`` UNAUTHENTICATED.
"""

from __future__ import annotations

import functools
import hmac
import inspect
import logging
import os
from typing import Callable, Iterable

import grpc
import orjson

from deployments.wire import API_KEY_ENV, API_KEY_FILE_ENV, AUTHORIZATION_HEADER, api_key_from_environment

logger = logging.getLogger("ray.serve")  # the replica's log (a logger's name: no Ray import)

# read with GET (or HEAD) only: TEI's health routes (GET /, SageMaker's /ping) beside ours; POST / is inference
OPEN_HTTP_ROUTES = frozenset({"/health", "/", "/ping", "/docs", "/openapi.json"})
OPEN_HTTP_METHODS = frozenset({"GET", "HEAD"})
HOW = f"send '{AUTHORIZATION_HEADER}: Bearer <API key>'"
NO_KEY = f"no API key: {HOW}"
NOT_BEARER = f"the {AUTHORIZATION_HEADER} is not a Bearer token: {HOW}"
WRONG_KEY = "the API key is not valid"
OPEN_WARNING = (f"no API key ({API_KEY_ENV} / {API_KEY_FILE_ENV} unset): every route and RPC of this replica "
                "answers anyone who reaches its ports")


class ApiKey:
    """The key a replica requires (``None``: none, the service is open). Its ``repr`` never shows it."""

    def __init__(self, key: str | None):
        self._token = key.encode() if key else None

    @classmethod
    def from_environment(cls, environ=os.environ) -> "ApiKey":
        """The replica's key (``deployments/wire.py``: ``api_key_from_environment``); unset: open, with the
        replica's one warning (call this once per replica)."""
        api_key = cls(api_key_from_environment(environ))
        if not api_key.required:
            logger.warning(OPEN_WARNING)
        return api_key

    @property
    def required(self) -> bool:
        return self._token is not None

    def problem(self, authorization: bytes | str | None) -> str | None:
        """What is wrong with ``authorization`` (the header's or metadata's value; None: not sent), or None
        when it carries the key (or none is required). ``Bearer`` exactly one space before the key, the
        scheme's case free (RFC 7235); the key compared in constant time."""
        if self._token is None:
            return None
        if authorization is None:
            return NO_KEY
        if isinstance(authorization, str):
            authorization = authorization.encode()
        scheme, _, token = authorization.partition(b" ")
        if scheme.lower() != b"bearer":
            return NOT_BEARER
        return None if hmac.compare_digest(token, self._token) else WRONG_KEY

    def __repr__(self) -> str:
        return f"ApiKey({'required' if self.required else 'none: open'})"


# ----------------------------------------------------------------------------- HTTP
class RequireApiKey:
    """Pure-ASGI middleware: a request off ``OPEN_HTTP_ROUTES`` without the key is answered 401 with
    ``WWW-Authenticate: Bearer`` and the error body every refusal has, before anything reads its body.
    Per request it costs a set lookup and a scan of the headers."""

    def __init__(self, inner, api_key: ApiKey):
        self.inner = inner
        self.api_key = api_key

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or not self.api_key.required or (
                scope["method"] in OPEN_HTTP_METHODS and route_path(scope) in OPEN_HTTP_ROUTES):
            return await self.inner(scope, receive, send)
        sent = next((v for k, v in scope["headers"] if k == b"authorization"), None)
        problem = self.api_key.problem(sent)
        if problem is None:
            return await self.inner(scope, receive, send)
        body = orjson.dumps({"error": problem, "error_type": "Unauthorized"})  # the ErrorBody of every refusal
        await send({"type": "http.response.start", "status": 401,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"www-authenticate", b"Bearer")]})
        await send({"type": "http.response.body", "body": body})


def route_path(scope) -> str:
    """The path the app routes on: without the app's route prefix (``root_path``) when Serve mounts it under one."""
    path, root = scope["path"], scope.get("root_path", "")
    return path[len(root):] if root and path.startswith(root) else path


# ----------------------------------------------------------------------------- gRPC
def grpc_refused(api_key: ApiKey, grpc_context) -> str | None:
    """What is wrong with the credential of ``grpc_context``'s call (None: nothing); if anything, the call's
    status is set: UNAUTHENTICATED, naming the problem. Any context with grpc's servicer-context API (Serve's
    ``RayServegRPCContext`` too)."""
    if not api_key.required:
        return None
    metadata = grpc_context.invocation_metadata() if grpc_context is not None else ()
    problem = api_key.problem(next((v for k, v in metadata if k == AUTHORIZATION_HEADER), None))
    if problem is not None and grpc_context is not None:
        grpc_context.set_code(grpc.StatusCode.UNAUTHENTICATED)
        grpc_context.set_details(problem)
    return problem


class Unauthenticated(Exception):
    """A streaming RPC refused for its credential (the call's code and details are already set)."""


def every_rpc_requires_api_key(rpcs: Iterable[str], refusal: Callable[[str, object], object]):
    """A class decorator: each method named in ``rpcs`` (a servicer's RPCs; ``self.api_key`` the key) runs only
    for a call that carries the key. Another call gets UNAUTHENTICATED and ``refusal(rpc, request)`` (the
    RPC's empty response); a method that streams its answers raises ``Unauthenticated`` instead: Serve's
    proxy copies a context's code onto the call only with a message, so an empty stream would end OK, while
    an exception raised after the code is set reaches the client with that code and details. Serve calls the
    deployment method named like the RPC, so this is the one gate of every RPC; a method left out of
    ``rpcs`` (the health service's ``Check``) stays open."""

    def guard(rpc, name: str):
        if inspect.isasyncgenfunction(rpc):
            @functools.wraps(rpc)
            async def guarded_stream(self, request, grpc_context):
                problem = grpc_refused(self.api_key, grpc_context)
                if problem:
                    raise Unauthenticated(problem)
                async for response in rpc(self, request, grpc_context):
                    yield response

            return guarded_stream

        @functools.wraps(rpc)  # Serve reads the signature through it: it passes grpc_context by name
        async def guarded(self, request, grpc_context=None):
            if grpc_refused(self.api_key, grpc_context):
                return refusal(name, request)
            return await rpc(self, request, grpc_context)

        return guarded

    def decorate(servicer_class):
        for name in sorted(rpcs):
            setattr(servicer_class, name, guard(getattr(servicer_class, name), name))
        return servicer_class

    return decorate
