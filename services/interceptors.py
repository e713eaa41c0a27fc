"""The two server interceptors: errors -> status codes (the one place that happens), and bearer
token authentication.

ErrorInterceptor must come first (outermost) so that what AuthInterceptor raises is mapped too.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable

import grpc
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status
from stillroom.services.auth import Principal, TokenTable
from stillroom.services.errors import InvalidArgument, StillroomError

log = logging.getLogger("stillroom.server")
UNAUTHENTICATED_METHODS = ("/grpc.health.v1.Health/",)


class _Malformed:
    """Stands in for a request whose bytes did not parse (grpc would answer INTERNAL)."""

    def __init__(self, error: Exception):
        self.error = error


def _safe_deserializer(deserialize: Callable | None) -> Callable | None:
    if deserialize is None:
        return None

    def parse(data: bytes):
        try:
            return deserialize(data)
        except Exception as e:  # noqa: BLE001 - any parse failure is the client's
            return _Malformed(e)

    return parse


def _rewrap(handler: grpc.RpcMethodHandler, wrap: Callable, safe_parse: bool = False) -> grpc.RpcMethodHandler:
    """Rebuild `handler` with its behaviour passed through wrap(behaviour, response_streaming)."""
    for kind, factory in (
        ("unary_unary", grpc.unary_unary_rpc_method_handler),
        ("unary_stream", grpc.unary_stream_rpc_method_handler),
        ("stream_unary", grpc.stream_unary_rpc_method_handler),
        ("stream_stream", grpc.stream_stream_rpc_method_handler),
    ):
        behaviour = getattr(handler, kind)
        if behaviour is not None:
            deserializer = handler.request_deserializer
            if safe_parse and not handler.request_streaming:
                deserializer = _safe_deserializer(deserializer)
            return factory(
                wrap(behaviour, handler.response_streaming),
                request_deserializer=deserializer,
                response_serializer=handler.response_serializer,
            )
    return handler


def status_of(error: StillroomError) -> status_pb2.Status:
    """The google.rpc.Status for a domain error; field violations travel as a BadRequest detail."""
    status = status_pb2.Status(code=getattr(code_pb2, error.code), message=str(error))
    if isinstance(error, InvalidArgument):
        detail = any_pb2.Any()
        detail.Pack(
            error_details_pb2.BadRequest(
                field_violations=[
                    error_details_pb2.BadRequest.FieldViolation(field=f, description=d) for f, d in error.violations
                ]
            )
        )
        status.details.append(detail)
    return status


def _abort(context: grpc.ServicerContext, error: Exception, method: str):
    if isinstance(error, StillroomError):
        context.abort_with_status(rpc_status.to_status(status_of(error)))
    # Anything else is our bug, never the client's: log it with an id the client can quote.
    error_id = uuid.uuid4().hex[:12]
    log.exception("internal error %s in %s", error_id, method, exc_info=error)
    context.abort(grpc.StatusCode.INTERNAL, f"internal error (id {error_id}); the server log has details")


class ErrorInterceptor(grpc.ServerInterceptor):
    def intercept_service(self, continuation, details):
        handler = continuation(details)
        if handler is None:
            return None
        method = details.method

        def wrap(behaviour, streaming):
            def check(request):
                if isinstance(request, _Malformed):
                    raise InvalidArgument(f"the request message does not parse: {request.error}")

            if streaming:

                def stream(request, context):
                    try:
                        check(request)
                        yield from behaviour(request, context)
                    except Exception as e:  # noqa: BLE001
                        _abort(context, e, method)

                return stream

            def unary(request, context):
                try:
                    check(request)
                    return behaviour(request, context)
                except Exception as e:  # noqa: BLE001
                    _abort(context, e, method)

            return unary

        return _rewrap(handler, wrap, safe_parse=True)


class AuthedContext:
    """A ServicerContext that also carries the caller's principal."""

    def __init__(self, context: grpc.ServicerContext, principal: Principal):
        self._context = context
        self.principal = principal

    def __getattr__(self, name):
        return getattr(self._context, name)


class AuthInterceptor(grpc.ServerInterceptor):
    def __init__(self, tokens: TokenTable):
        self._tokens = tokens

    def intercept_service(self, continuation, details):
        handler = continuation(details)
        if handler is None or details.method.startswith(UNAUTHENTICATED_METHODS):
            return handler
        metadata = details.invocation_metadata

        def wrap(behaviour, streaming):
            def call(request, context):
                principal = self._tokens.authenticate(metadata)
                return behaviour(request, AuthedContext(context, principal))

            if streaming:

                def stream(request, context):
                    yield from call(request, context)

                return stream
            return call

        return _rewrap(handler, wrap)
