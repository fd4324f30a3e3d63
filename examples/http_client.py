"""An HTTP client for elasticlm (TEI's ``POST /embed``) over every proxy of the service, with httpx.

    .venv/bin/python examples/http_client.py "first text" "second text"
    .venv/bin/python examples/http_client.py --endpoints http://127.0.0.1:8000,http://127.0.0.1:8001 "text"

The proxies: ``--endpoints``, else ``$ELASTICLM_HTTP_ENDPOINTS`` (``make cluster``'s ``env.sh`` sets it), else
http://127.0.0.1:8000. A request whose connection is refused, reset or closed without an answer (a proxy
down) goes to the next proxy at once, then after a short backoff, at most ``--attempts`` sends in all
(``deployments/endpoints.py:Failover``); every route is idempotent, so a resend computes the same answer.
A 503 (the service is full) is sent again after its ``Retry-After``, for at most ``--patience-s``. Never
resent: a time-out (the request may still be running) or a 4xx (the request itself is wrong).
With ``$ELASTICLM_API_KEY`` set, the call carries the key.
"""

from __future__ import annotations

import argparse
import time

import httpx

from deployments.endpoints import Failover, http_endpoints
from deployments.wire import RETRY_AFTER_HEADER, SUBLM_HEADER, api_key_header

# httpx's names for a connection refused, reset or closed before the answer; never its time-outs
CONNECTION_FAILURES = (httpx.ConnectError, httpx.ReadError, httpx.WriteError, httpx.RemoteProtocolError)


def post(client: httpx.Client, failover: Failover, path: str, body: dict, patience_s: float = 10.0) -> httpx.Response:
    """``body`` to ``path`` of the first proxy that connects; a 503 again after its Retry-After while
    ``patience_s`` lasts. Raises what the last attempt raised, or ``HTTPStatusError`` for any other error."""
    give_up_at, failures = time.monotonic() + patience_s, 0
    while True:
        try:
            response = client.post(failover.endpoint + path, json=body, headers=api_key_header())
        except CONNECTION_FAILURES:
            failures += 1
            failover.failed()
            if not failover.may_retry(failures):
                raise
            time.sleep(failover.pause_s(failures))
            continue
        if response.status_code == 503:
            pause = float(response.headers.get(RETRY_AFTER_HEADER) or 1)
            if time.monotonic() + pause < give_up_at:
                time.sleep(pause)
                continue
        return response.raise_for_status()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("texts", nargs="+")
    parser.add_argument("--endpoints", help="comma-separated base URLs of every proxy")
    parser.add_argument("--attempts", type=int, default=4, help="sends of one request at most on connection failures")
    parser.add_argument("--patience-s", type=float, default=10.0, help="how long 503s are waited out")
    a = parser.parse_args()
    failover = Failover(http_endpoints(a.endpoints), attempts=a.attempts)
    with httpx.Client(timeout=30) as client:
        response = post(client, failover, "/embed", {"inputs": a.texts}, a.patience_s)
    print(f"served by SubLM {response.headers[SUBLM_HEADER]} through {failover.endpoint}")
    for text, row in zip(a.texts, response.json()):
        print(f"{text[:40]!r}: dim {len(row)}, first values {[round(v, 4) for v in row[:4]]}")


if __name__ == "__main__":
    main()
