"""HTTP plumbing shared by the dashboard (`llmplan ui`) and the OpenAI-compatible server (`llmplan serve`):
which Host headers are answered, JSON bodies read with bounds, request heads with a deadline, the listening socket.
"""

from __future__ import annotations

import json
import socket
from http import HTTPStatus
from typing import Any

import anyio
from fastapi import Request
from uvicorn.protocols.http.h11_impl import H11Protocol

LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})
ANY_ADDRESS = frozenset({"0.0.0.0", "::", ""})
MAX_BODY_BYTES = 1 << 20
BODY_TIMEOUT_S = 30.0
IDLE_TIMEOUT_S = 15.0
MAX_CONNECTIONS = 500
MAX_HEAD_BYTES = 64 << 10


class ApiError(Exception):
    """A refused call: its HTTP status, a one-line message, and the field at fault where there is one."""

    def __init__(self, status: HTTPStatus, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.status, self.field = status, field


def host_headers(host: str, port: int) -> frozenset[str] | None:
    """The Host headers answered: the loopback names and `host`, with the port (None: any, when bound to every
    address, where the token guards each call)."""
    if host in ANY_ADDRESS:
        return None
    names = {name if ":" not in name else f"[{name}]" for name in (*LOOPBACK_HOSTS, host.lower())}
    bare = names if port == 80 else set()
    return frozenset({f"{name}:{port}" for name in names} | bare)


async def json_body(request: Request) -> dict[str, Any]:
    """The request's JSON object: 415 unless sent as JSON, 413 past MAX_BODY_BYTES, 408 when it does not
    arrive within BODY_TIMEOUT_S, 400 unless it parses (NaN, deep nesting and huge numbers do not)."""
    if request.headers.get("content-type", "").split(";")[0].strip().lower() != "application/json":
        raise ApiError(HTTPStatus.UNSUPPORTED_MEDIA_TYPE, "send a JSON body (Content-Type: application/json)")
    if int(request.headers.get("content-length") or 0) > MAX_BODY_BYTES:  # h11 let only digits through
        raise ApiError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, "request body too large")
    raw = bytearray()
    try:
        with anyio.fail_after(BODY_TIMEOUT_S):
            async for chunk in request.stream():
                raw += chunk
                if len(raw) > MAX_BODY_BYTES:
                    raise ApiError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, "request body too large")
    except TimeoutError:
        raise ApiError(HTTPStatus.REQUEST_TIMEOUT, f"the body did not arrive within {BODY_TIMEOUT_S:.0f} s") from None
    try:
        body = json.loads(bytes(raw) or b"{}", parse_constant=_no_constant)
    except (ValueError, RecursionError) as error:
        reason = error.msg if isinstance(error, json.JSONDecodeError) else str(error).splitlines()[0] or "too deep"
        raise ApiError(HTTPStatus.BAD_REQUEST, f"the body is not JSON: {reason}") from None
    if not isinstance(body, dict):
        raise ApiError(HTTPStatus.BAD_REQUEST, "the body must be a JSON object")
    return body


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


class HeadDeadlineProtocol(H11Protocol):
    """uvicorn's h11 protocol, its keep-alive timer also run from the connection's start and kept while a
    request head trickles in: a connection that sends no whole request head within timeout_keep_alive is
    closed (uvicorn alone waits for ever for a first request, and restarts the timer on every byte)."""

    def connection_made(self, transport: Any) -> None:
        super().connection_made(transport)
        self.timeout_keep_alive_task = self.loop.call_later(self.timeout_keep_alive, self.timeout_keep_alive_handler)

    def data_received(self, data: bytes) -> None:
        self.conn.receive_data(data)
        self.handle_events()  # a whole request head stops the timer; the response's end starts it again


def listening_socket(host: str, port: int) -> socket.socket:
    """The socket, listening (IPv4 preferred for a name that has both), so that the port is known before serving."""
    found = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    family, kind, proto, _, address = min(found, key=lambda entry: entry[0] != socket.AF_INET)
    listener = socket.socket(family, kind, proto)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(address)
    listener.listen(128)  # connections made once the address is printed wait for the server
    return listener
