"""A gRPC client for elasticlm (what a search backend would write).

    .venv/bin/python examples/grpc_client.py "first text" "second text" [--deadline-ms 50] [--min-sublm w50]

With ``$ELASTICLM_API_KEY`` (or ``$ELASTICLM_API_KEY_FILE``) set, the call carries the key.
"""

import argparse

import grpc

from deployments.grpc_api import elasticlm_pb2, elasticlm_pb2_grpc
from deployments.wire import DEADLINE_HEADER, SUBLM_HEADER, api_key_header


def embed(texts, host="127.0.0.1", port=9000, app="elasticlm", deadline_ms=None, min_sublm="", timeout_s=10.0):
    metadata = [("application", app), *api_key_header().items()]  # $ELASTICLM_API_KEY, when set
    if deadline_ms:
        # Serve's gRPC proxy does not pass the call's deadline on, so the budget also travels as metadata
        metadata.append((DEADLINE_HEADER, str(deadline_ms)))
    with grpc.insecure_channel(f"{host}:{port}") as channel:
        stub = elasticlm_pb2_grpc.ElasticLMStub(channel)
        response, call = stub.Embed.with_call(elasticlm_pb2.EmbedRequest(inputs=texts, min_sublm=min_sublm),
                                              metadata=metadata, timeout=timeout_s)
        trailing = dict(call.trailing_metadata() or ())
    return response, trailing


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("texts", nargs="+")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9000)
    parser.add_argument("--app", default="elasticlm")
    parser.add_argument("--deadline-ms", type=float)
    parser.add_argument("--min-sublm", default="")
    a = parser.parse_args()
    response, trailing = embed(a.texts, a.host, a.port, a.app, a.deadline_ms, a.min_sublm)
    print(f"served by SubLM {response.sublm} (trailing metadata: {trailing.get(SUBLM_HEADER)}), "
          f"{response.prompt_tokens} tokens")
    for text, e in zip(a.texts, response.embeddings):
        print(f"{text[:40]!r}: dim {len(e.values)}, first values {[round(v, 4) for v in e.values[:4]]}")


if __name__ == "__main__":
    main()
