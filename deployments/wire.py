"""The wire's names that every client and the server share, HTTP and gRPC alike. Standard library only:
the load generator (``loadtests/locustfile.py``) and examples import it without the server's dependencies."""

SUBLM_HEADER = "x-elasticlm-sublm"              # the SubLM that served: HTTP header, gRPC trailing metadata
DEADLINE_HEADER = "x-elasticlm-deadline-ms"     # the request's own latency target: HTTP header, gRPC metadata
MIN_SUBLM_HEADER = "x-elasticlm-min-sublm"      # the request's quality floor: HTTP header, gRPC metadata
RETRY_AFTER_HEADER = "retry-after"  # HTTP header (seconds) and, on RESOURCE_EXHAUSTED, gRPC trailing metadata
