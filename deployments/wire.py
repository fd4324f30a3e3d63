"""The wire's names that every client and the server share, HTTP and gRPC alike. Standard library only:
the load generator (``loadtests/locustfile.py``) and examples import it without the server's dependencies."""

import os

SUBLM_HEADER = "x-elasticlm-sublm"              # the SubLM that served: HTTP header, gRPC trailing metadata
DEADLINE_HEADER = "x-elasticlm-deadline-ms"     # the request's own latency target: HTTP header, gRPC metadata
MIN_SUBLM_HEADER = "x-elasticlm-min-sublm"      # the request's quality floor: HTTP header, gRPC metadata
RETRY_AFTER_HEADER = "retry-after"  # HTTP header (seconds) and, on RESOURCE_EXHAUSTED, gRPC trailing metadata

# API keys (deployments/auth.py): a client sends "authorization: Bearer <key>", an HTTP header or gRPC metadata
AUTHORIZATION_HEADER = "authorization"
API_KEY_ENV = "ELASTICLM_API_KEY"               # the key: the server's and its clients' alike
API_KEY_FILE_ENV = "ELASTICLM_API_KEY_FILE"     # or a file holding it (e.g. a mounted Kubernetes Secret)


def api_key_from_environment(environ=os.environ) -> str | None:
    """The API key of ``$ELASTICLM_API_KEY``, or in the file ``$ELASTICLM_API_KEY_FILE`` names (surrounding
    whitespace, such as a file's last newline, removed); None when neither is set. A key set but empty, or
    one that cannot travel in a header (visible ASCII only), is an error: a server must not quietly run open.
    Messages name the variable, never the key."""
    value, source = environ.get(API_KEY_ENV), API_KEY_ENV
    if environ.get(API_KEY_FILE_ENV) is not None:
        if value is not None:
            raise ValueError(f"both {API_KEY_ENV} and {API_KEY_FILE_ENV} are set: set one")
        source = f"the file {environ[API_KEY_FILE_ENV]} ({API_KEY_FILE_ENV})"
        try:
            with open(environ[API_KEY_FILE_ENV], encoding="ascii") as f:
                value = f.read()
        except (OSError, UnicodeDecodeError) as e:
            raise ValueError(f"cannot read the API key from {source}: {type(e).__name__}") from None
    if value is None:
        return None
    key = value.strip()
    if not key:
        raise ValueError(f"the API key in {source} is empty")
    if not all("!" <= c <= "~" for c in key):
        raise ValueError(f"the API key in {source} has a character other than visible ASCII (it travels in a header)")
    return key


def api_key_header(environ=os.environ) -> dict[str, str]:
    """What a client adds to its HTTP headers or gRPC metadata: the environment's key, if any."""
    key = api_key_from_environment(environ)
    return {AUTHORIZATION_HEADER: f"Bearer {key}"} if key else {}
