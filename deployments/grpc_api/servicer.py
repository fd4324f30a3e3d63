"""The servicer function named in the Serve config's ``grpc_servicer_functions``.

It registers the generated handlers of every RPC, except that a request that does not decode as its
message (e.g. ``EmbedRequest``) becomes ``None`` instead of failing inside gRPC (which would answer INTERNAL):
``ElasticReplica.Embed`` (deployments/ingress.py) then answers INVALID_ARGUMENT naming the problem, as HTTP answers 400 for
malformed JSON. Serve's proxy keeps each handler's deserializer, so this is all it takes.
"""

import grpc
from google.protobuf.message import DecodeError

from deployments.grpc_api import elasticlm_pb2

SERVICE = "elasticlm.v1.ElasticLM"
RPCS = [m.name for m in elasticlm_pb2.DESCRIPTOR.services_by_name["ElasticLM"].methods]


def _lenient(message_type):
    def parse(data: bytes):
        try:
            return message_type.FromString(data)
        except DecodeError:
            return None

    return parse


def add_ElasticLMServicer_to_server(servicer, server):
    handlers = {
        name: grpc.unary_unary_rpc_method_handler(
            getattr(servicer, name), request_deserializer=_lenient(getattr(elasticlm_pb2, f"{name}Request")),
            response_serializer=getattr(elasticlm_pb2, f"{name}Response").SerializeToString)
        for name in RPCS
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    server.add_registered_method_handlers(SERVICE, handlers)
