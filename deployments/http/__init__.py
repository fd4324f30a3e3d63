"""HTTP (FastAPI), without Ray: JSON <-> ``TaskRequest`` / ``TaskAnswer`` around one ``ServingCore``, one module
per protocol family (``tei.py``, ``openai.py``, ``cohere.py``) and the app that holds them (``app.py``)."""

from deployments.http.app import build_http_app

__all__ = ["build_http_app"]
