"""The two server interceptors: errors -> status codes (the one place that happens), and bearer
token authentication.

ErrorInterceptor must come first (outermost) so that what AuthInterceptor raises is mapped too.
"""

from __future__ import annotations

import inspect
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


def _around(behaviour: Callable, streaming: bool, before: Callable, maps_errors: bool) -> Callable:
    """`behaviour` (sync or async, unary or streaming) with before(request, context) -> context run
    first; with `maps_errors`, every exception aborts the call with its status (else it propagates
    to the interceptor outside). The aio server runs sync behaviours on its thread pool and async
    ones on its event loop: the wrapper keeps the kind, so a stream that awaits holds a coroutine,
    never a thread."""
    if inspect.isasyncgenfunction(behaviour):

        async def agen(request, context):
            try:
                async for item in behaviour(request, before(request, context)):
                    yield item
            except Exception as e:
                if not maps_errors:
                    raise
                await _abort_async(context, e)

        return agen
    if inspect.iscoroutinefunction(behaviour):

        async def coro(request, context):
            try:
                return await behaviour(request, before(request, context))
            except Exception as e:
                if not maps_errors:
                    raise
                await _abort_async(context, e)

        return coro
    if streaming:

        def gen(request, context):
            try:
                yield from behaviour(request, before(request, context))
            except Exception as e:
                if not maps_errors:
                    raise
                _abort_sync(context, e)

        return gen

    def unary(request, context):
        try:
            return behaviour(request, before(request, context))
        except Exception as e:
            if not maps_errors:
                raise
            _abort_sync(context, e)

    return unary


MAX_VIOLATIONS = 50  # the first violations a status carries; the rest are counted
MAX_DESCRIPTION = 300  # characters of one violation's description
MAX_DETAILS_BYTES = 4096  # the whole status stays far below gRPC's 8 KiB metadata limit


def _fit(violations: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """The violations an answer can carry: trimmed, then as many as fit MAX_DETAILS_BYTES (counted
    twice: the message and the BadRequest detail both carry them), the rest summed up."""
    kept, size = [], 0
    for field, description in violations[:MAX_VIOLATIONS]:
        item = (field[:MAX_DESCRIPTION], description[:MAX_DESCRIPTION])
        size += 2 * (len(item[0].encode()) + len(item[1].encode()) + 8)
        if size > MAX_DETAILS_BYTES:
            break
        kept.append(item)
    if len(kept) < len(violations):
        kept.append(("", f"and {len(violations) - len(kept)} more violations"))
    return kept


def status_of(error: StillroomError) -> status_pb2.Status:
    """The google.rpc.Status for a domain error; field violations travel as a BadRequest detail.
    Both are capped (_fit) so that the answer always fits gRPC's trailers."""
    message = str(error)
    status = status_pb2.Status(code=getattr(code_pb2, error.code))
    if isinstance(error, InvalidArgument):
        fitted = _fit(error.violations)
        message = "; ".join(f"{f}: {d}" if f else d for f, d in fitted)
        detail = any_pb2.Any()
        detail.Pack(
            error_details_pb2.BadRequest(
                field_violations=[
                    error_details_pb2.BadRequest.FieldViolation(field=f, description=d) for f, d in fitted if f
                ]
            )
        )
        status.details.append(detail)
    status.message = message[:MAX_DETAILS_BYTES]
    return status


def _status(error: Exception) -> tuple[grpc.StatusCode, str, tuple]:
    """(code, details, trailing metadata) of the answer to a call that raised `error`."""
    if isinstance(error, StillroomError):
        status = rpc_status.to_status(status_of(error))
        return status.code, status.details, status.trailing_metadata
    # Anything that is not a domain error is our bug, never the client's: logged with an id to quote.
    error_id = uuid.uuid4().hex[:12]
    log.error("internal error %s", error_id, exc_info=error)
    return grpc.StatusCode.INTERNAL, f"internal error (id {error_id}); the server log has details", ()


def _abort_sync(context, error: Exception):
    context.abort(*_status(error))


async def _abort_async(context, error: Exception):
    await context.abort(*_status(error))


class ErrorInterceptor(grpc.aio.ServerInterceptor):
    """Domain errors -> their status codes; anything else -> INTERNAL with an id; a request that does
    not parse -> INVALID_ARGUMENT."""

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if handler is None:
            return None

        def check(request, context):
            if isinstance(request, _Malformed):
                raise InvalidArgument(f"the request message does not parse: {request.error}")
            return context

        def wrap(behaviour, streaming):
            return _around(behaviour, streaming, check, maps_errors=True)

        return _rewrap(handler, wrap, safe_parse=True)


class AuthedContext:
    """A ServicerContext that also carries the caller's principal."""

    def __init__(self, context: grpc.ServicerContext, principal: Principal):
        self._context = context
        self.principal = principal

    def __getattr__(self, name):
        return getattr(self._context, name)


class AuthInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, tokens: TokenTable):
        self._tokens = tokens

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if handler is None or details.method.startswith(UNAUTHENTICATED_METHODS):
            return handler
        metadata = details.invocation_metadata

        def authenticate(request, context):
            return AuthedContext(context, self._tokens.authenticate(metadata))

        def wrap(behaviour, streaming):
            return _around(behaviour, streaming, authenticate, maps_errors=False)  # the ErrorInterceptor maps

        return _rewrap(handler, wrap)
