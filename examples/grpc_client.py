"""A gRPC client for elasticlm (what a search backend would write), over every proxy of the service.

    .venv/bin/python examples/grpc_client.py "first text" "second text" [--deadline-ms 50] [--min-sublm w50]
    .venv/bin/python examples/grpc_client.py --endpoints 127.0.0.1:9000,127.0.0.1:9001 "text"

The proxies: ``--endpoints``, else ``--host`` / ``--port``, else ``$ELASTICLM_GRPC_ENDPOINTS`` (``make cluster``'s
``env.sh`` sets it), else 127.0.0.1:9000. One channel spreads the calls over all of them (``round_robin``) and
gRPC's own retry policy resends a call that fails UNAVAILABLE (a proxy down: refused or cut before an answer)
to one that is up, at most ``--attempts`` times in all (``deployments/endpoints.py``). Every RPC here is
idempotent; RESOURCE_EXHAUSTED (the service's refusal under load, with ``retry-after``) is never resent.
With ``$ELASTICLM_API_KEY`` (or ``$ELASTICLM_API_KEY_FILE``) set, the call carries the key.
"""

import argparse

import grpc

from deployments.endpoints import grpc_channel_options, grpc_endpoints, grpc_target
from deployments.grpc_api import elasticlm_pb2, elasticlm_pb2_grpc
from deployments.wire import DEADLINE_HEADER, SUBLM_HEADER, api_key_header


def embed(texts, target=None, app="elasticlm", deadline_ms=None, min_sublm="", timeout_s=10.0, attempts=4):
    """``target``: a gRPC target (``127.0.0.1:9000``, ``ipv4:127.0.0.1:9000,127.0.0.1:9001``); default:
    every proxy of ``$ELASTICLM_GRPC_ENDPOINTS``."""
    metadata = [("application", app), *api_key_header().items()]  # $ELASTICLM_API_KEY, when set
    if deadline_ms:
        # Serve's gRPC proxy does not pass the call's deadline on, so the budget also travels as metadata
        metadata.append((DEADLINE_HEADER, str(deadline_ms)))
    target = target or grpc_target(grpc_endpoints())
    with grpc.insecure_channel(target, options=grpc_channel_options(attempts, target)) as channel:
        stub = elasticlm_pb2_grpc.ElasticLMStub(channel)
        # the time-out covers every attempt: retries never stretch the caller's budget
        response, call = stub.Embed.with_call(elasticlm_pb2.EmbedRequest(inputs=texts, min_sublm=min_sublm),
                                              metadata=metadata, timeout=timeout_s)
        trailing = dict(call.trailing_metadata() or ())
    return response, trailing


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("texts", nargs="+")
    parser.add_argument("--endpoints", help="comma-separated host:port of every proxy (IPv4 addresses)")
    parser.add_argument("--host", help="one proxy's host (default 127.0.0.1)")
    parser.add_argument("--port", type=int, help="one proxy's port (default 9000)")
    parser.add_argument("--app", default="elasticlm")
    parser.add_argument("--deadline-ms", type=float)
    parser.add_argument("--min-sublm", default="")
    parser.add_argument("--attempts", type=int, default=4, help="sends of a call at most (1: no retry; gRPC allows 5)")
    a = parser.parse_args()
    one = f"{a.host or '127.0.0.1'}:{a.port or 9000}" if a.host or a.port else None
    target = grpc_target(grpc_endpoints(a.endpoints or one))
    response, trailing = embed(a.texts, target, a.app, a.deadline_ms, a.min_sublm, attempts=a.attempts)
    print(f"served by SubLM {response.sublm} (trailing metadata: {trailing.get(SUBLM_HEADER)}), "
          f"{response.prompt_tokens} tokens")
    for text, e in zip(a.texts, response.embeddings):
        print(f"{text[:40]!r}: dim {len(e.values)}, first values {[round(v, 4) for v in e.values[:4]]}")


if __name__ == "__main__":
    main()
