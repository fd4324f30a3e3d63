"""Python stubs for proto/elasticlm.proto and proto/tei.proto, generated at install time (``make setup``)
and regenerated here whenever they are missing or older than their .proto."""

from deployments.grpc_api.generate import ensure_generated

ensure_generated()

from deployments.grpc_api import elasticlm_pb2, elasticlm_pb2_grpc, tei_pb2, tei_pb2_grpc  # noqa: E402

__all__ = ["elasticlm_pb2", "elasticlm_pb2_grpc", "tei_pb2", "tei_pb2_grpc"]
