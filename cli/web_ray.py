"""The dashboard's calls that need the Ray cluster (submit, and waking the scheduler on cancel), each in a
short-lived process of its own.

A process that joins Ray becomes a Ray driver, and a driver whose cluster stays unreachable for
`gcs_rpc_server_reconnect_timeout_s` (60 s) is ended by Ray's own GCS client ("Failed to connect to GCS").
The dashboard serves history and plans from the job store whether Ray is up or not, so it never joins Ray
itself: each call that needs Ray runs in a child process (joined afresh, so a restarted cluster is simply
joined again), with a deadline, and a cluster that does not answer is a 503 with a message that says so.
"""

from __future__ import annotations

import multiprocessing
import os
import socket
from collections.abc import Callable
from http import HTTPStatus
from typing import Any

from .web_errors import ApiError, error_answer

REACH_TIMEOUT_S = 2.0  # a TCP connect to the cluster's GCS port
RAY_CALL_TIMEOUT_S = 180.0  # joining, planning for the cluster and queueing (a local head may be started)
DOWN_NOTE = "history and plans are still served; try again when the cluster is back"


class RayUnavailableError(ApiError):
    """The cluster a Ray call needs cannot be reached: 503."""

    def __init__(self, message: str) -> None:
        super().__init__(HTTPStatus.SERVICE_UNAVAILABLE, f"{message}; {DOWN_NOTE}")


def cluster_address(address: str | None) -> str | None:
    """The cluster calls go to, as `llmplan submit` picks it: the given one, $LLMPLAN_RAY_ADDRESS, else
    llmplan's local head when one is up (None: none is, and the call will start it)."""
    from llmplan.runtime.jobs.cluster import ADDRESS_ENV, local_head_address

    return address or os.environ.get(ADDRESS_ENV) or local_head_address(start=False)


def check_reachable(address: str | None) -> None:
    """RayUnavailableError unless something listens on the cluster's GCS port (None: nothing to check)."""
    if address is None:
        return
    host, _, port = address.split("://")[-1].rpartition(":")
    try:
        with socket.create_connection((host.strip("[]") or "127.0.0.1", int(port)), timeout=REACH_TIMEOUT_S):
            return
    except (OSError, ValueError) as error:
        reason = getattr(error, "strerror", None) or str(error) or type(error).__name__
        raise RayUnavailableError(f"the Ray cluster at {address} is unreachable ({reason.lower()})") from None


def call_with_ray(address: str | None, function: Callable[..., Any], *args: Any,
                  timeout: float = RAY_CALL_TIMEOUT_S) -> Any:
    """`function(*args)` in a child process that may join the cluster at `address`; its answer, or the
    ApiError it raised, or RayUnavailableError when the cluster is down or the call outlives `timeout`."""
    address = cluster_address(address)
    check_reachable(address)
    where = f"the Ray cluster at {address or 'the local head'}"
    return call_in_child(function, *args, timeout=timeout,
                         late=RayUnavailableError(f"{where} did not answer within {timeout:.0f} s"),
                         ended=lambda code: RayUnavailableError(f"the process talking to {where} ended without "
                                                                f"an answer (exit code {code})"))


def call_in_child(function: Callable[..., Any], *args: Any, timeout: float, late: ApiError,
                  ended: Callable[[int | None], ApiError]) -> Any:
    """`function(*args)` in a spawned child process (its file descriptors its own, so a library's output can
    be sent to a log without touching the server's): its answer, or the ApiError it raised; `late` when it
    outlives `timeout`, `ended(exit code)` when it dies without an answer."""
    context = multiprocessing.get_context("spawn")  # never a fork of a threaded server
    receiver, sender = context.Pipe(duplex=False)
    child = context.Process(target=_answer, args=(sender, function, args), name="llmplan-ui-call", daemon=True)
    child.start()
    sender.close()
    try:
        if not receiver.poll(timeout):
            raise late
        succeeded, value = receiver.recv()
    except EOFError:
        child.join(5)
        raise ended(child.exitcode) from None
    finally:
        receiver.close()
        if child.is_alive():
            child.kill()
        child.join()
    if succeeded:
        return value
    status, message, field = value
    raise ApiError(HTTPStatus(status), message, field)


def _answer(sender: Any, function: Callable[..., Any], args: tuple[Any, ...]) -> None:
    """In the child: (True, the result) or (False, (status, message, field)) for the parent."""
    try:
        answer = (True, function(*args))
    except BaseException as error:  # noqa: BLE001 - every failure goes back as one line
        answer = (False, error_answer(error))
    sender.send(answer)
    sender.close()
