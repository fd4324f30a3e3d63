"""The servicer functions named in the Serve config's ``grpc_servicer_functions``: ``elasticlm.v1`` (ours) and
``tei.v1`` (text-embeddings-inference's contract, ``proto/tei.proto``), served side by side on one port.

Each registers the generated handlers of every RPC, except that a request that does not decode as its
message (e.g. ``EmbedRequest``) becomes ``None`` (a TEI one an ``UndecodableTei``) instead of failing inside gRPC
(which would answer INTERNAL):
``ElasticReplica.Embed`` (deployments/ingress.py) then answers INVALID_ARGUMENT naming the problem, as HTTP answers 400 for
malformed JSON. Serve's proxy keeps each handler's deserializer, so this is all it takes.
"""

import grpc
from google.protobuf.message import DecodeError

from deployments.grpc_api import elasticlm_pb2, tei_pb2

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


# ----------------------------------------------------------------------------- tei.v1, beside elasticlm.v1
TEI_SERVICES = {service.full_name: service for service in tei_pb2.DESCRIPTOR.services_by_name.values()}


class UndecodableTei:
    """What a tei.v1 request that does not decode as its message becomes (instead of ``None``): Serve calls
    the deployment method named like the RPC whatever the package, so ``Embed`` must still tell a broken
    TEI request from a broken elasticlm one to answer it in TEI's terms (deployments/tei_grpc_adapter.py)."""

    def __init__(self, message_name: str):
        self.message_name = message_name


def _lenient_tei(message_type):
    def parse(data: bytes):
        try:
            return message_type.FromString(data)
        except DecodeError:
            return UndecodableTei(message_type.DESCRIPTOR.full_name)

    return parse


def _tei_handler(servicer, method):
    """The handler of one tei.v1 RPC with its streaming kind as the contract declares it (Serve keeps the
    kind and the deserializer, and replaces the behaviour with a call of the deployment method)."""
    kind = {(False, False): grpc.unary_unary_rpc_method_handler, (True, False): grpc.stream_unary_rpc_method_handler,
            (False, True): grpc.unary_stream_rpc_method_handler, (True, True): grpc.stream_stream_rpc_method_handler}
    make = kind[(method.client_streaming, method.server_streaming)]
    request_type = getattr(tei_pb2, method.input_type.name)
    response_type = getattr(tei_pb2, method.output_type.name)
    return make(getattr(servicer, method.name), request_deserializer=_lenient_tei(request_type),
                response_serializer=response_type.SerializeToString)


def add_TeiServicer_to_server(servicer, server):
    """Every RPC of TEI's five services (tei.v1.Info, Embed, Predict, Rerank, Tokenize), each one service
    registration (Serve's server takes the first handler of each call, and reflection lists each service)."""
    for name, service in TEI_SERVICES.items():
        handlers = {method.name: _tei_handler(servicer, method) for method in service.methods}
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(name, handlers),))
        server.add_registered_method_handlers(name, handlers)
