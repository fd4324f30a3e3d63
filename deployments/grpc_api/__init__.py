"""Python stubs for proto/elasticlm.proto, generated at install time (``make setup``) and
regenerated here whenever they are missing or older than the .proto."""

from deployments.grpc_api.generate import ensure_generated

ensure_generated()

from deployments.grpc_api import elasticlm_pb2, elasticlm_pb2_grpc  # noqa: E402

__all__ = ["elasticlm_pb2", "elasticlm_pb2_grpc"]
