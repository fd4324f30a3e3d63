"""How a client reaches the service through more than one proxy, and retries what may be retried.

Production runs a proxy on every node behind a load balancer; a client that knows the proxies itself (the
examples, the load generator, ``make cluster``'s ``env.sh``) lists them: ``$ELASTICLM_HTTP_ENDPOINTS``
(``http://127.0.0.1:8000,http://127.0.0.1:8001``) and ``$ELASTICLM_GRPC_ENDPOINTS``
(``127.0.0.1:9000,127.0.0.1:9001``). Every RPC and route of this service is idempotent (an embedding, a
score, a label, the service's info): resending one that a dying proxy dropped computes it again, nothing more.

* gRPC: one channel over every proxy (``grpc_target``: ``ipv4:`` lists them all, ``round_robin`` spreads the
  calls and skips a proxy whose connection failed) and gRPC's own retry policy (``grpc_service_config``):
  a call that fails UNAVAILABLE (a connection refused or cut before an answer) is sent again, to a proxy
  that is up, a bounded number of times with exponential backoff. Never RESOURCE_EXHAUSTED: that is the
  service's deliberate refusal, with its own Retry-After.
* HTTP: ``Failover``: the proxy that answered last; on a connection failure (refused, reset, closed
  without an answer: never a time-out, never an HTTP status) the next one, at most ``attempts`` sends of
  one request. No HTTP library offers this across hosts (urllib3's ``Retry``, httpx's transport retries
  and geventhttpclient retry on one host, and only refused connects or idempotent methods, not a POST).

Standard library only: the examples and the load generator import it without the server's dependencies.
"""

from __future__ import annotations

import ipaddress
import json
import os
from dataclasses import dataclass, field

HTTP_ENDPOINTS_ENV = "ELASTICLM_HTTP_ENDPOINTS"
GRPC_ENDPOINTS_ENV = "ELASTICLM_GRPC_ENDPOINTS"

# every gRPC service the proxies serve (proto/elasticlm.proto, proto/tei.proto); tests/test_two_proxies.py
# fails when a proto gains a service this list does not name, so each new one is judged idempotent or not
IDEMPOTENT_GRPC_SERVICES = ("elasticlm.v1.ElasticLM", "tei.v1.Info", "tei.v1.Embed", "tei.v1.Predict",
                            "tei.v1.Rerank", "tei.v1.Tokenize")
# gRPC's own ceiling on maxAttempts (a larger value is clamped to it)
GRPC_MAX_ATTEMPTS = 5


def endpoints(value: str | None, default: str) -> list[str]:
    """A comma-separated list (an option's or an environment variable's value), ``default`` when unset or empty."""
    listed = [e.strip().rstrip("/") for e in (value or "").split(",") if e.strip()]
    return listed or [default.rstrip("/")]


def http_endpoints(option: str | None = None, default: str = "http://127.0.0.1:8000") -> list[str]:
    return endpoints(option or os.environ.get(HTTP_ENDPOINTS_ENV), default)


def grpc_endpoints(option: str | None = None, default: str = "127.0.0.1:9000") -> list[str]:
    return endpoints(option or os.environ.get(GRPC_ENDPOINTS_ENV), default)


def grpc_target(addresses: list[str]) -> str:
    """One channel target for every proxy. gRPC's ``ipv4:`` scheme takes a list of literal addresses (the
    ``dns:`` resolver takes one name, which may resolve to several: a load balancer's or a headless Service's)."""
    if len(addresses) == 1:
        return addresses[0]
    for address in addresses:
        host, _, port = address.rpartition(":")
        try:
            ipaddress.IPv4Address(host)
        except ValueError:
            raise ValueError(f"{address!r}: several gRPC endpoints must be IPv4 address:port (or give one DNS "
                             "name that resolves to every proxy)") from None
        if not port.isdigit():
            raise ValueError(f"{address!r}: no port")
    return "ipv4:" + ",".join(addresses)


def grpc_service_config(max_attempts: int = 4, initial_backoff_s: float = 0.1, max_backoff_s: float = 1.0) -> str:
    """gRPC's service config (JSON) for a channel over several proxies: ``round_robin`` over them, and a
    call that fails UNAVAILABLE sent again at most ``max_attempts`` times in all, after a pause drawn at
    random up to ``initial_backoff_s`` x 2^(retry - 1), at most ``max_backoff_s`` (gRPC's retry design,
    gRFC A6). ``max_attempts`` 1: no retry."""
    if not 1 <= max_attempts <= GRPC_MAX_ATTEMPTS:
        raise ValueError(f"max_attempts must be 1..{GRPC_MAX_ATTEMPTS} (gRPC's ceiling), got {max_attempts}")
    config: dict = {"loadBalancingConfig": [{"round_robin": {}}]}
    if max_attempts > 1:
        config["methodConfig"] = [{
            "name": [{"service": s} for s in IDEMPOTENT_GRPC_SERVICES],
            "retryPolicy": {"maxAttempts": max_attempts, "initialBackoff": f"{initial_backoff_s:g}s",
                            "maxBackoff": f"{max_backoff_s:g}s", "backoffMultiplier": 2,
                            "retryableStatusCodes": ["UNAVAILABLE"]}}]
    return json.dumps(config)


def grpc_channel_options(max_attempts: int = 4, target: str = "") -> list[tuple[str, object]]:
    """``grpc.insecure_channel(target, options=grpc_channel_options(target=target))``. For an ``ipv4:`` list,
    the ``:authority`` of every call is its first address: by default gRPC sends the whole list, commas
    included, and HAProxy resets such a stream as malformed (RST_STREAM PROTOCOL_ERROR, seen as INTERNAL)."""
    options: list[tuple[str, object]] = [("grpc.service_config", grpc_service_config(max_attempts)),
                                         ("grpc.enable_retries", 1)]
    if target.startswith("ipv4:"):
        options.append(("grpc.default_authority", target.removeprefix("ipv4:").split(",")[0]))
    return options


@dataclass
class Failover:
    """Where an HTTP client sends: the endpoint that answered last (no connect paid to a dead proxy per
    request); after a connection failure, the next one. One request is sent ``attempts`` times at most:
    at once to each endpoint not yet tried for it, then after ``pause_s`` (all are failing: a single proxy
    restarting, the whole service down)."""

    endpoints: list[str]
    attempts: int = 4
    initial_backoff_s: float = 0.1
    max_backoff_s: float = 1.0
    current: int = field(default=0)

    def __post_init__(self):
        if not self.endpoints:
            raise ValueError("no endpoints")
        if self.attempts < 1:
            raise ValueError(f"attempts must be >= 1, got {self.attempts}")
        self.current %= len(self.endpoints)

    @property
    def endpoint(self) -> str:
        return self.endpoints[self.current]

    def failed(self) -> None:
        """The current endpoint's connection failed: the next request, and this one's resend, go to the next."""
        self.current = (self.current + 1) % len(self.endpoints)

    def may_retry(self, attempt: int) -> bool:
        """After the ``attempt``-th send of a request (1-based) failed to connect: may it be sent again?"""
        return attempt < self.attempts

    def pause_s(self, attempt: int) -> float:
        """The pause before the next send, after the ``attempt``-th one (1-based) failed to connect."""
        beyond = attempt - len(self.endpoints)  # sends beyond one to each endpoint
        return 0.0 if beyond < 0 else min(self.max_backoff_s, self.initial_backoff_s * 2 ** beyond)
